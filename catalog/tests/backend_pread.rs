//! The filesystem backend's batched reads with io_uring forced off (`SLUICE_IO_URING=off`):
//! the `pread` fallback passes the same contract. (`backend_contract.rs` runs the io_uring
//! path wherever the kernel allows it.) One test per process: the switch is read once.

use catalog::backend::{contract, uring};
use catalog::FsBackend;

#[test]
fn fs_backend_passes_contract_with_io_uring_forced_off() {
    // The only test of this process, run before anything reads the switch.
    std::env::set_var(uring::ENV, "off");
    assert!(!uring::enabled(), "{}=off must force pread", uring::ENV);
    let dir = tempfile::tempdir().unwrap();
    contract::run(&FsBackend::open(dir.path().join("store")).unwrap());
}
