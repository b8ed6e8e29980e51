//! Shared set-up of the API tests: a real repository in a temp dir, libvirt's in-process
//! `test:///default` driver as the hypervisor (domain `test`), and tokens of every role.

#![allow(dead_code)]

pub mod cli;

use std::sync::Arc;

use api::daemon::auth::TokenStore;
use api::daemon::http::app;
use api::daemon::hypervisors::{HvSpec, Hypervisors};
use api::daemon::state::{AppState, SharedState};
use api::wire::tokens::Role;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use catalog::{FsBackend, RepoConfig, RepoOptions, Repository};
use http_body_util::BodyExt;
use tower::ServiceExt;

pub struct Api {
    pub app: Router,
    pub state: SharedState,
    pub admin: String,
    pub operator: String,
    pub auditor: String,
    /// Scoped to `test` (the test driver's running domain).
    pub scoped_in: String,
    /// Scoped to `other-*`.
    pub scoped_out: String,
    pub dir: tempfile::TempDir,
}

/// The API over libvirt's `test:///default` as hypervisor `local`.
pub async fn api() -> Api {
    api_with(vec![HvSpec::libvirt("local", "test:///default")]).await
}

/// The API over the hypervisors `specs` (connected on first use).
pub async fn api_with(specs: Vec<HvSpec>) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FsBackend::open(dir.path().join("repo")).unwrap());
    let repo = Repository::create(
        backend,
        RepoConfig::default(),
        RepoOptions::new(dir.path().join("catalog.sqlite")),
    )
    .unwrap();
    let tokens = TokenStore::open(dir.path()).unwrap();
    let mk = |role, vms: &[&str]| {
        tokens
            .create("t", role, vms.iter().map(|s| s.to_string()).collect())
            .unwrap()
            .1
    };
    let (admin, operator, auditor) = (
        mk(Role::Admin, &[]),
        mk(Role::Operator, &[]),
        mk(Role::Auditor, &[]),
    );
    let (scoped_in, scoped_out) = (mk(Role::Scoped, &["te*"]), mk(Role::Scoped, &["other-*"]));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let audit = api::daemon::audit::AuditLog::open(&dir.path().join("audit.log")).unwrap();
    let restores = dir.path().join("restores");
    std::fs::create_dir_all(&restores).unwrap();
    let overlays = dir.path().join("overlays");
    std::fs::create_dir_all(&overlays).unwrap();
    let state = Arc::new(
        AppState::new(repo, Hypervisors::new(specs), tokens, work, 2)
            .with_audit(audit)
            .with_restore_dirs(vec![restores])
            .with_exports(
                api::daemon::exports::Exports::new(
                    proxy::nbd::Server::new(proxy::nbd::ServerOptions::default()),
                    "nbd://127.0.0.1:1".into(),
                )
                .with_overlay_dir(overlays),
            )
            .with_instant_address(proxy::restore::NbdAddress {
                host: "127.0.0.1".into(),
                port: 1,
                tls: true,
            }),
    );
    Api {
        app: app(state.clone()),
        state,
        admin,
        operator,
        auditor,
        scoped_in,
        scoped_out,
        dir,
    }
}

/// Sends one request; returns status and body (as JSON when it parses).
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map(Body::from).unwrap_or_else(Body::empty))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}

/// Commits a one-disk backup (`vda`, `data`) of VM `vm` with domain definition `xml`
/// (libvirt's test driver has no disks to back up; the repository is real).
pub async fn seed_backup(a: &Api, vm: &str, data: Vec<u8>, xml: &str) -> catalog::Manifest {
    seed_backup_of(a, vm, "6695eb01-f6a4-8304-79aa-97f2502e193f", data, xml).await
}

/// `seed_backup` of the VM with `uuid`.
pub async fn seed_backup_of(
    a: &Api,
    vm: &str,
    uuid: &str,
    data: Vec<u8>,
    xml: &str,
) -> catalog::Manifest {
    use catalog::{BackupSpec, CommitInfo, Consistency, DiskSpec, VmIdentity};
    let (repo, vm, xml) = (a.state.repo.clone(), vm.to_string(), xml.to_string());
    let uuid = uuid.to_string();
    tokio::task::spawn_blocking(move || {
        let w = repo
            .begin_backup(BackupSpec {
                vm: VmIdentity { name: vm, uuid },
                disks: vec![DiskSpec {
                    full_read: None,
                    target: "vda".into(),
                    size: data.len() as u64,
                    checkpoint: None,
                }],
                parent: None,
                started: 1_700_000_000,
            })
            .unwrap();
        w.put_chunks(0, 0, &data).unwrap();
        w.commit(CommitInfo {
            vm_state: None,
            domain_xml: xml,
            mode: catalog::BackupMode::Full,
            consistency: Consistency::Crash,
            finished: 1_700_000_001,
        })
        .unwrap()
    })
    .await
    .unwrap()
}
