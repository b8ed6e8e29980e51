//! Prune and GC reclaim space without touching what committed backups need, and GC never
//! runs beside a backup (the race is tested, not assumed).

mod common;

use catalog::{BackupSpec, DiskSpec, ErrorKind, GcOptions, RetentionPolicy, VerifyMode};
use common::*;
use std::time::Duration;

const CS: usize = 64 << 10;

fn stored_bytes(b: &catalog::MemBackend) -> u64 {
    b.snapshot().values().map(|v| v.len() as u64).sum()
}

#[test]
fn prune_then_gc_deletes_dead_packs() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo) = mem_repo(dir.path());
    let mut ms = Vec::new();
    for i in 0..3u64 {
        let d = noise(100 + i, 40 * CS);
        ms.push((
            backup(&repo, &[("vda", &d)], None, None, 1000 * i as i64 + 1).unwrap(),
            d,
        ));
    }
    let policy = RetentionPolicy {
        keep_last: 1,
        ..Default::default()
    };
    let dry = repo.prune(None, &policy, true).unwrap();
    assert!(dry.removed.is_empty());
    assert_eq!(dry.decisions.iter().filter(|d| !d.keep).count(), 2);
    let rep = repo.prune(None, &policy, false).unwrap();
    assert_eq!(rep.removed.len(), 2);
    let before = stored_bytes(&b);
    let gc = repo.gc(GcOptions::default()).unwrap();
    assert!(gc.packs_deleted >= 4, "{gc:?}");
    let after = stored_bytes(&b);
    assert!(after < before / 2, "{before} -> {after}");
    let (last, data) = &ms[2];
    assert_eq!(read_all(&repo, last, "vda").unwrap(), *data);
    assert!(repo.verify(VerifyMode::Full, None).unwrap().is_ok());
}

#[test]
fn gc_repacks_mostly_dead_packs() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let d1 = noise(1, 12 * CS);
    let m1 = backup(&repo, &[("vda", &d1)], None, None, 1).unwrap();
    let mut d2 = d1.clone();
    d2[..10 * CS].copy_from_slice(&noise(2, 10 * CS));
    let m2 = backup(
        &repo,
        &[("vda", &d2)],
        Some(&m1),
        Some(&(0..10).collect::<Vec<_>>()),
        2,
    )
    .unwrap();
    repo.remove_backup(&m1.id).unwrap();
    let gc = repo
        .gc(GcOptions {
            repack_threshold: 0.5,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(gc.packs_repacked, 1, "{gc:?}");
    assert_eq!(read_all(&repo, &m2, "vda").unwrap(), d2);
    assert!(repo.verify(VerifyMode::Full, None).unwrap().is_ok());
    let again = repo.gc(GcOptions::default()).unwrap();
    assert_eq!(
        (again.packs_deleted, again.packs_repacked),
        (0, 0),
        "gc is idempotent"
    );
}

// Over 60 lines: one interleaving of a writer and GC, told in the order it happens.
#[test]
fn backup_begun_before_gc_commits_complete_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(dir.path());
    let d1 = vm_like(31, 32 * CS);
    let m1 = backup(&repo, &[("vda", &d1)], None, None, 1).unwrap();
    // An aborted writer leaves chunks no manifest references.
    let orphan = noise(99, 4 * CS);
    {
        let spec = BackupSpec {
            vm: vm(),
            disks: vec![DiskSpec {
                full_read: None,
                target: "vda".into(),
                size: orphan.len() as u64,
                checkpoint: None,
            }],
            parent: None,
            started: 2,
        };
        let w = repo.begin_backup(spec).unwrap();
        w.put_chunks(0, 0, &orphan).unwrap();
        drop(w);
        repo.gc(GcOptions {
            dry_run: true,
            ..Default::default()
        })
        .unwrap();
    }
    // The backup starts, keeping the parent's chunks and reusing chunks of the orphan...
    let mut d2 = d1.clone();
    d2[..4 * CS].copy_from_slice(&orphan);
    let spec = BackupSpec {
        vm: vm(),
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size: d2.len() as u64,
            checkpoint: None,
        }],
        parent: Some(m1.id.clone()),
        started: 3,
    };
    let w = repo.begin_backup(spec).unwrap();
    w.put_chunks(0, 0, &d2[..4 * CS]).unwrap();
    // ...then its parent is pruned and GC is asked to run.
    repo.remove_backup(&m1.id).unwrap();
    let e = repo.gc(GcOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked);
    let r2 = repo.clone();
    let gc = std::thread::spawn(move || {
        r2.gc(GcOptions {
            wait: true,
            ..Default::default()
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!gc.is_finished(), "gc must wait for the running backup");
    w.keep_parent(0, 4..32).unwrap();
    let m2 = w
        .commit(commit_info(catalog::BackupMode::Incremental))
        .unwrap();
    let rep = gc.join().unwrap().unwrap();
    assert!(rep.live_blobs > 0, "{rep:?}");
    assert_eq!(read_all(&repo, &m2, "vda").unwrap(), d2);
    assert!(repo.verify(VerifyMode::Full, None).unwrap().is_ok());
}

#[test]
fn protected_backups_survive_prune() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let d = vm_like(3, 4 * CS);
    let a = backup(&repo, &[("vda", &d)], None, None, 10).unwrap();
    let _b2 = backup(&repo, &[("vda", &d)], None, None, 20).unwrap();
    repo.set_protected(&a.id, true).unwrap();
    let rep = repo
        .prune(
            None,
            &RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert!(rep.removed.is_empty(), "{rep:?}");
}

/// Regression (07003fa): packs are named by the blake3 of their bytes, so repacking a pack
/// whose blobs are all live writes the very same pack again, under the same id. GC then
/// deleted "the old pack", which was the new one, and the live blobs were gone. Two ways
/// in: a one-blob pack whose header and trailer were once counted as dead (~45 % of a
/// 268-byte pack, over the kill -9 writer's threshold of 0.3), and a threshold of 0, which
/// repacks every pack.
#[test]
fn gc_repack_that_rewrites_an_identical_pack_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(dir.path());
    // Tiny, compressible packs: one chunk of text and an index block of mostly zero ids.
    let mut d1 = vec![0u8; 16 * CS];
    d1[..CS].fill(b'a');
    let m1 = backup(&repo, &[("vda", &d1)], None, None, 1).unwrap();
    // The incremental stores no new chunk (a duplicate): its pack holds one index block.
    let mut d2 = d1.clone();
    d2[3 * CS..4 * CS].fill(b'a');
    let m2 = backup(&repo, &[("vda", &d2)], Some(&m1), Some(&[3]), 2).unwrap();
    let packs_before = repo.stored_packs().unwrap();
    let check = |what: &str| {
        let v = repo.verify(VerifyMode::Full, None).unwrap();
        assert!(v.is_ok(), "{what}: {v:?}");
        assert_eq!(read_all(&repo, &m1, "vda").unwrap(), d1, "{what}");
        assert_eq!(read_all(&repo, &m2, "vda").unwrap(), d2, "{what}");
    };
    let gc = repo
        .gc(GcOptions {
            repack_threshold: 0.3,
            ..Default::default()
        })
        .unwrap();
    check("after gc at threshold 0.3");
    assert_eq!((gc.packs_deleted, gc.packs_repacked), (0, 0), "{gc:?}");
    let all = repo
        .gc(GcOptions {
            repack_threshold: 0.0,
            ..Default::default()
        })
        .unwrap();
    check("after repacking every pack");
    assert_eq!(all.packs_repacked, packs_before.len() as u64, "{all:?}");
    assert_eq!(
        repo.stored_packs().unwrap(),
        packs_before,
        "an all-live pack rewrites byte for byte, under the same id"
    );
    // The catalog rebuilt from storage alone agrees.
    repo.rebuild_catalog().unwrap();
    check("after rebuild-catalog");
}

/// A held backup (a running instant recovery reads it): prune keeps it with reason
/// `in-use`, removing it is refused naming the hold, and after the backups it shares chunks
/// with are pruned and GC repacks everything, it still reads back exactly and verifies.
/// Once the hold is dropped it is an ordinary backup again.
#[test]
fn a_held_backup_survives_prune_removal_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let d1 = noise(7, 12 * CS);
    let m1 = backup(&repo, &[("vda", &d1)], None, None, 1).unwrap();
    let mut d2 = d1.clone();
    d2[2 * CS..4 * CS].copy_from_slice(&noise(8, 2 * CS));
    let m2 = backup(&repo, &[("vda", &d2)], Some(&m1), Some(&[2, 3]), 2).unwrap();
    let mut d3 = d2.clone();
    d3[..CS].copy_from_slice(&noise(9, CS));
    let m3 = backup(&repo, &[("vda", &d3)], Some(&m2), Some(&[0]), 3).unwrap();
    let hold = repo.hold(&m2.id, "instant recovery job 7").unwrap();
    assert_eq!(
        repo.held(),
        vec![(m2.id.clone(), "instant recovery job 7".to_string())]
    );

    let keep_last_1 = RetentionPolicy {
        keep_last: 1,
        ..Default::default()
    };
    let rep = repo.prune(None, &keep_last_1, false).unwrap();
    assert_eq!(rep.removed, vec![m1.id.clone()]);
    let held = rep.decisions.iter().find(|d| d.id == m2.id).unwrap();
    assert!(held.keep && held.reasons == ["in-use"], "{held:?}");
    let err = repo.remove_backup(&m2.id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("instant recovery job 7"), "{err}");
    repo.remove_backup(&m3.id).unwrap();
    let gc = repo
        .gc(GcOptions {
            repack_threshold: 0.0,
            ..GcOptions::default()
        })
        .unwrap();
    assert!(gc.packs_deleted + gc.packs_repacked > 0, "{gc:?}");
    assert_eq!(read_all(&repo, &m2, "vda").unwrap(), d2);
    assert!(repo.verify(VerifyMode::Full, None).unwrap().is_ok());

    drop(hold);
    assert!(repo.held().is_empty());
    let rep = repo.prune(None, &keep_last_1, true).unwrap();
    assert!(rep.decisions.iter().all(|d| d.keep), "the last one left");
    repo.remove_backup(&m2.id).unwrap();
    assert_eq!(
        repo.hold(&m2.id, "late").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn holds_of_one_backup_count_and_name_each_holder() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let m = backup(&repo, &[("vda", &noise(3, 2 * CS))], None, None, 1).unwrap();
    let one = repo.hold(&m.id, "job 1").unwrap();
    let two = repo.hold(&m.id, "job 2").unwrap();
    assert_eq!(repo.held()[0].1, "job 1, job 2");
    drop(one);
    assert_eq!(repo.held()[0].1, "job 2");
    assert!(repo.remove_backup(&m.id).is_err());
    drop(two);
    assert!(repo.held().is_empty());
    repo.remove_backup(&m.id).unwrap();
}
