//! `restore ID --instant [--hypervisor H] [--as-domain NAME]`: starts an instant recovery and
//! waits until its domain runs from the repository (or the job fails), then says where it runs
//! and how it ends. The job keeps running after the CLI returns: it ends with
//! `job cancel ID --discard-writes` (see `job.rs`), which destroys and undefines the domain.

use std::time::Duration;

use crate::cli::client::{hypervisor_hint, Client};
use crate::cli::table::{or_dash, print_json};
use crate::wire::instant::InstantState;
use crate::wire::jobs::JobInfo;
use crate::wire::restores::RestoreRequest;

/// Pause between two looks at the job while its domain starts.
const POLL_EVERY: Duration = Duration::from_millis(300);

/// Starts the instant recovery `req`; unless `no_wait`, waits until its domain runs (exit 0)
/// or the job ends (exit 5).
pub async fn run(
    c: &Client,
    req: RestoreRequest,
    no_wait: bool,
    as_json: bool,
) -> anyhow::Result<i32> {
    let backup = req.backup.clone();
    let job = c
        .post::<JobInfo>("/restores", &req)
        .await
        .map_err(hypervisor_hint)?;
    let id = job.body.id;
    let end = if no_wait {
        job
    } else {
        loop {
            let j = c.get::<JobInfo>(&format!("/jobs/{id}")).await?;
            let running = j
                .body
                .instant
                .as_ref()
                .is_some_and(|i| i.state == InstantState::Running);
            if running || j.body.state.is_final() {
                break j;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    };
    if as_json {
        print_json(&end.json);
    } else {
        say(&end.body, &backup);
    }
    Ok(if end.body.state.is_final() { 5 } else { 0 })
}

/// What the operator reads: where the domain runs and how the recovery ends, or why not.
fn say(j: &JobInfo, backup: &str) {
    let id = j.id;
    match (&j.instant, j.state) {
        (_, s) if s.is_final() => {
            println!("job {id} {s}: {}", or_dash(j.message.as_deref()));
            if let Some(e) = &j.error {
                eprintln!(
                    "error kind {}: {}",
                    e.kind,
                    crate::cli::verbs::job::what_to_do(e.kind)
                );
            }
        }
        (Some(i), _) if i.state == InstantState::Running => {
            let exports: Vec<&str> = i.disks.iter().map(|d| d.export.as_str()).collect();
            println!(
                "job {id} running: domain {} on hypervisor {} runs from backup {} (disks {} at {})",
                i.domain,
                i.hypervisor,
                i.backup,
                exports.join(", "),
                i.nbd
            );
            println!(
                "its writes are kept on the proxy until the job ends; `sluice job cancel {id} --discard-writes` destroys and undefines the domain and discards them"
            );
        }
        _ => println!("job {id} {}: instant recovery of {backup} queued", j.state),
    }
}
