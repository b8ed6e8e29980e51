//! The audit middleware: every call that is not a plain read is written to the audit log
//! (`crate::daemon::audit`) with the caller's token id and the answer's status.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::daemon::audit::Line;
use crate::daemon::clock::now;
use crate::daemon::state::SharedState;

/// Middleware recording every call that is not a plain read.
pub async fn record(State(st): State<SharedState>, req: Request, next: Next) -> Response {
    let Some(log) = st.audit.as_ref() else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let claimed = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(token_id);
    let resp = next.run(req).await;
    let status = resp.status();
    let token = claimed
        .as_deref()
        .filter(|_| status != StatusCode::UNAUTHORIZED);
    log.write(&Line {
        time: now(),
        token,
        method: &method,
        path: &path,
        status: status.as_u16(),
    });
    resp
}

/// The id part of `Bearer sluice_<id>_<secret>`.
fn token_id(h: &str) -> Option<String> {
    let t = h.strip_prefix("Bearer ")?.trim().strip_prefix("sluice_")?;
    let id = t.split('_').next()?;
    (id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}
