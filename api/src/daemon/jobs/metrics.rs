//! Prometheus metrics: the job counters the registry records as jobs end, and the text
//! exposition (format 0.0.4) of those plus the repository's figures at scrape time.
//!
//! `prometheus-client` keeps the metrics (atomic counters and histograms in a
//! [`Registry`]) and writes the text. Its Prometheus text encoder (not its OpenMetrics
//! one) keeps the exposition as it was before the crate: a counter registered as `x` is
//! named `x_total` in its `# HELP`, `# TYPE` and sample lines, and no `# EOF` line ends the
//! text. What is read at scrape time ([`Gauges`]) goes into a registry made for that scrape,
//! encoded after the counters'. Not here: how the figures are gathered (the `/metrics` route).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::wire::jobs::{JobInfo, JobState};

/// Upper bounds of the job duration histogram, seconds.
pub const DURATION_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

/// Content type of what [`JobMetrics::render`] writes: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every metric's name starts with this and `_`.
const PREFIX: &str = "sluice";

/// The final states a backup counter is shown for from the start (at zero).
const RESULTS: [&str; 3] = ["succeeded", "failed", "cancelled"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindResult {
    kind: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HypervisorLabel {
    hypervisor: String,
}

/// A gauge of a count or a byte size.
type U64Gauge = Gauge<u64, AtomicU64>;

fn gauge_of(v: u64) -> U64Gauge {
    let g = U64Gauge::default();
    g.set(v);
    g
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Counters of ended jobs (since the daemon started).
#[derive(Debug)]
pub struct JobMetrics {
    /// Holds (clones of) every metric below, for encoding.
    registry: Registry,
    /// Backup jobs ended, by result.
    backups: Family<ResultLabel, Counter>,
    /// Jobs ended, by kind and result.
    ended: Family<KindResult, Counter>,
    bytes_read: Counter,
    bytes_new: Counter,
    bytes_dedup: Counter,
    bytes_zero: Counter,
    durations: Family<KindLabel, Histogram, fn() -> Histogram>,
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

impl Default for JobMetrics {
    fn default() -> Self {
        let m = JobMetrics {
            registry: Registry::with_prefix(PREFIX),
            backups: Family::default(),
            ended: Family::default(),
            bytes_read: Counter::default(),
            bytes_new: Counter::default(),
            bytes_dedup: Counter::default(),
            bytes_zero: Counter::default(),
            durations: Family::new_with_constructor(duration_histogram),
        };
        for result in RESULTS {
            m.backups.get_or_create_owned(&ResultLabel { result });
        }
        m.registered()
    }
}

impl JobMetrics {
    /// Puts every metric into the registry; the help texts get their final `.` from it.
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "backups",
            "Backup jobs ended, by result",
            self.backups.clone(),
        );
        r.register(
            "jobs_ended",
            "Jobs ended, by kind and result",
            self.ended.clone(),
        );
        r.register(
            "backup_read_bytes",
            "Bytes read from hypervisors by ended jobs",
            self.bytes_read.clone(),
        );
        r.register(
            "backup_stored_bytes",
            "Bytes of chunks stored as new by ended jobs (before compression)",
            self.bytes_new.clone(),
        );
        r.register(
            "backup_dedup_bytes",
            "Bytes of chunks found already stored by ended jobs",
            self.bytes_dedup.clone(),
        );
        r.register(
            "backup_zero_bytes",
            "Bytes of zero chunks (never stored) of ended jobs",
            self.bytes_zero.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Run time of ended jobs (queue time excluded)",
            self.durations.clone(),
        );
        self
    }

    /// Records a job that has just ended, and how long it ran.
    pub fn record(&self, job: &JobInfo, seconds: f64) {
        let kind = job.kind.to_string();
        let result = state_label(job.state);
        if kind == "backup" && RESULTS.contains(&result) {
            self.backups.get_or_create(&ResultLabel { result }).inc();
        }
        self.ended
            .get_or_create(&KindResult {
                kind: kind.clone(),
                result,
            })
            .inc();
        let p = &job.progress;
        self.bytes_read.inc_by(p.bytes_read);
        self.bytes_new.inc_by(p.bytes_new);
        self.bytes_dedup.inc_by(p.bytes_dedup);
        self.bytes_zero.inc_by(p.bytes_zero);
        self.durations
            .get_or_create(&KindLabel { kind })
            .observe(seconds);
    }

    /// The exposition text of the counters and `g`.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)
            .and_then(|()| prometheus_text::encode(&mut out, &scrape_registry(g)))
            .expect("encoding metrics into a String cannot fail");
        out
    }
}

/// The figures of one scrape, as gauges of their own registry.
fn scrape_registry(g: &Gauges) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    let jobs = Family::<StateLabel, U64Gauge>::default();
    for (state, n) in [("queued", g.queued), ("running", g.running)] {
        jobs.get_or_create(&StateLabel { state }).set(n);
    }
    r.register("jobs", "Jobs not ended yet, by state", jobs);
    for (name, help, v) in [
        ("policies", "Installed backup policies", g.policies),
        ("repository_backups", "Backups in the repository", g.backups),
        ("repository_chunks", "Distinct chunks stored", g.chunks),
        (
            "repository_logical_bytes",
            "Sum of the disk sizes of every backup",
            g.logical_bytes,
        ),
        (
            "repository_stored_bytes",
            "Bytes the backups added to the store (compressed)",
            g.stored_bytes,
        ),
    ] {
        r.register(name, help, gauge_of(v));
    }
    let ratio = Gauge::<f64, AtomicU64>::default();
    ratio.set(g.dedup_ratio);
    r.register(
        "repository_dedup_ratio",
        "Logical bytes / stored bytes (dedup, zero skipping and compression)",
        ratio,
    );
    let up = Family::<HypervisorLabel, U64Gauge>::default();
    for (name, answered) in &g.hypervisors {
        up.get_or_create(&HypervisorLabel {
            hypervisor: name.clone(),
        })
        .set(u64::from(*answered));
    }
    r.register(
        "hypervisor_up",
        "1 if the hypervisor answered when last asked, else 0 (down, or not asked yet)",
        up,
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::jobs::{JobKind, JobMode, JobProgress};

    fn ended(kind: JobKind, state: JobState, bytes_read: u64) -> JobInfo {
        JobInfo {
            id: 1,
            kind,
            vm: "vm".into(),
            state,
            mode: JobMode::Auto,
            error: None,
            created: 0,
            finished: None,
            message: None,
            backup_id: None,
            policy: None,
            host: String::new(),
            hypervisor: None,
            progress: JobProgress {
                bytes_read,
                ..JobProgress::default()
            },
            instant: None,
        }
    }

    // Over 60 lines: one listing of every family and sample line the exposition must keep.
    /// The `# TYPE` lines and sample lines, as dashboards and alerts name them (these are
    /// the names and label sets of the exposition written by hand before the crate).
    #[test]
    fn exposition_keeps_names_types_and_labels() {
        let m = JobMetrics::default();
        m.record(&ended(JobKind::Backup, JobState::Succeeded, 4096), 2.5);
        m.record(&ended(JobKind::Backup, JobState::Failed, 0), 0.5);
        m.record(&ended(JobKind::Restore, JobState::Cancelled, 0), 4000.0);
        let text = m.render(&Gauges {
            queued: 1,
            running: 2,
            logical_bytes: 1 << 25,
            dedup_ratio: 2.5,
            hypervisors: vec![("qemu".into(), true), ("far".into(), false)],
            ..Gauges::default()
        });
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(
            types,
            [
                "# TYPE sluice_backups_total counter",
                "# TYPE sluice_jobs_ended_total counter",
                "# TYPE sluice_backup_read_bytes_total counter",
                "# TYPE sluice_backup_stored_bytes_total counter",
                "# TYPE sluice_backup_dedup_bytes_total counter",
                "# TYPE sluice_backup_zero_bytes_total counter",
                "# TYPE sluice_job_duration_seconds histogram",
                "# TYPE sluice_jobs gauge",
                "# TYPE sluice_policies gauge",
                "# TYPE sluice_repository_backups gauge",
                "# TYPE sluice_repository_chunks gauge",
                "# TYPE sluice_repository_logical_bytes gauge",
                "# TYPE sluice_repository_stored_bytes gauge",
                "# TYPE sluice_repository_dedup_ratio gauge",
                "# TYPE sluice_hypervisor_up gauge",
            ]
        );
        for line in [
            "# HELP sluice_backups_total Backup jobs ended, by result.",
            "sluice_backups_total{result=\"succeeded\"} 1",
            "sluice_backups_total{result=\"failed\"} 1",
            "sluice_backups_total{result=\"cancelled\"} 0",
            "sluice_jobs_ended_total{kind=\"backup\",result=\"failed\"} 1",
            "sluice_jobs_ended_total{kind=\"restore\",result=\"cancelled\"} 1",
            "sluice_backup_read_bytes_total 4096",
            "sluice_job_duration_seconds_bucket{kind=\"backup\",le=\"1\"} 1",
            "sluice_job_duration_seconds_bucket{kind=\"backup\",le=\"5\"} 2",
            "sluice_job_duration_seconds_bucket{kind=\"backup\",le=\"+Inf\"} 2",
            "sluice_job_duration_seconds_bucket{kind=\"restore\",le=\"3600\"} 0",
            "sluice_job_duration_seconds_bucket{kind=\"restore\",le=\"14400\"} 1",
            "sluice_job_duration_seconds_sum{kind=\"backup\"} 3.0",
            "sluice_job_duration_seconds_count{kind=\"restore\"} 1",
            "sluice_jobs{state=\"queued\"} 1",
            "sluice_jobs{state=\"running\"} 2",
            "sluice_policies 0",
            "sluice_repository_logical_bytes 33554432",
            "sluice_repository_dedup_ratio 2.5",
            "sluice_hypervisor_up{hypervisor=\"qemu\"} 1",
            "sluice_hypervisor_up{hypervisor=\"far\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // The Prometheus text format, not OpenMetrics: no `# EOF`, no `# UNIT`.
        assert!(
            text.lines().all(|l| !l.starts_with('#')
                || l.starts_with("# HELP ")
                || l.starts_with("# TYPE ")),
            "{text}"
        );
    }

    /// Backup results are shown at zero before any backup ends; jobs of other kinds do not
    /// count as backups.
    #[test]
    fn backup_results_start_at_zero() {
        let m = JobMetrics::default();
        let text = m.render(&Gauges::default());
        for result in RESULTS {
            let line = format!("sluice_backups_total{{result=\"{result}\"}} 0");
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        m.record(&ended(JobKind::Restore, JobState::Succeeded, 0), 1.0);
        let text = m.render(&Gauges::default());
        assert!(text
            .lines()
            .any(|l| l == "sluice_backups_total{result=\"succeeded\"} 0"));
    }
}
