//! Export routes: serve a backup disk read-only over NBD (the answer carries the NBD URI),
//! list open exports, close one. Writable exports are not wired yet.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use proxy::nbd::Server;
use proxy::restore::{ExportName, ExportOptions, RepoExport};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::extract::{validate_name, ApiJson};
use crate::state::SharedState;

/// The daemon's NBD server and the exports the API opened on it.
pub struct Exports {
    server: Arc<Server>,
    /// `nbd://host:port`, the base of every export URI.
    base_uri: String,
    open: Mutex<BTreeMap<u64, ExportInfo>>,
    next: Mutex<u64>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("base_uri", &self.base_uri)
            .finish_non_exhaustive()
    }
}

impl Exports {
    /// Exports served by `server`, reachable at `base_uri`.
    pub fn new(server: Arc<Server>, base_uri: String) -> Self {
        Exports {
            server,
            base_uri,
            open: Mutex::new(BTreeMap::new()),
            next: Mutex::new(1),
        }
    }
}

/// Body of an export request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenExport {
    pub backup: String,
    /// Disk target (`vda`); default: the backup's first disk.
    pub disk: Option<String>,
}

/// An open export.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExportInfo {
    pub id: u64,
    /// `VM/DISK@BACKUP`.
    pub name: String,
    /// What `nbdinfo`, `qemu-img` or `nbdcopy` take.
    pub uri: String,
    pub writable: bool,
}

fn exports(st: &SharedState) -> ApiResult<&Exports> {
    st.exports
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("exports are disabled (no nbd_listen configured)"))
}

/// Open exports.
#[utoipa::path(get, path = "/api/v1/exports", tag = "exports",
    responses((status = 200, body = [ExportInfo])), security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
) -> ApiResult<Json<Vec<ExportInfo>>> {
    caller.allow(Action::Read, None)?;
    let ex = exports(&st)?;
    Ok(Json(
        ex.open
            .lock()
            .expect("exports lock")
            .values()
            .cloned()
            .collect(),
    ))
}

/// Serves a backup disk read-only over NBD.
#[utoipa::path(post, path = "/api/v1/exports", tag = "exports", request_body = OpenExport,
    responses((status = 201, body = ExportInfo), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn open(
    State(st): State<SharedState>,
    caller: Caller,
    ApiJson(req): ApiJson<OpenExport>,
) -> ApiResult<(StatusCode, Json<ExportInfo>)> {
    caller.allow(Action::Export, None)?;
    let ex = exports(&st)?;
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
    let export = RepoExport::open(&st.repo, &name, ExportOptions::default())
        .await
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    let text = name.to_string();
    ex.server.add_export(text.clone(), export);
    let n = {
        let mut n = ex.next.lock().expect("exports lock");
        *n += 1;
        *n - 1
    };
    let info = ExportInfo {
        id: n,
        uri: format!("{}/{}", ex.base_uri, text),
        name: text,
        writable: false,
    };
    ex.open
        .lock()
        .expect("exports lock")
        .insert(n, info.clone());
    tracing::info!(export = %info.name, "export opened");
    Ok((StatusCode::CREATED, Json(info)))
}

/// Closes an export.
#[utoipa::path(delete, path = "/api/v1/exports/{id}", tag = "exports",
    params(("id" = u64, Path, description = "export id")),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn close(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<StatusCode> {
    caller.allow(Action::Export, None)?;
    let ex = exports(&st)?;
    let id = p
        .map(|Path(i)| i)
        .map_err(|_| ApiError::bad_request("export id must be a positive integer"))?;
    let info = ex
        .open
        .lock()
        .expect("exports lock")
        .remove(&id)
        .ok_or_else(|| ApiError::not_found(format!("export {id} does not exist")))?;
    ex.server.remove_export(&info.name);
    tracing::info!(export = %info.name, "export closed");
    Ok(StatusCode::NO_CONTENT)
}
