//! Restore a backup disk to a local image file: raw or qcow2, sparse (zero chunks are never
//! written, so they stay holes).
//!
//! Raw is written by our own reader: chunks decoded on two threads and written with
//! `pwrite` into a file sized with `set_len`. Qcow2 is that raw file converted by
//! `qemu-img convert -O qcow2` (which keeps holes unallocated), then the raw file is removed;
//! see docs/restore.md for why. Never overwrites an existing file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use catalog::{DiskReader, Repository};

use super::error::{Error, ErrorKind, Result};
use super::name::ExportName;

/// Image file format of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw, sparse.
    Raw,
    /// Qcow2, holes unallocated.
    Qcow2,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// Disk size in bytes.
    pub size: u64,
    /// Bytes of non-zero chunks written.
    pub data_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

const WORKERS: usize = 2;

/// Restore disk `name` of `repo` to a new file at `path`.
pub async fn restore_disk(
    repo: &Repository,
    name: &ExportName,
    path: PathBuf,
    format: ImageFormat,
) -> Result<RestoreReport> {
    let (repo, name) = (repo.clone(), name.clone());
    tokio::task::spawn_blocking(move || {
        let ctx = |e| Error::catalog(format!("restore {name}"), e);
        let m = repo.manifest(&name.backup).map_err(ctx)?;
        if m.vm.name != name.vm {
            return Err(Error::not_found(format!(
                "restore {name}: backup {} belongs to vm {:?}",
                name.backup, m.vm.name
            )));
        }
        let reader = repo.open_disk(&name.backup, &name.disk).map_err(ctx)?;
        restore_to_file(&reader, &path, format)
    })
    .await
    .map_err(|e| Error::task("restore to file", e))?
}

/// Restore `reader`'s disk to a new file at `path` (blocking; call from a blocking thread).
pub fn restore_to_file(
    reader: &DiskReader,
    path: &Path,
    format: ImageFormat,
) -> Result<RestoreReport> {
    let start = Instant::now();
    if path.exists() {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!("restore target {} already exists", path.display()),
        ));
    }
    let data_bytes = match format {
        ImageFormat::Raw => write_raw(reader, path)?,
        ImageFormat::Qcow2 => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = path.with_file_name(format!(".{name}.{}.sluice-raw", std::process::id()));
            let r = write_raw(reader, &tmp).and_then(|n| convert_qcow2(&tmp, path).map(|()| n));
            let _ = std::fs::remove_file(&tmp);
            r?
        }
    };
    Ok(RestoreReport {
        size: reader.size(),
        data_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Write the non-zero chunks into a new sparse raw file; returns the data bytes written.
fn write_raw(reader: &DiskReader, path: &Path) -> Result<u64> {
    let what = || format!("restore to {}", path.display());
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(what(), e))?;
    let r = fill(reader, &file, path).and_then(|n| {
        file.set_len(reader.size())
            .map_err(|e| Error::io(what(), e))?;
        file.sync_all().map_err(|e| Error::io(what(), e))?;
        Ok(n)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

fn fill(reader: &DiskReader, file: &File, path: &Path) -> Result<u64> {
    let next = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let cs = reader.chunk_size() as u64;
    let work = || {
        while !stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= reader.chunk_count() {
                return;
            }
            if let Err(e) = copy_chunk(reader, file, path, i, cs, &written) {
                stop.store(true, Ordering::Relaxed);
                failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(e);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(work);
        }
    });
    match failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(written.into_inner()),
    }
}

fn copy_chunk(
    reader: &DiskReader,
    file: &File,
    path: &Path,
    i: u64,
    cs: u64,
    written: &AtomicU64,
) -> Result<()> {
    let ctx = |e| Error::catalog(format!("restore to {}", path.display()), e);
    if reader.is_zero(i).map_err(ctx)? {
        return Ok(());
    }
    let data = reader.read_chunk(i).map_err(ctx)?;
    file.write_all_at(&data, i * cs)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    written.fetch_add(data.len() as u64, Ordering::Relaxed);
    Ok(())
}

fn convert_qcow2(raw: &Path, out: &Path) -> Result<()> {
    let res = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out)
        .output()
        .map_err(|e| Error::io("run qemu-img (install qemu-utils: make deps)", e))?;
    if !res.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "qemu-img convert to {} failed: {}",
                out.display(),
                String::from_utf8_lossy(&res.stderr).trim()
            ),
        ));
    }
    Ok(())
}
