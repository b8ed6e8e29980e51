//! The restore jobs' bodies: to a file, as a new domain, onto the VM's own disks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use catalog::BackupId;

use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::job::Progress;
use proxy::restore::file::{restore_disk_with, FileRestoreControl};
use proxy::restore::{
    restore_onto_vm, ErrorKind as RestoreErrorKind, ExportName, OntoPath, OntoVmOptions,
    RestoredDisk,
};

use super::plan::Plan;
use super::staging::Staging;
use crate::daemon::hypervisors::{Hv, Member};
use crate::daemon::jobs::{JobHandle, JobOutcome};
use crate::daemon::state::SharedState;
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
