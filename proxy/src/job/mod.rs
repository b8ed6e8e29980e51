//! Jobs: the long-running operations of the proxy (backup now; restore later), with their
//! progress counters and their error type.
//!
//! A job owns the order of steps and every guard it takes from the hypervisor; it does not
//! own NBD bytes (`crate::nbd`), extent arithmetic (`crate::plan`) or repository files
//! (`catalog`, reached through `crate::ingest`).

pub mod backup;
mod disk;
mod error;
mod progress;
pub mod stale;
pub mod throttle;

pub use backup::{
    end_stale_backup, end_stale_backup_in, is_job_dir_name, run_backup, BackupOptions, BackupReport,
};
pub use error::{Error, ErrorKind, Result};
pub use progress::{Progress, ProgressSnapshot};
pub use throttle::RateLimit;
