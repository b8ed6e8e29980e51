//! The libvirt adapter: domains and disks from the domain XML, checkpoints, pull-mode
//! `virDomainBackupBegin` ended by `virDomainAbortJob` on every path, filesystem freeze through
//! the guest agent. Stopped domains are read offline (`super::offline`), since libvirt cannot
//! back up or checkpoint an inactive domain.

mod ffi;
mod instant;
pub mod storage;
pub mod upload;
mod worker;

use std::path::PathBuf;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt::sys;

use super::session::{BoxFuture, Release};
use super::xml::{self, validate_name};
use super::Cause;
use super::{
    offline, BackupRequest, BackupSession, CheckpointHealth, CheckpointInfo, CheckpointProblem,
    DiskExport, DiskInfo, DiskKind, DomainInfo, Error, ErrorKind, ExpectedDisk, FreezeGuard,
    Hypervisor, Result, VmState,
};
use catalog::Chain;
pub use instant::Ended;
use worker::Worker;

/// Turns a libvirt error into ours, choosing the kind from libvirt's error code.
fn virt_err(context: String) -> impl FnOnce(VirtError) -> Error {
    move |e| {
        let kind = match e.code().to_raw() {
            sys::VIR_ERR_NO_DOMAIN | sys::VIR_ERR_NO_DOMAIN_CHECKPOINT => ErrorKind::NotFound,
            sys::VIR_ERR_CHECKPOINT_INCONSISTENT => ErrorKind::Inconsistent,
            sys::VIR_ERR_AGENT_UNRESPONSIVE
            | sys::VIR_ERR_AGENT_UNSYNCED
            | sys::VIR_ERR_AGENT_COMMAND_TIMEOUT
            | sys::VIR_ERR_AGENT_COMMAND_FAILED => ErrorKind::AgentUnavailable,
            sys::VIR_ERR_OPERATION_TIMEOUT | sys::VIR_ERR_RESOURCE_BUSY => ErrorKind::Busy,
            _ => ErrorKind::Failed,
        };
        Error::new(kind, context).with_source(Cause(e.message().to_string()))
    }
}

fn lookup(conn: &Connect, vm: &str) -> Result<Domain> {
    conn.lookup_domain_by_name(vm)
        .map_err(virt_err(format!("vm {vm}")))
}

fn vm_state(dom: &Domain, vm: &str) -> Result<VmState> {
    let (state, _) = dom.state().map_err(virt_err(format!("state of vm {vm}")))?;
    Ok(match state.to_raw() {
        sys::VIR_DOMAIN_RUNNING => VmState::Running,
        sys::VIR_DOMAIN_PAUSED => VmState::Paused,
        sys::VIR_DOMAIN_SHUTOFF => VmState::ShutOff,
        _ => VmState::Other,
    })
}

fn domain_xml_of(dom: &Domain, vm: &str) -> Result<String> {
    dom.xml_desc(0).map_err(virt_err(format!("xml of vm {vm}")))
}

fn describe(dom: &Domain, vm: &str) -> Result<DomainInfo> {
    let xml = domain_xml_of(dom, vm)?;
    let (name, uuid) = xml::domain_identity(&xml)?;
    let disks = xml::domain_disks(&xml)?
        .into_iter()
        .map(|d| {
            let capacity = ffi::disk_capacity(dom, &d.target).unwrap_or(0);
            d.into_info(capacity)
        })
        .collect();
    Ok(DomainInfo {
        name,
        uuid,
        state: vm_state(dom, vm)?,
        disks,
    })
}

fn checkpoints_of(dom: &Domain, vm: &str) -> Result<Vec<CheckpointInfo>> {
    let flags = sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN;
    let mut out = Vec::new();
    for cp in ffi::checkpoint_list(dom).map_err(virt_err(format!("checkpoints of vm {vm}")))? {
        let name = cp.name();
        let desc = cp
            .xml_desc(flags)
            .map_err(virt_err(format!("checkpoint {name} of vm {vm}")))?;
        let mut info = xml::checkpoint_info(&desc)?;
        info.xml = Some(
            cp.xml_desc(0)
                .map_err(virt_err(format!("checkpoint {name} of vm {vm}")))?,
        );
        out.push(info);
    }
    Ok(out)
}

/// libvirt, reached through one dedicated thread.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    worker: Worker,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LibvirtHypervisor")
    }
}

impl LibvirtHypervisor {
    /// Connects to `uri` (e.g. `qemu:///system`).
    pub async fn connect(uri: &str) -> Result<Self> {
        Ok(Self {
            worker: Worker::start(uri).await?,
        })
    }

    /// The domain's live XML.
    pub async fn domain_xml(&self, vm: &str) -> Result<String> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| domain_xml_of(&lookup(c, &vm)?, &vm))
            .await
    }

    /// Recreates checkpoint metadata libvirt lost (migration, re-define) from the XML kept in a
    /// manifest; libvirt checks that every bitmap exists and is consistent.
    pub async fn redefine_checkpoint(&self, vm: &str, checkpoint_xml: &str) -> Result<()> {
        let (vm, cp_xml) = (vm.to_string(), checkpoint_xml.to_string());
        self.worker
            .call(move |c| {
                let dom = lookup(c, &vm)?;
                redefine(&dom, &vm, &cp_xml)
            })
            .await
    }

    /// The checkpoint's XML; `with_size` adds each disk's changed bytes since it (`size=`).
    pub async fn checkpoint_xml(
        &self,
        vm: &str,
        checkpoint: &str,
        with_size: bool,
    ) -> Result<String> {
        let (vm, cp) = (vm.to_string(), checkpoint.to_string());
        let flags = if with_size {
            sys::VIR_DOMAIN_CHECKPOINT_XML_SIZE
        } else {
            0
        };
        self.worker
            .call(move |c| {
                let ctx = format!("checkpoint {cp} of vm {vm}");
                let handle =
                    ffi::checkpoint_lookup(&lookup(c, &vm)?, &cp).map_err(virt_err(ctx.clone()))?;
                handle.xml_desc(flags).map_err(virt_err(ctx))
            })
            .await
    }

    /// Defines a new persistent domain (not started) from `domain_xml`; returns its name.
    /// libvirt refuses a name or UUID it already has.
    pub async fn define_domain(&self, domain_xml: &str) -> Result<String> {
        let xml = domain_xml.to_string();
        self.worker
            .call(move |c| {
                ffi::sent("domain", &xml);
                let dom = c
                    .define_domain_xml(&xml)
                    .map_err(virt_err("defining a restored domain".into()))?;
                dom.name()
                    .map_err(virt_err("name of the restored domain".into()))
            })
            .await
    }

    /// Whether a job (e.g. a backup) is running on the VM.
    pub async fn has_job(&self, vm: &str) -> Result<bool> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| {
                let dom = lookup(c, &vm)?;
                let info = dom
                    .job_info()
                    .map_err(virt_err(format!("job of vm {vm}")))?;
                Ok(info.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
            })
            .await
    }
}

fn redefine(dom: &Domain, vm: &str, cp_xml: &str) -> Result<()> {
    let flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
    ffi::checkpoint_create(dom, cp_xml, flags)
        .map(drop)
        .map_err(virt_err(format!("redefining a checkpoint of vm {vm}")))
}

/// Inputs of a running-domain backup, resolved on the libvirt thread.
struct Prepared {
    all_disks: Vec<DiskInfo>,
    backup_xml: String,
    checkpoint_xml: Option<String>,
}

fn prepare(req: &BackupRequest, all_disks: Vec<DiskInfo>) -> Result<Prepared> {
    let names: Vec<String> = all_disks.iter().map(|d| d.target.clone()).collect();
    let export = req
        .disks
        .iter()
        .map(|d| export_disk(req, &all_disks, d))
        .collect::<Result<Vec<_>>>()?;
    let backup_xml = xml::backup_xml(&xml::PullBackup {
        incremental_from: req.incremental_from.as_deref(),
        socket: &req.socket,
        tcp: req.tcp.as_ref(),
        all_disks: &names,
        export: &export,
    });
    let with_bitmap: Vec<String> = all_disks
        .iter()
        .filter(|d| req.disks.contains(&d.target) && !req.full_disks.contains(&d.target))
        .filter(|d| d.supports_bitmaps())
        .map(|d| d.target.clone())
        .collect();
    let checkpoint_xml = req
        .new_checkpoint
        .as_deref()
        .map(|cp| xml::checkpoint_xml(cp, &names, &with_bitmap));
    Ok(Prepared {
        all_disks,
        backup_xml,
        checkpoint_xml,
    })
}

/// Disk `d` as the backup XML exports it: its scratch file in the request's scratch
/// directory (named after the VM, disk and new checkpoint), or, with none, beside its image
/// on the hypervisor (`IMAGE.CHECKPOINT`, libvirt's own choice, which it makes only when the
/// backup names no disk: a backup that reads some disks in full in an incremental names
/// them all, and so names that path itself). Only an image file has a place beside it.
fn export_disk(req: &BackupRequest, all: &[DiskInfo], d: &str) -> Result<xml::ExportDisk> {
    let info = all.iter().find(|x| x.target == d);
    let suffix = req.new_checkpoint.as_deref().unwrap_or("sluice");
    let per_disk = req.incremental_from.is_some() && !req.full_disks.is_empty();
    let scratch = match (&req.scratch_dir, info) {
        (Some(dir), _) => Some(dir.join(format!("{}.{d}.{suffix}.scratch.qcow2", req.vm))),
        (None, Some(i)) if i.kind == DiskKind::File && i.source.is_some() => per_disk
            .then(|| {
                i.source
                    .as_ref()
                    .map(|s| PathBuf::from(format!("{}.{suffix}", s.display())))
            })
            .flatten(),
        (None, _) => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "disk {d} of vm {} is not an image file, so its scratch file cannot go \
                     beside it: set backup_data.scratch_dir to a directory on the hypervisor",
                    req.vm
                ),
            ));
        }
    };
    Ok(xml::ExportDisk {
        name: d.to_string(),
        scratch,
        full: req.full_disks.iter().any(|f| f == d),
    })
}

fn validate_request(req: &BackupRequest, disks: &[DiskInfo]) -> Result<()> {
    for cp in req.incremental_from.iter().chain(req.new_checkpoint.iter()) {
        validate_name("checkpoint", cp)?;
    }
    if req.disks.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("backup of vm {} names no disk", req.vm),
        ));
    }
    for d in &req.disks {
        if !disks.iter().any(|x| &x.target == d) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("vm {} has no disk {d}", req.vm),
            ));
        }
    }
    Ok(())
}

/// Starts the pull-mode backup and reads back its exports; aborts the job if that fails.
fn begin_running(
    dom: &Domain,
    req: &BackupRequest,
    disks: Vec<DiskInfo>,
) -> Result<Vec<DiskExport>> {
    let p = prepare(req, disks)?;
    let vm = &req.vm;
    ffi::backup_begin(dom, &p.backup_xml, p.checkpoint_xml.as_deref())
        .map_err(virt_err(format!("starting the backup of vm {vm}")))?;
    let exports = ffi::backup_xml_desc(dom)
        .map_err(virt_err(format!("describing the backup of vm {vm}")))
        .and_then(|desc| xml::backup_desc(&desc));
    let exports = match exports {
        Ok(e) => e,
        Err(e) => {
            let _ = ffi::abort_job(dom);
            return Err(e);
        }
    };
    let mut out = Vec::new();
    for disk in &req.disks {
        let Some(desc) = exports.iter().find(|e| &e.disk == disk) else {
            let _ = ffi::abort_job(dom);
            return Err(Error::new(
                ErrorKind::Failed,
                format!("backup of vm {vm} has no export for disk {disk}"),
            ));
        };
        let capacity = p
            .all_disks
            .iter()
            .find(|d| &d.target == disk)
            .map_or(0, |d| d.capacity);
        out.push(DiskExport {
            disk: disk.clone(),
            socket: req.socket.clone(),
            tcp_port: req.tcp.as_ref().map(|t| t.port),
            export_name: desc.export_name.clone(),
            dirty_bitmap_context: desc
                .export_bitmap
                .as_ref()
                .map(|b| format!("qemu:dirty-bitmap:{b}")),
            capacity,
        });
    }
    Ok(out)
}

/// Ends a libvirt pull-mode backup job.
struct JobEnd {
    worker: Worker,
    vm: String,
    new_checkpoint: Option<String>,
}

fn end_job(conn: &Connect, vm: &str, drop_checkpoint: Option<&str>) -> Result<()> {
    let dom = lookup(conn, vm)?;
    let aborted = ffi::abort_job(&dom)
        .map_err(virt_err(format!("ending the backup job of vm {vm}")))
        .and_then(|()| wait_job_gone(&dom, vm));
    if let Some(cp) = drop_checkpoint {
        let deleted = ffi::checkpoint_lookup(&dom, cp).and_then(|c| c.delete(0));
        if let Err(e) = deleted {
            tracing::warn!(vm, checkpoint = cp, error = %catalog::Chain(&e), "cannot delete the checkpoint of a failed backup");
        }
    }
    aborted
}

/// How long libvirt may take to tear a cancelled backup job down.
const JOB_END: std::time::Duration = std::time::Duration::from_secs(30);

fn job_active(dom: &Domain) -> bool {
    dom.job_info().is_ok_and(|j| {
        j.r#type == sys::VIR_DOMAIN_JOB_BOUNDED as i32
            || j.r#type == sys::VIR_DOMAIN_JOB_UNBOUNDED as i32
    })
}

/// `virDomainAbortJob` returns while libvirt still cancels the block jobs: wait for the end
/// (this runs on the libvirt thread, never on the runtime).
fn wait_job_gone(dom: &Domain, vm: &str) -> Result<()> {
    let start = std::time::Instant::now();
    while job_active(dom) {
        if start.elapsed() > JOB_END {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("backup job of vm {vm} did not end"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

impl Release for JobEnd {
    fn release(self: Box<Self>, success: bool) -> BoxFuture<Result<()>> {
        Box::pin(async move {
            let drop_cp = if success {
                None
            } else {
                self.new_checkpoint.clone()
            };
            let vm = self.vm.clone();
            self.worker
                .call(move |c| end_job(c, &vm, drop_cp.as_deref()))
                .await
        })
    }

    fn release_in_background(self: Box<Self>) {
        let (vm, cp) = (self.vm, self.new_checkpoint);
        self.worker.fire(move |c| {
            if let Err(e) = end_job(c, &vm, cp.as_deref()) {
                tracing::error!(vm = %vm, error = %catalog::Chain(&e), "background abort of a backup job failed");
            }
        });
    }
}

/// Thaws a libvirt guest.
struct Thaw {
    worker: Worker,
    vm: String,
}

fn thaw_now(conn: &Connect, vm: &str) -> Result<()> {
    let dom = lookup(conn, vm)?;
    ffi::fs_thaw(&dom)
        .map(drop)
        .map_err(virt_err(format!("thawing vm {vm}")))
}

impl Release for Thaw {
    fn release(self: Box<Self>, _success: bool) -> BoxFuture<Result<()>> {
        Box::pin(async move {
            let vm = self.vm.clone();
            self.worker.call(move |c| thaw_now(c, &vm)).await
        })
    }

    fn release_in_background(self: Box<Self>) {
        let vm = self.vm;
        self.worker.fire(move |c| {
            if let Err(e) = thaw_now(c, &vm) {
                tracing::error!(vm = %vm, error = %catalog::Chain(&e), "background thaw failed");
            }
        });
    }
}

/// Checks a checkpoint of a running domain: metadata, disks, sizes, then libvirt's own bitmap
/// validation (a redefine of the checkpoint's current XML with `REDEFINE_VALIDATE`).
fn check_running(
    dom: &Domain,
    vm: &str,
    cp: &str,
    expected: &[ExpectedDisk],
) -> Result<CheckpointHealth> {
    let handle = match ffi::checkpoint_lookup(dom, cp) {
        Ok(h) => h,
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN_CHECKPOINT => {
            return Ok(CheckpointHealth::Unusable(vec![
                CheckpointProblem::CheckpointMissing,
            ]))
        }
        Err(e) => return Err(virt_err(format!("checkpoint {cp} of vm {vm}"))(e)),
    };
    let cp_xml = handle
        .xml_desc(0)
        .map_err(virt_err(format!("checkpoint {cp} of vm {vm}")))?;
    let info = xml::checkpoint_info(&cp_xml)?;
    let disks = describe(dom, vm)?.disks;
    let mut problems = static_problems(&info, &disks, expected);
    if problems.is_empty() {
        if let Err(e) = redefine(dom, vm, &cp_xml) {
            problems.push(CheckpointProblem::Refused {
                reason: Chain(&e).to_string(),
            });
        }
    }
    Ok(CheckpointHealth::from_problems(problems))
}

/// Problems visible without asking QEMU: missing disks, bitmaps, changed sizes.
fn static_problems(
    info: &CheckpointInfo,
    disks: &[DiskInfo],
    expected: &[ExpectedDisk],
) -> Vec<CheckpointProblem> {
    let mut problems = Vec::new();
    for want in expected {
        let disk = want.disk.clone();
        match disks.iter().find(|d| d.target == want.disk) {
            None => problems.push(CheckpointProblem::DiskMissing { disk }),
            Some(d) if d.capacity != want.capacity => {
                problems.push(CheckpointProblem::SizeChanged {
                    disk,
                    was: want.capacity,
                    now: d.capacity,
                })
            }
            Some(_) if !info.disks.iter().any(|c| c.disk == want.disk) => {
                problems.push(CheckpointProblem::BitmapMissing { disk })
            }
            Some(_) => {}
        }
    }
    problems
}

/// What an inactive domain's check needs: the checkpoint (if libvirt has it) and the disks.
fn inactive_facts(
    dom: &Domain,
    vm: &str,
    cp: &str,
) -> Result<(Option<CheckpointInfo>, Vec<DiskInfo>)> {
    let info = match ffi::checkpoint_lookup(dom, cp) {
        Ok(h) => Some(xml::checkpoint_info(
            &h.xml_desc(0)
                .map_err(virt_err(format!("checkpoint {cp} of vm {vm}")))?,
        )?),
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN_CHECKPOINT => None,
        Err(e) => return Err(virt_err(format!("checkpoint {cp} of vm {vm}"))(e)),
    };
    Ok((info, describe(dom, vm)?.disks))
}

async fn check_inactive(
    facts: (Option<CheckpointInfo>, Vec<DiskInfo>),
    cp: &str,
    expected: &[ExpectedDisk],
) -> Result<CheckpointHealth> {
    let (info, disks) = facts;
    let Some(info) = info else {
        return Ok(CheckpointHealth::Unusable(vec![
            CheckpointProblem::CheckpointMissing,
        ]));
    };
    let mut problems = static_problems(&info, &disks, expected);
    for want in expected {
        let Some((image, format)) = disks
            .iter()
            .find(|d| d.target == want.disk)
            .and_then(|d| Some((d.source.clone()?, d.format_named())))
        else {
            continue;
        };
        let bitmap = info
            .disks
            .iter()
            .find(|c| c.disk == want.disk)
            .map_or(cp, |c| c.bitmap.as_str());
        let image_info = super::image::info(&image, format).await?;
        problems.extend(super::image::bitmap_problem(
            &image_info,
            &want.disk,
            bitmap,
        ));
    }
    problems.dedup();
    Ok(CheckpointHealth::from_problems(problems))
}

/// An offline backup of a libvirt domain: on success, libvirt learns the new checkpoint (its
/// bitmaps were added offline) so the next online backup can start from it.
struct OfflineEnd {
    inner: offline::OfflineEnd,
    worker: Worker,
    vm: String,
    checkpoint_xml: Option<String>,
}

impl Release for OfflineEnd {
    fn release(self: Box<Self>, success: bool) -> BoxFuture<Result<()>> {
        Box::pin(async move {
            Box::new(self.inner).release(success).await?;
            let (Some(cp_xml), true) = (self.checkpoint_xml, success) else {
                return Ok(());
            };
            let vm = self.vm;
            self.worker
                .call(move |c| {
                    let flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;
                    ffi::checkpoint_create(&lookup(c, &vm)?, &cp_xml, flags)
                        .map(drop)
                        .map_err(virt_err(format!(
                            "recording the offline checkpoint of vm {vm}"
                        )))
                })
                .await
        })
    }

    fn release_in_background(self: Box<Self>) {
        Box::new(self.inner).release_in_background();
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl LibvirtHypervisor {
    async fn begin_offline(
        &self,
        req: BackupRequest,
        disks: Vec<DiskInfo>,
    ) -> Result<BackupSession> {
        let mut offline_disks = Vec::new();
        for name in &req.disks {
            let disk = disks.iter().find(|d| &d.target == name);
            let Some((disk, image)) = disk.and_then(|d| Some((d, d.source.clone()?))) else {
                let msg = format!("disk {name} of vm {} is not a local image", req.vm);
                return Err(Error::new(ErrorKind::Unsupported, msg));
            };
            offline_disks.push(offline::OfflineDisk {
                disk: name.clone(),
                image,
                format: disk.format_named().to_string(),
                tracked: disk.supports_bitmaps() && !req.full_disks.contains(name),
            });
        }
        let all: Vec<String> = disks.iter().map(|d| d.target.clone()).collect();
        let tracked: Vec<String> = offline_disks
            .iter()
            .filter(|d| d.tracked)
            .map(|d| d.disk.clone())
            .collect();
        let checkpoint_xml = req
            .new_checkpoint
            .as_deref()
            .map(|cp| xml::redefine_checkpoint_xml(cp, now_secs(), &all, &tracked));
        let (vm, cp) = (req.vm.clone(), req.new_checkpoint.clone());
        let (exports, inner) = offline::open(offline::OfflineRequest {
            vm: req.vm,
            disks: offline_disks,
            incremental_from: req.incremental_from,
            new_checkpoint: req.new_checkpoint,
            socket: req.socket,
        })
        .await?;
        let end = OfflineEnd {
            inner,
            worker: self.worker.clone(),
            vm: vm.clone(),
            checkpoint_xml,
        };
        Ok(BackupSession::new(vm, exports, cp, Box::new(end)))
    }
}

impl Hypervisor for LibvirtHypervisor {
    async fn abort_stale_backup(&self, vm: &str, marker: &str) -> Result<Option<PathBuf>> {
        let (vm, marker) = (vm.to_string(), marker.to_string());
        self.worker
            .call(move |c| {
                let dom = lookup(c, &vm)?;
                // No backup job: libvirt refuses the description.
                let Ok(desc) = ffi::backup_xml_desc(&dom) else {
                    return Ok(None);
                };
                let Some(socket) = xml::backup_socket(&desc) else {
                    return Ok(None);
                };
                if !socket.to_string_lossy().contains(&marker) {
                    return Ok(None);
                }
                ffi::abort_job(&dom)
                    .map_err(virt_err(format!("aborting a stale backup job of vm {vm}")))?;
                tracing::warn!(vm = %vm, socket = %socket.display(), "aborted a backup job left by an earlier run");
                Ok(Some(socket))
            })
            .await
    }

    async fn abort_stale_tcp_backup(
        &self,
        vm: &str,
        ports: std::ops::RangeInclusive<u16>,
    ) -> Result<Option<u16>> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| {
                let dom = lookup(c, &vm)?;
                let Ok(desc) = ffi::backup_xml_desc(&dom) else {
                    return Ok(None);
                };
                let Some(port) = xml::backup_tcp_port(&desc).filter(|p| ports.contains(p)) else {
                    return Ok(None);
                };
                ffi::abort_job(&dom)
                    .map_err(virt_err(format!("aborting a stale backup job of vm {vm}")))?;
                tracing::warn!(vm = %vm, port, "aborted a remote backup job left by an earlier run");
                Ok(Some(port))
            })
            .await
    }

    async fn start_paused(&self, vm: &str) -> Result<()> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| {
                lookup(c, &vm)?
                    .create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
                    .map_err(virt_err(format!("starting vm {vm} paused")))
            })
            .await?;
        Ok(())
    }

    async fn destroy(&self, vm: &str) -> Result<()> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| {
                lookup(c, &vm)?
                    .destroy()
                    .map_err(virt_err(format!("powering off vm {vm}")))
            })
            .await
    }

    async fn domain_xml(&self, vm: &str) -> Result<String> {
        LibvirtHypervisor::domain_xml(self, vm).await
    }

    async fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        self.worker
            .call(|c| {
                let doms = c
                    .list_all_domains(0)
                    .map_err(virt_err("listing vms".into()))?;
                // A domain undefined between the listing and its description (another
                // client deleting a VM) is left out, not a failure of the whole list.
                let mut out = Vec::with_capacity(doms.len());
                for d in &doms {
                    let described = d
                        .name()
                        .map_err(virt_err("vm name".into()))
                        .and_then(|name| describe(d, &name));
                    match described {
                        Ok(info) => out.push(info),
                        Err(e) if e.kind() == ErrorKind::NotFound => {
                            tracing::debug!(error = %catalog::Chain(&e), "vm vanished while listing");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn domain(&self, vm: &str) -> Result<DomainInfo> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| describe(&lookup(c, &vm)?, &vm))
            .await
    }

    async fn list_checkpoints(&self, vm: &str) -> Result<Vec<CheckpointInfo>> {
        let vm = vm.to_string();
        self.worker
            .call(move |c| checkpoints_of(&lookup(c, &vm)?, &vm))
            .await
    }

    async fn begin_backup(&self, req: BackupRequest) -> Result<BackupSession> {
        let vm = req.vm.clone();
        let info = self.domain(&vm).await?;
        validate_request(&req, &info.disks)?;
        if info.state == VmState::ShutOff {
            return self.begin_offline(req, info.disks).await;
        }
        let new_checkpoint = req.new_checkpoint.clone();
        let exports = self
            .worker
            .call(move |c| begin_running(&lookup(c, &req.vm)?, &req, info.disks))
            .await?;
        let release = JobEnd {
            worker: self.worker.clone(),
            vm: vm.clone(),
            new_checkpoint: new_checkpoint.clone(),
        };
        Ok(BackupSession::new(
            vm,
            exports,
            new_checkpoint,
            Box::new(release),
        ))
    }

    async fn delete_checkpoint(
        &self,
        vm: &str,
        checkpoint: &str,
        metadata_only: bool,
    ) -> Result<()> {
        let (vm_owned, cp) = (vm.to_string(), checkpoint.to_string());
        let flags = if metadata_only {
            sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        } else {
            0
        };
        self.worker
            .call(move |c| {
                let ctx = format!("deleting checkpoint {cp} of vm {vm_owned}");
                let handle = ffi::checkpoint_lookup(&lookup(c, &vm_owned)?, &cp)
                    .map_err(virt_err(ctx.clone()))?;
                handle.delete(flags).map_err(virt_err(ctx))
            })
            .await?;
        tracing::info!(vm, checkpoint, metadata_only, "checkpoint deleted");
        Ok(())
    }

    async fn check_checkpoint(
        &self,
        vm: &str,
        checkpoint: &str,
        disks: &[ExpectedDisk],
    ) -> Result<CheckpointHealth> {
        validate_name("checkpoint", checkpoint)?;
        let (vm, cp, expected) = (vm.to_string(), checkpoint.to_string(), disks.to_vec());
        let (cp2, expected2) = (cp.clone(), expected.clone());
        let running = self
            .worker
            .call(move |c| {
                let dom = lookup(c, &vm)?;
                if vm_state(&dom, &vm)? == VmState::ShutOff {
                    return Ok(Err(inactive_facts(&dom, &vm, &cp)?));
                }
                Ok(Ok(check_running(&dom, &vm, &cp, &expected)?))
            })
            .await?;
        match running {
            Ok(health) => Ok(health),
            Err(facts) => check_inactive(facts, &cp2, &expected2).await,
        }
    }

    async fn agent_responds(&self, vm: &str) -> bool {
        let vm = vm.to_string();
        let answer = self
            .worker
            .call(move |c| {
                let dom = lookup(c, &vm)?;
                if xml::agent_channel(&domain_xml_of(&dom, &vm)?)? != Some(true) {
                    return Ok(false);
                }
                Ok(dom.time(0).is_ok())
            })
            .await;
        answer.unwrap_or(false)
    }

    async fn freeze(&self, vm: &str) -> Result<FreezeGuard> {
        let vm_owned = vm.to_string();
        self.worker
            .call(move |c| {
                let dom = lookup(c, &vm_owned)?;
                ffi::fs_freeze(&dom)
                    .map(drop)
                    .map_err(virt_err(format!("freezing vm {vm_owned}")))
            })
            .await?;
        let release = Thaw {
            worker: self.worker.clone(),
            vm: vm.to_string(),
        };
        Ok(FreezeGuard::new(vm.to_string(), Box::new(release)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(target: &str, kind: DiskKind, format: &str) -> DiskInfo {
        DiskInfo {
            target: target.into(),
            source: (kind != DiskKind::Network).then(|| PathBuf::from(format!("/img/{target}"))),
            format: Some(format.into()),
            kind,
            capacity: 1 << 20,
        }
    }

    fn request(full: &[&str], scratch: Option<&str>) -> BackupRequest {
        BackupRequest {
            vm: "web".into(),
            disks: vec!["vda".into(), "vdb".into()],
            incremental_from: Some("sluice-1".into()),
            full_disks: full.iter().map(|d| d.to_string()).collect(),
            new_checkpoint: Some("sluice-2".into()),
            scratch_dir: scratch.map(PathBuf::from),
            socket: PathBuf::from("/unused"),
            tcp: None,
        }
    }

    #[test]
    fn scratch_files_go_beside_images_in_a_scratch_dir_or_are_refused() {
        let all = [
            disk("vda", DiskKind::File, "qcow2"),
            disk("vdb", DiskKind::File, "raw"),
        ];
        // An incremental with a disk read in full names every scratch file itself.
        let req = request(&["vdb"], None);
        let a = export_disk(&req, &all, "vda").unwrap();
        let b = export_disk(&req, &all, "vdb").unwrap();
        assert_eq!(a.scratch, Some(PathBuf::from("/img/vda.sluice-2")));
        assert!(!a.full && b.full);
        // With nothing per disk, libvirt places them (the same path).
        assert_eq!(
            export_disk(&request(&[], None), &all, "vda")
                .unwrap()
                .scratch,
            None
        );
        // A scratch directory on the hypervisor takes them all.
        let s = export_disk(&request(&["vdb"], Some("/hv/scratch")), &all, "vdb").unwrap();
        assert_eq!(
            s.scratch,
            Some(PathBuf::from("/hv/scratch/web.vdb.sluice-2.scratch.qcow2"))
        );
        // A block device or network disk has no place beside it: refused, naming the fix.
        for kind in [DiskKind::Block, DiskKind::Network] {
            let all = [
                disk("vda", DiskKind::File, "qcow2"),
                disk("vdb", kind, "raw"),
            ];
            let e = export_disk(&request(&["vdb"], None), &all, "vdb").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("scratch_dir"), "{e}");
        }
    }
}
