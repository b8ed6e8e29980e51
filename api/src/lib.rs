//! The `sluice` binary as a library, in two rooms and the types they share:
//! - [`daemon`]: `sluice serve` (configuration, state, hypervisors, auth, audit, jobs, the
//!   operations, schedules, and the HTTP room that exposes them);
//! - [`cli`]: the client verbs, the HTTP client, progress and tables;
//! - [`wire`]: the request and response types both use.
//!
//! Rule: `daemon::http → daemon::ops → {state, jobs, hypervisors} → proxy`; the scheduler
//! calls `ops`; nothing but `daemon::serve` (which builds the app) imports `daemon::http`,
//! and the CLI imports no part of the daemon.

pub mod cli;
pub mod daemon;
pub mod wire;
