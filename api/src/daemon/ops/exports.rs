//! NBD exports of backups: list, open (read-only, or writable through a copy-on-write
//! overlay; optionally with the `sluice:changed-since:OTHER` diff context against another
//! backup of the same disk; the answer carries the NBD URI, `nbds://` with the client's
//! certificate directory when the NBD server speaks TLS, and the context's name), close. Writes to a writable export land only in
//! its overlay file under the daemon's work directory, removed at close; the backup never
//! changes.

use catalog::BackupId;
use proxy::restore::{changed_since_context, ExportName, RepoExport};

use crate::daemon::error::{chain, ApiError, ApiResult, Status};
use crate::daemon::exports::Exports;
use crate::daemon::names::validate_name;
use crate::daemon::state::SharedState;
use crate::wire::exports::{ExportInfo, OpenExport};

fn exports(st: &SharedState) -> ApiResult<&Exports> {
    st.exports
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("exports are disabled (no nbd_listen configured)"))
}

/// The open exports.
pub fn list(st: &SharedState) -> ApiResult<Vec<ExportInfo>> {
    let ex = exports(st)?;
    Ok(ex
        .open
        .lock()
        .expect("exports lock")
        .values()
        .cloned()
        .collect())
}

/// Serves a backup disk over NBD (with `changed_since`, also the diff context against that
/// backup; see [`check_changed_since`]).
pub async fn open(st: &SharedState, req: OpenExport) -> ApiResult<ExportInfo> {
    let ex = exports(st)?;
    let id = parse_id("backup", &req.backup)?;
    if let Some(d) = &req.disk {
        validate_name("disk", d)?;
    }
    let since = match &req.changed_since {
        Some(s) => Some(parse_id("changed_since", s)?),
        None => None,
    };
    let id2 = id.clone();
    let m = st.repo(move |r| r.manifest(&id2)).await?;
    let disk = match req.disk {
        Some(d) => d,
        None => m
            .disks
            .first()
            .map(|d| d.target.clone())
            .ok_or_else(|| ApiError::bad_request(format!("backup {id} has no disks")))?,
    };
    if let Some(other) = &since {
        check_changed_since(st, &m, &disk, other).await?;
    }
    let name = ExportName::new(&m.vm.name, &disk, &id)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let text = name.to_string();
    let _opening = ex.opening.lock().await;
    ex.check_free(&text, req.writable)?;
    let opts = ex.options(&text, req.writable, since.as_ref())?;
    let export = RepoExport::open(&st.repo, &name, opts)
        .await
        .map_err(|e| export_error(&e))?;
    ex.server.add_export(text.clone(), export);
    let info = register(ex, text, req.writable, since);
    tracing::info!(export = %info.name, changed_since = ?info.changed_since, "export opened");
    Ok(info)
}

fn parse_id(field: &str, s: &str) -> ApiResult<BackupId> {
    BackupId::parse(s).map_err(|e| ApiError::bad_request(format!("{field}: {}", chain(&e))))
}

/// `other` can be compared with disk `disk` of backup `m`: it exists (else 404), is of the
/// same VM by UUID and has that disk with the same size and chunk size (else 400). It may
/// be older or newer than `m`: the chunks that differ are the same either way, and a client
/// holding either point copies the other's changed chunks from its export.
async fn check_changed_since(
    st: &SharedState,
    m: &catalog::Manifest,
    disk: &str,
    other: &BackupId,
) -> ApiResult<()> {
    let o = other.clone();
    let om = st
        .repo(move |r| r.manifest(&o))
        .await
        .map_err(|e| ApiError {
            message: format!("changed_since: {}", e.message),
            ..e
        })?;
    let bad = |why: String| ApiError::bad_request(format!("changed_since: backup {other} {why}"));
    if om.vm.uuid != m.vm.uuid {
        return Err(bad(format!(
            "is of vm {} (uuid {}), not of vm {} (uuid {}) whose backup {} is exported",
            om.vm.name, om.vm.uuid, m.vm.name, m.vm.uuid, m.id
        )));
    }
    let targets = |m: &catalog::Manifest| {
        let v: Vec<&str> = m.disks.iter().map(|d| d.target.as_str()).collect();
        v.join(", ")
    };
    let Some(mine) = m.disks.iter().find(|d| d.target == disk) else {
        return Err(ApiError::not_found(format!(
            "backup {} has no disk {disk} (it has {})",
            m.id,
            targets(m)
        )));
    };
    let Some(theirs) = om.disks.iter().find(|d| d.target == disk) else {
        return Err(bad(format!("has no disk {disk} (it has {})", targets(&om))));
    };
    if mine.size != theirs.size {
        return Err(bad(format!(
            "holds disk {disk} at {} bytes, backup {} at {} bytes: a diff needs one size \
             (export without changed_since and copy it all)",
            theirs.size, m.id, mine.size
        )));
    }
    if mine.chunk_size != theirs.chunk_size {
        return Err(bad(format!(
            "has disk {disk} in {}-byte chunks, backup {} in {}-byte chunks",
            theirs.chunk_size, m.id, mine.chunk_size
        )));
    }
    Ok(())
}

/// A failed [`RepoExport::open`] as an answer: 404 for what is missing, 400 for a request
/// that does not fit.
fn export_error(e: &proxy::restore::Error) -> ApiError {
    use proxy::job::ErrorKind as K;
    let msg = chain(e);
    match e.kind() {
        K::NotFound => ApiError::not_found(msg),
        K::InvalidInput | K::Refused => ApiError::bad_request(msg),
        K::Corrupt => ApiError::new(Status::Internal, "corrupt", msg),
        _ => ApiError::internal(msg),
    }
}

/// Records an export the server now offers under `name`; returns its answer.
fn register(ex: &Exports, name: String, writable: bool, since: Option<BackupId>) -> ExportInfo {
    let n = {
        let mut n = ex.next.lock().expect("exports lock");
        *n += 1;
        *n - 1
    };
    let info = ExportInfo {
        id: n,
        uri: ex.uri(&name),
        name,
        writable,
        meta_context: since.as_ref().map(changed_since_context),
        changed_since: since.map(|s| s.to_string()),
    };
    ex.open
        .lock()
        .expect("exports lock")
        .insert(n, info.clone());
    info
}

/// Closes export `id` (the NBD server stops serving its name once no other open shares it).
pub fn close(st: &SharedState, id: u64) -> ApiResult<()> {
    let ex = exports(st)?;
    let (info, shared) = {
        let mut open = ex.open.lock().expect("exports lock");
        let info = open
            .remove(&id)
            .ok_or_else(|| ApiError::not_found(format!("export {id} does not exist")))?;
        let shared = open.values().any(|i| i.name == info.name);
        (info, shared)
    };
    if !shared {
        ex.server.remove_export(&info.name);
    }
    tracing::info!(export = %info.name, "export closed");
    Ok(())
}
