//! The daemon's one error type: what went wrong (a [`Status`] class and a stable `code`) and
//! what to do (`message`). Operations and the HTTP room share it; only the HTTP room turns
//! a [`Status`] into a status code (`http/error.rs`), so nothing here knows HTTP.

use crate::wire::error::{ErrorBody, ErrorDetail};

/// The class of a failed request; the HTTP room maps each to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    TooLarge,
    Unavailable,
    /// The hypervisor failed or could not be reached.
    BadGateway,
    Internal,
}

/// A failed request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Which class of failure (becomes the HTTP status).
    pub status: Status,
    /// Stable, machine-readable code (`not_found`, `forbidden`...).
    pub code: &'static str,
    /// Human message naming the object involved, with its whole cause chain.
    pub message: String,
}

/// Result of an operation or a handler.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: Status, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Status::BadRequest, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(Status::Unauthorized, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Status::Forbidden, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Status::NotFound, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Status::Conflict, "conflict", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(Status::TooLarge, "payload_too_large", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Status::Unavailable, "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Status::Internal, "internal", message)
    }

    /// The body an HTTP answer carries.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl From<catalog::Error> for ApiError {
    fn from(e: catalog::Error) -> Self {
        use catalog::ErrorKind as K;
        let msg = chain(&e);
        match e.kind() {
            K::NotFound => Self::not_found(msg),
            K::InvalidInput => Self::bad_request(msg),
            K::Conflict => Self::conflict(msg),
            K::Locked => Self::new(Status::Conflict, "locked", msg),
            K::Corrupt => Self::new(Status::Internal, "corrupt", msg),
            K::Io => Self::internal(msg),
        }
    }
}

impl From<proxy::hypervisor::Error> for ApiError {
    fn from(e: proxy::hypervisor::Error) -> Self {
        use proxy::hypervisor::ErrorKind as K;
        let msg = chain(&e);
        match e.kind() {
            K::NotFound => Self::not_found(msg),
            K::InvalidInput => Self::bad_request(msg),
            K::Busy => Self::conflict(msg),
            _ => Self::new(Status::BadGateway, "hypervisor", msg),
        }
    }
}

/// An error's message followed by each of its causes (`msg: cause: cause`), each once
/// ([`catalog::Chain`]): what every edge of the daemon (answers, job messages, logs) prints.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    catalog::Chain(e).to_string()
}
