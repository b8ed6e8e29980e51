//! The audit middleware: every call that is not a plain read is written to the audit log
//! (`crate::daemon::audit`) with the caller's token id and the answer's status. The token id
//! is the one the request was authenticated with (the `Caller` extractor records it in
//! [`Authenticated`]); a request never authenticated is logged without one, whatever its
//! `Authorization` header claims.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::daemon::audit::Line;
use crate::daemon::clock::now;
use crate::daemon::state::SharedState;

/// The token id a request was authenticated with, filled in by the `Caller` extractor.
#[derive(Debug, Clone, Default)]
pub struct Authenticated(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Authenticated {
    pub(crate) fn set(&self, token_id: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(token_id.to_string());
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Middleware recording every call that is not a plain read.
pub async fn record(State(st): State<SharedState>, mut req: Request, next: Next) -> Response {
    let Some(log) = st.audit.as_ref() else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let seen = Authenticated::default();
    req.extensions_mut().insert(seen.clone());
    let resp = next.run(req).await;
    let status = resp.status();
    let token = seen.get();
    let token = token.as_deref();
    log.write(&Line {
        time: now(),
        token,
        method: &method,
        path: &path,
        status: status.as_u16(),
    });
    resp
}
