//! Reading a backup disk: byte ranges, per-chunk digests and block status.
//!
//! Owns the disk reader and its small chunk cache. Corruption is an error naming the chunk,
//! backup, disk and offset; zero chunks read as zeros without touching storage.

use crate::error::{Error, Result};
use crate::format::index;
use crate::format::manifest::DiskManifest;
use crate::ids::{BackupId, ChunkDigest};
use crate::repo::Repository;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A read-only view of one disk of one backup. `Sync`: share it between threads.
pub struct DiskReader {
    repo: Repository,
    backup: BackupId,
    disk: DiskManifest,
    ids: Vec<ChunkDigest>,
    cache: Mutex<ChunkCache>,
}

impl std::fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskReader({} {})", self.backup, self.disk.target)
    }
}

struct ChunkCache {
    cap: usize,
    tick: u64,
    map: HashMap<ChunkDigest, (Arc<Vec<u8>>, u64)>,
}

impl ChunkCache {
    fn get(&mut self, d: &ChunkDigest) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(d).map(|(v, at)| {
            *at = t;
            v.clone()
        })
    }

    fn put(&mut self, d: ChunkDigest, v: Arc<Vec<u8>>) {
        if self.cap == 0 {
            return;
        }
        if self.map.len() >= self.cap {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        self.tick += 1;
        self.map.insert(d, (v, self.tick));
    }
}

impl Repository {
    /// Open disk `target` of backup `backup` for reading (loads its index).
    pub fn open_disk(&self, backup: &BackupId, target: &str) -> Result<DiskReader> {
        let m = self.manifest(backup)?;
        let disk = m
            .disks
            .into_iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::not_found(format!("backup {backup} has no disk {target}")))?;
        let ids = self
            .load_index(&disk)
            .map_err(|e| e.context(format!("index of backup {backup} disk {target}")))?;
        Ok(DiskReader {
            repo: self.clone(),
            backup: backup.clone(),
            disk,
            ids,
            cache: Mutex::new(ChunkCache {
                cap: self.inner.opts.cache_chunks,
                tick: 0,
                map: HashMap::new(),
            }),
        })
    }
}

impl DiskReader {
    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.disk.chunk_size
    }

    /// Number of chunk positions.
    pub fn chunk_count(&self) -> u64 {
        self.ids.len() as u64
    }

    /// The disk's manifest entry.
    pub fn manifest(&self) -> &DiskManifest {
        &self.disk
    }

    /// Digest at position `i` ([`ChunkDigest::ZERO`] for a zero chunk).
    pub fn digest(&self, i: u64) -> Result<ChunkDigest> {
        self.ids.get(i as usize).copied().ok_or_else(|| {
            Error::invalid(format!(
                "chunk {i} past the end of disk {}",
                self.disk.target
            ))
        })
    }

    /// Whether position `i` is the zero chunk (block status without reading data).
    pub fn is_zero(&self, i: u64) -> Result<bool> {
        Ok(self.digest(i)?.is_zero())
    }

    /// All digests in order (for comparing two backups' indexes).
    pub fn digests(&self) -> &[ChunkDigest] {
        &self.ids
    }

    /// The plaintext of chunk `i` (zeros for the zero chunk).
    pub fn read_chunk(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        let d = self.digest(i)?;
        let cs = self.disk.chunk_size as u64;
        let len = (self.disk.size - i * cs).min(cs) as usize;
        if d.is_zero() {
            return Ok(Arc::new(vec![0u8; len]));
        }
        if let Some(v) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&d) {
            return Ok(v);
        }
        let ctx = |e: Error| {
            e.context(format!(
                "backup {} disk {} offset {}",
                self.backup,
                self.disk.target,
                i * cs
            ))
        };
        let (_, data) = self.repo.read_blob(&d).map_err(ctx)?;
        if data.len() != len {
            return Err(ctx(Error::corrupt(format!(
                "chunk {d} has length {}",
                data.len()
            ))));
        }
        let v = Arc::new(data);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(d, v.clone());
        Ok(v)
    }

    /// Fill `buf` with the bytes at `offset`; the range must lie inside the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.disk.size) {
            return Err(Error::invalid(format!(
                "read of {} bytes at {offset} past the end of disk {} ({} bytes)",
                buf.len(),
                self.disk.target,
                self.disk.size
            )));
        }
        let cs = self.disk.chunk_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (i, within) = (pos / cs, (pos % cs) as usize);
            let n = (cs as usize - within).min(buf.len() - done);
            if self.is_zero(i)? {
                buf[done..done + n].fill(0);
            } else {
                let c = self.read_chunk(i)?;
                buf[done..done + n].copy_from_slice(&c[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Index of the chunk holding byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset / self.disk.chunk_size as u64
    }

    /// Number of index blocks.
    pub fn index_blocks(&self) -> u64 {
        index::block_count(self.chunk_count(), self.disk.index_block_len)
    }
}
