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
    /// Another backup id of the same VM (by UUID), with the same disk, size and chunk size,
    /// older or newer: the export also offers the block-status meta context
    /// `sluice:changed-since:OTHER`, which marks (bit 0) each chunk whose content differs
    /// between the two backups. An unknown id is 404, a malformed one or a backup of another
    /// VM, without the disk or of another size 400.
    #[serde(default)]
    pub changed_since: Option<String>,
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
    /// The backup the diff context compares with (`changed_since` of the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<String>,
    /// The meta context to ask for the diff (`nbdinfo --map=CONTEXT URI`):
    /// `sluice:changed-since:OTHER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_context: Option<String>,
}
