//! Backup routes: list (by VM), show, delete, protect.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use catalog::{BackupMode, BackupRow, Consistency, Manifest, VmStateAtBackup};

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::http::extract::{ApiJson, BackupIdPath};
use crate::daemon::names::validate_name;
use crate::daemon::state::SharedState;
use crate::wire::backups::BackupDetail;
use crate::wire::backups::BackupDisk;
use crate::wire::backups::BackupSummary;
use crate::wire::backups::ListQuery;
use crate::wire::backups::ProtectRequest;

/// A catalog row as the API shows it.
pub fn summary(r: &BackupRow, vm: &str) -> BackupSummary {
    BackupSummary {
        id: r.id.to_string(),
        vm: vm.to_string(),
        vm_uuid: r.vm_uuid.clone(),
        started: r.started,
        finished: r.finished,
        mode: r.mode.clone(),
        reason: r.reason.clone(),
        protected: r.protected,
        bytes_stored: r.bytes_stored,
    }
}

fn detail(m: &Manifest, protected: bool) -> BackupDetail {
    let (mode, reason) = match &m.mode {
        BackupMode::Full => ("full", None),
        BackupMode::Incremental => ("incremental", None),
        BackupMode::FullBecause(r) => ("full_because", Some(r.clone())),
    };
    BackupDetail {
        summary: BackupSummary {
            id: m.id.to_string(),
            vm: m.vm.name.clone(),
            vm_uuid: m.vm.uuid.clone(),
            started: m.started,
            finished: m.finished,
            mode: mode.into(),
            reason,
            protected,
            bytes_stored: m.stats.bytes_stored,
        },
        consistency: match m.consistency {
            Consistency::Application => "application",
            Consistency::Crash => "crash",
        }
        .into(),
        vm_state: m.vm_state.map(|s| {
            match s {
                VmStateAtBackup::Running => "running",
                VmStateAtBackup::ShutOff => "shut_off",
                VmStateAtBackup::StartedPaused => "started_paused",
            }
            .into()
        }),
        disks: m
            .disks
            .iter()
            .map(|d| BackupDisk {
                target: d.target.clone(),
                size: d.size,
                chunk_size: d.chunk_size,
                checkpoint: d.checkpoint.clone(),
                parent_backup: d.parent_backup.as_ref().map(|p| p.to_string()),
                full_read: d.full_read.clone(),
            })
            .collect(),
        chunks_new: m.stats.chunks_new,
        chunks_dedup: m.stats.chunks_dedup,
        chunks_zero: m.stats.chunks_zero,
        bytes_new_raw: m.stats.bytes_new_raw,
    }
}

/// VM names by uuid, as the catalog remembers them.
async fn vm_names(st: &SharedState) -> ApiResult<HashMap<String, String>> {
    let vms = st.repo(|r| r.with_catalog(|c| c.vms())).await?;
    Ok(vms.into_iter().collect())
}

/// The uuids of the backed-up VMs called `vm` (or whose uuid is `vm`), sorted: VMs of one
/// name on several hypervisors are several VMs. None is 404.
pub(crate) async fn uuids_named(st: &SharedState, vm: &str) -> ApiResult<Vec<String>> {
    validate_name("vm name", vm)?;
    let names = vm_names(st).await?;
    let mut uuids: Vec<String> = names
        .into_iter()
        .filter(|(u, n)| n == vm || u == vm)
        .map(|(u, _)| u)
        .collect();
    if uuids.is_empty() {
        return Err(ApiError::not_found(format!("vm {vm} has no backups")));
    }
    uuids.sort();
    Ok(uuids)
}

/// Backups, newest first, optionally of one VM.
#[utoipa::path(get, path = "/api/v1/backups", tag = "backups", params(ListQuery),
    responses((status = 200, body = [BackupSummary]), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<BackupSummary>>> {
    caller.allow(Action::Read, None)?;
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let names = vm_names(&st).await?;
    let uuids = match &q.vm {
        None => None,
        Some(vm) => Some(uuids_named(&st, vm).await?),
    };
    let mut rows = st.repo(move |r| r.backups(None)).await?;
    if let Some(u) = uuids {
        rows.retain(|r| u.contains(&r.vm_uuid));
    }
    rows.sort_by(|a, b| b.started.cmp(&a.started).then(b.id.cmp(&a.id)));
    let out = rows
        .iter()
        .map(|r| summary(r, names.get(&r.vm_uuid).map_or("", |s| s.as_str())))
        .collect();
    Ok(Json(out))
}

async fn load(st: &SharedState, id: catalog::BackupId) -> ApiResult<BackupDetail> {
    let (m, rows) = st
        .repo(move |r| Ok((r.manifest(&id)?, r.backups(None)?)))
        .await?;
    let protected = rows.iter().any(|r| r.id == m.id && r.protected);
    Ok(detail(&m, protected))
}

/// One backup.
#[utoipa::path(get, path = "/api/v1/backups/{id}", tag = "backups",
    params(("id" = String, Path, description = "backup id")),
    responses((status = 200, body = BackupDetail), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(st): State<SharedState>,
    caller: Caller,
    BackupIdPath(id): BackupIdPath,
) -> ApiResult<Json<BackupDetail>> {
    caller.allow(Action::Read, None)?;
    Ok(Json(load(&st, id).await?))
}

/// Deletes a backup (refused while it is protected); GC reclaims its chunks.
#[utoipa::path(delete, path = "/api/v1/backups/{id}", tag = "backups",
    params(("id" = String, Path, description = "backup id")),
    responses((status = 204), (status = 404, body = crate::wire::error::ErrorBody), (status = 409, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(st): State<SharedState>,
    caller: Caller,
    BackupIdPath(id): BackupIdPath,
) -> ApiResult<StatusCode> {
    caller.allow(Action::Modify, None)?;
    let d = load(&st, id.clone()).await?;
    if d.summary.protected {
        return Err(ApiError::conflict(format!(
            "backup {id} is protected; unprotect it first"
        )));
    }
    st.repo(move |r| r.remove_backup(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Protects a backup from prune and delete, or lifts that.
#[utoipa::path(put, path = "/api/v1/backups/{id}/protection", tag = "backups",
    params(("id" = String, Path, description = "backup id")),
    request_body = ProtectRequest,
    responses((status = 200, body = BackupDetail), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn protect(
    State(st): State<SharedState>,
    caller: Caller,
    BackupIdPath(id): BackupIdPath,
    ApiJson(req): ApiJson<ProtectRequest>,
) -> ApiResult<Json<BackupDetail>> {
    caller.allow(Action::Modify, None)?;
    let id2 = id.clone();
    st.repo(move |r| r.set_protected(&id2, req.protected))
        .await?;
    Ok(Json(load(&st, id).await?))
}
