//! How the library errors a job meets become its [`JobError`]: the kind says what to do (the
//! library's own kind, kept), the message is the error with its whole cause chain, once.

use crate::daemon::error::chain;
use crate::wire::jobs::{ErrorKind, JobError};

/// A failed or cancelled backup.
pub fn backup(e: &proxy::job::Error) -> JobError {
    use proxy::job::ErrorKind as K;
    let kind = match e.kind() {
        K::Cancelled => ErrorKind::Cancelled,
        K::InvalidInput => ErrorKind::InvalidInput,
        K::Hypervisor | K::Nbd | K::Repository => cause_kind(e).unwrap_or(ErrorKind::Retry),
    };
    JobError::new(kind, chain(e))
}

/// A failed or cancelled restore.
pub fn restore(e: &proxy::restore::Error) -> JobError {
    use proxy::restore::ErrorKind as K;
    let kind = match e.kind() {
        K::InvalidInput => ErrorKind::InvalidInput,
        K::NotFound => ErrorKind::NotFound,
        K::Corrupt => ErrorKind::Corrupt,
        K::Io => ErrorKind::Retry,
        K::Conflict | K::Refused => ErrorKind::Refused,
        K::Cancelled => ErrorKind::Cancelled,
    };
    JobError::new(kind, chain(e))
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

fn nbd_kind(k: proxy::nbd::ErrorKind) -> ErrorKind {
    use proxy::nbd::ErrorKind as K;
    match k {
        K::Connection | K::Remote | K::Tls => ErrorKind::Retry,
        K::Protocol => ErrorKind::Failed,
        K::Refused => ErrorKind::Refused,
        K::InvalidArgument => ErrorKind::InvalidInput,
    }
}

/// The kind of the first library error in `e`'s causes.
fn cause_kind(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut next = e.source();
    while let Some(c) = next {
        if let Some(r) = c.downcast_ref::<catalog::Error>() {
            return Some(repo_kind(r.kind()));
        }
        if let Some(h) = c.downcast_ref::<proxy::hypervisor::Error>() {
            return Some(hypervisor_kind(h.kind()));
        }
        if let Some(n) = c.downcast_ref::<proxy::nbd::Error>() {
            return Some(nbd_kind(n.kind()));
        }
        next = c.source();
    }
    None
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
