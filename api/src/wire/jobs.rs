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
    /// `backup` or `restore`.
    pub kind: String,
    pub vm: String,
    pub state: JobState,
    /// `auto` or `full`.
    pub mode: String,
    /// Unix seconds.
    pub created: i64,
    pub finished: Option<i64>,
    /// Error or outcome.
    pub message: Option<String>,
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
