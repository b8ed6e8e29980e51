//! `policy apply FILE [--dry-run]`, `policy list`, `policy show NAME`, `policy delete NAME`.
//!
//! `policy apply FILE` validates the file locally first (same parser as the server, errors
//! printed as `FILE:LINE:COLUMN: message`), then sends it; the server validates again.
//! An invalid policy file exits with code 2.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::cli::client::{encode, Client, ClientError};
use crate::cli::table::{show, when};
use crate::wire::policy::{ApplyPolicyRequest, ApplyPolicyResponse, PolicyInfo, Retention};

/// Exit code of an invalid policy file.
pub const EXIT_INVALID: i32 = 2;

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate a policy file and install it (replaces a policy of the same name).
    Apply {
        file: PathBuf,
        /// Validate locally and on the server; install nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Installed policies with their next run.
    List,
    /// One policy, with its file.
    Show { name: String },
    /// Remove a policy (its backups stay).
    Delete { name: String },
}

/// Runs a `policy` verb; returns the exit code.
pub async fn run(c: &Client, cmd: PolicyCmd, as_json: bool) -> anyhow::Result<i32> {
    match cmd {
        PolicyCmd::Apply { file, dry_run } => return apply(c, &file, dry_run, as_json).await,
        PolicyCmd::List => {
            let v = c.get::<Vec<PolicyInfo>>("/policies").await?;
            show(&v, as_json, |l| table(l));
        }
        PolicyCmd::Show { name } => {
            let v = c
                .get::<PolicyInfo>(&format!("/policies/{}", encode(&name)))
                .await?;
            show(&v, as_json, |p| print!("{}", p.source));
        }
        PolicyCmd::Delete { name } => {
            c.delete(&format!("/policies/{}", encode(&name))).await?;
            println!("policy {name} deleted");
        }
    }
    Ok(0)
}

async fn apply(c: &Client, file: &Path, dry_run: bool, as_json: bool) -> anyhow::Result<i32> {
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("reading policy file {}", file.display()))?;
    if let Err(errors) = crate::wire::policy::parse(&source) {
        for e in errors {
            eprintln!("{}:{}:{}: {}", file.display(), e.line, e.column, e.message);
        }
        return Ok(EXIT_INVALID);
    }
    let req = ApplyPolicyRequest { source, dry_run };
    let v = match c.post::<ApplyPolicyResponse>("/policies", &req).await {
        Ok(v) => v,
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(ce) if ce.code == "invalid_policy" => {
                eprintln!("{}: {}", file.display(), ce.message);
                return Ok(EXIT_INVALID);
            }
            _ => return Err(e),
        },
    };
    show(&v, as_json, |r| {
        let what = match (dry_run, r.created) {
            (true, _) => "is valid (dry run, nothing installed)",
            (false, true) => "installed",
            (false, false) => "replaced",
        };
        println!(
            "policy {} {what}; next run {}",
            r.policy.policy.name,
            when(r.policy.next_run)
        );
    });
    Ok(0)
}

fn table(list: &[PolicyInfo]) {
    println!(
        "{:<20} {:<16} {:<24} {:<21} VMS",
        "NAME", "SCHEDULE", "RETENTION", "NEXT RUN"
    );
    for p in list {
        let pol = &p.policy;
        println!(
            "{:<20} {:<16} {:<24} {:<21} {}",
            pol.name,
            pol.schedule,
            retention_text(pol.retention.as_ref()),
            when(p.next_run),
            pol.vms.join(",")
        );
    }
}

/// `last=7,daily=14`, or `keep all`.
fn retention_text(r: Option<&Retention>) -> String {
    let Some(r) = r else {
        return "keep all".into();
    };
    let rules = [
        ("last", r.keep_last),
        ("hourly", r.keep_hourly),
        ("daily", r.keep_daily),
        ("weekly", r.keep_weekly),
        ("monthly", r.keep_monthly),
        ("yearly", r.keep_yearly),
    ];
    let parts: Vec<String> = rules
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    parts.join(",")
}
