//! NBD peers for interop tests: qemu-nbd, qemu-storage-daemon, nbdkit, killed on drop.
