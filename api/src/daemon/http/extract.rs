//! Request extractors that answer in the API's JSON error shape: the authenticated caller,
//! JSON bodies (size-limited, unknown fields refused by the types), and validated names.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::daemon::auth::Caller;
use crate::daemon::error::ApiError;
use crate::daemon::names::validate_name;
use crate::daemon::state::SharedState;

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must read `Bearer <token>`")
            })?;
        let token = token.trim().to_string();
        let state = state.clone();
        // argon2 verification is CPU work: keep it off the async workers.
        let caller = tokio::task::spawn_blocking(move || state.tokens.authenticate(&token))
            .await
            .map_err(|e| ApiError::internal(format!("token check failed: {e}")))??;
        if let Some(seen) = parts.extensions.get::<super::audit::Authenticated>() {
            seen.set(&caller.token_id);
        }
        Ok(caller)
    }
}

/// A JSON body whose errors come back as API errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(json_error(e)),
        }
    }
}

fn json_error(e: JsonRejection) -> ApiError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(format!(
            "request body too large (limit {} bytes)",
            BODY_LIMIT
        )),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::bad_request("the request body must be JSON (Content-Type: application/json)")
        }
        _ => ApiError::bad_request(format!("invalid JSON body: {}", e.body_text())),
    }
}

/// A VM name from the path, validated.
#[derive(Debug, Clone)]
pub struct VmName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(path_error)?;
        validate_name("vm name", &name)?;
        Ok(VmName(name))
    }
}

/// A backup id from the path, validated.
#[derive(Debug, Clone)]
pub struct BackupIdPath(pub catalog::BackupId);

impl<S: Send + Sync> FromRequestParts<S> for BackupIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(path_error)?;
        let id = catalog::BackupId::parse(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(BackupIdPath(id))
    }
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::bad_request(format!("invalid path: {}", e.body_text()))
}

/// A JSON body that may be empty (then `T::default()`); errors as API errors.
#[derive(Debug)]
pub struct OptJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(format!(
                    "request body too large (limit {} bytes)",
                    BODY_LIMIT
                )),
                _ => ApiError::bad_request(format!("reading the request body: {}", e.body_text())),
            })?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(OptJson(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(OptJson)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}
