//! The one error type of `proxy::nbd`, with a small [`ErrorKind`] that tells the caller what to
//! do about it.
//!
//! Owns error construction helpers; it does not own the mapping to NBD wire error numbers
//! (that is `proto::Errno`). A message never repeats its cause: the cause (an OS error, a TLS
//! failure) is the `source`, and the edges print the chain with [`catalog::Chain`].

use std::sync::Arc;

/// What went wrong, in terms of what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The connection failed or closed (socket error, EOF, TLS failure during transfer). A new
    /// connection may succeed: retrying can help.
    Connection,
    /// The peer sent something the protocol does not allow (bad magic, impossible length,
    /// unknown cookie). The connection is closed; retrying the same peer is unlikely to help.
    Protocol,
    /// The server refused an option during the handshake (unknown export, unsupported
    /// feature, TLS required, policy). Nothing was transferred.
    Refused,
    /// The server answered a transmission request with an error (for instance `EIO` from a
    /// failing disk). The connection is still usable.
    Remote,
    /// The caller asked for something impossible (a range past the end of the export, a
    /// misaligned request, a write to a read-only export). Nothing was sent.
    InvalidArgument,
    /// TLS could not be set up (bad certificate file, failed handshake).
    Tls,
}

impl ErrorKind {
    /// The kind's snake_case name (`connection`, `protocol`, `refused`, `remote`,
    /// `invalid_argument`, `tls`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Refused => "refused",
            ErrorKind::Remote => "remote",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Tls => "tls",
        }
    }
}

/// An NBD error: a kind, a lowercase message naming the export, offset or message involved,
/// and optionally the underlying cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// The NBD error number for [`ErrorKind::Remote`] errors (e.g. 5 for `EIO`).
    errno: Option<u32>,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias for `proxy::nbd`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            errno: None,
            source: None,
        }
    }

    /// A malformed-message error.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, message)
    }

    /// A caller error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// An error the server returned for a request, with its NBD error number.
    pub fn remote(errno: u32, message: impl Into<String>) -> Self {
        Error {
            errno: Some(errno),
            ..Self::new(ErrorKind::Remote, message)
        }
    }

    /// A connection-level error caused by `source`.
    pub fn connection(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::new(ErrorKind::Connection, message).with_source(source)
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The NBD error number the server sent, for [`ErrorKind::Remote`] errors.
    pub fn errno(&self) -> Option<u32> {
        self.errno
    }

    /// The message, without the source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with `context: ` put in front of its message (the same failure
    /// described more fully; not a cause).
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// Turn an I/O error while talking to `what` into a connection error, the I/O error its
/// source.
pub(crate) fn io_error(what: &str, err: std::io::Error) -> Error {
    match err.kind() {
        // The OS's text ("failed to fill whole buffer") says less than this.
        std::io::ErrorKind::UnexpectedEof => Error::new(
            ErrorKind::Connection,
            format!("{what}: connection closed by peer"),
        ),
        _ => Error::new(ErrorKind::Connection, what).with_source(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::Chain;

    #[test]
    fn io_errors_keep_the_os_reason_as_the_source() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let e = io_error("connecting to nbd server /run/x.sock", refused);
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert_eq!(e.to_string(), "connecting to nbd server /run/x.sock");
        assert_eq!(
            Chain(&e).to_string(),
            "connecting to nbd server /run/x.sock: Connection refused (os error 111)"
        );
        let eof = io_error("reading reply", std::io::ErrorKind::UnexpectedEof.into());
        assert_eq!(
            Chain(&eof).to_string(),
            "reading reply: connection closed by peer"
        );
        assert_eq!(ErrorKind::InvalidArgument.as_str(), "invalid_argument");
    }
}
