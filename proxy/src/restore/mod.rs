//! Restore: any backup disk as an NBD export, and restores to image files.
//!
//! - [`name`]: export names `VM/DISK@BACKUP`, validated.
//! - [`export`]: [`RepoExport`], a [`crate::nbd::BlockExport`] over a backup disk: reads
//!   through the repository, block status from the index, the restore-point diff context,
//!   and an optional copy-on-write overlay (`overlay`) that makes it writable.
//! - [`file`]: restore a disk (or several, with one progress) to a raw or qcow2 file,
//!   sparse; the only writer of that progress.
//! - [`domain`]: the rules of a restore as a new domain (name, one restored file per disk);
//!   the XML rewrite itself is `crate::hypervisor::xml_restore`'s.
//! - [`instant`]: instant recovery: the rules of a new domain booted straight from writable
//!   exports of a backup's disks (the XML is `crate::hypervisor::xml_instant`'s).
//! - [`onto`]: a backup written back onto an existing, shut-off VM's disks (only the chunks
//!   that can differ when the image's checkpoint bitmap allows).
//! - [`volume`]: restore as a new domain into a libvirt storage pool of a hypervisor that
//!   shares only the network: volumes filled by a sparse upload over the libvirt connection.
//!
//! The repository is synchronous; everything here reaches it through `crate::repo` (short
//! calls on the bounded blocking pool, whole-disk copies on dedicated threads). Images and
//! libvirt XML are the hypervisor adapters' (`crate::hypervisor::{image, offline,
//! xml_restore}`).

mod bits;
pub mod diff;
pub mod domain;
mod error;
pub mod export;
pub mod file;
pub mod instant;
pub mod name;
pub mod onto;
mod overlay;
pub mod volume;

pub use diff::{changed_since_context, CHANGED_SINCE_PREFIX, STATE_CHANGED};
pub use domain::{relocate_chardevs, restore_as_domain, RestoredDisk};
pub use error::{Error, ErrorKind, Result};
pub use export::{ExportOptions, RepoExport};
pub use file::{
    restore_disk, restore_disk_with, restore_disks_with, restore_to_file, FileRestoreControl,
    ImageFormat, RestoreReport,
};
pub use instant::{instant_domain, InstantDisk, NbdAddress};
pub use name::ExportName;
pub use onto::{restore_onto_vm, DiskOntoReport, OntoPath, OntoVmOptions, OntoVmReport};
pub use overlay::OVERLAY_BLOCK;
pub use volume::{
    check_pool_restore, restore_to_pool, volume_name, PoolRestoreOptions, PoolRestoreReport,
};
