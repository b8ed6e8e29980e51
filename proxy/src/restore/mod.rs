//! Restore: any backup disk as an NBD export, and restores to image files.
//!
//! - [`name`]: export names `VM/DISK@BACKUP`, validated.
//! - [`export`]: [`RepoExport`], a [`crate::nbd::BlockExport`] over a backup disk: reads
//!   through the repository, block status from the index, the restore-point diff context,
//!   and an optional copy-on-write overlay (`overlay`) that makes it writable.
//! - [`file`]: restore a disk to a raw or qcow2 file, sparse.
//! - [`domain`]: a backup's saved domain definition rewritten for a new domain.
//! - [`onto`]: a backup written back onto an existing, shut-off VM's disks (only the chunks
//!   that can differ when the image's checkpoint bitmap allows).
//!
//! The repository is synchronous; everything here reaches it on tokio's blocking pool.

mod bits;
pub mod diff;
pub mod domain;
mod error;
pub mod export;
pub mod file;
pub mod name;
pub mod onto;
mod overlay;

pub use diff::{changed_since_context, CHANGED_SINCE_PREFIX, STATE_CHANGED};
pub use domain::{relocate_chardevs, restore_as_domain, RestoredDisk};
pub use error::{Error, ErrorKind, Result};
pub use export::{ExportOptions, RepoExport};
pub use file::{restore_disk, restore_to_file, ImageFormat, RestoreReport};
pub use name::ExportName;
pub use onto::{restore_onto_vm, DiskOntoReport, OntoPath, OntoVmOptions, OntoVmReport};
pub use overlay::OVERLAY_BLOCK;
