//! The scheduler of `sluice serve`: once per tick it asks the policy store which policies are
//! due, expands each policy's globs against the VMs every reachable hypervisor sees, and
//! starts one backup job per (hypervisor, VM) through the same job path as
//! `POST /vms/{vm}/backups`. A name on two hypervisors is two VMs: both are backed up. An
//! unreachable hypervisor is logged and skipped. After a successful scheduled backup it
//! applies the policy's retention to that VM.
//!
//! A policy fires at most once per tick, however many firings it missed (a daemon that was
//! down at 02:00 backs up once when it comes back, not once per missed day). A VM whose
//! previous job has not ended is skipped for that firing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::auth::glob_match;
use crate::daemon::clock::now;
use crate::daemon::hypervisors::Member;
use crate::daemon::ops::backup::spawn_backup;
use crate::daemon::state::SharedState;
use crate::wire::jobs::JobInfo;

/// How often the scheduler looks for due policies.
pub const TICK: Duration = Duration::from_secs(15);

/// The VMs of `all` that `patterns` select, in the hypervisor's order.
pub fn select_vms<'a>(patterns: &[String], all: &'a [String]) -> Vec<&'a str> {
    all.iter()
        .filter(|vm| patterns.iter().any(|p| glob_match(p, vm)))
        .map(String::as_str)
        .collect()
}

/// Runs until `stop`: one [`tick`] every [`TICK`].
pub async fn run(st: SharedState, stop: CancellationToken) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        tick(&st, now()).await;
    }
}

/// Starts the jobs of every policy due at `now`; returns them.
pub async fn tick(st: &SharedState, now: i64) -> Vec<JobInfo> {
    let due = st.policies.take_due(now);
    if due.is_empty() {
        return Vec::new();
    }
    let mut vms: Vec<(Arc<Member>, Vec<String>)> = Vec::new();
    for (m, r) in st.hypervisors.list_all().await {
        match r {
            Ok(d) => vms.push((m, d.into_iter().map(|d| d.name).collect())),
            Err(e) => tracing::error!("scheduler: listing VMs: {e}"),
        }
    }
    let busy: Vec<(Option<String>, String)> = st
        .jobs
        .list()
        .into_iter()
        .filter(|j| !j.state.is_final())
        .map(|j| (j.hypervisor, j.vm))
        .collect();
    let mut started = Vec::new();
    for p in &due {
        let mut any = false;
        for (m, names) in &vms {
            for vm in select_vms(&p.vms, names) {
                any = true;
                if busy
                    .iter()
                    .any(|(h, b)| b == vm && h.as_deref() == Some(m.name()))
                {
                    tracing::warn!(policy = %p.name, vm, "previous job still running; skipped");
                    continue;
                }
                tracing::info!(policy = %p.name, vm, hypervisor = m.name(), "scheduled backup");
                match spawn_backup(st, m.clone(), vm, p.mode, Some(p.clone())) {
                    Ok(job) => started.push(job),
                    Err(busy) => {
                        tracing::warn!(policy = %p.name, vm, job = busy.id, "vm busy; skipped");
                    }
                }
            }
        }
        if !any {
            tracing::warn!(policy = %p.name, "policy fired but selects no VM");
        }
    }
    started
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cron::{is_due, Schedule};

    const DAY: i64 = 86_400;

    #[test]
    fn due_is_a_firing_between_the_last_run_and_now() {
        let s = Schedule::parse("0 2 * * *").unwrap();
        let midnight = 20_000 * DAY;
        assert!(
            !is_due(&s, midnight, midnight + 3600),
            "01:00 is before 02:00"
        );
        assert!(is_due(&s, midnight, midnight + 2 * 3600), "02:00 itself");
        assert!(
            !is_due(&s, midnight + 2 * 3600, midnight + 5 * 3600),
            "ran at 02:00"
        );
        assert!(
            is_due(&s, midnight + 2 * 3600, midnight + 3 * DAY),
            "missed days: once"
        );
        let every = Schedule::parse("*/5 * * * *").unwrap();
        assert!(!is_due(&every, midnight + 60, midnight + 299));
        assert!(is_due(&every, midnight + 60, midnight + 300));
    }

    #[test]
    fn globs_select_vms() {
        let all: Vec<String> = ["web-1", "web-2", "db-1", "test"].map(String::from).into();
        let pick =
            |p: &[&str]| select_vms(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &all);
        assert_eq!(pick(&["web-*"]), ["web-1", "web-2"]);
        assert_eq!(pick(&["db-1", "te?t"]), ["db-1", "test"]);
        assert!(pick(&["nothing"]).is_empty());
    }
}
