//! Job routes: list, show with live progress, cancel.

use axum::extract::{Path, State};
use axum::Json;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::jobs::JobInfo;
use crate::state::SharedState;

fn job_id(p: Result<Path<u64>, axum::extract::rejection::PathRejection>) -> ApiResult<u64> {
    p.map(|Path(id)| id)
        .map_err(|_| ApiError::bad_request("job id must be a positive integer"))
}

/// Every job, newest first.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    responses((status = 200, body = [JobInfo])), security(("bearer" = [])))]
pub async fn list(State(st): State<SharedState>, caller: Caller) -> ApiResult<Json<Vec<JobInfo>>> {
    caller.allow(Action::Read, None)?;
    Ok(Json(st.jobs.list()))
}

/// One job with its progress (scoped tokens: jobs of VMs in scope).
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobInfo), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<JobInfo>> {
    let id = job_id(p)?;
    let job = st.jobs.get(id);
    caller.allow(Action::ReadJob, job.as_ref().map(|j| j.vm.as_str()))?;
    job.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("job {id} does not exist")))
}

/// Asks a job to stop; it ends as `cancelled` once it has released its resources.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobInfo), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<JobInfo>> {
    caller.allow(Action::Cancel, None)?;
    let id = job_id(p)?;
    st.jobs
        .cancel(id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("job {id} does not exist")))
}
