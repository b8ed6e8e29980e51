//! The job error: a small kind that tells the caller what to do, and a message naming the VM,
//! disk and offset involved.
//!
//! [`ErrorKind`] is the outcome kind of every job, backups and restores alike
//! (`proxy::restore::ErrorKind` is the same type): the API puts [`ErrorKind::as_str`] in a
//! failed job's JSON. It is derived from the kind of the error the job met (repository,
//! hypervisor, NBD), so it says what to do, not where it happened. The message names what was
//! being done and never repeats its cause: the cause is the `source`, and the edges print the
//! whole chain with [`catalog::Chain`].

use std::fmt;

/// What the caller can do about a failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A passing failure (the hypervisor, the export, storage I/O, a lock another operation
    /// holds): retrying later may help. Nothing was committed.
    Retry,
    /// Stored data fails a check: run verify; never trust that data.
    Corrupt,
    /// The VM, disk, backup or checkpoint named does not exist.
    NotFound,
    /// Refused as asked: the state forbids it (a running VM, no confirmation, a target that
    /// exists, an adapter that cannot do it). Retrying unchanged will not help; the message
    /// says what to do.
    Refused,
    /// The request does not fit (a bad name, range or option, an unusable work directory):
    /// fix it.
    InvalidInput,
    /// The job was cancelled; the message says what was already written (a backup commits
    /// nothing).
    Cancelled,
    /// Something broke that retrying the same way is not known to fix (a peer breaking the
    /// NBD protocol, TLS that cannot be set up, a task that panicked): see the message.
    Failed,
}

impl ErrorKind {
    /// The kind's snake_case name, as a failed job's JSON carries it: `retry`, `corrupt`,
    /// `not_found`, `refused`, `invalid_input`, `cancelled` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retry => "retry",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<catalog::ErrorKind> for ErrorKind {
    fn from(k: catalog::ErrorKind) -> Self {
        use catalog::ErrorKind as C;
        match k {
            C::NotFound => ErrorKind::NotFound,
            C::Corrupt => ErrorKind::Corrupt,
            C::Io | C::Locked => ErrorKind::Retry,
            C::Conflict => ErrorKind::Refused,
            C::InvalidInput => ErrorKind::InvalidInput,
        }
    }
}

impl From<crate::hypervisor::ErrorKind> for ErrorKind {
    fn from(k: crate::hypervisor::ErrorKind) -> Self {
        use crate::hypervisor::ErrorKind as H;
        match k {
            H::NotFound => ErrorKind::NotFound,
            H::InvalidInput => ErrorKind::InvalidInput,
            H::Unsupported => ErrorKind::Refused,
            // Busy: another job holds the VM. Inconsistent: the next backup's checkpoint check
            // reads in full. Failed: mostly an unreachable or failing hypervisor; the adapter
            // cannot tell a lasting failure from a passing one.
            H::Busy | H::Inconsistent | H::AgentUnavailable | H::Failed => ErrorKind::Retry,
        }
    }
}

impl From<crate::nbd::ErrorKind> for ErrorKind {
    fn from(k: crate::nbd::ErrorKind) -> Self {
        use crate::nbd::ErrorKind as N;
        match k {
            // A new connection (or the disk behind the export) may do better.
            N::Connection | N::Remote => ErrorKind::Retry,
            N::Refused => ErrorKind::Refused,
            // Our own request or the peer broke the protocol: not a passing state.
            N::Protocol | N::InvalidArgument | N::Tls => ErrorKind::Failed,
        }
    }
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

    /// Attaches the underlying cause, kept as the `source` (not copied into the message).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What the caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    fn wrap<E>(kind: ErrorKind, context: impl fmt::Display, e: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::new(kind, context.to_string()).with_source(e)
    }

    pub(crate) fn hypervisor(context: impl fmt::Display, e: crate::hypervisor::Error) -> Self {
        Self::wrap(e.kind().into(), context, e)
    }

    pub(crate) fn nbd(context: impl fmt::Display, e: crate::nbd::Error) -> Self {
        Self::wrap(e.kind().into(), context, e)
    }

    pub(crate) fn repo(context: impl fmt::Display, e: catalog::Error) -> Self {
        Self::wrap(e.kind().into(), context, e)
    }

    /// The hypervisor's extents cannot be planned (they do not fit the disk or the window).
    pub(crate) fn plan(context: impl fmt::Display, e: crate::plan::PlanError) -> Self {
        Self::wrap(ErrorKind::Failed, context, e)
    }

    pub(crate) fn cancelled(vm: &str) -> Self {
        Self::new(
            ErrorKind::Cancelled,
            format!("backup of vm {vm} was cancelled; nothing was committed"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::Chain;

    #[test]
    fn kinds_say_what_to_do_in_snake_case() {
        let all = [
            (ErrorKind::Retry, "retry"),
            (ErrorKind::Corrupt, "corrupt"),
            (ErrorKind::NotFound, "not_found"),
            (ErrorKind::Refused, "refused"),
            (ErrorKind::InvalidInput, "invalid_input"),
            (ErrorKind::Cancelled, "cancelled"),
            (ErrorKind::Failed, "failed"),
        ];
        for (k, name) in all {
            assert_eq!(k.as_str(), name);
            assert_eq!(k.to_string(), name);
            assert_eq!(serde_json::to_value(k).unwrap(), name);
        }
    }

    #[test]
    fn the_kind_comes_from_the_cause_and_the_cause_is_the_source() {
        let os = std::io::Error::from_raw_os_error(13); // EACCES
        let lower = catalog::Error::new(catalog::ErrorKind::Io, "opening object packs/ab/cd")
            .with_source(os);
        let e = Error::repo("backup of vm web", lower);
        assert_eq!(e.kind(), ErrorKind::Retry);
        assert_eq!(e.to_string(), "backup of vm web");
        assert_eq!(
            Chain(&e).to_string(),
            "backup of vm web: opening object packs/ab/cd: Permission denied (os error 13)"
        );
        let corrupt = catalog::Error::new(catalog::ErrorKind::Corrupt, "chunk 00 fails");
        assert_eq!(Error::repo("x", corrupt).kind(), ErrorKind::Corrupt);
        let gone = crate::hypervisor::Error::new(crate::hypervisor::ErrorKind::NotFound, "vm web");
        let e = Error::hypervisor("vm web", gone);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            Chain(&e).to_string(),
            "vm web",
            "a repeated context is printed once"
        );
        let refused = crate::nbd::Error::new(crate::nbd::ErrorKind::Refused, "no export vda");
        assert_eq!(Error::nbd("disk vda", refused).kind(), ErrorKind::Refused);
        assert_eq!(Error::cancelled("web").kind(), ErrorKind::Cancelled);
    }
}
