//! The real test bed: libvirt, QEMU and NBD peers, driven for Sluice's integration tests.

pub mod peers;
