//! The repository config file (`config`): 64 fixed bytes fixing chunk size and defaults.
//!
//! Owns its encoding and validation. Does not own creating the repository.

use super::{le_u32, le_u64};
use crate::error::{Error, Result};

/// Config magic.
pub const CONFIG_MAGIC: [u8; 8] = *b"SLUICERP";
/// Config format version.
pub const CONFIG_VERSION: u32 = 1;
/// Encoded length.
pub const CONFIG_LEN: usize = 64;
/// Smallest allowed chunk size.
pub const MIN_CHUNK: u32 = 64 << 10;
/// Largest allowed chunk size.
pub const MAX_CHUNK: u32 = 4 << 20;

/// Repository-wide settings chosen at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoConfig {
    /// Chunk size in bytes: a power of two, 64 KiB to 4 MiB.
    pub chunk_size: u32,
    /// Chunk ids per index block.
    pub index_block_len: u32,
    /// Default zstd level for new blobs.
    pub zstd_level: i32,
    /// Target pack size in bytes.
    pub pack_target: u64,
    /// Chunk-id mode: 0 = blake3 of the plaintext (1 reserved for keyed hashing).
    pub hash_mode: u8,
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            chunk_size: 64 << 10,
            index_block_len: 1024,
            zstd_level: 1,
            pack_target: 32 << 20,
            hash_mode: 0,
        }
    }
}

impl RepoConfig {
    /// Check every field's range.
    pub fn validate(&self) -> Result<()> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
            return Err(Error::invalid(format!(
                "chunk size {cs} is not a power of two from 64 KiB to 4 MiB"
            )));
        }
        if !(16..=65536).contains(&self.index_block_len) {
            return Err(Error::invalid("index block length must be 16..=65536"));
        }
        if !(-7..=22).contains(&self.zstd_level) {
            return Err(Error::invalid("zstd level must be -7..=22"));
        }
        if !(1 << 20..=1 << 30).contains(&self.pack_target) {
            return Err(Error::invalid("pack target must be 1 MiB..=1 GiB"));
        }
        if self.hash_mode != 0 {
            return Err(Error::invalid("only hash mode 0 (plain blake3) exists"));
        }
        Ok(())
    }

    /// The 64 bytes.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&CONFIG_MAGIC);
        b[8..12].copy_from_slice(&CONFIG_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.index_block_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.zstd_level.to_le_bytes());
        b[24..32].copy_from_slice(&self.pack_target.to_le_bytes());
        b[32] = self.hash_mode;
        let sum = blake3::hash(&b[..48]);
        b[48..64].copy_from_slice(&sum.as_bytes()[..16]);
        b
    }

    /// Parse and validate.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != CONFIG_LEN || b[0..8] != CONFIG_MAGIC {
            return Err(Error::corrupt("repository config magic is wrong"));
        }
        if b[48..64] != blake3::hash(&b[..48]).as_bytes()[..16] {
            return Err(Error::corrupt("repository config fails its checksum"));
        }
        if le_u32(b, 8) != CONFIG_VERSION {
            return Err(Error::corrupt("repository config version is unknown"));
        }
        let c = RepoConfig {
            chunk_size: le_u32(b, 12),
            index_block_len: le_u32(b, 16),
            zstd_level: le_u32(b, 20) as i32,
            pack_target: le_u64(b, 24),
            hash_mode: b[32],
        };
        c.validate()
            .map_err(|e| Error::corrupt("repository config").with_source(e))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_roundtrip_and_checks() {
        let c = RepoConfig::default();
        assert_eq!(RepoConfig::decode(&c.encode()).unwrap(), c);
        let mut b = c.encode();
        b[13] ^= 1;
        assert!(RepoConfig::decode(&b).is_err());
        let bad = RepoConfig {
            chunk_size: 100_000,
            ..c
        };
        assert!(bad.validate().is_err());
    }

    /// The version-1 encoding is frozen: this fixture must keep decoding.
    #[test]
    fn config_v1_fixture() {
        let fixture = "534c55494345525001000000000001000004000001000000000000020000000000000000000000000000000000000000c582c2e7579177acd93673c0c4a82d89";
        assert_eq!(hex::encode(RepoConfig::default().encode()), fixture);
        let c = RepoConfig::decode(&hex::decode(fixture).unwrap()).unwrap();
        assert_eq!(c, RepoConfig::default());
    }
}
