//! The instant recoveries this daemon runs, by job: what each serves and where, for the
//! operations that act on a running one (today `ops::restore::instant` itself; a migration
//! into a storage pool would find the domain, its hypervisor and its exports here), and the
//! address QEMU on a hypervisor dials to reach the NBD server.
//!
//! The job owns the lifecycle (exports, hold, domain); this is only the index. Nothing here
//! survives a restart: the exports die with the daemon, and the restart's clean-up ends the
//! domains from the job history (`ops::restore::instant::clean_after_restart`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proxy::restore::{NbdAddress, RepoExport};

/// One disk of a running instant recovery.
#[derive(Debug, Clone)]
pub struct RunDisk {
    /// Guest target (`vda`).
    pub target: String,
    /// Its name on the NBD server.
    pub export: String,
    /// The writable export (its overlay holds the guest's writes).
    pub served: Arc<RepoExport>,
    pub size: u64,
}

/// A running instant recovery.
#[derive(Debug)]
pub struct InstantRun {
    pub job: u64,
    /// The hypervisor the domain is defined on.
    pub hypervisor: String,
    pub domain: String,
    pub backup: catalog::BackupId,
    pub disks: Vec<RunDisk>,
}

/// The running instant recoveries and the NBD address they are served at.
#[derive(Debug, Default)]
pub struct InstantRecoveries {
    /// What QEMU dials (none: `nbd_listen` is unspecified and `nbd_advertise` unset, or no
    /// NBD server runs).
    pub at: Option<NbdAddress>,
    runs: Mutex<BTreeMap<u64, Arc<InstantRun>>>,
}

impl InstantRecoveries {
    /// Records `run` as running.
    pub fn insert(&self, run: Arc<InstantRun>) {
        self.runs.lock().expect("instant lock").insert(run.job, run);
    }

    /// Forgets job `job`'s run.
    pub fn remove(&self, job: u64) -> Option<Arc<InstantRun>> {
        self.runs.lock().expect("instant lock").remove(&job)
    }

    /// Job `job`'s run, if it runs.
    pub fn get(&self, job: u64) -> Option<Arc<InstantRun>> {
        self.runs.lock().expect("instant lock").get(&job).cloned()
    }
}
