//! `/metrics` parses as the Prometheus text format and its numbers move after a real backup
//! (plain QEMU over QMP: `testbed::qmp::PlainQemu`, no libvirt needed), whose reads the
//! read limit paces.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::daemon::auth::TokenStore;
use api::daemon::http::app;
use api::daemon::hypervisors::{HvSpec, Hypervisors};
use api::daemon::state::AppState;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{api, call};
use testbed::qmp::PlainQemu;
use tower::ServiceExt;

const MIB: u64 = 1 << 20;

/// Parses the exposition text: every sample belongs to a `# TYPE` family, histogram buckets
/// are cumulative and end with `+Inf` = `_count`. Returns sample -> value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "family twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without TYPE: {line}");
        if key.contains('{') {
            assert!(
                key.ends_with('}') && key.contains("=\""),
                "bad labels: {line}"
            );
        }
        samples.insert(key.to_string(), value);
    }
    check_histograms(&samples);
    samples
}

fn check_histograms(samples: &BTreeMap<String, f64>) {
    for (key, count) in samples.iter().filter(|(k, _)| k.contains("_count{")) {
        let inf = key
            .replace("_count{", "_bucket{")
            .replace('}', ",le=\"+Inf\"}");
        assert_eq!(samples.get(&inf), Some(count), "{inf} must equal {key}");
    }
}

async fn scrape(app: &axum::Router, token: &str) -> BTreeMap<String, f64> {
    let (s, body) = call(app, "GET", "/metrics", Some(token), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    parse(body.as_str().expect("text body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_after_a_backup() -> anyhow::Result<()> {
    let a = api().await;
    let qemu = PlainQemu::start("api-metrics", 32 * MIB, &["write -P 0xaa 0 4M"])?;
    let (hv, _writer) = qemu.connect("vm").await?;
    let work = qemu.dir().join("work");
    let st = Arc::new(
        AppState::new(
            a.state.repo.clone(),
            Hypervisors::default().with_connected(
                HvSpec::qmp("qemu", qemu.dir().join("qmp.sock"), "vm"),
                Arc::new(hv),
            ),
            TokenStore::open(a.dir.path())?,
            work,
            2,
        )
        .with_read_limit(Some(8 * MIB)),
    );
    let app = app(st.clone());
    let before = scrape(&app, &a.auditor).await;
    // Prometheus picks its parser by the content type: the body is the text format 0.0.4.
    let resp = app
        .clone()
        .oneshot(
            Request::get("/metrics")
                .header("authorization", format!("Bearer {}", a.auditor))
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(before["sluice_backups_total{result=\"succeeded\"}"], 0.0);
    assert_eq!(before["sluice_repository_logical_bytes"], 0.0);

    let (s, job) = call(&app, "POST", "/api/v1/vms/vm/backups", Some(&a.admin), None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_u64().unwrap();
    let mut done = None;
    for _ in 0..600 {
        let j = st.jobs.get(id).unwrap();
        if j.state.is_final() {
            done = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = done.expect("the backup ends within 60 s");
    assert_eq!(done.state, api::wire::jobs::JobState::Succeeded, "{done:?}");

    let after = scrape(&app, &a.auditor).await;
    assert_eq!(after["sluice_backups_total{result=\"succeeded\"}"], 1.0);
    assert!(
        after["sluice_backup_read_bytes_total"] >= (4 * MIB) as f64,
        "{after:?}"
    );
    assert!(after["sluice_backup_stored_bytes_total"] > 0.0, "{after:?}");
    assert_eq!(
        after["sluice_job_duration_seconds_count{kind=\"backup\"}"],
        1.0
    );
    // 4 MiB read at 8 MiB/s: the bandwidth limit paced the reads.
    let took = after["sluice_job_duration_seconds_sum{kind=\"backup\"}"];
    assert!(took >= 0.4, "a limited backup took {took} s");
    assert_eq!(after["sluice_repository_backups"], 1.0);
    assert_eq!(after["sluice_repository_logical_bytes"], (32 * MIB) as f64);
    assert!(after["sluice_repository_stored_bytes"] > 0.0);
    assert!(after["sluice_repository_dedup_ratio"] > 1.0, "{after:?}");
    assert_eq!(after["sluice_hypervisor_up{hypervisor=\"qemu\"}"], 1.0);

    let (s, _) = call(&app, "GET", "/metrics", Some(&a.scoped_in), None).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "scoped tokens do not read metrics"
    );
    let (s, _) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    Ok(())
}
