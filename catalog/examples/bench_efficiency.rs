//! Storage-efficiency benchmark: full backup of a 4 GiB VM-like disk, then 1 % of it changed
//! with scattered 4 KiB writes and an incremental. Prints stored bytes / changed bytes and
//! the metadata bytes each backup added, for chunk sizes 64 KiB, 1 MiB and 4 MiB.
//!
//! `cargo run --release -p catalog --example bench_efficiency [GiB]`

use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, Manifest, MemBackend, RepoConfig,
    RepoOptions, Repository, VmIdentity,
};
use std::collections::BTreeSet;
use std::sync::Arc;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn disk(total: usize) -> Vec<u8> {
    let text = b"Jan 12 10:00:01 host kernel: usb 1-1: new device; GET /api/v1/items?id=42 200\n";
    let mut rng = 7u64;
    let mut d = vec![0u8; total];
    for r in d.chunks_mut(1 << 20) {
        match xorshift(&mut rng) % 20 {
            0..=8 => r
                .iter_mut()
                .zip(text.iter().cycle())
                .for_each(|(a, b)| *a = *b),
            9..=13 => {}
            _ => r
                .chunks_mut(8)
                .for_each(|c| c.copy_from_slice(&xorshift(&mut rng).to_le_bytes())),
        }
    }
    d
}

fn run(
    repo: &Repository,
    data: &[u8],
    parent: Option<&Manifest>,
    chunks: Option<&BTreeSet<u64>>,
    t: i64,
) -> Manifest {
    let spec = BackupSpec {
        vm: VmIdentity {
            name: "eff".into(),
            uuid: "eff".into(),
        },
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size: data.len() as u64,
            checkpoint: None,
        }],
        parent: parent.map(|p| p.id.clone()),
        started: t,
    };
    let w = repo.begin_backup(spec).unwrap();
    let cs = w.chunk_size() as usize;
    match chunks {
        None => {
            for (i, piece) in data.chunks(8 << 20).enumerate() {
                w.put_chunks(0, (i * (8 << 20) / cs) as u64, piece).unwrap();
            }
        }
        Some(set) => {
            for &c in set {
                let s = c as usize * cs;
                w.put_chunk(0, c, &data[s..s + cs]).unwrap();
            }
        }
    }
    let mode = if chunks.is_some() {
        BackupMode::Incremental
    } else {
        BackupMode::Full
    };
    let info = CommitInfo {
        vm_state: None,
        domain_xml: String::new(),
        mode,
        consistency: Consistency::Crash,
        finished: t + 1,
    };
    w.commit(info).unwrap()
}

fn main() {
    let gib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4);
    let base = disk(gib << 30);
    let mut changed = base.clone();
    let writes = (gib << 30) / 100 / 4096;
    let mut rng = 99u64;
    let mut offsets = BTreeSet::new();
    while offsets.len() < writes {
        offsets.insert((xorshift(&mut rng) % ((gib << 30) as u64 / 4096)) * 4096);
    }
    for &o in &offsets {
        let w = &mut changed[o as usize..o as usize + 4096];
        w.chunks_mut(8)
            .for_each(|c| c.copy_from_slice(&xorshift(&mut rng).to_le_bytes()));
    }
    let changed_bytes = writes as u64 * 4096;
    println!(
        "{gib} GiB disk, {writes} scattered 4 KiB writes = {} MiB changed",
        changed_bytes >> 20
    );
    println!("chunk size | full: stored MiB, metadata KiB | incr: chunks, stored MiB, stored/changed, metadata KiB");
    for cs in [64u32 << 10, 1 << 20, 4 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RepoConfig {
            chunk_size: cs,
            ..RepoConfig::default()
        };
        let opts = RepoOptions::new(dir.path().join("catalog.sqlite"));
        let repo = Repository::create(Arc::new(MemBackend::new()), cfg, opts).unwrap();
        let full = run(&repo, &base, None, None, 1);
        let dirty: BTreeSet<u64> = offsets.iter().map(|o| o / cs as u64).collect();
        let inc = run(&repo, &changed, Some(&full), Some(&dirty), 2);
        println!(
            "{:>7} KiB | {:>8} {:>8} | {:>7} {:>8} {:>8.2} {:>8}",
            cs >> 10,
            full.stats.bytes_stored >> 20,
            full.stats.metadata_bytes >> 10,
            dirty.len(),
            inc.stats.bytes_stored >> 20,
            inc.stats.bytes_stored as f64 / changed_bytes as f64,
            inc.stats.metadata_bytes >> 10
        );
    }
}
