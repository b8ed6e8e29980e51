//! A dyn-compatible face of `proxy::hypervisor::Hypervisor` (whose methods return
//! `impl Future`), so the API state does not carry a type parameter.

use std::sync::Arc;

use catalog::Repository;
use futures_util::future::BoxFuture;
use proxy::hypervisor::{DomainInfo, Hypervisor};
use proxy::job::{BackupOptions, BackupReport, Progress};
use tokio_util::sync::CancellationToken;

/// What the API needs from a hypervisor.
pub trait Hv: Send + Sync {
    /// The concrete adapter, for calls only one adapter offers (defining a domain: libvirt).
    fn as_any(&self) -> &dyn std::any::Any;
    /// Every VM.
    fn list(&self) -> BoxFuture<'_, proxy::hypervisor::Result<Vec<DomainInfo>>>;
    /// One VM.
    fn domain<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, proxy::hypervisor::Result<DomainInfo>>;
    /// Runs one backup job.
    fn backup(
        self: Arc<Self>,
        repo: Repository,
        vm: String,
        opts: BackupOptions,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, proxy::job::Result<BackupReport>>;
}

impl<H: Hypervisor + 'static> Hv for H {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn list(&self) -> BoxFuture<'_, proxy::hypervisor::Result<Vec<DomainInfo>>> {
        Box::pin(self.list_domains())
    }

    fn domain<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, proxy::hypervisor::Result<DomainInfo>> {
        Box::pin(Hypervisor::domain(self, vm))
    }

    fn backup(
        self: Arc<Self>,
        repo: Repository,
        vm: String,
        opts: BackupOptions,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, proxy::job::Result<BackupReport>> {
        // `run_backup`'s future is not `Send` (a session guard is held across awaits), so
        // each backup runs on its own thread with a current-thread runtime.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("backup-{vm}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let out = match rt {
                    Ok(rt) => rt.block_on(proxy::job::run_backup(
                        &*self, &repo, &vm, &opts, progress, cancel,
                    )),
                    Err(e) => Err(job_error(format!("starting the job runtime: {e}"))),
                };
                let _ = tx.send(out);
            });
        Box::pin(async move {
            spawned.map_err(|e| job_error(format!("starting the job thread: {e}")))?;
            rx.await
                .map_err(|_| job_error("the backup thread ended without a result".into()))?
        })
    }
}

fn job_error(msg: String) -> proxy::job::Error {
    proxy::job::Error::new(proxy::job::ErrorKind::Hypervisor, msg)
}
