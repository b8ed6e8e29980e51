//! Authorisation matrix: every route × (no token, bad token, admin, operator, auditor,
//! scoped in scope, scoped out of scope) gives the expected status.

mod common;

use axum::http::StatusCode;
use common::{api, call};

const OK: u16 = 200;
const ACC: u16 = 202;
const CR: u16 = 201;
const NF: u16 = 404;
const FB: u16 = 403;
const UA: u16 = 401;

/// A restore of a backup that does not exist.
const RESTORE_BODY: &str = r#"{"backup":"20200101-missing","to":"/nonexistent/x.qcow2"}"#;

/// (method, uri, body, [admin, operator, auditor, scoped_in, scoped_out]).
fn routes(missing_backup: &str) -> Vec<(&'static str, String, Option<&'static str>, [u16; 5])> {
    let b = missing_backup;
    vec![
        (
            "GET",
            "/api/v1/openapi.json".into(),
            None,
            [OK, OK, OK, FB, FB],
        ),
        (
            "GET",
            "/api/v1/hypervisors".into(),
            None,
            [OK, OK, OK, FB, FB],
        ),
        ("GET", "/api/v1/vms".into(), None, [OK, OK, OK, FB, FB]),
        ("GET", "/api/v1/vms/test".into(), None, [OK, OK, OK, FB, FB]),
        (
            "POST",
            "/api/v1/vms/test/backups".into(),
            Some(r#"{"mode":"full"}"#),
            [ACC, ACC, FB, ACC, FB],
        ),
        ("GET", "/api/v1/backups".into(), None, [OK, OK, OK, FB, FB]),
        (
            "GET",
            format!("/api/v1/backups/{b}"),
            None,
            [NF, NF, NF, FB, FB],
        ),
        (
            "DELETE",
            format!("/api/v1/backups/{b}"),
            None,
            [NF, FB, FB, FB, FB],
        ),
        (
            "PUT",
            format!("/api/v1/backups/{b}/protection"),
            Some(r#"{"protected":true}"#),
            [NF, FB, FB, FB, FB],
        ),
        ("GET", "/api/v1/jobs".into(), None, [OK, OK, OK, FB, FB]),
        ("GET", "/api/v1/jobs/1".into(), None, [OK, OK, OK, OK, FB]),
        (
            "GET",
            "/api/v1/jobs/1/events".into(),
            None,
            [OK, OK, OK, OK, FB],
        ),
        ("GET", "/metrics".into(), None, [OK, OK, OK, FB, FB]),
        (
            "POST",
            "/api/v1/jobs/999/cancel".into(),
            None,
            [NF, NF, FB, FB, FB],
        ),
        ("GET", "/api/v1/exports".into(), None, [OK, OK, OK, FB, FB]),
        (
            "POST",
            "/api/v1/restores".into(),
            Some(RESTORE_BODY),
            [NF, NF, FB, FB, FB],
        ),
        (
            "POST",
            "/api/v1/exports".into(),
            Some(r#"{"backup":"20200101-missing"}"#),
            [NF, NF, FB, FB, FB],
        ),
        (
            "DELETE",
            "/api/v1/exports/9".into(),
            None,
            [NF, NF, FB, FB, FB],
        ),
        ("GET", "/api/v1/policies".into(), None, [OK, OK, OK, FB, FB]),
        (
            "POST",
            "/api/v1/policies".into(),
            Some(
                r#"{"source":"name = \"p\"\nvms = [\"x\"]\nschedule = \"@daily\"\n","dry_run":true}"#,
            ),
            [OK, FB, FB, FB, FB],
        ),
        (
            "GET",
            "/api/v1/policies/nosuch".into(),
            None,
            [NF, NF, NF, FB, FB],
        ),
        (
            "DELETE",
            "/api/v1/policies/nosuch".into(),
            None,
            [NF, FB, FB, FB, FB],
        ),
        (
            "GET",
            "/api/v1/repository".into(),
            None,
            [OK, OK, OK, FB, FB],
        ),
        (
            "POST",
            "/api/v1/verify".into(),
            Some("{}"),
            [OK, OK, FB, FB, FB],
        ),
        (
            "POST",
            "/api/v1/prune".into(),
            Some(r#"{"keep_last":3,"dry_run":true}"#),
            [OK, FB, FB, FB, FB],
        ),
        (
            "POST",
            "/api/v1/gc".into(),
            Some(r#"{"dry_run":true}"#),
            [OK, FB, FB, FB, FB],
        ),
        ("GET", "/api/v1/tokens".into(), None, [OK, FB, FB, FB, FB]),
        (
            "POST",
            "/api/v1/tokens".into(),
            Some(r#"{"name":"n","role":"auditor"}"#),
            [CR, FB, FB, FB, FB],
        ),
        (
            "DELETE",
            "/api/v1/tokens/nosuchid".into(),
            None,
            [NF, FB, FB, FB, FB],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_every_role_and_scope() {
    let a = api().await;
    // Job 1 exists (a backup of `test`) so scoped tokens can be checked against it.
    let (s, _) = call(
        &a.app,
        "POST",
        "/api/v1/vms/test/backups",
        Some(&a.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    wait_job(&a, 1).await;
    let tokens = [
        &a.admin,
        &a.operator,
        &a.auditor,
        &a.scoped_in,
        &a.scoped_out,
    ];
    let mut failures = Vec::new();
    for (method, uri, body, expect) in routes("20200101-missing") {
        let b = || body.map(|s| s.as_bytes().to_vec());
        for (who, tok) in [("none", None), ("bad", Some("sluice_000000000000_00"))] {
            let (s, j) = call(&a.app, method, &uri, tok, b()).await;
            if s.as_u16() != UA || j["error"]["code"] != "unauthorized" {
                failures.push(format!("{method} {uri} token={who}: {s} {j}"));
            }
        }
        for (i, tok) in tokens.iter().enumerate() {
            // One backup per VM at a time: the previous role's backup ends first.
            idle(&a).await;
            let (s, j) = call(&a.app, method, &uri, Some(tok), b()).await;
            if s.as_u16() != expect[i] {
                failures.push(format!(
                    "{method} {uri} role#{i}: got {s}, want {} ({j})",
                    expect[i]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_the_only_open_route() {
    let a = api().await;
    let (s, j) = call(&a.app, "GET", "/api/v1/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_at_once() {
    let a = api().await;
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/tokens",
        Some(&a.admin),
        Some(br#"{"name":"ci","role":"operator"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{j}");
    let tok = j["token"].as_str().unwrap().to_string();
    let id = j["id"].as_str().unwrap().to_string();
    let (s, _) = call(&a.app, "GET", "/api/v1/jobs", Some(&tok), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, j) = call(&a.app, "GET", "/api/v1/tokens", Some(&a.admin), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !j.to_string().contains(&tok),
        "token list must not contain secrets"
    );
    let (s, _) = call(
        &a.app,
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        Some(&a.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&a.app, "GET", "/api/v1/jobs", Some(&tok), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// Waits until job `id` has ended (the test driver cannot back up, so it fails fast).
/// Waits until no job is queued or running.
async fn idle(a: &common::Api) {
    for _ in 0..200 {
        if a.state.jobs.list().iter().all(|j| j.state.is_final()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("jobs did not end: {:?}", a.state.jobs.list());
}

async fn wait_job(a: &common::Api, id: u64) {
    for _ in 0..200 {
        if a.state.jobs.get(id).is_some_and(|j| j.state.is_final()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("job {id} did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_are_audited_with_who_and_result() {
    let a = api().await;
    call(
        &a.app,
        "POST",
        "/api/v1/gc",
        Some(&a.auditor),
        Some(b"{}".to_vec()),
    )
    .await;
    call(
        &a.app,
        "POST",
        "/api/v1/gc",
        Some("sluice_abcdef_00"),
        Some(b"{}".to_vec()),
    )
    .await;
    call(&a.app, "GET", "/api/v1/jobs", Some(&a.admin), None).await;
    let text = std::fs::read_to_string(a.dir.path().join("audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "reads are not audited: {text}");
    let auditor_id = a.auditor.split('_').nth(1).unwrap();
    assert_eq!(lines[0]["token"], auditor_id);
    assert_eq!(
        (lines[0]["method"].as_str(), lines[0]["status"].as_u64()),
        (Some("POST"), Some(403))
    );
    assert_eq!(lines[0]["path"], "/api/v1/gc");
    assert!(
        lines[1]["token"].is_null(),
        "an invalid token is not named: {text}"
    );
    assert_eq!(lines[1]["status"], 401);
}

/// A request refused before its token was checked (no such route) is logged without the
/// token id its header claims: only an authenticated id is ever recorded.
#[tokio::test]
async fn a_claimed_token_id_is_never_recorded_for_an_unauthenticated_request() {
    let a = api().await;
    let admin_id = a.admin.split('_').nth(1).unwrap().to_string();
    let claimed = format!("sluice_{admin_id}_{}", "00".repeat(32));
    let (status, _) = call(
        &a.app,
        "POST",
        "/api/v1/no-such-route",
        Some(&claimed),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(status, 404);
    let text = std::fs::read_to_string(a.dir.path().join("audit.log")).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["status"], 404, "{text}");
    assert!(
        line["token"].is_null(),
        "the admin's id is claimed, never authenticated: {text}"
    );
}
