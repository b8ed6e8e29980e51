//! Audit log: one JSON line per mutating call (who, what, when, result) appended to
//! `<data_dir>/audit.log` (mode 0600).
//!
//! Who: the token id, read from the token itself. That is trustworthy exactly when the
//! answer is not 401, because every route checks the token before anything else; a 401 is
//! logged with `token: null`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;

use crate::auth::now;
use crate::state::SharedState;

/// The open audit file.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: i64,
    token: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    status: u16,
}

impl AuditLog {
    /// Opens (creates) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    fn write(&self, line: &Line<'_>) {
        let Ok(mut text) = serde_json::to_string(line) else {
            return;
        };
        text.push('\n');
        let mut f = self.file.lock().expect("audit lock");
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::error!("writing the audit log: {e}");
        }
    }
}

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
