//! CLI verbs of the operations side: `policy apply/list/show/delete`, and waiting for a job
//! (`--wait`).
//!
//! A wait follows the job's Server-Sent Events stream (`GET /jobs/{id}/events`), which feeds
//! the progress bar. If the stream breaks (daemon restart, a proxy cutting it), the wait says
//! so once and polls `GET /jobs/{id}` instead, riding out a daemon that is briefly
//! unreachable. Exit codes: 0 succeeded, 5 failed or cancelled (API errors as `cli::run`).
//!
//! `policy apply FILE` validates the file locally first (same parser as the server, errors
//! printed as `FILE:LINE:COLUMN: message`), then sends it; the server validates again.
//! An invalid policy file exits with code 2.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cli::client::{Client, ClientError};
use crate::wire::cron::format_utc;

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
    if let Err(errors) = crate::wire::policy::parse(&source) {
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

/// `v` as pretty JSON with `--json`, else through `table`.
pub(crate) fn print(v: &Value, as_json: bool, table: impl Fn(&Value)) {
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

/// Pause between two polls once the event stream is gone.
const POLL_EVERY: Duration = Duration::from_millis(300);
/// How long polling rides out a daemon that cannot be reached (a restart).
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);

/// How a wait for a job ended.
#[derive(Debug, Clone)]
pub struct Waited {
    /// The job's last state, as `GET /jobs/{id}` shows it.
    pub end: Value,
    /// Job snapshots received from the event stream.
    pub events: usize,
    /// Why the event stream was given up for polling, if it was.
    pub fell_back: Option<String>,
}

/// Follows job `id` to its end, calling `update` with every snapshot (from the event stream,
/// or from polls once it broke). API errors (unknown job, no right) are returned as is.
pub async fn follow_job(
    c: &Client,
    id: u64,
    update: &mut dyn FnMut(&Value),
) -> anyhow::Result<Waited> {
    let mut events = 0;
    let reason = match stream_to_end(c, id, update, &mut events).await {
        Ok(end) => {
            return Ok(Waited {
                end,
                events,
                fell_back: None,
            })
        }
        Err(e)
            if e.downcast_ref::<ClientError>()
                .is_some_and(|ce| ce.status < 500) =>
        {
            return Err(e)
        }
        Err(e) => format!("{e:#}"),
    };
    eprintln!("note: the event stream of job {id} broke ({reason}); polling the job instead");
    let end = poll_to_end(c, id, update).await?;
    Ok(Waited {
        end,
        events,
        fell_back: Some(reason),
    })
}

fn is_final(j: &Value) -> bool {
    matches!(
        j["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

async fn stream_to_end(
    c: &Client,
    id: u64,
    update: &mut dyn FnMut(&Value),
    events: &mut usize,
) -> anyhow::Result<Value> {
    let mut stream = c.events(&format!("/jobs/{id}/events")).await?;
    while let Some(ev) = stream.next().await? {
        let Ok(j) = serde_json::from_str::<Value>(&ev.data) else {
            anyhow::bail!("an event of job {id} is not JSON");
        };
        *events += 1;
        update(&j);
        if ev.name == "end" || is_final(&j) {
            return Ok(j);
        }
    }
    anyhow::bail!("the stream ended before the job did")
}

async fn poll_to_end(c: &Client, id: u64, update: &mut dyn FnMut(&Value)) -> anyhow::Result<Value> {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match c.call("GET", &format!("/jobs/{id}"), None).await {
            Ok(j) => {
                unreachable_since = None;
                update(&j);
                if is_final(&j) {
                    return Ok(j);
                }
            }
            Err(e) if e.downcast_ref::<ClientError>().is_some() => return Err(e),
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_FOR {
                    return Err(e.context(format!(
                        "job {id}: the daemon stayed unreachable for {UNREACHABLE_FOR:?}"
                    )));
                }
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Waits for job `id` with a progress bar (none with `--json`), prints its end state; exit
/// code 0 if it succeeded, 5 if not.
pub async fn wait_job(c: &Client, id: u64, label: &str, as_json: bool) -> anyhow::Result<i32> {
    let bar = (!as_json).then(|| progress_bar(label));
    let mut update = |j: &Value| {
        if let Some(b) = &bar {
            b.set_length(j["progress"]["bytes_planned"].as_u64().unwrap_or(0));
            b.set_position(j["progress"]["bytes_done"].as_u64().unwrap_or(0));
        }
    };
    let waited = follow_job(c, id, &mut update).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let end = waited?.end;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&end)?);
    } else {
        let text = |v: &Value| v.as_str().map_or_else(|| "-".to_string(), str::to_string);
        println!(
            "job {id} {}: {}",
            text(&end["state"]),
            text(&end["message"])
        );
    }
    Ok(if end["state"] == "succeeded" { 0 } else { 5 })
}

fn progress_bar(label: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(label.to_string());
    b
}
