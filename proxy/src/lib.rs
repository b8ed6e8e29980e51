//! Sluice's data path, async on tokio.
//!
//! Owns NBD (client and server), the hypervisor adapters, the ingest pipeline, restore
//! exports and the backup and restore jobs. Reaches the repository (`catalog`) only through
//! one seam on a bounded blocking pool.

pub mod hypervisor;
pub mod job;
pub mod nbd;
pub mod plan;
pub mod repo;
pub mod restore;
mod send_check;
