//! The disk reader: index blocks loaded on demand (a damaged block fails only the reads it
//! covers), batched range reads across batch and chunk boundaries, a short last chunk, zero
//! chunks, on the default (`pread`) path. (`SLUICE_IO_URING=on cargo test -p catalog` runs
//! the same through io_uring: `common::fs_repo` passes it on as `FsOptions::io_uring`.)

mod common;

use catalog::{ErrorKind, Manifest, Repository};
use common::*;

const CS: usize = 64 << 10;

/// 100 chunks and a half (so several index blocks of 16 and batches of 32), with zero runs.
fn disk() -> Vec<u8> {
    let mut d = noise(9, 100 * CS + CS / 2);
    d[10 * CS..14 * CS].fill(0);
    d[40 * CS..75 * CS].fill(0);
    d
}

fn setup(dir: &std::path::Path) -> (catalog::FsBackend, Repository, Vec<u8>, Manifest) {
    let (b, repo) = fs_repo(dir);
    let d = disk();
    let m = backup(&repo, &[("vda", &d)], None, None, 100).unwrap();
    (b, repo, d, m)
}

#[test]
fn range_reads_cross_batches_chunks_and_the_short_last_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo, d, m) = setup(dir.path());
    let r = repo.open_disk(&m.id, "vda").unwrap();
    assert_eq!(r.chunk_count(), 101);
    assert_eq!(r.index_blocks(), 7);
    for (off, len) in [
        (0, d.len()),
        (7, 33 * CS + 11),
        (31 * CS - 5, 2 * CS + 10),
        (d.len() - CS, CS),
        (d.len() - 3, 3),
        (12 * CS + 100, 50),
        (5, 0),
    ] {
        let mut buf = vec![0xEEu8; len];
        r.read_at(off as u64, &mut buf).unwrap();
        assert!(buf == d[off..off + len], "read of {len} at {off}");
    }
    let chunks = r.read_chunks(30, 71).unwrap();
    assert_eq!(chunks.len(), 71);
    for (k, c) in chunks.iter().enumerate() {
        let s = (30 + k) * CS;
        assert!(c[..] == d[s..(s + CS).min(d.len())], "chunk {}", 30 + k);
    }
    assert_eq!(chunks[70].len(), CS / 2);
    assert!(r.is_zero(50).unwrap() && !r.is_zero(80).unwrap());
    assert_eq!(r.digests().unwrap().len(), 101);
    let mut past = vec![0u8; 2];
    let e = r.read_at(d.len() as u64 - 1, &mut past).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        r.read_chunks(100, 2).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn damaged_index_block_fails_only_the_reads_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo, d, m) = setup(dir.path());
    // Index block 2 covers chunks 32..48.
    let victim = m.disks[0].index_blocks[2];
    let loc = repo.with_catalog(|c| c.lookup(&victim)).unwrap().unwrap();
    let path = b.root().join(loc.pack.key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + loc.length as usize - 1] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    let r = repo.open_disk(&m.id, "vda").unwrap();
    let mut buf = vec![0u8; CS];
    let e = r.read_at(33 * CS as u64, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("index block 2") && msg.contains(m.id.as_str()),
        "{msg}"
    );
    assert_eq!(r.digest(40).unwrap_err().kind(), ErrorKind::Corrupt);
    let mut big = vec![0u8; 40 * CS];
    assert!(
        r.read_at(0, &mut big).is_err(),
        "a range over the block fails"
    );
    for (off, len) in [(0, 32 * CS), (48 * CS, 20 * CS)] {
        let mut ok = vec![0u8; len];
        r.read_at(off as u64, &mut ok).unwrap();
        assert!(
            ok == d[off..off + len],
            "read at {off} outside the damaged block"
        );
    }
}

#[test]
fn differences_match_a_comparison_of_whole_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let (_b, repo, d, full) = setup(dir.path());
    let mut d2 = d.clone();
    for c in [3usize, 50, 100] {
        d2[c * CS] ^= 0x5A;
    }
    let inc = backup(
        &repo,
        &[("vda", &d2)],
        Some(&full),
        Some(&[3, 50, 100]),
        200,
    )
    .unwrap();
    let bigger = [d2.clone(), noise(3, 20 * CS)].concat();
    let grown = backup(&repo, &[("vda", &bigger)], None, None, 300).unwrap();
    let open = |m: &Manifest| repo.open_disk(&m.id, "vda").unwrap();
    for (new, old) in [
        (&inc, &full),
        (&full, &inc),
        (&grown, &inc),
        (&inc, &grown),
        (&inc, &inc),
    ] {
        let (n, o) = (open(new), open(old));
        let mut got = Vec::new();
        n.for_each_difference(&o, |i| got.push(i)).unwrap();
        let (a, b) = (n.digests().unwrap(), o.digests().unwrap());
        let want: Vec<u64> = (0..a.len())
            .filter(|&i| b.get(i) != Some(&a[i]))
            .map(|i| i as u64)
            .collect();
        assert_eq!(got, want);
    }
    let (n, o) = (open(&inc), open(&full));
    let mut got = Vec::new();
    n.for_each_difference(&o, |i| got.push(i)).unwrap();
    assert_eq!(got, vec![3, 50, 100]);
}

#[test]
fn a_pack_that_cannot_be_opened_fails_reads_with_the_os_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (b, repo, _d, m) = setup(dir.path());
    let r = repo.open_disk(&m.id, "vda").unwrap();
    let first = r.digest(0).unwrap(); // index block 0 is loaded now
    let loc = repo.with_catalog(|c| c.lookup(&first)).unwrap().unwrap();
    let path = b.root().join(loc.pack.key());
    // A pack that cannot be opened even as root: a symlink to itself (ELOOP).
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&path, &path).unwrap();

    let mut buf = vec![0u8; 2 * CS];
    let e = r.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let chain = catalog::Chain(&e).to_string();
    assert!(
        chain.contains(&loc.pack.key())
            && chain.ends_with("Too many levels of symbolic links (os error 40)"),
        "the chain names the pack and the OS reason: {chain}"
    );
    assert!(
        !e.to_string().contains("os error"),
        "the message does not repeat its cause: {e}"
    );
}
