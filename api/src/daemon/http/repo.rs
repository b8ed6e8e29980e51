//! Repository routes: stats, verify, prune, gc.

use axum::extract::State;
use axum::Json;
use catalog::{GcOptions, RetentionPolicy, VerifyMode};

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::http::extract::OptJson;
use crate::daemon::state::SharedState;
use crate::wire::repo::GcRequest;
use crate::wire::repo::GcResponse;
use crate::wire::repo::PruneRequest;
use crate::wire::repo::PruneResponse;
use crate::wire::repo::RepoStats;
use crate::wire::repo::VerifyProblem;
use crate::wire::repo::VerifyRequest;
use crate::wire::repo::VerifyResponse;

/// Repository figures.
#[utoipa::path(get, path = "/api/v1/repository", tag = "repository",
    responses((status = 200, body = RepoStats)), security(("bearer" = [])))]
pub async fn stats(State(st): State<SharedState>, caller: Caller) -> ApiResult<Json<RepoStats>> {
    caller.allow(Action::Read, None)?;
    let s = st
        .repo(|r| {
            let rows = r.backups(None)?;
            let mut logical = 0u64;
            for row in &rows {
                logical += r
                    .manifest(&row.id)?
                    .disks
                    .iter()
                    .map(|d| d.size)
                    .sum::<u64>();
            }
            let chunks = r.with_catalog(|c| c.chunk_count())?;
            let vms = r.with_catalog(|c| c.vms())?.len() as u64;
            let stored: u64 = rows.iter().map(|r| r.bytes_stored).sum();
            Ok(RepoStats {
                backups: rows.len() as u64,
                vms,
                chunk_size: r.config().chunk_size,
                chunks,
                logical_bytes: logical,
                stored_bytes: stored,
                reduction_ratio: if stored == 0 {
                    0.0
                } else {
                    logical as f64 / stored as f64
                },
            })
        })
        .await?;
    Ok(Json(s))
}

/// Checks the repository (or some backups) and names every affected backup.
#[utoipa::path(post, path = "/api/v1/verify", tag = "repository", request_body = VerifyRequest,
    responses((status = 200, body = VerifyResponse)), security(("bearer" = [])))]
pub async fn verify(
    State(st): State<SharedState>,
    caller: Caller,
    OptJson(req): OptJson<VerifyRequest>,
) -> ApiResult<Json<VerifyResponse>> {
    caller.allow(Action::Verify, None)?;
    let ids = req
        .backups
        .iter()
        .map(|s| catalog::BackupId::parse(s).map_err(|e| ApiError::bad_request(e.to_string())))
        .collect::<ApiResult<Vec<_>>>()?;
    let mode = if req.full {
        VerifyMode::Full
    } else {
        VerifyMode::Quick
    };
    let rep = st
        .repo(move |r| r.verify(mode, if ids.is_empty() { None } else { Some(&ids) }))
        .await?;
    Ok(Json(VerifyResponse {
        ok: rep.is_ok(),
        backups: rep.backups,
        chunks: rep.chunks,
        chunks_rehashed: rep.chunks_rehashed,
        forgotten: rep.forgotten,
        affected_backups: rep
            .affected_backups()
            .iter()
            .map(|b| b.to_string())
            .collect(),
        problems: rep
            .problems
            .iter()
            .map(|p| VerifyProblem {
                digest: p.digest.map(|d| d.to_hex()),
                kind: format!("{:?}", p.kind).to_lowercase(),
                detail: p.detail.clone(),
                backups: p.affected.iter().map(|a| a.backup.to_string()).collect(),
            })
            .collect(),
    }))
}

/// Applies a retention policy; protected backups are always kept.
#[utoipa::path(post, path = "/api/v1/prune", tag = "repository", request_body = PruneRequest,
    responses((status = 200, body = PruneResponse), (status = 400, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn prune(
    State(st): State<SharedState>,
    caller: Caller,
    OptJson(req): OptJson<PruneRequest>,
) -> ApiResult<Json<PruneResponse>> {
    caller.allow(Action::Modify, None)?;
    let policy = RetentionPolicy {
        keep_last: req.keep_last,
        keep_hourly: req.keep_hourly,
        keep_daily: req.keep_daily,
        keep_weekly: req.keep_weekly,
        keep_monthly: req.keep_monthly,
        keep_yearly: req.keep_yearly,
    };
    if policy == RetentionPolicy::default() {
        return Err(ApiError::bad_request(
            "a prune needs at least one keep_* rule (it would remove every unprotected backup)",
        ));
    }
    let uuid = match &req.vm {
        None => None,
        Some(vm) => match super::backups::uuids_named(&st, vm).await?.as_slice() {
            [one] => Some(one.clone()),
            several => {
                let mut e = ApiError::conflict(format!(
                    "vm {vm} names {} backed-up VMs (uuids {}): prune one by its uuid (vm: UUID)",
                    several.len(),
                    several.join(", ")
                ));
                e.code = "ambiguous_vm";
                return Err(e);
            }
        },
    };
    let dry = req.dry_run;
    let rep = st
        .repo(move |r| r.prune(uuid.as_deref(), &policy, dry))
        .await?;
    Ok(Json(PruneResponse {
        kept: rep
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.to_string())
            .collect(),
        removed: rep
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id.to_string())
            .collect(),
        dry_run: dry,
    }))
}

/// Reclaims the space of removed backups; waits for running backups.
#[utoipa::path(post, path = "/api/v1/gc", tag = "repository", request_body = GcRequest,
    responses((status = 200, body = GcResponse), (status = 409, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn gc(
    State(st): State<SharedState>,
    caller: Caller,
    OptJson(req): OptJson<GcRequest>,
) -> ApiResult<Json<GcResponse>> {
    caller.allow(Action::Modify, None)?;
    let opts = GcOptions {
        dry_run: req.dry_run,
        wait: false,
        ..GcOptions::default()
    };
    let r = st.repo(move |r| r.gc(opts)).await?;
    Ok(Json(GcResponse {
        live_blobs: r.live_blobs,
        packs: r.packs,
        packs_deleted: r.packs_deleted,
        packs_repacked: r.packs_repacked,
        bytes_freed: r.bytes_freed,
    }))
}
