//! Restore routes, each a background job with progress: a backup disk to an image file (raw
//! or qcow2) on the proxy host, a whole backup as a new libvirt domain, or a backup written
//! back onto its own shut-off VM's disks (confirmed explicitly).
//!
//! Owns the checks on what a restore may write: target paths are absolute, free of `..` and
//! NUL, inside one of the configured restore directories (`restore_dirs`), and never replace
//! an existing file unless `overwrite` is asked. Data is written into a private staging
//! directory beside the target and moved into place only when complete, so a failed or
//! cancelled restore leaves nothing behind. The copy itself is `proxy::restore`.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use catalog::{BackupId, Manifest};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::VmState;
use proxy::job::Progress;
use proxy::restore::file::{restore_disk_with, FileRestoreControl};
use proxy::restore::{
    restore_onto_vm, ErrorKind as RestoreErrorKind, ExportName, ImageFormat, OntoPath,
    OntoVmOptions, RestoredDisk,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::extract::{validate_name, ApiJson};
use crate::hv::{Hv, Member};
use crate::jobs::{JobHandle, JobInfo, JobOutcome, JobSpec};
use crate::state::SharedState;

/// Longest target path accepted, bytes.
const MAX_PATH: usize = 4096;

/// Image format of a restored file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestoreFormat {
    #[default]
    Qcow2,
    Raw,
}

impl RestoreFormat {
    fn image(self) -> ImageFormat {
        match self {
            RestoreFormat::Qcow2 => ImageFormat::Qcow2,
            RestoreFormat::Raw => ImageFormat::Raw,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RestoreFormat::Qcow2 => "qcow2",
            RestoreFormat::Raw => "raw",
        }
    }
}

/// Body of a restore request: exactly one of `to` (one disk to a file) and `as_domain`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub backup: String,
    /// Disk target (`vda`) for `to`; default: the backup's first disk.
    pub disk: Option<String>,
    /// Absolute path of the image file to write, inside a configured restore directory.
    pub to: Option<String>,
    /// Default `qcow2`.
    pub format: Option<RestoreFormat>,
    /// Replace an existing file at `to`.
    #[serde(default)]
    pub overwrite: bool,
    /// Restore every disk into the first restore directory and define a new domain of this
    /// name from the backup's saved definition (an existing name is refused with 409).
    pub as_domain: Option<String>,
    /// Write the backup back onto its own VM's disks (`disk`: only that one). The VM must be
    /// shut off (else 409) and `confirm` set (else 400).
    #[serde(default)]
    pub onto_vm: bool,
    /// The explicit confirmation that `onto_vm` overwrites the VM's disks.
    #[serde(default)]
    pub confirm: bool,
    /// The libvirt hypervisor `as_domain` defines the domain on, or whose VM `onto_vm`
    /// writes to. Default: the hypervisor of the backed-up VM (found by its uuid), or the
    /// only libvirt hypervisor. A QMP hypervisor is refused.
    pub hypervisor: Option<String>,
}

/// A restore as its job will do it.
enum Plan {
    File {
        name: ExportName,
        target: PathBuf,
        overwrite: bool,
    },
    Domain {
        hv: Arc<Member>,
        new_name: String,
        xml: String,
        disks: Vec<(ExportName, PathBuf)>,
    },
    Onto {
        hv: Arc<Member>,
        vm: String,
        backup: BackupId,
        disks: Vec<String>,
    },
}

/// Starts a restore (to a file, as a new domain, or onto the VM's own disks); answers with the queued job.
#[utoipa::path(post, path = "/api/v1/restores", tag = "restores", request_body = RestoreRequest,
    responses((status = 202, body = JobInfo), (status = 400, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(st): State<SharedState>,
    caller: Caller,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    caller.allow(Action::Restore, None)?;
    let id = BackupId::parse(&req.backup).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id2 = id.clone();
    let m = st.repo(move |r| r.manifest(&id2)).await?;
    let format = req.format.unwrap_or_default();
    let (plan, mode) = match (&req.to, &req.as_domain, req.onto_vm) {
        (Some(to), None, false) => (file_plan(&st, &m, &req, to)?, "to-file"),
        (None, Some(n), false) => (domain_plan(&st, &m, &req, n).await?, "as-domain"),
        (None, None, true) => (onto_plan(&st, &m, &req).await?, "onto-vm"),
        _ => {
            return Err(ApiError::bad_request(
                "a restore needs exactly one of `to` (a file), `as_domain` (a new domain) and `onto_vm` (the VM's own disks)",
            ))
        }
    };
    let mut spec = JobSpec::new("restore", &m.vm.name, mode);
    if let Plan::Domain { hv, .. } | Plan::Onto { hv, .. } = &plan {
        spec = spec.on(hv.name(), &hv.spec.host);
    }
    let state = st.clone();
    let info = st
        .jobs
        .start_exclusive(spec, move |h| run(state, plan, format, h))
        .map_err(|busy| {
            ApiError::conflict(format!(
                "vm {} is busy: job {} ({} {}) has not ended; wait for it (sluice job show {}) or cancel it",
                busy.vm, busy.id, busy.kind, busy.mode, busy.id
            ))
        })?;
    Ok((StatusCode::ACCEPTED, Json(info)))
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
    })
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

fn no_restore_dirs() -> ApiError {
    ApiError::bad_request("restores to files are disabled: no restore_dirs configured")
}

/// Checks a restore target: absolute, no `..` or NUL, its directory inside one of `dirs`
/// (after resolving symlinks), and no existing file there unless `overwrite`.
pub fn restore_target(dirs: &[PathBuf], raw: &str, overwrite: bool) -> ApiResult<PathBuf> {
    let bad = |why: &str| ApiError::bad_request(format!("restore target {raw:?} {why}"));
    if raw.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if raw.len() > MAX_PATH {
        return Err(ApiError::bad_request(format!(
            "restore target is longer than {MAX_PATH} bytes"
        )));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(bad("is not an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("contains `..` or `.`"));
    }
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
        return Err(bad("names no file"));
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| bad(&format!("is in a directory that cannot be used: {e}")))?;
    if dirs.is_empty() {
        return Err(no_restore_dirs());
    }
    let allowed = dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| parent.starts_with(d));
    if !allowed {
        return Err(bad(&format!(
            "is not inside a restore directory (restore_dirs: {})",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let target = parent.join(file);
    check_free(&target, raw, overwrite)?;
    Ok(target)
}

fn check_free(target: &Path, raw: &str, overwrite: bool) -> ApiResult<()> {
    match std::fs::symlink_metadata(target) {
        Err(_) => Ok(()),
        Ok(md) if md.is_file() && overwrite => Ok(()),
        Ok(md) if md.is_file() => Err(ApiError::conflict(format!(
            "restore target {raw:?} already exists; pass overwrite (--force) to replace it"
        ))),
        Ok(_) => Err(ApiError::conflict(format!(
            "restore target {raw:?} exists and is not a regular file"
        ))),
    }
}

async fn run(st: SharedState, plan: Plan, format: RestoreFormat, h: JobHandle) -> JobOutcome {
    match plan {
        Plan::File {
            name,
            target,
            overwrite,
        } => {
            let disks = [(name.clone(), target.clone())];
            let staging = Staging::new(&target, h.id)?;
            copy_disks(&st, &disks, &staging, format, &h).await?;
            staging.place(&target, overwrite)?;
            Ok(format!(
                "restored {name} to {} ({})",
                target.display(),
                format.name()
            ))
        }
        Plan::Domain {
            hv,
            new_name,
            xml,
            disks,
        } => {
            let job = DomainJob {
                hv: &hv,
                new_name: &new_name,
                xml: &xml,
                disks: &disks,
            };
            domain_job(&st, job, format, &h).await
        }
        Plan::Onto {
            hv,
            vm,
            backup,
            disks,
        } => onto_job(&st, &hv, vm, backup, disks, h).await,
    }
}

async fn onto_job(
    st: &SharedState,
    hv: &Member,
    vm: String,
    backup: BackupId,
    disks: Vec<String>,
    h: JobHandle,
) -> JobOutcome {
    let conn = hv.hv().await.map_err(|e| (e.to_string(), false))?;
    let lv = libvirt(&*conn, hv).map_err(|e| (e, false))?;
    let mut opts = OntoVmOptions::new(
        &vm,
        backup.clone(),
        st.work_dir.join(format!("restore-{}", h.id)),
    );
    opts.disks = disks;
    opts.confirm = true;
    opts.progress = h.progress.clone();
    opts.cancel = h.cancel.clone();
    let r = restore_onto_vm(lv, &st.repo, &opts).await;
    let _ = std::fs::remove_dir_all(&opts.work_dir);
    let rep = r.map_err(|e| (e.to_string(), e.kind() == RestoreErrorKind::Cancelled))?;
    let paths: Vec<String> = rep
        .disks
        .iter()
        .map(|d| match &d.path {
            OntoPath::Changed { .. } => format!("{}: changed chunks only", d.disk),
            OntoPath::Full { reason } => format!("{}: in full ({reason})", d.disk),
        })
        .collect();
    Ok(format!(
        "restored backup {backup} onto vm {vm} ({})",
        paths.join("; ")
    ))
}

fn libvirt<'a>(conn: &'a dyn Hv, hv: &Member) -> Result<&'a LibvirtHypervisor, String> {
    conn.as_any()
        .downcast_ref::<LibvirtHypervisor>()
        .ok_or_else(|| format!("hypervisor {} is not a libvirt hypervisor", hv.name()))
}

/// What a restore as a new domain defines, and where.
struct DomainJob<'a> {
    hv: &'a Member,
    new_name: &'a str,
    xml: &'a str,
    disks: &'a [(ExportName, PathBuf)],
}

async fn domain_job(
    st: &SharedState,
    job: DomainJob<'_>,
    format: RestoreFormat,
    h: &JobHandle,
) -> JobOutcome {
    let DomainJob {
        hv,
        new_name,
        xml,
        disks,
    } = job;
    let first = &disks
        .first()
        .ok_or(("the backup has no disks".to_string(), false))?
        .1;
    let staging = Staging::new(first, h.id)?;
    copy_disks(st, disks, &staging, format, h).await?;
    let restored: Vec<RestoredDisk> = disks
        .iter()
        .map(|(n, p)| RestoredDisk {
            target: n.disk.clone(),
            path: p.clone(),
            format: format.image(),
        })
        .collect();
    let names: Vec<String> = match hv.list().await {
        Ok(d) => d.into_iter().map(|d| d.name).collect(),
        Err(e) => return Err((e.to_string(), false)),
    };
    let new_xml = proxy::restore::restore_as_domain(xml, new_name, &restored, &names)
        .map_err(|e| (e.to_string(), false))?;
    // The copy gets its own console logs and sockets, so it can run beside the original.
    let run_dir = first.with_file_name(format!("{new_name}-run"));
    let new_xml = proxy::restore::relocate_chardevs(&new_xml, &run_dir)
        .map_err(|e| (e.to_string(), false))?;
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| (format!("creating {}: {e}", run_dir.display()), false))?;
    for (_, p) in disks {
        staging.place(p, false)?;
    }
    if let Err(e) = define(hv, &new_xml).await {
        for (_, p) in disks {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&run_dir);
        return Err((format!("defining domain {new_name}: {e}"), false));
    }
    Ok(format!(
        "restored {} disk(s) of backup {} as domain {new_name}",
        disks.len(),
        disks[0].0.backup
    ))
}

async fn define(hv: &Member, xml: &str) -> Result<String, String> {
    let conn = hv.hv().await.map_err(|e| e.to_string())?;
    let lv = libvirt(&*conn, hv)?;
    lv.define_domain(xml).await.map_err(|e| e.to_string())
}

/// Copies each disk into the staging directory, with progress; honours cancel between and
/// (by discarding the result) during disks.
async fn copy_disks(
    st: &SharedState,
    disks: &[(ExportName, PathBuf)],
    staging: &Staging,
    format: RestoreFormat,
    h: &JobHandle,
) -> Result<(), (String, bool)> {
    let planned = disk_sizes(st, disks).await?;
    h.progress.bytes_planned.store(planned, Ordering::Relaxed);
    let poll = tokio::spawn(poll_progress(staging.dir.clone(), h.progress.clone()));
    let r = async {
        for (name, target) in disks {
            copy_one(st, name, staging.file(target), format, h).await?;
        }
        Ok(())
    }
    .await;
    poll.abort();
    if r.is_ok() {
        h.progress.bytes_done.store(planned, Ordering::Relaxed);
        h.progress.bytes_read.store(planned, Ordering::Relaxed);
    }
    r
}

/// One disk's copy with live progress; on cancel the copy stops at its next batch of chunks
/// and removes its partial file.
async fn copy_one(
    st: &SharedState,
    name: &ExportName,
    file: PathBuf,
    format: RestoreFormat,
    h: &JobHandle,
) -> Result<(), (String, bool)> {
    let control = FileRestoreControl {
        cancel: h.cancel.clone(),
        progress: h.progress.clone(),
    };
    let run = restore_disk_with(&st.repo, name, file, format.image(), control);
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => r.map(drop).map_err(|e| (e.to_string(), false)),
        _ = h.cancel.cancelled() => {
            let _ = run.await;
            Err(("restore cancelled; nothing was written".into(), true))
        }
    }
}

async fn disk_sizes(
    st: &SharedState,
    disks: &[(ExportName, PathBuf)],
) -> Result<u64, (String, bool)> {
    let Some((first, _)) = disks.first() else {
        return Ok(0);
    };
    let id = first.backup.clone();
    let m = st
        .repo(move |r| r.manifest(&id))
        .await
        .map_err(|e| (e.message, false))?;
    Ok(m.disks
        .iter()
        .filter(|d| disks.iter().any(|(n, _)| n.disk == d.target))
        .map(|d| d.size)
        .sum())
}

/// Progress of a copy as the bytes allocated so far in the staging directory (an estimate:
/// holes are never written, and a qcow2 is written twice, raw then converted).
async fn poll_progress(dir: PathBuf, progress: Arc<Progress>) {
    use std::os::unix::fs::MetadataExt;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let used: u64 = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0);
        let planned = progress.bytes_planned.load(Ordering::Relaxed);
        let done = used.min(planned);
        progress.bytes_done.fetch_max(done, Ordering::Relaxed);
        progress.bytes_read.fetch_max(done, Ordering::Relaxed);
    }
}

/// Prefix of staging directories: `.sluice-restore-PID-JOB`.
const STAGING: &str = ".sluice-restore-";

fn sweep_dead_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(STAGING)
            .and_then(|r| r.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok());
        let dead = pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
        if dead {
            tracing::warn!(dir = %e.path().display(), "removing a restore staging directory left by a dead daemon");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A private directory beside the targets (same filesystem, so placing is a rename); removed
/// with whatever it still holds when dropped.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// `.sluice-restore-PID-JOB` beside `target`; first removes those a daemon that no
    /// longer runs left behind (killed with `kill -9` mid-restore).
    fn new(target: &Path, job: u64) -> Result<Staging, (String, bool)> {
        let parent = target.parent().unwrap_or(Path::new("/"));
        sweep_dead_staging(parent);
        let dir = parent.join(format!("{STAGING}{}-{job}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| (format!("creating {}: {e}", dir.display()), false))?;
        Ok(Staging { dir })
    }

    fn file(&self, target: &Path) -> PathBuf {
        self.dir.join(target.file_name().unwrap_or_default())
    }

    /// Moves the finished copy of `target` into place; without `overwrite`, an existing file
    /// (even one created since the request) is never replaced.
    fn place(&self, target: &Path, overwrite: bool) -> Result<(), (String, bool)> {
        let from = self.file(target);
        let r = if overwrite {
            std::fs::rename(&from, target)
        } else {
            std::fs::hard_link(&from, target).and_then(|()| std::fs::remove_file(&from))
        };
        r.map_err(|e| {
            (
                format!("moving the restored file to {}: {e}", target.display()),
                false,
            )
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
