//! Exports through the API on a real repository: a writable export answers with its URI and
//! keeps an overlay file until it is closed; a name is served once when writable (409 for a
//! second open, read-only or not); read-only opens share a name; overlays left by an earlier
//! run are removed when the daemon sets its overlay directory up.

mod common;

use axum::http::StatusCode;
use common::{api, call, seed_backup, Api};

async fn open(a: &Api, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    let body = Some(body.to_string().into_bytes());
    call(&a.app, "POST", "/api/v1/exports", Some(&a.operator), body).await
}

async fn close(a: &Api, id: &serde_json::Value) -> StatusCode {
    let uri = format!("/api/v1/exports/{id}");
    call(&a.app, "DELETE", &uri, Some(&a.operator), None)
        .await
        .0
}

fn overlays(a: &Api) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(a.dir.path().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_export_has_an_overlay_until_closed_and_is_served_alone() {
    let a = api().await;
    let m = seed_backup(&a, "src", vec![7u8; 1 << 20], "<domain/>").await;
    let id = m.id.to_string();
    let (s, w) = open(&a, serde_json::json!({"backup": id, "writable": true})).await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    assert_eq!(w["writable"], true);
    assert_eq!(w["uri"], format!("nbd://127.0.0.1:1/src/vda@{id}"));
    assert_eq!(
        overlays(&a).len(),
        1,
        "no overlay file for a writable export"
    );
    for writable in [true, false] {
        let (s, j) = open(&a, serde_json::json!({"backup": id, "writable": writable})).await;
        assert_eq!(s, StatusCode::CONFLICT, "{j}");
        assert!(j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already exported"));
    }
    assert_eq!(close(&a, &w["id"]).await, StatusCode::NO_CONTENT);
    assert!(overlays(&a).is_empty(), "overlay left after close");

    let (s, r1) = open(&a, serde_json::json!({"backup": id})).await;
    assert_eq!(s, StatusCode::CREATED, "{r1}");
    let (s, r2) = open(&a, serde_json::json!({"backup": id})).await;
    assert_eq!(s, StatusCode::CREATED, "{r2}");
    assert_eq!(close(&a, &r1["id"]).await, StatusCode::NO_CONTENT);
    let (s, list) = call(&a.app, "GET", "/api/v1/exports", Some(&a.auditor), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (s, j) = open(&a, serde_json::json!({"backup": id, "writable": true})).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a read-only open still serves it: {j}"
    );
}

#[test]
fn overlays_of_an_earlier_run_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("overlay-123");
    std::fs::write(&stale, b"left by a killed daemon").unwrap();
    let _ex = api::daemon::exports::Exports::new(
        proxy::nbd::Server::new(proxy::nbd::ServerOptions::default()),
        "nbd://127.0.0.1:1".into(),
    )
    .with_overlay_dir(dir.path().to_path_buf());
    assert!(!stale.exists());
}
