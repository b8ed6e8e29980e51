//! The seam between the async data path and the synchronous repository.
//!
//! Owns every call from async code into `catalog` during a backup: storing chunks, recording
//! zero chunks, reading the parent backup's chunks for partly dirty chunks, and the commit.
//! Each call runs on tokio's bounded blocking pool, never on a runtime worker thread; the
//! catalog's own worker threads hash and compress behind a bounded channel, so a slow
//! repository pushes back on the NBD reads instead of growing memory.
//!
//! It does not own planning (`crate::plan`) or NBD (`crate::nbd`).

use std::ops::Range;
use std::sync::Arc;

use catalog::{BackupId, BackupSpec, BackupWriter, CommitInfo, DiskReader, Manifest, Repository};

/// Errors from the repository, as seen by the data path.
pub type Result<T> = std::result::Result<T, catalog::Error>;

/// An open backup in the repository plus the parent's disks for partial chunks.
#[derive(Clone)]
pub struct IngestSink {
    writer: Arc<BackupWriter>,
    parents: Arc<Vec<Option<DiskReader>>>,
}

impl std::fmt::Debug for IngestSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestSink")
            .field("backup", self.writer.id())
            .finish()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        catalog::Error::new(catalog::ErrorKind::Io, "repository task failed").with_source(e)
    })?
}

impl IngestSink {
    /// Begins a backup; opens the parent's disk of each target that has one.
    pub async fn begin(repo: Repository, spec: BackupSpec) -> Result<IngestSink> {
        blocking(move || {
            let parents = match &spec.parent {
                Some(p) => open_parents(&repo, p, &spec)?,
                None => spec.disks.iter().map(|_| None).collect(),
            };
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
        blocking(move || w.put_chunks_owned(disk, start, data)).await
    }

    /// Records chunks `range` of disk `disk` as all zeros.
    pub async fn put_zeros(&self, disk: usize, range: Range<u64>) -> Result<()> {
        let w = self.writer.clone();
        blocking(move || w.put_zeros(disk, range)).await
    }

    /// The parent backup's chunk `index` of disk `disk` (zeros if the parent has none there).
    pub async fn parent_chunk(&self, disk: usize, index: u64, len: usize) -> Result<Vec<u8>> {
        let parents = self.parents.clone();
        blocking(move || {
            let Some(Some(reader)) = parents.get(disk) else {
                return Ok(vec![0; len]);
            };
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
        blocking(move || writer.commit(info)).await
    }
}

fn open_parents(
    repo: &Repository,
    parent: &BackupId,
    spec: &BackupSpec,
) -> Result<Vec<Option<DiskReader>>> {
    let manifest = repo.manifest(parent)?;
    spec.disks
        .iter()
        .map(|d| {
            let has = manifest.disks.iter().any(|p| p.target == d.target);
            has.then(|| repo.open_disk(parent, &d.target)).transpose()
        })
        .collect()
}
