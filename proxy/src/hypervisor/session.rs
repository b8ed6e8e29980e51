//! Guards for hypervisor state that must not leak: a running backup export and a filesystem
//! freeze. Each adapter supplies the code that releases its state; this module makes sure it
//! runs exactly once, on the explicit path or, loudly, on drop.

use std::future::Future;
use std::pin::Pin;

use super::{DiskExport, Result};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How an adapter releases what a guard holds. `Sync` so that a guard (and a `&BackupSession`
/// held across an `.await` by the backup job) can be shared with a task on another worker
/// thread: the job's future is `Send`.
pub(crate) trait Release: Send + Sync + 'static {
    /// Releases it; `success` tells a backup whether to keep its new checkpoint.
    fn release(self: Box<Self>, success: bool) -> BoxFuture<Result<()>>;
    /// Releases it without anyone waiting (called from `Drop`, must not block on the network).
    fn release_in_background(self: Box<Self>);
}

/// A running point-in-time backup: NBD exports of each disk until `finish` or `abort`.
#[must_use = "a backup session holds a hypervisor job until finish() or abort()"]
pub struct BackupSession {
    vm: String,
    exports: Vec<DiskExport>,
    new_checkpoint: Option<String>,
    release: Option<Box<dyn Release>>,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("vm", &self.vm)
            .field("exports", &self.exports)
            .field("new_checkpoint", &self.new_checkpoint)
            .finish()
    }
}

impl BackupSession {
    pub(crate) fn new(
        vm: String,
        exports: Vec<DiskExport>,
        new_checkpoint: Option<String>,
        release: Box<dyn Release>,
    ) -> Self {
        tracing::info!(vm = %vm, disks = exports.len(), "backup export opened");
        Self {
            vm,
            exports,
            new_checkpoint,
            release: Some(release),
        }
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// One export per requested disk, in request order.
    pub fn exports(&self) -> &[DiskExport] {
        &self.exports
    }

    /// The checkpoint created with this backup's point in time, if one was asked for.
    pub fn new_checkpoint(&self) -> Option<&str> {
        self.new_checkpoint.as_deref()
    }

    /// Ends the job after a successful read; the new checkpoint stays.
    pub async fn finish(mut self) -> Result<()> {
        self.end(true).await
    }

    /// Ends the job after a failure; the new checkpoint is deleted (best effort) so the chain
    /// still starts at the last good backup.
    pub async fn abort(mut self) -> Result<()> {
        self.end(false).await
    }

    async fn end(&mut self, success: bool) -> Result<()> {
        let release = self.release.take().expect("backup session released twice");
        let result = release.release(success).await;
        tracing::info!(vm = %self.vm, success, ok = result.is_ok(), "backup export closed");
        result
    }
}

impl Drop for BackupSession {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            tracing::error!(
                vm = %self.vm,
                "backup session dropped without finish() or abort(): aborting the job in the background"
            );
            release.release_in_background();
        }
    }
}

/// Frozen guest filesystems, thawed by `thaw` or (loudly) on drop.
#[must_use = "a freeze guard keeps the guest's filesystems frozen until thaw()"]
pub struct FreezeGuard {
    vm: String,
    release: Option<Box<dyn Release>>,
}

impl std::fmt::Debug for FreezeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreezeGuard").field("vm", &self.vm).finish()
    }
}

impl FreezeGuard {
    pub(crate) fn new(vm: String, release: Box<dyn Release>) -> Self {
        tracing::info!(vm = %vm, "guest filesystems frozen");
        Self {
            vm,
            release: Some(release),
        }
    }

    /// Thaws the guest's filesystems.
    pub async fn thaw(mut self) -> Result<()> {
        let release = self.release.take().expect("freeze guard released twice");
        let result = release.release(true).await;
        tracing::info!(vm = %self.vm, ok = result.is_ok(), "guest filesystems thawed");
        result
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            tracing::error!(vm = %self.vm, "freeze guard dropped without thaw(): thawing in the background");
            release.release_in_background();
        }
    }
}
