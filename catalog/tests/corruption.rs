//! One corrupted or missing stored chunk is named by verify (with every backup it affects)
//! and makes a restore read of that range fail; never wrong data.

mod common;

use catalog::{ErrorKind, ProblemKind, VerifyMode};
use common::*;

const CS: usize = 64 << 10;

#[test]
fn flipped_byte_in_a_pack_is_caught_by_verify_and_by_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(dir.path());
    let mut d = vm_like(21, 24 * CS);
    d[7 * CS..8 * CS].copy_from_slice(&noise(77, CS));
    let full = backup(&repo, &[("vda", &d)], None, None, 100).unwrap();
    let mut d2 = d.clone();
    d2[CS..CS + 10].fill(0xAB);
    let inc = backup(&repo, &[("vda", &d2)], Some(&full), Some(&[1]), 200).unwrap();
    assert!(repo.verify(VerifyMode::Full, None).unwrap().is_ok());

    let victim = repo.open_disk(&full.id, "vda").unwrap().digest(7).unwrap();
    let loc = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
    let path = dir.path().join("repo").join(loc.pack.key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + 80 + 100] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    // Before verify, a read of the damaged chunk fails its check.
    for m in [&full, &inc] {
        let r = repo.open_disk(&m.id, "vda").unwrap();
        let mut buf = vec![0u8; 100];
        let e = r.read_at(7 * CS as u64 + 50, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&victim.to_hex()) && msg.contains(m.id.as_str()),
            "{msg}"
        );
    }

    let rep = repo.verify(VerifyMode::Full, None).unwrap();
    assert_eq!(rep.problems.len(), 1, "{rep:?}");
    let p = &rep.problems[0];
    assert_eq!((p.digest, p.kind), (Some(victim), ProblemKind::Corrupt));
    let mut affected: Vec<_> = p
        .affected
        .iter()
        .map(|a| (a.backup.clone(), a.disk.as_str(), a.offset))
        .collect();
    affected.sort();
    let mut want = vec![
        (full.id.clone(), "vda", 7 * CS as u64),
        (inc.id.clone(), "vda", 7 * CS as u64),
    ];
    want.sort();
    assert_eq!(affected, want);
    assert_eq!(rep.affected_backups().len(), 2);

    // Verify forgot the bad copy: a read names the chunk, the backup and what to do.
    for m in [&full, &inc] {
        let r = repo.open_disk(&m.id, "vda").unwrap();
        let mut buf = vec![0u8; 100];
        let e = r.read_at(7 * CS as u64 + 50, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&victim.to_hex())
                && msg.contains(m.id.as_str())
                && msg.contains("back the vm up again"),
            "{msg}"
        );
        let mut ok = vec![0u8; CS];
        r.read_at(6 * CS as u64, &mut ok).unwrap();
        assert_eq!(ok, d[6 * CS..7 * CS]);
    }
}

#[test]
fn deleted_pack_is_caught_by_quick_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(dir.path());
    let d = vm_like(22, 24 * CS);
    let full = backup(&repo, &[("vda", &d)], None, None, 100).unwrap();
    let victim = repo.open_disk(&full.id, "vda").unwrap().digest(5).unwrap();
    let loc = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
    std::fs::remove_file(b.root().join(loc.pack.key())).unwrap();
    let rep = repo.verify(VerifyMode::Quick, None).unwrap();
    assert!(!rep.is_ok());
    assert!(rep.problems.iter().all(|p| p.kind == ProblemKind::Missing));
    assert!(rep.affected_backups().contains(&full.id));
    let r = repo.open_disk(&full.id, "vda");
    let err = match r {
        Err(e) => e,
        Ok(r) => {
            let mut buf = vec![0u8; 10];
            r.read_at(5 * CS as u64, &mut buf).unwrap_err()
        }
    };
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[test]
fn damaged_manifest_is_reported_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(dir.path());
    let d = vm_like(23, 4 * CS);
    let full = backup(&repo, &[("vda", &d)], None, None, 100).unwrap();
    let path = b.root().join(format!("manifests/{}", full.id));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let rep = repo.verify(VerifyMode::Quick, None).unwrap();
    assert_eq!(rep.problems.len(), 1);
    assert!(rep.affected_backups().contains(&full.id));
    assert_eq!(
        repo.open_disk(&full.id, "vda").unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        repo.gc(Default::default()).unwrap_err().kind(),
        ErrorKind::Corrupt,
        "gc must stop"
    );
}

#[test]
fn sampled_verify_rehashes_a_share() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let d: Vec<u8> = noise(5, 64 * CS);
    backup(&repo, &[("vda", &d)], None, None, 1).unwrap();
    let all = repo.verify(VerifyMode::Full, None).unwrap();
    let some = repo.verify(VerifyMode::Sample(25), None).unwrap();
    let none = repo.verify(VerifyMode::Quick, None).unwrap();
    assert_eq!(all.chunks_rehashed, 64);
    assert!(
        some.chunks_rehashed > 4 && some.chunks_rehashed < 40,
        "{some:?}"
    );
    assert_eq!(none.chunks_rehashed, 0);
}

/// Verify forgets a corrupt chunk's stored copy; the next backup that reads the same content
/// stores it again, and every backup that references it (the damaged one too) reads back
/// exactly: verify is clean again.
#[test]
fn the_next_backup_of_the_same_content_repairs_a_corrupt_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(dir.path());
    let mut d = vm_like(31, 16 * CS);
    d[5 * CS..6 * CS].copy_from_slice(&noise(78, CS));
    let first = backup(&repo, &[("vda", &d)], None, None, 100).unwrap();
    let victim = repo.open_disk(&first.id, "vda").unwrap().digest(5).unwrap();
    let loc = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
    let path = dir.path().join("repo").join(loc.pack.key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + 80 + 100] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let rep = repo.verify(VerifyMode::Full, None).unwrap();
    assert_eq!(rep.problems.len(), 1, "{rep:?}");
    assert_eq!(rep.forgotten, 1, "the bad copy is forgotten: {rep:?}");
    assert!(repo.with_catalog(|c| c.lookup(&victim)).unwrap().is_none());

    let second = backup(&repo, &[("vda", &d)], None, None, 200).unwrap();
    let new = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
    assert_ne!(
        (new.pack, new.offset),
        (loc.pack, loc.offset),
        "stored again"
    );
    let rep = repo.verify(VerifyMode::Full, None).unwrap();
    assert!(
        rep.is_ok() && rep.forgotten == 0,
        "verify is clean again: {rep:?}"
    );
    for m in [&first, &second] {
        assert_eq!(read_all(&repo, m, "vda").unwrap(), d, "backup {}", m.id);
    }
}
