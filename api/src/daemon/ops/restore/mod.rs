//! Restores, each a background job with progress: a backup disk to an image file (raw or
//! qcow2) on the proxy host, a whole backup as a new libvirt domain (its disks volumes of a
//! storage pool on the hypervisor, uploaded over the libvirt connection, or files of the
//! proxy for a local hypervisor), or a backup written back onto its own shut-off VM's disks
//! (confirmed explicitly); an instant recovery (a new domain running straight from the
//! repository) is `instant`'s.
//!
//! `start` checks the request and plans the restore (`Plan`); `jobs` runs it; `staging` owns
//! the checks on what a restore may write: target paths are absolute, free of `..` and NUL,
//! inside one of the configured restore directories (`restore_dirs`), and never replace an
//! existing file unless `overwrite` is asked. Data is written into a private staging
//! directory beside the target and moved into place only when complete, so a failed or
//! cancelled restore leaves nothing behind. The copy itself is `proxy::restore`.

pub mod instant;
mod jobs;
mod plan;
pub mod staging;

use std::sync::Arc;

use catalog::{BackupId, Manifest};
use proxy::hypervisor::VmState;
use proxy::restore::ExportName;

use crate::daemon::error::{ApiError, ApiResult, Status};
use crate::daemon::hypervisors::Member;
use crate::daemon::jobs::JobSpec;
use crate::daemon::names::validate_name;
use crate::daemon::state::SharedState;
use crate::wire::jobs::{JobInfo, JobKind, JobMode};
use crate::wire::restores::RestoreRequest;
use plan::Plan;
use staging::{no_restore_dirs, restore_target};

/// Starts a restore (to a file, as a new domain, or onto the VM's own disks): the queued
/// job, or a refusal naming what is wrong (or the job that holds the VM).
pub async fn start(st: &SharedState, req: RestoreRequest) -> ApiResult<JobInfo> {
    let id = BackupId::parse(&req.backup).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id2 = id.clone();
    let m = st.repo(move |r| r.manifest(&id2)).await?;
    if req.instant {
        let hv = restore_hv(st, &m, &req).await?;
        return instant::start(st, req, m, hv).await;
    }
    let format = req.format.unwrap_or_default();
    let (plan, mode) = match (&req.to, &req.as_domain, req.onto_vm) {
        (Some(to), None, false) => (file_plan(st, &m, &req, to)?, JobMode::ToFile),
        (None, Some(n), false) => (domain_plan(st, &m, &req, n).await?, JobMode::AsDomain),
        (None, None, true) => (onto_plan(st, &m, &req).await?, JobMode::OntoVm),
        _ => {
            return Err(ApiError::bad_request(
                "a restore needs exactly one of `to` (a file), `as_domain` (a new domain) and `onto_vm` (the VM's own disks)",
            ))
        }
    };
    let mut spec = JobSpec::new(JobKind::Restore, &m.vm.name, mode);
    if let Plan::Domain { hv, .. } | Plan::Pool { hv, .. } | Plan::Onto { hv, .. } = &plan {
        spec = spec.on(hv.name(), &hv.spec.host);
    }
    let state = st.clone();
    let info = st
        .jobs
        .start_exclusive(spec, move |h| jobs::run(state, plan, format, h))
        .map_err(|busy| {
            ApiError::conflict(format!(
                "vm {} is busy: job {} ({} {}) has not ended; wait for it (sluice job show {}) or cancel it",
                busy.vm, busy.id, busy.kind, busy.mode, busy.id
            ))
        })?;
    Ok(info)
}

fn file_plan(st: &SharedState, m: &Manifest, req: &RestoreRequest, to: &str) -> ApiResult<Plan> {
    let disk = pick_disk(m, req.disk.as_deref())?;
    let name = ExportName::new(&m.vm.name, &disk, &m.id)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let target = restore_target(&st.restore_dirs, to, req.overwrite)?;
    Ok(Plan::File {
        name,
        target,
        overwrite: req.overwrite,
    })
}

/// The disk to restore: the one asked for (it must be in the backup), else the first.
fn pick_disk(m: &Manifest, disk: Option<&str>) -> ApiResult<String> {
    match disk {
        Some(d) => {
            validate_name("disk", d)?;
            m.disks
                .iter()
                .find(|k| k.target == d)
                .map(|k| k.target.clone())
                .ok_or_else(|| ApiError::not_found(format!("backup {} has no disk {d}", m.id)))
        }
        None => m
            .disks
            .first()
            .map(|k| k.target.clone())
            .ok_or_else(|| ApiError::bad_request(format!("backup {} has no disks", m.id))),
    }
}

/// The libvirt hypervisor a restore of `m` works on: the one `req` names, else the one whose
/// VM has the backup's uuid, else the only libvirt one.
async fn restore_hv(
    st: &SharedState,
    m: &Manifest,
    req: &RestoreRequest,
) -> ApiResult<Arc<Member>> {
    let hvs = &st.hypervisors;
    let chosen = match &req.hypervisor {
        Some(name) => {
            validate_name("hypervisor name", name)?;
            hvs.named(name)?.clone()
        }
        None => own_hv(st, m).await?,
    };
    if !chosen.is_libvirt() {
        return Err(ApiError::bad_request(format!(
            "hypervisor {} is a QMP socket of one QEMU process: restoring as a domain or onto a vm needs a libvirt hypervisor; name one with \"hypervisor\"",
            chosen.name()
        )));
    }
    Ok(chosen)
}

/// The hypervisor whose VM is the one backup `m` was taken of, else the only libvirt one.
async fn own_hv(st: &SharedState, m: &Manifest) -> ApiResult<Arc<Member>> {
    let mut own = Vec::new();
    for (hv, r) in st.hypervisors.list_all().await {
        if r.is_ok_and(|d| d.iter().any(|d| d.uuid == m.vm.uuid)) {
            own.push(hv);
        }
    }
    if own.len() == 1 {
        return Ok(own.remove(0));
    }
    let libvirt: Vec<_> = st
        .hypervisors
        .all()
        .iter()
        .filter(|h| h.is_libvirt())
        .collect();
    match libvirt.as_slice() {
        [only] => Ok((*only).clone()),
        _ => Err(ApiError::bad_request(format!(
            "vm {} of backup {} is on no single reachable hypervisor: name the libvirt hypervisor to restore on with \"hypervisor\"",
            m.vm.name, m.id
        ))),
    }
}

async fn domain_plan(
    st: &SharedState,
    m: &Manifest,
    req: &RestoreRequest,
    new_name: &str,
) -> ApiResult<Plan> {
    validate_name("domain name", new_name)?;
    let format = req.format.unwrap_or_default();
    let hv = restore_hv(st, m, req).await?;
    if req.pool.is_some() || hv.spec.remote.is_some() {
        return pool_plan(m, req, new_name, hv).await;
    }
    let existing = hv.list().await?;
    if existing.iter().any(|d| d.name == new_name) {
        return Err(ApiError::conflict(format!(
            "domain {new_name} already exists; choose another name"
        )));
    }
    let dir = st.restore_dirs.first().ok_or_else(no_restore_dirs)?;
    let mut disks = Vec::new();
    for d in &m.disks {
        let name = ExportName::new(&m.vm.name, &d.target, &m.id)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let file = format!("{new_name}-{}.{}", d.target, format.name());
        let target = restore_target(&st.restore_dirs, &dir.join(file).to_string_lossy(), false)?;
        disks.push((name, target));
    }
    Ok(Plan::Domain {
        hv,
        new_name: new_name.to_string(),
        xml: m.domain_xml.clone(),
        disks,
        start: req.start,
    })
}

/// The storage pool a restore as a new domain uses when the request names none.
pub const DEFAULT_POOL: &str = "default";

/// A restore as a new domain into a storage pool of `hv`: checked on the hypervisor first
/// (pool active, no domain or volume of the names it would make), so a conflict is refused
/// before any job starts.
async fn pool_plan(
    m: &Manifest,
    req: &RestoreRequest,
    new_name: &str,
    hv: Arc<Member>,
) -> ApiResult<Plan> {
    let pool = req.pool.as_deref().unwrap_or(DEFAULT_POOL);
    validate_name("storage pool", pool)?;
    let format = req.format.unwrap_or_default().image();
    let mut disks = Vec::new();
    for d in &m.disks {
        disks.push(
            ExportName::new(&m.vm.name, &d.target, &m.id)
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
    }
    let targets: Vec<&str> = disks.iter().map(|d| d.disk.as_str()).collect();
    let conn = hv.hv().await?;
    let lv = jobs::libvirt(&*conn, &hv).map_err(|e| ApiError::bad_request(e.message))?;
    proxy::restore::check_pool_restore(lv, new_name, pool, &targets, format)
        .await
        .map_err(|e| refusal(&hv, &e))?;
    Ok(Plan::Pool {
        hv,
        new_name: new_name.to_string(),
        pool: pool.to_string(),
        xml: m.domain_xml.clone(),
        disks,
        start: req.start,
    })
}

/// A restore refused before its job: the library's kind decides the answer.
fn refusal(hv: &Member, e: &proxy::restore::Error) -> ApiError {
    use proxy::restore::ErrorKind as K;
    let msg = format!(
        "hypervisor {}: {}",
        hv.name(),
        crate::daemon::error::chain(e)
    );
    match e.kind() {
        K::Refused => ApiError::conflict(msg),
        K::NotFound => ApiError::not_found(msg),
        K::InvalidInput => ApiError::bad_request(msg),
        _ => ApiError::new(Status::BadGateway, "hypervisor", msg),
    }
}

/// Checks before a job: the VM exists and is shut off, the overwrite is confirmed.
async fn onto_plan(st: &SharedState, m: &Manifest, req: &RestoreRequest) -> ApiResult<Plan> {
    let disks = match &req.disk {
        Some(_) => vec![pick_disk(m, req.disk.as_deref())?],
        None => Vec::new(),
    };
    let vm = &m.vm.name;
    let hv = restore_hv(st, m, req).await?;
    let dom = hv.domain(vm).await.map_err(|e| match e.kind() {
        proxy::hypervisor::ErrorKind::NotFound => ApiError::not_found(format!(
            "vm {vm} not found on hypervisor {}; restore it as a new domain instead",
            hv.name()
        )),
        _ => e.into(),
    })?;
    if dom.uuid != m.vm.uuid {
        return Err(ApiError::conflict(format!(
            "vm {vm} is not the vm backup {} was taken of (uuid {}); restore it as a new domain instead",
            m.id, m.vm.uuid
        )));
    }
    if dom.state != VmState::ShutOff {
        return Err(ApiError::conflict(format!(
            "vm {vm} is not shut off: shut it off (virsh shutdown {vm}) before restoring onto its disks"
        )));
    }
    if !req.confirm {
        return Err(ApiError::bad_request(format!(
            "restoring backup {} onto vm {vm} overwrites its disks: confirm it (confirm: true, --confirm)",
            m.id
        )));
    }
    Ok(Plan::Onto {
        hv,
        vm: vm.clone(),
        backup: m.id.clone(),
        disks,
    })
}
