//! `vm list [--hypervisor NAME]`: the VMs the hypervisors see, with their last backup. The
//! table (or JSON) goes to stdout, each unreachable hypervisor as a note on stderr; the exit
//! code stays 0.

use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::table::{or_dash, show};
use crate::cli::verbs::lookup::on_hv;
use crate::wire::vms::VmList;

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs with their hypervisor and last backup.
    List {
        /// Only the VMs of this hypervisor (only it is asked).
        #[arg(long, value_name = "NAME")]
        hypervisor: Option<String>,
    },
}

/// Runs a `vm` verb.
pub async fn run(c: &Client, cmd: VmCmd, as_json: bool) -> anyhow::Result<i32> {
    match cmd {
        VmCmd::List { hypervisor } => list(c, hypervisor.as_deref(), as_json).await,
    }
}

async fn list(c: &Client, hv: Option<&str>, as_json: bool) -> anyhow::Result<i32> {
    let v = c.get::<VmList>(&format!("/vms{}", on_hv(hv))).await?;
    show(&v, as_json, table);
    for u in &v.body.unreachable {
        eprintln!(
            "note: the VMs of hypervisor {} are not listed: {}",
            u.hypervisor, u.error
        );
    }
    Ok(0)
}

fn table(v: &VmList) {
    println!(
        "{:<24} {:<16} {:<9} {:>5} {:<28}",
        "NAME", "HYPERVISOR", "STATE", "DISKS", "LAST BACKUP"
    );
    for r in &v.vms {
        println!(
            "{:<24} {:<16} {:<9} {:>5} {:<28}",
            r.name,
            r.hypervisor,
            r.state,
            r.disks.len(),
            or_dash(r.last_backup.as_ref().map(|b| &b.id))
        );
    }
}
