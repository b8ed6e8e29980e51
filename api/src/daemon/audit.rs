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

use serde::Serialize;

/// The open audit file.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
}

/// One audited call.
#[derive(Serialize)]
pub struct Line<'a> {
    /// Unix seconds.
    pub time: i64,
    /// The caller's token id (none: unauthenticated).
    pub token: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
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

    /// Appends one line (a failure is logged, never fails the call).
    pub fn write(&self, line: &Line<'_>) {
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
