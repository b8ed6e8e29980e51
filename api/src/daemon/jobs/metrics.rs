//! Prometheus metrics: the job counters the registry records as jobs end, and the text
//! exposition format (version 0.0.4) of those plus the repository's figures at scrape time.
//!
//! Written by hand: no Prometheus client crate was available offline. The format is small
//! (`# HELP`, `# TYPE`, `name{label="v"} value` lines) and a test parses what we print.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::wire::jobs::{JobInfo, JobState};

/// Upper bounds of the job duration histogram, seconds.
pub const DURATION_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Per bucket of [`DURATION_BUCKETS`], not cumulative.
    counts: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = DURATION_BUCKETS.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// (kind, final state) -> jobs.
    ended: BTreeMap<(String, &'static str), u64>,
    bytes_read: u64,
    bytes_new: u64,
    bytes_dedup: u64,
    bytes_zero: u64,
    /// kind -> durations.
    durations: BTreeMap<String, Histogram>,
}

/// Counters of ended jobs (since the daemon started).
#[derive(Debug, Default)]
pub struct JobMetrics {
    inner: Mutex<Counters>,
}

/// Figures read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub queued: u64,
    pub running: u64,
    pub policies: u64,
    pub backups: u64,
    pub chunks: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub dedup_ratio: f64,
    /// Each hypervisor's name and whether it answered when last asked.
    pub hypervisors: Vec<(String, bool)>,
}

fn state_label(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

impl JobMetrics {
    /// Records a job that has just ended, and how long it ran.
    pub fn record(&self, job: &JobInfo, seconds: f64) {
        let mut c = self.inner.lock().expect("metrics lock");
        *c.ended
            .entry((job.kind.to_string(), state_label(job.state)))
            .or_default() += 1;
        let p = &job.progress;
        c.bytes_read += p.bytes_read;
        c.bytes_new += p.bytes_new;
        c.bytes_dedup += p.bytes_dedup;
        c.bytes_zero += p.bytes_zero;
        c.durations
            .entry(job.kind.to_string())
            .or_default()
            .observe(seconds);
    }

    /// The exposition text of the counters and `g`.
    pub fn render(&self, g: &Gauges) -> String {
        let c = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        let backups = c.ended.iter().filter(|((k, _), _)| k == "backup");
        head(
            &mut out,
            "sluice_backups_total",
            "counter",
            "Backup jobs ended, by result.",
        );
        for result in ["succeeded", "failed", "cancelled"] {
            let n: u64 = backups
                .clone()
                .filter(|((_, s), _)| *s == result)
                .map(|(_, n)| n)
                .sum();
            let _ = writeln!(out, "sluice_backups_total{{result=\"{result}\"}} {n}");
        }
        head(
            &mut out,
            "sluice_jobs_ended_total",
            "counter",
            "Jobs ended, by kind and result.",
        );
        for ((kind, state), n) in &c.ended {
            let _ = writeln!(
                out,
                "sluice_jobs_ended_total{{kind=\"{kind}\",result=\"{state}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "sluice_backup_read_bytes_total",
            "Bytes read from hypervisors by ended jobs.",
            c.bytes_read,
        );
        counter(
            &mut out,
            "sluice_backup_stored_bytes_total",
            "Bytes of chunks stored as new by ended jobs (before compression).",
            c.bytes_new,
        );
        counter(
            &mut out,
            "sluice_backup_dedup_bytes_total",
            "Bytes of chunks found already stored by ended jobs.",
            c.bytes_dedup,
        );
        counter(
            &mut out,
            "sluice_backup_zero_bytes_total",
            "Bytes of zero chunks (never stored) of ended jobs.",
            c.bytes_zero,
        );
        durations(&mut out, &c.durations);
        gauges(&mut out, g);
        out
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    head(out, name, "counter", help);
    let _ = writeln!(out, "{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    head(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {v}");
}

fn durations(out: &mut String, hs: &BTreeMap<String, Histogram>) {
    let name = "sluice_job_duration_seconds";
    head(
        out,
        name,
        "histogram",
        "Run time of ended jobs (queue time excluded).",
    );
    for (kind, h) in hs {
        let mut cum = 0;
        for (b, n) in DURATION_BUCKETS.iter().zip(h.counts) {
            cum += n;
            let _ = writeln!(out, "{name}_bucket{{kind=\"{kind}\",le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{kind=\"{kind}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{kind=\"{kind}\"}} {}", h.count);
    }
}

fn gauges(out: &mut String, g: &Gauges) {
    head(out, "sluice_jobs", "gauge", "Jobs not ended yet, by state.");
    let _ = writeln!(out, "sluice_jobs{{state=\"queued\"}} {}", g.queued);
    let _ = writeln!(out, "sluice_jobs{{state=\"running\"}} {}", g.running);
    gauge(
        out,
        "sluice_policies",
        "Installed backup policies.",
        g.policies,
    );
    gauge(
        out,
        "sluice_repository_backups",
        "Backups in the repository.",
        g.backups,
    );
    gauge(
        out,
        "sluice_repository_chunks",
        "Distinct chunks stored.",
        g.chunks,
    );
    gauge(
        out,
        "sluice_repository_logical_bytes",
        "Sum of the disk sizes of every backup.",
        g.logical_bytes,
    );
    gauge(
        out,
        "sluice_repository_stored_bytes",
        "Bytes the backups added to the store (compressed).",
        g.stored_bytes,
    );
    gauge(
        out,
        "sluice_repository_dedup_ratio",
        "Logical bytes / stored bytes (dedup, zero skipping and compression).",
        g.dedup_ratio,
    );
    head(
        out,
        "sluice_hypervisor_up",
        "gauge",
        "1 if the hypervisor answered when last asked, else 0 (down, or not asked yet).",
    );
    for (name, up) in &g.hypervisors {
        let _ = writeln!(
            out,
            "sluice_hypervisor_up{{hypervisor=\"{name}\"}} {}",
            u8::from(*up)
        );
    }
}
