//! The one seam between the proxy's async code and the synchronous repository (`catalog`).
//!
//! Every call from `proxy` into `catalog` that can block (storage reads and writes, SQLite,
//! index loads) goes through this module, under one process-wide bound:
//! - [`call`]: one short repository call (read a manifest, open a disk, store a batch, read a
//!   chunk for an NBD request) on tokio's blocking pool, at most
//!   [`RepoOptions::max_blocking`] at once. The permit travels with the blocking closure, so
//!   a caller that stops waiting (a cancelled job) does not free its slot before the call
//!   ends. Other crates (the daemon's own catalog calls) may use it too: one bound for all.
//! - [`dedicated`]: a long-running producer that reads a whole disk (a restore to a file, a
//!   restore onto a VM's disks) on its own named thread, outside the bound. It runs for the
//!   length of a job and paces itself against its consumer (a bounded channel, or the file it
//!   writes); holding one of the pool's slots for minutes would starve the short calls of
//!   every other job (backups storing batches, exports serving reads). Their number is the
//!   number of restore jobs running, which the daemon's job limits bound.
//! - the typed calls below ([`manifest`], [`latest_backup`], [`open_disk`]) and
//!   [`IngestSink`] (an open backup: chunks in, commit) built on those two.
//!
//! Errors are the repository's (`catalog::Error`); each caller adds what it was doing. It
//! does not own planning (`crate::plan`), NBD (`crate::nbd`) or the repository's files
//! (`catalog`).

mod sink;

use std::future::Future;
use std::sync::OnceLock;

use catalog::{BackupId, DiskReader, Manifest, Repository};
use tokio::sync::Semaphore;

pub use sink::IngestSink;

/// Errors from the repository, as seen by the data path.
pub type Result<T> = std::result::Result<T, catalog::Error>;

/// How many blocking repository calls may run at once, process-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoOptions {
    /// Short repository calls running at once on the blocking pool (at least 1).
    pub max_blocking: usize,
}

impl RepoOptions {
    /// The default bound: enough for several backups and exports to keep the catalog's
    /// worker threads busy on a small host, far below tokio's blocking-pool ceiling.
    pub const DEFAULT_MAX_BLOCKING: usize = 16;
}

impl Default for RepoOptions {
    fn default() -> Self {
        RepoOptions {
            max_blocking: Self::DEFAULT_MAX_BLOCKING,
        }
    }
}

struct Gate {
    slots: Semaphore,
    opts: RepoOptions,
}

static GATE: OnceLock<Gate> = OnceLock::new();

fn gate_with(opts: RepoOptions) -> Gate {
    let opts = RepoOptions {
        max_blocking: opts.max_blocking.max(1),
    };
    Gate {
        slots: Semaphore::new(opts.max_blocking),
        opts,
    }
}

fn gate() -> &'static Gate {
    GATE.get_or_init(|| gate_with(RepoOptions::default()))
}

/// Sets the process-wide bound; call once at start-up, before the first repository call
/// (which otherwise fixes [`RepoOptions::default`]). Returns the options in force: `opts`,
/// or the ones fixed earlier if the bound was already set.
pub fn configure(opts: RepoOptions) -> RepoOptions {
    GATE.get_or_init(|| gate_with(opts)).opts
}

/// The options in force (the default until [`configure`] or the first call fixes them).
pub fn options() -> RepoOptions {
    gate().opts
}

/// Runs `f` on the blocking pool within the bound; its result, or an I/O error if the task
/// did not return (it panicked, or the runtime is shutting down).
pub async fn call<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    run(f).await?
}

/// [`call`] for a closure whose result is not a repository result (an export's read, which
/// also touches its overlay file).
pub(crate) async fn run<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let permit = gate().slots.acquire().await.map_err(|_| closed())?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(task_failed)
}

/// Starts the long-running producer `f` now, on a new thread named `name`, outside the
/// bound (see the module header for why); the future is its result once it returns.
pub(crate) fn dedicated<T, F>(name: &str, f: F) -> impl Future<Output = Result<T>> + Send
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        });
    let name = name.to_string();
    async move {
        let io = |m: String| catalog::Error::new(catalog::ErrorKind::Io, m);
        spawned.map_err(|e| io(format!("starting repository thread {name}")).with_source(e))?;
        rx.await
            .map_err(|_| io(format!("repository thread {name} ended without a result")))
    }
}

fn task_failed(e: tokio::task::JoinError) -> catalog::Error {
    catalog::Error::new(catalog::ErrorKind::Io, "repository task failed").with_source(e)
}

fn closed() -> catalog::Error {
    catalog::Error::new(catalog::ErrorKind::Io, "repository calls are shut down")
}

/// The manifest of backup `id`.
pub async fn manifest(repo: &Repository, id: &BackupId) -> Result<Manifest> {
    let (repo, id) = (repo.clone(), id.clone());
    call(move || repo.manifest(&id)).await
}

/// The newest committed backup of the VM with `uuid` (by start time, then id), if any.
pub async fn latest_backup(repo: &Repository, uuid: &str) -> Result<Option<Manifest>> {
    let (repo, uuid) = (repo.clone(), uuid.to_string());
    call(move || {
        let rows = repo.backups(Some(&uuid))?;
        let newest = rows
            .iter()
            .max_by_key(|r| (r.started, r.id.as_str().to_string()));
        newest.map(|row| repo.manifest(&row.id)).transpose()
    })
    .await
}

/// Disk `target` of backup `id`, opened for reading (its index blocks load on demand).
pub async fn open_disk(repo: &Repository, id: &BackupId, target: &str) -> Result<DiskReader> {
    let (repo, id, target) = (repo.clone(), id.clone(), target.to_string());
    call(move || repo.open_disk(&id, &target)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_calls_run_at_once_than_the_bound() {
        let max = options().max_blocking;
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let calls = (0..max * 3).map(|_| {
            let (now, peak) = (now.clone(), peak.clone());
            call(move || {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        });
        let done = futures_util::future::join_all(calls).await;
        assert!(done.iter().all(Result::is_ok));
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= max, "{peak} calls ran at once, bound {max}");
        assert!(peak > 1, "calls ran one at a time: {peak}");
    }

    #[test]
    fn the_first_configuration_holds_and_the_bound_is_at_least_one() {
        // Other tests of this process may have fixed it already, always at the default.
        assert_eq!(configure(RepoOptions::default()), RepoOptions::default());
        assert_eq!(
            configure(RepoOptions { max_blocking: 99 }),
            RepoOptions::default()
        );
        assert_eq!(options(), RepoOptions::default());
        assert_eq!(
            gate_with(RepoOptions { max_blocking: 0 }).opts.max_blocking,
            1
        );
    }

    #[tokio::test]
    async fn a_dedicated_thread_returns_its_result_and_a_panic_is_an_error() {
        assert_eq!(dedicated("t-ok", || 7).await.unwrap(), 7);
        let e = dedicated("t-panic", || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), catalog::ErrorKind::Io);
        let e = call(|| -> Result<()> { panic!("boom") }).await.unwrap_err();
        assert_eq!(e.kind(), catalog::ErrorKind::Io);
    }
}
