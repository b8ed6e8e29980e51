//! Batched ranged reads of local files: `pread` by default, io_uring on request.
//!
//! Owns the read loop of [`Backend::get_ranges`](super::Backend::get_ranges) for the
//! filesystem backend. io_uring (one ring per thread, depth [`DEPTH`], short reads
//! resubmitted, every read in flight reaped before its buffer is released) is used only
//! when [`FsOptions::io_uring`](super::fs::FsOptions) asks (the daemon sets it from
//! `SLUICE_IO_URING=on`; this crate reads no environment) and a runtime probe passes (a
//! ring is set up and a no-op completed once per process; many container hosts forbid
//! io_uring with seccomp, and then `pread` is used). It is off by default because
//! `bench_read` measured no gain on this machine (docs/benchmarks.md, "Restore reads"):
//! page-cache hits run at the same speed either way, and cold 64 KiB reads are bound by
//! the device at any depth. Kept, tested and benchmarked so that a machine where it helps
//! (deep NVMe queues) can turn it on.

use super::{check_range, validate_key, RangeRequest};
use crate::error::{Error, Result};
use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Reads in flight per ring.
pub const DEPTH: u32 = 32;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Whether this kernel and sandbox let a process use io_uring (probed once).
pub fn probe_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| match probe() {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "io_uring unavailable; reads use pread");
            false
        }
    })
}

/// Set up a ring and complete one no-op on it.
fn probe() -> std::io::Result<()> {
    let mut ring = IoUring::new(2)?;
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a no-op references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let done = ring
        .completion()
        .next()
        .map(|c| (c.result(), c.user_data()));
    match done {
        Some((r, 7)) if r >= 0 => Ok(()),
        Some((r, _)) => Err(std::io::Error::from_raw_os_error(-r)),
        None => Err(std::io::Error::other("io_uring probe: no completion")),
    }
}

/// One read of a batch: the open file and the range.
struct Job<'a> {
    file: &'a File,
    offset: u64,
    buf: Vec<u8>,
    done: usize,
    err: Option<std::io::Error>,
}

/// How a batch is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// `pread`, one range after another.
    Pread,
    /// io_uring if [`probe_ok`], else `pread`.
    Uring,
}

/// Read every range of `reqs` from files under `root` (keys as in the backend), by `path`
/// (the backend's choice; benchmarks compare the two in one process).
pub fn read_ranges(root: &Path, reqs: &[RangeRequest], path: ReadPath) -> Vec<Result<Vec<u8>>> {
    let mut files: HashMap<&str, Result<(File, u64), Arc<Error>>> = HashMap::new();
    for r in reqs {
        files
            .entry(r.key.as_str())
            .or_insert_with(|| open(root, &r.key).map_err(Arc::new));
    }
    let mut out: Vec<Option<Result<Vec<u8>>>> = Vec::with_capacity(reqs.len());
    let mut jobs = Vec::new();
    let mut slots = Vec::new();
    for r in reqs {
        let checked = match &files[r.key.as_str()] {
            Ok((f, total)) => check_range(&r.key, *total, r.offset, r.len).map(|()| f),
            // Every read of an object that did not open fails with that cause.
            Err(e) => Err(Error::new(e.kind(), describe(r)).with_source(e.clone())),
        };
        match checked {
            Ok(file) => {
                slots.push(out.len());
                out.push(None);
                jobs.push(Job {
                    file,
                    offset: r.offset,
                    buf: vec![0u8; r.len],
                    done: 0,
                    err: None,
                });
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    run(&mut jobs, path == ReadPath::Uring && probe_ok());
    for (slot, j) in slots.into_iter().zip(jobs) {
        out[slot] = Some(match j.err {
            None => Ok(j.buf),
            Some(e) => Err(Error::io(describe(&reqs[slot]), e)),
        });
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::invalid("batch read lost a result"))))
        .collect()
}

/// What a failed read of `r` says it was doing.
fn describe(r: &RangeRequest) -> String {
    format!("reading {} bytes at {} of {}", r.len, r.offset, r.key)
}

fn open(root: &Path, key: &str) -> Result<(File, u64)> {
    validate_key(key)?;
    let f =
        File::open(root.join(key)).map_err(|e| Error::io(format!("opening object {key}"), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of object {key}"), e))?
        .len();
    Ok((f, len))
}

/// Fill every job's buffer: through the thread's ring if `uring` and the ring works,
/// else (or for what the ring could not do) with `pread`.
fn run(jobs: &mut [Job<'_>], uring: bool) {
    if uring {
        let ok = RING.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = IoUring::new(DEPTH).ok();
            }
            match slot.as_mut() {
                Some(ring) => {
                    let r = ring_reads(ring, jobs);
                    if r.is_err() {
                        // The ring is in an unknown state: never reuse it.
                        *slot = None;
                    }
                    r.is_ok()
                }
                None => false,
            }
        });
        if !ok {
            tracing::warn!("io_uring batch failed; finishing with pread");
        }
    }
    for j in jobs
        .iter_mut()
        .filter(|j| j.err.is_none() && j.done < j.buf.len())
    {
        let off = j.offset + j.done as u64;
        match j.file.read_exact_at(&mut j.buf[j.done..], off) {
            Ok(()) => j.done = j.buf.len(),
            Err(e) => j.err = Some(e),
        }
    }
}

/// Where a ring's batch stands.
#[derive(Default)]
struct Flight {
    /// The first job never submitted.
    next: usize,
    /// Jobs to submit (again, after a short read) before `next`.
    queue: Vec<usize>,
    /// Reads submitted and not yet reaped.
    in_flight: usize,
}

impl Flight {
    /// The next job to submit, if any is left.
    fn next_job(&mut self, jobs: usize) -> Option<usize> {
        self.queue.pop().or_else(|| {
            let i = self.next;
            (i < jobs).then(|| {
                self.next += 1;
                i
            })
        })
    }
}

/// Submit and reap until every job is complete or failed. An `Err` means the ring itself
/// failed; jobs then hold how far they got, and no read is left in flight.
fn ring_reads(ring: &mut IoUring, jobs: &mut [Job<'_>]) -> std::io::Result<()> {
    let mut flight = Flight::default();
    loop {
        queue_reads(ring, jobs, &mut flight);
        if flight.in_flight == 0 {
            return Ok(());
        }
        if let Err(e) = submit_wait(ring) {
            // Entries still queued were never submitted; they die with the ring.
            let queued = ring.submission().len();
            reap_all(ring, flight.in_flight.saturating_sub(queued));
            return Err(e);
        }
        reap(ring, jobs, &mut flight);
    }
}

/// Queue reads on `ring` until [`DEPTH`] are in flight or no job is left.
fn queue_reads(ring: &mut IoUring, jobs: &mut [Job<'_>], flight: &mut Flight) {
    while flight.in_flight < DEPTH as usize {
        let Some(i) = flight.next_job(jobs.len()) else {
            break;
        };
        let j = &mut jobs[i];
        if j.buf.is_empty() {
            continue;
        }
        let rest = &mut j.buf[j.done..];
        let len = rest.len().min(u32::MAX as usize) as u32;
        let e = opcode::Read::new(types::Fd(j.file.as_raw_fd()), rest.as_mut_ptr(), len)
            .offset(j.offset + j.done as u64)
            .build()
            .user_data(i as u64);
        // SAFETY: the buffer belongs to `jobs`, which outlives `ring_reads`, is not touched
        // until the read's completion is reaped (`reap`), and every submitted read is reaped
        // before `ring_reads` returns (or the process aborts, see `reap_all`).
        if unsafe { ring.submission().push(&e) }.is_err() {
            // Queue full (cannot happen at this depth): submit what is queued first.
            flight.queue.push(i);
            break;
        }
        flight.in_flight += 1;
    }
}

/// Take every completion: count the bytes read, queue short reads again, record failures.
fn reap(ring: &mut IoUring, jobs: &mut [Job<'_>], flight: &mut Flight) {
    for c in ring.completion() {
        flight.in_flight -= 1;
        let i = c.user_data() as usize;
        let j = &mut jobs[i];
        match c.result() {
            n if n > 0 => {
                j.done += n as usize;
                if j.done < j.buf.len() {
                    flight.queue.push(i);
                }
            }
            0 => j.err = Some(std::io::ErrorKind::UnexpectedEof.into()),
            n => j.err = Some(std::io::Error::from_raw_os_error(-n)),
        }
    }
}

fn submit_wait(ring: &IoUring) -> std::io::Result<()> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Wait for `n` outstanding completions after a failed submit. If the ring cannot even do
/// that, the kernel may still write into our buffers later: abort rather than risk it.
fn reap_all(ring: &mut IoUring, mut n: usize) {
    while n > 0 {
        n -= ring.completion().count().min(n);
        if n > 0 && ring.submitter().submit_and_wait(1).is_err() {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "io_uring reads in flight cannot be reaped");
                std::process::abort();
            }
        }
    }
}
