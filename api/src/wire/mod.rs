//! What crosses between the CLI and the daemon: the API's request and response bodies (with
//! their OpenAPI schemas), and the policy file format with its cron schedules (the CLI
//! validates a policy file before sending it). Types only, plus their parsing and checks: no
//! I/O, nothing of the daemon.

pub mod backups;
pub mod cron;
pub mod display;
pub mod error;
pub mod exports;
pub mod hypervisors;
pub mod instant;
pub mod jobs;
pub mod meta;
pub mod policy;
pub mod repo;
pub mod restores;
pub mod tokens;
pub mod vms;
