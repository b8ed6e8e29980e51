//! Export routes: list, open and close NBD exports of backups (`ops::exports`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::http::extract::ApiJson;
use crate::daemon::ops;
use crate::daemon::state::SharedState;
use crate::wire::exports::{ExportInfo, OpenExport};

/// Open exports.
#[utoipa::path(get, path = "/api/v1/exports", tag = "exports",
    responses((status = 200, body = [ExportInfo])), security(("bearer" = [])))]
pub async fn list(
    State(st): State<SharedState>,
    caller: Caller,
) -> ApiResult<Json<Vec<ExportInfo>>> {
    caller.allow(Action::Read, None)?;
    Ok(Json(ops::exports::list(&st)?))
}

/// Serves a backup disk over NBD, read-only or writable (copy-on-write overlay).
///
/// With `changed_since` the export also offers the `sluice:changed-since:OTHER` meta context
/// (the answer's `meta_context`): the chunks that differ from that other backup.
#[utoipa::path(post, path = "/api/v1/exports", tag = "exports", request_body = OpenExport,
    responses((status = 201, body = ExportInfo),
        (status = 400, description = "malformed backup or changed_since id, or a changed_since backup of another VM, without the disk or of another size", body = crate::wire::error::ErrorBody),
        (status = 404, description = "backup, disk or changed_since backup not found", body = crate::wire::error::ErrorBody),
        (status = 409, description = "the name is already exported (writable ones are served alone)", body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn open(
    State(st): State<SharedState>,
    caller: Caller,
    ApiJson(req): ApiJson<OpenExport>,
) -> ApiResult<(StatusCode, Json<ExportInfo>)> {
    caller.allow(Action::Export, None)?;
    let info = ops::exports::open(&st, req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Closes an export.
#[utoipa::path(delete, path = "/api/v1/exports/{id}", tag = "exports",
    params(("id" = u64, Path, description = "export id")),
    responses((status = 204), (status = 404, body = crate::wire::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn close(
    State(st): State<SharedState>,
    caller: Caller,
    p: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> ApiResult<StatusCode> {
    caller.allow(Action::Export, None)?;
    let id = p
        .map(|Path(i)| i)
        .map_err(|_| ApiError::bad_request("export id must be a positive integer"))?;
    ops::exports::close(&st, id)?;
    Ok(StatusCode::NO_CONTENT)
}
