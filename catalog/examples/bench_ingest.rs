//! Ingest benchmark: a 2 GiB VM-like buffer (text, zeros, random) through hash + compress +
//! store into a fresh repository, then the same data again (all duplicates: once with the
//! first backup as parent, once without a parent so every chunk is looked up in the catalog).
//! Prints GB/s next to this machine's own zstd-1 and blake3 throughput and each target
//! filesystem's synced write speed, all measured in the same run, as one table. Runs on the
//! temporary directory's filesystem (the real disk) and on tmpfs (`/dev/shm`), so that the
//! CPU pipeline's own speed shows apart from the device. Never fails on slow figures.
//!
//! `cargo run --release -p catalog --example bench_ingest [GiB] [DIR...]`

use catalog::{
    BackupId, BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, RepoConfig,
    RepoOptions, Repository, VmIdentity,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const PIECE: usize = 8 << 20;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// 8 MiB pieces: per 1 MiB region, 45 % text-like, 25 % zeros, 30 % random.
fn vm_like(total: usize) -> Vec<Vec<u8>> {
    let text = b"Jan 12 10:00:01 host kernel: [ 1.234] usb 1-1: new high-speed USB device; GET /api/v1/items?id=42 HTTP/1.1 200 1534 \"curl/8.0\"\n";
    let mut rng = 0x1234_5678_9abc_def1u64;
    (0..total / PIECE)
        .map(|_| {
            let mut p = vec![0u8; PIECE];
            for r in p.chunks_mut(1 << 20) {
                match xorshift(&mut rng) % 20 {
                    0..=8 => {
                        let skew = (xorshift(&mut rng) % 97) as usize;
                        r.iter_mut()
                            .zip(text.iter().cycle().skip(skew))
                            .for_each(|(d, s)| *d = *s);
                        let n = xorshift(&mut rng);
                        r[..8].copy_from_slice(&n.to_le_bytes());
                    }
                    9..=13 => {}
                    _ => r
                        .chunks_mut(8)
                        .for_each(|c| c.copy_from_slice(&xorshift(&mut rng).to_le_bytes())),
                }
            }
            p
        })
        .collect()
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Run `f(k)` for `k` in `0..threads` on as many threads; returns wall seconds.
fn timed_threads(threads: usize, f: impl Fn(usize) + Sync) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            let f = &f;
            s.spawn(move || f(k));
        }
    });
    t.elapsed().as_secs_f64()
}

/// zstd-1 on 64 KiB chunks over `threads` threads, as GB/s of input.
fn zstd_ceiling(sample: &[Vec<u8>], threads: usize) -> f64 {
    let secs = timed_threads(threads, |k| {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        for p in sample.iter().skip(k).step_by(threads) {
            for c in p.chunks(64 << 10) {
                std::hint::black_box(z.compress(c).unwrap());
            }
        }
    });
    gbps(sample.len() * PIECE, secs)
}

/// blake3 of 64 KiB chunks over `threads` threads, as GB/s of input.
fn blake3_ceiling(sample: &[Vec<u8>], threads: usize) -> f64 {
    let secs = timed_threads(threads, |k| {
        for p in sample.iter().skip(k).step_by(threads) {
            for c in p.chunks(64 << 10) {
                std::hint::black_box(blake3::hash(c));
            }
        }
    });
    gbps(sample.len() * PIECE, secs)
}

/// Synced sequential write speed of `dir`'s filesystem in MB/s: 256 MiB as eight 32 MiB
/// files (the default pack size), each written then fsynced, like `dd conv=fsync`.
fn sync_write_mbps(dir: &Path) -> f64 {
    let buf: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let t = Instant::now();
    for i in 0..8 {
        let p = dir.join(format!("sync-probe-{i}"));
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    for i in 0..8 {
        let _ = std::fs::remove_file(dir.join(format!("sync-probe-{i}")));
    }
    (8 * buf.len()) as f64 / secs / 1e6
}

/// CPU seconds (user + system) this process used so far, every thread included.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the zeroed struct we pass; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One ingest's wall rate and CPU cost, both in GB/s: `cpu` is the rate the ingest would
/// reach with every core of the machine to itself (bytes / (CPU seconds / cores)), which
/// other processes' load moves far less than the wall figure.
struct Rate {
    wall: f64,
    cpu: f64,
}

fn ingest(
    repo: &Repository,
    data: Vec<Vec<u8>>,
    started: i64,
    parent: Option<BackupId>,
) -> (Rate, catalog::Manifest) {
    let size = (data.len() * PIECE) as u64;
    let spec = BackupSpec {
        vm: VmIdentity {
            name: "bench".into(),
            uuid: "bench".into(),
        },
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size,
            checkpoint: None,
        }],
        parent,
        started,
    };
    let cpp = (PIECE / repo.config().chunk_size as usize) as u64;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let (t, c) = (Instant::now(), cpu_secs());
    let w = repo.begin_backup(spec).unwrap();
    for (i, p) in data.into_iter().enumerate() {
        w.put_chunks_owned(0, i as u64 * cpp, p).unwrap();
    }
    let info = CommitInfo {
        vm_state: None,
        domain_xml: String::new(),
        mode: BackupMode::Full,
        consistency: Consistency::Crash,
        finished: started + 1,
    };
    let m = w.commit(info).unwrap();
    let rate = Rate {
        wall: gbps(size as usize, t.elapsed().as_secs_f64()),
        cpu: gbps(size as usize, (cpu_secs() - c) / cores),
    };
    (rate, m)
}

/// One target directory's figures.
struct Row {
    dir: PathBuf,
    sync_mbps: f64,
    new: Rate,
    dup_parent: Rate,
    dup_catalog: Rate,
    stored: u64,
}

fn run_on(dir: &Path, data: &[Vec<u8>]) -> Row {
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let sync_mbps = sync_write_mbps(tmp.path());
    let backend = Arc::new(FsBackend::open(tmp.path().join("repo")).unwrap());
    let opts = RepoOptions::new(tmp.path().join("catalog.sqlite"));
    let repo = Repository::create(backend, RepoConfig::default(), opts).unwrap();
    let (new, m1) = ingest(&repo, data.to_vec(), 1, None);
    let (dup_parent, m2) = ingest(&repo, data.to_vec(), 2, Some(m1.id.clone()));
    let (dup_catalog, m3) = ingest(&repo, data.to_vec(), 3, None);
    assert_eq!(
        m2.stats.chunks_new + m3.stats.chunks_new,
        0,
        "second ingest stored chunks"
    );
    Row {
        dir: dir.to_path_buf(),
        sync_mbps,
        new,
        dup_parent,
        dup_catalog,
        stored: m1.stats.bytes_stored,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let mut dirs: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![std::env::temp_dir(), PathBuf::from("/dev/shm")];
    }
    let total = gib << 30;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("generating {gib} GiB of VM-like data ({cpus} cpus)...");
    let data = vm_like(total);
    let sample = &data[..data.len().min(32)];
    let (z1, zn) = (zstd_ceiling(sample, 1), zstd_ceiling(sample, cpus));
    let (b1, bn) = (blake3_ceiling(sample, 1), blake3_ceiling(sample, cpus));
    println!("ceilings on 64 KiB chunks of the same data (GB/s of input):");
    println!("  zstd-1  1 thread {z1:.2}   {cpus} threads {zn:.2}");
    println!("  blake3  1 thread {b1:.2}   {cpus} threads {bn:.2}");
    let rows: Vec<Row> = dirs.iter().map(|d| run_on(d, &data)).collect();
    let stored = rows.first().map_or(0, |r| r.stored);
    println!(
        "ingest of {} MiB ({} MiB stored after zero detection, dedup and zstd-1), GB/s:",
        total >> 20,
        stored >> 20
    );
    println!(
        "  {:<16} {:>9} {:>12} {:>13} {:>13} {:>13}",
        "target dir", "sync MB/s", "device bound", "new data", "dup (parent)", "dup (catalog)"
    );
    for r in &rows {
        // Writing the stored bytes at the synced speed alone takes this long.
        let bound = total as f64 / (r.stored as f64 / (r.sync_mbps * 1e6)) / 1e9;
        let cell = |x: &Rate| format!("{:.2} ({:.2})", x.wall, x.cpu);
        println!(
            "  {:<16} {:>9.0} {:>12.2} {:>13} {:>13} {:>13}",
            r.dir.display().to_string(),
            r.sync_mbps,
            bound,
            cell(&r.new),
            cell(&r.dup_parent),
            cell(&r.dup_catalog)
        );
    }
    println!("(in brackets: GB/s per CPU time used, bytes / (CPU seconds / {cpus} cores))");
    println!("goals on 2 cores: new data >= 1.0 GB/s, duplicates >= 3.0 GB/s; new data cannot beat the device bound");
    println!(
        "new data / zstd-1 on {cpus} threads: {:.2}",
        rows.last().map_or(0.0, |r| r.new.wall) / zn
    );
}
