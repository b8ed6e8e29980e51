//! `hypervisor list`: every configured hypervisor, asked now.

use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::table::{or_dash, show};
use crate::wire::hypervisors::HypervisorInfo;

#[derive(Subcommand, Debug)]
pub enum HypervisorCmd {
    /// Every configured hypervisor, asked now: address, host, state, last error.
    List,
}

/// Runs a `hypervisor` verb.
pub async fn run(c: &Client, cmd: HypervisorCmd, as_json: bool) -> anyhow::Result<i32> {
    match cmd {
        HypervisorCmd::List => {
            let v = c.get::<Vec<HypervisorInfo>>("/hypervisors").await?;
            show(&v, as_json, |hs| table(hs));
            Ok(0)
        }
    }
}

fn table(hs: &[HypervisorInfo]) {
    println!(
        "{:<16} {:<7} {:<40} {:<20} {:<11} {:>4} LAST ERROR",
        "NAME", "KIND", "URI/SOCKET", "HOST", "STATE", "VMS"
    );
    for h in hs {
        let address = or_dash(h.uri.as_ref().or(h.socket.as_ref()));
        let error = or_dash(h.error.as_ref());
        // The row already names the hypervisor, its address and state.
        let said = format!("hypervisor {} ({address}) is unreachable: ", h.name);
        println!(
            "{:<16} {:<7} {address:<40} {:<20} {:<11} {:>4} {}",
            h.name,
            h.kind,
            h.host,
            h.state.to_string(),
            or_dash(h.vms),
            error.strip_prefix(&said).unwrap_or(&error)
        );
    }
}
