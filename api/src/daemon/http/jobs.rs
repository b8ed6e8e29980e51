//! Job routes: list, show with live progress, a Server-Sent Events stream of it, cancel.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::state::SharedState;
use crate::wire::jobs::JobInfo;

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
    responses((status = 200, body = JobInfo), (status = 404, body = crate::wire::error::ErrorBody)),
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
    responses((status = 200, body = JobInfo), (status = 404, body = crate::wire::error::ErrorBody)),
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

/// How often the event stream sends a progress snapshot while nothing changes state.
pub const EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

fn job_event(info: &JobInfo) -> Event {
    let name = if info.state.is_final() {
        "end"
    } else {
        "progress"
    };
    Event::default()
        .event(name)
        .json_data(info)
        .unwrap_or_else(|_| Event::default().comment("job could not be encoded"))
}

/// Server-Sent Events of one job: a `progress` event (the job, as `GET /jobs/{id}` shows it)
/// at once, then on every state change and every 500 ms, and a final `end` event once the job
/// has ended, after which the stream closes.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, content_type = "text/event-stream",
        description = "`event: progress` / `event: end`, each `data:` a JobInfo"),
        (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = job_id(p)?;
    let job = st.jobs.get(id);
    caller.allow(Action::ReadJob, job.as_ref().map(|j| j.vm.as_str()))?;
    if job.is_none() {
        return Err(ApiError::not_found(format!("job {id} does not exist")));
    }
    let stream = futures_util::stream::unfold(Some((st, true)), move |s| async move {
        let (st, first) = s?;
        if !first {
            let changed = st.jobs.changed();
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(EVENT_INTERVAL) => {}
            }
        }
        let info = st.jobs.get(id)?;
        let next = (!info.state.is_final()).then_some((st, false));
        Some((Ok(job_event(&info)), next))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
