//! The writer's index blocks and metadata against a whole-index model (what the writer did
//! when it held the parent's whole index): for scattered changes put out of order from
//! several threads, a shrunk and a grown disk, zero runs and puts that keep the parent's
//! chunk, every index block id equals the id of the block cut from the whole chunk-id list,
//! unchanged blocks keep the parent's ids, the metadata bytes are exactly the new distinct
//! index blobs plus the manifest, and every disk reads back byte for byte.
//!
//! With 16 ids per index block (the tests' config) the disks span more index blocks than the
//! writer keeps open at once, so blocks are evicted, spilled and reopened.

mod common;

use catalog::format::blob::{self, BlobKind};
use catalog::format::index;
use catalog::{BackupMode, BackupSpec, ChunkDigest, DiskSpec, Manifest, Repository};
use common::*;
use std::collections::HashSet;
use std::sync::Mutex;

const CS: usize = 64 << 10;

/// One thing to put into disk `disk`.
#[derive(Clone)]
enum Put {
    Chunks(usize, u64, u64),
    Zeros(usize, u64, u64),
}

/// The chunk id of every position of `data` (the zero id for an all-zero chunk).
fn chunk_ids(data: &[u8]) -> Vec<ChunkDigest> {
    data.chunks(CS)
        .map(|c| {
            if c.iter().all(|&b| b == 0) {
                ChunkDigest::ZERO
            } else {
                ChunkDigest::of(c)
            }
        })
        .collect()
}

/// The block ids of `data` as the whole-index writer cut them.
fn model_blocks(data: &[u8], block_len: usize) -> Vec<ChunkDigest> {
    chunk_ids(data)
        .chunks(block_len)
        .map(|b| ChunkDigest::of(&index::encode(b)))
        .collect()
}

/// Blob bytes of the index blocks of `disks` that no earlier manifest lists, each once.
fn model_index_bytes(
    disks: &[(&str, &[u8])],
    earlier: &[&Manifest],
    block_len: usize,
    level: i32,
) -> u64 {
    let mut seen: HashSet<ChunkDigest> = earlier
        .iter()
        .flat_map(|m| m.disks.iter().flat_map(|d| d.index_blocks.clone()))
        .collect();
    let mut bytes = 0;
    for (_, data) in disks {
        for b in chunk_ids(data).chunks(block_len) {
            let payload = index::encode(b);
            let d = ChunkDigest::of(&payload);
            if seen.insert(d) {
                bytes += blob::encode(BlobKind::Index, d, &payload, level)
                    .unwrap()
                    .len() as u64;
            }
        }
    }
    bytes
}

/// Write a backup of `disks` with `puts` shuffled (seed) and spread over three threads.
fn write(
    repo: &Repository,
    disks: &[(&str, &[u8])],
    parent: Option<&Manifest>,
    mut puts: Vec<Put>,
    seed: u64,
    started: i64,
) -> Manifest {
    let mut x = seed | 1;
    for i in (1..puts.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        puts.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let w = repo
        .begin_backup(BackupSpec {
            vm: vm(),
            disks: disks
                .iter()
                .map(|(t, d)| DiskSpec {
                    target: t.to_string(),
                    size: d.len() as u64,
                    checkpoint: None,
                    full_read: None,
                })
                .collect(),
            parent: parent.map(|p| p.id.clone()),
            started,
        })
        .unwrap();
    let queue = Mutex::new(puts);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some(p) = queue.lock().unwrap().pop() else {
                    return;
                };
                match p {
                    Put::Chunks(d, a, b) => {
                        let data = disks[d].1;
                        let end = (b as usize * CS).min(data.len());
                        w.put_chunks(d, a, &data[a as usize * CS..end]).unwrap();
                    }
                    Put::Zeros(d, a, b) => w.put_zeros(d, a..b).unwrap(),
                }
            });
        }
    });
    let mode = if parent.is_some() {
        BackupMode::Incremental
    } else {
        BackupMode::Full
    };
    w.commit(commit_info(mode)).unwrap()
}

/// Check `m` against the model: block ids, reuse of the parent's ids, metadata bytes,
/// content.
fn check(repo: &Repository, m: &Manifest, disks: &[(&str, &[u8])], earlier: &[&Manifest]) {
    let cfg = repo.config();
    let per = cfg.index_block_len as usize;
    for (k, (target, data)) in disks.iter().enumerate() {
        let want = model_blocks(data, per);
        assert_eq!(m.disks[k].index_blocks, want, "index blocks of {target}");
        assert_eq!(&read_all(repo, m, target).unwrap()[..], *data, "{target}");
    }
    let mut bare = m.clone();
    bare.stats.metadata_bytes = 0;
    let manifest_len = bare.encode().unwrap().len() as u64;
    let index_bytes = model_index_bytes(disks, earlier, per, cfg.zstd_level);
    assert_eq!(m.stats.metadata_bytes, index_bytes + manifest_len);
}

fn chunk_puts(disk: usize, chunks: impl IntoIterator<Item = u64>) -> Vec<Put> {
    chunks
        .into_iter()
        .map(|c| Put::Chunks(disk, c, c + 1))
        .collect()
}

// Over 60 lines: one chain of three backups, each step built on the disks of the last.
#[test]
fn incremental_index_blocks_equal_the_whole_index_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(dir.path());
    assert_eq!(repo.config().index_block_len, 16);
    // vda: 44 index blocks (700 chunks and a short one); vdb shrinks; vdc grows.
    let mut a = vm_like(21, 700 * CS + 1000);
    let mut b = vm_like(22, 300 * CS);
    let mut c = vm_like(23, 100 * CS);
    let n = |d: &[u8]| d.len().div_ceil(CS) as u64;
    let mut full = vec![Put::Chunks(0, 0, 300), Put::Chunks(0, 300, n(&a))];
    full.extend(chunk_puts(1, 0..n(&b)));
    full.push(Put::Chunks(2, 0, n(&c)));
    let disks = [("vda", &a[..]), ("vdb", &b[..]), ("vdc", &c[..])];
    let m1 = write(&repo, &disks, None, full, 1, 100);
    check(&repo, &m1, &disks, &[]);

    // Scattered 4 KiB changes: every 7th chunk of vda (every block, none complete).
    let mut puts = Vec::new();
    for ch in (3..n(&a)).step_by(7) {
        let at = ch as usize * CS + 100;
        a[at..at + 4096].copy_from_slice(&noise(ch, 4096));
        puts.push(Put::Chunks(0, ch, ch + 1));
    }
    // Puts that keep the parent's chunk, a whole block of them, and a zero run.
    puts.extend(chunk_puts(0, [1, 2, 5]));
    puts.push(Put::Chunks(0, 160, 176));
    a[400 * CS..437 * CS].fill(0);
    puts.push(Put::Zeros(0, 400, 437));
    // vdb shrinks to 250 chunks and a half (its short last chunk is put), changes in two
    // blocks.
    b.truncate(250 * CS + CS / 2);
    for ch in [17u64, 18, 200] {
        b[ch as usize * CS..(ch as usize + 1) * CS].copy_from_slice(&noise(ch + 1000, CS));
        puts.push(Put::Chunks(1, ch, ch + 1));
    }
    puts.push(Put::Chunks(1, 250, 251));
    // vdc grows to 180 chunks: a change in the old part, data in the new part, and a zero
    // block left unwritten past the old end.
    c.resize(180 * CS, 0);
    c[5 * CS..6 * CS].copy_from_slice(&noise(77, CS));
    c[130 * CS..140 * CS].copy_from_slice(&vm_like(78, 10 * CS));
    puts.extend(chunk_puts(2, [5]));
    puts.push(Put::Chunks(2, 130, 140));
    let disks = [("vda", &a[..]), ("vdb", &b[..]), ("vdc", &c[..])];
    let m2 = write(&repo, &disks, Some(&m1), puts, 2, 200);
    check(&repo, &m2, &disks, &[&m1]);
    let (p, q) = (&m1.disks[0].index_blocks, &m2.disks[0].index_blocks);
    let kept = (0..p.len()).filter(|&i| p[i] == q[i]).count();
    assert_eq!(kept, 0, "every block of vda has a changed chunk");

    // A full re-read of vdb onto m2 and only a zero run of vda: blocks of vdb keep m2's ids
    // and nothing but vda's three changed blocks is written.
    a[16 * CS..20 * CS].fill(0);
    let mut puts = chunk_puts(1, 0..n(&b));
    puts.push(Put::Zeros(0, 16, 20));
    let disks = [("vda", &a[..]), ("vdb", &b[..]), ("vdc", &c[..])];
    let m3 = write(&repo, &disks, Some(&m2), puts, 3, 300);
    check(&repo, &m3, &disks, &[&m1, &m2]);
    assert_eq!(m3.disks[1].index_blocks, m2.disks[1].index_blocks);
    assert_eq!(m3.disks[2].index_blocks, m2.disks[2].index_blocks);
    let changed: Vec<usize> = (0..m3.disks[0].index_blocks.len())
        .filter(|&i| m3.disks[0].index_blocks[i] != m2.disks[0].index_blocks[i])
        .collect();
    assert_eq!(changed, vec![1]);
    assert!(repo
        .verify(catalog::VerifyMode::Full, None)
        .unwrap()
        .is_ok());
}
