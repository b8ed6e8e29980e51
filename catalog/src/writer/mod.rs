//! Writing one backup: the `BackupWriter` API, index-block writing and the commit.
//!
//! Unwritten positions keep the parent's chunk (or zero without a parent); `put_*` calls
//! feed the pipeline; index blocks are written as they finish (`index`: the parent's index is
//! read on demand, so memory does not grow with the disk); `commit` finishes the remaining
//! index blocks, seals the last pack, then writes the manifest (the commit point). Dropping
//! an uncommitted writer aborts it: sealed packs become garbage for GC, nothing references
//! them. Owns none of the byte formats.

mod index;
mod pipeline;

use crate::backend::{LockGuard, LockMode};
use crate::error::{Chain, Error, Result};
use crate::format::index::{block_count, chunk_count, ids_in_block};
use crate::format::manifest::{
    BackupMode, BackupStats, Consistency, DiskManifest, Manifest, VmIdentity, VmStateAtBackup,
};
use crate::ids::{BackupId, ChunkDigest};
use crate::repo::Repository;
use index::{DiskIndex, ParentIndex};
use pipeline::{Item, Job, Outcome, Pipeline};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// One disk to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Target name (`vda`); matched against the parent's disks.
    pub target: String,
    /// Size in bytes.
    pub size: u64,
    /// Hypervisor checkpoint created with this backup.
    pub checkpoint: Option<String>,
    /// Why the disk is read in full (no change tracking); kept in the manifest.
    pub full_read: Option<String>,
}

/// What a new backup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    /// The VM.
    pub vm: VmIdentity,
    /// Its disks.
    pub disks: Vec<DiskSpec>,
    /// The backup whose chunks unwritten positions keep.
    pub parent: Option<BackupId>,
    /// Start, unix seconds.
    pub started: i64,
}

/// What is known only at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Domain definition.
    pub domain_xml: String,
    /// Full, incremental, or full because of a reason.
    pub mode: BackupMode,
    /// Application- or crash-consistent.
    pub consistency: Consistency,
    /// Commit time, unix seconds.
    pub finished: i64,
    /// How the VM was, if the caller knows.
    pub vm_state: Option<VmStateAtBackup>,
}

struct DiskPlan {
    spec: DiskSpec,
    chunks: u64,
    parent_backup: Option<BackupId>,
}

/// An open backup. Feed it chunks, then [`BackupWriter::commit`]; dropping aborts.
pub struct BackupWriter {
    repo: Repository,
    id: BackupId,
    spec: BackupSpec,
    plans: Vec<DiskPlan>,
    pipeline: Option<Pipeline>,
    _lock: LockGuard,
}

impl std::fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter")
            .field("id", &self.id)
            .finish()
    }
}

impl Repository {
    /// Start a backup (takes the shared repository lock until commit or drop).
    pub fn begin_backup(&self, spec: BackupSpec) -> Result<BackupWriter> {
        let lock = self.lock(LockMode::Shared, true)?;
        validate_spec(&spec)?;
        let parent = match &spec.parent {
            Some(p) => Some(self.manifest(p)?),
            None => None,
        };
        let mut plans = Vec::new();
        let (mut parents, mut disks) = (Vec::new(), Vec::new());
        let block_len = self.config().index_block_len;
        let catalog_dir = self.inner.opts.catalog_path.parent();
        let spill_dir = catalog_dir
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        for d in &spec.disks {
            let (plan, parent_index) = self.plan_disk(d, parent.as_ref())?;
            let parent_index = Arc::new(parent_index);
            let di = DiskIndex::new(parent_index.clone(), plan.chunks, block_len, spill_dir);
            disks.push(di);
            parents.push(parent_index);
            plans.push(plan);
        }
        let pipeline = Pipeline::start(self, parents, disks)?;
        let id = BackupId::generate(spec.started);
        tracing::info!(backup = %id, vm = %spec.vm.name, "backup started");
        Ok(BackupWriter {
            repo: self.clone(),
            id,
            spec,
            plans,
            pipeline: Some(pipeline),
            _lock: lock,
        })
    }

    /// The plan of disk `d` and its parent's index (read on demand; none if the parent
    /// lacks the disk or cut it in other chunk or block sizes).
    fn plan_disk(
        &self,
        d: &DiskSpec,
        parent: Option<&Manifest>,
    ) -> Result<(DiskPlan, ParentIndex)> {
        let cs = self.config().chunk_size;
        let block_len = self.config().index_block_len;
        let chunks = chunk_count(d.size, cs);
        let pd = parent.and_then(|p| p.disks.iter().find(|x| x.target == d.target));
        let usable = pd.filter(|x| x.chunk_size == cs && x.index_block_len == block_len);
        let parent_index = match (usable, parent) {
            (Some(x), Some(p)) => self.parent_index(&p.id, x)?,
            _ => ParentIndex::none(block_len),
        };
        Ok((
            DiskPlan {
                spec: d.clone(),
                chunks,
                parent_backup: usable.and(parent.map(|p| p.id.clone())),
            },
            parent_index,
        ))
    }

    /// Disk `x` of backup `id` as a parent: its index blocks read when first needed.
    fn parent_index(&self, id: &BackupId, x: &DiskManifest) -> Result<ParentIndex> {
        let chunks = chunk_count(x.size, x.chunk_size);
        let per = x.index_block_len;
        if block_count(chunks, per) != x.index_blocks.len() as u64 {
            return Err(Error::corrupt(format!(
                "backup {id} disk {}: {} index blocks for {chunks} chunks",
                x.target,
                x.index_blocks.len()
            )));
        }
        let repo = self.clone();
        let what = format!("backup {id} disk {}", x.target);
        let load: index::Loader = Box::new(move |b, block_id| {
            repo.load_index_block(block_id, ids_in_block(b, chunks, per))
                .map_err(|e| e.context(format!("index block {b} of parent {what}")))
        });
        Ok(ParentIndex::new(x.index_blocks.clone(), chunks, per, load))
    }
}

fn validate_spec(spec: &BackupSpec) -> Result<()> {
    if spec.disks.is_empty() {
        return Err(Error::invalid(format!(
            "backup of vm {} has no disks",
            spec.vm.name
        )));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        if d.target.is_empty() || spec.disks[..i].iter().any(|x| x.target == d.target) {
            return Err(Error::invalid(format!(
                "disk target {:?} empty or repeated",
                d.target
            )));
        }
        if d.size == 0 || d.size > 1 << 50 {
            return Err(Error::invalid(format!(
                "disk {} size {} out of range",
                d.target, d.size
            )));
        }
    }
    Ok(())
}

impl BackupWriter {
    /// The id this backup will have.
    pub fn id(&self) -> &BackupId {
        &self.id
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.repo.config().chunk_size
    }

    /// Number of chunk positions of disk `disk`.
    pub fn chunk_count(&self, disk: usize) -> Result<u64> {
        Ok(self.plan(disk)?.chunks)
    }

    fn plan(&self, disk: usize) -> Result<&DiskPlan> {
        self.plans
            .get(disk)
            .ok_or_else(|| Error::invalid(format!("backup {} has no disk #{disk}", self.id)))
    }

    fn pipe(&self) -> Result<&Pipeline> {
        let p = self
            .pipeline
            .as_ref()
            .ok_or_else(|| Error::invalid("backup writer finished"))?;
        match p.failure() {
            Some(first) => Err(
                Error::new(first.kind(), format!("backup {} failed", self.id)).with_source(first),
            ),
            None => Ok(p),
        }
    }

    /// Expected byte length of chunk `index` of `disk` (the last one may be short).
    fn chunk_len(&self, disk: usize, index: u64) -> Result<usize> {
        let p = self.plan(disk)?;
        if index >= p.chunks {
            return Err(Error::invalid(format!(
                "chunk {index} past the end of disk {} ({} chunks)",
                p.spec.target, p.chunks
            )));
        }
        let cs = self.chunk_size() as u64;
        Ok((p.spec.size - index * cs).min(cs) as usize)
    }

    /// Store the chunk at position `index` (copies `data`). Each position may be put at
    /// most once per backup: chunks are hashed on several threads, so of two puts of one
    /// position either may win.
    pub fn put_chunk(&self, disk: usize, index: u64, data: &[u8]) -> Result<()> {
        self.put_chunks_owned(disk, index, data.to_vec())
    }

    /// Store consecutive chunks from `start` (copies `data` once).
    pub fn put_chunks(&self, disk: usize, start: u64, data: &[u8]) -> Result<()> {
        self.put_chunks_owned(disk, start, data.to_vec())
    }

    /// Store consecutive chunks from `start`, taking the buffer without copying. Its length
    /// must cover whole chunks (the disk's last chunk may be short).
    pub fn put_chunks_owned(&self, disk: usize, start: u64, data: Vec<u8>) -> Result<()> {
        let cuts = self.batch_cuts(disk, start, data.len())?;
        let buf = Arc::new(data);
        let chunk_size = self.chunk_size() as usize;
        let mut off = 0usize;
        for (index, end) in cuts {
            let job = Job {
                disk,
                index,
                buf: buf.clone(),
                start: off,
                end,
                chunk_size,
            };
            self.pipe()?.send_job(job)?;
            off = end;
        }
        Ok(())
    }

    /// Check that `len` bytes hold whole chunks from `start` and cut them in batches:
    /// `(first position, end offset)` of each.
    fn batch_cuts(&self, disk: usize, start: u64, len: usize) -> Result<Vec<(u64, usize)>> {
        let (mut off, mut index) = (0usize, start);
        let mut cuts = Vec::new();
        let mut first = start;
        while off < len {
            let n = self.chunk_len(disk, index)?;
            if len - off < n {
                return Err(Error::invalid(format!(
                    "buffer for chunk {index} of disk #{disk} holds {} bytes, need {n}",
                    len - off
                )));
            }
            off += n;
            index += 1;
            if index - first == pipeline::BATCH_CHUNKS as u64 || off == len {
                cuts.push((first, off));
                first = index;
            }
        }
        Ok(cuts)
    }

    /// Record that the chunks in `range` are all zeros (nothing is stored).
    pub fn put_zeros(&self, disk: usize, range: Range<u64>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        self.chunk_len(disk, range.start)?;
        self.chunk_len(disk, range.end - 1)?;
        let mut items = Vec::new();
        for index in range {
            items.push(Item {
                index,
                digest: ChunkDigest::ZERO,
                new_blob: None,
            });
            if items.len() == 4096 {
                let batch = std::mem::take(&mut items);
                self.pipe()?
                    .send_outcome(Outcome::Set { disk, items: batch })?;
            }
        }
        if !items.is_empty() {
            self.pipe()?.send_outcome(Outcome::Set { disk, items })?;
        }
        Ok(())
    }

    /// Keep the parent's chunks in `range` (the default for unwritten positions; this only
    /// checks that a parent exists and the range is valid).
    pub fn keep_parent(&self, disk: usize, range: Range<u64>) -> Result<()> {
        let p = self.plan(disk)?;
        if p.parent_backup.is_none() {
            return Err(Error::invalid(format!(
                "disk {} has no parent backup",
                p.spec.target
            )));
        }
        if range.end > p.chunks {
            return Err(Error::invalid(format!(
                "range past the end of disk {}",
                p.spec.target
            )));
        }
        Ok(())
    }

    /// Finish: seal data, write changed index blocks, write the manifest (commit point),
    /// record in the catalog. Returns the manifest.
    pub fn commit(mut self, info: CommitInfo) -> Result<Manifest> {
        let pipe = self
            .pipeline
            .take()
            .ok_or_else(|| Error::invalid("backup writer finished"))?;
        let mut st = pipe.finish()?;
        if let Some(e) = st.error.take() {
            return Err(Error::new(e.kind(), format!("backup {}", self.id)).with_source(e));
        }
        if st.blocks.len() != self.plans.len() {
            return Err(Error::new(
                crate::ErrorKind::Io,
                format!("backup {}: index blocks were not finished", self.id),
            ));
        }
        Pipeline::seal_rest(&self.repo, std::mem::take(&mut st.pack))?;
        let disks = self
            .plans
            .iter()
            .zip(std::mem::take(&mut st.blocks))
            .map(|(plan, blocks)| self.disk_manifest(plan, blocks))
            .collect();
        let mut m = self.manifest(info, disks, st.stats);
        let mut bytes = m.encode()?;
        m.stats.metadata_bytes = st.meta + bytes.len() as u64;
        bytes = m.encode()?;
        self.repo.backend().put(&Manifest::key(&m.id), &bytes)?;
        if let Err(e) = self.repo.catalog().insert_backup(&m, false) {
            tracing::warn!(backup = %m.id, error = %Chain(&e), "committed backup not recorded; next open will");
        }
        tracing::info!(backup = %m.id, vm = %m.vm.name, new = m.stats.chunks_new, "backup committed");
        Ok(m)
    }

    fn manifest(&self, info: CommitInfo, disks: Vec<DiskManifest>, stats: BackupStats) -> Manifest {
        Manifest {
            id: self.id.clone(),
            vm: self.spec.vm.clone(),
            domain_xml: info.domain_xml,
            started: self.spec.started,
            finished: info.finished,
            mode: info.mode,
            consistency: info.consistency,
            vm_state: info.vm_state,
            disks,
            stats,
        }
    }

    fn disk_manifest(&self, plan: &DiskPlan, index_blocks: Vec<ChunkDigest>) -> DiskManifest {
        DiskManifest {
            target: plan.spec.target.clone(),
            size: plan.spec.size,
            chunk_size: self.chunk_size(),
            index_block_len: self.repo.config().index_block_len,
            index_blocks,
            checkpoint: plan.spec.checkpoint.clone(),
            parent_backup: plan.parent_backup.clone(),
            full_read: plan.spec.full_read.clone(),
        }
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.pipeline.take().is_some() {
            tracing::warn!(backup = %self.id, "backup writer dropped without commit: aborted");
        }
    }
}
