//! VM routes: list what the cluster's hypervisors (or one of them) see, with each VM's
//! hypervisor and last backup (naming the hypervisors that could not be asked); show one;
//! trigger a backup.
//!
//! A VM name is resolved by [`crate::daemon::hypervisors::Hypervisors::locate`]: `?hypervisor=NAME` picks
//! the hypervisor, and a name present on several hypervisors without it is a 409.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use catalog::BackupRow;
use proxy::hypervisor::{DomainInfo, VmState};

use super::backups::summary;
use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::http::extract::{OptJson, VmName};
use crate::daemon::names::validate_name;
use crate::daemon::ops::backup::spawn_backup;
use crate::daemon::state::SharedState;
use crate::wire::jobs::JobInfo;
use crate::wire::vms::{BackupRequest, HvQuery, Unreachable, VmDisk, VmInfo, VmList};

type QueryResult = Result<Query<HvQuery>, axum::extract::rejection::QueryRejection>;

/// The checked `hypervisor` of a query.
fn hv_query(q: QueryResult) -> ApiResult<Option<String>> {
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    if let Some(h) = &q.hypervisor {
        validate_name("hypervisor name", h)?;
    }
    Ok(q.hypervisor)
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::ShutOff => "shutoff",
        VmState::Other => "other",
    }
}

fn vm_info(hv: &str, d: DomainInfo, last: &HashMap<String, BackupRow>) -> VmInfo {
    VmInfo {
        last_backup: last.get(&d.uuid).map(|r| summary(r, &d.name)),
        name: d.name,
        hypervisor: hv.to_string(),
        uuid: d.uuid,
        state: state_name(d.state).into(),
        disks: d
            .disks
            .into_iter()
            .map(|k| VmDisk {
                target: k.target,
                format: k.format,
                capacity: k.capacity,
            })
            .collect(),
    }
}

async fn last_backups(st: &SharedState) -> ApiResult<HashMap<String, BackupRow>> {
    let rows = st.repo(|r| r.backups(None)).await?;
    let mut last: HashMap<String, BackupRow> = HashMap::new();
    for r in rows {
        match last.get(&r.vm_uuid) {
            Some(old) if old.finished >= r.finished => {}
            _ => {
                last.insert(r.vm_uuid.clone(), r);
            }
        }
    }
    Ok(last)
}

/// Every VM of every reachable hypervisor; the others are named in `unreachable`.
///
/// With `?hypervisor=NAME` only that hypervisor is asked (404 for a name not configured).
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", params(HvQuery),
    responses((status = 200, body = VmList), (status = 401, body = crate::wire::error::ErrorBody),
        (status = 404, description = "no hypervisor of that name", body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
    q: QueryResult,
) -> ApiResult<Json<VmList>> {
    caller.allow(Action::Read, None)?;
    let listings = match hv_query(q)? {
        Some(name) => {
            let m = st.hypervisors.named(&name)?.clone();
            let r = m.list().await;
            vec![(m, r)]
        }
        None => st.hypervisors.list_all().await,
    };
    let last = last_backups(&st).await?;
    let mut out = VmList {
        vms: Vec::new(),
        unreachable: Vec::new(),
    };
    for (m, r) in listings {
        match r {
            Ok(doms) => out
                .vms
                .extend(doms.into_iter().map(|d| vm_info(m.name(), d, &last))),
            Err(e) => out.unreachable.push(Unreachable {
                hypervisor: m.name().to_string(),
                error: crate::daemon::error::chain(&e),
            }),
        }
    }
    Ok(Json(out))
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{vm}", tag = "vms",
    params(("vm" = String, Path, description = "VM name"), HvQuery),
    responses((status = 200, body = VmInfo), (status = 404, body = crate::wire::error::ErrorBody),
        (status = 409, description = "the name is on several hypervisors: give ?hypervisor=", body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(st): State<SharedState>,
    caller: Caller,
    VmName(vm): VmName,
    q: QueryResult,
) -> ApiResult<Json<VmInfo>> {
    caller.allow(Action::Read, Some(&vm))?;
    let on = hv_query(q)?;
    let (m, dom) = st.hypervisors.locate(&vm, on.as_deref()).await?;
    let last = last_backups(&st).await?;
    Ok(Json(vm_info(m.name(), dom, &last)))
}

/// Starts a backup of a VM; answers with the queued job.
#[utoipa::path(post, path = "/api/v1/vms/{vm}/backups", tag = "vms",
    params(("vm" = String, Path, description = "VM name"), HvQuery),
    request_body = BackupRequest,
    responses((status = 202, body = JobInfo), (status = 404, body = crate::wire::error::ErrorBody),
        (status = 409, description = "the name is on several hypervisors (give ?hypervisor=), or a backup of the VM has not ended", body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn trigger(
    State(st): State<SharedState>,
    caller: Caller,
    VmName(vm): VmName,
    q: QueryResult,
    OptJson(req): OptJson<BackupRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    caller.allow(Action::Backup, Some(&vm))?;
    let on = hv_query(q)?;
    let (m, _) = st.hypervisors.locate(&vm, on.as_deref()).await?;
    let job = spawn_backup(&st, m, &vm, req.mode, None).map_err(|busy| {
        ApiError::conflict(format!(
            "vm {vm} is busy: job {} ({} {}) has not ended; wait for it (sluice job show {}) or cancel it",
            busy.id, busy.kind, busy.mode, busy.id
        ))
    })?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}
