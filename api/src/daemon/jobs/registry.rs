//! Background jobs: a registry of jobs with bounded concurrency (overall, and per hypervisor
//! host), live progress and cancel; shutdown cancels every running job and waits for it to
//! release its resources.
//!
//! A job waits in `queued` until it holds a slot of its host, then one of the overall limit
//! (in that order, so a job blocked by its host does not hold an overall slot). With a
//! [`JobLog`] every change is also written to the job history, which the next start reads
//! back (see [`crate::daemon::jobs::log`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proxy::job::{Progress, ProgressSnapshot};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::daemon::clock::now;
use crate::daemon::jobs::log::JobLog;
use crate::daemon::jobs::metrics::JobMetrics;
use crate::wire::jobs::{JobError, JobInfo, JobKind, JobMode, JobProgress, JobState};

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
    /// Per-host slots, made on first use (none: no per-host limit).
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per host, the turn of the last job queued: jobs of one host take their slots in the
    /// order they were queued (tasks start in any order).
    turns: Mutex<HashMap<String, oneshot::Receiver<()>>>,
    limits: JobLimits,
    /// Host of jobs spawned without one.
    host: String,
    log: Option<JobLog>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Woken whenever a job changes state.
    changed: Notify,
    /// Counters of ended jobs, for `/metrics`.
    pub metrics: JobMetrics,
    /// Held while [`Jobs::start_exclusive`] checks and queues, so two requests cannot both
    /// pass the check.
    exclusive: Mutex<()>,
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
    /// The concurrency slots the job holds while it runs (see [`JobHandle::release_slots`]).
    slots: Arc<Mutex<Option<Permits>>>,
}

impl JobHandle {
    /// Gives back the job's concurrency slots (overall and its host's) before it ends: for a
    /// job that stays running while it does no work of its own (an instant recovery, whose
    /// guest runs from the repository until cancelled), so it does not keep backups waiting.
    pub fn release_slots(&self) {
        self.slots.lock().expect("jobs lock").take();
    }
}

/// What a job body that succeeded leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobDone {
    /// A backup committed this backup (its id).
    Committed(String),
    /// Anything else, said in a message.
    Done(String),
}

/// How a job body ended.
pub type JobOutcome = Result<JobDone, JobError>;

/// Concurrency limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobLimits {
    /// Jobs running at once, overall.
    pub overall: usize,
    /// Jobs running at once against one hypervisor host (none: only the overall limit).
    pub per_host: Option<usize>,
    /// Limits of named hosts, over `per_host` (a hypervisor's own `max_jobs`).
    pub hosts: HashMap<String, usize>,
}

impl JobLimits {
    /// The limit of jobs at once on `host`, if any.
    pub fn of_host(&self, host: &str) -> Option<usize> {
        self.hosts.get(host).copied().or(self.per_host)
    }
}

/// What a job is: its kind, VM and mode, and what it runs against.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub kind: JobKind,
    pub vm: String,
    pub mode: JobMode,
    /// The hypervisor it runs against.
    pub hypervisor: Option<String>,
    /// The host of that hypervisor (none: the registry's default host).
    pub host: Option<String>,
    /// The policy whose schedule started it.
    pub policy: Option<String>,
}

impl JobSpec {
    /// A job of `kind` on `vm` in `mode`.
    pub fn new(kind: JobKind, vm: &str, mode: JobMode) -> Self {
        JobSpec {
            kind,
            vm: vm.into(),
            mode,
            hypervisor: None,
            host: None,
            policy: None,
        }
    }

    /// Runs against hypervisor `name` on `host`.
    pub fn on(mut self, name: &str, host: &str) -> Self {
        self.hypervisor = Some(name.into());
        self.host = Some(host.into());
        self
    }

    /// Started by policy `name`'s schedule.
    pub fn for_policy(mut self, name: &str) -> Self {
        self.policy = Some(name.into());
        self
    }
}

/// Whether a job of `kind` in `mode` works on its VM itself (one such job per VM at a time).
fn holds_vm(kind: JobKind, mode: JobMode) -> bool {
    kind == JobKind::Backup || (kind == JobKind::Restore && mode == JobMode::OntoVm)
}

impl Jobs {
    /// A registry in memory running at most `concurrency` jobs at once, on host `local`.
    pub fn new(concurrency: usize) -> Self {
        let limits = JobLimits {
            overall: concurrency,
            ..JobLimits::default()
        };
        Self::with(limits, "local", None, BTreeMap::new())
    }

    /// A registry with `limits`, whose jobs run against `host` unless told otherwise, and
    /// whose history is kept in `log` (read back now: interrupted jobs show as failed).
    pub fn open(limits: JobLimits, host: &str, log: Option<&Path>) -> std::io::Result<Self> {
        let Some(path) = log else {
            return Ok(Self::with(limits, host, None, BTreeMap::new()));
        };
        let (log, old) = JobLog::open(path)?;
        Ok(Self::with(limits, host, Some(log), old))
    }

    fn with(
        limits: JobLimits,
        host: &str,
        log: Option<JobLog>,
        old: BTreeMap<u64, JobInfo>,
    ) -> Self {
        let next = old.keys().next_back().map_or(1, |id| id + 1);
        let entries = old
            .into_iter()
            .map(|(id, info)| (id, Entry::ended(info)))
            .collect();
        Jobs {
            entries: Mutex::new(entries),
            next: Mutex::new(next),
            slots: Arc::new(Semaphore::new(limits.overall.max(1))),
            hosts: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            limits,
            host: host.to_string(),
            log,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            changed: Notify::new(),
            metrics: JobMetrics::default(),
            exclusive: Mutex::new(()),
        }
    }

    /// Queues a backup job; `body` runs once a slot is free.
    pub fn spawn<F, Fut>(self: &Arc<Self>, vm: &str, mode: JobMode, body: F) -> JobInfo
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        self.start(JobSpec::new(JobKind::Backup, vm, mode), body)
    }

    /// Queues the job `spec`; `body` runs once its host's slot and an overall one are free.
    pub fn start<F, Fut>(self: &Arc<Self>, spec: JobSpec, body: F) -> JobInfo
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        let queued = self.enqueue(spec);
        self.launch(queued, body)
    }

    /// [`Jobs::start`] unless a job that holds the same VM (a backup, or a restore onto the
    /// VM's own disks, on the same hypervisor) has not ended: then that job, untouched. Two
    /// backups of one VM at once would fight over its one libvirt backup job (the second
    /// one's stale-job clean-up would end the first's).
    pub fn start_exclusive<F, Fut>(
        self: &Arc<Self>,
        spec: JobSpec,
        body: F,
    ) -> Result<JobInfo, Box<JobInfo>>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        let queued = {
            let _one_at_a_time = self.exclusive.lock().expect("jobs lock");
            if let Some(j) = self.holder(&spec) {
                return Err(Box::new(j));
            }
            self.enqueue(spec)
        };
        Ok(self.launch(queued, body))
    }

    /// The unfinished job that holds the VM `spec` would hold, if `spec` holds one.
    fn holder(&self, spec: &JobSpec) -> Option<JobInfo> {
        if !holds_vm(spec.kind, spec.mode) {
            return None;
        }
        let entries = self.entries.lock().expect("jobs lock");
        entries
            .values()
            .map(|e| &e.info)
            .find(|j| {
                !j.state.is_final()
                    && holds_vm(j.kind, j.mode)
                    && j.vm == spec.vm
                    && j.hypervisor == spec.hypervisor
            })
            .cloned()
    }

    /// Registers the job `spec` as queued (seen by [`Jobs::holder`] from now on) and takes its
    /// turn on its host.
    fn enqueue(&self, spec: JobSpec) -> Queued {
        let id = {
            let mut n = self.next.lock().expect("jobs lock");
            *n += 1;
            *n - 1
        };
        let progress = Arc::new(Progress::default());
        let cancel = self.shutdown.child_token();
        let host = spec.host.unwrap_or_else(|| self.host.clone());
        let info = JobInfo {
            id,
            kind: spec.kind,
            vm: spec.vm,
            state: JobState::Queued,
            mode: spec.mode,
            created: now(),
            finished: None,
            message: None,
            error: None,
            backup_id: None,
            policy: spec.policy,
            host: host.clone(),
            hypervisor: spec.hypervisor,
            progress: JobProgress::default(),
            instant: None,
        };
        let entry = Entry {
            info: info.clone(),
            progress: progress.clone(),
            cancel: cancel.clone(),
            note: None,
            started: None,
        };
        self.entries.lock().expect("jobs lock").insert(id, entry);
        let (mine, next) = oneshot::channel();
        let turn = Turn {
            after: self.turns.lock().expect("jobs lock").insert(host, next),
            mine,
        };
        let handle = JobHandle {
            id,
            progress,
            cancel,
            slots: Arc::new(Mutex::new(None)),
        };
        Queued { info, handle, turn }
    }

    /// Records a queued job in the history (outside every registry lock), then runs it.
    fn launch<F, Fut>(self: &Arc<Self>, q: Queued, body: F) -> JobInfo
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
    {
        self.persist(&q.info);
        let me = self.clone();
        let Queued { info, handle, turn } = q;
        self.tracker
            .spawn(async move { me.run(handle, turn, body).await });
        info
    }

    fn persist(&self, info: &JobInfo) {
        if let Some(log) = &self.log {
            log.record(info);
        }
    }

    /// The slots of `host`, if there is a per-host limit.
    fn host_slots(&self, host: &str) -> Option<Arc<Semaphore>> {
        let n = self.limits.of_host(host)?;
        let mut hosts = self.hosts.lock().expect("jobs lock");
        let sem = hosts
            .entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(n.max(1))));
        Some(sem.clone())
    }

    /// Waits for a slot of `host`, then an overall one.
    async fn slots_for(&self, host: &str) -> Option<Permits> {
        let host_permit = match self.host_slots(host) {
            Some(sem) => Some(sem.acquire_owned().await.ok()?),
            None => None,
        };
        let overall = self.slots.clone().acquire_owned().await.ok()?;
        Some((host_permit, overall))
    }

    /// The concurrency limits.
    pub fn limits(&self) -> &JobLimits {
        &self.limits
    }

    /// The jobs that were running when the previous daemon died (read back from the history
    /// at open), for the start-up cleanup.
    pub fn interrupted(&self) -> Vec<JobInfo> {
        let ids = self
            .log
            .as_ref()
            .map(JobLog::interrupted)
            .unwrap_or_default();
        let entries = self.entries.lock().expect("jobs lock");
        ids.iter()
            .filter_map(|id| entries.get(id).map(|e| e.info.clone()))
            .collect()
    }

    /// Appends `note` to the message of job `id`, which has ended, and records it (what the
    /// start-up cleanup did for a job the restart interrupted).
    pub fn amend(&self, id: u64, note: &str) {
        let info = {
            let mut entries = self.entries.lock().expect("jobs lock");
            let Some(e) = entries.get_mut(&id).filter(|e| e.info.state.is_final()) else {
                return;
            };
            let msg = e.info.message.take().unwrap_or_default();
            e.info.message = Some(format!("{msg}; {note}"));
            e.info.clone()
        };
        self.persist(&info);
        self.changed.notify_waiters();
    }

    /// Sets what instant recovery job `id` runs (its domain, exports, state), and records it
    /// in the history when `persist` (a change of its state; the restart's clean-up reads it
    /// back), else only for readers (written bytes, the domain's state).
    pub fn set_instant(&self, id: u64, instant: crate::wire::instant::InstantInfo, persist: bool) {
        let info = {
            let mut entries = self.entries.lock().expect("jobs lock");
            let Some(e) = entries.get_mut(&id).filter(|e| !e.info.state.is_final()) else {
                return;
            };
            e.info.instant = Some(instant);
            e.info.clone()
        };
        if persist {
            self.persist(&info);
        }
        self.changed.notify_waiters();
    }

    /// Adds `note` to the message job `id` ends with (e.g. what its retention removed).
    pub fn annotate(&self, id: u64, note: &str) {
        if let Some(e) = self.entries.lock().expect("jobs lock").get_mut(&id) {
            e.note = Some(note.to_string());
        }
    }

    async fn run<F, Fut>(self: Arc<Self>, h: JobHandle, turn: Turn, body: F)
    where
        F: FnOnce(JobHandle) -> Fut,
        Fut: std::future::Future<Output = JobOutcome>,
    {
        let id = h.id;
        let host = self.get(id).map(|j| j.host).unwrap_or_default();
        let in_turn = async {
            if let Some(before) = turn.after {
                let _ = before.await; // sent or dropped: the job before has its slots or ended
            }
            self.slots_for(&host).await
        };
        let permit = tokio::select! {
            p = in_turn => p,
            _ = h.cancel.cancelled() => None,
        };
        drop(turn.mine);
        let Some(permit) = permit else {
            self.finish(id, Err(JobError::cancelled("cancelled before it started")));
            return;
        };
        let slots = h.slots.clone();
        *slots.lock().expect("jobs lock") = Some(permit);
        self.set_state(id, JobState::Running);
        tracing::info!(job = id, "job started");
        let out = body(h).await;
        slots.lock().expect("jobs lock").take();
        self.finish(id, out);
    }

    fn set_state(&self, id: u64, state: JobState) {
        let info = {
            let mut entries = self.entries.lock().expect("jobs lock");
            let Some(e) = entries.get_mut(&id) else {
                return;
            };
            e.info.state = state;
            if state == JobState::Running {
                e.started = Some(Instant::now());
            }
            e.info.clone()
        };
        // The history is synced outside the registry lock: readers of other jobs never wait
        // on a disk. One job's changes come from its own task, in order.
        self.persist(&info);
        self.changed.notify_waiters();
    }

    /// Resolves at the next change of any job's state (created before reading a job, it
    /// also catches a change made in between).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn finish(&self, id: u64, out: JobOutcome) {
        let (info, ran) = {
            let mut entries = self.entries.lock().expect("jobs lock");
            let Some(e) = entries.get_mut(&id) else {
                return;
            };
            e.info.finished = Some(now());
            e.info.progress = e.progress.snapshot().into();
            settle(&mut e.info, out);
            if let Some(note) = e.note.take() {
                let msg = e.info.message.take().unwrap_or_default();
                e.info.message = Some(format!("{msg}; {note}"));
            }
            let ran = e.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
            (e.info.clone(), ran)
        };
        self.metrics.record(&info, ran);
        self.persist(&info);
        tracing::info!(job = id, state = ?info.state, "job finished");
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

/// A job's place in its host's queue: it waits for `after` (the job queued before it) and
/// drops `mine` once it holds its slots, letting the next one try.
/// The final state, message, backup and error of a job that ended with `out`.
fn settle(info: &mut JobInfo, out: JobOutcome) {
    match out {
        Ok(JobDone::Done(text)) => {
            info.state = JobState::Succeeded;
            info.message = Some(text);
        }
        Ok(JobDone::Committed(backup)) => {
            info.state = JobState::Succeeded;
            info.message = Some(format!("backup {backup} committed"));
            info.backup_id = Some(backup);
        }
        Err(e) => {
            info.state = match e.kind {
                crate::wire::jobs::ErrorKind::Cancelled => JobState::Cancelled,
                _ => JobState::Failed,
            };
            info.message = Some(e.message.clone());
            info.error = Some(e);
        }
    }
}

/// A job registered but not yet running.
struct Queued {
    info: JobInfo,
    handle: JobHandle,
    turn: Turn,
}

struct Turn {
    after: Option<oneshot::Receiver<()>>,
    mine: oneshot::Sender<()>,
}

/// The permits a running job holds: its host's (if limited) and an overall one.
type Permits = (
    Option<tokio::sync::OwnedSemaphorePermit>,
    tokio::sync::OwnedSemaphorePermit,
);

impl Entry {
    /// A job read back from the history.
    fn ended(info: JobInfo) -> Self {
        let cancel = CancellationToken::new();
        cancel.cancel();
        Entry {
            info,
            progress: Arc::new(Progress::default()),
            cancel,
            note: None,
            started: None,
        }
    }
}

fn live_info(e: &Entry) -> JobInfo {
    let mut info = e.info.clone();
    if !info.state.is_final() {
        info.progress = e.progress.snapshot().into();
    }
    info
}
