//! Policy routes: apply (validate and install) a policy file, list, show, delete.
//!
//! Applying takes the file's text, not JSON fields, so the server validates exactly what the
//! user wrote and every error names its line and column. Writing is for admins; every role
//! but scoped tokens may read.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::clock::now;
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::http::extract::ApiJson;
use crate::daemon::state::SharedState;
use crate::wire::policy::ApplyPolicyRequest;
use crate::wire::policy::ApplyPolicyResponse;
use crate::wire::policy::{self, PolicyError, PolicyInfo};

/// A 400 `invalid_policy` naming every error with its line and column.
pub fn invalid(errors: &[PolicyError]) -> ApiError {
    let mut e = ApiError::bad_request(format!("invalid policy: {}", policy::describe(errors)));
    e.code = "invalid_policy";
    e
}

fn policy_name(
    p: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<String> {
    let Path(name) =
        p.map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))?;
    crate::daemon::names::validate_name("policy name", &name)?;
    Ok(name)
}

/// Validates a policy file and installs it (replacing a policy of the same name).
#[utoipa::path(post, path = "/api/v1/policies", tag = "policies", request_body = ApplyPolicyRequest,
    responses((status = 200, body = ApplyPolicyResponse),
        (status = 400, description = "`invalid_policy`: every error with its line", body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn apply(
    State(st): State<SharedState>,
    caller: Caller,
    ApiJson(req): ApiJson<ApplyPolicyRequest>,
) -> ApiResult<Json<ApplyPolicyResponse>> {
    caller.allow(Action::Modify, None)?;
    let parsed = policy::parse(&req.source).map_err(|e| invalid(&e))?;
    let name = parsed.name.clone();
    let created = if req.dry_run {
        st.policies.get(&name).is_none()
    } else {
        st.policies.apply(parsed.clone(), &req.source, now())?
    };
    let info = match st.policies.get(&name) {
        Some(info) if !req.dry_run => info,
        _ => PolicyInfo {
            policy: parsed,
            source: req.source,
            applied: now(),
            last_run: None,
            next_run: None,
        },
    };
    if !req.dry_run {
        tracing::info!(policy = %name, created, "policy applied");
    }
    Ok(Json(ApplyPolicyResponse {
        policy: info,
        created,
        dry_run: req.dry_run,
    }))
}

/// Every installed policy.
#[utoipa::path(get, path = "/api/v1/policies", tag = "policies",
    responses((status = 200, body = [PolicyInfo])), security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
) -> ApiResult<Json<Vec<PolicyInfo>>> {
    caller.allow(Action::Read, None)?;
    Ok(Json(st.policies.list()))
}

/// One policy, with its source and next run.
#[utoipa::path(get, path = "/api/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path, description = "policy name")),
    responses((status = 200, body = PolicyInfo), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<PolicyInfo>> {
    caller.allow(Action::Read, None)?;
    let name = policy_name(p)?;
    st.policies
        .get(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("policy {name} does not exist")))
}

/// Removes a policy (its backups stay).
#[utoipa::path(delete, path = "/api/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path, description = "policy name")),
    responses((status = 204), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<StatusCode> {
    caller.allow(Action::Modify, None)?;
    let name = policy_name(p)?;
    st.policies.delete(&name)?;
    tracing::info!(policy = %name, "policy deleted");
    Ok(StatusCode::NO_CONTENT)
}
