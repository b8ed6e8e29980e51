//! Background jobs: a registry of backup jobs with bounded concurrency, live progress and
//! cancel; shutdown cancels every running job and waits for it to release its resources.
//!
//! The registry is in memory: after a restart, finished jobs are found as backups.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proxy::job::{Progress, ProgressSnapshot};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;

use crate::auth::now;
use crate::metrics::JobMetrics;

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

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
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

impl From<ProgressSnapshot> for JobProgress {
    fn from(s: ProgressSnapshot) -> Self {
        JobProgress {
            bytes_planned: s.bytes_planned,
            bytes_read: s.bytes_read,
            bytes_done: s.bytes_done,
            bytes_zero: s.bytes_zero,
            bytes_new: s.bytes_new,
            bytes_dedup: s.bytes_dedup,
            elapsed_secs: s.elapsed_secs,
            read_rate: s.read_rate,
            eta_secs: s.eta_secs,
        }
    }
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
    pub progress: JobProgress,
}

struct Entry {
    info: JobInfo,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    /// Appended to the final message.
    note: Option<String>,
    /// When it left the queue.
    started: Option<Instant>,
}

/// The job registry.
pub struct Jobs {
    entries: Mutex<BTreeMap<u64, Entry>>,
    next: Mutex<u64>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Woken whenever a job changes state.
    changed: Notify,
    /// Counters of ended jobs, for `/metrics`.
    pub metrics: JobMetrics,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

/// What a job body gets: its progress counters and its cancel token.
pub struct JobHandle {
    pub id: u64,
    pub progress: Arc<Progress>,
    pub cancel: CancellationToken,
}

/// How a job body ended: the backup id, or (message, cancelled?).
pub type JobOutcome = Result<String, (String, bool)>;

impl Jobs {
    /// A registry running at most `concurrency` jobs at once.
    pub fn new(concurrency: usize) -> Self {
        Jobs {
            entries: Mutex::new(BTreeMap::new()),
            next: Mutex::new(1),
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            changed: Notify::new(),
            metrics: JobMetrics::default(),
        }
    }

    /// Queues a backup job; `body` runs once a slot is free.
    pub fn spawn<F, Fut>(self: &Arc<Self>, vm: &str, mode: &str, body: F) -> JobInfo
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        self.spawn_kind("backup", vm, mode, body)
    }

    /// Queues a job of `kind` (`backup`, `restore`); `body` runs once a slot is free. A
    /// job other than a backup reports its `Ok` text as its message.
    pub fn spawn_kind<F, Fut>(
        self: &Arc<Self>,
        kind: &str,
        vm: &str,
        mode: &str,
        body: F,
    ) -> JobInfo
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        let id = {
            let mut n = self.next.lock().expect("jobs lock");
            *n += 1;
            *n - 1
        };
        let progress = Arc::new(Progress::default());
        let cancel = self.shutdown.child_token();
        let info = JobInfo {
            id,
            kind: kind.to_string(),
            vm: vm.to_string(),
            state: JobState::Queued,
            mode: mode.to_string(),
            created: now(),
            finished: None,
            message: None,
            backup_id: None,
            policy: None,
            progress: JobProgress::default(),
        };
        let entry = Entry {
            info: info.clone(),
            progress: progress.clone(),
            cancel: cancel.clone(),
            note: None,
            started: None,
        };
        self.entries.lock().expect("jobs lock").insert(id, entry);
        let me = self.clone();
        let handle = JobHandle {
            id,
            progress,
            cancel,
        };
        self.tracker
            .spawn(async move { me.run(handle, body).await });
        info
    }

    /// Queues a backup job started by policy `policy`'s schedule.
    pub fn spawn_for_policy<F, Fut>(
        self: &Arc<Self>,
        vm: &str,
        mode: &str,
        policy: &str,
        body: F,
    ) -> JobInfo
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        let mut info = self.spawn(vm, mode, body);
        info.policy = Some(policy.to_string());
        if let Some(e) = self.entries.lock().expect("jobs lock").get_mut(&info.id) {
            e.info.policy = info.policy.clone();
        }
        info
    }

    /// Adds `note` to the message job `id` ends with (e.g. what its retention removed).
    pub fn annotate(&self, id: u64, note: &str) {
        if let Some(e) = self.entries.lock().expect("jobs lock").get_mut(&id) {
            e.note = Some(note.to_string());
        }
    }

    async fn run<F, Fut>(self: Arc<Self>, h: JobHandle, body: F)
    where
        F: FnOnce(JobHandle) -> Fut,
        Fut: std::future::Future<Output = JobOutcome>,
    {
        let id = h.id;
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok(),
            _ = h.cancel.cancelled() => None,
        };
        let Some(_permit) = permit else {
            self.finish(id, Err(("cancelled before it started".into(), true)));
            return;
        };
        self.set_state(id, JobState::Running);
        tracing::info!(job = id, "job started");
        let out = body(h).await;
        self.finish(id, out);
    }

    fn set_state(&self, id: u64, state: JobState) {
        if let Some(e) = self.entries.lock().expect("jobs lock").get_mut(&id) {
            e.info.state = state;
            if state == JobState::Running {
                e.started = Some(Instant::now());
            }
        }
        self.changed.notify_waiters();
    }

    /// Resolves at the next change of any job's state (created before reading a job, it
    /// also catches a change made in between).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn finish(&self, id: u64, out: JobOutcome) {
        let mut entries = self.entries.lock().expect("jobs lock");
        let Some(e) = entries.get_mut(&id) else {
            return;
        };
        e.info.finished = Some(now());
        e.info.progress = e.progress.snapshot().into();
        match out {
            Ok(text) if e.info.kind != "backup" => {
                e.info.state = JobState::Succeeded;
                e.info.message = Some(text);
            }
            Ok(backup) => {
                e.info.state = JobState::Succeeded;
                e.info.message = Some(format!("backup {backup} committed"));
                e.info.backup_id = Some(backup);
            }
            Err((msg, cancelled)) => {
                e.info.state = if cancelled {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                e.info.message = Some(msg);
            }
        }
        if let Some(note) = e.note.take() {
            let msg = e.info.message.take().unwrap_or_default();
            e.info.message = Some(format!("{msg}; {note}"));
        }
        let ran = e.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.metrics.record(&e.info, ran);
        tracing::info!(job = id, state = ?e.info.state, "job finished");
        drop(entries);
        self.changed.notify_waiters();
    }

    /// One job, with live progress.
    pub fn get(&self, id: u64) -> Option<JobInfo> {
        let entries = self.entries.lock().expect("jobs lock");
        entries.get(&id).map(live_info)
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobInfo> {
        let entries = self.entries.lock().expect("jobs lock");
        entries.values().rev().map(live_info).collect()
    }

    /// Asks job `id` to stop; returns it, or `None` if unknown.
    pub fn cancel(&self, id: u64) -> Option<JobInfo> {
        let entries = self.entries.lock().expect("jobs lock");
        let e = entries.get(&id)?;
        e.cancel.cancel();
        Some(live_info(e))
    }

    /// Cancels every job and waits until all have released their resources.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn live_info(e: &Entry) -> JobInfo {
    let mut info = e.info.clone();
    if !info.state.is_final() {
        info.progress = e.progress.snapshot().into();
    }
    info
}
