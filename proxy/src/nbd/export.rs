//! What the NBD server serves: the [`BlockExport`] trait, and [`MemoryExport`], a sparse
//! in-memory export for tests and small scratch disks.
//!
//! Owns the contract between the server and a data source (a repository restore point, a
//! copy-on-write overlay, memory). It does not own the protocol: the server validates ranges,
//! permissions and flags before calling an export, so implementations see only requests inside
//! `[0, size)` and writes only when [`BlockExport::is_writable`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{PoisonError, RwLock};

use bytes::{Bytes, BytesMut};

use super::proto::{errno, state, BlockSizes};
use super::BASE_ALLOCATION;

/// A boxed, sendable future (the trait is object safe so one server can hold exports of
/// different types).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error an export returns for one request; the server sends it to the client as an NBD
/// error (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    /// NBD error number (`proto::errno`).
    pub errno: u32,
    /// Lowercase message naming what failed; sent to clients that use structured replies.
    pub message: String,
}

impl ExportError {
    /// `EIO`: the data could not be read or written (e.g. a corrupt or missing chunk).
    pub fn io(message: impl Into<String>) -> Self {
        ExportError {
            errno: errno::EIO,
            message: message.into(),
        }
    }
    /// `ENOSPC`: no room for the write.
    pub fn no_space(message: impl Into<String>) -> Self {
        ExportError {
            errno: errno::ENOSPC,
            message: message.into(),
        }
    }
    /// `ENOTSUP`: the export cannot do this.
    pub fn not_supported(message: impl Into<String>) -> Self {
        ExportError {
            errno: errno::ENOTSUP,
            message: message.into(),
        }
    }
    /// `EPERM`: not allowed.
    pub fn permission(message: impl Into<String>) -> Self {
        ExportError {
            errno: errno::EPERM,
            message: message.into(),
        }
    }
}

/// Result of an export operation.
pub type ExportResult<T> = Result<T, ExportError>;

/// One part of a read: bytes, or a run of zeroes sent as a hole (`NBD_REPLY_TYPE_OFFSET_HOLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPart {
    /// Data.
    Data(Bytes),
    /// This many zero bytes.
    Zero(u32),
}

impl ReadPart {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            ReadPart::Data(b) => b.len() as u64,
            ReadPart::Zero(n) => *n as u64,
        }
    }

    /// Whether the part is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A run of bytes with one status in one meta context (for `base:allocation`: `HOLE` and/or
/// `ZERO` bits from `proto::state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub length: u64,
    /// Status flags.
    pub flags: u32,
}

/// A block device the NBD server can serve.
///
/// The server calls these methods from many tasks at once; every range passed lies inside
/// `[0, size())`. Write methods are called only when [`BlockExport::is_writable`].
pub trait BlockExport: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Human-readable description for `NBD_OPT_LIST`.
    fn description(&self) -> String {
        String::new()
    }

    /// Whether clients may write.
    fn is_writable(&self) -> bool {
        false
    }

    /// Whether several connections may use this export at once with consistent results (so
    /// the server advertises `NBD_FLAG_CAN_MULTI_CONN`).
    fn multi_conn_safe(&self) -> bool {
        false
    }

    /// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 * 1024 * 1024,
        }
    }

    /// Names of the meta contexts this export answers block status for, in order: the server
    /// passes the index in this list to [`BlockExport::block_status`]. The default is
    /// `base:allocation` alone. A restore export may add e.g. `sluice:changed-since:BACKUP`.
    fn meta_contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.to_string()]
    }

    /// Read `length` bytes at `offset`. The parts must add up to exactly `length` bytes.
    fn read(&self, offset: u64, length: u32) -> BoxFuture<'_, ExportResult<Vec<ReadPart>>>;

    /// Status of `[offset, offset+length)` in context number `context` of
    /// [`BlockExport::meta_contexts`]. May describe less than `length` (at least one byte);
    /// anything past `length` is cut off. The default says "all data" for every context.
    fn block_status(
        &self,
        context: usize,
        offset: u64,
        length: u32,
    ) -> BoxFuture<'_, ExportResult<Vec<StatusExtent>>> {
        let _ = (context, offset);
        Box::pin(async move {
            Ok(vec![StatusExtent {
                length: length as u64,
                flags: 0,
            }])
        })
    }

    /// Write `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, ExportResult<()>> {
        let _ = (offset, data, fua);
        Box::pin(async { Err(ExportError::permission("export is read-only")) })
    }

    /// Make `[offset, offset+length)` read as zeroes; `may_trim` allows deallocating.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, ExportResult<()>> {
        let _ = (offset, length, may_trim, fua);
        Box::pin(async { Err(ExportError::permission("export is read-only")) })
    }

    /// Discard `[offset, offset+length)`; its contents become unspecified.
    fn trim(&self, offset: u64, length: u32) -> BoxFuture<'_, ExportResult<()>> {
        let _ = (offset, length);
        Box::pin(async { Ok(()) })
    }

    /// Make every completed write durable.
    fn flush(&self) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Block granularity of [`MemoryExport`]: blocks never written, or zeroed whole, are holes.
pub const MEMORY_BLOCK: u64 = 64 * 1024;

/// A sparse in-memory export: 64 KiB blocks allocated on first write; unallocated blocks
/// read as zeroes and report `HOLE | ZERO` in `base:allocation`.
#[derive(Debug)]
pub struct MemoryExport {
    size: u64,
    writable: bool,
    blocks: RwLock<HashMap<u64, Box<[u8]>>>,
}

impl MemoryExport {
    /// An all-hole export of `size` bytes.
    pub fn new(size: u64, writable: bool) -> Self {
        MemoryExport {
            size,
            writable,
            blocks: RwLock::new(HashMap::new()),
        }
    }

    /// An export holding `data`; all-zero blocks stay holes.
    pub fn from_bytes(data: &[u8], writable: bool) -> Self {
        let export = Self::new(data.len() as u64, writable);
        export.store(0, data);
        export
    }

    /// Every byte, holes as zeroes.
    pub fn contents(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        for (&index, block) in blocks.iter() {
            let start = (index * MEMORY_BLOCK) as usize;
            let end = (start + block.len()).min(out.len());
            out[start..end].copy_from_slice(&block[..end - start]);
        }
        out
    }

    fn block_len(&self, index: u64) -> usize {
        (self.size - index * MEMORY_BLOCK).min(MEMORY_BLOCK) as usize
    }

    /// Copy `data` in at `offset`, allocating blocks (all-zero writes into holes stay holes).
    fn store(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        let mut pos = offset;
        for piece in split_blocks(offset, data.len() as u64) {
            let (index, within, len) = piece;
            let src = &data[(pos - offset) as usize..(pos - offset + len) as usize];
            pos += len;
            if !blocks.contains_key(&index) && src.iter().all(|&b| b == 0) {
                continue;
            }
            let block_len = self.block_len(index);
            let block = blocks
                .entry(index)
                .or_insert_with(|| vec![0u8; block_len].into_boxed_slice());
            block[within as usize..(within + len) as usize].copy_from_slice(src);
        }
    }

    fn zero(&self, offset: u64, length: u64) {
        let mut blocks = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        for (index, within, len) in split_blocks(offset, length) {
            if len as usize == self.block_len(index) {
                blocks.remove(&index);
            } else if let Some(block) = blocks.get_mut(&index) {
                block[within as usize..(within + len) as usize].fill(0);
            }
        }
    }

    fn read_parts(&self, offset: u64, length: u32) -> Vec<ReadPart> {
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        let mut parts: Vec<ReadPart> = Vec::new();
        let mut data = BytesMut::new();
        for (index, within, len) in split_blocks(offset, length as u64) {
            match blocks.get(&index) {
                Some(block) => {
                    data.extend_from_slice(&block[within as usize..(within + len) as usize])
                }
                None => {
                    if !data.is_empty() {
                        parts.push(ReadPart::Data(data.split().freeze()));
                    }
                    match parts.last_mut() {
                        Some(ReadPart::Zero(n)) => *n += len as u32,
                        _ => parts.push(ReadPart::Zero(len as u32)),
                    }
                }
            }
        }
        if !data.is_empty() {
            parts.push(ReadPart::Data(data.freeze()));
        }
        parts
    }

    fn allocation(&self, offset: u64, length: u32) -> Vec<StatusExtent> {
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<StatusExtent> = Vec::new();
        for (index, _, len) in split_blocks(offset, length as u64) {
            let flags = if blocks.contains_key(&index) {
                0
            } else {
                state::HOLE | state::ZERO
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += len,
                _ => out.push(StatusExtent { length: len, flags }),
            }
        }
        out
    }
}

/// Split `[offset, offset+length)` at block boundaries: (block index, offset within, length).
fn split_blocks(offset: u64, length: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = offset + length;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / MEMORY_BLOCK;
        let within = pos % MEMORY_BLOCK;
        let len = (MEMORY_BLOCK - within).min(end - pos);
        pos += len;
        Some((index, within, len))
    })
}

impl BlockExport for MemoryExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn description(&self) -> String {
        "sparse in-memory export".to_string()
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn multi_conn_safe(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, length: u32) -> BoxFuture<'_, ExportResult<Vec<ReadPart>>> {
        Box::pin(async move { Ok(self.read_parts(offset, length)) })
    }

    fn block_status(
        &self,
        _context: usize,
        offset: u64,
        length: u32,
    ) -> BoxFuture<'_, ExportResult<Vec<StatusExtent>>> {
        Box::pin(async move { Ok(self.allocation(offset, length)) })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move {
            self.store(offset, &data);
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _may_trim: bool,
        _fua: bool,
    ) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move {
            self.zero(offset, length as u64);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, length: u32) -> BoxFuture<'_, ExportResult<()>> {
        Box::pin(async move {
            self.zero(offset, length as u64);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_export_keeps_zero_blocks_as_holes() {
        let mut data = vec![0u8; 4 * MEMORY_BLOCK as usize];
        data[MEMORY_BLOCK as usize + 5] = 7;
        let e = MemoryExport::from_bytes(&data, true);
        let st = e.block_status(0, 0, data.len() as u32).await.unwrap();
        let holes = state::HOLE | state::ZERO;
        assert_eq!(
            st,
            vec![
                StatusExtent {
                    length: MEMORY_BLOCK,
                    flags: holes
                },
                StatusExtent {
                    length: MEMORY_BLOCK,
                    flags: 0
                },
                StatusExtent {
                    length: 2 * MEMORY_BLOCK,
                    flags: holes
                },
            ]
        );
        let parts = e.read(MEMORY_BLOCK - 1, 3).await.unwrap();
        assert_eq!(
            parts,
            vec![
                ReadPart::Zero(1),
                ReadPart::Data(Bytes::from_static(&[0, 0]))
            ]
        );
        e.write_zeroes(MEMORY_BLOCK, MEMORY_BLOCK as u32, true, false)
            .await
            .unwrap();
        assert_eq!(e.contents(), vec![0u8; data.len()]);
    }
}
