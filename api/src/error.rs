//! The one API error type and its JSON form `{"error":{"code":..,"message":..}}`.
//!
//! HTTP status codes live only here (and in the router's rejections it rewrites).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A failed request: what went wrong (a stable `code`) and what to do (`message`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable code (`not_found`, `forbidden`...).
    pub code: &'static str,
    /// Human message naming the object involved.
    pub message: String,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<catalog::Error> for ApiError {
    fn from(e: catalog::Error) -> Self {
        use catalog::ErrorKind as K;
        let msg = e.to_string();
        match e.kind() {
            K::NotFound => Self::not_found(msg),
            K::InvalidInput => Self::bad_request(msg),
            K::Conflict => Self::conflict(msg),
            K::Locked => Self::new(StatusCode::CONFLICT, "locked", msg),
            K::Corrupt => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", msg),
            K::Io => Self::internal(msg),
        }
    }
}

impl From<proxy::hypervisor::Error> for ApiError {
    fn from(e: proxy::hypervisor::Error) -> Self {
        use proxy::hypervisor::ErrorKind as K;
        let msg = e.to_string();
        match e.kind() {
            K::NotFound => Self::not_found(msg),
            K::InvalidInput => Self::bad_request(msg),
            K::Busy => Self::conflict(msg),
            _ => Self::new(StatusCode::BAD_GATEWAY, "hypervisor", msg),
        }
    }
}
