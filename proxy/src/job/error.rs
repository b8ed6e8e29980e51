//! The job error: a small kind that tells the caller what to do, and a message naming the VM,
//! disk and offset involved.

use std::fmt;

/// What the caller can do about a failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The hypervisor refused or failed: retrying later may help.
    Hypervisor,
    /// Reading the point-in-time export failed: retrying may help.
    Nbd,
    /// The repository failed: see the message (a corrupt repository needs `verify`).
    Repository,
    /// The job was cancelled; nothing was committed.
    Cancelled,
    /// The request does not fit the VM (unknown VM, unsupported disk): fix the request.
    InvalidInput,
}

/// A failed job.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result of a job step.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// What the caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    fn wrap<E>(kind: ErrorKind, context: impl fmt::Display, e: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error {
            kind,
            message: format!("{context}: {e}"),
            source: Some(Box::new(e)),
        }
    }

    pub(crate) fn hypervisor(context: impl fmt::Display, e: crate::hypervisor::Error) -> Self {
        Self::wrap(ErrorKind::Hypervisor, context, e)
    }

    pub(crate) fn nbd(context: impl fmt::Display, e: crate::nbd::Error) -> Self {
        Self::wrap(ErrorKind::Nbd, context, e)
    }

    pub(crate) fn repo(context: impl fmt::Display, e: catalog::Error) -> Self {
        Self::wrap(ErrorKind::Repository, context, e)
    }

    pub(crate) fn plan(context: impl fmt::Display, e: crate::plan::PlanError) -> Self {
        Self::wrap(ErrorKind::Nbd, context, e)
    }

    pub(crate) fn cancelled(vm: &str) -> Self {
        Self::new(
            ErrorKind::Cancelled,
            format!("backup of vm {vm} was cancelled; nothing was committed"),
        )
    }
}
