//! The shared state of the daemon. Handlers and operations reach the synchronous repository
//! through `AppState::repo`, which goes through `proxy::repo` (one bounded seam for the whole
//! process).

use std::path::PathBuf;
use std::sync::Arc;

use catalog::Repository;

use crate::daemon::audit::AuditLog;
use crate::daemon::auth::TokenStore;
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::exports::Exports;
use crate::daemon::hypervisors::Hypervisors;
use crate::daemon::instant::InstantRecoveries;
use crate::daemon::jobs::Jobs;
use crate::daemon::schedule::policy::PolicyStore;

/// Everything a handler can reach.
pub struct AppState {
    pub repo: Repository,
    /// The cluster's hypervisors, by name.
    pub hypervisors: Hypervisors,
    pub jobs: Arc<Jobs>,
    pub tokens: TokenStore,
    /// Scratch directory of backup jobs.
    pub work_dir: PathBuf,
    /// Audit log of mutating calls, if enabled.
    pub audit: Option<AuditLog>,
    /// NBD exports of backups, if enabled.
    pub exports: Option<Exports>,
    /// Directories restores may write into (none: restores to files are refused).
    pub restore_dirs: Vec<PathBuf>,
    /// Installed backup policies (in memory unless [`AppState::with_policies`]).
    pub policies: PolicyStore,
    /// Paces the reads of every backup job together (none: unlimited).
    pub read_limit: Option<Arc<proxy::job::RateLimit>>,
    /// Running instant recoveries, and the NBD address hypervisors dial for them.
    pub instant: InstantRecoveries,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

/// The state as handlers share it.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// State over an opened repository and the cluster's hypervisors.
    pub fn new(
        repo: Repository,
        hypervisors: Hypervisors,
        tokens: TokenStore,
        work_dir: PathBuf,
        concurrency: usize,
    ) -> Self {
        AppState {
            repo,
            hypervisors,
            jobs: Arc::new(Jobs::new(concurrency)),
            tokens,
            work_dir,
            audit: None,
            exports: None,
            restore_dirs: Vec::new(),
            policies: PolicyStore::in_memory(),
            read_limit: None,
            instant: InstantRecoveries::default(),
        }
    }

    /// Instant recoveries are served at `at` (what QEMU on a hypervisor dials).
    pub fn with_instant_address(mut self, at: proxy::restore::NbdAddress) -> Self {
        self.instant.at = Some(at);
        self
    }

    /// Records mutating calls in `log`.
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Serves NBD exports through `exports`.
    pub fn with_exports(mut self, exports: Exports) -> Self {
        self.exports = Some(exports);
        self
    }

    /// Lets restores write image files into `dirs`.
    pub fn with_restore_dirs(mut self, dirs: Vec<PathBuf>) -> Self {
        self.restore_dirs = dirs;
        self
    }

    /// Keeps policies in `store` (persisted under the data directory by `sluice serve`).
    pub fn with_policies(mut self, store: PolicyStore) -> Self {
        self.policies = store;
        self
    }

    /// Runs jobs in `jobs` (limits, history) instead of the in-memory registry of `new`.
    pub fn with_jobs(mut self, jobs: Jobs) -> Self {
        self.jobs = Arc::new(jobs);
        self
    }

    /// Limits the reads of all backup jobs together to `bytes_per_sec`.
    pub fn with_read_limit(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.read_limit = bytes_per_sec.map(|b| Arc::new(proxy::job::RateLimit::new(b)));
        self
    }

    /// Runs `f` against the repository through `proxy::repo`, the process's one seam into
    /// the synchronous repository (its bound covers the API's calls and the jobs' alike).
    pub async fn repo<R, F>(&self, f: F) -> ApiResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&Repository) -> catalog::Result<R> + Send + 'static,
    {
        let repo = self.repo.clone();
        proxy::repo::call(move || f(&repo))
            .await
            .map_err(ApiError::from)
    }
}
