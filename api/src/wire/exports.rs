//! NBD exports of backups: open requests and the open exports.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of an export request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenExport {
    pub backup: String,
    /// Disk target (`vda`); default: the backup's first disk.
    pub disk: Option<String>,
    /// Accept writes into a copy-on-write overlay (dropped at close; the backup is never
    /// changed).
    #[serde(default)]
    pub writable: bool,
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
