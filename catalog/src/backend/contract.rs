//! The contract every [`Backend`] must pass, written once and run against each backend
//! (see `tests/backend_contract.rs`). Panics with a message naming the broken rule.

use super::{Backend, LockMode, RangeRequest};
use crate::error::ErrorKind;

/// Run every rule against `b`, which must start empty.
pub fn run(b: &dyn Backend) {
    put_get_overwrite(b);
    ranges(b);
    batch_ranges(b);
    listing(b);
    deleting(b);
    bad_keys(b);
    locking(b);
}

fn put_get_overwrite(b: &dyn Backend) {
    b.put("c/one", b"hello").expect("put");
    assert_eq!(b.get("c/one").expect("get"), b"hello");
    b.put("c/one", b"bye").expect("overwrite");
    assert_eq!(
        b.get("c/one").expect("get"),
        b"bye",
        "overwrite must replace"
    );
    assert_eq!(b.len("c/one").expect("len"), 3);
    let e = b.get("c/missing").expect_err("missing key must fail");
    assert_eq!(e.kind(), ErrorKind::NotFound, "missing key kind: {e}");
    b.put("c/empty", b"").expect("empty put");
    assert_eq!(b.get("c/empty").expect("get empty"), b"");
}

fn ranges(b: &dyn Backend) {
    b.put("r/x", b"0123456789").expect("put");
    assert_eq!(b.get_range("r/x", 2, 3).expect("range"), b"234");
    assert_eq!(b.get_range("r/x", 10, 0).expect("empty range at end"), b"");
    assert!(
        b.get_range("r/x", 8, 3).is_err(),
        "range past end must fail"
    );
    assert!(
        b.get_range("r/x", u64::MAX, 2).is_err(),
        "overflowing range must fail"
    );
    let e = b.get_range("r/none", 0, 1).expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

fn req(key: &str, offset: u64, len: usize) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        offset,
        len,
    }
}

/// `get_ranges`: results in request order, each as `get_range` would answer, bad requests
/// failing alone; batches longer than any queue depth and ranges of a megabyte.
fn batch_ranges(b: &dyn Backend) {
    let big: Vec<u8> = (0..(1u32 << 20) + 7)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    b.put("g/big", &big).expect("put");
    b.put("g/small", b"abcdefghij").expect("put");
    assert!(b.get_ranges(&[]).is_empty(), "empty batch");
    let reqs = vec![
        req("g/small", 1, 3),
        req("g/none", 0, 1),
        req("g/big", 5, 1 << 20),
        req("g/small", 8, 3),
        req("g/small", 10, 0),
        req("../bad", 0, 1),
        req("g/small", 0, 10),
    ];
    let got = b.get_ranges(&reqs);
    assert_eq!(got.len(), reqs.len(), "one result per request");
    assert_eq!(got[0].as_deref().expect("first"), b"bcd");
    assert_eq!(
        got[1].as_ref().expect_err("missing").kind(),
        ErrorKind::NotFound
    );
    assert!(
        got[2].as_deref().expect("big") == &big[5..5 + (1 << 20)],
        "1 MiB range"
    );
    assert!(got[3].is_err(), "range past the end must fail alone");
    assert_eq!(got[4].as_deref().expect("empty"), b"");
    assert_eq!(
        got[5].as_ref().expect_err("bad key").kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(got[6].as_deref().expect("last"), b"abcdefghij");
    let many: Vec<RangeRequest> = (0..200u64)
        .map(|i| req("g/big", i * 4099, 4096 + i as usize))
        .collect();
    for (r, g) in many.iter().zip(b.get_ranges(&many)) {
        let want = &big[r.offset as usize..r.offset as usize + r.len];
        assert!(g.expect("batch of 200") == want, "range at {}", r.offset);
    }
}

fn listing(b: &dyn Backend) {
    for k in ["l/b/2", "l/a/1", "l/a/3", "lx/9"] {
        b.put(k, k.as_bytes()).expect("put");
    }
    assert_eq!(b.list("l/").expect("list"), vec!["l/a/1", "l/a/3", "l/b/2"]);
    assert_eq!(b.list("l/a/").expect("list"), vec!["l/a/1", "l/a/3"]);
    assert!(b.list("nothing/").expect("empty list").is_empty());
}

fn deleting(b: &dyn Backend) {
    b.put("d/k", b"v").expect("put");
    b.delete("d/k").expect("delete");
    assert_eq!(b.get("d/k").unwrap_err().kind(), ErrorKind::NotFound);
    b.delete("d/k").expect("deleting an absent key is fine");
    assert!(b.list("d/").expect("list").is_empty());
}

fn bad_keys(b: &dyn Backend) {
    for k in ["../escape", "/abs", "a/../b", "", "a//b", ".hidden"] {
        let e = b.put(k, b"x").expect_err("bad key must be refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "key {k:?}: {e}");
    }
}

fn locking(b: &dyn Backend) {
    let s1 = b.lock(LockMode::Shared, false).expect("shared");
    let s2 = b.lock(LockMode::Shared, false).expect("second shared");
    let e = b
        .lock(LockMode::Exclusive, false)
        .expect_err("exclusive beside shared");
    assert_eq!(e.kind(), ErrorKind::Locked);
    drop((s1, s2));
    let x = b
        .lock(LockMode::Exclusive, false)
        .expect("exclusive when free");
    let e = b
        .lock(LockMode::Shared, false)
        .expect_err("shared beside exclusive");
    assert_eq!(e.kind(), ErrorKind::Locked);
    drop(x);
    b.lock(LockMode::Shared, true)
        .expect("shared after release");
}
