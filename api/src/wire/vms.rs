//! VMs as the hypervisors report them, and backup requests.

use crate::wire::backups::BackupSummary;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One disk of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmDisk {
    pub target: String,
    pub format: Option<String>,
    /// Bytes.
    pub capacity: u64,
}

/// A VM as the hypervisor reports it, with its last backup.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub name: String,
    /// The hypervisor it runs on.
    pub hypervisor: String,
    pub uuid: String,
    /// `running`, `paused`, `shutoff` or `other`.
    pub state: String,
    pub disks: Vec<VmDisk>,
    pub last_backup: Option<BackupSummary>,
}

/// A hypervisor whose VMs could not be listed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Unreachable {
    pub hypervisor: String,
    pub error: String,
}

/// The VMs of every reachable hypervisor, and the hypervisors that could not be asked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
    /// Empty when every hypervisor answered.
    pub unreachable: Vec<Unreachable>,
}

/// Which hypervisor a VM name means (needed only when it is on several).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HvQuery {
    /// Hypervisor name (see `GET /api/v1/hypervisors`).
    pub hypervisor: Option<String>,
}

/// How to take a backup.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackupModeRequest {
    /// Incremental when change tracking allows, else full (and say why).
    #[default]
    Auto,
    /// Read every disk in full.
    Full,
}

/// Body of a backup request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    #[serde(default)]
    pub mode: BackupModeRequest,
}
