//! The cluster's hypervisors as `GET /api/v1/hypervisors` shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether a hypervisor answered the last time it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HvState {
    /// Not asked yet (connections are opened on first use).
    Unknown,
    Up,
    Unreachable,
}

/// A hypervisor as `GET /api/v1/hypervisors` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HypervisorInfo {
    pub name: String,
    /// `libvirt` or `qmp`.
    pub kind: String,
    /// The libvirt URI (libvirt only).
    pub uri: Option<String>,
    /// The QMP socket (qmp only).
    pub socket: Option<String>,
    /// Host key of the per-host job limit.
    pub host: String,
    pub state: HvState,
    /// Why it is unreachable.
    pub error: Option<String>,
    /// VMs it had when last listed.
    pub vms: Option<usize>,
    /// Its host's job limit, if one is set.
    pub max_jobs: Option<usize>,
}
