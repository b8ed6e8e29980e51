//! The restore module's error type; its kind is the jobs' [`ErrorKind`] (a restore is a job).
//!
//! Owns the mapping from repository (`catalog`), hypervisor and NBD errors; it does not own
//! logging. A message names what was being done and never repeats its cause: the cause is the
//! `source`, and the edges print the whole chain with [`catalog::Chain`].

use std::fmt;

pub use crate::job::ErrorKind;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Every fallible restore call returns this; the message names the object involved.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Source>,
}

/// Result of restore operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a lowercase message naming the object involved.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause, kept as the `source` (not copied into the message).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What the caller should do.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, message)
    }

    /// A local file or tool I/O failure: retrying may help.
    pub(crate) fn io(message: impl Into<String>, e: std::io::Error) -> Self {
        Error::new(ErrorKind::Retry, message).with_source(e)
    }

    /// A repository error, with `what` saying what was being done.
    pub(crate) fn catalog(what: impl fmt::Display, e: catalog::Error) -> Self {
        Error::new(e.kind().into(), what.to_string()).with_source(e)
    }

    /// A hypervisor adapter error, with `what` saying what was being done.
    pub(crate) fn hypervisor(what: impl fmt::Display, e: crate::hypervisor::Error) -> Self {
        Error::new(e.kind().into(), what.to_string()).with_source(e)
    }

    /// An NBD client error, with `what` saying what was being done.
    pub(crate) fn nbd(what: impl fmt::Display, e: crate::nbd::Error) -> Self {
        Error::new(e.kind().into(), what.to_string()).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::Chain;

    #[test]
    fn causes_are_sources_and_kinds_come_from_them() {
        let os = std::io::Error::from_raw_os_error(28); // ENOSPC
        let e = Error::io("write /restores/web.raw", os);
        assert_eq!(e.kind(), ErrorKind::Retry);
        assert_eq!(e.to_string(), "write /restores/web.raw");
        assert_eq!(
            Chain(&e).to_string(),
            "write /restores/web.raw: No space left on device (os error 28)"
        );
        let gone = catalog::Error::new(catalog::ErrorKind::NotFound, "backup b1 not found");
        let e = Error::catalog("restore b1", gone);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(Chain(&e).to_string(), "restore b1: backup b1 not found");
        let exists = catalog::Error::new(catalog::ErrorKind::Conflict, "exists");
        assert_eq!(Error::catalog("x", exists).kind(), ErrorKind::Refused);
    }
}
