//! Waiting for a job (`--wait`, and restores unless `--no-wait`), with a progress bar.
//!
//! A wait follows the job's Server-Sent Events stream (`GET /jobs/{id}/events`), which feeds
//! the progress bar. If the stream breaks (daemon restart, a proxy cutting it), the wait says
//! so once and polls `GET /jobs/{id}` instead, riding out a daemon that is briefly
//! unreachable. Exit codes: 0 succeeded, 5 failed or cancelled (API errors as `cli::run`).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::client::{Client, ClientError, Reply};
use crate::cli::table::{or_dash, print_json};
use crate::wire::jobs::{JobInfo, JobState};

/// Pause between two polls once the event stream is gone.
const POLL_EVERY: Duration = Duration::from_millis(300);
/// How long polling rides out a daemon that cannot be reached (a restart).
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);

/// How a wait for a job ended.
#[derive(Debug, Clone)]
pub struct Waited {
    /// The job's last state, as `GET /jobs/{id}` shows it.
    pub end: JobInfo,
    /// The same as the server sent it.
    pub json: Value,
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
    update: &mut dyn FnMut(&JobInfo),
) -> anyhow::Result<Waited> {
    let mut events = 0;
    let reason = match stream_to_end(c, id, update, &mut events).await {
        Ok(end) => return Ok(waited(end, events, None)),
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
    Ok(waited(end, events, Some(reason)))
}

fn waited(end: Reply<JobInfo>, events: usize, fell_back: Option<String>) -> Waited {
    Waited {
        end: end.body,
        json: end.json,
        events,
        fell_back,
    }
}

async fn stream_to_end(
    c: &Client,
    id: u64,
    update: &mut dyn FnMut(&JobInfo),
    events: &mut usize,
) -> anyhow::Result<Reply<JobInfo>> {
    let mut stream = c.events(&format!("/jobs/{id}/events")).await?;
    while let Some(ev) = stream.next().await? {
        let Ok(json) = serde_json::from_str::<Value>(&ev.data) else {
            anyhow::bail!("an event of job {id} is not JSON");
        };
        let j = Reply::<JobInfo>::read(json, &format!("an event of job {id}"))?;
        *events += 1;
        update(&j.body);
        if ev.name == "end" || j.body.state.is_final() {
            return Ok(j);
        }
    }
    anyhow::bail!("the stream ended before the job did")
}

async fn poll_to_end(
    c: &Client,
    id: u64,
    update: &mut dyn FnMut(&JobInfo),
) -> anyhow::Result<Reply<JobInfo>> {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match c.get::<JobInfo>(&format!("/jobs/{id}")).await {
            Ok(j) => {
                unreachable_since = None;
                update(&j.body);
                if j.body.state.is_final() {
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
    let mut update = |j: &JobInfo| {
        if let Some(b) = &bar {
            b.set_length(j.progress.bytes_planned);
            b.set_position(j.progress.bytes_done);
        }
    };
    let waited = follow_job(c, id, &mut update).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let waited = waited?;
    if as_json {
        print_json(&waited.json);
    } else {
        let end = &waited.end;
        println!(
            "job {id} {}: {}",
            end.state,
            or_dash(end.message.as_deref())
        );
        if let Some(e) = &end.error {
            eprintln!(
                "error kind {}: {}",
                e.kind,
                crate::cli::verbs::job::what_to_do(e.kind)
            );
        }
    }
    Ok(if waited.end.state == JobState::Succeeded {
        0
    } else {
        5
    })
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
