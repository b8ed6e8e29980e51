//! The backup job: full or incremental-forever backup of one VM, all disks at one point in
//! time.
//!
//! Order of steps: find the last good backup and decide full or incremental (validating the
//! checkpoint it was taken against: self-healing change tracking); freeze the guest's
//! filesystems if its agent answers; take the point in time with a new checkpoint; thaw;
//! read every disk concurrently into one new backup; commit (the manifest is the commit
//! point); end the hypervisor job; drop checkpoints the chain no longer needs. On any failure
//! or cancel the hypervisor job is aborted, its new checkpoint deleted and nothing is
//! committed, so the chain still starts at the last good backup.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, Manifest, Repository, VmIdentity,
    VmStateAtBackup,
};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::disk::{back_up_disk, DiskJob, DiskStats};
use super::error::{Error, ErrorKind, Result};
use super::progress::Progress;
use crate::hypervisor::{
    BackupRequest, BackupSession, CheckpointHealth, DiskInfo, DomainInfo, ExpectedDisk,
    FreezeGuard, Hypervisor, VmState,
};
use crate::repo::IngestSink;

/// Prefix of every checkpoint Sluice creates; only these are ever deleted by Sluice.
pub const CHECKPOINT_PREFIX: &str = "sluice-";

/// How to take a backup.
#[derive(Clone)]
pub struct BackupOptions {
    /// Read every disk in full even when an incremental is possible.
    pub force_full: bool,
    /// Directory for the job's scratch images and NBD socket (a subdirectory is made per job).
    pub work_dir: PathBuf,
    /// Freeze guest filesystems around the point in time when the guest agent answers.
    pub freeze: bool,
    /// Bytes of block status asked per planning window.
    pub window: u64,
    /// Bytes of consecutive chunks assembled and stored per batch.
    pub batch_bytes: u64,
    /// Batches in flight per disk.
    pub depth: usize,
    /// NBD connections per disk when the export allows several.
    pub connections: usize,
    /// Runs once the point in time is taken, before any byte is read (phase reporting, and
    /// tests that write to the guest during a backup or cancel it half-way).
    pub after_point_in_time: Option<Hook>,
    /// Paces reads from the hypervisor (shared to limit several jobs together).
    pub read_limit: Option<Arc<super::RateLimit>>,
    /// A remote hypervisor: its exports are served over TCP with TLS, a shut-off VM is
    /// started paused for its backup (none: a local hypervisor, exports on a unix socket in
    /// the job directory, a shut-off VM read offline).
    pub remote: Option<super::RemoteData>,
    /// Longest wait for the repository while a GC or prune holds it exclusively, before
    /// anything starts on the hypervisor.
    pub lock_timeout: std::time::Duration,
}

/// An async callback of a job.
pub type Hook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

impl BackupOptions {
    /// Defaults for a job whose scratch files go under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        BackupOptions {
            force_full: false,
            work_dir: work_dir.into(),
            freeze: true,
            window: 1 << 30,
            batch_bytes: 4 << 20,
            depth: 16,
            connections: 1,
            after_point_in_time: None,
            read_limit: None,
            remote: None,
            lock_timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("force_full", &self.force_full)
            .field("work_dir", &self.work_dir)
            .field("freeze", &self.freeze)
            .field("window", &self.window)
            .field("batch_bytes", &self.batch_bytes)
            .field("depth", &self.depth)
            .field("connections", &self.connections)
            .field("remote", &self.remote.as_ref().map(|r| &r.connect))
            .finish_non_exhaustive()
    }
}

/// What a committed backup cost.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub manifest: Manifest,
    /// Bytes read from the hypervisor over NBD.
    pub bytes_read: u64,
    /// Bytes the dirty bitmap (or, for a full, the disk) marked as changed.
    pub bytes_dirty: u64,
}

/// Takes one backup of `vm` into `repo`.
pub async fn run_backup<H: Hypervisor>(
    hv: &H,
    repo: &Repository,
    vm: &str,
    opts: &BackupOptions,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<BackupReport> {
    let job = Job {
        hv,
        repo,
        opts,
        progress,
        cancel,
    };
    let dom = hv
        .domain(vm)
        .await
        .map_err(|e| Error::hypervisor(format!("vm {vm}"), e))?;
    // A shut-off VM of a local hypervisor is not started: the adapter reads its images
    // offline (`qemu-nbd -B`). One of a remote hypervisor is started paused (its CPUs never
    // run) so that QEMU there serves its disks, and powered off again afterwards.
    tracing::info!(vm, state = ?dom.state, "backup started");
    let domain_xml = hv
        .domain_xml(vm)
        .await
        .map_err(|e| Error::hypervisor(format!("definition of vm {vm}"), e))?;
    // Held until the backup ends: a GC waits for it, and it never waits for a GC with a
    // hypervisor job already running (its scratch file growing).
    let _repo_lock = hold_repository(repo, vm, opts.lock_timeout).await?;
    end_stale_job(hv, vm, opts).await?;
    let paused = start_paused_if_remote(hv, &dom, opts).await?;
    if !paused {
        let state = match dom.state {
            VmState::ShutOff => VmStateAtBackup::ShutOff,
            _ => VmStateAtBackup::Running,
        };
        return back_up_domain(&job, &dom, &domain_xml, state).await;
    }
    let result = match hv.domain(vm).await {
        Ok(dom) => back_up_domain(&job, &dom, &domain_xml, VmStateAtBackup::StartedPaused).await,
        Err(e) => Err(Error::hypervisor(format!("vm {vm}"), e)),
    };
    power_off_again(hv, vm).await;
    result
}

/// The repository's shared lock, waiting at most `limit` while a GC or prune holds it.
async fn hold_repository(
    repo: &Repository,
    vm: &str,
    limit: std::time::Duration,
) -> Result<catalog::LockGuard> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let r = repo.clone();
        let got = crate::repo::call(move || r.try_shared_lock())
            .await
            .map_err(|e| Error::repo(format!("backup of vm {vm}"), e))?;
        if let Some(guard) = got {
            return Ok(guard);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Retry,
                format!(
                    "backup of vm {vm}: the repository is locked by a gc or prune (waited {limit:?}); nothing was started on the hypervisor: back it up again once that ends"
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// For a shut-off VM of a remote hypervisor: starts it paused unless that hypervisor
/// forbids it (then a refusal); whether it did.
async fn start_paused_if_remote<H: Hypervisor>(
    hv: &H,
    dom: &DomainInfo,
    opts: &BackupOptions,
) -> Result<bool> {
    let (Some(remote), VmState::ShutOff) = (&opts.remote, dom.state) else {
        return Ok(false);
    };
    let vm = &dom.name;
    if !remote.start_offline {
        return Err(Error::new(
            ErrorKind::Refused,
            format!(
                "vm {vm} is shut off and this hypervisor forbids starting it paused for a backup (backup_data.offline = false): start the vm, or allow it"
            ),
        ));
    }
    hv.start_paused(vm).await.map_err(|e| {
        Error::hypervisor(format!("offline backup of vm {vm}: starting it paused"), e)
    })?;
    tracing::info!(vm, "started paused for an offline backup");
    Ok(true)
}

/// Powers off the VM an offline backup started paused, unless it runs now (someone resumed
/// it meanwhile: it is left running). A failure is logged: the backup's outcome stands.
async fn power_off_again<H: Hypervisor>(hv: &H, vm: &str) {
    match hv.domain(vm).await.map(|d| d.state) {
        Ok(VmState::Paused) => match hv.destroy(vm).await {
            Ok(()) => tracing::info!(vm, "powered off again after its offline backup"),
            Err(e) => tracing::error!(vm, error = %catalog::Chain(&e),
                "the vm an offline backup started paused could not be powered off: power it off by hand"),
        },
        Ok(state) => tracing::warn!(
            vm,
            ?state,
            "the vm an offline backup started paused is no longer paused: left as it is"
        ),
        Err(e) => tracing::error!(vm, error = %catalog::Chain(&e),
            "cannot see whether the vm an offline backup started paused is still paused"),
    }
}

/// Decides full or incremental for `dom` (as it is now), takes the point in time, reads and
/// commits.
async fn back_up_domain<H: Hypervisor>(
    job: &Job<'_, H>,
    dom: &DomainInfo,
    domain_xml: &str,
    vm_state: VmStateAtBackup,
) -> Result<BackupReport> {
    let (hv, repo, opts) = (job.hv, job.repo, job.opts);
    // The parent's manifest is read once, here, and passed down (mode, spec, sink).
    let parent = last_backup(repo, &dom.uuid).await?;
    let mode = decide_mode(hv, dom, parent.as_ref(), opts.force_full).await?;
    let checkpoint = new_checkpoint_name();
    let job_dir = make_job_dir(&opts.work_dir, &checkpoint, dom, opts.remote.is_none())?;
    let lease = match opts.remote.as_ref().map(|r| r.lease_port()).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&job_dir);
            return Err(e);
        }
    };
    let plan = Plan {
        tcp: lease.as_ref().map(|l| l.server().clone()),
        remote_scratch: opts.remote.as_ref().map(|r| r.scratch_dir.clone()),
        vm_state,
        dom,
        domain_xml,
        parent: parent.filter(|_| !mode.is_full()),
        mode,
        checkpoint: &checkpoint,
        job_dir: &job_dir,
    };
    let result = take_backup(job, &plan).await;
    let _ = std::fs::remove_dir_all(&job_dir);
    result
}

/// Who runs a backup job, where it goes, how, and who watches it.
struct Job<'a, H> {
    hv: &'a H,
    repo: &'a Repository,
    opts: &'a BackupOptions,
    progress: Arc<Progress>,
    cancel: CancellationToken,
}

/// What a backup job knows once its mode is decided.
struct Plan<'a> {
    dom: &'a DomainInfo,
    /// The VM's definition, kept in the manifest.
    domain_xml: &'a str,
    /// The backup an incremental builds on (`None` for every full).
    parent: Option<Manifest>,
    mode: Mode,
    /// The checkpoint this backup creates.
    checkpoint: &'a str,
    /// Scratch images and socket; removed by the caller on every path.
    job_dir: &'a Path,
    /// Where QEMU serves a remote hypervisor's exports (none: the socket in `job_dir`).
    tcp: Option<crate::hypervisor::TcpServer>,
    /// A remote hypervisor's scratch directory (`Some(None)`: libvirt's choice, beside each
    /// image); `None`: a local hypervisor (scratch in `job_dir`).
    remote_scratch: Option<Option<PathBuf>>,
    /// How the VM was, for the manifest.
    vm_state: VmStateAtBackup,
}

impl Plan<'_> {
    fn vm(&self) -> &str {
        &self.dom.name
    }

    /// Whether `disk` tracks its changes (carries the checkpoints' bitmaps).
    fn tracked(&self, disk: &str) -> bool {
        self.dom
            .disks
            .iter()
            .any(|d| d.target == disk && d.supports_bitmaps())
    }

    fn request(&self) -> BackupRequest {
        let any_tracked = self.dom.disks.iter().any(DiskInfo::supports_bitmaps);
        BackupRequest {
            vm: self.vm().to_string(),
            disks: self.dom.disks.iter().map(|d| d.target.clone()).collect(),
            incremental_from: self.mode.base_checkpoint().map(str::to_string),
            full_disks: (self.dom.disks.iter())
                .filter(|d| !d.supports_bitmaps())
                .map(|d| d.target.clone())
                .collect(),
            // A checkpoint without a single bitmap would track nothing.
            new_checkpoint: any_tracked.then(|| self.checkpoint.to_string()),
            scratch_dir: match &self.remote_scratch {
                Some(dir) => dir.clone(),
                None => Some(self.job_dir.to_path_buf()),
            },
            socket: self.job_dir.join("nbd.sock"),
            tcp: self.tcp.clone(),
        }
    }

    /// The new backup as the repository sees it (its parent is set by the sink).
    fn spec(&self, session: &BackupSession) -> BackupSpec {
        let disks = session.exports().iter().map(|e| DiskSpec {
            target: e.disk.clone(),
            size: e.capacity,
            checkpoint: (self.tracked(&e.disk)).then(|| self.checkpoint.to_string()),
            full_read: (self.dom.disks.iter())
                .find(|d| d.target == e.disk)
                .and_then(DiskInfo::full_read_reason),
        });
        BackupSpec {
            vm: VmIdentity {
                name: self.vm().to_string(),
                uuid: self.dom.uuid.clone(),
            },
            disks: disks.collect(),
            parent: None,
            started: unix_now(),
        }
    }

    fn commit_info(&self, consistency: Consistency) -> CommitInfo {
        CommitInfo {
            vm_state: Some(self.vm_state),
            domain_xml: self.domain_xml.to_string(),
            mode: self.mode.manifest_mode(),
            consistency,
            finished: unix_now(),
        }
    }
}

/// Marker of Sluice's job directories (`WORK_DIR/job-sluice-…`).
const JOB_DIR_PREFIX: &str = "job-";

/// A proxy killed mid-backup leaves libvirt's backup job (and its export) running, which
/// would refuse the next backup: end it, and remove its job directory. Its new checkpoint
/// stays until the next successful backup drops it; the chain still starts at the last good
/// backup, whose checkpoint libvirt merges forward.
///
/// A remote hypervisor's job has no socket of ours: it is the one whose exports are served on
/// a port of the hypervisor's export range.
async fn end_stale_job<H: Hypervisor>(hv: &H, vm: &str, opts: &BackupOptions) -> Result<()> {
    let Some(remote) = &opts.remote else {
        return end_stale_backup(hv, vm, &opts.work_dir).await.map(drop);
    };
    let ports = remote.ports.clone();
    match hv.abort_stale_tcp_backup(vm, ports.clone()).await {
        Ok(_) => Ok(()),
        // Two callers may race for one stale job: ask once more, none left is no error.
        Err(first) => match hv.abort_stale_tcp_backup(vm, ports).await {
            Ok(None) => Ok(()),
            _ => Err(Error::hypervisor(
                format!("stale backup job of vm {vm}"),
                first,
            )),
        },
    }
}

/// Ends the backup job of `vm` that an earlier run of Sluice left on `hv` (killed mid-backup),
/// recognised by its NBD socket inside a Sluice job directory (`job-sluice-…`), and removes
/// that directory if it lies under `work_dir`. Returns the ended job's socket path; `None`:
/// there was none. Every backup calls this before it begins.
pub async fn end_stale_backup<H: Hypervisor>(
    hv: &H,
    vm: &str,
    work_dir: &Path,
) -> Result<Option<PathBuf>> {
    let marker = format!("/{JOB_DIR_PREFIX}{CHECKPOINT_PREFIX}");
    end_matching(hv, vm, &marker, work_dir).await
}

/// [`end_stale_backup`] for the one job whose socket lies in `job_dir` (a directory a dead
/// daemon left, listed before any job of the new one started): a backup begun since, whose
/// directory has another name, is never touched. `job_dir` is removed if a job was ended.
pub async fn end_stale_backup_in<H: Hypervisor>(
    hv: &H,
    vm: &str,
    job_dir: &Path,
) -> Result<Option<PathBuf>> {
    let marker = format!("{}/", job_dir.display());
    end_matching(hv, vm, &marker, job_dir).await
}

/// Ends the backup job of `vm` whose socket path contains `marker` and removes the socket's
/// directory if it lies under `under`. Two callers may race for one stale job (the daemon's
/// start-up cleanup and a backup just queued): the loser's abort fails, so it asks once more,
/// and finding no job left then is not an error.
async fn end_matching<H: Hypervisor>(
    hv: &H,
    vm: &str,
    marker: &str,
    under: &Path,
) -> Result<Option<PathBuf>> {
    let socket = match hv.abort_stale_backup(vm, marker).await {
        Ok(s) => s,
        Err(first) => match hv.abort_stale_backup(vm, marker).await {
            Ok(None) => None,
            _ => {
                let what = format!("stale backup job of vm {vm}");
                return Err(Error::hypervisor(what, first));
            }
        },
    };
    if let Some(dir) = socket.as_deref().and_then(Path::parent) {
        if dir.starts_with(under) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(socket)
}

/// Whether `name` is the name of a Sluice backup job's directory (`job-sluice-…`).
pub fn is_job_dir_name(name: &str) -> bool {
    name.strip_prefix(JOB_DIR_PREFIX)
        .is_some_and(|r| r.starts_with(CHECKPOINT_PREFIX))
}

/// Everything after the mode is decided: point in time, read, commit, end the job.
async fn take_backup<H: Hypervisor>(job: &Job<'_, H>, plan: &Plan<'_>) -> Result<BackupReport> {
    let vm = plan.vm();
    let (session, consistency) = point_in_time(job.hv, vm, plan.request(), job.opts.freeze).await?;
    if let Some(hook) = &job.opts.after_point_in_time {
        hook().await;
    }
    let (sink, stats) = match read_all(job, plan, &session).await {
        Ok(ok) => ok,
        Err(e) => return Err(abort(session, e).await),
    };
    if let Err(e) = still_paused(job.hv, plan).await {
        sink.abort().await;
        return Err(abort(session, e).await);
    }
    let manifest = match sink.commit(plan.commit_info(consistency)).await {
        Ok(m) => m,
        Err(e) => return Err(abort(session, Error::repo(format!("commit of vm {vm}"), e)).await),
    };
    if let Err(e) = session.finish().await {
        tracing::warn!(vm, error = %catalog::Chain(&e), "backup committed but ending the hypervisor job failed");
    }
    Progress::add(&job.progress.bytes_new, manifest.stats.bytes_new_raw);
    drop_old_checkpoints(job.hv, vm, plan.checkpoint).await;
    Ok(BackupReport {
        bytes_read: stats.bytes_read,
        bytes_dirty: stats.bytes_dirty,
        manifest,
    })
}

/// For a VM started paused for its backup: that it is still paused. One that someone
/// resumed meanwhile ends the backup with the reason (it is left running; its next backup
/// reads it online); nothing is committed.
async fn still_paused<H: Hypervisor>(hv: &H, plan: &Plan<'_>) -> Result<()> {
    if plan.vm_state != VmStateAtBackup::StartedPaused {
        return Ok(());
    }
    let vm = plan.vm();
    let state = hv
        .domain(vm)
        .await
        .map_err(|e| Error::hypervisor(format!("vm {vm}"), e))?
        .state;
    let now = match state {
        VmState::Paused => return Ok(()),
        VmState::Running => "running",
        VmState::ShutOff => "shut off",
        VmState::Other => "no longer paused",
    };
    Err(Error::new(
        ErrorKind::Refused,
        format!(
            "vm {vm} was started paused for an offline backup and is {now} now (someone \
             resumed or stopped it meanwhile): the backup is discarded and the vm left as it \
             is; back it up again"
        ),
    ))
}

/// Ends the hypervisor job after a failure (deleting its new checkpoint) and returns `e`.
async fn abort(session: BackupSession, e: Error) -> Error {
    let vm = session.vm().to_string();
    if let Err(ae) = session.abort().await {
        tracing::error!(vm, error = %catalog::Chain(&ae), "aborting the hypervisor job failed");
    }
    e
}

/// Freezes (when asked and the agent answers), takes the point in time, thaws.
async fn point_in_time<H: Hypervisor>(
    hv: &H,
    vm: &str,
    req: BackupRequest,
    freeze: bool,
) -> Result<(BackupSession, Consistency)> {
    let guard = if freeze && hv.agent_responds(vm).await {
        match hv.freeze(vm).await {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(vm, error = %catalog::Chain(&e), "guest agent answered but freeze failed: crash-consistent backup");
                None
            }
        }
    } else {
        None
    };
    let begun = hv.begin_backup(req).await;
    let consistency = thaw(vm, guard).await;
    let session = begun.map_err(|e| Error::hypervisor(format!("backup of vm {vm}"), e))?;
    Ok((session, consistency))
}

async fn thaw(vm: &str, guard: Option<FreezeGuard>) -> Consistency {
    let Some(g) = guard else {
        return Consistency::Crash;
    };
    match g.thaw().await {
        Ok(()) => Consistency::Application,
        Err(e) => {
            tracing::error!(vm, error = %catalog::Chain(&e), "thaw after freeze failed");
            Consistency::Application
        }
    }
}

/// Reads every disk of the session concurrently into one new backup.
async fn read_all<H>(
    job: &Job<'_, H>,
    plan: &Plan<'_>,
    session: &BackupSession,
) -> Result<(IngestSink, DiskStats)> {
    let (vm, opts) = (plan.vm(), job.opts);
    let sink = IngestSink::begin(job.repo.clone(), plan.spec(session), plan.parent.as_ref())
        .await
        .map_err(|e| Error::repo(format!("backup of vm {vm}"), e))?;
    let disks = session.exports().iter().enumerate().map(|(index, export)| {
        let disk = DiskJob {
            vm: vm.to_string(),
            index,
            export: export.clone(),
            full: plan.mode.is_full() || !plan.tracked(&export.disk),
            window: opts.window,
            batch_bytes: opts.batch_bytes,
            depth: opts.depth,
            connections: opts.connections,
            read_limit: opts.read_limit.clone(),
            remote: opts
                .remote
                .as_ref()
                .map(|r| (r.connect.clone(), r.tls.clone())),
        };
        back_up_disk(disk, sink.clone(), job.progress.clone(), job.cancel.clone())
    });
    // On failure every disk's future (and its clone of the sink) is gone once this returns.
    let per_disk = match futures_util::future::try_join_all(disks).await {
        Ok(p) => p,
        Err(e) => {
            sink.abort().await;
            return Err(e);
        }
    };
    let stats = per_disk
        .iter()
        .fold(DiskStats::default(), |a, s| DiskStats {
            bytes_read: a.bytes_read + s.bytes_read,
            bytes_dirty: a.bytes_dirty + s.bytes_dirty,
        });
    Ok((sink, stats))
}

/// Full or incremental, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    Full,
    FullBecause(String),
    Incremental { checkpoint: String },
}

impl Mode {
    fn is_full(&self) -> bool {
        !matches!(self, Mode::Incremental { .. })
    }

    fn base_checkpoint(&self) -> Option<&str> {
        match self {
            Mode::Incremental { checkpoint } => Some(checkpoint),
            _ => None,
        }
    }

    fn manifest_mode(&self) -> BackupMode {
        match self {
            Mode::Full => BackupMode::Full,
            Mode::FullBecause(r) => BackupMode::FullBecause(r.clone()),
            Mode::Incremental { .. } => BackupMode::Incremental,
        }
    }
}

/// The newest committed backup of the VM with `uuid`, if any.
async fn last_backup(repo: &Repository, uuid: &str) -> Result<Option<Manifest>> {
    crate::repo::latest_backup(repo, uuid)
        .await
        .map_err(|e| Error::repo(format!("backups of vm {uuid}"), e))
}

/// Self-healing change tracking: an incremental only from a checkpoint that exists, is
/// consistent and matches the disks of the last good backup; otherwise a full read, with
/// the reason recorded.
async fn decide_mode<H: Hypervisor>(
    hv: &H,
    dom: &DomainInfo,
    parent: Option<&Manifest>,
    force_full: bool,
) -> Result<Mode> {
    let Some(parent) = parent else {
        return Ok(Mode::Full);
    };
    if force_full {
        return Ok(Mode::FullBecause("full backup requested".into()));
    }
    let mut now: Vec<&str> = dom.disks.iter().map(|d| d.target.as_str()).collect();
    let mut was: Vec<&str> = parent.disks.iter().map(|d| d.target.as_str()).collect();
    now.sort_unstable();
    was.sort_unstable();
    if now != was {
        return Ok(Mode::FullBecause(format!(
            "disks changed since backup {}: {was:?} -> {now:?}",
            parent.id
        )));
    }
    if !dom.disks.iter().any(DiskInfo::supports_bitmaps) {
        return Ok(Mode::FullBecause(
            "no disk of the vm tracks changes (only qcow2 images carry dirty bitmaps)".into(),
        ));
    }
    let tracked = |target: &str| {
        dom.disks
            .iter()
            .any(|d| d.target == target && d.supports_bitmaps())
    };
    let cps: Vec<&str> = parent
        .disks
        .iter()
        .filter(|d| tracked(&d.target))
        .filter_map(|d| d.checkpoint.as_deref())
        .collect();
    let Some(cp) = cps.first().copied().filter(|c| cps.iter().all(|x| x == c)) else {
        return Ok(Mode::FullBecause(format!(
            "backup {} recorded no common checkpoint",
            parent.id
        )));
    };
    let expected: Vec<ExpectedDisk> = parent
        .disks
        .iter()
        .filter(|d| tracked(&d.target))
        .map(|d| ExpectedDisk {
            disk: d.target.clone(),
            capacity: d.size,
        })
        .collect();
    let health = hv
        .check_checkpoint(&dom.name, cp, &expected)
        .await
        .map_err(|e| Error::hypervisor(format!("checkpoint {cp} of vm {}", dom.name), e))?;
    Ok(match health {
        CheckpointHealth::Usable => Mode::Incremental {
            checkpoint: cp.to_string(),
        },
        CheckpointHealth::Unusable(problems) => {
            let reason = format!("checkpoint {cp} unusable: {problems:?}");
            tracing::warn!(vm = %dom.name, %reason, "falling back to a full read");
            Mode::FullBecause(reason)
        }
    })
}

/// Deletes Sluice's checkpoints older than `keep`: the chain only needs the newest.
async fn drop_old_checkpoints<H: Hypervisor>(hv: &H, vm: &str, keep: &str) {
    let cps = match hv.list_checkpoints(vm).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(vm, error = %catalog::Chain(&e), "listing checkpoints for cleanup failed");
            return;
        }
    };
    for cp in cps
        .iter()
        .filter(|c| c.name.starts_with(CHECKPOINT_PREFIX) && c.name != keep)
    {
        if let Err(e) = hv.delete_checkpoint(vm, &cp.name, false).await {
            tracing::warn!(vm, checkpoint = %cp.name, error = %catalog::Chain(&e), "deleting an old checkpoint failed");
        }
    }
}

fn new_checkpoint_name() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{CHECKPOINT_PREFIX}{}-{:08x}",
        now.as_secs(),
        now.subsec_nanos()
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A private directory for the job's scratch images and socket, owned by the user that owns
/// the VM's disk images (the QEMU user under libvirt), mode 0700: QEMU can create its files
/// there and nobody else can reach the socket that exposes the disks.
/// The job's directory under `work_dir`; for a local hypervisor (`chown_to_images`) owned
/// like the VM's images, so QEMU can create the scratch files and socket there.
fn make_job_dir(
    work_dir: &Path,
    checkpoint: &str,
    dom: &DomainInfo,
    chown_to_images: bool,
) -> Result<PathBuf> {
    let dir = work_dir.join(format!("{JOB_DIR_PREFIX}{checkpoint}"));
    let io = |what: &str, e: std::io::Error| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{what} job directory {} (check the work directory)",
                dir.display()
            ),
        )
        .with_source(e)
    };
    std::fs::create_dir_all(&dir).map_err(|e| io("creating", e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("setting permissions of", e))?;
    let owner = dom
        .disks
        .iter()
        .filter(|_| chown_to_images)
        .filter_map(|d| d.source.as_ref())
        .find_map(|p| std::fs::metadata(p).ok());
    if let Some(meta) = owner {
        std::os::unix::fs::chown(&dir, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| io("changing owner of", e))?;
    }
    Ok(dir)
}
