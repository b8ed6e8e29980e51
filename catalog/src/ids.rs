//! Newtypes for identifiers: chunk digests, backup ids, pack ids.
//!
//! Owns their text forms (hex, sortable backup ids) and parsing; nothing else.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The id of a chunk or index block: blake3 of its plaintext. All zeros is reserved for the
/// all-zero chunk, which is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    /// The reserved id of the all-zero chunk (never stored, read back as zeros).
    pub const ZERO: ChunkDigest = ChunkDigest([0; 32]);

    /// blake3 of `data` (plain hashing mode).
    pub fn of(data: &[u8]) -> Self {
        ChunkDigest(*blake3::hash(data).as_bytes())
    }

    /// Whether this is the reserved zero-chunk id.
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::invalid(format!("chunk digest {s:?} is not 64 hex digits")))?;
        Ok(ChunkDigest(out))
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkDigest({})", &self.to_hex()[..16])
    }
}

impl Serialize for ChunkDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkDigest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A backup's id: `YYYYMMDDTHHMMSSZ-` plus 8 hex digits, sortable by time. The hex digits
/// are the millisecond (10 bits), a per-process sequence (12 bits) and randomness (10 bits),
/// so ids of one process sort in creation order even within one second (retention relies
/// on it).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    /// A fresh id for a backup started at `unix_secs`.
    pub fn generate(unix_secs: i64) -> Self {
        let (y, mo, d) = crate::retention::civil_from_days(unix_secs.div_euclid(86400));
        let s = unix_secs.rem_euclid(86400);
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_millis());
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xfff;
        let rand: u32 = (ms << 22) | (seq << 10) | (random_u32() & 0x3ff);
        BackupId(format!(
            "{y:04}{mo:02}{d:02}T{:02}{:02}{:02}Z-{rand:08x}",
            s / 3600,
            s / 60 % 60,
            s % 60
        ))
    }

    /// Parse and validate (it is used in storage keys, so only `[0-9A-Za-z-]`).
    pub fn parse(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(BackupId(s.to_string()))
        } else {
            Err(Error::invalid(format!("backup id {s:?} is malformed")))
        }
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BackupId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        BackupId::parse(&s)
    }
}

impl From<BackupId> for String {
    fn from(b: BackupId) -> String {
        b.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pack's id: blake3 of the whole pack file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    /// The storage key of this pack.
    pub fn key(&self) -> String {
        let h = hex::encode(self.0);
        format!("packs/{}/{}", &h[..2], h)
    }

    /// Parse a storage key made by [`PackId::key`].
    pub fn from_key(key: &str) -> Result<Self> {
        let name = key.rsplit('/').next().unwrap_or("");
        let mut out = [0u8; 32];
        hex::decode_to_slice(name, &mut out)
            .map_err(|_| Error::invalid(format!("pack key {key:?} is malformed")))?;
        Ok(PackId(out))
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A non-cryptographic random u32 from the clock, pid and a counter (ids and temp names only).
pub(crate) fn random_u32() -> u32 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&c.to_le_bytes());
    let b = h.finalize();
    u32::from_le_bytes([
        b.as_bytes()[0],
        b.as_bytes()[1],
        b.as_bytes()[2],
        b.as_bytes()[3],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_id_is_sortable_and_parses() {
        let a = BackupId::generate(1_700_000_000);
        assert!(a.as_str().starts_with("20231114T221320Z-"), "{a}");
        assert_eq!(BackupId::parse(a.as_str()).unwrap(), a);
        assert!(BackupId::parse("../etc").is_err());
        assert!(BackupId::parse("").is_err());
    }

    #[test]
    fn digest_hex_roundtrip() {
        let d = ChunkDigest::of(b"x");
        assert_eq!(ChunkDigest::from_hex(&d.to_hex()).unwrap(), d);
        assert!(ChunkDigest::from_hex("zz").is_err());
        assert!(!d.is_zero());
    }
}

#[cfg(test)]
mod backup_id_order_tests {
    use super::BackupId;

    #[test]
    fn ids_of_one_second_sort_in_creation_order() {
        let ids: Vec<BackupId> = (0..50).map(|_| BackupId::generate(1_700_000_000)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids.iter().all(|i| BackupId::parse(i.as_str()).is_ok()));
    }
}
