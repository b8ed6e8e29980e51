//! The plain-QEMU adapter over QMP.
