//! Instant recovery as a job shows it: the domain running on a hypervisor straight from
//! Sluice's NBD exports of a backup's disks (`restore ID --instant`), where its disks are
//! served and how much the guest has written since it booted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where an instant recovery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstantState {
    /// Exports opened, the domain being defined and started.
    Starting,
    /// The domain runs from the repository (its state on the hypervisor is `domain_state`).
    Running,
    /// Being ended: the domain destroyed and undefined, the exports closed.
    Ending,
    /// Over: nothing of it is left (or the job's message says what is).
    Ended,
}

impl InstantState {
    /// The wire name (`starting`, `running`, `ending`, `ended`).
    pub fn as_str(self) -> &'static str {
        match self {
            InstantState::Starting => "starting",
            InstantState::Running => "running",
            InstantState::Ending => "ending",
            InstantState::Ended => "ended",
        }
    }
}

impl std::fmt::Display for InstantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One disk of an instant recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstantDiskInfo {
    /// Guest target (`vda`).
    pub target: String,
    /// The writable export QEMU reads and writes (`sluice-instant-JOB/vda`).
    pub export: String,
    /// Disk size, bytes.
    pub size: u64,
    /// Bytes the guest has written so far (kept in the export's overlay on the proxy, never
    /// in the repository; 4 KiB blocks).
    pub written: u64,
}

/// An instant recovery: what runs where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstantInfo {
    pub state: InstantState,
    /// The backup it runs from (held: prune keeps it, GC keeps its chunks).
    pub backup: String,
    /// The new domain's name.
    pub domain: String,
    /// The libvirt hypervisor it is defined on.
    pub hypervisor: String,
    /// The domain's state there, as last seen (`running`, `paused`, `shut_off`, `other`).
    #[serde(default)]
    pub domain_state: Option<String>,
    /// What QEMU dials: `nbds://HOST:PORT` (`nbd://` without TLS).
    pub nbd: String,
    pub disks: Vec<InstantDiskInfo>,
}
