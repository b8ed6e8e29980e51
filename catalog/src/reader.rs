//! Reading a backup disk: byte ranges, per-chunk digests and block status.
//!
//! Owns the disk reader, its small caches (decoded index blocks and decompressed chunks) and
//! batched chunk reads. Memory does not grow with the disk: index blocks are loaded on
//! demand and kept in a bounded cache instead of the whole chunk-id list (32 bytes per chunk,
//! 512 MiB for a 1 TiB disk at 64 KiB). A range read fetches the chunks it needs in batches
//! through [`Backend::get_ranges`](crate::backend::Backend::get_ranges) (for the filesystem
//! backend: `pread`, or io_uring with `FsOptions::io_uring`). Corruption is an error naming the
//! chunk, backup, disk and offset; zero chunks read as zeros without touching storage.

use crate::backend::RangeRequest;
use crate::error::{Error, ErrorKind, Result};
use crate::format::blob;
use crate::format::index;
use crate::format::manifest::DiskManifest;
use crate::ids::{BackupId, ChunkDigest};
use crate::lru::Lru;
use crate::repo::Repository;
use std::sync::{Arc, Mutex};

/// Decoded index blocks kept per reader (1024 ids = 32 KiB each with the default config).
const INDEX_BLOCK_CACHE: usize = 16;

/// Chunks fetched from storage per batch of a range read.
pub(crate) const READ_BATCH: usize = 32;

/// A read-only view of one disk of one backup. `Sync`: share it between threads.
pub struct DiskReader {
    repo: Repository,
    backup: BackupId,
    disk: DiskManifest,
    chunks: u64,
    blocks: Mutex<Lru<u64, Arc<Vec<ChunkDigest>>>>,
    cache: Mutex<Lru<ChunkDigest, Arc<Vec<u8>>>>,
}

impl std::fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskReader({} {})", self.backup, self.disk.target)
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repository {
    /// Open disk `target` of backup `backup` for reading. Index blocks are read on demand;
    /// a missing or damaged block fails the reads it covers.
    pub fn open_disk(&self, backup: &BackupId, target: &str) -> Result<DiskReader> {
        let m = self.manifest(backup)?;
        let disk = m
            .disks
            .into_iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::not_found(format!("backup {backup} has no disk {target}")))?;
        let chunks = index::chunk_count(disk.size, disk.chunk_size);
        if index::block_count(chunks, disk.index_block_len) != disk.index_blocks.len() as u64 {
            return Err(Error::corrupt(format!(
                "backup {backup} disk {target}: {} index blocks for {chunks} chunks",
                disk.index_blocks.len()
            )));
        }
        Ok(DiskReader {
            repo: self.clone(),
            backup: backup.clone(),
            disk,
            chunks,
            blocks: Mutex::new(Lru::new(INDEX_BLOCK_CACHE)),
            cache: Mutex::new(Lru::new(self.inner.opts.cache_chunks)),
        })
    }

    /// Read and decode many blobs in one batch of storage reads; results in `digests`'
    /// order, each checked like [`Repository::read_blob`].
    pub(crate) fn read_blobs(&self, digests: &[ChunkDigest]) -> Vec<Result<Vec<u8>>> {
        let mut out: Vec<Option<Result<Vec<u8>>>> = Vec::with_capacity(digests.len());
        let mut reqs = Vec::new();
        let mut slots = Vec::new();
        for d in digests {
            match self.catalog().lookup(d) {
                Ok(Some(loc)) => {
                    reqs.push(RangeRequest {
                        key: loc.pack.key(),
                        offset: loc.offset,
                        len: loc.length as usize,
                    });
                    slots.push(out.len());
                    out.push(None);
                }
                Ok(None) => out.push(Some(Err(Error::not_found(format!(
                    "chunk {d} is not in the repository (lost, or its copy failed verify: back the vm up again to store it anew)"
                ))))),
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let got = self.inner.backend.get_ranges(&reqs);
        for (slot, r) in slots.into_iter().zip(got) {
            let d = digests[slot];
            out[slot] = Some(match r {
                Ok(bytes) => blob::decode(&bytes, d).map(|(_, v)| v),
                // A pack moved by a concurrent repack: look it up again.
                Err(e) if e.kind() == ErrorKind::NotFound => self.read_blob(&d).map(|(_, v)| v),
                Err(e) => Err(e.context(format!("chunk {d}"))),
            });
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::invalid("batch read lost a result"))))
            .collect()
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
        self.chunks
    }

    /// The disk's manifest entry.
    pub fn manifest(&self) -> &DiskManifest {
        &self.disk
    }

    /// The decoded index block `b` (from the cache or storage).
    fn block(&self, b: u64) -> Result<Arc<Vec<ChunkDigest>>> {
        if let Some(v) = locked(&self.blocks).get(&b) {
            return Ok(v);
        }
        let id = self.disk.index_blocks[b as usize];
        let n = index::ids_in_block(b, self.chunks, self.disk.index_block_len);
        let ids = self.repo.load_index_block(&id, n).map_err(|e| {
            e.context(format!(
                "index block {b} of backup {} disk {}",
                self.backup, self.disk.target
            ))
        })?;
        let v = Arc::new(ids);
        locked(&self.blocks).put(b, v.clone());
        Ok(v)
    }

    /// Digest at position `i` ([`ChunkDigest::ZERO`] for a zero chunk).
    pub fn digest(&self, i: u64) -> Result<ChunkDigest> {
        if i >= self.chunks {
            return Err(Error::invalid(format!(
                "chunk {i} past the end of disk {}",
                self.disk.target
            )));
        }
        let per = self.disk.index_block_len as u64;
        let block = self.block(i / per)?;
        block
            .get((i % per) as usize)
            .copied()
            .ok_or_else(|| Error::corrupt(format!("index block of chunk {i} is short")))
    }

    /// Whether position `i` is the zero chunk (block status without reading data).
    pub fn is_zero(&self, i: u64) -> Result<bool> {
        Ok(self.digest(i)?.is_zero())
    }

    /// All digests in order (for comparing two backups' indexes). Reads the whole index:
    /// 32 bytes per chunk position.
    pub fn digests(&self) -> Result<Vec<ChunkDigest>> {
        self.repo.load_index(&self.disk).map_err(|e| {
            e.context(format!(
                "index of backup {} disk {}",
                self.backup, self.disk.target
            ))
        })
    }

    /// Call `f` with every position whose digest differs from `older`'s at that position
    /// (positions past `older`'s end count as different), in order. Index blocks with the
    /// same id in both are skipped unread, so an incremental's diff reads only the blocks it
    /// rewrote; memory holds two blocks at a time.
    pub fn for_each_difference(&self, older: &DiskReader, mut f: impl FnMut(u64)) -> Result<()> {
        let per = self.disk.index_block_len as u64;
        let same_shape = per == older.disk.index_block_len as u64;
        for b in 0..self.index_blocks() {
            let (lo, hi) = (b * per, ((b + 1) * per).min(self.chunks));
            let full_in_older = hi <= older.chunks;
            if same_shape
                && full_in_older
                && older.disk.index_blocks.get(b as usize)
                    == Some(&self.disk.index_blocks[b as usize])
                && index::ids_in_block(b, older.chunks, per as u32) == (hi - lo) as usize
            {
                continue;
            }
            let mine = self.block(b)?;
            for (k, d) in mine.iter().enumerate() {
                let i = lo + k as u64;
                if i >= older.chunks || older.digest(i)? != *d {
                    f(i);
                }
            }
        }
        Ok(())
    }

    fn chunk_len(&self, i: u64) -> usize {
        let cs = self.disk.chunk_size as u64;
        (self.disk.size - i * cs).min(cs) as usize
    }

    fn ctx(&self, i: u64) -> impl Fn(Error) -> Error + '_ {
        move |e: Error| {
            e.context(format!(
                "backup {} disk {} offset {}",
                self.backup,
                self.disk.target,
                i * self.disk.chunk_size as u64
            ))
        }
    }

    /// Check a fetched chunk's length and cache it.
    fn accept(&self, i: u64, d: ChunkDigest, r: Result<Vec<u8>>) -> Result<Arc<Vec<u8>>> {
        let data = r.map_err(self.ctx(i))?;
        if data.len() != self.chunk_len(i) {
            let e = Error::corrupt(format!("chunk {d} has length {}", data.len()));
            return Err(self.ctx(i)(e));
        }
        let v = Arc::new(data);
        locked(&self.cache).put(d, v.clone());
        Ok(v)
    }

    /// The plaintext of chunk `i` (zeros for the zero chunk).
    pub fn read_chunk(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        let d = self.digest(i)?;
        if d.is_zero() {
            return Ok(Arc::new(vec![0u8; self.chunk_len(i)]));
        }
        if let Some(v) = locked(&self.cache).get(&d) {
            return Ok(v);
        }
        let r = self.repo.read_blob(&d).map(|(_, v)| v);
        self.accept(i, d, r)
    }

    /// The plaintext of chunks `first..first + n` (at most [`READ_BATCH`] storage reads
    /// in flight per call); zeros for zero chunks.
    pub fn read_chunks(&self, first: u64, n: u64) -> Result<Vec<Arc<Vec<u8>>>> {
        let end = first.checked_add(n).filter(|&e| e <= self.chunks);
        let end = end.ok_or_else(|| {
            Error::invalid(format!(
                "chunks {first}+{n} past the end of disk {}",
                self.disk.target
            ))
        })?;
        let mut out = Vec::with_capacity(n.min(READ_BATCH as u64) as usize);
        let mut at = first;
        while at < end {
            let stop = (at + READ_BATCH as u64).min(end);
            out.extend(self.read_batch(at, stop)?);
            at = stop;
        }
        Ok(out)
    }

    fn read_batch(&self, first: u64, end: u64) -> Result<Vec<Arc<Vec<u8>>>> {
        let mut out: Vec<Option<Arc<Vec<u8>>>> = Vec::new();
        let mut want: Vec<(u64, ChunkDigest)> = Vec::new();
        for i in first..end {
            let d = self.digest(i)?;
            let hit = if d.is_zero() {
                Some(Arc::new(vec![0u8; self.chunk_len(i)]))
            } else {
                locked(&self.cache).get(&d)
            };
            if hit.is_none() {
                want.push((i, d));
            }
            out.push(hit);
        }
        let digests: Vec<ChunkDigest> = want.iter().map(|(_, d)| *d).collect();
        for ((i, d), r) in want.into_iter().zip(self.repo.read_blobs(&digests)) {
            out[(i - first) as usize] = Some(self.accept(i, d, r)?);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Fill `buf` with the bytes at `offset`; the range must lie inside the disk. Chunks
    /// are fetched in batches.
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
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.disk.chunk_size as u64;
        let (first, last) = (offset / cs, (offset + buf.len() as u64 - 1) / cs);
        let mut at = first;
        while at <= last {
            let stop = (at + READ_BATCH as u64).min(last + 1);
            for (k, c) in self.read_batch(at, stop)?.into_iter().enumerate() {
                let start = (at + k as u64) * cs;
                copy_overlap(start, &c, offset, buf);
            }
            at = stop;
        }
        Ok(())
    }

    /// Number of index blocks.
    pub fn index_blocks(&self) -> u64 {
        index::block_count(self.chunk_count(), self.disk.index_block_len)
    }
}

/// Copy the part of `chunk` (starting at disk byte `start`) that overlaps `buf` (starting
/// at disk byte `offset`).
fn copy_overlap(start: u64, chunk: &[u8], offset: u64, buf: &mut [u8]) {
    let lo = start.max(offset);
    let hi = (start + chunk.len() as u64).min(offset + buf.len() as u64);
    if lo < hi {
        let (a, b) = ((lo - start) as usize, (lo - offset) as usize);
        let n = (hi - lo) as usize;
        buf[b..b + n].copy_from_slice(&chunk[a..a + n]);
    }
}
