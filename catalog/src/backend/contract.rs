//! The contract every [`Backend`] must pass, written once and run against each backend
//! (see `tests/backend_contract.rs`). Panics with a message naming the broken rule.

use super::{Backend, LockMode};
use crate::error::ErrorKind;

/// Run every rule against `b`, which must start empty.
pub fn run(b: &dyn Backend) {
    put_get_overwrite(b);
    ranges(b);
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
