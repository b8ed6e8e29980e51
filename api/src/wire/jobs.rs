//! Jobs: state, progress counters and the job as the API shows it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// What a job does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Backup,
    Restore,
}

/// How a job does it: a backup's mode, or where a restore writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobMode {
    /// Backup: incremental when change tracking allows, else full.
    Auto,
    /// Backup: every disk read in full.
    Full,
    /// Restore: one disk to an image file.
    ToFile,
    /// Restore: every disk as a new domain.
    AsDomain,
    /// Restore: back onto the VM's own disks.
    OntoVm,
    /// Restore: a new domain running straight from the repository (instant recovery).
    Instant,
}

/// What to do about a job that did not succeed (the library's error kind, kept through
/// every boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A transient failure (hypervisor, network, storage I/O, a lock): retrying later may help.
    Retry,
    /// Stored data fails a check: run `sluice verify`; never trust the data.
    Corrupt,
    /// The VM, backup, disk or object named does not exist.
    NotFound,
    /// The hypervisor or repository refused what was asked (unsupported, busy, conflict).
    Refused,
    /// The request does not fit (name, size, disk): fix it.
    InvalidInput,
    /// The job was cancelled; nothing was committed.
    Cancelled,
    /// Anything else: the message says what failed.
    Failed,
}

/// Why a job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    pub kind: ErrorKind,
    /// The error with its whole cause chain, once.
    pub message: String,
}

impl JobError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        JobError {
            kind,
            message: message.into(),
        }
    }

    /// A cancelled job.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }
}

impl JobKind {
    /// The wire name (`backup`, `restore`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
        }
    }
}

impl JobMode {
    /// The wire name (`auto`, `full`, `to-file`, `as-domain`, `onto-vm`, `instant`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobMode::Auto => "auto",
            JobMode::Full => "full",
            JobMode::ToFile => "to-file",
            JobMode::AsDomain => "as-domain",
            JobMode::OntoVm => "onto-vm",
            JobMode::Instant => "instant",
        }
    }
}

impl ErrorKind {
    /// The wire name (`retry`, `corrupt`, `not_found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retry => "retry",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Failed => "failed",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for JobMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress counters of a job.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct JobProgress {
    pub bytes_planned: u64,
    pub bytes_read: u64,
    pub bytes_done: u64,
    pub bytes_zero: u64,
    pub bytes_new: u64,
    pub bytes_dedup: u64,
    pub elapsed_secs: f64,
    /// Bytes read per second.
    pub read_rate: f64,
    pub eta_secs: Option<f64>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobInfo {
    pub id: u64,
    pub kind: JobKind,
    pub vm: String,
    pub state: JobState,
    pub mode: JobMode,
    /// Unix seconds.
    pub created: i64,
    pub finished: Option<i64>,
    /// The outcome, or the error with its whole cause chain.
    pub message: Option<String>,
    /// Why a failed or cancelled job ended: what to do about it and the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The committed backup, once succeeded.
    pub backup_id: Option<String>,
    /// The policy whose schedule started it (none: started through the API).
    #[serde(default)]
    pub policy: Option<String>,
    /// The hypervisor host it runs against (per-host concurrency limit).
    #[serde(default)]
    pub host: String,
    /// The hypervisor it runs against (none: it needs none, e.g. a restore to a file).
    #[serde(default)]
    pub hypervisor: Option<String>,
    pub progress: JobProgress,
    /// An instant recovery (mode `instant`): its domain, exports and state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instant: Option<crate::wire::instant::InstantInfo>,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}
