//! The restore jobs' bodies: to a file, as a new domain, onto the VM's own disks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use catalog::BackupId;

use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::restore::file::{restore_disk_with, FileRestoreControl};
use proxy::restore::{
    restore_onto_vm, restore_to_pool, ExportName, OntoPath, OntoVmOptions, PoolRestoreOptions,
    RestoredDisk,
};

use super::plan::Plan;
use super::staging::Staging;
use crate::daemon::hypervisors::{Hv, Member};
use crate::daemon::jobs::{JobDone, JobHandle, JobOutcome};
use crate::daemon::ops::failure;
use crate::daemon::state::SharedState;
use crate::wire::jobs::JobError;
use crate::wire::restores::RestoreFormat;

pub(super) async fn run(
    st: SharedState,
    plan: Plan,
    format: RestoreFormat,
    h: JobHandle,
) -> JobOutcome {
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
            Ok(JobDone::Done(format!(
                "restored {name} to {} ({})",
                target.display(),
                format.name()
            )))
        }
        Plan::Domain {
            hv,
            new_name,
            xml,
            disks,
            start,
        } => {
            let job = DomainJob {
                hv: &hv,
                new_name: &new_name,
                xml: &xml,
                disks: &disks,
                start,
            };
            domain_job(&st, job, format, &h).await
        }
        Plan::Pool {
            hv,
            new_name,
            pool,
            xml,
            disks,
            start,
        } => {
            let opts = PoolRestoreOptions {
                new_name,
                pool,
                format: format.image(),
                start,
                domain_xml: xml,
                disks,
                cancel: h.cancel.clone(),
                progress: h.progress.clone(),
                limit: st.read_limit.clone(),
            };
            pool_job(&st, &hv, opts).await
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
    let conn = hv.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let lv = libvirt(&*conn, hv)?;
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
    let rep = r.map_err(|e| failure::restore(&e))?;
    let paths: Vec<String> = rep
        .disks
        .iter()
        .map(|d| match &d.path {
            OntoPath::Changed { .. } => format!("{}: changed chunks only", d.disk),
            OntoPath::Full { reason } => format!("{}: in full ({reason})", d.disk),
        })
        .collect();
    Ok(JobDone::Done(format!(
        "restored backup {backup} onto vm {vm} ({})",
        paths.join("; ")
    )))
}

/// A restore as a new domain into a storage pool of `hv` (`proxy::restore::volume`): the
/// library removes what it made if it fails or is cancelled, and its error says so.
async fn pool_job(st: &SharedState, hv: &Member, opts: PoolRestoreOptions) -> JobOutcome {
    let conn = hv.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let lv = libvirt(&*conn, hv)?;
    let rep = restore_to_pool(lv, &st.repo, &opts)
        .await
        .map_err(|e| failure::restore(&e))?;
    let vols: Vec<String> = rep
        .volumes
        .iter()
        .map(|v| format!("{} ({} bytes allocated)", v.name, v.allocation))
        .collect();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rate = match rep.upload_seconds {
        s if s > 0.0 => mib(rep.data_bytes) / s,
        _ => 0.0,
    };
    Ok(JobDone::Done(format!(
        "restored {} disk(s) of backup {} as domain {} on hypervisor {} in storage pool {}: {}; \
         {:.1} MiB uploaded and {:.1} MiB sent as holes in {:.1} s ({rate:.1} MiB/s){}",
        rep.volumes.len(),
        opts.disks[0].backup,
        rep.domain,
        hv.name(),
        opts.pool,
        vols.join(", "),
        mib(rep.data_bytes),
        mib(rep.hole_bytes),
        rep.upload_seconds,
        if rep.started { "; started" } else { "" }
    )))
}

pub(super) fn libvirt<'a>(
    conn: &'a dyn Hv,
    hv: &Member,
) -> Result<&'a LibvirtHypervisor, JobError> {
    conn.as_any()
        .downcast_ref::<LibvirtHypervisor>()
        .ok_or_else(|| {
            failure::refused(format!(
                "hypervisor {} is not a libvirt hypervisor",
                hv.name()
            ))
        })
}

/// What a restore as a new domain defines, and where.
struct DomainJob<'a> {
    hv: &'a Member,
    new_name: &'a str,
    xml: &'a str,
    disks: &'a [(ExportName, PathBuf)],
    start: bool,
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
        start,
    } = job;
    let first = &disks
        .first()
        .ok_or_else(|| failure::failed("the backup has no disks"))?
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
        Err(e) => return Err(failure::hypervisor(&e)),
    };
    let new_xml = proxy::restore::restore_as_domain(xml, new_name, &restored, &names)
        .map_err(|e| failure::restore(&e))?;
    // The copy gets its own console logs and sockets, so it can run beside the original.
    let run_dir = first.with_file_name(format!("{new_name}-run"));
    let new_xml =
        proxy::restore::relocate_chardevs(&new_xml, &run_dir).map_err(|e| failure::restore(&e))?;
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| failure::io(format_args!("creating {}", run_dir.display()), &e))?;
    for (_, p) in disks {
        staging.place(p, false)?;
    }
    if let Err(e) = define(hv, &new_xml).await {
        for (_, p) in disks {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&run_dir);
        return Err(JobError::new(
            e.kind,
            format!("defining domain {new_name}: {}", e.message),
        ));
    }
    if start {
        start_domain(hv, new_name).await?;
    }
    Ok(JobDone::Done(format!(
        "restored {} disk(s) of backup {} as domain {new_name}{}",
        disks.len(),
        disks[0].0.backup,
        if start { "; started" } else { "" }
    )))
}

async fn define(hv: &Member, xml: &str) -> Result<String, JobError> {
    let conn = hv.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let lv = libvirt(&*conn, hv)?;
    lv.define_domain(xml)
        .await
        .map_err(|e| failure::hypervisor(&e))
}

/// Starts a restored domain; a failure keeps it (it is whole) and says so.
async fn start_domain(hv: &Member, name: &str) -> Result<(), JobError> {
    let conn = hv.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let lv = libvirt(&*conn, hv)?;
    lv.start_domain(name).await.map_err(|e| {
        let e = failure::hypervisor(&e);
        JobError::new(
            e.kind,
            format!(
                "domain {name} is restored and defined with its disks (kept), but it did not start: {}",
                e.message
            ),
        )
    })
}

/// Copies each disk into the staging directory; honours cancel between and (by discarding the
/// result) during disks. Progress: the plan is set here, `proxy::restore` (the one writer of
/// the done counters) adds each chunk it writes.
async fn copy_disks(
    st: &SharedState,
    disks: &[(ExportName, PathBuf)],
    staging: &Staging,
    format: RestoreFormat,
    h: &JobHandle,
) -> Result<(), JobError> {
    let planned = disk_sizes(st, disks).await?;
    h.progress.bytes_planned.store(planned, Ordering::Relaxed);
    for (name, target) in disks {
        copy_one(st, name, staging.file(target), format, h).await?;
    }
    Ok(())
}

/// One disk's copy with live progress; on cancel the copy stops at its next batch of chunks
/// and removes its partial file.
async fn copy_one(
    st: &SharedState,
    name: &ExportName,
    file: PathBuf,
    format: RestoreFormat,
    h: &JobHandle,
) -> Result<(), JobError> {
    let control = FileRestoreControl {
        cancel: h.cancel.clone(),
        progress: h.progress.clone(),
    };
    let run = restore_disk_with(&st.repo, name, file, format.image(), control);
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => r.map(drop).map_err(|e| failure::restore(&e)),
        _ = h.cancel.cancelled() => {
            let _ = run.await;
            Err(JobError::cancelled("restore cancelled; nothing was written"))
        }
    }
}

async fn disk_sizes(st: &SharedState, disks: &[(ExportName, PathBuf)]) -> Result<u64, JobError> {
    let Some((first, _)) = disks.first() else {
        return Ok(0);
    };
    let id = first.backup.clone();
    let m = st
        .repo(move |r| r.manifest(&id))
        .await
        .map_err(|e| failure::failed(e.message))?;
    Ok(m.disks
        .iter()
        .filter(|d| disks.iter().any(|(n, _)| n.disk == d.target))
        .map(|d| d.size)
        .sum())
}
