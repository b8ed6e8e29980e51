//! Token routes (admin only): create (the secret is shown once), list, revoke.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::http::extract::ApiJson;
use crate::daemon::names::validate_name;
use crate::daemon::state::SharedState;
use crate::wire::tokens::CreateToken;
use crate::wire::tokens::CreatedToken;
use crate::wire::tokens::{Role, TokenInfo};

/// Most VM patterns one scoped token may carry.
const MAX_SCOPE: usize = 64;

/// Creates a token.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(st): State<SharedState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    caller.allow(Action::Tokens, None)?;
    validate_name("token name", &req.name)?;
    let scoped = req.role == Role::Scoped;
    if scoped == req.vms.is_empty() {
        return Err(ApiError::bad_request(
            "a scoped token needs at least one vm pattern, and only scoped tokens take vms",
        ));
    }
    if req.vms.len() > MAX_SCOPE {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_SCOPE} vm patterns"
        )));
    }
    for v in &req.vms {
        validate_name("vm pattern", v)?;
    }
    let (info, token) =
        tokio::task::spawn_blocking(move || st.tokens.create(&req.name, req.role, req.vms))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    tracing::info!(token = %info.id, role = ?info.role, "token created");
    Ok((StatusCode::CREATED, Json(CreatedToken { info, token })))
}

/// Every token (without secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses((status = 200, body = [TokenInfo])), security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenInfo>>> {
    caller.allow(Action::Tokens, None)?;
    Ok(Json(st.tokens.list()))
}

/// Revokes a token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "token id")),
    responses((status = 204), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(st): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.allow(Action::Tokens, None)?;
    validate_name("token id", &id)?;
    st.tokens.revoke(&id)?;
    tracing::info!(token = %id, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}
