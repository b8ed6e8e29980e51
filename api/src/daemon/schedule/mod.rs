//! Schedules: cron expressions (`cron`), backup policies and their store (`policy`), and the
//! scheduler that starts what is due through `ops` (`scheduler`).

pub mod policy;
pub mod scheduler;
