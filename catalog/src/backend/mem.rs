//! In-memory backend: the test twin of `fs`, and the in-process repository lock.
//!
//! Owns a map of keys to bytes and [`LocalLock`]. Nothing is ever durable beyond the process.

use super::{check_range, validate_key, Backend, LockGuard, LockMode};
use crate::error::{Error, ErrorKind, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

/// A shared/exclusive lock inside one process.
#[derive(Debug, Default, Clone)]
pub struct LocalLock {
    state: Arc<(Mutex<(usize, bool)>, Condvar)>,
}

struct LocalLockGuard {
    lock: LocalLock,
    mode: LockMode,
}

impl Drop for LocalLockGuard {
    fn drop(&mut self) {
        let (m, cv) = &*self.lock.state;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        match self.mode {
            LockMode::Shared => s.0 -= 1,
            LockMode::Exclusive => s.1 = false,
        }
        cv.notify_all();
    }
}

impl LocalLock {
    /// Take the lock in `mode`.
    pub fn acquire(&self, mode: LockMode, wait: bool) -> Result<LockGuard> {
        let (m, cv) = &*self.state;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let free = match mode {
                LockMode::Shared => !s.1,
                LockMode::Exclusive => !s.1 && s.0 == 0,
            };
            if free {
                break;
            }
            if !wait {
                return Err(Error::new(ErrorKind::Locked, "repository lock is held"));
            }
            s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match mode {
            LockMode::Shared => s.0 += 1,
            LockMode::Exclusive => s.1 = true,
        }
        Ok(LockGuard::new(LocalLockGuard {
            lock: self.clone(),
            mode,
        }))
    }
}

/// Objects in a map.
#[derive(Debug, Default, Clone)]
pub struct MemBackend {
    map: Arc<Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
    lock: LocalLock,
}

impl MemBackend {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `map`.
    pub fn from_map(map: BTreeMap<String, Arc<Vec<u8>>>) -> Self {
        MemBackend {
            map: Arc::new(Mutex::new(map)),
            lock: LocalLock::default(),
        }
    }

    /// A copy of the contents.
    pub fn snapshot(&self) -> BTreeMap<String, Arc<Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn obj(&self, key: &str) -> Result<Arc<Vec<u8>>> {
        validate_key(key)?;
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("object {key} not found")))
    }
}

impl Backend for MemBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        validate_key(key)?;
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(key.to_string(), Arc::new(data.to_vec()));
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        Ok(self.obj(key)?.to_vec())
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let o = self.obj(key)?;
        check_range(key, o.len() as u64, offset, len)?;
        Ok(o[offset as usize..offset as usize + len].to_vec())
    }

    fn len(&self, key: &str) -> Result<u64> {
        Ok(self.obj(key)?.len() as u64)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(m.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        Ok(())
    }

    fn lock(&self, mode: LockMode, wait: bool) -> Result<LockGuard> {
        self.lock.acquire(mode, wait)
    }
}
