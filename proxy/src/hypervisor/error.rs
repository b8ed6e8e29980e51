//! The one error type of the hypervisor adapters, with a small kind that tells the backup job
//! what to do next.

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The VM, disk or checkpoint named does not exist.
    NotFound,
    /// Change tracking cannot be trusted (bitmap missing, in use, inconsistent): read in full.
    Inconsistent,
    /// The adapter cannot do this (e.g. a libvirt-only call on the QMP adapter).
    Unsupported,
    /// The guest agent does not answer: continue crash-consistent.
    AgentUnavailable,
    /// Another job holds the VM or the export: retrying later can help.
    Busy,
    /// A name or argument we were given is unusable.
    InvalidInput,
    /// The hypervisor or a helper process failed: give up on this backup.
    Failed,
}

/// An error from a hypervisor adapter. Its message names the VM, disk or checkpoint involved.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias for the hypervisor adapters.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a lowercase message naming the object involved.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause; its text ends the message (`context: cause`), as in the
    /// job errors that wrap this one, so an operator sees why (e.g. the OS error of a socket).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.message = format!("{}: {source}", self.message);
        self.source = Some(Box::new(source));
        self
    }

    /// What the caller should do about this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message (with its cause's text, if it has one).
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Shorthand constructors used throughout the adapters.
pub(crate) fn failed(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Failed, message)
}

pub(crate) fn io_failed(message: impl Into<String>, source: std::io::Error) -> Error {
    failed(message).with_source(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_in_the_message() {
        let os = std::io::Error::from_raw_os_error(2); // ENOENT
        let e = io_failed("cannot connect to qmp socket /run/x.sock", os);
        let text = e.to_string();
        assert!(
            text.starts_with("cannot connect to qmp socket /run/x.sock: ")
                && text.contains("No such file or directory"),
            "{text}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(failed("plain").to_string(), "plain");
    }
}
