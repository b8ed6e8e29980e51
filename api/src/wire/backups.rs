//! Backups: summaries, details, list filters and protection requests.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A backup in a list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupSummary {
    pub id: String,
    pub vm: String,
    pub vm_uuid: String,
    /// Unix seconds.
    pub started: i64,
    pub finished: i64,
    /// `full`, `incremental` or `full_because`.
    pub mode: String,
    /// Why a full read was needed, if one was.
    pub reason: Option<String>,
    pub protected: bool,
    pub bytes_stored: u64,
}

/// One disk of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupDisk {
    pub target: String,
    pub size: u64,
    pub chunk_size: u32,
    pub checkpoint: Option<String>,
    pub parent_backup: Option<String>,
    /// Why this disk was read in full (no change tracking, e.g. a raw image); absent when
    /// its changes were tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_read: Option<String>,
}

/// A backup in full.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupDetail {
    #[serde(flatten)]
    pub summary: BackupSummary,
    /// `application` or `crash`.
    pub consistency: String,
    /// How the VM was: `running`, `shut_off` (its images read directly) or `started_paused`
    /// (shut off, started paused for the backup, its CPUs never ran, powered off again);
    /// absent for backups that did not record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,
    pub disks: Vec<BackupDisk>,
    pub chunks_new: u64,
    pub chunks_dedup: u64,
    pub chunks_zero: u64,
    pub bytes_new_raw: u64,
}

/// Filter of the backup list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the backups of VMs of this name (every VM of the name, on any hypervisor: tell
    /// them apart by `vm_uuid`), or of the VM of this uuid.
    pub vm: Option<String>,
}

/// Body of a protect request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    pub protected: bool,
}
