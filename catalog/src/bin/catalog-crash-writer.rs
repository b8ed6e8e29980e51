//! Test tool: writes backups into a repository in a loop until killed (used by the
//! `kill -9` test). Each manifest's domain XML carries the blake3 of the disk's contents so
//! the test can check every committed backup after the kill.
//!
//! Usage: `catalog-crash-writer REPO_DIR CATALOG_PATH SEED`

use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, GcOptions, RepoConfig,
    RepoOptions, Repository, RetentionPolicy, VmIdentity,
};
use std::collections::BTreeSet;
use std::sync::Arc;

const CS: usize = 64 << 10;
const CHUNKS: usize = 96;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: catalog-crash-writer REPO_DIR CATALOG_PATH SEED");
        std::process::exit(2);
    }
    let seed: u64 = args[3].parse().unwrap_or(1);
    if let Err(e) = run(&args[1], &args[2], seed) {
        eprintln!("catalog-crash-writer: {}", catalog::Chain(&e));
        std::process::exit(1);
    }
}

fn open(dir: &str, cat: &str) -> catalog::Result<Repository> {
    let backend = Arc::new(FsBackend::open(dir)?);
    let opts = RepoOptions::new(cat);
    match Repository::open(backend.clone(), opts.clone()) {
        Err(e) if e.kind() == catalog::ErrorKind::NotFound => {
            let cfg = RepoConfig {
                index_block_len: 16,
                pack_target: 1 << 20,
                ..RepoConfig::default()
            };
            Repository::create(backend, cfg, opts)
        }
        r => r,
    }
}

fn run(dir: &str, cat: &str, seed: u64) -> catalog::Result<()> {
    let repo = open(dir, cat)?;
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for round in 0u64.. {
        one_backup(&repo, &mut rng, round as i64)?;
        if round % 4 == 3 {
            let keep = RetentionPolicy {
                keep_last: 3,
                ..Default::default()
            };
            repo.prune(None, &keep, false)?;
            repo.gc(GcOptions {
                wait: true,
                repack_threshold: 0.3,
                ..Default::default()
            })?;
        }
    }
    Ok(())
}

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// One backup of the VM: a full first, then incrementals changing a few random chunks.
fn one_backup(repo: &Repository, rng: &mut u64, round: i64) -> catalog::Result<()> {
    let parent = repo.backups(None)?.last().map(|r| r.id.clone());
    let mut disk = vec![0u8; CS * CHUNKS];
    if let Some(p) = &parent {
        repo.open_disk(p, "vda")?.read_at(0, &mut disk)?;
    }
    let w = repo.begin_backup(spec(parent.clone(), disk.len() as u64, round))?;
    let changed = change_chunks(&mut disk, rng, parent.is_some());
    // Each position is put once per backup (the writer's contract).
    for &i in &changed {
        w.put_chunk(0, i as u64, &disk[i * CS..(i + 1) * CS])?;
    }
    let info = CommitInfo {
        vm_state: None,
        domain_xml: blake3::hash(&disk).to_hex().to_string(),
        mode: if parent.is_some() {
            BackupMode::Incremental
        } else {
            BackupMode::Full
        },
        consistency: Consistency::Crash,
        finished: 1_700_000_000 + round * 60 + 30,
    };
    w.commit(info)?;
    Ok(())
}

/// The backup of round `round`, of one disk of `size` bytes.
fn spec(parent: Option<catalog::BackupId>, size: u64, round: i64) -> BackupSpec {
    BackupSpec {
        vm: VmIdentity {
            name: "crash".into(),
            uuid: "crash-uuid".into(),
        },
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size,
            checkpoint: None,
        }],
        parent,
        started: 1_700_000_000 + round * 60,
    }
}

/// Rewrites every chunk of `disk` (no parent) or 1 to 12 random ones (zeros, text or noise);
/// returns the chunks changed.
fn change_chunks(disk: &mut [u8], rng: &mut u64, has_parent: bool) -> BTreeSet<usize> {
    let changes = if has_parent {
        1 + next(rng) % 12
    } else {
        CHUNKS as u64
    };
    let mut changed = BTreeSet::new();
    for k in 0..changes {
        let i = if has_parent {
            (next(rng) % CHUNKS as u64) as usize
        } else {
            k as usize
        };
        let c = &mut disk[i * CS..(i + 1) * CS];
        match next(rng) % 3 {
            0 => c.fill(0),
            1 => c
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 61) as u8 + b'A'),
            _ => c
                .chunks_mut(8)
                .for_each(|b| b.copy_from_slice(&next(rng).to_le_bytes())),
        }
        changed.insert(i);
    }
    changed
}
