//! `GET /metrics`: Prometheus exposition of job counters and repository figures. It takes a
//! bearer token like every route but health (Prometheus sends one with
//! `authorization: {credentials_file: ...}`); an auditor token is enough.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::ApiResult;
use crate::daemon::jobs::metrics::{Gauges, CONTENT_TYPE};
use crate::daemon::state::SharedState;
use crate::wire::hypervisors::HvState;
use crate::wire::jobs::JobState;

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, content_type = "text/plain; version=0.0.4",
        description = "backups by result, bytes read/stored, job durations, repository size and dedup ratio")),
    security(("bearer" = [])))]
pub async fn metrics(
    State(st): State<SharedState>,
    caller: Caller,
) -> ApiResult<impl IntoResponse> {
    caller.allow(Action::Read, None)?;
    let Json(repo) = super::repo::stats(State(st.clone()), caller).await?;
    let jobs = st.jobs.list();
    let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count() as u64;
    let g = Gauges {
        queued: count(JobState::Queued),
        running: count(JobState::Running),
        policies: st.policies.list().len() as u64,
        backups: repo.backups,
        chunks: repo.chunks,
        logical_bytes: repo.logical_bytes,
        stored_bytes: repo.stored_bytes,
        dedup_ratio: repo.reduction_ratio,
        hypervisors: st
            .hypervisors
            .all()
            .iter()
            .map(|m| (m.name().to_string(), m.info(None).state == HvState::Up))
            .collect(),
    };
    Ok((
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        st.jobs.metrics.render(&g),
    ))
}
