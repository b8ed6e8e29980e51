//! Storage backends: the one trait every store of repository objects implements.
//!
//! Owns the storage contract (atomic durable `put`, ranged `get`, `list`, `delete`, the
//! repository lock) and its implementations: `fs` (local filesystem), `mem` (in memory, for
//! tests) and `fault` (drops durability after the N-th sync, for crash tests). Does not know
//! what the objects mean.

pub mod contract;
pub mod fault;
pub mod fs;
pub mod mem;
pub mod uring;

use crate::error::{Error, Result};

/// Shared or exclusive repository lock (see the table in the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Backups, prune, verify: many at once.
    Shared,
    /// Garbage collection: alone.
    Exclusive,
}

/// Holds a repository lock until dropped.
pub struct LockGuard {
    _inner: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockGuard")
    }
}

impl LockGuard {
    /// Wrap whatever releases the lock when dropped.
    pub fn new(inner: impl Send + Sync + 'static) -> Self {
        LockGuard {
            _inner: Box::new(inner),
        }
    }
}

/// One ranged read of a batch ([`Backend::get_ranges`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    /// Object key.
    pub key: String,
    /// Byte offset in the object.
    pub offset: u64,
    /// Bytes to read.
    pub len: usize,
}

/// A store of named objects. Keys are `/`-separated segments of `[A-Za-z0-9._-]`.
pub trait Backend: Send + Sync + 'static {
    /// Store `data` under `key` atomically; durable when this returns (temp name, sync,
    /// rename, directory sync). Overwrites.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// The whole object. `NotFound` if absent.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// `len` bytes at `offset`; an error if the object is shorter.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Many ranged reads, results in request order, each as [`Backend::get_range`] would
    /// return it. Backends that can overlap reads (io_uring in `fs`) override this.
    fn get_ranges(&self, reqs: &[RangeRequest]) -> Vec<Result<Vec<u8>>> {
        reqs.iter()
            .map(|r| self.get_range(&r.key, r.offset, r.len))
            .collect()
    }
    /// The object's length.
    fn len(&self, key: &str) -> Result<u64>;
    /// Every key starting with `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Remove durably; absent keys are fine.
    fn delete(&self, key: &str) -> Result<()>;
    /// Take the repository lock; `wait = false` fails with `Locked` instead of blocking.
    fn lock(&self, mode: LockMode, wait: bool) -> Result<LockGuard>;
}

/// Reject keys that could escape the store or collide with temporary names.
pub fn validate_key(key: &str) -> Result<()> {
    let ok_seg = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    if key.len() <= 512 && key.split('/').all(ok_seg) {
        Ok(())
    } else {
        Err(Error::invalid(format!("storage key {key:?} is malformed")))
    }
}

/// Check a ranged read stays inside an object of `total` bytes.
pub(crate) fn check_range(key: &str, total: u64, offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= total => Ok(()),
        _ => Err(Error::corrupt(format!(
            "read of {len} bytes at {offset} past the end of {key} ({total} bytes)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys() {
        assert!(super::validate_key("packs/ab/abcd").is_ok());
        for bad in ["", "/x", "a//b", "../x", "a/../b", ".tmp", "a b", "a/.x"] {
            assert!(super::validate_key(bad).is_err(), "{bad}");
        }
    }
}
