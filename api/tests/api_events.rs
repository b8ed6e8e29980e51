//! The Server-Sent Events stream of a job: a progress snapshot at once, another when the job
//! moves, a final `end` event with the job's last state, then the stream closes.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use ::api::daemon::jobs::JobDone;
use ::api::wire::jobs::{ErrorKind, JobError, JobMode};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{api, call};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// One SSE event: (name, data as JSON).
type SseEvent = (String, serde_json::Value);

/// Reads frames until `buf` holds a complete event (`\n\n`); returns it, or `None` at the end
/// of the stream.
async fn next_event(body: &mut Body, buf: &mut String) -> Option<SseEvent> {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let field = |k: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(k).map(str::to_string))
            };
            let (Some(name), Some(data)) = (field("event: "), field("data: ")) else {
                continue; // keep-alive comment
            };
            return Some((name, serde_json::from_str(&data).expect("data is JSON")));
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an event within 10 s")?
            .expect("body frame");
        if let Ok(data) = frame.into_data() {
            buf.push_str(std::str::from_utf8(&data).expect("utf-8"));
        }
    }
}

async fn open(a: &common::Api, id: u64, token: &str) -> (StatusCode, Body) {
    let req = Request::get(format!("/api/v1/jobs/{id}/events"))
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    let ct = resp.headers().get("content-type").cloned();
    let status = resp.status();
    if status == StatusCode::OK {
        assert_eq!(ct.unwrap(), "text/event-stream");
    }
    (status, resp.into_body())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_follows_a_job_to_its_end() {
    let a = api().await;
    let (release, wait) = tokio::sync::oneshot::channel::<()>();
    let job = a
        .state
        .jobs
        .spawn("test", JobMode::Auto, move |h| async move {
            h.progress.bytes_planned.store(1000, Ordering::Relaxed);
            h.progress.bytes_read.store(400, Ordering::Relaxed);
            let _ = wait.await;
            Ok(JobDone::Committed("20261122T000000Z-00000000".to_string()))
        });
    let (s, mut body) = open(&a, job.id, &a.scoped_in).await;
    assert_eq!(s, StatusCode::OK, "a scoped token follows its own VM's job");
    let mut buf = String::new();
    let mut seen = Vec::new();
    loop {
        let (name, data) = next_event(&mut body, &mut buf).await.expect("event");
        seen.push((name.clone(), data["state"].clone()));
        if data["state"] == "running" && data["progress"]["bytes_read"] == 400 {
            break;
        }
        assert!(
            seen.len() < 40,
            "no running snapshot with progress: {seen:?}"
        );
    }
    release.send(()).unwrap();
    let (name, data) = loop {
        let ev = next_event(&mut body, &mut buf).await.expect("end event");
        if ev.0 == "end" {
            break ev;
        }
    };
    assert_eq!(name, "end");
    assert_eq!(data["state"], "succeeded", "{data}");
    assert_eq!(data["backup_id"], "20261122T000000Z-00000000");
    assert!(
        next_event(&mut body, &mut buf).await.is_none(),
        "the stream closes after `end`"
    );
    assert_eq!(seen[0].0, "progress", "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_job_streams_only_its_end_and_scopes_are_checked() {
    let a = api().await;
    let job = a.state.jobs.spawn("test", JobMode::Full, |_| async {
        Err(JobError::new(ErrorKind::Failed, "no space left"))
    });
    while !a.state.jobs.get(job.id).unwrap().state.is_final() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, mut body) = open(&a, job.id, &a.auditor).await;
    assert_eq!(s, StatusCode::OK);
    let mut buf = String::new();
    let (name, data) = next_event(&mut body, &mut buf).await.unwrap();
    assert_eq!((name.as_str(), &data["state"]), ("end", &"failed".into()));
    assert_eq!(data["message"], "no space left");
    assert!(next_event(&mut body, &mut buf).await.is_none());
    let (s, _) = open(&a, job.id, &a.scoped_out).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, j) = call(
        &a.app,
        "GET",
        "/api/v1/jobs/4242/events",
        Some(&a.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
}
