//! Fault-injection backend: stops making writes durable after the N-th sync.
//!
//! Every `put` and `delete` is one sync. The first `durable_syncs` of them reach the
//! "durable" image; later ones are visible to the running process but lost by
//! [`FaultBackend::crash`], which returns what a machine would find after a power cut.

use super::mem::{LocalLock, MemBackend};
use super::{Backend, LockGuard, LockMode};
use crate::error::Result;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A backend whose writes stop being durable after `durable_syncs` syncs.
#[derive(Debug, Clone)]
pub struct FaultBackend {
    visible: MemBackend,
    durable: Arc<Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
    syncs: Arc<AtomicU64>,
    durable_syncs: u64,
    lock: LocalLock,
}

impl FaultBackend {
    /// Start from `base`'s contents (all durable); keep the next `durable_syncs` syncs.
    pub fn new(base: &MemBackend, durable_syncs: u64) -> Self {
        let snap = base.snapshot();
        FaultBackend {
            visible: MemBackend::from_map(snap.clone()),
            durable: Arc::new(Mutex::new(snap)),
            syncs: Arc::new(AtomicU64::new(0)),
            durable_syncs,
            lock: LocalLock::default(),
        }
    }

    /// Syncs performed so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// What survives a power cut now.
    pub fn crash(&self) -> MemBackend {
        MemBackend::from_map(
            self.durable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    fn durable_now(&self) -> bool {
        self.syncs.fetch_add(1, Ordering::SeqCst) < self.durable_syncs
    }
}

impl Backend for FaultBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.visible.put(key, data)?;
        if self.durable_now() {
            let mut d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            d.insert(key.to_string(), Arc::new(data.to_vec()));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.visible.get(key)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.visible.get_range(key, offset, len)
    }

    fn len(&self, key: &str) -> Result<u64> {
        self.visible.len(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.visible.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.visible.delete(key)?;
        if self.durable_now() {
            let mut d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            d.remove(key);
        }
        Ok(())
    }

    fn lock(&self, mode: LockMode, wait: bool) -> Result<LockGuard> {
        self.lock.acquire(mode, wait)
    }
}
