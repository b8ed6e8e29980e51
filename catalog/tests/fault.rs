//! Crash consistency by fault injection: for every N, a run whose writes stop being durable
//! after the N-th sync reopens consistent: every committed backup complete and correct,
//! nothing half-written referenced, and the next backup succeeds.

mod common;

use catalog::{
    BackupId, BackupSpec, DiskSpec, FaultBackend, GcOptions, MemBackend, Repository,
    RetentionPolicy, VerifyMode,
};
use common::*;
use std::collections::HashMap;
use std::sync::Arc;

const CS: usize = 64 << 10;

/// Backups, an aborted writer, prune, GC (with repack), another backup. Records what each
/// committed backup must read back as.
fn workload(repo: &Repository, expect: &mut HashMap<BackupId, Vec<u8>>) {
    let mut d = vm_like(41, 24 * CS);
    let m1 = backup(repo, &[("vda", &d)], None, None, 100).unwrap();
    expect.insert(m1.id.clone(), d.clone());
    d[3 * CS..4 * CS].copy_from_slice(&noise(42, CS));
    d[20 * CS..21 * CS].copy_from_slice(&noise(43, CS));
    let m2 = backup(repo, &[("vda", &d)], Some(&m1), Some(&[3, 20]), 200).unwrap();
    expect.insert(m2.id.clone(), d.clone());
    {
        let spec = BackupSpec {
            vm: vm(),
            disks: vec![DiskSpec {
                full_read: None,
                target: "vda".into(),
                size: d.len() as u64,
                checkpoint: None,
            }],
            parent: None,
            started: 250,
        };
        let w = repo.begin_backup(spec).unwrap();
        w.put_chunks(0, 0, &noise(44, 24 * CS)).unwrap();
    }
    d[..12 * CS].copy_from_slice(&noise(45, 12 * CS));
    let m3 = backup(
        repo,
        &[("vda", &d)],
        Some(&m2),
        Some(&(0..12).collect::<Vec<_>>()),
        300,
    )
    .unwrap();
    expect.insert(m3.id.clone(), d.clone());
    repo.prune(
        None,
        &RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    repo.gc(GcOptions {
        repack_threshold: 0.3,
        ..Default::default()
    })
    .unwrap();
    d[5 * CS..6 * CS].fill(3);
    let m4 = backup(repo, &[("vda", &d)], Some(&m3), Some(&[5]), 400).unwrap();
    expect.insert(m4.id.clone(), d);
}

fn base_repo(dir: &std::path::Path) -> MemBackend {
    let base = MemBackend::new();
    Repository::create(Arc::new(base.clone()), small_config(), opts(dir)).unwrap();
    base
}

/// Reopen what survived (with the catalog as the crashed run left it) and check it.
fn check_after_crash(
    dir: &std::path::Path,
    image: MemBackend,
    expect: &HashMap<BackupId, Vec<u8>>,
    n: u64,
) {
    let repo = Repository::open(Arc::new(image), opts(dir)).unwrap();
    let rep = repo.verify(VerifyMode::Full, None).unwrap();
    assert!(rep.is_ok(), "sync limit {n}: {rep:?}");
    let rows = repo.backups(None).unwrap();
    assert_eq!(
        rows.len(),
        repo.manifest_ids().unwrap().len(),
        "sync limit {n}: catalog in step"
    );
    let mut latest = None;
    for row in &rows {
        let m = repo.manifest(&row.id).unwrap();
        let want = expect
            .get(&row.id)
            .unwrap_or_else(|| panic!("sync limit {n}: unknown backup"));
        assert_eq!(
            &read_all(&repo, &m, "vda").unwrap(),
            want,
            "sync limit {n}: backup {}",
            row.id
        );
        latest = Some((m, want.clone()));
    }
    // The next backup on the survivor succeeds and is correct.
    let (parent, mut d) = latest.unwrap_or((
        backup(&repo, &[("vda", &vec![1u8; 24 * CS])], None, None, 500).unwrap(),
        vec![1u8; 24 * CS],
    ));
    d[CS..2 * CS].copy_from_slice(&noise(n, CS));
    let next = backup(&repo, &[("vda", &d)], Some(&parent), Some(&[1]), 600).unwrap();
    assert_eq!(
        read_all(&repo, &next, "vda").unwrap(),
        d,
        "sync limit {n}: next backup"
    );
    assert!(
        repo.verify(VerifyMode::Full, None).unwrap().is_ok(),
        "sync limit {n}: after next"
    );
}

#[test]
fn every_crash_point_reopens_consistent() {
    let probe_dir = tempfile::tempdir().unwrap();
    let base = base_repo(probe_dir.path());
    let fault = FaultBackend::new(&base, u64::MAX);
    let repo = Repository::open(Arc::new(fault.clone()), opts(probe_dir.path())).unwrap();
    workload(&repo, &mut HashMap::new());
    let total = fault.syncs();
    assert!(total > 10, "workload too small: {total} syncs");
    eprintln!("crash points tested: 0..={total} syncs");
    for n in 0..=total {
        let dir = tempfile::tempdir().unwrap();
        let base = base_repo(dir.path());
        let fault = FaultBackend::new(&base, n);
        let repo = Repository::open(Arc::new(fault.clone()), opts(dir.path())).unwrap();
        let mut expect = HashMap::new();
        workload(&repo, &mut expect);
        drop(repo);
        check_after_crash(dir.path(), fault.crash(), &expect, n);
    }
}

/// A backend whose pack writes fail with ENOSPC after the first; everything else is the
/// memory backend's.
struct FullDisk {
    inner: MemBackend,
    packs: std::sync::atomic::AtomicU32,
}

impl catalog::Backend for FullDisk {
    fn put(&self, key: &str, data: &[u8]) -> catalog::Result<()> {
        let n = self.packs.load(std::sync::atomic::Ordering::SeqCst);
        if key.starts_with("packs/") {
            self.packs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n >= 1 {
                let e = std::io::Error::from_raw_os_error(28);
                return Err(catalog::Error::new(
                    catalog::ErrorKind::Io,
                    format!("writing object {key}: {e}"),
                ));
            }
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> catalog::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> catalog::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn len(&self, key: &str) -> catalog::Result<u64> {
        self.inner.len(key)
    }
    fn list(&self, prefix: &str) -> catalog::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> catalog::Result<()> {
        self.inner.delete(key)
    }
    fn lock(&self, mode: catalog::LockMode, wait: bool) -> catalog::Result<catalog::LockGuard> {
        self.inner.lock(mode, wait)
    }
}

/// A pack write that fails (ENOSPC) while the store loop has more packs to hand over: the
/// backup's error is the write's, naming the cause, not that the sealer stopped.
#[test]
fn a_failed_pack_write_is_the_backups_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(FullDisk {
        inner: MemBackend::new(),
        packs: std::sync::atomic::AtomicU32::new(0),
    });
    let repo = Repository::create(b, small_config(), opts(dir.path())).unwrap();
    // 8 MiB of incompressible data: eight 1 MiB packs.
    let d = noise(51, 128 * CS);
    let e = backup(&repo, &[("vda", &d)], None, None, 100).unwrap_err();
    let msg = catalog::Chain(&e).to_string();
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(!msg.contains("sealer stopped"), "{msg}");
}
