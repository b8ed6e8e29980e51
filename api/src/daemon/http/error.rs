//! The HTTP face of [`ApiError`]: each [`Status`] class becomes one status code, and the body
//! is `{"error":{"code":..,"message":..}}`. HTTP status codes live only in this room.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::daemon::error::{ApiError, Status};

/// The status code of a failure class.
pub fn status_code(s: Status) -> StatusCode {
    match s {
        Status::BadRequest => StatusCode::BAD_REQUEST,
        Status::Unauthorized => StatusCode::UNAUTHORIZED,
        Status::Forbidden => StatusCode::FORBIDDEN,
        Status::NotFound => StatusCode::NOT_FOUND,
        Status::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Status::Conflict => StatusCode::CONFLICT,
        Status::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Status::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Status::BadGateway => StatusCode::BAD_GATEWAY,
        Status::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_code(self.status), Json(self.body())).into_response()
    }
}
