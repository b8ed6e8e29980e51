//! The client verbs, one file per area. Each file holds its clap arguments and one function
//! per verb; they call the API through [`crate::cli::client`], print through
//! [`crate::cli::table`], and return the process exit code.

pub mod backup;
pub mod export;
pub mod hypervisor;
pub mod instant;
pub mod job;
pub mod lookup;
pub mod policy;
pub mod repo;
pub mod restore;
pub mod token;
pub mod vm;
