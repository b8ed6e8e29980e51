//! `job list`, `job show ID`, `job cancel ID`.

use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::table::{or_dash, show, size, when};
use crate::wire::jobs::{JobInfo, JobState};

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Every job, newest first.
    List,
    /// One job with its progress.
    Show { id: u64 },
    /// Ask a job to stop (it ends as `cancelled` once it has released its resources).
    ///
    /// An instant recovery's domain is destroyed and undefined and the guest's writes since
    /// it booted are discarded: refused without --discard-writes.
    Cancel {
        id: u64,
        /// Confirm that cancelling a running instant recovery discards its guest's writes.
        #[arg(long)]
        discard_writes: bool,
    },
}

/// Runs a `job` verb.
pub async fn run(c: &Client, cmd: JobCmd, as_json: bool) -> anyhow::Result<i32> {
    match cmd {
        JobCmd::List => {
            let v = c.get::<Vec<JobInfo>>("/jobs").await?;
            show(&v, as_json, |l| table(l));
        }
        JobCmd::Show { id } => {
            let v = c.get::<JobInfo>(&format!("/jobs/{id}")).await?;
            show(&v, as_json, detail);
        }
        JobCmd::Cancel { id, discard_writes } => {
            if !discard_writes {
                let j = c.get::<JobInfo>(&format!("/jobs/{id}")).await?;
                if let Some(i) = j
                    .body
                    .instant
                    .as_ref()
                    .filter(|_| is_running_instant(&j.body))
                {
                    eprintln!(
                        "job {id} is an instant recovery: cancelling it destroys and undefines domain {} on hypervisor {} and discards the guest's writes since it booted; add --discard-writes to go ahead",
                        i.domain, i.hypervisor
                    );
                    return Ok(2);
                }
            }
            let v = c
                .ask::<JobInfo>("POST", &format!("/jobs/{id}/cancel"), None)
                .await?;
            show(&v, as_json, |j| {
                println!("job {id} {}: cancel requested", j.state)
            });
        }
    }
    Ok(0)
}

fn table(list: &[JobInfo]) {
    println!(
        "{:>5} {:<8} {:<24} {:<10} {:<9} {:>10} MESSAGE",
        "ID", "KIND", "VM", "STATE", "MODE", "DONE"
    );
    for j in list {
        println!(
            "{:>5} {:<8} {:<24} {:<10} {:<9} {:>10} {}",
            j.id,
            j.kind.to_string(),
            j.vm,
            j.state.to_string(),
            j.mode.to_string(),
            size(j.progress.bytes_done),
            message(j)
        );
    }
}

/// The message column: the outcome, or what a running instant recovery runs.
fn message(j: &JobInfo) -> String {
    match (&j.instant, j.message.as_ref()) {
        (_, Some(m)) => m.clone(),
        (Some(i), None) => format!(
            "instant {}: domain {} on {} from backup {} ({} written)",
            i.state,
            i.domain,
            i.hypervisor,
            i.backup,
            size(i.disks.iter().map(|d| d.written).sum())
        ),
        (None, None) => "-".into(),
    }
}

/// `job show ID`: what, where, when, how far.
fn detail(j: &JobInfo) {
    let p = &j.progress;
    println!("job         {} ({} of {}, {})", j.id, j.kind, j.vm, j.mode);
    println!("state       {}", j.state);
    println!(
        "hypervisor  {} (host {})",
        or_dash(j.hypervisor.as_ref()),
        j.host
    );
    println!("policy      {}", or_dash(j.policy.as_ref()));
    println!("created     {}", when(Some(j.created)));
    println!("finished    {}", when(j.finished));
    println!(
        "progress    {} of {} done in {:.1} s",
        size(p.bytes_done),
        size(p.bytes_planned),
        p.elapsed_secs
    );
    println!(
        "read        {} ({} zero, {} new, {} deduplicated), {}/s",
        size(p.bytes_read),
        size(p.bytes_zero),
        size(p.bytes_new),
        size(p.bytes_dedup),
        size(p.read_rate as u64)
    );
    println!("backup      {}", or_dash(j.backup_id.as_ref()));
    if let Some(i) = &j.instant {
        println!(
            "instant     {}: domain {} ({}) on hypervisor {}, from backup {}, at {}",
            i.state,
            i.domain,
            or_dash(i.domain_state.as_ref()),
            i.hypervisor,
            i.backup,
            i.nbd
        );
        for d in &i.disks {
            println!(
                "  {:<8}  export {} ({}), {} written",
                d.target,
                d.export,
                size(d.size),
                size(d.written)
            );
        }
    }
    println!("message     {}", or_dash(j.message.as_ref()));
    if let Some(e) = &j.error {
        println!("error       {} ({})", e.kind, what_to_do(e.kind));
    }
}

/// What an operator does about a job that ended with `kind`.
pub(crate) fn what_to_do(kind: crate::wire::jobs::ErrorKind) -> &'static str {
    use crate::wire::jobs::ErrorKind as K;
    match kind {
        K::Retry => "a passing failure: retrying later may help",
        K::Corrupt => "stored data fails a check: run sluice verify",
        K::NotFound => "what it names does not exist",
        K::Refused => "refused as asked: see the message for what to change",
        K::InvalidInput => "fix the request",
        K::Cancelled => "cancelled; nothing was committed",
        K::Failed => "see the message",
    }
}

/// Whether `j` is an instant recovery whose domain may still run from the repository.
fn is_running_instant(j: &JobInfo) -> bool {
    j.instant.is_some() && j.state != JobState::Queued && !j.state.is_final()
}
