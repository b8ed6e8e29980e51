//! The daemon's operations, below the HTTP room and beside the scheduler: what a request or
//! a schedule asks for, checked and started as a job (`backup`, `restore`), or done at once
//! (`exports`). They return [`crate::daemon::error::ApiError`] and know nothing of HTTP.

pub mod backup;
pub mod exports;
pub mod failure;
pub mod restore;
