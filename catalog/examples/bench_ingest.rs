//! Ingest benchmark: a 2 GiB VM-like buffer (text, zeros, random) through hash + compress +
//! store, then the same data again (all duplicates). Prints GB/s next to this machine's own
//! zstd-1 and blake3 throughput measured in the same run. Never fails on slow figures.
//!
//! `cargo run --release -p catalog --example bench_ingest [GiB]`

use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, RepoConfig, RepoOptions,
    Repository, VmIdentity,
};
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

/// zstd-1 on 64 KiB chunks over `threads` threads, as GB/s of input.
fn zstd_ceiling(sample: &[Vec<u8>], threads: usize) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || {
                let mut z = zstd::bulk::Compressor::new(1).unwrap();
                for p in sample.iter().skip(k).step_by(threads) {
                    for c in p.chunks(64 << 10) {
                        std::hint::black_box(z.compress(c).unwrap());
                    }
                }
            });
        }
    });
    gbps(sample.len() * PIECE, t.elapsed().as_secs_f64())
}

fn blake3_ceiling(sample: &[Vec<u8>]) -> f64 {
    let t = Instant::now();
    for p in sample {
        for c in p.chunks(64 << 10) {
            std::hint::black_box(blake3::hash(c));
        }
    }
    gbps(sample.len() * PIECE, t.elapsed().as_secs_f64())
}

fn ingest(repo: &Repository, data: Vec<Vec<u8>>, started: i64) -> (f64, catalog::Manifest) {
    let size = (data.len() * PIECE) as u64;
    let spec = BackupSpec {
        vm: VmIdentity {
            name: "bench".into(),
            uuid: "bench".into(),
        },
        disks: vec![DiskSpec {
            target: "vda".into(),
            size,
            checkpoint: None,
        }],
        parent: None,
        started,
    };
    let cpp = (PIECE / repo.config().chunk_size as usize) as u64;
    let t = Instant::now();
    let w = repo.begin_backup(spec).unwrap();
    for (i, p) in data.into_iter().enumerate() {
        w.put_chunks_owned(0, i as u64 * cpp, p).unwrap();
    }
    let info = CommitInfo {
        domain_xml: String::new(),
        mode: BackupMode::Full,
        consistency: Consistency::Crash,
        finished: started + 1,
    };
    let m = w.commit(info).unwrap();
    (gbps(size as usize, t.elapsed().as_secs_f64()), m)
}

fn main() {
    let gib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let total = gib << 30;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("generating {gib} GiB of VM-like data ({cpus} cpus)...");
    let data = vm_like(total);
    let sample = &data[..data.len().min(32)];
    let z1 = zstd_ceiling(sample, 1);
    let zn = zstd_ceiling(sample, cpus);
    let b3 = blake3_ceiling(sample);
    let again = data.clone();
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FsBackend::open(dir.path().join("repo")).unwrap());
    let opts = RepoOptions::new(dir.path().join("catalog.sqlite"));
    let repo = Repository::create(backend, RepoConfig::default(), opts).unwrap();
    let (new_rate, m1) = ingest(&repo, data, 1);
    let (dup_rate, m2) = ingest(&repo, again, 2);
    println!("machine ceiling: zstd-1 1 thread {z1:.2} GB/s, {cpus} threads {zn:.2} GB/s; blake3 1 thread {b3:.2} GB/s");
    println!(
        "ingest new data:   {new_rate:.2} GB/s  ({:.2} x zstd-1 on {cpus} threads; stored {} MiB of {} MiB, {} new / {} zero chunks)",
        new_rate / zn,
        m1.stats.bytes_stored >> 20,
        total >> 20,
        m1.stats.chunks_new,
        m1.stats.chunks_zero
    );
    println!(
        "ingest duplicates: {dup_rate:.2} GB/s  (stored {} bytes, {} dedup chunks)",
        m2.stats.bytes_stored, m2.stats.chunks_dedup
    );
}
