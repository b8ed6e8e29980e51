//! The `sluice` daemon and CLI as a library: the REST API (`routes::app`), its state and
//! auth, the job registry, the daemon's configuration and listener, and the CLI's client.

pub mod auth;
pub mod error;
pub mod extract;
pub mod hv;
pub mod joblog;
pub mod jobs;
pub mod metrics;
pub mod routes;
pub mod state;

pub use routes::app;
pub use state::{AppState, SharedState};
pub mod audit;
pub mod cli;
pub mod cli_ops;
pub mod client;
pub mod config;
pub mod cron;
pub mod policy;
pub mod scheduler;
pub mod serve;
