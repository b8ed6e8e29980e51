//! `backup`: take one (`backup VM`, or explicitly `backup start VM`), list them
//! (`backup list [VM]`), show one (`backup show ID`).
//!
//! `backup VM` is the default form: a first word that is not a subcommand is the VM. A
//! subcommand word counts only first (after an option, `backup --full list`, it is the VM);
//! a VM named like one (`start`, `list`, `show`, `help`) is backed up with
//! `backup start list` or `backup -- list`.
//!
//! The API's backup list has no hypervisor filter: `backup list VM --hypervisor H` looks the
//! VM up on H and lists by its uuid, and `backup list --hypervisor H` lists the backups of
//! the VMs H has now.

use std::collections::HashSet;

use clap::{Args, Subcommand};

use crate::cli::client::{encode, Client, Reply};
use crate::cli::progress::wait_job;
use crate::cli::table::{or_dash, show, size, when, yes_no};
use crate::cli::verbs::lookup::{distinct_uuids, explain_ambiguous, on_hv, vm_uuid};
use crate::wire::backups::{BackupDetail, BackupSummary};
use crate::wire::jobs::JobInfo;
use crate::wire::vms::{BackupModeRequest, BackupRequest, VmList};

/// `backup VM` (the default), or a subcommand.
#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    subcommand_value_name = "COMMAND",
    override_usage = "sluice backup [OPTIONS] <VM>\n       sluice backup <COMMAND>",
    after_help = "`sluice backup VM` is `sluice backup start VM`. A VM named like a subcommand \
                  (`start`, `list`, `show`, `help`) is backed up with `sluice backup start list` \
                  or `sluice backup -- list`."
)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub cmd: Option<BackupCmd>,
    #[command(flatten)]
    pub start: StartArgs,
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a VM (what `backup VM` does; also for a VM named `list`, `show`, `start`).
    Start(StartArgs),
    /// Backups, newest first: all, or of the VMs of a name (or of a uuid).
    List {
        /// VM name or uuid.
        vm: Option<String>,
        /// Only the backups of that hypervisor's VM (or, without a VM, of the VMs it has
        /// now).
        #[arg(long, value_name = "NAME")]
        hypervisor: Option<String>,
    },
    /// One backup in full: its VM, mode, consistency, sizes and disks.
    Show {
        /// Backup id.
        id: String,
        /// Refused: a backup id names its VM.
        #[arg(long, value_name = "NAME", hide = true)]
        hypervisor: Option<String>,
    },
}

/// What to back up and how.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// The VM to back up.
    #[arg(value_name = "VM", required = true)]
    pub vm: Option<String>,
    /// Read every disk in full.
    #[arg(long)]
    pub full: bool,
    /// Wait for the job to end, with a progress bar.
    #[arg(long)]
    pub wait: bool,
    /// The VM's hypervisor (needed when its name is on several).
    #[arg(long, value_name = "NAME")]
    pub hypervisor: Option<String>,
}

/// Runs a `backup` verb.
pub async fn run(c: &Client, args: BackupArgs, as_json: bool) -> anyhow::Result<i32> {
    match args.cmd {
        None => start(c, args.start, as_json).await,
        Some(BackupCmd::Start(s)) => start(c, s, as_json).await,
        Some(BackupCmd::List { vm, hypervisor }) => {
            let list = list(c, vm.as_deref(), hypervisor.as_deref()).await?;
            show(&list, as_json, |l| table(l));
            Ok(0)
        }
        Some(BackupCmd::Show {
            hypervisor: Some(_),
            ..
        }) => {
            anyhow::bail!("--hypervisor does not apply to `backup show` (a backup id names its VM)")
        }
        Some(BackupCmd::Show { id, .. }) => {
            let b = c
                .get::<BackupDetail>(&format!("/backups/{}", encode(&id)))
                .await?;
            show(&b, as_json, detail);
            Ok(0)
        }
    }
}

/// `backup VM [--full] [--wait] [--hypervisor NAME]`.
async fn start(c: &Client, s: StartArgs, as_json: bool) -> anyhow::Result<i32> {
    let vm = s.vm.unwrap_or_default();
    let hv = s.hypervisor.as_deref();
    let mode = if s.full {
        BackupModeRequest::Full
    } else {
        BackupModeRequest::Auto
    };
    let path = format!("/vms/{}/backups{}", encode(&vm), on_hv(hv));
    let job = match c.post::<JobInfo>(&path, &BackupRequest { mode }).await {
        Ok(job) => job,
        Err(e) => return Err(explain_ambiguous(c, &vm, e, false).await),
    };
    let id = job.body.id;
    if s.wait {
        return wait_job(c, id, &format!("backup {vm}"), as_json).await;
    }
    show(&job, as_json, |j| {
        let on = j.hypervisor.as_deref().unwrap_or("?");
        println!("job {id} queued: backup of {vm} on {on} ({mode})");
    });
    Ok(0)
}

/// `backup list [VM] [--hypervisor NAME]`: the API's list, filtered by uuid for a hypervisor.
async fn list(
    c: &Client,
    vm: Option<&str>,
    hv: Option<&str>,
) -> anyhow::Result<Reply<Vec<BackupSummary>>> {
    let of = |vm: &str| format!("/backups?vm={}", encode(vm));
    match (vm, hv) {
        (None, None) => c.get("/backups").await,
        (Some(vm), None) => {
            let v = c.get::<Vec<BackupSummary>>(&of(vm)).await?;
            let uuids = distinct_uuids(&v.body);
            if uuids.len() > 1 {
                eprintln!(
                    "note: {} VMs named {vm} have backups (uuids {}): --hypervisor NAME or `backup list UUID` lists one",
                    uuids.len(),
                    uuids.join(", ")
                );
            }
            Ok(v)
        }
        (Some(vm), Some(hv)) => c.get(&of(&vm_uuid(c, vm, hv).await?)).await,
        (None, Some(hv)) => of_hypervisor(c, hv).await,
    }
}

/// The backups of the VMs hypervisor `hv` has now.
async fn of_hypervisor(c: &Client, hv: &str) -> anyhow::Result<Reply<Vec<BackupSummary>>> {
    let v = c
        .get::<VmList>(&format!("/vms?hypervisor={}", encode(hv)))
        .await?;
    if let Some(u) = v.body.unreachable.first() {
        anyhow::bail!(
            "hypervisor {hv} is unreachable, so which backups are of its VMs is unknown: {}",
            u.error
        );
    }
    let uuids: HashSet<String> = v.body.vms.into_iter().map(|r| r.uuid).collect();
    let all = c.get::<Vec<BackupSummary>>("/backups").await?;
    Ok(all.retain(|b| uuids.contains(&b.vm_uuid)))
}

fn table(list: &[BackupSummary]) {
    println!(
        "{:<28} {:<24} {:<13} {:<20} {:>10} PROTECTED",
        "ID", "VM", "MODE", "FINISHED", "STORED"
    );
    for b in list {
        println!(
            "{:<28} {:<24} {:<13} {:<20} {:>10} {}",
            b.id,
            b.vm,
            b.mode,
            when(Some(b.finished)),
            size(b.bytes_stored),
            yes_no(b.protected)
        );
    }
}

/// `backup show ID`: the backup, then its disks.
fn detail(d: &BackupDetail) {
    let b = &d.summary;
    let why = b
        .reason
        .as_ref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    println!("backup      {}", b.id);
    println!("vm          {} ({})", b.vm, b.vm_uuid);
    println!("started     {}", when(Some(b.started)));
    println!("finished    {}", when(Some(b.finished)));
    println!("mode        {}{why}", b.mode);
    println!("consistency {}", d.consistency);
    if let Some(state) = &d.vm_state {
        println!("vm state    {}", state.replace('_', " "));
    }
    println!("protected   {}", yes_no(b.protected));
    println!(
        "stored      {} (new data {} before compression)",
        size(b.bytes_stored),
        size(d.bytes_new_raw)
    );
    println!(
        "chunks      {} new, {} deduplicated, {} zero",
        d.chunks_new, d.chunks_dedup, d.chunks_zero
    );
    println!(
        "\n{:<8} {:>10} {:>10} {:<28} PARENT",
        "DISK", "SIZE", "CHUNK", "CHECKPOINT"
    );
    for k in &d.disks {
        println!(
            "{:<8} {:>10} {:>10} {:<28} {}",
            k.target,
            size(k.size),
            size(u64::from(k.chunk_size)),
            or_dash(k.checkpoint.as_ref()),
            or_dash(k.parent_backup.as_ref())
        );
    }
    for k in d.disks.iter().filter(|k| k.full_read.is_some()) {
        let why = k.full_read.as_deref().unwrap_or_default();
        println!("{}: read in full: {why}", k.target);
    }
}
