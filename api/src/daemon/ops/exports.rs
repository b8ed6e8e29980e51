//! NBD exports of backups: list, open (read-only, or writable through a copy-on-write
//! overlay; the answer carries the NBD URI, `nbds://` with the client's certificate
//! directory when the NBD server speaks TLS), close. Writes to a writable export land only in
//! its overlay file under the daemon's work directory, removed at close; the backup never
//! changes.

use proxy::restore::{ExportName, RepoExport};

use crate::daemon::error::{ApiError, ApiResult};
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

/// Serves a backup disk over NBD.
pub async fn open(st: &SharedState, req: OpenExport) -> ApiResult<ExportInfo> {
    let ex = exports(st)?;
    let id =
        catalog::BackupId::parse(&req.backup).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(d) = &req.disk {
        validate_name("disk", d)?;
    }
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
    let name = ExportName::new(&m.vm.name, &disk, &id)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let text = name.to_string();
    ex.check_free(&text, req.writable)?;
    let export = RepoExport::open(&st.repo, &name, ex.options(req.writable)?)
        .await
        .map_err(|e| ApiError::not_found(crate::daemon::error::chain(&e)))?;
    ex.server.add_export(text.clone(), export);
    let n = {
        let mut n = ex.next.lock().expect("exports lock");
        *n += 1;
        *n - 1
    };
    let info = ExportInfo {
        id: n,
        uri: ex.uri(&text),
        name: text,
        writable: req.writable,
    };
    ex.open
        .lock()
        .expect("exports lock")
        .insert(n, info.clone());
    tracing::info!(export = %info.name, "export opened");
    Ok(info)
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
