//! The repository handle: config, catalog, blob reads, pack sealing, reconcile and rebuild.
//!
//! Owns opening/creating a repository and keeping the catalog in step with what the backend
//! holds. Writing backups lives in `writer`, reading in `reader`, upkeep in `verify`/`gc`.

use crate::backend::{Backend, LockGuard, LockMode};
use crate::db::{BackupRow, Catalog, Location};
use crate::error::{Chain, Error, ErrorKind, Result};
use crate::format::blob::{self, BlobKind};
use crate::format::config::RepoConfig;
use crate::format::index;
use crate::format::manifest::{DiskManifest, Manifest};
use crate::format::pack::{self, PackBuilder, PackEntry, PACK_ENTRY_LEN, PACK_FOOTER_LEN};
use crate::ids::{BackupId, ChunkDigest, PackId};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Storage key of the config object.
pub const CONFIG_KEY: &str = "config";

/// How to open a repository (the catalog is a local file even for remote backends).
#[derive(Debug, Clone)]
pub struct RepoOptions {
    /// Path of the SQLite catalog file.
    pub catalog_path: PathBuf,
    /// Hash/compress worker threads per backup (0 = number of CPUs).
    pub workers: usize,
    /// Decompressed chunks cached per disk reader.
    pub cache_chunks: usize,
}

impl RepoOptions {
    /// Defaults with the catalog at `catalog_path`.
    pub fn new(catalog_path: impl Into<PathBuf>) -> Self {
        RepoOptions {
            catalog_path: catalog_path.into(),
            workers: 0,
            cache_chunks: 64,
        }
    }

    pub(crate) fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: RepoConfig,
    pub(crate) opts: RepoOptions,
    catalog: Mutex<Catalog>,
    /// Backups held in this process (see `hold`).
    pub(crate) holds: crate::hold::Holds,
}

/// A repository: cheap to clone, shareable between threads.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What a catalog rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Packs indexed.
    pub packs: u64,
    /// Blobs located.
    pub blobs: u64,
    /// Backups recorded.
    pub backups: u64,
    /// Objects skipped as unreadable (named in the log).
    pub skipped: Vec<String>,
}

impl Repository {
    /// Create a new repository on `backend` (refused if one exists) and open it.
    pub fn create(
        backend: Arc<dyn Backend>,
        config: RepoConfig,
        opts: RepoOptions,
    ) -> Result<Self> {
        config.validate()?;
        match backend.get(CONFIG_KEY) {
            Ok(_) => return Err(Error::new(ErrorKind::Conflict, "repository already exists")),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        backend.put(CONFIG_KEY, &config.encode())?;
        tracing::info!(chunk_size = config.chunk_size, "repository created");
        Self::open(backend, opts)
    }

    /// Open an existing repository and bring the catalog in step with it.
    pub fn open(backend: Arc<dyn Backend>, opts: RepoOptions) -> Result<Self> {
        let config = RepoConfig::decode(
            &backend
                .get(CONFIG_KEY)
                .map_err(|e| e.context("repository config"))?,
        )?;
        let catalog = Catalog::open(&opts.catalog_path)?;
        let repo = Repository {
            inner: Arc::new(Inner {
                backend,
                config,
                opts,
                catalog: Mutex::new(catalog),
                holds: crate::hold::Holds::default(),
            }),
        };
        repo.reconcile()?;
        Ok(repo)
    }

    /// Repository-wide settings.
    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// Run `f` with the catalog (short calls only: it is shared).
    pub fn with_catalog<R>(&self, f: impl FnOnce(&Catalog) -> Result<R>) -> Result<R> {
        f(&self.catalog())
    }

    pub(crate) fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.inner.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock(&self, mode: LockMode, wait: bool) -> Result<LockGuard> {
        self.inner.backend.lock(mode, wait)
    }

    /// The repository's shared lock (what a backup holds) if no exclusive holder (GC,
    /// prune) has it now; `None` if one has. A backup takes it before its hypervisor job
    /// starts, so a GC never leaves one half-begun.
    pub fn try_shared_lock(&self) -> Result<Option<LockGuard>> {
        match self.lock(LockMode::Shared, false) {
            Ok(g) => Ok(Some(g)),
            Err(e) if e.kind() == crate::ErrorKind::Locked => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Committed backups (oldest first), of one VM if given.
    pub fn backups(&self, vm_uuid: Option<&str>) -> Result<Vec<BackupRow>> {
        self.catalog().backups(vm_uuid)
    }

    /// Read and check a backup's manifest.
    pub fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        let key = Manifest::key(id);
        let len = self
            .inner
            .backend
            .len(&key)
            .map_err(|e| e.context(format!("backup {id}")))?;
        if len > crate::format::manifest::MAX_MANIFEST_LEN {
            return Err(Error::corrupt(format!(
                "manifest of backup {id} is too large"
            )));
        }
        let b = self
            .inner
            .backend
            .get(&key)
            .map_err(|e| e.context(format!("backup {id}")))?;
        Manifest::decode(&b).map_err(|e| e.context(format!("manifest of backup {id}")))
    }

    /// Ids of every committed backup, from the storage itself.
    pub fn manifest_ids(&self) -> Result<Vec<BackupId>> {
        let keys = self.inner.backend.list("manifests/")?;
        Ok(keys
            .iter()
            .filter_map(|k| BackupId::parse(k.trim_start_matches("manifests/")).ok())
            .collect())
    }

    /// Mark a backup protected (retention keeps it) or not; stored in the repository.
    pub fn set_protected(&self, id: &BackupId, protected: bool) -> Result<()> {
        self.manifest(id)?;
        let key = format!("protected/{id}");
        if protected {
            self.inner.backend.put(&key, b"")?;
        } else {
            self.inner.backend.delete(&key)?;
        }
        self.catalog().set_protected(id, protected)
    }

    fn protected_set(&self) -> Result<HashSet<String>> {
        let keys = self.inner.backend.list("protected/")?;
        Ok(keys
            .into_iter()
            .map(|k| k.trim_start_matches("protected/").to_string())
            .collect())
    }

    /// Read, check and decode the blob `digest` (location from the catalog). Retries the
    /// lookup once if the pack vanished (moved by a concurrent repack).
    pub fn read_blob(&self, digest: &ChunkDigest) -> Result<(BlobKind, Vec<u8>)> {
        match self.read_blob_once(digest) {
            Err(e) if e.kind() == ErrorKind::NotFound => self.read_blob_once(digest),
            r => r,
        }
    }

    fn read_blob_once(&self, digest: &ChunkDigest) -> Result<(BlobKind, Vec<u8>)> {
        let loc = self
            .catalog()
            .lookup(digest)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "chunk {digest} is not in the repository (lost, or its copy failed verify: back the vm up again to store it anew)"
                ))
            })?;
        let bytes = self
            .read_location(&loc)
            .map_err(|e| e.context(format!("chunk {digest}")))?;
        blob::decode(&bytes, *digest)
    }

    pub(crate) fn read_location(&self, loc: &Location) -> Result<Vec<u8>> {
        self.inner
            .backend
            .get_range(&loc.pack.key(), loc.offset, loc.length as usize)
    }

    /// Load the full chunk-id list of a disk from its index blocks.
    pub fn load_index(&self, d: &DiskManifest) -> Result<Vec<ChunkDigest>> {
        let chunks = index::chunk_count(d.size, d.chunk_size);
        // No pre-allocation from the manifest's size: ids grow only as blocks are read.
        let mut ids = Vec::new();
        for (b, id) in d.index_blocks.iter().enumerate() {
            let n = index::ids_in_block(b as u64, chunks, d.index_block_len);
            ids.extend(self.load_index_block(id, n)?);
        }
        Ok(ids)
    }

    pub(crate) fn load_index_block(&self, id: &ChunkDigest, n: usize) -> Result<Vec<ChunkDigest>> {
        let (kind, payload) = self.read_blob(id)?;
        if kind != BlobKind::Index {
            return Err(Error::corrupt(format!("blob {id} is not an index block")));
        }
        index::decode(&payload, n).map_err(|e| e.context(format!("index block {id}")))
    }

    /// Store a finished pack durably, then record it in the catalog.
    pub(crate) fn seal_pack(&self, b: PackBuilder) -> Result<(PackId, Vec<PackEntry>)> {
        self.seal_pack_keep(b).map(|(id, entries, _)| (id, entries))
    }

    /// [`Repository::seal_pack`], handing back the pack's buffer for the next pack.
    pub(crate) fn seal_pack_keep(
        &self,
        b: PackBuilder,
    ) -> Result<(PackId, Vec<PackEntry>, Vec<u8>)> {
        let (id, bytes, entries) = b.finish();
        self.inner.backend.put(&id.key(), &bytes)?;
        self.catalog()
            .insert_pack(id, bytes.len() as u64, &entries)?;
        tracing::debug!(pack = %id, blobs = entries.len(), "pack sealed");
        Ok((id, entries, bytes))
    }

    /// Read a pack's trailer (entries) without reading its blobs.
    pub fn pack_entries(&self, id: PackId) -> Result<Vec<PackEntry>> {
        let key = id.key();
        let ctx = |e: Error| e.context(format!("pack {id}"));
        let len = self.inner.backend.len(&key).map_err(ctx)?;
        if len < (pack::PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64 {
            return Err(ctx(Error::corrupt("pack too short")));
        }
        let tail = self
            .inner
            .backend
            .get_range(&key, len - PACK_FOOTER_LEN as u64, PACK_FOOTER_LEN)
            .map_err(ctx)?;
        let f = pack::parse_footer(&tail, len).map_err(ctx)?;
        let n = (f.count as usize) * PACK_ENTRY_LEN;
        let table = self
            .inner
            .backend
            .get_range(&key, f.entries_offset, n)
            .map_err(ctx)?;
        pack::parse_entries(&table, &f).map_err(ctx)
    }

    /// Packs present in storage.
    pub fn stored_packs(&self) -> Result<Vec<PackId>> {
        let keys = self.inner.backend.list("packs/")?;
        Ok(keys
            .iter()
            .filter_map(|k| PackId::from_key(k).ok())
            .collect())
    }

    /// Bring the catalog in step with storage: forget packs and backups that are gone, index
    /// packs and backups the catalog does not know (e.g. after a crash).
    pub fn reconcile(&self) -> Result<()> {
        let stored: HashSet<PackId> = self.stored_packs()?.into_iter().collect();
        let known: HashSet<PackId> = self.catalog().packs()?.into_iter().collect();
        for gone in known.difference(&stored) {
            tracing::warn!(pack = %gone, "catalog forgets a pack missing from storage");
            self.catalog().remove_pack(*gone)?;
        }
        for new in stored.difference(&known) {
            self.index_pack(*new, &mut Vec::new())?;
        }
        self.reconcile_backups(&mut Vec::new()).map(|_| ())
    }

    fn index_pack(&self, id: PackId, skipped: &mut Vec<String>) -> Result<u64> {
        match self.pack_entries(id) {
            Ok(entries) => {
                let len = self.inner.backend.len(&id.key())?;
                self.catalog().insert_pack(id, len, &entries)?;
                Ok(entries.len() as u64)
            }
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                tracing::warn!(pack = %id, error = %Chain(&e), "pack trailer unreadable; not indexed");
                skipped.push(format!("pack {id}: {}", Chain(&e)));
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    fn reconcile_backups(&self, skipped: &mut Vec<String>) -> Result<u64> {
        let stored: HashSet<BackupId> = self.manifest_ids()?.into_iter().collect();
        let rows = self.catalog().backups(None)?;
        let known: HashSet<BackupId> = rows.iter().map(|r| r.id.clone()).collect();
        for gone in known.difference(&stored) {
            self.catalog().remove_backup(gone)?;
        }
        let protected = self.protected_set()?;
        let mut added = 0;
        for id in stored.difference(&known) {
            match self.manifest(id) {
                Ok(m) => {
                    self.catalog()
                        .insert_backup(&m, protected.contains(id.as_str()))?;
                    added += 1;
                }
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    tracing::warn!(backup = %id, error = %Chain(&e), "manifest unreadable; not listed");
                    skipped.push(format!("backup {id}: {}", Chain(&e)));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(added)
    }

    /// Rebuild every rebuildable catalog table from the repository alone.
    pub fn rebuild_catalog(&self) -> Result<RebuildReport> {
        let _lock = self.lock(LockMode::Shared, true)?;
        self.catalog().clear_derived()?;
        let mut r = RebuildReport::default();
        for id in self.stored_packs()? {
            r.blobs += self.index_pack(id, &mut r.skipped)?;
            r.packs += 1;
        }
        r.backups = self.reconcile_backups(&mut r.skipped)?;
        tracing::info!(packs = r.packs, backups = r.backups, "catalog rebuilt");
        Ok(r)
    }
}
