//! Index blocks: a run of chunk digests of one disk, stored as a content-addressed blob.
//!
//! Owns the index-block payload encoding and index arithmetic (which block covers which
//! chunk). Does not own storage of the blocks.

use super::{arr32, le_u32};
use crate::error::{Error, Result};
use crate::ids::ChunkDigest;

/// Index block payload magic.
pub const INDEX_MAGIC: [u8; 4] = *b"SLIX";
/// Index block format version.
pub const INDEX_VERSION: u16 = 1;
/// Payload header length.
pub const INDEX_HEADER_LEN: usize = 16;

/// Encode the payload of an index block.
pub fn encode(ids: &[ChunkDigest]) -> Vec<u8> {
    let mut b = Vec::with_capacity(INDEX_HEADER_LEN + ids.len() * 32);
    b.extend_from_slice(&INDEX_MAGIC);
    b.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    for id in ids {
        b.extend_from_slice(&id.0);
    }
    b
}

/// Decode a payload holding exactly `expect` ids.
pub fn decode(b: &[u8], expect: usize) -> Result<Vec<ChunkDigest>> {
    if b.len() < INDEX_HEADER_LEN
        || b[0..4] != INDEX_MAGIC
        || b[4..6] != INDEX_VERSION.to_le_bytes()
    {
        return Err(Error::corrupt("index block header is wrong"));
    }
    let n = le_u32(b, 8) as usize;
    if n != expect || b.len() != INDEX_HEADER_LEN + n * 32 {
        return Err(Error::corrupt(format!(
            "index block holds {n} ids, expected {expect}"
        )));
    }
    Ok((0..n)
        .map(|i| ChunkDigest(arr32(b, INDEX_HEADER_LEN + i * 32)))
        .collect())
}

/// Number of chunks of a disk of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

/// Number of index blocks for `chunks` chunks.
pub fn block_count(chunks: u64, block_len: u32) -> u64 {
    chunks.div_ceil(block_len as u64)
}

/// Number of ids in block `b` of a disk with `chunks` chunks.
pub fn ids_in_block(b: u64, chunks: u64, block_len: u32) -> usize {
    let start = b * block_len as u64;
    chunks.saturating_sub(start).min(block_len as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_roundtrip_and_math() {
        let ids = vec![ChunkDigest::ZERO, ChunkDigest::of(b"a")];
        assert_eq!(decode(&encode(&ids), 2).unwrap(), ids);
        assert!(decode(&encode(&ids), 3).is_err());
        assert_eq!(chunk_count(65536 * 3 + 1, 65536), 4);
        assert_eq!(block_count(1025, 1024), 2);
        assert_eq!(ids_in_block(1, 1025, 1024), 1);
        assert_eq!(ids_in_block(0, 1025, 1024), 1024);
    }
}
