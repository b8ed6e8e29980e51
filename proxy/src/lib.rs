//! Sluice's data path, async on tokio.
//!
//! Owns NBD (client and server), the hypervisor adapters, the extent-to-chunk planner,
//! restore exports and the backup and restore jobs. Reaches the repository (`catalog`) only
//! through one seam, [`repo`], on a bounded blocking pool. Every public async operation
//! returns a `Send` future (checked at compile time in `send_check.rs`).

pub mod hypervisor;
pub mod job;
pub mod nbd;
pub mod plan;
pub mod repo;
pub mod restore;
#[cfg(test)]
mod send_check;
