//! The index of one disk while a backup writes it, in memory that does not grow with the disk.
//!
//! Owns which index blocks changed against the parent and when each is finished. The
//! parent's index is read block by block on demand through a small cache ([`ParentIndex`],
//! shared with the hash workers) instead of whole (32 B per chunk position: 512 MiB for a
//! 1 TiB disk at 64 KiB). A block is *open* while positions of it are being put: a clean open
//! block records only which positions were put; the first position whose digest differs from
//! the parent's copies the parent's block out (dirty). A block whose every position has been
//! put is finished at once: a dirty one is encoded and handed to a [`BlockSink`] (the open
//! pack), a clean one keeps the parent's block id. At most [`OPEN_BLOCKS`] blocks are open;
//! opening one more evicts the least recently used: a clean one is dropped (unwritten
//! positions keep the parent's ids anyway), a dirty one is spilled to an unnamed scratch file
//! beside the catalog and read back if a later position reopens it. [`DiskIndex::finish`]
//! finishes the rest in block order. Block ids and written blobs are exactly those of cutting
//! the whole chunk-id list into blocks: a block that no position changed keeps the parent's
//! id when it has as many ids as the parent's block (same content, same id), and is
//! re-encoded only where the disk shrank or grew.
//!
//! Memory per disk: [`OPEN_BLOCKS`] open blocks (each holding its own ids, or the parent's
//! while clean) and [`PARENT_CACHE`] cached parent blocks (32 B per id, 1024 ids per block by
//! default: at most 1.5 MiB), plus about 80 B per index block for
//! the parent's and the new block ids and the spill slots (the manifest lists the block ids
//! anyway: 100 M chunks have ~98 k blocks, ~8 MB). Callers that put positions roughly in
//! order (the proxy: 1 GiB windows, 16 blocks of 64 KiB chunks) never reopen a spilled block;
//! an incremental with scattered changes spills each changed block once (32 KiB of scratch
//! per changed block, read back at commit). Does not own the index-block format
//! (`format::index`) nor the pack (`pipeline`).

use crate::error::{Error, Result};
use crate::format::index;
use crate::ids::ChunkDigest;
use crate::lru::Lru;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Index blocks a disk keeps open (being filled) at once.
pub(crate) const OPEN_BLOCKS: usize = 32;

/// Decoded parent index blocks cached per disk (shared by the workers and the store thread).
pub(crate) const PARENT_CACHE: usize = 16;

/// Reads the parent's block `b` of id `id` (exactly its ids).
pub(crate) type Loader = Box<dyn Fn(u64, &ChunkDigest) -> Result<Vec<ChunkDigest>> + Send + Sync>;

/// The parent backup's index of one disk, read block by block on demand.
pub(crate) struct ParentIndex {
    /// The parent's block ids (empty without a usable parent).
    blocks: Vec<ChunkDigest>,
    /// The parent's chunk positions.
    chunks: u64,
    block_len: u64,
    load: Loader,
    cache: Mutex<Lru<u64, Arc<Vec<ChunkDigest>>>>,
}

impl ParentIndex {
    /// A parent of `chunks` positions whose block `b` has id `blocks[b]` and is read by
    /// `load`.
    pub fn new(blocks: Vec<ChunkDigest>, chunks: u64, block_len: u32, load: Loader) -> Self {
        ParentIndex {
            blocks,
            chunks,
            block_len: block_len as u64,
            load,
            cache: Mutex::new(Lru::new(PARENT_CACHE)),
        }
    }

    /// No parent: every position is the zero chunk.
    pub fn none(block_len: u32) -> Self {
        Self::new(Vec::new(), 0, block_len, Box::new(|_, _| Ok(Vec::new())))
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru<u64, Arc<Vec<ChunkDigest>>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the parent's block `b` (empty past the parent's end).
    pub fn block(&self, b: u64) -> Result<Arc<Vec<ChunkDigest>>> {
        if b >= self.blocks.len() as u64 {
            return Ok(Arc::new(Vec::new()));
        }
        if let Some(v) = self.lru().get(&b) {
            return Ok(v);
        }
        let v = Arc::new((self.load)(b, &self.blocks[b as usize])?);
        self.lru().put(b, v.clone());
        Ok(v)
    }

    /// Block and offset in it of position `i`; `None` past the parent's end.
    pub fn position(&self, i: u64) -> Option<(u64, usize)> {
        (i < self.chunks).then(|| (i / self.block_len, (i % self.block_len) as usize))
    }
}

/// Where finished index blocks go: stores the block (unless already stored) and returns its
/// id.
pub(crate) trait BlockSink {
    fn write_block(&mut self, ids: &[ChunkDigest]) -> Result<ChunkDigest>;
}

/// A block being filled.
struct Open {
    /// `None` while every position equals the parent's.
    ids: Option<Vec<ChunkDigest>>,
    /// The parent's ids of the block while it is clean.
    parent: Option<Arc<Vec<ChunkDigest>>>,
    /// Positions put, one bit each.
    put: Vec<u64>,
    /// Number of bits set in `put`.
    puts: usize,
    /// Last use, for eviction.
    used: u64,
}

/// The index of one disk being written.
pub(crate) struct DiskIndex {
    parent: Arc<ParentIndex>,
    chunks: u64,
    block_len: u64,
    /// Ids of finished blocks.
    done: Vec<Option<ChunkDigest>>,
    open: HashMap<u64, Open>,
    tick: u64,
    spill: Spill,
}

impl DiskIndex {
    /// `chunks` positions in blocks of `block_len`, each keeping the parent's id (zero past
    /// the parent's end); dirty blocks evicted spill into a scratch file under `spill_dir`.
    pub fn new(parent: Arc<ParentIndex>, chunks: u64, block_len: u32, spill_dir: &Path) -> Self {
        let n = index::block_count(chunks, block_len) as usize;
        let block_len = block_len as u64;
        DiskIndex {
            parent,
            chunks,
            block_len,
            done: vec![None; n],
            open: HashMap::new(),
            tick: 0,
            spill: Spill::new(spill_dir, block_len),
        }
    }

    /// Number of ids in block `b`.
    fn len_of(&self, b: u64) -> usize {
        index::ids_in_block(b, self.chunks, self.block_len as u32)
    }

    /// Set position `i` (in range) to `digest`. A position of a finished block was put
    /// before (each position is put at most once; the first put stands).
    pub fn set(&mut self, i: u64, digest: ChunkDigest, sink: &mut dyn BlockSink) -> Result<()> {
        let (b, k) = (i / self.block_len, (i % self.block_len) as usize);
        if self.done[b as usize].is_some() {
            return Ok(());
        }
        if !self.open.contains_key(&b) {
            let o = self.reopen(b)?;
            self.make_room()?;
            self.open.insert(b, o);
        }
        let n = self.len_of(b);
        self.tick += 1;
        let tick = self.tick;
        let o = self
            .open
            .get_mut(&b)
            .ok_or_else(|| Error::invalid("index block vanished"))?;
        o.used = tick;
        if o.put[k / 64] & (1 << (k % 64)) == 0 {
            o.put[k / 64] |= 1 << (k % 64);
            o.puts += 1;
        }
        if let Some(parent) = o.parent.as_ref() {
            if parent.get(k).copied().unwrap_or(ChunkDigest::ZERO) != digest {
                let mut ids = parent.to_vec();
                ids.resize(n, ChunkDigest::ZERO);
                o.ids = Some(ids);
                o.parent = None;
            }
        }
        if let Some(ids) = o.ids.as_mut() {
            ids[k] = digest;
        }
        if o.puts == n {
            let ids = self.open.remove(&b).and_then(|o| o.ids);
            return self.finish_block(b, ids, sink);
        }
        Ok(())
    }

    /// Block `b` back from the spill, or newly opened (clean: the parent's ids at hand).
    fn reopen(&mut self, b: u64) -> Result<Open> {
        let n = self.len_of(b);
        let words = (self.block_len as usize).div_ceil(64);
        if let Some(bytes) = self.spill.take(b)? {
            return Ok(decode_open(&bytes, n, words));
        }
        Ok(Open {
            ids: None,
            parent: Some(self.parent.block(b)?),
            put: vec![0; words],
            puts: 0,
            used: 0,
        })
    }

    /// Evict the least recently used open block if the set is full.
    fn make_room(&mut self) -> Result<()> {
        if self.open.len() < OPEN_BLOCKS {
            return Ok(());
        }
        let oldest = self
            .open
            .iter()
            .min_by_key(|(_, o)| o.used)
            .map(|(k, _)| *k);
        let Some(old) = oldest.and_then(|k| self.open.remove_entry(&k)) else {
            return Ok(());
        };
        if let (k, o @ Open { ids: Some(_), .. }) = old {
            self.spill.put(k, &encode_open(&o))?;
        }
        Ok(())
    }

    /// The parent's ids of block `b` cut or padded with zero ids to this disk's length.
    fn parent_ids(&self, b: u64) -> Result<Vec<ChunkDigest>> {
        let mut ids = self.parent.block(b)?.to_vec();
        ids.resize(self.len_of(b), ChunkDigest::ZERO);
        Ok(ids)
    }

    /// Record block `b` finished with `ids` (`None`: as the parent has it).
    fn finish_block(
        &mut self,
        b: u64,
        ids: Option<Vec<ChunkDigest>>,
        sink: &mut dyn BlockSink,
    ) -> Result<()> {
        let same_shape = index::ids_in_block(b, self.parent.chunks, self.block_len as u32)
            == self.len_of(b)
            && (b as usize) < self.parent.blocks.len();
        let id = match ids {
            Some(ids) => sink.write_block(&ids)?,
            None if same_shape => self.parent.blocks[b as usize],
            None => sink.write_block(&self.parent_ids(b)?)?,
        };
        self.done[b as usize] = Some(id);
        Ok(())
    }

    /// Finish every block not finished yet, in order; the disk's block ids.
    pub fn finish(&mut self, sink: &mut dyn BlockSink) -> Result<Vec<ChunkDigest>> {
        for b in 0..self.done.len() as u64 {
            if self.done[b as usize].is_some() {
                continue;
            }
            let ids = match self.open.remove(&b) {
                Some(o) => o.ids,
                None => self
                    .spill
                    .take(b)?
                    .and_then(|bytes| decode_open(&bytes, self.len_of(b), 0).ids),
            };
            self.finish_block(b, ids, sink)?;
        }
        Ok(self.done.iter().flatten().copied().collect())
    }

    /// Blocks open in memory and spilled (for tests).
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.open.len(), self.spill.slots.len())
    }
}

/// A dirty open block as spill bytes: its ids, then its put bits.
fn encode_open(o: &Open) -> Vec<u8> {
    let ids = o.ids.as_deref().unwrap_or(&[]);
    let mut v = Vec::with_capacity(ids.len() * 32 + o.put.len() * 8);
    for id in ids {
        v.extend_from_slice(&id.0);
    }
    for w in &o.put {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// The block [`encode_open`] wrote: `n` ids and `words` words of put bits.
fn decode_open(b: &[u8], n: usize, words: usize) -> Open {
    let id = |i: usize| {
        let mut d = [0u8; 32];
        d.copy_from_slice(&b[i * 32..i * 32 + 32]);
        ChunkDigest(d)
    };
    let at = n * 32;
    let put: Vec<u64> = (0..words)
        .map(|w| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at + w * 8..at + w * 8 + 8]);
            u64::from_le_bytes(x)
        })
        .collect();
    Open {
        ids: Some((0..n).map(id).collect()),
        parent: None,
        puts: put.iter().map(|w| w.count_ones() as usize).sum(),
        put,
        used: 0,
    }
}

/// Dirty blocks evicted from memory: fixed-size slots in an unnamed file (created on first
/// use, gone when closed or when the process dies).
struct Spill {
    dir: PathBuf,
    slot_len: u64,
    file: Option<File>,
    slots: HashMap<u64, u64>,
    free: Vec<u64>,
    next: u64,
}

impl Spill {
    fn new(dir: &Path, block_len: u64) -> Self {
        Spill {
            dir: dir.to_path_buf(),
            slot_len: block_len * 32 + block_len.div_ceil(64) * 8,
            file: None,
            slots: HashMap::new(),
            free: Vec::new(),
            next: 0,
        }
    }

    fn file(&mut self) -> Result<&File> {
        if self.file.is_none() {
            self.file = Some(unnamed_file(&self.dir)?);
        }
        self.file
            .as_ref()
            .ok_or_else(|| Error::invalid("spill file missing"))
    }

    fn put(&mut self, b: u64, bytes: &[u8]) -> Result<()> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        let at = slot * self.slot_len;
        // Whole slots, so that reading one back never runs past the end of the file.
        let mut whole = bytes.to_vec();
        whole.resize(self.slot_len as usize, 0);
        self.file()?
            .write_all_at(&whole, at)
            .map_err(|e| Error::io("writing the index spill file", e))?;
        self.slots.insert(b, slot);
        Ok(())
    }

    fn take(&mut self, b: u64) -> Result<Option<Vec<u8>>> {
        let Some(slot) = self.slots.remove(&b) else {
            return Ok(None);
        };
        self.free.push(slot);
        let mut buf = vec![0u8; self.slot_len as usize];
        let at = slot * self.slot_len;
        self.file()?
            .read_exact_at(&mut buf, at)
            .map_err(|e| Error::io("reading the index spill file", e))?;
        Ok(Some(buf))
    }
}

/// A read-write file in `dir` with no name: `O_TMPFILE`, or where the filesystem lacks it a
/// named file removed at once.
fn unnamed_file(dir: &Path) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    match o.clone().custom_flags(libc::O_TMPFILE).open(dir) {
        Ok(f) => return Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
        Err(e) => {
            return Err(Error::io(
                format!("creating an index spill file in {}", dir.display()),
                e,
            ))
        }
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".sluice-spill-{}-{seq}", std::process::id()));
    let f = o
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    std::fs::remove_file(&path)
        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn d(i: u64) -> ChunkDigest {
        ChunkDigest::of(&i.to_le_bytes())
    }

    /// Blocks written, as the pipeline's sink would store them.
    #[derive(Default)]
    struct Sink {
        written: Vec<Vec<ChunkDigest>>,
        ids: HashSet<ChunkDigest>,
    }

    impl BlockSink for Sink {
        fn write_block(&mut self, ids: &[ChunkDigest]) -> Result<ChunkDigest> {
            let id = ChunkDigest::of(&index::encode(ids));
            if self.ids.insert(id) {
                self.written.push(ids.to_vec());
            }
            Ok(id)
        }
    }

    fn block_id(ids: &[ChunkDigest]) -> ChunkDigest {
        ChunkDigest::of(&index::encode(ids))
    }

    /// A parent of `ids` in blocks of `per`, counting its block loads.
    fn parent(ids: Vec<ChunkDigest>, per: u32) -> (Arc<ParentIndex>, Arc<Mutex<u64>>) {
        let blocks = ids.chunks(per as usize).map(block_id).collect();
        let loads = Arc::new(Mutex::new(0));
        let (l, n) = (loads.clone(), ids.len() as u64);
        let load: Loader = Box::new(move |b, _| {
            *l.lock().unwrap() += 1;
            Ok(ids.chunks(per as usize).nth(b as usize).unwrap().to_vec())
        });
        (Arc::new(ParentIndex::new(blocks, n, per, load)), loads)
    }

    #[test]
    fn clean_blocks_keep_the_parents_ids_and_changed_ones_are_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<ChunkDigest> = (0..10).map(d).collect();
        let (p, _) = parent(ids.clone(), 3);
        // Shrunk to 7 positions in blocks of 3: the last block is short.
        let mut x = DiskIndex::new(p.clone(), 7, 3, dir.path());
        let mut sink = Sink::default();
        x.set(1, d(1), &mut sink).unwrap();
        x.set(6, d(99), &mut sink).unwrap();
        let got = x.finish(&mut sink).unwrap();
        let want = [
            block_id(&ids[0..3]),
            block_id(&ids[3..6]),
            block_id(&[d(99)]),
        ];
        assert_eq!(got, want);
        assert_eq!(sink.written, vec![vec![d(99)]], "only the changed block");
        // Grown to 12 in blocks of 4: positions past the parent's end are zero.
        let (p, _) = parent(ids.clone(), 4);
        let mut y = DiskIndex::new(p, 12, 4, dir.path());
        let mut sink = Sink::default();
        y.set(11, ChunkDigest::ZERO, &mut sink).unwrap();
        y.set(3, d(3), &mut sink).unwrap();
        let z = ChunkDigest::ZERO;
        let got = y.finish(&mut sink).unwrap();
        assert_eq!(got[2], block_id(&[d(8), d(9), z, z]));
        assert_eq!(got[..2], [block_id(&ids[0..4]), block_id(&ids[4..8])]);
        assert_eq!(sink.written, vec![vec![d(8), d(9), z, z]]);
    }

    #[test]
    fn complete_blocks_finish_at_once_and_evicted_ones_spill_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let per = 4u32;
        let n = (OPEN_BLOCKS as u64 + 8) * per as u64;
        let ids: Vec<ChunkDigest> = (0..n).map(d).collect();
        let (p, loads) = parent(ids.clone(), per);
        let mut x = DiskIndex::new(p, n, per, dir.path());
        let mut sink = Sink::default();
        // Block 0 put whole with one change: finished and written at once.
        for i in 0..4 {
            x.set(i, if i == 2 { d(1000) } else { d(i) }, &mut sink)
                .unwrap();
        }
        assert_eq!(sink.written.len(), 1);
        assert_eq!(x.held(), (0, 0));
        // A later put of a finished position does not change it.
        x.set(2, d(2000), &mut sink).unwrap();
        // One changed position in every other block: more than OPEN_BLOCKS stay open.
        let mut want = ids.clone();
        want[2] = d(1000);
        for b in 1..n / per as u64 {
            let i = b * per as u64 + 1;
            want[i as usize] = d(5000 + i);
            x.set(i, want[i as usize], &mut sink).unwrap();
        }
        let (open, spilled) = x.held();
        assert_eq!(
            (open, spilled),
            (OPEN_BLOCKS, n as usize / 4 - 1 - OPEN_BLOCKS)
        );
        // Reopen a spilled block (block 1) and change a second position of it.
        want[6] = d(6006);
        x.set(6, d(6006), &mut sink).unwrap();
        assert_eq!(
            x.held(),
            (OPEN_BLOCKS, spilled),
            "one back in, the oldest out"
        );
        let got = x.finish(&mut sink).unwrap();
        let model: Vec<ChunkDigest> = want.chunks(per as usize).map(block_id).collect();
        assert_eq!(got, model);
        assert_eq!(sink.written.len(), model.len(), "every block changed once");
        assert!(
            *loads.lock().unwrap() <= 2 * model.len() as u64,
            "parent blocks read on demand"
        );
    }

    #[test]
    fn no_parent_means_zero_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(ParentIndex::none(4));
        let mut x = DiskIndex::new(p, 6, 4, dir.path());
        let mut sink = Sink::default();
        x.set(5, d(5), &mut sink).unwrap();
        let z = ChunkDigest::ZERO;
        let got = x.finish(&mut sink).unwrap();
        assert_eq!(got, vec![block_id(&[z; 4]), block_id(&[z, d(5)])]);
    }
}
