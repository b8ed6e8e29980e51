//! Policies through the API: apply, list, show, delete; a due policy makes the scheduler start
//! a backup job of every VM it selects, through the same job path as the API trigger.

mod common;

use axum::http::StatusCode;
use common::{api, call};
use serde_json::json;

const POLICY: &str = "# nightly backups of the test VM\nname = \"nightly\"\nvms = [\"te*\", \"absent-*\"]\nschedule = \"* * * * *\"\nmode = \"full\"\n\n[retention]\nkeep_last = 2\n";

fn body(source: &str, dry_run: bool) -> Option<Vec<u8>> {
    Some(
        json!({ "source": source, "dry_run": dry_run })
            .to_string()
            .into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_list_show_delete() {
    let a = api().await;
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/policies",
        Some(&a.admin),
        body(POLICY, true),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(j["dry_run"], true);
    assert!(
        a.state.policies.list().is_empty(),
        "a dry run installs nothing"
    );

    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/policies",
        Some(&a.admin),
        body(POLICY, false),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(j["created"], true);
    assert_eq!(j["policy"]["policy"]["vms"], json!(["te*", "absent-*"]));
    assert!(j["policy"]["next_run"].as_i64().is_some(), "{j}");

    let (s, j) = call(&a.app, "GET", "/api/v1/policies", Some(&a.auditor), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j.as_array().map(Vec::len), Some(1), "{j}");
    let (s, j) = call(
        &a.app,
        "GET",
        "/api/v1/policies/nightly",
        Some(&a.auditor),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["source"], POLICY, "the file is kept exactly as applied");

    let again = POLICY.replace("keep_last = 2", "keep_last = 5");
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/policies",
        Some(&a.admin),
        body(&again, false),
    )
    .await;
    assert_eq!((s, &j["created"]), (StatusCode::OK, &json!(false)), "{j}");

    let (s, _) = call(
        &a.app,
        "DELETE",
        "/api/v1/policies/nightly",
        Some(&a.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, j) = call(
        &a.app,
        "GET",
        "/api/v1/policies/nightly",
        Some(&a.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_policy_starts_a_backup_job_once() {
    let a = api().await;
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/policies",
        Some(&a.admin),
        body(POLICY, false),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let now = api::daemon::clock::now();
    assert!(
        api::daemon::schedule::scheduler::tick(&a.state, now)
            .await
            .is_empty(),
        "not due in the minute it was applied"
    );
    let jobs = api::daemon::schedule::scheduler::tick(&a.state, now + 120).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        (jobs[0].vm.as_str(), jobs[0].mode.as_str()),
        ("test", "full")
    );
    assert_eq!(jobs[0].policy.as_deref(), Some("nightly"));
    assert!(
        api::daemon::schedule::scheduler::tick(&a.state, now + 120)
            .await
            .is_empty(),
        "a policy fires once per schedule slot"
    );
    let (s, j) = call(
        &a.app,
        "GET",
        &format!("/api/v1/jobs/{}", jobs[0].id),
        Some(&a.auditor),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["policy"], "nightly", "{j}");
    let (_, p) = call(
        &a.app,
        "GET",
        "/api/v1/policies/nightly",
        Some(&a.auditor),
        None,
    )
    .await;
    assert_eq!(p["last_run"], now + 120, "{p}");
}
