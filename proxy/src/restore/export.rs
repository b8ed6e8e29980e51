//! [`RepoExport`]: one disk of one backup served as an NBD export.
//!
//! Owns reads through the repository (each request one bounded call through `crate::repo`,
//! on tokio's blocking pool), block status from the index
//! (`base:allocation`: zero chunks are `HOLE | ZERO`; `sluice:changed-since:BACKUP`: chunks
//! that differ from an older backup), and, for writable exports, routing writes to the
//! copy-on-write [`overlay`](super::overlay). A corrupt or missing chunk fails only the request
//! that touches it (NBD `EIO`); the export keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use catalog::{BackupId, DiskReader, Repository};

use super::bits::Bits;
use super::diff::{changed_chunks, changed_since_context, STATE_CHANGED};
use super::error::{Error, Result};
use super::name::ExportName;
use super::overlay::{Overlay, Source, OVERLAY_BLOCK};
use crate::nbd::proto::state;
use crate::nbd::BASE_ALLOCATION;
use crate::nbd::{BlockExport, BoxFuture, ExportError, ExportResult, ReadPart, StatusExtent};

/// How to open an export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Older backups of the same disk to offer `sluice:changed-since:BACKUP` contexts for.
    pub changed_since: Vec<BackupId>,
    /// Make the export writable, with its copy-on-write overlay file in this directory.
    pub overlay_dir: Option<PathBuf>,
    /// Keep the overlay file when the export is dropped (default: remove it).
    pub keep_overlay: bool,
}

impl ExportOptions {
    /// Writable, overlay in `dir`.
    pub fn writable(dir: impl Into<PathBuf>) -> Self {
        ExportOptions {
            overlay_dir: Some(dir.into()),
            ..Default::default()
        }
    }
}

struct Inner {
    name: ExportName,
    reader: DiskReader,
    diffs: Vec<(BackupId, Bits)>,
    overlay: Option<Overlay>,
}

/// A backup disk as an NBD export (read-only, or writable through an overlay). Cheap to
/// share: hand an `Arc<RepoExport>` to [`crate::nbd::Server::add_export`] under
/// [`RepoExport::name`]. The overlay file goes away when the last reference is dropped.
pub struct RepoExport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RepoExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoExport")
            .field("name", &self.inner.name.to_string())
            .field("writable", &self.inner.overlay.is_some())
            .finish()
    }
}

impl RepoExport {
    /// Open `name` in `repo` (loads the indexes through `crate::repo`, on the blocking pool).
    pub async fn open(
        repo: &Repository,
        name: &ExportName,
        opts: ExportOptions,
    ) -> Result<Arc<RepoExport>> {
        let (repo, what) = (repo.clone(), format!("export {name}"));
        let name = name.clone();
        crate::repo::run(move || RepoExport::open_blocking(&repo, &name, &opts))
            .await
            .map_err(|e| Error::catalog(what, e))?
            .map(Arc::new)
    }

    /// [`RepoExport::open`] for synchronous callers (never from an async task).
    pub fn open_blocking(
        repo: &Repository,
        name: &ExportName,
        opts: &ExportOptions,
    ) -> Result<RepoExport> {
        let ctx = |what: String| move |e| Error::catalog(what, e);
        let m = repo
            .manifest(&name.backup)
            .map_err(ctx(format!("export {name}")))?;
        if m.vm.name != name.vm {
            return Err(Error::not_found(format!(
                "export {name}: backup {} belongs to vm {:?}",
                name.backup, m.vm.name
            )));
        }
        let reader = repo
            .open_disk(&name.backup, &name.disk)
            .map_err(ctx(format!("export {name}")))?;
        let mut diffs = Vec::new();
        for older in &opts.changed_since {
            let om = repo
                .manifest(older)
                .map_err(ctx(format!("export {name}: older backup")))?;
            if om.vm.uuid != m.vm.uuid {
                return Err(Error::invalid(format!(
                    "export {name}: backup {older} is of another vm ({})",
                    om.vm.name
                )));
            }
            let old = repo
                .open_disk(older, &name.disk)
                .map_err(ctx(format!("export {name}: older backup")))?;
            diffs.push((older.clone(), changed_chunks(&reader, &old)?));
        }
        let overlay = match &opts.overlay_dir {
            Some(dir) => Some(Overlay::create(
                dir,
                &name.file_stem(),
                reader.size(),
                opts.keep_overlay,
            )?),
            None => None,
        };
        Ok(RepoExport {
            inner: Arc::new(Inner {
                name: name.clone(),
                reader,
                diffs,
                overlay,
            }),
        })
    }

    /// The export's name (`VM/DISK@BACKUP`).
    pub fn name(&self) -> &ExportName {
        &self.inner.name
    }

    /// The overlay file of a writable export.
    pub fn overlay_path(&self) -> Option<&Path> {
        self.inner.overlay.as_ref().map(|o| o.path())
    }

    /// Keep the overlay file when the export is dropped.
    pub fn keep_overlay(&self) {
        if let Some(o) = &self.inner.overlay {
            o.keep();
        }
    }

    /// Bytes written into the overlay so far (4 KiB blocks).
    pub fn overlay_bytes(&self) -> u64 {
        self.inner
            .overlay
            .as_ref()
            .map_or(0, |o| o.blocks_written() * OVERLAY_BLOCK)
    }

    /// Chunk positions that differ from `older` (one of [`ExportOptions::changed_since`]).
    pub fn changed_chunks(&self, older: &BackupId) -> Option<Vec<u64>> {
        let (_, bits) = self.inner.diffs.iter().find(|(id, _)| id == older)?;
        Some(
            (0..self.inner.reader.chunk_count())
                .filter(|&i| bits.get(i))
                .collect(),
        )
    }

    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> ExportResult<T> + Send + 'static,
    ) -> BoxFuture<'_, ExportResult<T>> {
        let (inner, me) = (self.inner.clone(), self.inner.clone());
        Box::pin(async move {
            crate::repo::run(move || f(&inner))
                .await
                .map_err(|e| ExportError::io(format!("export {}: {e}", me.name)))?
        })
    }
}

/// Read parts under construction: adjacent data and adjacent zeroes merged.
#[derive(Default)]
struct Parts {
    done: Vec<ReadPart>,
    data: BytesMut,
}

impl Parts {
    fn data(&mut self, b: &[u8]) {
        self.data.extend_from_slice(b);
    }

    fn zero(&mut self, n: u64) {
        if !self.data.is_empty() {
            self.done.push(ReadPart::Data(self.data.split().freeze()));
        }
        match self.done.last_mut() {
            Some(ReadPart::Zero(z)) => *z += n as u32,
            _ => self.done.push(ReadPart::Zero(n as u32)),
        }
    }

    fn finish(mut self) -> Vec<ReadPart> {
        if !self.data.is_empty() {
            self.done.push(ReadPart::Data(self.data.freeze()));
        }
        self.done
    }
}

impl Inner {
    fn chunk_size(&self) -> u64 {
        self.reader.chunk_size() as u64
    }

    fn corrupt(&self, e: catalog::Error) -> ExportError {
        tracing::warn!(export = %self.name, error = %catalog::Chain(&e), "restore read failed");
        ExportError::io(format!("export {}: {}", self.name, catalog::Chain(&e)))
    }

    fn read(&self, offset: u64, length: u32) -> ExportResult<Vec<ReadPart>> {
        let mut parts = Parts::default();
        match &self.overlay {
            None => self.read_base(offset, length as u64, &mut parts)?,
            Some(o) => {
                for (src, start, n) in o.segments(offset, length as u64) {
                    match src {
                        Source::Base => self.read_base(start, n, &mut parts)?,
                        Source::Zero => parts.zero(n),
                        Source::Data => {
                            let mut buf = vec![0u8; n as usize];
                            o.read_data(start, &mut buf)?;
                            parts.data(&buf);
                        }
                    }
                }
            }
        }
        Ok(parts.finish())
    }

    fn read_base(&self, offset: u64, len: u64, parts: &mut Parts) -> ExportResult<()> {
        let cs = self.chunk_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (i, within) = (pos / cs, pos % cs);
            let n = (cs - within).min(end - pos);
            if self.reader.is_zero(i).map_err(|e| self.corrupt(e))? {
                parts.zero(n);
            } else {
                let c = self.reader.read_chunk(i).map_err(|e| self.corrupt(e))?;
                parts.data(&c[within as usize..(within + n) as usize]);
            }
            pos += n;
        }
        Ok(())
    }

    fn base_flags(&self, pos: u64) -> u32 {
        match self.reader.is_zero(pos / self.chunk_size()) {
            Ok(true) => state::HOLE | state::ZERO,
            _ => 0,
        }
    }

    fn allocation(&self, offset: u64, length: u64) -> Vec<StatusExtent> {
        let cs = self.chunk_size();
        let Some(o) = &self.overlay else {
            return runs(offset, length, cs, |p| self.base_flags(p));
        };
        let mut out = Vec::new();
        for (src, start, n) in o.segments(offset, length) {
            let ext = match src {
                Source::Base => runs(start, n, cs, |p| self.base_flags(p)),
                Source::Data => vec![StatusExtent {
                    length: n,
                    flags: 0,
                }],
                Source::Zero => vec![StatusExtent {
                    length: n,
                    flags: state::HOLE | state::ZERO,
                }],
            };
            for e in ext {
                push_extent(&mut out, e);
            }
        }
        out
    }
}

impl Inner {
    /// Status of `[offset, offset+length)` in context number `context` (0: allocation, then
    /// one `changed-since` context per older backup).
    fn status(&self, context: usize, offset: u64, length: u64) -> Vec<StatusExtent> {
        let Some(d) = context.checked_sub(1) else {
            return self.allocation(offset, length);
        };
        let Some((_, bits)) = self.diffs.get(d) else {
            return vec![StatusExtent { length, flags: 0 }];
        };
        let cs = self.chunk_size();
        runs(offset, length, cs, |p| {
            if bits.get(p / cs) {
                STATE_CHANGED
            } else {
                0
            }
        })
    }
}

fn push_extent(out: &mut Vec<StatusExtent>, e: StatusExtent) {
    match out.last_mut() {
        Some(last) if last.flags == e.flags => last.length += e.length,
        _ => out.push(e),
    }
}

/// Status of `[offset, offset+length)` at granularity `gran`, `flags` asked once per unit.
fn runs(offset: u64, length: u64, gran: u64, flags: impl Fn(u64) -> u32) -> Vec<StatusExtent> {
    let end = offset + length;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let n = ((pos / gran + 1) * gran).min(end) - pos;
        push_extent(
            &mut out,
            StatusExtent {
                length: n,
                flags: flags(pos),
            },
        );
        pos += n;
    }
    out
}

impl BlockExport for RepoExport {
    fn size(&self) -> u64 {
        self.inner.reader.size()
    }

    fn description(&self) -> String {
        let n = &self.inner.name;
        format!("backup {} of vm {} disk {}", n.backup, n.vm, n.disk)
    }

    fn is_writable(&self) -> bool {
        self.inner.overlay.is_some()
    }

    fn multi_conn_safe(&self) -> bool {
        // One overlay file and one reader per export, shared by every connection.
        true
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut v = vec![BASE_ALLOCATION.to_string()];
        v.extend(
            self.inner
                .diffs
                .iter()
                .map(|(id, _)| changed_since_context(id)),
        );
        v
    }

    fn read(&self, offset: u64, length: u32) -> BoxFuture<'_, ExportResult<Vec<ReadPart>>> {
        self.blocking(move |inner| inner.read(offset, length))
    }

    fn block_status(
        &self,
        context: usize,
        offset: u64,
        length: u32,
    ) -> BoxFuture<'_, ExportResult<Vec<StatusExtent>>> {
        // The index may have to be read from the repository: a repository call like a read.
        self.blocking(move |inner| Ok(inner.status(context, offset, length as u64)))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, ExportResult<()>> {
        self.blocking(move |inner| {
            let o = overlay(inner)?;
            o.write(&inner.reader, offset, &data)?;
            if fua {
                o.sync()
            } else {
                Ok(())
            }
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, ExportResult<()>> {
        self.blocking(move |inner| {
            let o = overlay(inner)?;
            o.zero(&inner.reader, offset, length as u64)?;
            if fua {
                o.sync()
            } else {
                Ok(())
            }
        })
    }

    fn trim(&self, offset: u64, length: u32) -> BoxFuture<'_, ExportResult<()>> {
        // Trimmed contents are unspecified; zeroes are the cheapest correct answer.
        self.blocking(move |inner| overlay(inner)?.zero(&inner.reader, offset, length as u64))
    }

    fn flush(&self) -> BoxFuture<'_, ExportResult<()>> {
        self.blocking(move |inner| match &inner.overlay {
            Some(o) => o.sync(),
            None => Ok(()),
        })
    }
}

fn overlay(inner: &Inner) -> ExportResult<&Overlay> {
    inner
        .overlay
        .as_ref()
        .ok_or_else(|| ExportError::permission(format!("export {} is read-only", inner.name)))
}
