//! Jobs: the backup job, the clean-up of what a killed one left (`stale`), read pacing
//! (`throttle`), and the progress counters and error type that backups and restores share.
//!
//! A job owns the order of steps and every guard it takes from the hypervisor; it does not
//! own NBD bytes (`crate::nbd`), extent arithmetic (`crate::plan`) or repository files
//! (`catalog`, reached only through `crate::repo`).

pub mod backup;
mod disk;
mod error;
mod progress;
mod remote;
pub mod stale;
pub mod throttle;

pub use backup::{
    end_stale_backup, end_stale_backup_in, is_job_dir_name, run_backup, BackupOptions, BackupReport,
};
pub use error::{Error, ErrorKind, Result};
pub use progress::{Progress, ProgressSnapshot};
pub use remote::{PortLease, RemoteData};
pub use throttle::RateLimit;
