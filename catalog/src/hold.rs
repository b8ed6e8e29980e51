//! Holds on backups: a backup something is reading from for a long time (a running instant
//! recovery serves its disks to a guest) is held, and while any hold on it lasts prune keeps
//! it (reason `in-use`) and [`Repository::remove_backup`] refuses it (`Conflict`, naming
//! why). GC needs nothing more: it only drops blobs no committed manifest references, and a
//! held backup's manifest stays, so every chunk its index names (its own and those it shares
//! with the backups before it) stays too.
//!
//! Holds live in memory, in the process that took them (the daemon), and end with their
//! guard ([`BackupHold`]) or with the process; nothing is written to the repository, so a
//! killed process leaves no stale hold behind. Another process pruning the same repository
//! does not see them.
//!
//! Taking a hold and removing a backup are serialized under one mutex, so a hold either
//! sees the manifest (and the removal then refuses) or fails with `NotFound`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::Manifest;
use crate::ids::BackupId;
use crate::repo::{Inner, Repository};

/// The holds of one repository handle (and its clones).
#[derive(Debug, Default)]
pub(crate) struct Holds {
    /// Per held backup: (hold number, why), one entry per hold.
    map: Mutex<BTreeMap<BackupId, Vec<(u64, String)>>>,
    next: Mutex<u64>,
}

impl Holds {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<BackupId, Vec<(u64, String)>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why `id` is held (the reasons of its holds, joined), if it is.
pub(crate) fn why_held(
    map: &BTreeMap<BackupId, Vec<(u64, String)>>,
    id: &BackupId,
) -> Option<String> {
    let holds = map.get(id)?;
    let why: Vec<&str> = holds.iter().map(|(_, w)| w.as_str()).collect();
    Some(why.join(", "))
}

/// A hold on one backup; released when dropped.
pub struct BackupHold {
    inner: Arc<Inner>,
    id: BackupId,
    n: u64,
}

impl std::fmt::Debug for BackupHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupHold({})", self.id)
    }
}

impl BackupHold {
    /// The held backup.
    pub fn backup(&self) -> &BackupId {
        &self.id
    }
}

impl Drop for BackupHold {
    fn drop(&mut self) {
        let mut map = self.inner.holds.lock();
        if let Some(v) = map.get_mut(&self.id) {
            v.retain(|(n, _)| *n != self.n);
            if v.is_empty() {
                map.remove(&self.id);
            }
        }
        tracing::info!(backup = %self.id, "hold released");
    }
}

impl Repository {
    /// Holds backup `id` (`why` says what for, e.g. `instant recovery job 12`) until the
    /// guard is dropped: prune keeps it, removing it is refused. `NotFound` if it has no
    /// manifest.
    pub fn hold(&self, id: &BackupId, why: &str) -> Result<BackupHold> {
        let holds = &self.inner.holds;
        let mut map = holds.lock();
        self.inner
            .backend
            .len(&Manifest::key(id))
            .map_err(|e| e.context(format!("holding backup {id}")))?;
        let n = {
            let mut next = holds.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        map.entry(id.clone())
            .or_default()
            .push((n, why.to_string()));
        tracing::info!(backup = %id, why, "backup held");
        Ok(BackupHold {
            inner: self.inner.clone(),
            id: id.clone(),
            n,
        })
    }

    /// The held backups and why each is held.
    pub fn held(&self) -> Vec<(BackupId, String)> {
        let map = self.inner.holds.lock();
        map.keys()
            .filter_map(|id| Some((id.clone(), why_held(&map, id)?)))
            .collect()
    }

    /// Delete one backup's manifest (its chunks become garbage for GC), unless it is held
    /// (`Conflict`, naming the hold).
    pub fn remove_backup(&self, id: &BackupId) -> Result<()> {
        let map = self.inner.holds.lock();
        if let Some(why) = why_held(&map, id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("backup {id} is in use ({why}): it cannot be removed until that ends"),
            ));
        }
        self.catalog().remove_backup(id)?;
        self.inner.backend.delete(&Manifest::key(id))?;
        tracing::info!(backup = %id, "backup removed");
        Ok(())
    }
}
