//! The one error type of the hypervisor adapters, with a small kind that tells the backup job
//! what to do next.
//!
//! A message names what was being done and never repeats its cause: the cause (the OS error
//! of a socket, libvirt's message, a parser's complaint) is the `source`, and the edges print
//! the whole chain with [`catalog::Chain`].

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
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

impl ErrorKind {
    /// The kind's snake_case name (`not_found`, `inconsistent`, `unsupported`,
    /// `agent_unavailable`, `busy`, `invalid_input`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Inconsistent => "inconsistent",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::AgentUnavailable => "agent_unavailable",
            ErrorKind::Busy => "busy",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Failed => "failed",
        }
    }
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

    /// Attaches the underlying cause, kept as the `source` (not copied into the message):
    /// [`catalog::Chain`] shows it (`context: cause`), so an operator sees why (e.g. the OS
    /// error of a socket).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What the caller should do about this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without its cause.
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

/// A cause known only by its text (libvirt's message for an error: the `virt` crate's own
/// `Display` adds level, code and domain numbers that tell an operator nothing).
#[derive(Debug)]
pub(crate) struct Cause(pub String);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::Chain;

    #[test]
    fn the_chain_shows_the_cause_once() {
        let os = std::io::Error::from_raw_os_error(2); // ENOENT
        let e = io_failed("cannot connect to qmp socket /run/x.sock", os);
        assert_eq!(
            Chain(&e).to_string(),
            "cannot connect to qmp socket /run/x.sock: No such file or directory (os error 2)"
        );
        assert_eq!(e.to_string(), "cannot connect to qmp socket /run/x.sock");
        assert_eq!(e.message(), e.to_string());
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(Chain(&failed("plain")).to_string(), "plain");
        let lv = failed("vm web").with_source(Cause("Domain not found".into()));
        assert_eq!(Chain(&lv).to_string(), "vm web: Domain not found");
    }

    #[test]
    fn kinds_have_snake_case_names() {
        assert_eq!(ErrorKind::AgentUnavailable.as_str(), "agent_unavailable");
        assert_eq!(
            serde_json::to_string(&ErrorKind::InvalidInput).unwrap(),
            "\"invalid_input\""
        );
    }
}
