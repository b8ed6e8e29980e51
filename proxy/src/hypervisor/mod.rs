//! Hypervisor adapters: libvirt and plain QEMU (QMP).
