//! Blob encoding: one chunk or index block, with an 80-byte header and its payload.
//!
//! Owns compression choice (zstd or raw) and the checks on decode (checksum of the stored
//! bytes, raw length, and the plaintext digest). Does not know where a blob is stored.

use super::{arr32, le_u32};
use crate::error::{Error, Result};
use crate::ids::ChunkDigest;

/// Blob magic.
pub const BLOB_MAGIC: [u8; 4] = *b"SLBK";
/// Blob format version.
pub const BLOB_VERSION: u8 = 1;
/// Header size in bytes.
pub const BLOB_HEADER_LEN: usize = 80;
/// Largest raw payload accepted (4 MiB chunks; index blocks are far smaller).
pub const MAX_RAW_LEN: u32 = 4 << 20;
/// Flag bit: payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;
/// Hash mode 0: digest = blake3(plaintext). (1 will be keyed blake3 with encryption.)
pub const HASH_PLAIN: u8 = 0;

const _: () = assert!(BLOB_HEADER_LEN == 4 + 4 + 4 + 4 + 32 + 32);

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// A disk chunk.
    Chunk = 0,
    /// An index block (a run of chunk digests).
    Index = 1,
}

impl BlobKind {
    pub(crate) fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(BlobKind::Chunk),
            1 => Ok(BlobKind::Index),
            _ => Err(Error::corrupt(format!("blob kind {v} is unknown"))),
        }
    }
}

/// A decoded blob header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    /// Chunk or index block.
    pub kind: BlobKind,
    /// Flag bits (`FLAG_ZSTD`).
    pub flags: u8,
    /// Hash mode of `digest`.
    pub hash_mode: u8,
    /// Plaintext length.
    pub raw_len: u32,
    /// Stored payload length.
    pub stored_len: u32,
    /// Plaintext digest (the blob's id).
    pub digest: ChunkDigest,
    /// blake3 of the stored payload.
    pub checksum: [u8; 32],
}

/// Encode `data` as a blob, compressing with zstd at `level` unless that does not help.
pub fn encode(kind: BlobKind, digest: ChunkDigest, data: &[u8], level: i32) -> Result<Vec<u8>> {
    encode_inner(kind, digest, data, level, false)
}

/// [`encode`] for a `digest` the caller computed as `blake3(data)`: a blob stored raw then
/// reuses it as the payload checksum instead of hashing the same bytes twice.
pub(crate) fn encode_hashed(
    kind: BlobKind,
    digest: ChunkDigest,
    data: &[u8],
    level: i32,
) -> Result<Vec<u8>> {
    encode_inner(kind, digest, data, level, true)
}

fn encode_inner(
    kind: BlobKind,
    digest: ChunkDigest,
    data: &[u8],
    level: i32,
    digest_is_blake3: bool,
) -> Result<Vec<u8>> {
    let raw_len = checked_len(data.len())?;
    let mut out = Vec::with_capacity(BLOB_HEADER_LEN + data.len());
    out.resize(BLOB_HEADER_LEN, 0);
    let compressed = compress(data, level)
        .map_err(|e| Error::io(format!("zstd compression of chunk {digest}"), e))?;
    let flags = if compressed.len() < data.len() {
        out.extend_from_slice(&compressed);
        FLAG_ZSTD
    } else {
        out.extend_from_slice(data);
        0
    };
    let stored_len = (out.len() - BLOB_HEADER_LEN) as u32;
    let checksum = if flags == 0 && digest_is_blake3 {
        digest.0
    } else {
        *blake3::hash(&out[BLOB_HEADER_LEN..]).as_bytes()
    };
    let h = BlobHeader {
        kind,
        flags,
        hash_mode: HASH_PLAIN,
        raw_len,
        stored_len,
        digest,
        checksum,
    };
    out[..BLOB_HEADER_LEN].copy_from_slice(&encode_header(&h));
    Ok(out)
}

thread_local! {
    /// One zstd context per thread and level: creating one per chunk costs more than
    /// compressing a 64 KiB chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, z) = c.as_mut().expect("compressor just set");
        z.compress(data)
    })
}

fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut()
            .expect("decompressor just set")
            .decompress(data, capacity)
    })
}

fn checked_len(len: usize) -> Result<u32> {
    if len > MAX_RAW_LEN as usize {
        return Err(Error::invalid(format!(
            "blob of {len} bytes exceeds {MAX_RAW_LEN}"
        )));
    }
    Ok(len as u32)
}

/// The 80 header bytes.
pub fn encode_header(h: &BlobHeader) -> [u8; BLOB_HEADER_LEN] {
    let mut b = [0u8; BLOB_HEADER_LEN];
    b[0..4].copy_from_slice(&BLOB_MAGIC);
    b[4] = BLOB_VERSION;
    b[5] = h.kind as u8;
    b[6] = h.flags;
    b[7] = h.hash_mode;
    b[8..12].copy_from_slice(&h.raw_len.to_le_bytes());
    b[12..16].copy_from_slice(&h.stored_len.to_le_bytes());
    b[16..48].copy_from_slice(&h.digest.0);
    b[48..80].copy_from_slice(&h.checksum);
    b
}

/// Parse and sanity-check a header (no payload checks).
pub fn decode_header(b: &[u8]) -> Result<BlobHeader> {
    if b.len() < BLOB_HEADER_LEN || b[0..4] != BLOB_MAGIC {
        return Err(Error::corrupt("blob header magic is wrong"));
    }
    if b[4] != BLOB_VERSION {
        return Err(Error::corrupt(format!("blob version {} is unknown", b[4])));
    }
    let h = BlobHeader {
        kind: BlobKind::from_u8(b[5])?,
        flags: b[6],
        hash_mode: b[7],
        raw_len: le_u32(b, 8),
        stored_len: le_u32(b, 12),
        digest: ChunkDigest(arr32(b, 16)),
        checksum: arr32(b, 48),
    };
    if h.flags & !FLAG_ZSTD != 0 || h.hash_mode != HASH_PLAIN {
        return Err(Error::corrupt("blob flags or hash mode unsupported"));
    }
    if h.raw_len > MAX_RAW_LEN || h.stored_len > MAX_RAW_LEN + MAX_RAW_LEN / 8 {
        return Err(Error::corrupt("blob lengths out of range"));
    }
    Ok(h)
}

/// Decode a whole blob, checking checksum, length and that the plaintext hashes to the
/// digest `expect`. Errors name the digest.
pub fn decode(b: &[u8], expect: ChunkDigest) -> Result<(BlobKind, Vec<u8>)> {
    let ctx = |e: Error| e.context(format!("chunk {expect}"));
    let h = decode_header(b).map_err(ctx)?;
    let payload = b.get(BLOB_HEADER_LEN..).unwrap_or(&[]);
    if payload.len() != h.stored_len as usize || h.digest != expect {
        return Err(ctx(Error::corrupt("blob length or id mismatch")));
    }
    if *blake3::hash(payload).as_bytes() != h.checksum {
        return Err(ctx(Error::corrupt("stored bytes fail their checksum")));
    }
    let data = if h.flags & FLAG_ZSTD != 0 {
        decompress(payload, h.raw_len as usize)
            .map_err(|e| ctx(Error::corrupt("zstd payload undecodable").with_source(e)))?
    } else {
        payload.to_vec()
    };
    if data.len() != h.raw_len as usize || ChunkDigest::of(&data) != expect {
        return Err(ctx(Error::corrupt("plaintext does not hash to its id")));
    }
    Ok((h.kind, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_compressible_and_raw() {
        let text = b"hello world ".repeat(1000);
        let d = ChunkDigest::of(&text);
        let b = encode(BlobKind::Chunk, d, &text, 1).unwrap();
        assert!(b.len() < text.len());
        assert_eq!(decode(&b, d).unwrap().1, text);
        let rnd: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let d2 = ChunkDigest::of(&rnd);
        let b2 = encode(BlobKind::Chunk, d2, &rnd, 1).unwrap();
        assert_eq!(decode(&b2, d2).unwrap().1, rnd);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let text = b"abcdefgh".repeat(64);
        let d = ChunkDigest::of(&text);
        let b = encode(BlobKind::Chunk, d, &text, 1).unwrap();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(decode(&c, d).is_err(), "flip at {i} not caught");
        }
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let d = ChunkDigest::of(b"x");
        assert!(decode(&[], d).is_err());
        assert!(decode(&[0u8; 200], d).is_err());
    }
}
