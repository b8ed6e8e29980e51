//! Repository maintenance: stats, verify, prune and GC requests and answers.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Repository figures.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RepoStats {
    pub backups: u64,
    pub vms: u64,
    pub chunk_size: u32,
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Sum of the disk sizes of every backup (what restoring them all would produce).
    pub logical_bytes: u64,
    /// Bytes the backups added to the store (compressed).
    pub stored_bytes: u64,
    /// logical / stored.
    pub reduction_ratio: f64,
}

/// Body of a verify request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Only these backups (default: all).
    #[serde(default)]
    pub backups: Vec<String>,
    /// Re-read and re-hash every chunk (default: check presence only).
    #[serde(default)]
    pub full: bool,
}

/// One problem verify found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyProblem {
    pub digest: Option<String>,
    pub kind: String,
    pub detail: String,
    /// Backups that reference the damaged data.
    pub backups: Vec<String>,
}

/// Outcome of a verify.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyResponse {
    pub ok: bool,
    pub backups: u64,
    pub chunks: u64,
    pub chunks_rehashed: u64,
    pub problems: Vec<VerifyProblem>,
    /// Every backup affected by a problem.
    pub affected_backups: Vec<String>,
    /// Bad chunks whose stored copy was forgotten: the next backup that reads the same
    /// content stores it again, and every backup referencing it reads the new copy.
    #[serde(default)]
    pub forgotten: u64,
}

/// Body of a prune request: a retention policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Only this VM, by name or uuid (default: every VM); a name several backed-up VMs
    /// carry (on different hypervisors) is refused with 409: give the uuid.
    pub vm: Option<String>,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// Report, remove nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Outcome of a prune.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PruneResponse {
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    pub dry_run: bool,
}

/// Body of a GC request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    #[serde(default)]
    pub dry_run: bool,
}

/// Outcome of a GC.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GcResponse {
    pub live_blobs: u64,
    pub packs: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub bytes_freed: u64,
}
