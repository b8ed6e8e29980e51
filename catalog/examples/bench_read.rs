//! Restore-side read throughput: `pread` against io_uring on the same repository in the
//! same run.
//!
//! Writes one backup of SIZE_MIB of incompressible data (64 KiB chunks, 32 MiB packs) into
//! a filesystem repository under `$TMPDIR`, then
//! 1. reads every chunk's blob straight from its pack in a shuffled order, in batches of 32
//!    (`catalog::backend::uring::read_ranges`, `Pread` against `Uring`),
//!    alternating the two paths for ROUNDS rounds, and prints each path's best and median;
//! 2. reads the whole backup disk through `DiskReader::read_at` (4 MiB requests: fetch,
//!    checksum, blake3 of every chunk) in child processes with `SLUICE_IO_URING=off` and
//!    `=on` (the child opens its backend with `FsOptions::io_uring` set from it, as the
//!    daemon does), alternating, and prints GB/s.
//!
//! Both are measured with the packs in the page cache (the syscall path) and with the packs
//! evicted before each round (`POSIX_FADV_DONTNEED` on the pack files only: the device).
//!
//! `cargo run --release -p catalog --example bench_read [-- SIZE_MIB ROUNDS]` (default 1024 5).

use anyhow::{bail, Context};
use catalog::backend::uring::{self, ReadPath};
use catalog::backend::RangeRequest;
use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, FsOptions, RepoConfig,
    RepoOptions, Repository, VmIdentity,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

// The tests' deterministic data generators (`noise`).
#[path = "../tests/common/mod.rs"]
mod common;
use common::noise;

const CS: usize = 64 << 10;

/// The daemon's switch for io_uring reads; the reader child reads it as the daemon does.
const ENV: &str = "SLUICE_IO_URING";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--reader") {
        return reader_child(Path::new(&args[2]));
    }
    let mib: usize = args.get(1).map_or(Ok(1024), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let repo = fabricate(dir.path(), mib << 20)?;
    println!(
        "repository: {mib} MiB of incompressible 64 KiB chunks written in {:.1} s; io_uring {}",
        t.elapsed().as_secs_f64(),
        if uring::probe_ok() {
            "available"
        } else {
            "unavailable (pread only)"
        }
    );
    let reqs = shuffled_requests(&repo)?;
    let root = dir.path().join("repo");
    raw_reads(&root, &reqs, rounds)?;
    for cold in [false, true] {
        reader_reads(dir.path(), cold.then_some(root.as_path()), rounds.min(3))?;
    }
    Ok(())
}

/// Part 1: every blob straight from its pack, by `pread` and by io_uring, cached and evicted.
fn raw_reads(root: &Path, reqs: &[RangeRequest], rounds: usize) -> anyhow::Result<()> {
    let total: u64 = reqs.iter().map(|r| r.len as u64).sum();
    run_batches(root, reqs, ReadPath::Pread)?; // warm the page cache
    let (mut pread, mut uring) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        pread.push(total as f64 / run_batches(root, reqs, ReadPath::Pread)? / 1e9);
        uring.push(total as f64 / run_batches(root, reqs, ReadPath::Uring)? / 1e9);
    }
    println!(
        "raw blob reads, {} x ~64 KiB shuffled, batches of 32:",
        reqs.len()
    );
    println!(" packs in the page cache, {rounds} rounds:");
    print_row("pread", &mut pread);
    print_row("io_uring", &mut uring);
    let (mut pread, mut uring) = (Vec::new(), Vec::new());
    for _ in 0..rounds.min(3) {
        evict(root)?;
        pread.push(total as f64 / run_batches(root, reqs, ReadPath::Pread)? / 1e9);
        evict(root)?;
        uring.push(total as f64 / run_batches(root, reqs, ReadPath::Uring)? / 1e9);
    }
    println!(" packs evicted from the page cache before each round (POSIX_FADV_DONTNEED):");
    print_row("pread", &mut pread);
    print_row("io_uring", &mut uring);
    Ok(())
}

/// Part 2: the whole disk through `DiskReader` in child processes, `pread` against io_uring,
/// with the packs under `evict_root` evicted before each run if given.
fn reader_reads(dir: &Path, evict_root: Option<&Path>, rounds: usize) -> anyhow::Result<()> {
    let (mut rp, mut ru) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        rp.push(reader_run(dir, true, evict_root)?);
        ru.push(reader_run(dir, false, evict_root)?);
    }
    let how = if evict_root.is_some() {
        "evicted"
    } else {
        "in the page cache"
    };
    println!("whole disk through DiskReader::read_at (4 MiB requests), packs {how}:");
    print_row("pread", &mut rp);
    print_row("io_uring", &mut ru);
    Ok(())
}

/// Drop the packs' clean pages from the page cache (only these files: other processes'
/// caches are untouched).
fn evict(root: &Path) -> anyhow::Result<()> {
    let mut dirs = vec![root.join("packs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let f = std::fs::File::open(&p)?;
            let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
            // SAFETY: advice on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                bail!("posix_fadvise on {}: error {rc}", p.display());
            }
        }
    }
    Ok(())
}

fn print_row(name: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    let all: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
    println!(
        "  {name:<9} best {:.2} GB/s  median {:.2} GB/s  (all: {})",
        v[v.len() - 1],
        v[v.len() / 2],
        all.join(" ")
    );
}

fn opts(dir: &Path) -> RepoOptions {
    RepoOptions::new(dir.join("catalog.sqlite"))
}

fn open(dir: &Path, fs: FsOptions) -> anyhow::Result<(Repository, bool)> {
    let b = FsBackend::open_with(dir.join("repo"), fs)?;
    let on = b.uses_io_uring();
    Ok((Repository::open(Arc::new(b), opts(dir))?, on))
}

fn fabricate(dir: &Path, size: usize) -> anyhow::Result<Repository> {
    let b = FsBackend::open(dir.join("repo"))?;
    let repo = Repository::create(Arc::new(b), RepoConfig::default(), opts(dir))?;
    let w = repo.begin_backup(BackupSpec {
        vm: VmIdentity {
            name: "bench".into(),
            uuid: "00000000-0000-0000-0000-0000000000b1".into(),
        },
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size: size as u64,
            checkpoint: None,
        }],
        parent: None,
        started: 1_700_000_000,
    })?;
    let piece = 8 << 20;
    for (k, start) in (0..size).step_by(piece).enumerate() {
        let len = piece.min(size - start);
        w.put_chunks_owned(0, (start / CS) as u64, noise(k as u64 + 1, len))?;
    }
    w.commit(CommitInfo {
        vm_state: None,
        domain_xml: "<domain/>".into(),
        mode: BackupMode::Full,
        consistency: Consistency::Crash,
        finished: 1_700_000_001,
    })?;
    Ok(repo)
}

/// Every chunk's location in the backup, as range requests in a shuffled order.
fn shuffled_requests(repo: &Repository) -> anyhow::Result<Vec<RangeRequest>> {
    let id = repo.backups(None)?.first().context("no backup")?.id.clone();
    let r = repo.open_disk(&id, "vda")?;
    let mut reqs = Vec::new();
    for i in 0..r.chunk_count() {
        let d = r.digest(i)?;
        let loc = repo
            .with_catalog(|c| c.lookup(&d))?
            .with_context(|| format!("chunk {i} not located"))?;
        reqs.push(RangeRequest {
            key: loc.pack.key(),
            offset: loc.offset,
            len: loc.length as usize,
        });
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..reqs.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        reqs.swap(i, (x % (i as u64 + 1)) as usize);
    }
    Ok(reqs)
}

/// Read all `reqs` in batches of 32 by `path`; seconds taken.
fn run_batches(root: &Path, reqs: &[RangeRequest], path: ReadPath) -> anyhow::Result<f64> {
    let t = Instant::now();
    for batch in reqs.chunks(32) {
        for r in uring::read_ranges(root, batch, path) {
            r?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Read the disk whole in a child process (a fresh process, which reads `SLUICE_IO_URING`), after
/// evicting the packs from the page cache if `evict_root` is given; GB/s.
fn reader_run(dir: &Path, force_pread: bool, evict_root: Option<&Path>) -> anyhow::Result<f64> {
    if let Some(root) = evict_root {
        evict(root)?;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--reader").arg(dir);
    cmd.env(ENV, if force_pread { "off" } else { "on" });
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("reader child: {}", String::from_utf8_lossy(&out.stderr));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let (on, gbs) = s.trim().split_once(' ').context("reader child output")?;
    if (on == "true") == force_pread {
        bail!("{ENV}: the reader child used the other path");
    }
    Ok(gbs.parse()?)
}

fn reader_child(dir: &Path) -> anyhow::Result<()> {
    let io_uring = std::env::var(ENV).is_ok_and(|v| v == "on");
    let (repo, on) = open(dir, FsOptions { io_uring })?;
    let id = repo.backups(None)?.first().context("no backup")?.id.clone();
    let r = repo.open_disk(&id, "vda")?;
    let mut buf = vec![0u8; 4 << 20];
    let t = Instant::now();
    let mut at = 0;
    while at < r.size() {
        let len = (buf.len() as u64).min(r.size() - at) as usize;
        r.read_at(at, &mut buf[..len])?;
        at += len as u64;
    }
    let gbs = r.size() as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("{on} {gbs:.3}");
    Ok(())
}
