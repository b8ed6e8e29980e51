//! A failed job says what to do about it: its JSON carries `error.kind` (the library's error
//! kind, kept through every boundary) beside a message with the whole cause chain, so the
//! OS reason of a repository I/O error reaches the operator. A real backup (plain QEMU over
//! QMP) into a repository whose pack directory refuses writes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use api::daemon::auth::TokenStore;
use api::daemon::http::app;
use api::daemon::hypervisors::{HvSpec, Hypervisors};
use api::daemon::state::AppState;
use axum::http::StatusCode;
use common::{api, call};
use testbed::qmp::PlainQemu;

const MIB: u64 = 1 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `dir` refuse new entries for as long as it lives: immutable for root (who ignores
/// mode bits), mode 0500 for anyone else.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        if is_root() {
            let st = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status()
                .expect("chattr (e2fsprogs: apt-get install e2fsprogs)");
            assert!(st.success(), "chattr +i {}", dir.display());
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        }
        Unwritable(dir.to_path_buf())
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if is_root() {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status();
        } else {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_failing_on_a_repository_permission_error_names_the_os_reason_and_its_kind(
) -> anyhow::Result<()> {
    let a = api().await;
    let qemu = PlainQemu::start("api-job-errors", 16 * MIB, &["write -P 0xaa 0 4M"])?;
    let (hv, _writer) = qemu.connect("vm").await?;
    let st = Arc::new(AppState::new(
        a.state.repo.clone(),
        Hypervisors::default().with_connected(
            HvSpec::qmp("qemu", qemu.dir().join("qmp.sock"), "vm"),
            Arc::new(hv),
        ),
        TokenStore::open(a.dir.path())?,
        qemu.dir().join("work"),
        2,
    ));
    let app = app(st.clone());
    let _refuse = Unwritable::new(&a.dir.path().join("repo").join("packs"));

    let (s, job) = call(&app, "POST", "/api/v1/vms/vm/backups", Some(&a.admin), None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_u64().unwrap();
    let mut last = serde_json::Value::Null;
    for _ in 0..600 {
        let (_, j) = call(
            &app,
            "GET",
            &format!("/api/v1/jobs/{id}"),
            Some(&a.admin),
            None,
        )
        .await;
        if j["state"] == "failed" || j["state"] == "succeeded" || j["state"] == "cancelled" {
            last = j;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("failed job: {last}");
    assert_eq!(last["state"], "failed", "{last}");
    assert_eq!(
        last["error"]["kind"], "retry",
        "an I/O error: retrying may help; {last}"
    );
    let message = last["error"]["message"].as_str().unwrap_or_default();
    let os_reason = if is_root() {
        "Operation not permitted"
    } else {
        "Permission denied"
    };
    assert!(
        message.contains(os_reason) && message.contains("packs"),
        "the message names the object and the OS reason: {message}"
    );
    assert_eq!(
        message.matches(os_reason).count(),
        1,
        "the cause is printed once: {message}"
    );
    assert_eq!(last["message"], last["error"]["message"], "{last}");
    Ok(())
}

/// A job that ends without error carries no `error`; a cancelled one says `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_has_kind_cancelled_and_a_succeeded_one_no_error() {
    use ::api::daemon::jobs::JobDone;
    use ::api::wire::jobs::JobMode;
    let a = api().await;
    let ok = a.state.jobs.spawn("vm-ok", JobMode::Auto, |_| async {
        Ok(JobDone::Committed("20261122T000000Z-00000000".into()))
    });
    let slow = a
        .state
        .jobs
        .spawn("vm-slow", JobMode::Auto, |h| async move {
            h.cancel.cancelled().await;
            Err(::api::wire::jobs::JobError::cancelled(
                "backup of vm vm-slow was cancelled",
            ))
        });
    let app = app(a.state.clone());
    let (s, _) = call(
        &app,
        "POST",
        &format!("/api/v1/jobs/{}/cancel", slow.id),
        Some(&a.admin),
        None,
    )
    .await;
    assert!(s.is_success(), "{s}");
    for (id, state) in [(ok.id, "succeeded"), (slow.id, "cancelled")] {
        let mut j = serde_json::Value::Null;
        for _ in 0..100 {
            j = call(
                &app,
                "GET",
                &format!("/api/v1/jobs/{id}"),
                Some(&a.admin),
                None,
            )
            .await
            .1;
            if j["state"] == state {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(j["state"], state, "{j}");
        if state == "cancelled" {
            assert_eq!(j["error"]["kind"], "cancelled", "{j}");
        } else {
            assert!(j.get("error").is_none(), "{j}");
        }
    }
}
