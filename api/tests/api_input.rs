//! Bad input gets a 4xx with a clear JSON error, and changes nothing.

mod common;

use axum::http::StatusCode;
use common::{api, call};

fn err(j: &serde_json::Value) -> (String, String) {
    (
        j["error"]["code"].as_str().unwrap_or("").to_string(),
        j["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_unknown_fields_are_named() {
    let a = api().await;
    let t = Some(a.admin.as_str());
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/vms/test/backups",
        t,
        Some(b"{\"mode\":".to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&j).1.contains("invalid JSON"), "{j}");
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/vms/test/backups",
        t,
        Some(br#"{"mode":"full","x":1}"#.to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&j).1.contains("unknown field `x`"), "{j}");
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/vms/test/backups",
        t,
        Some(br#"{"mode":"fast"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&j).1.contains("fast"), "{j}");
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/tokens",
        t,
        Some(br#"{"name":"a","role":"god"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(
        a.state.jobs.list().is_empty(),
        "no job may start from bad input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vm_backup_and_job_are_404() {
    let a = api().await;
    let t = Some(a.admin.as_str());
    let (s, j) = call(&a.app, "POST", "/api/v1/vms/nosuchvm/backups", t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    assert!(err(&j).1.contains("nosuchvm"), "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/vms/nosuchvm", t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/backups/20990101-none", t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/backups?vm=nosuchvm", t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/jobs/77", t, None).await;
    assert_eq!(
        (s, err(&j).1),
        (StatusCode::NOT_FOUND, "job 77 does not exist".into())
    );
    let (s, j) = call(&a.app, "GET", "/api/v1/jobs/abc", t, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/nowhere", t, None).await;
    assert_eq!((s, err(&j).0), (StatusCode::NOT_FOUND, "not_found".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused() {
    let a = api().await;
    let t = Some(a.admin.as_str());
    for uri in [
        "/api/v1/vms/..%2F..%2Fetc/backups",
        "/api/v1/vms/a%00b/backups",
        "/api/v1/vms/..",
    ] {
        let method = if uri.ends_with("backups") {
            "POST"
        } else {
            "GET"
        };
        let (s, j) = call(&a.app, method, uri, t, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {j}");
        assert_eq!(err(&j).0, "bad_request", "{uri}: {j}");
    }
    let long = "v".repeat(300);
    let (s, j) = call(&a.app, "GET", &format!("/api/v1/vms/{long}"), t, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(err(&j).1.contains("longer than 128"), "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/backups/..%2Fx", t, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/backups?vm=..%2Fx", t, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/tokens",
        t,
        Some(br#"{"name":"x","role":"scoped","vms":["../a"]}"#.to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(a.state.jobs.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_are_413() {
    let a = api().await;
    let t = Some(a.admin.as_str());
    let big = format!(
        "{{\"name\":\"{}\",\"role\":\"admin\"}}",
        "x".repeat(1 << 20)
    );
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/tokens",
        t,
        Some(big.clone().into_bytes()),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{j}");
    assert!(err(&j).1.contains("too large"), "{j}");
    let (s, j) = call(&a.app, "POST", "/api/v1/verify", t, Some(big.into_bytes())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_list_shows_the_hypervisors_domains() {
    let a = api().await;
    let (s, j) = call(&a.app, "GET", "/api/v1/vms", Some(&a.auditor), None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<_> = j["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap(),
                v["hypervisor"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(names.contains(&("test", "local")), "{j}");
    assert_eq!(j["unreachable"], serde_json::json!([]), "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/repository", Some(&a.auditor), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["backups"], 0);
    assert_eq!(j["chunk_size"], 65536);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_without_rules_is_refused() {
    let a = api().await;
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/prune",
        Some(&a.admin),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&j).1.contains("keep_"), "{j}");
}

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let now = api::daemon::http::openapi_json();
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(path, &now).unwrap();
        return;
    }
    assert!(
        committed == now,
        "docs/openapi.json is stale: rerun with SLUICE_BLESS=1 cargo test -p api --test api_input"
    );
}

#[test]
fn docs_api_md_names_every_route() {
    let md = include_str!("../../docs/api.md");
    let doc: serde_json::Value = serde_json::from_str(&api::daemon::http::openapi_json()).unwrap();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let line = format!("`{} {path}`", method.to_uppercase());
            assert!(md.contains(&line), "docs/api.md does not list {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_file_names_each_error_with_its_line_and_changes_nothing() {
    let a = api().await;
    let t = Some(a.admin.as_str());
    let good = "name = \"p\"\nvms = [\"web-*\"]\nschedule = \"@daily\"\n";
    let body = |src: &str| {
        Some(
            serde_json::json!({ "source": src })
                .to_string()
                .into_bytes(),
        )
    };
    let (s, j) = call(&a.app, "POST", "/api/v1/policies", t, body(good)).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let bad =
        "name = \"p\"\nvms = [\"web-[12]\"]\nschedule = \"0 2 * *\"\n[retention]\nkeep_last = 0\n";
    let (s, j) = call(&a.app, "POST", "/api/v1/policies", t, body(bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    let (code, msg) = err(&j);
    assert_eq!(code, "invalid_policy");
    for want in [
        "line 2, column 8",
        "line 3, column 12",
        "line 4",
        "5 fields",
        "keeps nothing",
    ] {
        assert!(msg.contains(want), "{want:?} missing in {msg}");
    }
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/policies",
        t,
        body(&format!("{good}keep = 1\n")),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(
        err(&j).1.contains("line 4") && err(&j).1.contains("unknown field `keep`"),
        "{j}"
    );
    let (s, j) = call(&a.app, "POST", "/api/v1/policies", t, body("name = [")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
    assert!(err(&j).1.contains("line 1"), "{j}");
    let (s, j) = call(&a.app, "GET", "/api/v1/policies/p", t, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["source"], good, "the installed policy is unchanged");
    let (s, j) = call(&a.app, "GET", "/api/v1/policies/..%2Fp", t, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
}
