//! VM routes: list what the cluster's hypervisors (or one of them) see, with each VM's
//! hypervisor and last backup (naming the hypervisors that could not be asked); show one;
//! trigger a backup.
//!
//! A VM name is resolved by [`crate::hv::Hypervisors::locate`]: `?hypervisor=NAME` picks
//! the hypervisor, and a name present on several hypervisors without it is a 409.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use catalog::BackupRow;
use proxy::hypervisor::{DomainInfo, VmState};
use proxy::job::{BackupOptions, ErrorKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::backups::{summary, BackupSummary};
use crate::auth::{Action, Caller};
use crate::error::ApiError;
use crate::error::ApiResult;
use crate::extract::{validate_name, OptJson, VmName};
use crate::hv::Member;
use crate::jobs::{JobHandle, JobInfo, JobOutcome, JobSpec};
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
    /// The hypervisor it runs on.
    pub hypervisor: String,
    pub uuid: String,
    /// `running`, `paused`, `shutoff` or `other`.
    pub state: String,
    pub disks: Vec<VmDisk>,
    pub last_backup: Option<BackupSummary>,
}

/// A hypervisor whose VMs could not be listed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Unreachable {
    pub hypervisor: String,
    pub error: String,
}

/// The VMs of every reachable hypervisor, and the hypervisors that could not be asked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
    /// Empty when every hypervisor answered.
    pub unreachable: Vec<Unreachable>,
}

/// Which hypervisor a VM name means (needed only when it is on several).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HvQuery {
    /// Hypervisor name (see `GET /api/v1/hypervisors`).
    pub hypervisor: Option<String>,
}

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
    responses((status = 200, body = VmList), (status = 401, body = crate::error::ErrorBody),
        (status = 404, description = "no hypervisor of that name", body = crate::error::ErrorBody)),
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
                error: e.to_string(),
            }),
        }
    }
    Ok(Json(out))
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{vm}", tag = "vms",
    params(("vm" = String, Path, description = "VM name"), HvQuery),
    responses((status = 200, body = VmInfo), (status = 404, body = crate::error::ErrorBody),
        (status = 409, description = "the name is on several hypervisors: give ?hypervisor=", body = crate::error::ErrorBody)),
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
    responses((status = 202, body = JobInfo), (status = 404, body = crate::error::ErrorBody),
        (status = 409, description = "the name is on several hypervisors (give ?hypervisor=), or a backup of the VM has not ended", body = crate::error::ErrorBody)),
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

/// Queues a backup of `vm` on hypervisor `m` (started by `policy`, if given); refused with
/// the job that holds the VM if one has not ended.
pub(crate) fn spawn_backup(
    st: &SharedState,
    m: Arc<Member>,
    vm: &str,
    mode: BackupModeRequest,
    policy: Option<crate::policy::Policy>,
) -> Result<JobInfo, Box<JobInfo>> {
    let name = if mode == BackupModeRequest::Full {
        "full"
    } else {
        "auto"
    };
    let mut spec = JobSpec::new("backup", vm, name).on(m.name(), &m.spec.host);
    if let Some(p) = &policy {
        spec = spec.for_policy(&p.name);
    }
    let (state, vm) = (st.clone(), vm.to_string());
    st.jobs.start_exclusive(spec, move |h| async move {
        match policy {
            Some(p) => crate::scheduler::policy_job(state, p, m, vm, h).await,
            None => backup_job(state, m, vm, mode, h).await,
        }
    })
}

pub(crate) async fn backup_job(
    st: SharedState,
    m: Arc<Member>,
    vm: String,
    mode: BackupModeRequest,
    h: JobHandle,
) -> JobOutcome {
    let mut opts = BackupOptions::new(st.work_dir.clone());
    opts.force_full = mode == BackupModeRequest::Full;
    opts.read_limit = st.read_limit.clone();
    let hv = m.hv().await.map_err(|e| (e.to_string(), false))?;
    let run = hv.backup(st.repo.clone(), vm, opts, h.progress, h.cancel);
    match run.await {
        Ok(rep) => Ok(rep.manifest.id.to_string()),
        Err(e) => Err((e.to_string(), e.kind() == ErrorKind::Cancelled)),
    }
}
