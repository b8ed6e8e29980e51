//! `sluice serve`: the daemon. Rooms, lowest first: `error`, `clock`, `config`, `auth`,
//! `audit`, `hypervisors`, `jobs` (model, log, metrics, registry), `exports` (the registry of
//! open NBD exports), `state`; `ops` (backup, restore, exports: what a job or a request
//! does); `schedule` (cron, policies, the scheduler, which calls `ops`); `http` (the router,
//! thin handlers, extractors, the HTTP face of errors); `serve` (starts it all).

pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod error;
pub mod exports;
pub mod http;
pub mod hypervisors;
pub mod instant;
pub mod jobs;
pub mod lock;
pub mod names;
pub mod ops;
pub mod schedule;
pub mod serve;
pub mod state;
