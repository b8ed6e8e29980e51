//! Pack files: a 16-byte header, blobs back to back, a trailer of entries and a footer.
//!
//! Owns building packs in memory and parsing their trailers (so chunk locations rebuild
//! from packs alone). Does not own storage or the catalog.

use super::{arr32, le_u32, le_u64};
use crate::error::{Error, Result};
use crate::format::blob::BlobKind;
use crate::ids::{ChunkDigest, PackId};

/// Pack header magic.
pub const PACK_MAGIC: [u8; 4] = *b"SLPK";
/// Footer magic (last 8 bytes of every pack).
pub const PACK_END_MAGIC: [u8; 8] = *b"SLPKEND\0";
/// Pack format version.
pub const PACK_VERSION: u16 = 1;
/// Header length.
pub const PACK_HEADER_LEN: usize = 16;
/// One trailer entry.
pub const PACK_ENTRY_LEN: usize = 48;
/// Footer length.
pub const PACK_FOOTER_LEN: usize = 56;

const _: () = assert!(PACK_ENTRY_LEN == 32 + 8 + 4 + 1 + 3);
const _: () = assert!(PACK_FOOTER_LEN == 8 + 8 + 32 + 8);

/// Where one blob sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The blob's id.
    pub digest: ChunkDigest,
    /// Byte offset of the blob (header included) in the pack.
    pub offset: u64,
    /// Blob length (header included).
    pub length: u32,
    /// Chunk or index block.
    pub kind: BlobKind,
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    /// An empty pack (header only).
    pub fn new() -> Self {
        let mut buf = Vec::new();
        buf.extend_from_slice(&PACK_MAGIC);
        buf.extend_from_slice(&PACK_VERSION.to_le_bytes());
        buf.extend_from_slice(&[0u8; 10]);
        PackBuilder {
            buf,
            entries: Vec::new(),
        }
    }

    /// An empty pack in `buf`, a finished pack's buffer handed back (its pages are already
    /// mapped, so filling it again costs no page faults).
    pub fn reuse(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&Self::new().buf);
        PackBuilder {
            buf,
            entries: Vec::new(),
        }
    }

    /// An empty pack whose buffer is reserved for `capacity` bytes (no regrowth copies).
    pub fn with_capacity(capacity: usize) -> Self {
        let mut b = Self::new();
        b.buf.reserve(capacity.saturating_sub(b.buf.len()));
        b
    }

    /// Append an encoded blob.
    pub fn add(&mut self, digest: ChunkDigest, kind: BlobKind, blob: &[u8]) {
        self.entries.push(PackEntry {
            digest,
            offset: self.buf.len() as u64,
            length: blob.len() as u32,
            kind,
        });
        self.buf.extend_from_slice(blob);
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append trailer and footer; the pack id is blake3 of the whole file.
    pub fn finish(mut self) -> (PackId, Vec<u8>, Vec<PackEntry>) {
        let entries_offset = self.buf.len() as u64;
        for e in &self.entries {
            self.buf.extend_from_slice(&e.digest.0);
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.length.to_le_bytes());
            self.buf.extend_from_slice(&[e.kind as u8, 0, 0, 0]);
        }
        let count = self.entries.len() as u64;
        let sum = trailer_checksum(&self.buf[entries_offset as usize..], count, entries_offset);
        self.buf.extend_from_slice(&count.to_le_bytes());
        self.buf.extend_from_slice(&entries_offset.to_le_bytes());
        self.buf.extend_from_slice(&sum);
        self.buf.extend_from_slice(&PACK_END_MAGIC);
        let id = PackId(*blake3::hash(&self.buf).as_bytes());
        (id, self.buf, self.entries)
    }
}

fn trailer_checksum(entries: &[u8], count: u64, offset: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(entries);
    h.update(&count.to_le_bytes());
    h.update(&offset.to_le_bytes());
    *h.finalize().as_bytes()
}

/// A parsed footer: where the entries are and their checksum.
#[derive(Debug, Clone, Copy)]
pub struct Footer {
    /// Number of entries.
    pub count: u64,
    /// Offset of the first entry.
    pub entries_offset: u64,
    checksum: [u8; 32],
}

/// Parse the last [`PACK_FOOTER_LEN`] bytes of a pack of `pack_len` bytes.
pub fn parse_footer(tail: &[u8], pack_len: u64) -> Result<Footer> {
    if tail.len() != PACK_FOOTER_LEN || tail[48..56] != PACK_END_MAGIC {
        return Err(Error::corrupt("pack footer magic is wrong"));
    }
    let f = Footer {
        count: le_u64(tail, 0),
        entries_offset: le_u64(tail, 8),
        checksum: arr32(tail, 16),
    };
    let expect_end = f
        .count
        .checked_mul(PACK_ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(f.entries_offset))
        .and_then(|n| n.checked_add(PACK_FOOTER_LEN as u64));
    if expect_end != Some(pack_len) || f.entries_offset < PACK_HEADER_LEN as u64 {
        return Err(Error::corrupt(
            "pack footer lengths do not match the pack size",
        ));
    }
    Ok(f)
}

/// Parse and check the entry table (`bytes` = exactly the entries).
pub fn parse_entries(bytes: &[u8], f: &Footer) -> Result<Vec<PackEntry>> {
    if bytes.len() as u64 != f.count * PACK_ENTRY_LEN as u64 {
        return Err(Error::corrupt("pack entry table has the wrong length"));
    }
    if trailer_checksum(bytes, f.count, f.entries_offset) != f.checksum {
        return Err(Error::corrupt("pack trailer fails its checksum"));
    }
    bytes
        .chunks_exact(PACK_ENTRY_LEN)
        .map(|e| parse_entry(e, f.entries_offset))
        .collect()
}

fn parse_entry(e: &[u8], limit: u64) -> Result<PackEntry> {
    let entry = PackEntry {
        digest: ChunkDigest(arr32(e, 0)),
        offset: le_u64(e, 32),
        length: le_u32(e, 40),
        kind: BlobKind::from_u8(e[44])?,
    };
    if entry.offset.saturating_add(entry.length as u64) > limit {
        return Err(Error::corrupt("pack entry points past the blobs"));
    }
    Ok(entry)
}

/// Parse a whole pack held in memory: header, trailer and entries.
pub fn parse_pack(pack: &[u8]) -> Result<Vec<PackEntry>> {
    if pack.len() < PACK_HEADER_LEN + PACK_FOOTER_LEN || pack[0..4] != PACK_MAGIC {
        return Err(Error::corrupt("pack header magic is wrong"));
    }
    let f = parse_footer(&pack[pack.len() - PACK_FOOTER_LEN..], pack.len() as u64)?;
    let start = f.entries_offset as usize;
    parse_entries(&pack[start..pack.len() - PACK_FOOTER_LEN], &f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::blob;

    #[test]
    fn reused_buffer_builds_the_same_pack() {
        let build = |mut p: PackBuilder| {
            for i in 0..3u8 {
                let d = ChunkDigest::of(&[i]);
                let b = blob::encode(BlobKind::Chunk, d, &[i; 100], 1).unwrap();
                p.add(d, BlobKind::Chunk, &b);
            }
            p.finish()
        };
        let (id, bytes, entries) = build(PackBuilder::new());
        let (id2, bytes2, entries2) = build(PackBuilder::reuse(bytes.clone()));
        assert_eq!((id, &bytes, &entries), (id2, &bytes2, &entries2));
        assert_eq!(parse_pack(&bytes2).unwrap(), entries);
    }

    #[test]
    fn pack_roundtrip_and_corruption() {
        let mut b = PackBuilder::new();
        for i in 0..5u8 {
            let data = vec![i + 1; 1000];
            let d = ChunkDigest::of(&data);
            b.add(
                d,
                BlobKind::Chunk,
                &blob::encode(BlobKind::Chunk, d, &data, 1).unwrap(),
            );
        }
        let (id, bytes, entries) = b.finish();
        assert_eq!(id, PackId(*blake3::hash(&bytes).as_bytes()));
        assert_eq!(parse_pack(&bytes).unwrap(), entries);
        let tail = bytes.len() - PACK_FOOTER_LEN - 3 * PACK_ENTRY_LEN;
        let mut bad = bytes.clone();
        bad[tail] ^= 1;
        assert!(parse_pack(&bad).is_err());
        assert!(parse_pack(&bytes[..bytes.len() - 1]).is_err());
    }
}
