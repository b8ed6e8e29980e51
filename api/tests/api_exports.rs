//! Exports through the API on a real repository: a writable export answers with its URI and
//! keeps an overlay file until it is closed; a name is served once when writable (409 for a
//! second open, read-only or not); read-only opens share a name; overlays left by an earlier
//! run are removed when the daemon sets its overlay directory up; `changed_since` names the
//! diff context in the answer and the list, and a bad other backup (malformed, unknown,
//! another VM's, another size) is refused naming what was wrong; auditor and scoped tokens
//! may not open one.

mod common;

use axum::http::StatusCode;
use common::{api, call, seed_backup, seed_backup_of, Api};

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

/// The error message of a refused request.
fn message(j: &serde_json::Value) -> String {
    j["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_since_names_its_context_and_a_bad_other_backup_is_refused() {
    let a = api().await;
    let mut data = vec![7u8; 1 << 20];
    let b1 = seed_backup(&a, "src", data.clone(), "<domain/>").await.id;
    data[70_000] = 1;
    let b2 = seed_backup(&a, "src", data, "<domain/>").await.id;
    let (b1, b2) = (b1.to_string(), b2.to_string());

    let (s, e) = open(&a, serde_json::json!({"backup": b2, "changed_since": b1})).await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    assert_eq!(e["changed_since"], b1.as_str());
    assert_eq!(e["meta_context"], format!("sluice:changed-since:{b1}"));
    assert_eq!(e["uri"], format!("nbd://127.0.0.1:1/src/vda@{b2}"));
    let (s, plain) = open(&a, serde_json::json!({"backup": b2})).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "a plain open shares the name: {plain}"
    );
    assert!(plain.get("meta_context").is_none(), "{plain}");
    let (_, list) = call(&a.app, "GET", "/api/v1/exports", Some(&a.auditor), None).await;
    assert_eq!(list[0]["meta_context"], e["meta_context"], "{list}");
    // Newer against older and older against newer; writable too (the context describes the
    // backups, not the overlay).
    let (s, back) = open(
        &a,
        serde_json::json!({"backup": b1, "changed_since": b2, "writable": true}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{back}");
    assert_eq!(back["meta_context"], format!("sluice:changed-since:{b2}"));
    let (s, same) = open(&a, serde_json::json!({"backup": b2, "changed_since": b2})).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "a backup against itself (nothing changed): {same}"
    );

    let other = seed_backup_of(
        &a,
        "other",
        "00000000-0000-0000-0000-000000000001",
        vec![7u8; 1 << 20],
        "<domain/>",
    )
    .await
    .id
    .to_string();
    let bigger = seed_backup(&a, "src", vec![7u8; 2 << 20], "<domain/>")
        .await
        .id
        .to_string();
    let refused = [
        ("no/such", StatusCode::BAD_REQUEST, "changed_since: backup id \"no/such\" is malformed".to_string()),
        ("20200101T000000Z-00000000", StatusCode::NOT_FOUND, "changed_since: ".to_string()),
        (other.as_str(), StatusCode::BAD_REQUEST, format!("changed_since: backup {other} is of vm other")),
        (bigger.as_str(), StatusCode::BAD_REQUEST, format!("changed_since: backup {bigger} holds disk vda at 2097152 bytes, backup {b2} at 1048576 bytes")),
    ];
    for (since, status, want) in refused {
        let (s, j) = open(
            &a,
            serde_json::json!({"backup": b2, "changed_since": since}),
        )
        .await;
        assert_eq!(s, status, "changed_since {since}: {j}");
        assert!(message(&j).starts_with(&want), "changed_since {since}: {j}");
        assert!(
            message(&j).contains(since),
            "the message names {since}: {j}"
        );
    }
    let (s, j) = open(
        &a,
        serde_json::json!({"backup": b2, "disk": "vdb", "changed_since": b1}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    assert_eq!(
        message(&j),
        format!("backup {b2} has no disk vdb (it has vda)")
    );

    let body = serde_json::json!({"backup": b2, "changed_since": b1}).to_string();
    for token in [&a.auditor, &a.scoped_in] {
        let (s, j) = call(
            &a.app,
            "POST",
            "/api/v1/exports",
            Some(token),
            Some(body.clone().into_bytes()),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{j}");
    }
}
