//! Every backend passes the same contract suite.

use catalog::backend::contract;
use catalog::{FaultBackend, FsBackend, MemBackend};

#[test]
fn fs_backend_passes_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract::run(&FsBackend::open(dir.path().join("store")).unwrap());
}

/// Batched reads use `pread` unless asked otherwise (`backend_uring.rs` runs io_uring).
#[test]
fn fs_backend_batches_use_pread_by_default() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!FsBackend::open(dir.path().join("store"))
        .unwrap()
        .uses_io_uring());
    let default = catalog::FsOptions::default();
    assert!(!default.io_uring);
    let b = FsBackend::open_with(dir.path().join("store"), default).unwrap();
    assert!(!b.uses_io_uring());
}

#[test]
fn mem_backend_passes_contract() {
    contract::run(&MemBackend::new());
}

#[test]
fn fault_backend_passes_contract() {
    contract::run(&FaultBackend::new(&MemBackend::new(), u64::MAX));
}

#[test]
fn fs_backend_leaves_no_temp_files_and_survives_reopen() {
    use catalog::Backend;
    let dir = tempfile::tempdir().unwrap();
    let b = FsBackend::open(dir.path()).unwrap();
    b.put("packs/ab/x", b"data").unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path().join("packs/ab"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["x"]);
    let b2 = FsBackend::open(dir.path()).unwrap();
    assert_eq!(b2.get("packs/ab/x").unwrap(), b"data");
}

#[test]
fn fault_backend_loses_writes_after_n_syncs() {
    use catalog::Backend;
    let f = FaultBackend::new(&MemBackend::new(), 2);
    f.put("a", b"1").unwrap();
    f.put("b", b"2").unwrap();
    f.put("c", b"3").unwrap();
    f.delete("a").unwrap();
    assert_eq!(f.list("").unwrap(), vec!["b", "c"]);
    let after = f.crash();
    assert_eq!(after.list("").unwrap(), vec!["a", "b"]);
}
