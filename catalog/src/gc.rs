//! Prune (apply retention) and garbage collection (delete or repack packs of dead blobs).
//!
//! Owns the mark-and-sweep. GC takes the exclusive repository lock, so no backup can be
//! running while it marks and sweeps: a backup that began first holds the shared lock and
//! GC waits (or fails with `Locked`); a backup that begins later waits for GC to finish.
//! Every step is crash-safe: new packs are durable before old ones are deleted, and the
//! catalog forgets a pack before storage deletes it (reopen re-indexes leftovers).

use crate::backend::LockMode;
use crate::bloom::Bloom;
use crate::db::Location;
use crate::error::{Error, ErrorKind, Result};
use crate::format::blob;
use crate::format::index;
use crate::format::pack::{PackBuilder, PackEntry};
use crate::ids::{BackupId, PackId};
use crate::repo::Repository;
use crate::retention::{self, Candidate, Decision, RetentionPolicy};
use crate::scratch::Scratch;
use std::collections::BTreeMap;

/// What prune decided and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Every decision, per backup.
    pub decisions: Vec<Decision>,
    /// Backups removed (empty on a dry run).
    pub removed: Vec<BackupId>,
}

/// GC settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcOptions {
    /// Repack a pack when at least this fraction of its bytes is dead (0..=1).
    pub repack_threshold: f64,
    /// Wait for running backups instead of failing with `Locked`.
    pub wait: bool,
    /// Report only.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            repack_threshold: 0.5,
            wait: false,
            dry_run: false,
        }
    }
}

/// What GC found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Distinct live blobs (chunks and index blocks), as the mark filter counted them:
    /// may fall short by its false-positive rate (about 0.8 %, see `bloom`).
    pub live_blobs: u64,
    /// Packs examined.
    pub packs: u64,
    /// Packs deleted (all dead).
    pub packs_deleted: u64,
    /// Packs rewritten without their dead blobs.
    pub packs_repacked: u64,
    /// Bytes of storage freed.
    pub bytes_freed: u64,
}

/// A held backup (see `hold`) is kept whatever the policy says.
fn keep_in_use(d: &mut Decision) {
    d.keep = true;
    d.reasons.push("in-use");
}

impl Repository {
    /// Apply `policy` to each VM's backups (or only `vm_uuid`'s); remove what it drops. A
    /// held backup is kept (reason `in-use`).
    pub fn prune(
        &self,
        vm_uuid: Option<&str>,
        policy: &RetentionPolicy,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let _lock = self.lock(LockMode::Shared, true)?;
        let rows = self.backups(vm_uuid)?;
        let mut by_vm: BTreeMap<&str, Vec<Candidate>> = BTreeMap::new();
        for r in &rows {
            by_vm.entry(&r.vm_uuid).or_default().push(Candidate {
                id: r.id.clone(),
                time: r.started,
                protected: r.protected,
            });
        }
        let mut rep = PruneReport::default();
        for cands in by_vm.values() {
            rep.decisions.extend(retention::apply(cands, policy));
        }
        let held: Vec<BackupId> = self.held().into_iter().map(|(id, _)| id).collect();
        for d in rep.decisions.iter_mut().filter(|d| held.contains(&d.id)) {
            keep_in_use(d);
        }
        if !dry_run {
            for d in rep.decisions.iter_mut().filter(|d| !d.keep) {
                match self.remove_backup(&d.id) {
                    Ok(()) => rep.removed.push(d.id.clone()),
                    // Held since the decision (an instant recovery started): kept.
                    Err(e) if e.kind() == ErrorKind::Conflict => keep_in_use(d),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(rep)
    }

    /// Mark every blob committed backups reference; delete all-dead packs, repack
    /// mostly-dead ones. Takes the exclusive lock (see the crate docs).
    pub fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let _lock = self.lock(LockMode::Exclusive, opts.wait)?;
        let (live, live_blobs) = self.mark()?;
        let mut rep = GcReport {
            live_blobs,
            ..Default::default()
        };
        let mut out = PackBuilder::new();
        for pack in self.stored_packs()? {
            rep.packs += 1;
            self.sweep_pack(pack, &live, &opts, &mut out, &mut rep)?;
        }
        self.seal_moved(out)?;
        tracing::info!(
            deleted = rep.packs_deleted,
            repacked = rep.packs_repacked,
            "gc finished"
        );
        Ok(rep)
    }

    /// Every index block and chunk referenced by a committed manifest, in a Bloom filter
    /// sized from the catalog's blob count (memory ~1.25 bytes per blob, capped; a false
    /// positive keeps a dead blob, never drops a live one), and how many it took in. Index
    /// blocks already walked are skipped exactly, through the on-disk scratch set: a false
    /// "seen" there would leave chunks unmarked. Any unreadable manifest or index block
    /// stops GC: it cannot know what that backup needs.
    fn mark(&self) -> Result<(Bloom, u64)> {
        let scratch = Scratch::open(&self.inner.opts.catalog_path)?;
        let blobs = self.catalog().chunk_count()?;
        let seed = (crate::ids::random_u32() as u64) << 32 | crate::ids::random_u32() as u64;
        let mut live = Bloom::for_items(blobs, seed)?;
        tracing::debug!(blobs, filter_bytes = live.bytes(), "gc mark filter");
        let mut count = 0u64;
        for id in self.manifest_ids()? {
            let m = self.manifest(&id).map_err(|e| e.context("gc stopped"))?;
            for d in &m.disks {
                let chunks = index::chunk_count(d.size, d.chunk_size);
                for (b, bid) in d.index_blocks.iter().enumerate() {
                    if !scratch.first_visit(bid)? {
                        continue;
                    }
                    count += live.insert(bid) as u64;
                    let n = index::ids_in_block(b as u64, chunks, d.index_block_len);
                    let ids = self
                        .load_index_block(bid, n)
                        .map_err(|e| e.context(format!("gc stopped: backup {id}")))?;
                    for x in ids.iter().filter(|x| !x.is_zero()) {
                        count += live.insert(x) as u64;
                    }
                }
            }
        }
        Ok((live, count))
    }

    fn sweep_pack(
        &self,
        pack: PackId,
        live: &Bloom,
        opts: &GcOptions,
        out: &mut PackBuilder,
        rep: &mut GcReport,
    ) -> Result<()> {
        let entries = self.pack_entries(pack)?;
        let total = self.inner.backend.len(&pack.key())?;
        let keep: Vec<PackEntry> = entries
            .iter()
            .cloned()
            .filter(|e| live.contains(&e.digest) && self.located_here(e, pack))
            .collect();
        let live_bytes: u64 = keep.iter().map(|e| e.length as u64).sum();
        // Dead share of the blobs, not of the file: a small pack's header and trailer are not
        // garbage, and counting them made a one-blob pack "mostly dead" forever.
        let blob_bytes: u64 = entries.iter().map(|e| e.length as u64).sum();
        let dead = 1.0 - live_bytes as f64 / blob_bytes.max(1) as f64;
        if !keep.is_empty() && dead < opts.repack_threshold {
            return Ok(());
        }
        if opts.dry_run {
            return Ok(());
        }
        if keep.is_empty() {
            rep.packs_deleted += 1;
        } else {
            rep.packs_repacked += 1;
            let sealed = self.move_blobs(pack, &keep, out)?;
            // Packs are named by their content: a repack that wrote exactly this pack again
            // produced the same id, and deleting "the old pack" would delete the new one.
            if sealed.contains(&pack) {
                return Ok(());
            }
        }
        rep.bytes_freed += total - live_bytes;
        self.catalog().remove_pack(pack)?;
        self.inner.backend.delete(&pack.key())
    }

    /// Whether the catalog's copy of `e.digest` is this one (other copies are dead).
    fn located_here(&self, e: &PackEntry, pack: PackId) -> bool {
        match self.catalog().lookup(&e.digest) {
            Ok(Some(l)) => l.pack == pack,
            _ => true,
        }
    }

    /// Copy live blobs (checked) into `out`, sealing it when full. Sealed copies are durable
    /// and relocated before the old pack goes.
    fn move_blobs(
        &self,
        pack: PackId,
        keep: &[PackEntry],
        out: &mut PackBuilder,
    ) -> Result<Vec<PackId>> {
        let mut sealed = Vec::new();
        for e in keep {
            let b = self
                .inner
                .backend
                .get_range(&pack.key(), e.offset, e.length as usize)?;
            blob::decode(&b, e.digest).map_err(|err| {
                Error::corrupt(format!("gc refuses to repack pack {pack}")).with_source(err)
            })?;
            out.add(e.digest, e.kind, &b);
            if out.len() as u64 >= self.config().pack_target {
                sealed.extend(self.seal_moved(std::mem::take(out))?);
            }
        }
        // Everything still in `out` must be durable before the old pack is deleted.
        sealed.extend(self.seal_moved(std::mem::take(out))?);
        Ok(sealed)
    }

    fn seal_moved(&self, out: PackBuilder) -> Result<Option<PackId>> {
        if out.is_empty() {
            return Ok(None);
        }
        let (id, entries) = self.seal_pack(out)?;
        let cat = self.catalog();
        for e in entries {
            let loc = Location {
                pack: id,
                offset: e.offset,
                length: e.length,
            };
            cat.relocate(&e.digest, loc, e.kind)?;
        }
        Ok(Some(id))
    }
}
