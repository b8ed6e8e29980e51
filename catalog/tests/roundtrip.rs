//! Backups written through the writer read back byte for byte; incrementals store only
//! what changed; the catalog rebuilds from the repository alone.

mod common;

use catalog::{BackupSpec, Catalog, ChunkDigest, DiskSpec, ErrorKind, RepoConfig, Repository};
use common::*;
use std::sync::Arc;

const CS: usize = 64 << 10;

#[test]
fn full_and_incremental_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(dir.path());
    let mut a = vm_like(1, 40 * CS + 1000); // short last chunk
    let b = vm_like(2, 8 * CS);
    let full = backup(
        &repo,
        &[("vda", &a), ("vdb", &b)],
        None,
        None,
        1_700_000_000,
    )
    .unwrap();
    assert_eq!(read_all(&repo, &full, "vda").unwrap(), a);
    assert_eq!(read_all(&repo, &full, "vdb").unwrap(), b);
    assert!(
        full.stats.chunks_zero > 0,
        "zero chunks are counted: {:?}",
        full.stats
    );

    let old = a.clone();
    a[5 * CS + 17..5 * CS + 4113].copy_from_slice(&noise(9, 4096));
    a[40 * CS..].fill(7);
    let inc = backup(
        &repo,
        &[("vda", &a), ("vdb", &b)],
        Some(&full),
        Some(&[5, 40]),
        1_700_000_500,
    )
    .unwrap();
    assert_eq!(inc.stats.chunks_new, 2);
    assert_eq!(read_all(&repo, &inc, "vda").unwrap(), a);
    assert_eq!(
        read_all(&repo, &inc, "vdb").unwrap(),
        b,
        "untouched disk kept whole"
    );
    assert_eq!(
        read_all(&repo, &full, "vda").unwrap(),
        old,
        "parent unchanged"
    );
    // Only the two index blocks covering chunks 5 and 40 were rewritten (16 ids per block).
    let (fa, ia) = (&full.disks[0].index_blocks, &inc.disks[0].index_blocks);
    let changed: Vec<usize> = (0..fa.len()).filter(|&i| fa[i] != ia[i]).collect();
    assert_eq!(changed, vec![0, 2]);
    assert_eq!(full.disks[1].index_blocks, inc.disks[1].index_blocks);
}

#[test]
fn ranged_reads_digests_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let mut data = vec![0u8; 6 * CS];
    data[CS..2 * CS].copy_from_slice(&noise(3, CS));
    data[4 * CS + 10] = 1;
    let m = backup(&repo, &[("vda", &data)], None, None, 1).unwrap();
    let r = repo.open_disk(&m.id, "vda").unwrap();
    assert_eq!(r.chunk_count(), 6);
    assert!(r.is_zero(0).unwrap() && !r.is_zero(1).unwrap() && r.is_zero(2).unwrap());
    assert_eq!(r.digest(1).unwrap(), ChunkDigest::of(&data[CS..2 * CS]));
    for (off, len) in [
        (0, 10),
        (CS as u64 - 5, 20),
        (4 * CS as u64 + 5, 7),
        (0, 6 * CS),
    ] {
        let mut buf = vec![9u8; len];
        r.read_at(off, &mut buf).unwrap();
        assert_eq!(buf, data[off as usize..off as usize + len]);
    }
    let mut buf = vec![0u8; 2];
    assert_eq!(
        r.read_at(6 * CS as u64 - 1, &mut buf).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(r.digest(6).unwrap_err().kind(), ErrorKind::InvalidInput);
}

#[test]
fn second_ingest_of_same_data_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let data = vm_like(5, 32 * CS);
    let a = backup(&repo, &[("vda", &data)], None, None, 1).unwrap();
    assert!(a.stats.chunks_new > 0);
    let b = backup(&repo, &[("vda", &data)], None, None, 2).unwrap();
    assert_eq!(b.stats.chunks_new, 0, "{:?}", b.stats);
    assert_eq!(b.stats.bytes_stored, 0);
    assert_eq!(read_all(&repo, &b, "vda").unwrap(), data);
}

#[test]
fn bad_writer_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let spec = |size| BackupSpec {
        vm: vm(),
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size,
            checkpoint: None,
        }],
        parent: None,
        started: 1,
    };
    assert_eq!(
        repo.begin_backup(spec(0)).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let w = repo.begin_backup(spec(2 * CS as u64)).unwrap();
    assert_eq!(
        w.put_chunk(0, 2, &vec![1; CS]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        w.put_chunk(0, 0, &[1; 10]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        w.put_chunk(1, 0, &vec![1; CS]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        w.keep_parent(0, 0..1).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let mut bad_parent = spec(CS as u64);
    bad_parent.parent = Some(catalog::BackupId::parse("nope").unwrap());
    assert_eq!(
        repo.begin_backup(bad_parent).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn dropped_writer_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let data = vm_like(7, 40 * CS);
    {
        let w = repo
            .begin_backup(BackupSpec {
                vm: vm(),
                disks: vec![DiskSpec {
                    full_read: None,
                    target: "vda".into(),
                    size: data.len() as u64,
                    checkpoint: None,
                }],
                parent: None,
                started: 1,
            })
            .unwrap();
        w.put_chunks(0, 0, &data).unwrap();
    }
    assert!(repo.backups(None).unwrap().is_empty());
    assert!(repo.manifest_ids().unwrap().is_empty());
    assert!(repo
        .verify(catalog::VerifyMode::Full, None)
        .unwrap()
        .is_ok());
}

#[test]
fn grown_disk_and_zero_puts() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = mem_repo(dir.path());
    let a = vm_like(4, 20 * CS);
    let full = backup(&repo, &[("vda", &a)], None, None, 1).unwrap();
    let mut bigger = a.clone();
    bigger.extend_from_slice(&vm_like(8, 20 * CS));
    let inc = backup(
        &repo,
        &[("vda", &bigger)],
        Some(&full),
        Some(&(20..40).collect::<Vec<_>>()),
        2,
    )
    .unwrap();
    assert_eq!(read_all(&repo, &inc, "vda").unwrap(), bigger);
    let spec = BackupSpec {
        vm: vm(),
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size: bigger.len() as u64,
            checkpoint: None,
        }],
        parent: Some(inc.id.clone()),
        started: 3,
    };
    let w = repo.begin_backup(spec).unwrap();
    w.put_zeros(0, 0..5).unwrap();
    w.keep_parent(0, 5..40).unwrap();
    let m = w
        .commit(commit_info(catalog::BackupMode::Incremental))
        .unwrap();
    let mut want = bigger.clone();
    want[..5 * CS].fill(0);
    assert_eq!(read_all(&repo, &m, "vda").unwrap(), want);
}

#[test]
fn catalog_rebuilds_from_repository_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(dir.path());
    let d = vm_like(11, 30 * CS);
    let m1 = backup(&repo, &[("vda", &d)], None, None, 10).unwrap();
    let m2 = backup(&repo, &[("vda", &d)], Some(&m1), Some(&[3]), 20).unwrap();
    repo.set_protected(&m1.id, true).unwrap();
    let before = repo.backups(None).unwrap();
    let chunks = repo.with_catalog(|c| c.chunk_count()).unwrap();
    drop(repo);
    std::fs::remove_file(dir.path().join("catalog.sqlite")).unwrap();
    let repo = Repository::open(Arc::new(b), opts(dir.path())).unwrap();
    assert_eq!(
        repo.backups(None).unwrap(),
        before,
        "open reconciles an empty catalog"
    );
    let rep = repo.rebuild_catalog().unwrap();
    assert_eq!(rep.backups, 2);
    assert_eq!(repo.backups(None).unwrap(), before);
    assert!(repo.backups(None).unwrap()[0].protected);
    assert_eq!(repo.with_catalog(|c| c.chunk_count()).unwrap(), chunks);
    assert_eq!(read_all(&repo, &m2, "vda").unwrap(), d);
    // The next backup finds its base checkpoint in the newest backup's manifest.
    let cps: Vec<Option<String>> = repo
        .backups(None)
        .unwrap()
        .iter()
        .map(|r| repo.manifest(&r.id).unwrap().disks[0].checkpoint.clone())
        .collect();
    assert_eq!(
        cps,
        [
            m1.disks[0].checkpoint.clone(),
            m2.disks[0].checkpoint.clone()
        ]
    );
    assert!(cps.iter().all(Option::is_some), "{cps:?}");
}

#[test]
fn catalog_migrations_keep_data_and_refuse_newer_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sqlite");
    {
        let c = Catalog::open_at_version(&path, 1).unwrap();
        assert_eq!(c.version().unwrap(), 1);
        c.conn()
            .execute("INSERT INTO vms (uuid, name) VALUES ('u', 'n')", [])
            .unwrap();
    }
    {
        // A catalog of version 2 (checkpoints and jobs tables, with rows).
        let c = Catalog::open_at_version(&path, 2).unwrap();
        assert_eq!(c.version().unwrap(), 2);
        c.conn()
            .execute_batch(
                "INSERT INTO checkpoints VALUES ('u', 'vda', 'cp1', 'b1');
                 INSERT INTO jobs (kind, vm_uuid, state, started) VALUES ('backup', 'u', 'done', 5);",
            )
            .unwrap();
    }
    let c = Catalog::open(&path).unwrap();
    assert_eq!(c.version().unwrap(), catalog::SCHEMA_VERSION);
    assert_eq!(catalog::SCHEMA_VERSION, 3);
    assert_eq!(c.vms().unwrap(), vec![("u".to_string(), "n".to_string())]);
    let tables: Vec<String> = c
        .conn()
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        ["backups", "chunks", "disks", "packs", "vms"],
        "v3 drops checkpoints and jobs"
    );
    drop(c);
    let c = Catalog::open(&path).unwrap();
    assert_eq!(
        c.version().unwrap(),
        catalog::SCHEMA_VERSION,
        "reopening a current catalog"
    );
    c.conn().pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert_eq!(
        Catalog::open(&path).unwrap_err().kind(),
        ErrorKind::Conflict
    );
}

#[test]
fn repository_create_refuses_existing_and_checks_config() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _repo) = mem_repo(dir.path());
    let e = Repository::create(Arc::new(b), small_config(), opts(dir.path())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let bad = RepoConfig {
        chunk_size: 3 << 20,
        ..RepoConfig::default()
    };
    let e = Repository::create(Arc::new(catalog::MemBackend::new()), bad, opts(dir.path()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}
