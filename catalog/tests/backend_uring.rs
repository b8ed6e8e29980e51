//! The filesystem backend's batched reads through io_uring (`FsOptions { io_uring: true }`,
//! what the daemon sets from `SLUICE_IO_URING=on`): the same contract as the default `pread`
//! path (`backend_contract.rs`, which also checks that it is off by default).

use catalog::backend::{contract, uring};
use catalog::{FsBackend, FsOptions};

#[test]
fn fs_backend_passes_contract_with_io_uring_on() {
    assert!(
        uring::probe_ok(),
        "io_uring is unavailable on this host (kernel or seccomp): its read path cannot be tested"
    );
    let dir = tempfile::tempdir().unwrap();
    let on = FsBackend::open_with(dir.path().join("store"), FsOptions { io_uring: true }).unwrap();
    assert!(
        on.uses_io_uring(),
        "FsOptions::io_uring must turn io_uring on"
    );
    contract::run(&on);
}
