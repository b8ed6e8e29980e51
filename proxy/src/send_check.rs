//! Compile-time check that every public operation of the proxy returns a `Send` future, so
//! the daemon runs its jobs as tasks on its multi-threaded runtime (no per-job thread or
//! runtime). Nothing here runs: the function only has to type-check, with each operation's
//! generic parameters set to the adapters the daemon uses (libvirt and QMP).
//!
//! A `&BackupSession` held across an `.await` is what once made `run_backup` non-`Send` (its
//! release hook was not `Sync`); a change that brings that back fails to build here.

use std::path::Path;
use std::sync::Arc;

use catalog::Repository;
use tokio_util::sync::CancellationToken;

use crate::hypervisor::libvirt::LibvirtHypervisor;
use crate::hypervisor::qmp::QmpHypervisor;
use crate::job::{self, BackupOptions, Progress};
use crate::restore::file::FileRestoreControl;
use crate::restore::{self, ExportName, ExportOptions, ImageFormat, OntoVmOptions, RepoExport};

fn send<T: Send>(_: T) {}

/// Names the future of each public async operation; never called.
#[allow(dead_code)]
fn operations_are_send(
    lv: &LibvirtHypervisor,
    qmp: &QmpHypervisor,
    repo: &Repository,
    backup: &BackupOptions,
    onto: &OntoVmOptions,
    name: &ExportName,
    dir: &Path,
) {
    let (progress, cancel) = (Arc::new(Progress::default()), CancellationToken::new());
    send(job::run_backup(
        lv,
        repo,
        "vm",
        backup,
        progress.clone(),
        cancel.clone(),
    ));
    send(job::run_backup(qmp, repo, "vm", backup, progress, cancel));
    send(job::end_stale_backup(lv, "vm", dir));
    send(job::end_stale_backup(qmp, "vm", dir));
    send(job::end_stale_backup_in(lv, "vm", dir));
    send(job::end_stale_backup_in(qmp, "vm", dir));
    send(restore::restore_onto_vm(lv, repo, onto));
    send(restore::restore_onto_vm(qmp, repo, onto));
    let file = dir.join("disk.raw");
    send(restore::restore_disk(
        repo,
        name,
        file.clone(),
        ImageFormat::Raw,
    ));
    let control = FileRestoreControl::default();
    send(restore::file::restore_disk_with(
        repo,
        name,
        file,
        ImageFormat::Qcow2,
        control,
    ));
    send(RepoExport::open(repo, name, ExportOptions::default()));
    send(crate::repo::call(|| Ok(())));
    send(crate::repo::latest_backup(repo, "uuid"));
    send(lv.define_and_start(""));
    send(lv.domain_state("vm"));
    send(lv.end_instant_domain("vm", &[]));
}

/// The restore into a storage pool (`restore::volume`) and its checks; never called.
#[allow(dead_code)]
fn pool_restores_are_send(
    lv: &LibvirtHypervisor,
    repo: &Repository,
    pool: &restore::PoolRestoreOptions,
) {
    send(restore::restore_to_pool(lv, repo, pool));
    send(restore::check_pool_restore(
        lv,
        "new",
        "default",
        &["vda"],
        ImageFormat::Qcow2,
    ));
}
