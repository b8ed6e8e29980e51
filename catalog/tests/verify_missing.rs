//! A chunk that no pack holds, a pack deleted from under the repository, and a pack whose
//! trailer is damaged: verify (full and quick) names every affected backup, a restore read
//! of the range is an error (never zeros), and rebuild-catalog reports a bad trailer instead
//! of panicking.

mod common;

use catalog::format::pack::PackBuilder;
use catalog::{
    Backend, ChunkDigest, ErrorKind, FsBackend, Manifest, ProblemKind, Repository, VerifyMode,
};
use common::*;
use std::sync::Arc;

const CS: usize = 64 << 10;

/// A full backup of random chunks and an incremental that changes chunk 1 only, so every
/// other chunk is shared by both.
fn two_backups(dir: &std::path::Path) -> (FsBackend, Repository, Vec<u8>, Manifest, Manifest) {
    let (b, repo) = fs_repo(dir);
    let d = noise(41, 24 * CS);
    let full = backup(&repo, &[("vda", &d)], None, None, 100).unwrap();
    let mut d2 = d.clone();
    d2[CS..CS + 10].fill(0xAB);
    let inc = backup(&repo, &[("vda", &d2)], Some(&full), Some(&[1]), 200).unwrap();
    assert!(repo.verify(VerifyMode::Full, None).unwrap().is_ok());
    (b, repo, d, full, inc)
}

/// Rewrite the pack holding `victim` without it and drop the old pack: no pack holds the
/// chunk any more, and after a reopen the catalog has no location for it.
fn drop_blob(b: &FsBackend, repo: &Repository, victim: &ChunkDigest) {
    let loc = repo.with_catalog(|c| c.lookup(victim)).unwrap().unwrap();
    let mut pb = PackBuilder::new();
    for e in repo.pack_entries(loc.pack).unwrap() {
        if e.digest != *victim {
            let bytes = b
                .get_range(&loc.pack.key(), e.offset, e.length as usize)
                .unwrap();
            pb.add(e.digest, e.kind, &bytes);
        }
    }
    if !pb.is_empty() {
        let (id, bytes, _) = pb.finish();
        b.put(&id.key(), &bytes).unwrap();
    }
    b.delete(&loc.pack.key()).unwrap();
}

fn reopen(b: &FsBackend, dir: &std::path::Path) -> Repository {
    Repository::open(Arc::new(b.clone()), opts(dir)).unwrap()
}

/// Every (backup, disk, offset) a problem about `victim` names, sorted.
fn affected_of(rep: &catalog::VerifyReport, victim: &ChunkDigest) -> Vec<(String, String, u64)> {
    let p = rep
        .problems
        .iter()
        .find(|p| p.digest == Some(*victim))
        .unwrap_or_else(|| panic!("no problem names {victim}: {rep:?}"));
    assert_eq!(p.kind, ProblemKind::Missing, "{p:?}");
    let mut v: Vec<_> = p
        .affected
        .iter()
        .map(|a| (a.backup.to_string(), a.disk.clone(), a.offset))
        .collect();
    v.sort();
    v
}

fn assert_read_fails(repo: &Repository, m: &Manifest, offset: u64, kind: ErrorKind) {
    let r = repo.open_disk(&m.id, "vda").unwrap();
    let mut buf = vec![0x55u8; 100];
    let e = r.read_at(offset + 7, &mut buf).unwrap_err();
    assert_eq!(e.kind(), kind, "{e:#}");
    assert!(format!("{e:#}").contains(m.id.as_str()), "{e:#}");
    let mut batch = vec![0x55u8; 4 * CS];
    let start = offset - offset % CS as u64;
    let e = r.read_at(start.saturating_sub(CS as u64), &mut batch);
    assert_eq!(e.unwrap_err().kind(), kind, "a multi-chunk read too");
}

#[test]
fn chunk_in_no_pack_is_missing_for_every_backup_in_full_and_quick_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo, d, full, inc) = two_backups(dir.path());
    let victim = repo.open_disk(&full.id, "vda").unwrap().digest(9).unwrap();
    drop(repo);
    drop_blob(&b, &reopen(&b, dir.path()), &victim);
    let repo = reopen(&b, dir.path());
    assert!(repo.with_catalog(|c| c.lookup(&victim)).unwrap().is_none());

    let want = {
        let mut w = vec![
            (full.id.to_string(), "vda".to_string(), 9 * CS as u64),
            (inc.id.to_string(), "vda".to_string(), 9 * CS as u64),
        ];
        w.sort();
        w
    };
    for mode in [VerifyMode::Quick, VerifyMode::Full, VerifyMode::Sample(50)] {
        let rep = repo.verify(mode, None).unwrap();
        assert_eq!(rep.problems.len(), 1, "{mode:?}: {rep:?}");
        assert_eq!(affected_of(&rep, &victim), want, "{mode:?}");
        assert_eq!(rep.affected_backups().len(), 2);
    }
    for m in [&full, &inc] {
        assert_read_fails(&repo, m, 9 * CS as u64, ErrorKind::NotFound);
        let r = repo.open_disk(&m.id, "vda").unwrap();
        let mut ok = vec![0u8; CS];
        r.read_at(10 * CS as u64, &mut ok).unwrap();
        assert_eq!(ok, d[10 * CS..11 * CS], "neighbours still read");
    }
    // Rebuilding the catalog from the packs cannot conjure the chunk back.
    repo.rebuild_catalog().unwrap();
    let rep = repo.verify(VerifyMode::Quick, None).unwrap();
    assert_eq!(affected_of(&rep, &victim), want);
}

#[test]
fn pack_deleted_under_an_open_repository_is_missing_for_every_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo, _d, full, inc) = two_backups(dir.path());
    let victim = repo.open_disk(&full.id, "vda").unwrap().digest(4).unwrap();
    let loc = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
    let lost: Vec<ChunkDigest> = repo
        .pack_entries(loc.pack)
        .unwrap()
        .into_iter()
        .map(|e| e.digest)
        .collect();
    std::fs::remove_file(b.root().join(loc.pack.key())).unwrap();
    // The catalog still locates the chunks in the vanished pack (no reopen).
    for mode in [VerifyMode::Quick, VerifyMode::Full] {
        let rep = repo.verify(mode, None).unwrap();
        assert!(rep.problems.iter().all(|p| p.kind == ProblemKind::Missing));
        assert!(rep
            .problems
            .iter()
            .all(|p| lost.contains(&p.digest.unwrap())));
        assert_eq!(affected_of(&rep, &victim).len(), 2, "{mode:?}");
        assert_eq!(rep.affected_backups().len(), 2);
    }
    for m in [&full, &inc] {
        let r = repo.open_disk(&m.id, "vda");
        match r {
            Ok(_) => assert_read_fails(&repo, m, 4 * CS as u64, ErrorKind::NotFound),
            Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{e:#}"),
        }
    }
}

type Damage = fn(&mut Vec<u8>);

/// Damage the trailer of the pack holding chunk 3 in several ways: rebuild-catalog reports
/// the pack as skipped, never panics, and verify then calls its chunks missing.
#[test]
fn damaged_pack_trailer_is_reported_by_rebuild_catalog() {
    let damages: [(&str, Damage); 5] = [
        ("end magic", |p| {
            let n = p.len();
            p[n - 1] ^= 0xFF;
        }),
        ("footer checksum", |p| {
            let n = p.len();
            p[n - 20] ^= 0x01;
        }),
        ("entry table", |p| {
            let n = p.len();
            p[n - 56 - 10] ^= 0x01;
        }),
        ("huge count", |p| {
            let n = p.len();
            p[n - 56..n - 48].copy_from_slice(&u64::MAX.to_le_bytes());
        }),
        ("truncated", |p| {
            let n = p.len();
            p.truncate(n - 30);
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let (b, repo, _d, full, _inc) = two_backups(dir.path());
        let victim = repo.open_disk(&full.id, "vda").unwrap().digest(3).unwrap();
        let loc = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
        let path = b.root().join(loc.pack.key());
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, bytes).unwrap();

        let r = repo.rebuild_catalog().unwrap();
        assert!(
            r.skipped.iter().any(|s| s.contains(&loc.pack.to_string())),
            "{what}: {r:?}"
        );
        assert!(repo.with_catalog(|c| c.lookup(&victim)).unwrap().is_none());
        let rep = repo.verify(VerifyMode::Quick, None).unwrap();
        assert_eq!(affected_of(&rep, &victim).len(), 2, "{what}");
        assert_read_fails(&repo, &full, 3 * CS as u64, ErrorKind::NotFound);
        // A reopen (reconcile) also survives the pack.
        drop(repo);
        reopen(&b, dir.path());
    }
}
