//! Backup manifests: JSON inside a 56-byte envelope (magic, version, length, checksum).
//!
//! Owns the manifest structure and its validation. Writing it last is the commit point of
//! a backup (see `writer`).

use super::{arr32, le_u32, le_u64};
use crate::error::{Error, Result};
use crate::format::config::{MAX_CHUNK, MIN_CHUNK};
use crate::format::index;
use crate::ids::{BackupId, ChunkDigest};
use serde::{Deserialize, Serialize};

/// Envelope magic.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SLMANIF\0";
/// Envelope version.
pub const MANIFEST_VERSION: u32 = 1;
/// Envelope header length.
pub const MANIFEST_HEADER_LEN: usize = 56;
/// Largest manifest accepted (bounded allocation on read).
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;

const _: () = assert!(MANIFEST_HEADER_LEN == 8 + 4 + 4 + 8 + 32);

/// Which VM a backup belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// Hypervisor name of the domain.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
}

/// How a backup was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "reason")]
pub enum BackupMode {
    /// First backup of a chain.
    Full,
    /// Only changed blocks were read.
    Incremental,
    /// A full read although an incremental was asked for, with the reason.
    FullBecause(String),
}

/// How the VM was when its backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStateAtBackup {
    /// Running (or paused by its operator): read through the hypervisor's backup job.
    Running,
    /// Shut off, and its images read directly (`qemu-nbd`, local hypervisor).
    ShutOff,
    /// Shut off, started paused for the backup (its CPUs never ran) and powered off again.
    StartedPaused,
}

/// Whether guest filesystems were frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// The guest agent froze the filesystems.
    Application,
    /// Like a power cut.
    Crash,
}

/// Counters of one backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Chunks given to the writer (put or zero).
    pub chunks_written: u64,
    /// Chunks newly stored.
    pub chunks_new: u64,
    /// Chunks found already stored.
    pub chunks_dedup: u64,
    /// Chunks that were all zero.
    pub chunks_zero: u64,
    /// Plaintext bytes of new chunks.
    pub bytes_new_raw: u64,
    /// Bytes of new chunk blobs as stored (headers included).
    pub bytes_stored: u64,
    /// Bytes of new index blocks plus the manifest.
    pub metadata_bytes: u64,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// Target name (`vda`).
    pub target: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunk ids per index block.
    pub index_block_len: u32,
    /// Ids of the index blocks, in order.
    pub index_blocks: Vec<ChunkDigest>,
    /// Hypervisor checkpoint created with this backup.
    pub checkpoint: Option<String>,
    /// The backup this disk's incremental was taken against.
    pub parent_backup: Option<BackupId>,
    /// Why this disk was read in full although the backup is an incremental or will be
    /// (e.g. a raw image: no dirty bitmap). Absent when change tracking covered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_read: Option<String>,
}

/// Everything about one committed backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The backup's id.
    pub id: BackupId,
    /// The VM.
    pub vm: VmIdentity,
    /// The domain definition as the hypervisor gave it.
    pub domain_xml: String,
    /// Start, unix seconds.
    pub started: i64,
    /// Commit time, unix seconds.
    pub finished: i64,
    /// Full, incremental, or full-because.
    pub mode: BackupMode,
    /// Application- or crash-consistent.
    pub consistency: Consistency,
    /// How the VM was (absent in manifests written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<VmStateAtBackup>,
    /// The disks.
    pub disks: Vec<DiskManifest>,
    /// Counters.
    pub stats: BackupStats,
}

impl Manifest {
    /// Storage key of a manifest.
    pub fn key(id: &BackupId) -> String {
        format!("manifests/{id}")
    }

    /// Every index-block id of every disk.
    pub fn index_block_ids(&self) -> impl Iterator<Item = ChunkDigest> + '_ {
        self.disks
            .iter()
            .flat_map(|d| d.index_blocks.iter().copied())
    }

    fn validate(&self) -> Result<()> {
        for d in &self.disks {
            let cs = d.chunk_size;
            if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
                return Err(Error::corrupt(format!("disk {} chunk size", d.target)));
            }
            let blocks = index::block_count(index::chunk_count(d.size, cs), d.index_block_len);
            if d.index_block_len == 0 || blocks != d.index_blocks.len() as u64 {
                return Err(Error::corrupt(format!(
                    "disk {} index block count",
                    d.target
                )));
            }
        }
        Ok(())
    }

    /// Envelope + JSON.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::invalid("manifest not serialisable").with_source(e))?;
        let mut b = Vec::with_capacity(MANIFEST_HEADER_LEN + json.len());
        b.extend_from_slice(&MANIFEST_MAGIC);
        b.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(blake3::hash(&json).as_bytes());
        b.extend_from_slice(&json);
        Ok(b)
    }

    /// Check the envelope, parse, validate.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < MANIFEST_HEADER_LEN || b[0..8] != MANIFEST_MAGIC {
            return Err(Error::corrupt("manifest magic is wrong"));
        }
        if le_u32(b, 8) != MANIFEST_VERSION {
            return Err(Error::corrupt("manifest version is unknown"));
        }
        let len = le_u64(b, 16);
        if len != (b.len() - MANIFEST_HEADER_LEN) as u64 {
            return Err(Error::corrupt("manifest length does not match"));
        }
        let json = &b[MANIFEST_HEADER_LEN..];
        if *blake3::hash(json).as_bytes() != arr32(b, 24) {
            return Err(Error::corrupt("manifest fails its checksum"));
        }
        let m: Manifest = serde_json::from_slice(json)
            .map_err(|e| Error::corrupt("manifest json unreadable").with_source(e))?;
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            id: BackupId::parse("20260101T000000Z-00000001").unwrap(),
            vm: VmIdentity {
                name: "web".into(),
                uuid: "u-1".into(),
            },
            domain_xml: "<domain/>".into(),
            started: 1,
            finished: 2,
            mode: BackupMode::FullBecause("bitmap inconsistent".into()),
            consistency: Consistency::Crash,
            vm_state: Some(VmStateAtBackup::StartedPaused),
            disks: vec![DiskManifest {
                target: "vda".into(),
                size: 65536 * 3,
                chunk_size: 65536,
                index_block_len: 1024,
                index_blocks: vec![ChunkDigest::of(b"blk")],
                checkpoint: Some("cp1".into()),
                parent_backup: None,
                full_read: None,
            }],
            stats: BackupStats::default(),
        }
    }

    #[test]
    fn manifest_roundtrip_and_checks() {
        let m = sample();
        let b = m.encode().unwrap();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            Manifest::decode(&bad).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        assert!(Manifest::decode(&b[..b.len() - 1]).is_err());
    }
}
