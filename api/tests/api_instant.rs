//! Instant recovery through the API, on a real repository and libvirt's `test:///default`
//! driver (which defines and "runs" a domain without opening its disks): the refusals
//! (a file target, a taken name), then a job that defines and starts a domain on an NBD
//! export over TLS, shows it in `JobInfo.instant` while running, holds its backup (removing
//! it is refused with 409), and on cancel destroys and undefines the domain and lets the
//! backup go.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{api, call, seed_backup, Api};
use serde_json::{json, Value};

/// A saved definition the test driver accepts back, with one disk `vda`.
const DOMAIN_XML: &str = "<domain type='test'><name>src</name>\
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory>\
    <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
    <driver name='qemu' type='qcow2'/><source file='/var/lib/x/src.qcow2'/>\
    <target dev='vda' bus='virtio'/></disk><interface type='network'>\
    <mac address='52:54:00:12:34:56'/><source network='default'/></interface></devices></domain>";

async fn restore(a: &Api, body: Value) -> (StatusCode, Value) {
    let body = Some(body.to_string().into_bytes());
    call(&a.app, "POST", "/api/v1/restores", Some(&a.operator), body).await
}

/// Polls job `id` until `done` accepts it.
async fn job_until(a: &Api, id: u64, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let j = serde_json::to_value(a.state.jobs.get(id).unwrap()).unwrap();
        if done(&j) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id}: {:?}", a.state.jobs.get(id));
}

async fn domain_names(a: &Api) -> Vec<String> {
    let m = a.state.hypervisors.get("local").unwrap();
    m.list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect()
}

#[tokio::test]
async fn bad_instant_requests_are_refused_naming_why() {
    let a = api().await;
    let m = seed_backup(&a, "src", vec![7u8; 1 << 20], DOMAIN_XML).await;
    let id = m.id.to_string();
    let (s, j) = restore(&a, json!({"backup": id, "instant": true, "to": "/x.qcow2"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("takes no `to`"),
        "{j}"
    );
    let (s, j) = restore(
        &a,
        json!({"backup": id, "instant": true, "as_domain": "test"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "the test driver's own domain: {j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("domain test already exists"),
        "{j}"
    );
    let (s, j) = restore(
        &a,
        json!({"backup": id, "instant": true, "as_domain": "a/b"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(
        a.state.repo.held().is_empty(),
        "a refused request holds nothing"
    );
}

#[tokio::test]
async fn an_instant_recovery_runs_until_cancelled_and_holds_its_backup() {
    let a = api().await;
    let m = seed_backup(&a, "src", vec![7u8; 1 << 20], DOMAIN_XML).await;
    let bid = m.id.to_string();
    let (s, j) = restore(
        &a,
        json!({"backup": bid, "instant": true, "as_domain": "inst-1"}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    assert_eq!(
        (j["kind"].as_str(), j["mode"].as_str()),
        (Some("restore"), Some("instant"))
    );
    let id = j["id"].as_u64().unwrap();
    let j = job_until(&a, id, |j| {
        j["instant"]["state"] == "running" || j["finished"].is_i64()
    })
    .await;
    assert_eq!(j["state"], "running", "{j}");
    let i = &j["instant"];
    assert_eq!(i["domain"], "inst-1");
    assert_eq!(i["hypervisor"], "local");
    assert_eq!(i["backup"], bid.as_str());
    assert_eq!(i["nbd"], "nbds://127.0.0.1:1");
    assert_eq!(
        i["disks"][0]["export"],
        format!("sluice-instant-{id}/vda").as_str()
    );
    assert_eq!(i["disks"][0]["size"], 1 << 20);
    assert!(domain_names(&a).await.contains(&"inst-1".to_string()));
    let run = a
        .state
        .instant
        .get(id)
        .expect("registered for later operations");
    assert_eq!(run.domain, "inst-1");
    // It holds the exports too: the overlay goes when the last holder lets go.
    drop(run);

    let (s, e) = call(
        &a.app,
        "DELETE",
        &format!("/api/v1/backups/{bid}"),
        Some(&a.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in use (instant recovery as domain inst-1)"),
        "{e}"
    );
    let body = Some(json!({"keep_last": 1}).to_string().into_bytes());
    let (s, p) = call(&a.app, "POST", "/api/v1/prune", Some(&a.admin), body).await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert!(p["removed"].as_array().unwrap().is_empty(), "{p}");

    let (s, _) = call(
        &a.app,
        "POST",
        &format!("/api/v1/jobs/{id}/cancel"),
        Some(&a.operator),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let j = job_until(&a, id, |j| j["finished"].is_i64()).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    let msg = j["message"].as_str().unwrap();
    assert!(
        msg.contains("domain inst-1 destroyed and undefined on hypervisor local"),
        "{msg}"
    );
    assert!(
        msg.contains("exports closed;") && msg.contains("discarded"),
        "the overlay is gone (no client held it): {msg}"
    );
    let overlays = std::fs::read_dir(a.dir.path().join("overlays"))
        .unwrap()
        .count();
    assert_eq!(overlays, 0, "the export's overlay is deleted");
    assert_eq!(j["instant"]["state"], "ended");
    assert!(!domain_names(&a).await.contains(&"inst-1".to_string()));
    assert!(a.state.instant.get(id).is_none());
    assert!(a.state.repo.held().is_empty());
    let (s, e) = call(
        &a.app,
        "DELETE",
        &format!("/api/v1/backups/{bid}"),
        Some(&a.admin),
        None,
    )
    .await;
    assert!(s.is_success(), "unheld, it can go: {s} {e}");
}
