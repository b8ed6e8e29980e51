//! How the library errors a job meets become its [`JobError`]: the kind says what to do (the
//! library's own kind, kept), the message is the error with its whole cause chain, once.

use crate::daemon::error::chain;
use crate::wire::jobs::{ErrorKind, JobError};

/// A failed or cancelled backup: its kind is the library's own (`proxy::job::ErrorKind`,
/// derived there from the wrapped repository, hypervisor or NBD error).
pub fn backup(e: &proxy::job::Error) -> JobError {
    JobError::new(job_kind(e.kind()), chain(e))
}

/// A failed or cancelled restore (same kinds as a backup).
pub fn restore(e: &proxy::restore::Error) -> JobError {
    JobError::new(job_kind(e.kind()), chain(e))
}

/// A hypervisor that failed a job's call.
pub fn hypervisor(e: &proxy::hypervisor::Error) -> JobError {
    JobError::new(hypervisor_kind(e.kind()), chain(e))
}

/// A repository call of a job that failed.
pub fn repo(e: &catalog::Error) -> JobError {
    JobError::new(repo_kind(e.kind()), chain(e))
}

/// A local file operation of a job (`what` names it) that failed.
pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> JobError {
    JobError::new(ErrorKind::Retry, format!("{what}: {e}"))
}

/// A job that could not go on, for the reason `message` gives.
pub fn refused(message: impl Into<String>) -> JobError {
    JobError::new(ErrorKind::Refused, message)
}

/// A job that failed for a reason no library kind covers.
pub fn failed(message: impl Into<String>) -> JobError {
    JobError::new(ErrorKind::Failed, message)
}

fn repo_kind(k: catalog::ErrorKind) -> ErrorKind {
    use catalog::ErrorKind as K;
    match k {
        K::NotFound => ErrorKind::NotFound,
        K::Corrupt => ErrorKind::Corrupt,
        K::Io | K::Locked => ErrorKind::Retry,
        K::Conflict => ErrorKind::Refused,
        K::InvalidInput => ErrorKind::InvalidInput,
    }
}

fn hypervisor_kind(k: proxy::hypervisor::ErrorKind) -> ErrorKind {
    use proxy::hypervisor::ErrorKind as K;
    match k {
        K::NotFound => ErrorKind::NotFound,
        K::Busy | K::Failed | K::AgentUnavailable => ErrorKind::Retry,
        K::Unsupported => ErrorKind::Refused,
        K::InvalidInput => ErrorKind::InvalidInput,
        K::Inconsistent => ErrorKind::Retry,
    }
}

fn job_kind(k: proxy::job::ErrorKind) -> ErrorKind {
    use proxy::job::ErrorKind as K;
    match k {
        K::Retry => ErrorKind::Retry,
        K::Corrupt => ErrorKind::Corrupt,
        K::NotFound => ErrorKind::NotFound,
        K::Refused => ErrorKind::Refused,
        K::InvalidInput => ErrorKind::InvalidInput,
        K::Cancelled => ErrorKind::Cancelled,
        K::Failed => ErrorKind::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repository_cause_gives_its_kind_and_its_os_reason() {
        let os = std::io::Error::from_raw_os_error(13); // EACCES
        let e =
            catalog::Error::new(catalog::ErrorKind::Io, "opening object packs/ab").with_source(os);
        let j = repo(&e);
        assert_eq!(j.kind, ErrorKind::Retry);
        assert!(
            j.message.starts_with("opening object packs/ab: ")
                && j.message.contains("Permission denied"),
            "{}",
            j.message
        );
        let corrupt = catalog::Error::new(catalog::ErrorKind::Corrupt, "pack p: bad magic");
        assert_eq!(repo(&corrupt).kind, ErrorKind::Corrupt);
    }
}
