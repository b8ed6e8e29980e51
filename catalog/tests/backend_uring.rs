//! The filesystem backend's batched reads through io_uring (`SLUICE_IO_URING=on`): the same
//! contract as the default `pread` path (`backend_contract.rs`). One test per process: the
//! switch is read once.

use catalog::backend::{contract, uring};
use catalog::FsBackend;

#[test]
fn fs_backend_passes_contract_with_io_uring_on() {
    // The only test of this process, run before anything reads the switch.
    std::env::set_var(uring::ENV, "on");
    assert!(
        uring::probe_ok(),
        "io_uring is unavailable on this host (kernel or seccomp): its read path cannot be tested"
    );
    assert!(uring::enabled(), "{}=on must turn io_uring on", uring::ENV);
    let dir = tempfile::tempdir().unwrap();
    contract::run(&FsBackend::open(dir.path().join("store")).unwrap());
}
