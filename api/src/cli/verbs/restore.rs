//! `restore ID`: one disk to an image file (`--to PATH`), every disk as a new domain
//! (`--as-domain NAME [--pool POOL] [--start]`: volumes of a storage pool on the hypervisor,
//! or files of the proxy for a local one) or back onto the VM's own disks
//! (`--onto-vm --confirm`). Waits for the job unless `--no-wait`.

use std::path::PathBuf;

use clap::Args;

use crate::cli::client::{hypervisor_hint, Client};
use crate::cli::progress::wait_job;
use crate::cli::table::show;
use crate::wire::jobs::JobInfo;
use crate::wire::restores::{RestoreFormat, RestoreRequest};

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Backup id.
    pub id: String,
    /// Image file to write (inside a restore directory of the daemon).
    #[arg(long, conflicts_with = "as_domain")]
    pub to: Option<PathBuf>,
    /// qcow2 (default) or raw.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<RestoreFormat>,
    /// Disk target (default: the backup's first disk).
    #[arg(long)]
    pub disk: Option<String>,
    /// Replace an existing file at --to.
    #[arg(long)]
    pub force: bool,
    /// Define a new domain of this name with the restored disks.
    #[arg(long)]
    pub as_domain: Option<String>,
    /// The storage pool on the hypervisor for the volumes of --as-domain (default for a
    /// remote hypervisor: `default`); volumes are uploaded over the libvirt connection.
    #[arg(long, value_name = "POOL", requires = "as_domain")]
    pub pool: Option<String>,
    /// Start the domain --as-domain defines once its disks are restored.
    #[arg(long, requires = "as_domain")]
    pub start: bool,
    /// Write the backup back onto its own (shut-off) VM's disks; needs --confirm.
    #[arg(long, conflicts_with_all = ["to", "as_domain"])]
    pub onto_vm: bool,
    /// Instant recovery: run the backup at once as a new domain (--as-domain, default
    /// VM-instant) straight from the repository; returns once it runs.
    #[arg(long, conflicts_with_all = ["to", "onto_vm", "disk", "format"])]
    pub instant: bool,
    /// Confirm that --onto-vm overwrites the VM's disks.
    #[arg(long)]
    pub confirm: bool,
    /// The libvirt hypervisor of --as-domain / --onto-vm (default: the one with the
    /// backed-up VM, else the only libvirt one).
    #[arg(long, value_name = "NAME", conflicts_with = "to")]
    pub hypervisor: Option<String>,
    /// Return once the job is queued.
    #[arg(long)]
    pub no_wait: bool,
}

/// `qcow2` or `raw`.
fn parse_format(s: &str) -> Result<RestoreFormat, String> {
    match s {
        "qcow2" => Ok(RestoreFormat::Qcow2),
        "raw" => Ok(RestoreFormat::Raw),
        _ => Err(format!("{s:?} is not an image format: qcow2 or raw")),
    }
}

/// Runs `restore`.
pub async fn run(c: &Client, a: RestoreArgs, as_json: bool) -> anyhow::Result<i32> {
    let to = match a.to {
        Some(p) => Some(
            std::path::absolute(&p)?
                .into_os_string()
                .into_string()
                .map_err(|p| anyhow::anyhow!("--to {p:?} is not UTF-8"))?,
        ),
        None => None,
    };
    let req = RestoreRequest {
        backup: a.id.clone(),
        disk: a.disk,
        to,
        format: a.format,
        overwrite: a.force,
        as_domain: a.as_domain,
        pool: a.pool,
        start: a.start,
        onto_vm: a.onto_vm,
        confirm: a.confirm,
        hypervisor: a.hypervisor,
        instant: a.instant,
    };
    if req.instant {
        return crate::cli::verbs::instant::run(c, req, a.no_wait, as_json).await;
    }
    let job = c
        .post::<JobInfo>("/restores", &req)
        .await
        .map_err(hypervisor_hint)?;
    let jid = job.body.id;
    if a.no_wait {
        show(&job, as_json, |_| {
            println!("job {jid} queued: restore of {}", a.id)
        });
        return Ok(0);
    }
    wait_job(c, jid, &format!("restore {}", a.id), as_json).await
}
