//! The real test bed: libvirt, QEMU and NBD peers, driven for Sluice's integration tests.
//!
//! - [`TestVm`]: a throwaway TCG domain booting the tiny test guest (built by `make guest`
//!   into `target/test-guest/`) with N qcow2 disks; its command agent writes deterministic
//!   patterns, discards, syncs and checksums; dropping it removes domain, checkpoints,
//!   processes and files, also on panic.
//! - [`pattern()`]: the host twin of the guest's write pattern.
//! - [`read_image`]: a disk image's bytes read from outside QEMU.
//! - [`ensure_libvirt`], [`virsh`]: the daemons (libvirtd also on TLS) and the CLI.
//! - [`peers`]: NBD peers (qemu-nbd, qemu-storage-daemon, nbdkit).
//! - [`Bed`], [`TempRepo`], [`Model`], [`check_disk`]: a throwaway repository with the runtime
//!   and libvirt connection that back a [`TestVm`] up, and byte-for-byte checks of backups.
//! - [`qmp`]: plain QEMU and qemu-storage-daemon with QMP monitors, for the QMP adapter.
//! - [`instant`]: a writable export of a backup that a domain boots from (instant recovery).
//! - [`inspect`]: what `nbdinfo --map` and `qemu-img compare` see of exports and images.
//! - [`daemon`]: a real `sluice serve` driven through the `sluice` CLI.
//! - [`pool`]: a libvirt directory storage pool per test, removed on drop.
//! - [`remote`]: libvirt as a second host reached only over the network
//!   (`qemu+tls://127.0.0.1/system`, backup exports over NBD with TLS), and [`Isolated`]: the
//!   proxy under test as its own user in a mount namespace that hides the hypervisor's files.

pub mod bed;
pub mod channel;
pub mod daemon;
pub mod image;
pub mod inspect;
pub mod instant;
pub mod libvirt;
pub mod pattern;
pub mod peers;
pub mod pool;
pub mod qmp;
pub mod remote;
pub mod remote_guest;
pub mod scratch;
pub mod ssh;
pub mod vm;

pub use bed::{check_disk, runtime, Bed, Model, TempRepo};
pub use image::{guest_image, read_image, read_nbd, GuestImage};
pub use libvirt::{domain_names, ensure_libvirt, qemu_pids_of, virsh, virsh_at};
pub use pattern::{pattern, pattern_sha256, sha256_hex};
pub use remote::{Isolated, TlsHost};
pub use scratch::{ScratchDir, SCRATCH_ROOT};
pub use vm::{sweep_dead, teardown_domain, Disk, TestVm, VmSpec, NAME_PREFIX};
