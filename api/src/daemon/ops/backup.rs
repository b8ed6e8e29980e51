//! Backups as jobs: one VM on request (`spawn_backup`), or a policy's scheduled backup with
//! its retention applied after it. The backup itself is `proxy::job::run_backup`.

use std::sync::Arc;

use proxy::job::BackupOptions;

use super::failure;
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::hypervisors::Member;
use crate::daemon::jobs::{JobDone, JobHandle, JobOutcome, JobSpec};
use crate::daemon::state::SharedState;
use crate::wire::jobs::{JobInfo, JobKind, JobMode};
use crate::wire::policy::Policy;
use crate::wire::vms::BackupModeRequest;

/// Queues a backup of `vm` on hypervisor `m` (started by `policy`, if given); refused with
/// the job that holds the VM if one has not ended.
pub fn spawn_backup(
    st: &SharedState,
    m: Arc<Member>,
    vm: &str,
    mode: BackupModeRequest,
    policy: Option<Policy>,
) -> Result<JobInfo, Box<JobInfo>> {
    let name = match mode {
        BackupModeRequest::Full => JobMode::Full,
        BackupModeRequest::Auto => JobMode::Auto,
    };
    let mut spec = JobSpec::new(JobKind::Backup, vm, name).on(m.name(), &m.spec.host);
    if let Some(p) = &policy {
        spec = spec.for_policy(&p.name);
    }
    let (state, vm) = (st.clone(), vm.to_string());
    st.jobs.start_exclusive(spec, move |h| async move {
        match policy {
            Some(p) => policy_job(state, p, m, vm, h).await,
            None => backup_job(state, m, vm, mode, h).await,
        }
    })
}

/// The body of a backup job: the backup of `vm` on `m`.
async fn backup_job(
    st: SharedState,
    m: Arc<Member>,
    vm: String,
    mode: BackupModeRequest,
    h: JobHandle,
) -> JobOutcome {
    let mut opts = BackupOptions::new(st.work_dir.clone());
    opts.force_full = mode == BackupModeRequest::Full;
    opts.read_limit = st.read_limit.clone();
    if let Some(r) = &m.spec.remote {
        let data = r.data().map_err(|e| {
            failure::refused(format!(
                "backup data path of hypervisor {}: {}",
                m.name(),
                crate::daemon::error::chain(&e)
            ))
        })?;
        opts.connections = r.connections;
        opts.remote = Some(data);
    }
    let hv = m.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let run = hv.backup(st.repo.clone(), vm, opts, h.progress, h.cancel);
    match run.await {
        Ok(rep) => Ok(JobDone::Committed(rep.manifest.id.to_string())),
        Err(e) => Err(failure::backup(&e)),
    }
}

/// A scheduled backup of `vm` on `m`, then the policy's retention.
async fn policy_job(
    st: SharedState,
    p: Policy,
    m: Arc<Member>,
    vm: String,
    h: JobHandle,
) -> JobOutcome {
    let id = h.id;
    let done = backup_job(st.clone(), m, vm.clone(), p.mode, h).await?;
    if let (Some(ret), JobDone::Committed(backup)) = (p.retention, &done) {
        let note = match prune_vm(&st, backup, ret.into()).await {
            Ok(n) => format!(
                "retention of policy {} removed {n} backup(s) of {vm}",
                p.name
            ),
            Err(e) => format!("retention of policy {} failed for {vm}: {e}", p.name),
        };
        tracing::info!(job = id, "{note}");
        st.jobs.annotate(id, &note);
    }
    Ok(done)
}

/// Applies `policy` to the VM of backup `backup`; returns how many backups it removed.
async fn prune_vm(
    st: &SharedState,
    backup: &str,
    policy: catalog::RetentionPolicy,
) -> ApiResult<usize> {
    let id = catalog::BackupId::parse(backup).map_err(|e| ApiError::internal(e.to_string()))?;
    st.repo(move |r| {
        let uuid = r.manifest(&id)?.vm.uuid;
        r.prune(Some(&uuid), &policy, false)
    })
    .await
    .map(|rep| rep.removed.len())
}
