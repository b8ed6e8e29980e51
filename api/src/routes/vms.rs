//! VM routes: list what the hypervisor sees, with each VM's last backup; trigger a backup.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use catalog::BackupRow;
use proxy::hypervisor::{DomainInfo, VmState};
use proxy::job::{BackupOptions, ErrorKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::backups::{summary, BackupSummary};
use crate::auth::{Action, Caller};
use crate::error::ApiResult;
use crate::extract::{OptJson, VmName};
use crate::jobs::{JobHandle, JobInfo, JobOutcome};
use crate::state::SharedState;

/// One disk of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmDisk {
    pub target: String,
    pub format: Option<String>,
    /// Bytes.
    pub capacity: u64,
}

/// A VM as the hypervisor reports it, with its last backup.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub name: String,
    pub uuid: String,
    /// `running`, `paused`, `shutoff` or `other`.
    pub state: String,
    pub disks: Vec<VmDisk>,
    pub last_backup: Option<BackupSummary>,
}

/// How to take a backup.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackupModeRequest {
    /// Incremental when change tracking allows, else full (and say why).
    #[default]
    Auto,
    /// Read every disk in full.
    Full,
}

/// Body of a backup request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    #[serde(default)]
    pub mode: BackupModeRequest,
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::ShutOff => "shutoff",
        VmState::Other => "other",
    }
}

fn vm_info(d: DomainInfo, last: &HashMap<String, BackupRow>) -> VmInfo {
    VmInfo {
        last_backup: last.get(&d.uuid).map(|r| summary(r, &d.name)),
        name: d.name,
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

/// Every VM the hypervisor sees.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    responses((status = 200, body = [VmInfo]), (status = 401, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(st): State<SharedState>, caller: Caller) -> ApiResult<Json<Vec<VmInfo>>> {
    caller.allow(Action::Read, None)?;
    let doms = st.hv.list().await?;
    let last = last_backups(&st).await?;
    Ok(Json(doms.into_iter().map(|d| vm_info(d, &last)).collect()))
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{vm}", tag = "vms",
    params(("vm" = String, Path, description = "VM name")),
    responses((status = 200, body = VmInfo), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(st): State<SharedState>,
    caller: Caller,
    VmName(vm): VmName,
) -> ApiResult<Json<VmInfo>> {
    caller.allow(Action::Read, Some(&vm))?;
    let dom = st.hv.domain(&vm).await?;
    let last = last_backups(&st).await?;
    Ok(Json(vm_info(dom, &last)))
}

/// Starts a backup of a VM; answers with the queued job.
#[utoipa::path(post, path = "/api/v1/vms/{vm}/backups", tag = "vms",
    params(("vm" = String, Path, description = "VM name")),
    request_body = BackupRequest,
    responses((status = 202, body = JobInfo), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn trigger(
    State(st): State<SharedState>,
    caller: Caller,
    VmName(vm): VmName,
    OptJson(req): OptJson<BackupRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    caller.allow(Action::Backup, Some(&vm))?;
    st.hv.domain(&vm).await?;
    let mode = if req.mode == BackupModeRequest::Full {
        "full"
    } else {
        "auto"
    };
    let state = st.clone();
    let name = vm.clone();
    let info = st
        .jobs
        .spawn(&vm, mode, move |h| backup_job(state, name, req.mode, h));
    Ok((StatusCode::ACCEPTED, Json(info)))
}

pub(crate) async fn backup_job(
    st: SharedState,
    vm: String,
    mode: BackupModeRequest,
    h: JobHandle,
) -> JobOutcome {
    let mut opts = BackupOptions::new(st.work_dir.clone());
    opts.force_full = mode == BackupModeRequest::Full;
    opts.read_limit = st.read_limit.clone();
    let run = st
        .hv
        .clone()
        .backup(st.repo.clone(), vm, opts, h.progress, h.cancel);
    match run.await {
        Ok(rep) => Ok(rep.manifest.id.to_string()),
        Err(e) => Err((e.to_string(), e.kind() == ErrorKind::Cancelled)),
    }
}
