//! The ingest pipeline of one backup: hash/compress workers and the store thread.
//!
//! Callers push chunk jobs into a bounded channel; `workers` threads detect zeros, hash,
//! look the digest up (parent index, open pack, catalog) and compress new chunks; one store
//! thread appends new blobs to the open pack, hands full packs to a sealer thread, records
//! each position's digest in its disk's index (`writer::index`) and appends the index blocks
//! that index finishes to the same packs. Owns the threads and channels; does not own commit
//! (see `writer`).

use super::index::{BlockSink, DiskIndex, ParentIndex};
use crate::db::Catalog;
use crate::error::{Error, Result};
use crate::format::blob::{self, BlobKind};
use crate::format::index;
use crate::format::manifest::BackupStats;
use crate::format::pack::PackBuilder;
use crate::ids::ChunkDigest;
use crate::repo::Repository;
use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Chunks handed over in one job or outcome: one channel hand-off (and wake-up) per batch
/// rather than per chunk.
pub(crate) const BATCH_CHUNKS: usize = 16;

/// A run of chunks to ingest: `buf[start..end]` cut in `chunk_size` pieces (the last may be
/// short) holds positions `index..` of disk `disk`.
pub(crate) struct Job {
    pub disk: usize,
    pub index: u64,
    pub buf: Arc<Vec<u8>>,
    pub start: usize,
    pub end: usize,
    pub chunk_size: usize,
}

/// One position's result: its digest, and the encoded blob and raw length if it is new.
pub(crate) struct Item {
    pub index: u64,
    pub digest: ChunkDigest,
    pub new_blob: Option<(Vec<u8>, u64)>,
}

/// What a worker (or the caller, for zeros) tells the store thread.
pub(crate) enum Outcome {
    Set {
        disk: usize,
        items: Vec<Item>,
    },
    Failed(Error),
    /// Every position is in: finish the index blocks (sent last, by `Pipeline::finish`).
    Finish,
}

/// Everything the store thread hands back at the end.
pub(crate) struct StoreState {
    pub disks: Vec<DiskIndex>,
    /// Each disk's index block ids, once finished.
    pub blocks: Vec<Vec<ChunkDigest>>,
    /// Bytes of the index blobs written.
    pub meta: u64,
    pub pack: PackBuilder,
    pub stats: BackupStats,
    /// The first failure (shared with [`Pipeline::failure`]).
    pub error: Option<Arc<Error>>,
}

/// Shared state workers read.
struct Shared {
    repo: Repository,
    parents: Vec<Arc<ParentIndex>>,
    pending: Mutex<HashSet<ChunkDigest>>,
    failed: Mutex<Option<Arc<Error>>>,
    level: i32,
}

/// A running pipeline.
pub(crate) struct Pipeline {
    jobs: Option<SyncSender<Job>>,
    outcomes: Option<SyncSender<Outcome>>,
    workers: Vec<JoinHandle<()>>,
    store: Option<JoinHandle<StoreState>>,
    shared: Arc<Shared>,
}

impl Pipeline {
    /// Start workers and the store thread. `parents[d]` is the parent's index of disk `d`
    /// (empty if none); `disks` start as views of them.
    pub fn start(
        repo: &Repository,
        parents: Vec<Arc<ParentIndex>>,
        disks: Vec<DiskIndex>,
    ) -> Result<Self> {
        let n = repo.inner.opts.worker_count();
        let (job_tx, job_rx) = sync_channel::<Job>(n * 8);
        let (out_tx, out_rx) = sync_channel::<Outcome>(n * 8);
        let shared = Arc::new(Shared {
            repo: repo.clone(),
            parents,
            pending: Mutex::new(HashSet::new()),
            failed: Mutex::new(None),
            level: repo.config().zstd_level,
        });
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            let cat = Catalog::open(&repo.inner.opts.catalog_path)?;
            let (rx, tx, sh) = (job_rx.clone(), out_tx.clone(), shared.clone());
            workers.push(spawn("sluice-hash", move || {
                worker_loop(&sh, &cat, &rx, &tx)
            })?);
        }
        let sh = shared.clone();
        let store = spawn("sluice-store", move || store_loop(sh, disks, out_rx))?;
        Ok(Pipeline {
            jobs: Some(job_tx),
            outcomes: Some(out_tx),
            workers,
            store: Some(store),
            shared,
        })
    }

    /// The first failure so far, if any.
    pub fn failure(&self) -> Option<Arc<Error>> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queue a chunk (blocks while the queue is full).
    pub fn send_job(&self, job: Job) -> Result<()> {
        let tx = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::invalid("backup writer finished"))?;
        tx.send(job)
            .map_err(|_| Error::new(crate::ErrorKind::Io, "ingest pipeline stopped"))
    }

    /// Record a position directly (zeros, parent chunks).
    pub fn send_outcome(&self, o: Outcome) -> Result<()> {
        let tx = self
            .outcomes
            .as_ref()
            .ok_or_else(|| Error::invalid("backup writer finished"))?;
        tx.send(o)
            .map_err(|_| Error::new(crate::ErrorKind::Io, "ingest pipeline stopped"))
    }

    /// Drain every thread, finish the index blocks, stop; returns the store state.
    pub fn finish(mut self) -> Result<StoreState> {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // Sent after the workers' last outcomes, so it is the last thing the store sees.
        if let Some(tx) = self.outcomes.take() {
            let _ = tx.send(Outcome::Finish);
        }
        self.stop()
            .ok_or_else(|| Error::new(crate::ErrorKind::Io, "ingest store thread panicked"))
    }

    fn stop(&mut self) -> Option<StoreState> {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.outcomes.take();
        self.store.take().and_then(|s| s.join().ok())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A named thread (names show in `perf`, `top -H` and panics).
fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io(format!("starting thread {name}"), e))
}

fn worker_loop(sh: &Shared, cat: &Catalog, rx: &Mutex<Receiver<Job>>, tx: &SyncSender<Outcome>) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let out = process(sh, cat, &job).unwrap_or_else(Outcome::Failed);
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Hash a job's chunks, keep those equal to the parent's or already known (pending packs,
/// then one catalog query for the whole batch), and encode the rest.
fn process(sh: &Shared, cat: &Catalog, job: &Job) -> Result<Outcome> {
    let data = &job.buf[job.start..job.end];
    let chunks: Vec<&[u8]> = data.chunks(job.chunk_size).collect();
    let parent = &sh.parents[job.disk];
    let mut block = None;
    let mut items = Vec::with_capacity(chunks.len());
    let mut ask = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let index = job.index + i as u64;
        let digest = if is_zero(c) {
            ChunkDigest::ZERO
        } else {
            ChunkDigest::of(c)
        };
        if !digest.is_zero() && !parent_has(parent, index, &digest, &mut block) {
            ask.push(i);
        }
        items.push(Item {
            index,
            digest,
            new_blob: None,
        });
    }
    for i in unknown(sh, cat, &items, ask)? {
        let b = blob::encode_hashed(BlobKind::Chunk, items[i].digest, chunks[i], sh.level)?;
        items[i].new_blob = Some((b, chunks[i].len() as u64));
    }
    Ok(Outcome::Set {
        disk: job.disk,
        items,
    })
}

/// Whether the parent has `digest` at `index`; `cur` keeps the last parent block read. A
/// parent block that cannot be read is only a missed shortcut here: the catalog answers (the
/// store thread reports the error when it records the position).
fn parent_has(
    parent: &ParentIndex,
    index: u64,
    digest: &ChunkDigest,
    cur: &mut Option<(u64, Arc<Vec<ChunkDigest>>)>,
) -> bool {
    let Some((b, k)) = parent.position(index) else {
        return false;
    };
    if cur.as_ref().is_none_or(|(at, _)| *at != b) {
        *cur = parent.block(b).ok().map(|v| (b, v));
    }
    cur.as_ref().and_then(|(_, v)| v.get(k)) == Some(digest)
}

/// Of the items at `ask`, those whose digest is neither pending in a pack being built nor in
/// the catalog, nor repeated earlier in the batch.
fn unknown(sh: &Shared, cat: &Catalog, items: &[Item], mut ask: Vec<usize>) -> Result<Vec<usize>> {
    if ask.is_empty() {
        return Ok(ask);
    }
    {
        let p = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
        ask.retain(|&i| !p.contains(&items[i].digest));
    }
    let digests: Vec<ChunkDigest> = ask.iter().map(|&i| items[i].digest).collect();
    let known = cat.known_among(&digests)?;
    let mut out: Vec<usize> = Vec::with_capacity(ask.len());
    for (&i, k) in ask.iter().zip(known) {
        if !k && !out.iter().any(|&j| items[j].digest == items[i].digest) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Whether `d` is all zero bytes (vectorises: OR-folds 256-byte runs).
pub(crate) fn is_zero(d: &[u8]) -> bool {
    let mut it = d.chunks_exact(256);
    for c in &mut it {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|&b| b == 0)
}

/// Receives outcomes; full packs go to a sealer thread (one pack queued at most) so that
/// writing and syncing a pack overlaps with ingesting the next.
fn store_loop(sh: Arc<Shared>, disks: Vec<DiskIndex>, rx: Receiver<Outcome>) -> StoreState {
    let (seal_tx, seal_rx) = sync_channel::<PackBuilder>(1);
    let (spare_tx, spare_rx) = sync_channel::<Vec<u8>>(2);
    let sealer_sh = sh.clone();
    let sealer = std::thread::Builder::new()
        .name("sluice-seal".into())
        .spawn(move || -> Result<()> {
            for p in seal_rx {
                let buf = seal(&sealer_sh.repo, &sealer_sh.pending, p)?;
                // Hand the buffer back for a later pack; drop it if two are waiting.
                if buf.capacity() > 0 {
                    let _ = spare_tx.try_send(buf);
                }
            }
            Ok(())
        });
    let sealer = match sealer {
        Ok(s) => s,
        Err(e) => {
            let mut st = StoreState {
                disks,
                blocks: Vec::new(),
                meta: 0,
                pack: PackBuilder::new(),
                stats: BackupStats::default(),
                error: None,
            };
            record_failure(&sh, &mut st, Error::io("starting pack sealer thread", e));
            return st;
        }
    };
    let mut st = StoreState {
        disks,
        blocks: Vec::new(),
        meta: 0,
        pack: new_pack(&sh),
        stats: BackupStats::default(),
        error: None,
    };
    for o in rx {
        if st.error.is_some() {
            continue;
        }
        if let Err(e) = apply(&sh, &mut st, o, &seal_tx, &spare_rx) {
            record_failure(&sh, &mut st, e);
        }
    }
    drop(seal_tx);
    match sealer.join() {
        Ok(Ok(())) => {}
        // The sealer's own error (e.g. ENOSPC writing a pack) is the cause of the "stopped"
        // the store loop saw when it could no longer hand it a pack: it replaces it.
        Ok(Err(e)) => {
            if st.error.as_deref().is_some_and(is_sealer_stopped) {
                st.error = None;
            }
            record_failure(&sh, &mut st, e)
        }
        Err(_) => record_failure(
            &sh,
            &mut st,
            Error::new(crate::ErrorKind::Io, "pack sealer panicked"),
        ),
    }
    st
}

fn record_failure(sh: &Shared, st: &mut StoreState, e: Error) {
    if st.error.is_none() {
        let e = Arc::new(e);
        *sh.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        st.error = Some(e);
    }
}

fn apply(
    sh: &Shared,
    st: &mut StoreState,
    o: Outcome,
    seal_tx: &SyncSender<PackBuilder>,
    spare_rx: &Receiver<Vec<u8>>,
) -> Result<()> {
    let (disk, items) = match o {
        Outcome::Failed(e) => return Err(e),
        Outcome::Finish => return finish_indexes(sh, st, (seal_tx, spare_rx)),
        Outcome::Set { disk, items } => (disk, items),
    };
    for it in items {
        st.stats.chunks_written += 1;
        match it.new_blob {
            _ if it.digest.is_zero() => st.stats.chunks_zero += 1,
            Some((b, raw)) => add_blob(sh, st, it.digest, b, raw, (seal_tx, spare_rx))?,
            None => st.stats.chunks_dedup += 1,
        }
        // A position that keeps the parent's digest leaves its index block as the parent
        // wrote it.
        let mut sink = PackSink {
            sh,
            pack: &mut st.pack,
            meta: &mut st.meta,
            chans: (seal_tx, spare_rx),
        };
        st.disks[disk].set(it.index, it.digest, &mut sink)?;
    }
    Ok(())
}

/// Finish every disk's index: the blocks not finished yet, in order.
fn finish_indexes(sh: &Shared, st: &mut StoreState, chans: Chans<'_>) -> Result<()> {
    for d in st.disks.iter_mut() {
        let mut sink = PackSink {
            sh,
            pack: &mut st.pack,
            meta: &mut st.meta,
            chans,
        };
        st.blocks.push(d.finish(&mut sink)?);
    }
    Ok(())
}

/// The sealer's channels: full packs out, spare buffers back.
type Chans<'a> = (&'a SyncSender<PackBuilder>, &'a Receiver<Vec<u8>>);

/// Finished index blocks go into the open pack, each distinct block once: skipped if a pack
/// being built or the catalog already holds it.
struct PackSink<'a> {
    sh: &'a Shared,
    pack: &'a mut PackBuilder,
    meta: &'a mut u64,
    chans: Chans<'a>,
}

impl BlockSink for PackSink<'_> {
    fn write_block(&mut self, ids: &[ChunkDigest]) -> Result<ChunkDigest> {
        let payload = index::encode(ids);
        let d = ChunkDigest::of(&payload);
        // Pending first: a sealed pack is in the catalog before it leaves `pending`.
        let pending = self
            .sh
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&d);
        if pending || self.sh.repo.catalog().lookup(&d)?.is_some() {
            return Ok(d);
        }
        let b = blob::encode(BlobKind::Index, d, &payload, self.sh.level)?;
        self.sh
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d);
        *self.meta += b.len() as u64;
        push(self.sh, self.pack, d, BlobKind::Index, &b, self.chans)?;
        Ok(d)
    }
}

/// An open pack reserved for a full pack plus one more blob, so it never regrows.
fn new_pack(sh: &Shared) -> PackBuilder {
    let c = sh.repo.config();
    PackBuilder::with_capacity(c.pack_target as usize + c.chunk_size as usize + 4096)
}

fn add_blob(
    sh: &Shared,
    st: &mut StoreState,
    digest: ChunkDigest,
    b: Vec<u8>,
    raw: u64,
    chans: Chans<'_>,
) -> Result<()> {
    if !sh
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(digest)
    {
        st.stats.chunks_dedup += 1;
        return Ok(());
    }
    st.stats.chunks_new += 1;
    st.stats.bytes_new_raw += raw;
    st.stats.bytes_stored += b.len() as u64;
    push(sh, &mut st.pack, digest, BlobKind::Chunk, &b, chans)
}

/// What the store loop sees when the sealer thread has ended (it failed: its own error,
/// returned by `join`, says why).
const SEALER_STOPPED: &str = "pack sealer stopped";

fn is_sealer_stopped(e: &Error) -> bool {
    e.to_string() == SEALER_STOPPED
}

/// Append a blob to the open pack; a full pack goes to the sealer.
fn push(
    sh: &Shared,
    pack: &mut PackBuilder,
    digest: ChunkDigest,
    kind: BlobKind,
    b: &[u8],
    (seal_tx, spare_rx): Chans<'_>,
) -> Result<()> {
    pack.add(digest, kind, b);
    if pack.len() as u64 >= sh.repo.config().pack_target {
        let next = match spare_rx.try_recv() {
            Ok(buf) => PackBuilder::reuse(buf),
            Err(_) => new_pack(sh),
        };
        let full = std::mem::replace(pack, next);
        seal_tx
            .send(full)
            .map_err(|_| Error::new(crate::ErrorKind::Io, SEALER_STOPPED))?;
    }
    Ok(())
}

/// Seal `pack`, then drop its digests from `pending` (they are in the catalog now).
/// Returns the pack's buffer for reuse.
pub(crate) fn seal(
    repo: &Repository,
    pending: &Mutex<HashSet<ChunkDigest>>,
    pack: PackBuilder,
) -> Result<Vec<u8>> {
    if pack.is_empty() {
        return Ok(Vec::new());
    }
    let (_, entries, buf) = repo.seal_pack_keep(pack)?;
    let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
    for e in entries {
        p.remove(&e.digest);
    }
    Ok(buf)
}

impl Pipeline {
    /// Seal the open pack of a finished pipeline's state.
    pub fn seal_rest(repo: &Repository, pack: PackBuilder) -> Result<()> {
        seal(repo, &Mutex::new(HashSet::new()), pack).map(drop)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 7];
        assert!(super::is_zero(&v));
        v[65536 + 3] = 1;
        assert!(!super::is_zero(&v));
        v[65536 + 3] = 0;
        v[100] = 1;
        assert!(!super::is_zero(&v));
    }
}
