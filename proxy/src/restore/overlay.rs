//! Copy-on-write overlay of a writable export: a local sparse file the size of the disk plus
//! two in-memory bitmaps over 4 KiB blocks (written to the overlay; known to be zero).
//!
//! Owns every byte a client writes. Writes, write-zeroes and trims land only here, never in
//! the repository; a partial write into a block not yet in the overlay first copies that block
//! from the backup (read-modify-write, serialized by one lock). Zeroed blocks are punched out
//! of the file. The file is removed when the overlay is dropped unless it was kept.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use catalog::DiskReader;

use super::bits::Bits;
use super::error::{Error, Result};
use crate::nbd::ExportError;

/// Granularity of the overlay bitmaps.
pub const OVERLAY_BLOCK: u64 = 4096;

/// Where the bytes of a run of the export come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The backup.
    Base,
    /// The overlay file.
    Data,
    /// Zeroes written into the overlay.
    Zero,
}

struct State {
    present: Bits,
    zero: Bits,
}

pub(crate) struct Overlay {
    file: File,
    path: PathBuf,
    size: u64,
    keep: AtomicBool,
    state: RwLock<State>,
    writer: Mutex<()>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Overlay {
    /// A new, empty sparse overlay file in `dir` for a disk of `size` bytes.
    pub(crate) fn create(dir: &Path, stem: &str, size: u64, keep: bool) -> Result<Overlay> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{stem}.{}.{n}.overlay", std::process::id()));
        let what = || format!("create overlay {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(what(), e))?;
        file.set_len(size).map_err(|e| Error::io(what(), e))?;
        let blocks = size.div_ceil(OVERLAY_BLOCK);
        Ok(Overlay {
            file,
            path,
            size,
            keep: AtomicBool::new(keep),
            state: RwLock::new(State {
                present: Bits::new(blocks),
                zero: Bits::new(blocks),
            }),
            writer: Mutex::new(()),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn keep(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    /// Number of 4 KiB blocks held by the overlay.
    pub(crate) fn blocks_written(&self) -> u64 {
        self.state().present.count()
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn source_of(st: &State, block: u64) -> Source {
        match (st.present.get(block), st.zero.get(block)) {
            (false, _) => Source::Base,
            (true, true) => Source::Zero,
            (true, false) => Source::Data,
        }
    }

    /// `[offset, offset+len)` cut into runs of one source: (source, start, length).
    pub(crate) fn segments(&self, offset: u64, len: u64) -> Vec<(Source, u64, u64)> {
        let st = self.state();
        let end = offset + len;
        let mut out: Vec<(Source, u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / OVERLAY_BLOCK;
            let n = ((block + 1) * OVERLAY_BLOCK).min(end) - pos;
            let src = Self::source_of(&st, block);
            match out.last_mut() {
                Some(last) if last.0 == src => last.2 += n,
                _ => out.push((src, pos, n)),
            }
            pos += n;
        }
        out
    }

    /// Read overlay bytes at `offset`.
    pub(crate) fn read_data(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), ExportError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.failed("read", e))
    }

    fn failed(&self, what: &str, e: std::io::Error) -> ExportError {
        ExportError::io(format!("{what} overlay {}: {e}", self.path.display()))
    }

    fn mark(&self, first: u64, end_block: u64, zero: bool) {
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        for b in first..end_block {
            st.present.set(b, true);
            st.zero.set(b, zero);
        }
    }

    /// Write `data` at `offset` (whole blocks directly, partial blocks read-modify-write).
    pub(crate) fn write(
        &self,
        base: &DiskReader,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), ExportError> {
        let _w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.apply(base, offset, data.len() as u64, Some(data))
    }

    /// Make `[offset, offset+len)` read as zeroes (whole blocks are punched out of the file).
    pub(crate) fn zero(
        &self,
        base: &DiskReader,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), ExportError> {
        let _w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.apply(base, offset, len, None)
    }

    /// `data == None` writes zeroes. Caller holds the writer lock.
    fn apply(
        &self,
        base: &DiskReader,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> std::result::Result<(), ExportError> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / OVERLAY_BLOCK;
            let bstart = block * OVERLAY_BLOCK;
            let bend = (bstart + OVERLAY_BLOCK).min(self.size);
            if pos == bstart && end >= bend {
                let run_end = if end == self.size {
                    end
                } else {
                    end - end % OVERLAY_BLOCK
                };
                let piece = data.map(|d| &d[(pos - offset) as usize..(run_end - offset) as usize]);
                self.write_full(pos, run_end, piece)?;
                pos = run_end;
            } else {
                let piece_end = end.min(bend);
                let zeros;
                let piece = match data {
                    Some(d) => &d[(pos - offset) as usize..(piece_end - offset) as usize],
                    None => {
                        zeros = vec![0u8; (piece_end - pos) as usize];
                        &zeros[..]
                    }
                };
                self.patch(base, block, pos, piece)?;
                pos = piece_end;
            }
        }
        Ok(())
    }

    /// Whole blocks `[pos, run_end)`: data, or zeroes (`None`).
    fn write_full(
        &self,
        pos: u64,
        run_end: u64,
        data: Option<&[u8]>,
    ) -> std::result::Result<(), ExportError> {
        match data {
            Some(d) => self
                .file
                .write_all_at(d, pos)
                .map_err(|e| self.failed("write", e))?,
            None => self.punch(pos, run_end - pos),
        }
        self.mark(
            pos / OVERLAY_BLOCK,
            run_end.div_ceil(OVERLAY_BLOCK),
            data.is_none(),
        );
        Ok(())
    }

    /// Part of one block: bring the block into the overlay first if needed.
    fn patch(
        &self,
        base: &DiskReader,
        block: u64,
        pos: u64,
        piece: &[u8],
    ) -> std::result::Result<(), ExportError> {
        let src = Self::source_of(&self.state(), block);
        if src == Source::Data {
            self.file
                .write_all_at(piece, pos)
                .map_err(|e| self.failed("write", e))?;
            return Ok(());
        }
        let bstart = block * OVERLAY_BLOCK;
        let blen = ((bstart + OVERLAY_BLOCK).min(self.size) - bstart) as usize;
        let mut buf = vec![0u8; blen];
        if src == Source::Base {
            base.read_at(bstart, &mut buf).map_err(|e| {
                let e = catalog::Chain(&e);
                ExportError::io(format!("copy-on-write of block at {bstart}: {e}"))
            })?;
        }
        let within = (pos - bstart) as usize;
        buf[within..within + piece.len()].copy_from_slice(piece);
        self.file
            .write_all_at(&buf, bstart)
            .map_err(|e| self.failed("write", e))?;
        self.mark(block, block + 1, false);
        Ok(())
    }

    /// Free file space; reads of zeroed blocks never touch the file, so failure is harmless.
    fn punch(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate on a file descriptor we own for the life of `self.file`; it takes
        // no pointers, and the flags only deallocate space inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc != 0 {
            tracing::debug!(overlay = %self.path.display(), "punching a hole failed; space kept");
        }
    }

    /// Make completed writes durable.
    pub(crate) fn sync(&self) -> std::result::Result<(), ExportError> {
        self.file.sync_data().map_err(|e| self.failed("sync", e))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.keep.load(Ordering::Relaxed) {
            tracing::info!(overlay = %self.path.display(), "overlay kept");
        } else if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(overlay = %self.path.display(), error = %e, "removing overlay failed");
        }
    }
}
