//! `GET /api/v1/hypervisors`: the cluster's hypervisors, each asked for its VMs now (all at
//! once, a down one bounded by its timeouts), with its state, last error and VM count.

use axum::extract::State;
use axum::Json;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::ApiResult;
use crate::daemon::state::SharedState;
use crate::wire::hypervisors::HypervisorInfo;

/// Every configured hypervisor, in configuration order.
#[utoipa::path(get, path = "/api/v1/hypervisors", tag = "hypervisors",
    responses((status = 200, body = [HypervisorInfo]), (status = 401, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
) -> ApiResult<Json<Vec<HypervisorInfo>>> {
    caller.allow(Action::Read, None)?;
    st.hypervisors.list_all().await;
    let limits = st.jobs.limits();
    let out = st
        .hypervisors
        .all()
        .iter()
        .map(|m| m.info(limits.of_host(&m.spec.host)))
        .collect();
    Ok(Json(out))
}
