//! The CLI's `--wait` against a real axum server on loopback: it follows the job's
//! Server-Sent Events stream (the progress bar's snapshots come from events), keeps its exit
//! codes, and when the stream breaks (here a TCP relay between CLI and daemon cuts every
//! connection, then refuses connections for a while, as a restarting daemon would) it falls
//! back to polling `GET /jobs/{id}` and still sees the job's end.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::cli::client::{Client, ClientError};
use api::cli::progress::{follow_job, wait_job};
use api::daemon::jobs::JobDone;
use api::wire::jobs::{ErrorKind, JobError, JobInfo, JobMode, JobState};
use common::api;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Serves the API on 127.0.0.1 (plain HTTP); the server task ends with the test's runtime.
async fn serve(a: &common::Api) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = a.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn client(addr: SocketAddr, token: &str) -> Client {
    Client {
        url: format!("http://{addr}"),
        token: Some(token.to_string()),
        fingerprint: None,
    }
}

/// A job that plans 1000 bytes, reports 400 done, then waits for `release` and ends as told.
fn gated_job(a: &common::Api, ok: bool) -> (u64, tokio::sync::oneshot::Sender<()>) {
    let (release, wait) = tokio::sync::oneshot::channel::<()>();
    let job = a
        .state
        .jobs
        .spawn("test", JobMode::Auto, move |h| async move {
            h.progress.bytes_planned.store(1000, Ordering::Relaxed);
            h.progress.bytes_done.store(400, Ordering::Relaxed);
            let _ = wait.await;
            h.progress.bytes_done.store(1000, Ordering::Relaxed);
            if ok {
                Ok(JobDone::Committed("20261122T000000Z-00000000".to_string()))
            } else {
                Err(JobError::new(ErrorKind::Failed, "the disk went away"))
            }
        });
    (job.id, release)
}

type Release = Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>;

fn release_now(r: &Release) {
    if let Some(tx) = r.lock().unwrap().take() {
        let _ = tx.send(());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_the_event_stream_to_the_end() {
    let a = api().await;
    let c = client(serve(&a).await, &a.admin);
    let (id, release) = gated_job(&a, true);
    let release: Release = Arc::new(Mutex::new(Some(release)));
    let mut seen: Vec<JobInfo> = Vec::new();
    let r = release.clone();
    let mut update = |j: &JobInfo| {
        seen.push(j.clone());
        if j.progress.bytes_done == 400 {
            release_now(&r);
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(20), follow_job(&c, id, &mut update))
        .await
        .expect("the wait ends")
        .expect("the wait succeeds");
    assert_eq!(waited.fell_back, None, "the stream did not break");
    assert_eq!(waited.end.state, JobState::Succeeded);
    assert_eq!(waited.json["state"], "succeeded", "the JSON as sent");
    assert_eq!(
        waited.events,
        seen.len(),
        "every snapshot came from the stream"
    );
    assert!(seen.len() >= 2, "progress then end: {seen:?}");
    assert!(
        seen.iter()
            .any(|j| j.state == JobState::Running && j.progress.bytes_planned == 1000),
        "a running snapshot with the plan fed the bar: {seen:?}"
    );
    assert_eq!(seen.last().unwrap().progress.bytes_done, 1000);

    // exit codes: 0 succeeded (a finished job streams its end at once), 5 failed.
    assert_eq!(wait_job(&c, id, "backup test", true).await.unwrap(), 0);
    let (failing, release) = gated_job(&a, false);
    release.send(()).unwrap();
    assert_eq!(
        wait_job(&c, failing, "backup test", false).await.unwrap(),
        5
    );

    // API errors are not mistaken for a broken stream: unknown job → 404, no token → 401.
    let e = follow_job(&c, 999_999, &mut |_| {}).await.unwrap_err();
    assert_eq!(e.downcast_ref::<ClientError>().map(|e| e.status), Some(404));
    let anon = Client {
        token: None,
        ..c.clone()
    };
    let e = follow_job(&anon, id, &mut |_| {}).await.unwrap_err();
    assert_eq!(e.downcast_ref::<ClientError>().map(|e| e.status), Some(401));
}

/// A TCP relay in front of the daemon: `cut` drops every open connection, `down` makes it
/// drop new ones at once (a daemon restarting).
struct Relay {
    addr: SocketAddr,
    cut: Arc<Mutex<CancellationToken>>,
    down: Arc<AtomicBool>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let down = Arc::new(AtomicBool::new(false));
        let (c, d) = (cut.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let token = c.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Relay { addr, cut, down }
    }

    fn cut(&self) {
        let old = std::mem::take(&mut *self.cut.lock().unwrap());
        old.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_falls_back_to_polling() {
    let a = api().await;
    let relay = Relay::start(serve(&a).await).await;
    let c = client(relay.addr, &a.admin);
    let (id, release) = gated_job(&a, true);
    let release: Release = Arc::new(Mutex::new(Some(release)));
    let mut seen = 0usize;
    let mut update = |j: &JobInfo| {
        seen += 1;
        if j.progress.bytes_done == 400 && !relay.down.swap(true, Ordering::SeqCst) {
            // the "daemon" goes away mid-stream, comes back after 1.5 s; the job ends meanwhile
            relay.cut();
            let (r, down) = (release.clone(), relay.down.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                release_now(&r);
                tokio::time::sleep(Duration::from_millis(800)).await;
                down.store(false, Ordering::SeqCst);
            });
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(30), follow_job(&c, id, &mut update))
        .await
        .expect("the wait ends")
        .expect("the wait rides out the break");
    let why = waited.fell_back.expect("the wait fell back to polling");
    assert!(!why.is_empty());
    assert!(waited.events >= 1, "the stream fed the first snapshots");
    assert!(seen > waited.events, "polls fed the rest");
    assert_eq!(waited.end.state, JobState::Succeeded);
    assert_eq!(waited.end.progress.bytes_done, 1000);
    assert_eq!(
        waited.end.backup_id.as_deref(),
        Some("20261122T000000Z-00000000")
    );
    assert_eq!(
        waited.json["progress"]["bytes_done"], 1000,
        "the JSON as sent"
    );
}
