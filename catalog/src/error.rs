//! The crate's one error type and its small [`ErrorKind`] telling the caller what to do.
//!
//! Owns error construction helpers; does not own logging (callers decide what to log).

use std::fmt;

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named object does not exist (backup, disk, chunk, pack, key).
    NotFound,
    /// Stored bytes fail a check: give up on this object, run verify, never trust the data.
    Corrupt,
    /// An I/O failure of the storage or catalog: retrying may help.
    Io,
    /// Another operation holds a lock this one needs (e.g. GC beside a backup): retry later.
    Locked,
    /// The request conflicts with the repository state (e.g. already exists).
    Conflict,
    /// The caller passed something invalid (range, size, name): fix the input.
    InvalidInput,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "i/o error",
            ErrorKind::Locked => "locked",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidInput => "invalid input",
        };
        f.write_str(s)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every fallible `catalog` call. The message names the object involved.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a lowercase `message` naming the object involved.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the lower-level cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What the caller should do.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Io | ErrorKind::Locked)
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, message)
    }

    /// An I/O error; `NotFound` from the OS keeps its kind.
    pub(crate) fn io(message: impl Into<String>, e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::WouldBlock => ErrorKind::Locked,
            _ => ErrorKind::Io,
        };
        Error::new(kind, message).with_source(e)
    }

    pub(crate) fn db(message: impl Into<String>, e: rusqlite::Error) -> Self {
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                ErrorKind::Locked
            }
            rusqlite::Error::QueryReturnedNoRows => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        };
        Error::new(kind, message).with_source(e)
    }

    /// Prefix the message with more context, keeping kind and source.
    pub(crate) fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
