//! Helpers shared by the catalog integration tests.
#![allow(dead_code)]

use catalog::{
    Backend, BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, FsOptions,
    Manifest, MemBackend, RepoConfig, RepoOptions, Repository, VmIdentity,
};
use std::sync::Arc;

/// Deterministic xorshift bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A VM-like disk image: runs of text, zeros and random bytes.
pub fn vm_like(seed: u64, len: usize) -> Vec<u8> {
    let text = b"Lorem ipsum dolor sit amet, kernel: usb 1-1: new device; GET /index.html 200\n";
    let mut out = vec![0u8; len];
    let region = 256 << 10;
    for (i, r) in out.chunks_mut(region).enumerate() {
        match (seed as usize + i) % 3 {
            0 => r
                .iter_mut()
                .zip(text.iter().cycle())
                .for_each(|(d, s)| *d = *s),
            1 => {}
            _ => r.copy_from_slice(&noise(seed ^ i as u64, r.len())),
        }
    }
    out
}

pub fn small_config() -> RepoConfig {
    RepoConfig {
        chunk_size: 64 << 10,
        index_block_len: 16,
        pack_target: 1 << 20,
        ..RepoConfig::default()
    }
}

pub fn opts(dir: &std::path::Path) -> RepoOptions {
    RepoOptions {
        workers: 2,
        ..RepoOptions::new(dir.join("catalog.sqlite"))
    }
}

pub fn mem_repo(dir: &std::path::Path) -> (MemBackend, Repository) {
    let b = MemBackend::new();
    let r = Repository::create(Arc::new(b.clone()), small_config(), opts(dir)).unwrap();
    (b, r)
}

/// A filesystem repository under `dir`; its batched reads use io_uring when the test run
/// has `SLUICE_IO_URING=on` (as the daemon reads it), else `pread`.
pub fn fs_repo(dir: &std::path::Path) -> (FsBackend, Repository) {
    let io_uring = std::env::var("SLUICE_IO_URING").is_ok_and(|v| v == "on");
    let b = FsBackend::open_with(dir.join("repo"), FsOptions { io_uring }).unwrap();
    let r = Repository::create(Arc::new(b.clone()), small_config(), opts(dir)).unwrap();
    (b, r)
}

pub fn vm() -> VmIdentity {
    VmIdentity {
        name: "web".into(),
        uuid: "11111111-2222-3333-4444-555555555555".into(),
    }
}

pub fn commit_info(mode: BackupMode) -> CommitInfo {
    CommitInfo {
        vm_state: None,
        domain_xml: "<domain type='qemu'/>".into(),
        mode,
        consistency: Consistency::Crash,
        finished: 1_700_000_100,
    }
}

/// Back up `disks` (target, content) in full, or only `changed` chunk indexes on top of
/// `parent`.
pub fn backup(
    repo: &Repository,
    disks: &[(&str, &[u8])],
    parent: Option<&Manifest>,
    changed: Option<&[u64]>,
    started: i64,
) -> catalog::Result<Manifest> {
    let spec = BackupSpec {
        vm: vm(),
        disks: disks
            .iter()
            .map(|(t, d)| DiskSpec {
                full_read: None,
                target: t.to_string(),
                size: d.len() as u64,
                checkpoint: Some(format!("cp-{started}")),
            })
            .collect(),
        parent: parent.map(|p| p.id.clone()),
        started,
    };
    let w = repo.begin_backup(spec)?;
    let cs = w.chunk_size() as usize;
    for (i, (_, data)) in disks.iter().enumerate() {
        match changed {
            None => w.put_chunks(i, 0, data)?,
            Some(list) => {
                for &c in list.iter().filter(|&&c| (c as usize) * cs < data.len()) {
                    let s = c as usize * cs;
                    w.put_chunk(i, c, &data[s..(s + cs).min(data.len())])?;
                }
            }
        }
    }
    let mode = if changed.is_some() {
        BackupMode::Incremental
    } else {
        BackupMode::Full
    };
    w.commit(commit_info(mode))
}

/// Read a whole disk back.
pub fn read_all(repo: &Repository, m: &Manifest, target: &str) -> catalog::Result<Vec<u8>> {
    let r = repo.open_disk(&m.id, target)?;
    let mut buf = vec![0u8; r.size() as usize];
    r.read_at(0, &mut buf)?;
    Ok(buf)
}

pub fn backend_of<B: Backend>(b: B) -> Arc<dyn Backend> {
    Arc::new(b)
}
