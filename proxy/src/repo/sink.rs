//! [`IngestSink`]: an open backup in the repository, as the backup job feeds it.
//!
//! Owns every call into `catalog` during a backup: storing chunks, recording zero chunks,
//! reading the parent backup's chunks for partly dirty chunks, and the commit, each through
//! [`super::call`] (the blocking pool, within the seam's bound); the catalog's own worker
//! threads hash and compress behind a bounded channel, so a slow repository pushes back on
//! the NBD reads instead of growing memory.
//!
//! The parent's manifest is the one the job already read (to choose full or incremental),
//! passed in, not read again here. The catalog's writer opens the parent's index to keep its
//! chunks; the sink opens a parent disk for reading only when a partly dirty chunk first
//! needs the parent's bytes (never with the default chunk size, which equals QEMU's bitmap
//! granularity), so most backups open each parent index once.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use catalog::{BackupId, BackupSpec, BackupWriter, CommitInfo, DiskReader, Manifest, Repository};

use super::{call, Result};

/// An open backup in the repository plus the parent's disks for partial chunks.
#[derive(Clone)]
pub struct IngestSink {
    writer: Arc<BackupWriter>,
    /// Per disk of the new backup: the parent's disk of the same target, if it has one.
    parents: Arc<Vec<Option<ParentDisk>>>,
}

/// A disk of the parent backup, opened on first use.
struct ParentDisk {
    repo: Repository,
    backup: BackupId,
    target: String,
    reader: OnceLock<DiskReader>,
}

impl ParentDisk {
    /// The open disk (blocking: opens it on first use; two first users may both open it,
    /// and one of the two readers is kept).
    fn reader(&self) -> Result<&DiskReader> {
        if let Some(r) = self.reader.get() {
            return Ok(r);
        }
        let r = self.repo.open_disk(&self.backup, &self.target)?;
        Ok(self.reader.get_or_init(|| r))
    }
}

impl std::fmt::Debug for IngestSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestSink")
            .field("backup", self.writer.id())
            .finish()
    }
}

impl IngestSink {
    /// Begins a backup on `parent` (`spec.parent` is set from it: `None` for a full); opens
    /// the parent's disk of each target the parent has.
    pub async fn begin(
        repo: Repository,
        mut spec: BackupSpec,
        parent: Option<&Manifest>,
    ) -> Result<IngestSink> {
        spec.parent = parent.map(|m| m.id.clone());
        let parents = spec
            .disks
            .iter()
            .map(|d| {
                let m = parent.filter(|m| m.disks.iter().any(|p| p.target == d.target))?;
                Some(ParentDisk {
                    repo: repo.clone(),
                    backup: m.id.clone(),
                    target: d.target.clone(),
                    reader: OnceLock::new(),
                })
            })
            .collect();
        call(move || {
            let writer = repo.begin_backup(spec)?;
            Ok(IngestSink {
                writer: Arc::new(writer),
                parents: Arc::new(parents),
            })
        })
        .await
    }

    /// The new backup's id.
    pub fn backup_id(&self) -> &BackupId {
        self.writer.id()
    }

    /// The repository chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.writer.chunk_size())
    }

    /// Stores consecutive chunks of disk `disk` starting at chunk `start`.
    pub async fn put_chunks(&self, disk: usize, start: u64, data: Vec<u8>) -> Result<()> {
        let w = self.writer.clone();
        call(move || w.put_chunks_owned(disk, start, data)).await
    }

    /// Records chunks `range` of disk `disk` as all zeros.
    pub async fn put_zeros(&self, disk: usize, range: Range<u64>) -> Result<()> {
        let w = self.writer.clone();
        call(move || w.put_zeros(disk, range)).await
    }

    /// The parent backup's chunk `index` of disk `disk` (zeros if the parent has none there).
    pub async fn parent_chunk(&self, disk: usize, index: u64, len: usize) -> Result<Vec<u8>> {
        let parents = self.parents.clone();
        call(move || {
            let Some(Some(parent)) = parents.get(disk) else {
                return Ok(vec![0; len]);
            };
            let reader = parent.reader()?;
            if index >= reader.chunk_count() {
                return Ok(vec![0; len]);
            }
            let chunk = reader.read_chunk(index)?;
            let mut out = vec![0; len];
            let n = chunk.len().min(len);
            out[..n].copy_from_slice(&chunk[..n]);
            Ok(out)
        })
        .await
    }

    /// Commits the backup: the manifest is written last and is the commit point.
    pub async fn commit(self, info: CommitInfo) -> Result<Manifest> {
        drop(self.parents);
        let writer = Arc::try_unwrap(self.writer).map_err(|_| {
            catalog::Error::new(
                catalog::ErrorKind::InvalidInput,
                "backup writer still in use at commit",
            )
        })?;
        call(move || writer.commit(info)).await
    }

    /// Abandons the backup (nothing is committed). Dropping the writer joins the catalog's
    /// worker threads and releases the repository lock, so the last holder drops it here,
    /// through the seam, not on a runtime thread; a holder that is not the last leaves that
    /// to the one that is.
    pub async fn abort(self) {
        drop(self.parents);
        if let Ok(writer) = Arc::try_unwrap(self.writer) {
            let dropped = call(move || {
                drop(writer);
                Ok(())
            });
            if let Err(e) = dropped.await {
                tracing::warn!(error = %e, "dropping an aborted backup writer failed");
            }
        }
    }
}
