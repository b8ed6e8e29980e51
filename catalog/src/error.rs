//! The crate's one error type and its small [`ErrorKind`] telling the caller what to do, and
//! [`Chain`], the printer of an error with its causes that every edge of Sluice uses.
//!
//! One rule for causes, in this crate and the crates above it: a message names what was being
//! done and the object involved, and never repeats its cause; the cause is kept as
//! [`std::error::Error::source`], and the edges (API answers, job messages, logs, the CLI)
//! print the whole chain once with [`Chain`], so an OS reason ("Permission denied") is never
//! lost. ([`Error::context`] is not a cause: it describes the same failure more fully.)
//!
//! Owns error construction helpers; does not own logging (callers decide what to log).

use std::fmt;

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
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

impl ErrorKind {
    /// The kind's snake_case name (`not_found`, `corrupt`, `io`, `locked`, `conflict`,
    /// `invalid_input`), as machine-readable answers carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
            ErrorKind::Locked => "locked",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidInput => "invalid_input",
        }
    }
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

    /// Prefix the message with more context (`what: message`), keeping kind and source: the
    /// same failure described more fully, not a new layer of the chain.
    pub(crate) fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Displays an error and every cause under it once: `message: cause: cause's cause`.
///
/// A cause whose text is already the tail of what was printed (an error that shows its own
/// source, as some foreign ones do) is not printed again; neither is an empty one.
/// `Chain(&e).to_string()` is what an edge shows or logs.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut printed = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() && !ends_with_part(&printed, &text) {
                if !printed.is_empty() {
                    printed.push_str(": ");
                }
                printed.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&printed)
    }
}

/// Whether `text` is all of `printed` or its last `: `-separated part(s).
fn ends_with_part(printed: &str, text: &str) -> bool {
    printed == text
        || printed
            .strip_suffix(text)
            .is_some_and(|head| head.ends_with(": "))
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose text is fixed and whose source is `source`.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<dyn std::error::Error + 'static>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref()
        }
    }

    #[test]
    fn chain_prints_every_cause_once() {
        let os = std::io::Error::from_raw_os_error(13); // EACCES
        let e = Error::io("opening object packs/ab/abcd", os).context("chunk 00ff");
        assert_eq!(
            Chain(&e).to_string(),
            "chunk 00ff: opening object packs/ab/abcd: Permission denied (os error 13)"
        );
        assert_eq!(e.to_string(), "chunk 00ff: opening object packs/ab/abcd");
        let plain = Error::invalid("range past the end of disk vda");
        assert_eq!(Chain(&plain).to_string(), plain.to_string());
        assert_eq!(e.kind().as_str(), "io");
        assert_eq!(
            serde_json::to_value(ErrorKind::InvalidInput).unwrap(),
            "invalid_input"
        );
        let three = Layer(
            "a",
            Some(Box::new(Layer("b", Some(Box::new(Layer("c", None)))))),
        );
        assert_eq!(Chain(&three).to_string(), "a: b: c");
    }

    #[test]
    fn chain_skips_a_cause_already_printed_and_empty_ones() {
        // A foreign error that prints its own source ("x: y") and also returns it.
        let repeats = Layer("x: y", Some(Box::new(Layer("y", None))));
        assert_eq!(Chain(&repeats).to_string(), "x: y");
        let nested = Layer("top", Some(Box::new(repeats)));
        assert_eq!(Chain(&nested).to_string(), "top: x: y");
        // Only a whole part counts: "os error 2" does not end "... (os error 2)".
        let part = Layer(
            "socket (os error 2)",
            Some(Box::new(Layer("os error 2)", None))),
        );
        assert_eq!(Chain(&part).to_string(), "socket (os error 2): os error 2)");
        let empty = Layer(
            "top",
            Some(Box::new(Layer("", Some(Box::new(Layer("z", None)))))),
        );
        assert_eq!(Chain(&empty).to_string(), "top: z");
        let top_empty = Layer("", Some(Box::new(Layer("z", None))));
        assert_eq!(Chain(&top_empty).to_string(), "z");
    }
}
