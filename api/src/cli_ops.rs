//! CLI verbs of the operations side: `policy apply/list/show/delete`.
//!
//! `policy apply FILE` validates the file locally first (same parser as the server, errors
//! printed as `FILE:LINE:COLUMN: message`), then sends it; the server validates again.
//! An invalid policy file exits with code 2.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::cron::format_utc;

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
pub async fn policy(c: &Client, cmd: PolicyCmd, as_json: bool) -> anyhow::Result<i32> {
    match cmd {
        PolicyCmd::Apply { file, dry_run } => apply(c, &file, dry_run, as_json).await,
        PolicyCmd::List => {
            let v = c.call("GET", "/policies", None).await?;
            print(&v, as_json, policy_table);
            Ok(0)
        }
        PolicyCmd::Show { name } => {
            let v = c.call("GET", &format!("/policies/{name}"), None).await?;
            print(&v, as_json, |v| {
                print!("{}", v["source"].as_str().unwrap_or(""))
            });
            Ok(0)
        }
        PolicyCmd::Delete { name } => {
            c.call("DELETE", &format!("/policies/{name}"), None).await?;
            println!("policy {name} deleted");
            Ok(0)
        }
    }
}

async fn apply(
    c: &Client,
    file: &std::path::Path,
    dry_run: bool,
    as_json: bool,
) -> anyhow::Result<i32> {
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("reading policy file {}", file.display()))?;
    if let Err(errors) = crate::policy::parse(&source) {
        for e in errors {
            eprintln!("{}:{}:{}: {}", file.display(), e.line, e.column, e.message);
        }
        return Ok(EXIT_INVALID);
    }
    let body = json!({ "source": source, "dry_run": dry_run });
    let v = match c.call("POST", "/policies", Some(body)).await {
        Ok(v) => v,
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(ce) if ce.code == "invalid_policy" => {
                eprintln!("{}: {}", file.display(), ce.message);
                return Ok(EXIT_INVALID);
            }
            _ => return Err(e),
        },
    };
    print(&v, as_json, |v| {
        let name = v["policy"]["policy"]["name"].as_str().unwrap_or("?");
        let what = match (dry_run, v["created"] == true) {
            (true, _) => "is valid (dry run, nothing installed)",
            (false, true) => "installed",
            (false, false) => "replaced",
        };
        println!(
            "policy {name} {what}; next run {}",
            when(&v["policy"]["next_run"])
        );
    });
    Ok(0)
}

fn print(v: &Value, as_json: bool, table: impl Fn(&Value)) {
    if as_json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v)
    }
}

fn when(v: &Value) -> String {
    v.as_i64().map_or_else(|| "-".into(), format_utc)
}

fn policy_table(v: &Value) {
    println!(
        "{:<20} {:<16} {:<24} {:<21} VMS",
        "NAME", "SCHEDULE", "RETENTION", "NEXT RUN"
    );
    for p in v.as_array().map_or(&[][..], |a| a.as_slice()) {
        let pol = &p["policy"];
        let keep = retention_text(&pol["retention"]);
        let vms: Vec<&str> = pol["vms"]
            .as_array()
            .map_or(vec![], |a| a.iter().filter_map(Value::as_str).collect());
        println!(
            "{:<20} {:<16} {:<24} {:<21} {}",
            pol["name"].as_str().unwrap_or("?"),
            pol["schedule"].as_str().unwrap_or("?"),
            keep,
            when(&p["next_run"]),
            vms.join(",")
        );
    }
}

fn retention_text(r: &Value) -> String {
    let Some(obj) = r.as_object() else {
        return "keep all".into();
    };
    let parts: Vec<String> = obj
        .iter()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{}={n}", k.trim_start_matches("keep_")))
        .collect();
    parts.join(",")
}
