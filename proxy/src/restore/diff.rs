//! Restore-point diff: which chunks of a disk differ from an older backup of the same disk,
//! computed from the two indexes alone (no data is read).
//!
//! Served as the block-status meta context `sluice:changed-since:BACKUP` (bit 0 set: the
//! chunk differs). See docs/restore.md.

use catalog::{BackupId, DiskReader};

use super::bits::Bits;
use super::error::{Error, Result};

/// Prefix of the diff meta context; the older backup's id follows.
pub const CHANGED_SINCE_PREFIX: &str = "sluice:changed-since:";
/// Bit 0 of the diff context: the chunk differs from the older backup.
pub const STATE_CHANGED: u32 = 1;

/// The meta context name of the diff against `older`.
pub fn changed_since_context(older: &BackupId) -> String {
    format!("{CHANGED_SINCE_PREFIX}{older}")
}

/// Chunks of `new` that differ from `old` (positions past the end of `old` count as changed).
pub(crate) fn changed_chunks(new: &DiskReader, old: &DiskReader) -> Result<Bits> {
    if new.chunk_size() != old.chunk_size() {
        return Err(Error::invalid(format!(
            "disk {} chunk size {} differs from the older backup's {}",
            new.manifest().target,
            new.chunk_size(),
            old.chunk_size()
        )));
    }
    let ctx = |e| Error::catalog(format!("index of disk {}", new.manifest().target), e);
    let mut bits = Bits::new(new.chunk_count());
    new.for_each_difference(old, |i| bits.set(i, true))
        .map_err(ctx)?;
    Ok(bits)
}
