//! Batched ranged reads of local files: `pread` by default, io_uring on request.
//!
//! Owns the read loop of [`Backend::get_ranges`](super::Backend::get_ranges) for the
//! filesystem backend. io_uring (one ring per thread, depth [`DEPTH`], short reads
//! resubmitted, every read in flight reaped before its buffer is released) is used only
//! when `SLUICE_IO_URING=on` and a runtime probe passes (a ring is set up and a no-op
//! completed once per process; many container hosts forbid io_uring with seccomp, and then
//! `pread` is used). It is off by default because `bench_read` measured no gain on this
//! machine (docs/benchmarks.md, "Restore reads"): page-cache hits run at the same speed
//! either way, and cold 64 KiB reads are bound by the device at any depth. Kept, tested
//! and benchmarked so that a machine where it helps (deep NVMe queues) can turn it on.

use super::{check_range, validate_key, RangeRequest};
use crate::error::{Error, Result};
use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::OnceLock;

/// Reads in flight per ring.
pub const DEPTH: u32 = 32;

/// Environment variable: `on` (or `1`) uses io_uring where the probe passes; anything
/// else, or unset, uses `pread`.
pub const ENV: &str = "SLUICE_IO_URING";

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Whether batched reads use io_uring in this process (probed once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let asked = std::env::var(ENV).is_ok_and(|v| matches!(v.as_str(), "on" | "1" | "yes"));
        let on = asked && probe_ok();
        tracing::debug!(io_uring = on, asked, "batched read path chosen");
        on
    })
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
    /// io_uring if [`enabled`], else `pread` (what the backend uses).
    Auto,
    /// `pread`, one range after another.
    Pread,
    /// io_uring if [`probe_ok`], whatever the environment says (benchmarks).
    Uring,
}

/// Read every range of `reqs` from files under `root` (keys as in the backend), by `path`
/// (benchmarks compare the two in one process; the backend uses `Auto`).
pub fn read_ranges(root: &Path, reqs: &[RangeRequest], path: ReadPath) -> Vec<Result<Vec<u8>>> {
    let mut files: HashMap<&str, Result<(File, u64)>> = HashMap::new();
    for r in reqs {
        files
            .entry(r.key.as_str())
            .or_insert_with(|| open(root, &r.key));
    }
    let mut out: Vec<Option<Result<Vec<u8>>>> = Vec::with_capacity(reqs.len());
    let mut jobs = Vec::new();
    let mut slots = Vec::new();
    for r in reqs {
        let checked = match &files[r.key.as_str()] {
            Ok((f, total)) => check_range(&r.key, *total, r.offset, r.len).map(|()| f),
            Err(e) => Err(Error::new(e.kind(), e.to_string())),
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
    let uring = match path {
        ReadPath::Auto => enabled(),
        ReadPath::Pread => false,
        ReadPath::Uring => probe_ok(),
    };
    run(&mut jobs, uring);
    for (slot, j) in slots.into_iter().zip(jobs) {
        let r = &reqs[slot];
        out[slot] = Some(match j.err {
            None => Ok(j.buf),
            Some(e) => Err(Error::io(
                format!("reading {} bytes at {} of {}", r.len, r.offset, r.key),
                e,
            )),
        });
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::invalid("batch read lost a result"))))
        .collect()
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

/// Submit and reap until every job is complete or failed. An `Err` means the ring itself
/// failed; jobs then hold how far they got, and no read is left in flight.
fn ring_reads(ring: &mut IoUring, jobs: &mut [Job<'_>]) -> std::io::Result<()> {
    let mut next = 0usize;
    let mut queue: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    loop {
        while in_flight < DEPTH as usize {
            let i = match queue.pop() {
                Some(i) => i,
                None if next < jobs.len() => {
                    next += 1;
                    next - 1
                }
                None => break,
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
            // SAFETY: the buffer belongs to `jobs`, which outlives this function, is not
            // touched until the read's completion is reaped below, and every submitted read
            // is reaped before returning (or the process aborts, see `reap_all`).
            if unsafe { ring.submission().push(&e) }.is_err() {
                // Queue full (cannot happen at this depth): submit what is queued first.
                queue.push(i);
                break;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(());
        }
        if let Err(e) = submit_wait(ring) {
            // Entries still queued were never submitted; they die with the ring.
            let queued = ring.submission().len();
            reap_all(ring, in_flight.saturating_sub(queued));
            return Err(e);
        }
        for c in ring.completion() {
            in_flight -= 1;
            let j = &mut jobs[c.user_data() as usize];
            match c.result() {
                n if n > 0 => {
                    j.done += n as usize;
                    if j.done < j.buf.len() {
                        queue.push(c.user_data() as usize);
                    }
                }
                0 => {
                    j.err = Some(std::io::ErrorKind::UnexpectedEof.into());
                }
                n => j.err = Some(std::io::Error::from_raw_os_error(-n)),
            }
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
