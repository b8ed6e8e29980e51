//! The restore module's error type and its small [`ErrorKind`].
//!
//! Owns the mapping from repository (`catalog`) errors; it does not own logging.

use std::fmt;

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A name, range or option is invalid: fix the input.
    InvalidInput,
    /// The backup, disk or VM does not exist.
    NotFound,
    /// Stored data fails a check: run verify; never trust the data.
    Corrupt,
    /// A local file, tool or storage I/O failure: retrying may help.
    Io,
    /// The target already exists (a file or domain would be clobbered).
    Conflict,
    /// Refused as asked: the target's state forbids it now (a running VM, no confirmation);
    /// the message says what to do.
    Refused,
    /// The caller cancelled; the message says what was already written.
    Cancelled,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotFound => "not found",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "i/o error",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Refused => "refused",
            ErrorKind::Cancelled => "cancelled",
        })
    }
}

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

    pub(crate) fn io(message: impl Into<String>, e: std::io::Error) -> Self {
        let message = format!("{}: {e}", message.into());
        Error {
            kind: ErrorKind::Io,
            message,
            source: Some(Box::new(e)),
        }
    }

    /// A repository error, with `what` saying what was being done.
    pub(crate) fn catalog(what: impl fmt::Display, e: catalog::Error) -> Self {
        let kind = match e.kind() {
            catalog::ErrorKind::NotFound => ErrorKind::NotFound,
            catalog::ErrorKind::Corrupt => ErrorKind::Corrupt,
            catalog::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            catalog::ErrorKind::Conflict => ErrorKind::Conflict,
            catalog::ErrorKind::Io | catalog::ErrorKind::Locked => ErrorKind::Io,
        };
        Error {
            kind,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        }
    }

    /// A hypervisor adapter error, with `what` saying what was being done.
    pub(crate) fn hypervisor(what: impl fmt::Display, e: crate::hypervisor::Error) -> Self {
        use crate::hypervisor::ErrorKind as H;
        let kind = match e.kind() {
            H::NotFound => ErrorKind::NotFound,
            H::InvalidInput | H::Unsupported => ErrorKind::InvalidInput,
            H::Busy => ErrorKind::Refused,
            H::Inconsistent | H::AgentUnavailable | H::Failed => ErrorKind::Io,
        };
        Error {
            kind,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        }
    }

    /// An NBD client error, with `what` saying what was being done.
    pub(crate) fn nbd(what: impl fmt::Display, e: crate::nbd::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: format!("{what}: {e}"),
            source: Some(Box::new(e)),
        }
    }
}
