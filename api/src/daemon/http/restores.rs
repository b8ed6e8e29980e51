//! Restore route: checks the caller and hands the request to `ops::restore`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::ApiResult;
use crate::daemon::http::extract::ApiJson;
use crate::daemon::ops;
use crate::daemon::state::SharedState;
use crate::wire::jobs::JobInfo;
use crate::wire::restores::RestoreRequest;

/// Starts a restore (to a file, as a new domain, or onto the VM's own disks); answers with the queued job.
#[utoipa::path(post, path = "/api/v1/restores", tag = "restores", request_body = RestoreRequest,
    responses((status = 202, body = JobInfo), (status = 400, body = crate::wire::error::ErrorBody),
        (status = 404, body = crate::wire::error::ErrorBody), (status = 409, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(st): State<SharedState>,
    caller: Caller,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    caller.allow(Action::Restore, None)?;
    let info = ops::restore::start(&st, req).await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}
