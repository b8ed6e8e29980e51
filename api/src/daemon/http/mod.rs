//! The REST API under `/api/v1`: the router (`app`), the OpenAPI document, health.
//!
//! Every route but health takes a [`Caller`] (a valid bearer token) and asks
//! [`Caller::allow`] before doing anything.

pub mod audit;
pub mod backups;
pub mod error;
pub mod exports;
pub mod extract;
pub mod hypervisors;
pub mod jobs;
pub mod metrics;
pub mod policies;
pub mod repo;
pub mod restores;
pub mod tokens;
pub mod vms;

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::daemon::auth::{Action, Caller};
use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::state::SharedState;
use crate::wire::meta::Health;

/// Liveness (no token needed).
#[utoipa::path(get, path = "/api/v1/health", tag = "meta", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3.1 document")), security(("bearer" = [])))]
pub async fn openapi(caller: Caller) -> ApiResult<impl IntoResponse> {
    caller.allow(Action::Read, None)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    ))
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "Sluice API", description = "Agentless backup proxy for KVM/QEMU"),
    modifiers(&Bearer),
    paths(
        health, openapi, metrics::metrics,
        hypervisors::list,
        vms::list, vms::show, vms::trigger,
        backups::list, backups::show, backups::delete, backups::protect,
        jobs::list, jobs::show, jobs::cancel, jobs::events,
        exports::list, exports::open, exports::close,
        restores::start,
        policies::apply, policies::list, policies::show, policies::delete,
        repo::stats, repo::verify, repo::prune, repo::gc,
        tokens::create, tokens::list, tokens::revoke,
    ),
    components(schemas(crate::wire::error::ErrorBody, crate::wire::error::ErrorDetail))
)]
pub struct ApiDoc;

/// The OpenAPI document, pretty-printed (as committed in `docs/openapi.json`).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

async fn fallback() -> ApiError {
    ApiError::not_found("no such route; see /api/v1/openapi.json")
}

async fn method_not_allowed() -> impl IntoResponse {
    let mut e = ApiError::bad_request("method not allowed on this route");
    e.status = crate::daemon::error::Status::MethodNotAllowed;
    e.code = "method_not_allowed";
    e
}

/// The whole API.
pub fn app(state: SharedState) -> Router {
    let v1 = Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/hypervisors", get(hypervisors::list))
        .route("/vms", get(vms::list))
        .route("/vms/{vm}", get(vms::show))
        .route("/vms/{vm}/backups", post(vms::trigger))
        .route("/backups", get(backups::list))
        .route("/backups/{id}", get(backups::show).delete(backups::delete))
        .route("/backups/{id}/protection", put(backups::protect))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::show))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/exports", get(exports::list).post(exports::open))
        .route("/exports/{id}", delete(exports::close))
        .route("/restores", post(restores::start))
        .route("/policies", get(policies::list).post(policies::apply))
        .route(
            "/policies/{name}",
            get(policies::show).delete(policies::delete),
        )
        .route("/repository", get(repo::stats))
        .route("/verify", post(repo::verify))
        .route("/prune", post(repo::prune))
        .route("/gc", post(repo::gc))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/tokens/{id}", delete(tokens::revoke))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .nest("/api/v1", v1)
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .with_state(state)
}
