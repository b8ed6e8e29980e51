//! A process that starts a backup and hangs right after the point in time, for the test that
//! kills the proxy with SIGKILL mid-backup (`tests/tests/backup_crash.rs`).
//!
//! Usage: `backup-child VM REPO_DIR WORK_DIR`; prints `point-in-time` once the hypervisor job
//! is running, then waits to be killed.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use catalog::{FsBackend, RepoOptions, Repository};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::job::{run_backup, BackupOptions, Progress};
use tokio_util::sync::CancellationToken;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, vm, repo_dir, work_dir] = &args[..] else {
        anyhow::bail!("usage: backup-child VM REPO_DIR WORK_DIR");
    };
    let dir = std::path::Path::new(repo_dir);
    let repo = Repository::open(
        Arc::new(FsBackend::open(dir.join("repo"))?),
        RepoOptions::new(dir.join("catalog.db")),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let hv = rt.block_on(LibvirtHypervisor::connect("qemu:///system"))?;
    let mut opts = BackupOptions::new(work_dir);
    opts.after_point_in_time = Some(Arc::new(|| {
        Box::pin(async {
            println!("point-in-time");
            let _ = std::io::stdout().flush();
            tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        })
    }));
    let progress = Arc::new(Progress::default());
    rt.block_on(run_backup(
        &hv,
        &repo,
        vm,
        &opts,
        progress,
        CancellationToken::new(),
    ))
    .context("backup")?;
    Ok(())
}
