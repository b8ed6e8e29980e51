//! The restore jobs' bodies: to a file, as a new domain, onto the VM's own disks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use catalog::BackupId;

use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::restore::file::{restore_disk_with, FileRestoreControl};
use proxy::restore::{restore_onto_vm, ExportName, OntoPath, OntoVmOptions, RestoredDisk};

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

fn libvirt<'a>(conn: &'a dyn Hv, hv: &Member) -> Result<&'a LibvirtHypervisor, JobError> {
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
    Ok(JobDone::Done(format!(
        "restored {} disk(s) of backup {} as domain {new_name}",
        disks.len(),
        disks[0].0.backup
    )))
}

async fn define(hv: &Member, xml: &str) -> Result<String, JobError> {
    let conn = hv.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let lv = libvirt(&*conn, hv)?;
    lv.define_domain(xml)
        .await
        .map_err(|e| failure::hypervisor(&e))
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
