//! Restore a backup disk to a local image file: raw or qcow2, sparse (zero chunks are never
//! written, so they stay holes).
//!
//! Raw is written by our own reader: chunks decoded on two threads and written with
//! `pwrite` into a file sized with `set_len`. Qcow2 is that raw file converted to qcow2 by
//! the image tooling (`crate::hypervisor::image::convert_raw_to_qcow2`, which keeps holes
//! unallocated), then the raw file is removed; see docs/restore.md for why. Never overwrites
//! an existing file.
//!
//! A [`FileRestoreControl`] gives a restore live progress and a cancel token, checked between
//! batches of [`BATCH`] chunks and while the conversion runs; a cancelled restore removes its
//! partial files and returns [`ErrorKind::Cancelled`]. This module is the only writer of a
//! file restore's progress: `bytes_planned` (the disks' sizes), `bytes_done` (every chunk
//! finished, zero chunks included), `bytes_read` (data bytes read from the repository) and
//! `bytes_zero` (zero chunks, never written).
//!
//! The async entry points reach the repository through `crate::repo`: the disk is opened with
//! short bounded calls, and the whole-disk copy runs on a dedicated thread.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use catalog::{DiskReader, Repository};
use tokio_util::sync::CancellationToken;

use crate::hypervisor::image::{self, Conversion};
use crate::job::Progress;

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
/// Chunks a worker takes at a time; cancel is checked between batches.
pub const BATCH: u64 = 32;

/// Cancel and live progress of a restore to a file. A restore sets `bytes_planned` to its
/// disk's size if nothing was planned yet ([`restore_disks_with`] plans the sum of its disks
/// first), and adds every chunk it finishes to `bytes_done` (data also to `bytes_read`, zero
/// chunks to `bytes_zero`).
#[derive(Debug, Clone, Default)]
pub struct FileRestoreControl {
    pub cancel: CancellationToken,
    pub progress: Arc<Progress>,
}

/// Restore disk `name` of `repo` to a new file at `path`.
pub async fn restore_disk(
    repo: &Repository,
    name: &ExportName,
    path: PathBuf,
    format: ImageFormat,
) -> Result<RestoreReport> {
    restore_disk_with(repo, name, path, format, FileRestoreControl::default()).await
}

/// [`restore_disk`] with cancel and live progress.
pub async fn restore_disk_with(
    repo: &Repository,
    name: &ExportName,
    path: PathBuf,
    format: ImageFormat,
    control: FileRestoreControl,
) -> Result<RestoreReport> {
    let reader = open_reader(repo, name).await?;
    copy_in_thread(reader, path, format, control).await
}

/// Restores each `(disk, new file)` of `disks` in turn with one control, having planned the
/// sum of their sizes first, so `bytes_done` reaches `bytes_planned` with the last disk.
/// Every disk is opened before anything is written; the first failure (cancel included)
/// stops the rest, and the files already restored stay for the caller to place or remove.
pub async fn restore_disks_with(
    repo: &Repository,
    disks: &[(ExportName, PathBuf)],
    format: ImageFormat,
    control: FileRestoreControl,
) -> Result<Vec<RestoreReport>> {
    let mut readers = Vec::with_capacity(disks.len());
    for (name, path) in disks {
        readers.push((open_reader(repo, name).await?, path.clone()));
    }
    let planned = readers.iter().map(|(r, _)| r.size()).sum();
    control
        .progress
        .bytes_planned
        .store(planned, Ordering::Relaxed);
    let mut reports = Vec::with_capacity(readers.len());
    for (reader, path) in readers {
        reports.push(copy_in_thread(reader, path, format, control.clone()).await?);
    }
    Ok(reports)
}

/// Disk `name.disk` of backup `name.backup`, refused if the backup is of another vm.
pub(super) async fn open_reader(repo: &Repository, name: &ExportName) -> Result<DiskReader> {
    let ctx = |e| Error::catalog(format!("restore {name}"), e);
    let m = crate::repo::manifest(repo, &name.backup)
        .await
        .map_err(ctx)?;
    if m.vm.name != name.vm {
        return Err(Error::not_found(format!(
            "restore {name}: backup {} belongs to vm {:?}",
            name.backup, m.vm.name
        )));
    }
    crate::repo::open_disk(repo, &name.backup, &name.disk)
        .await
        .map_err(ctx)
}

/// [`restore_to_file_with`] on a dedicated thread (it reads the whole disk: see
/// `crate::repo::dedicated`).
async fn copy_in_thread(
    reader: DiskReader,
    path: PathBuf,
    format: ImageFormat,
    control: FileRestoreControl,
) -> Result<RestoreReport> {
    let what = format!("restore to {}", path.display());
    let thread = format!("restore-{}", reader.manifest().target);
    crate::repo::dedicated(&thread, move || {
        restore_to_file_with(&reader, &path, format, &control)
    })
    .await
    .map_err(|e| Error::catalog(what, e))?
}

/// Restore `reader`'s disk to a new file at `path` (blocking; call from a blocking thread).
pub fn restore_to_file(
    reader: &DiskReader,
    path: &Path,
    format: ImageFormat,
) -> Result<RestoreReport> {
    restore_to_file_with(reader, path, format, &FileRestoreControl::default())
}

/// [`restore_to_file`] with cancel and live progress: on cancel the partial file is removed
/// and the error is [`ErrorKind::Cancelled`].
pub fn restore_to_file_with(
    reader: &DiskReader,
    path: &Path,
    format: ImageFormat,
    control: &FileRestoreControl,
) -> Result<RestoreReport> {
    let start = Instant::now();
    if path.exists() {
        return Err(Error::new(
            ErrorKind::Refused,
            format!("restore target {} already exists", path.display()),
        ));
    }
    let _ = control.progress.bytes_planned.compare_exchange(
        0,
        reader.size(),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let data_bytes = match format {
        ImageFormat::Raw => write_raw(reader, path, control)?,
        ImageFormat::Qcow2 => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = path.with_file_name(format!(".{name}.{}.sluice-raw", std::process::id()));
            let r = write_raw(reader, &tmp, control)
                .and_then(|n| convert_qcow2(&tmp, path, &control.cancel).map(|()| n));
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
/// On any error (cancel included) the file is removed.
fn write_raw(reader: &DiskReader, path: &Path, control: &FileRestoreControl) -> Result<u64> {
    let what = || format!("restore to {}", path.display());
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(what(), e))?;
    let r = fill(reader, &file, path, control).and_then(|n| {
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

fn fill(
    reader: &DiskReader,
    file: &File,
    path: &Path,
    control: &FileRestoreControl,
) -> Result<u64> {
    let next = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        stop.store(true, Ordering::Relaxed);
        failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(e);
    };
    let work = || {
        while !stop.load(Ordering::Relaxed) {
            if control.cancel.is_cancelled() {
                return fail(cancelled(path, &written));
            }
            let first = next.fetch_add(BATCH, Ordering::Relaxed);
            let end = (first + BATCH).min(reader.chunk_count());
            for i in first..end {
                if let Err(e) = copy_chunk(reader, file, path, i, control, &written) {
                    return fail(e);
                }
            }
            if end == reader.chunk_count() {
                return;
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

fn cancelled(path: &Path, written: &AtomicU64) -> Error {
    Error::new(
        ErrorKind::Cancelled,
        format!(
            "restore to {} cancelled after {} data bytes; the partial file is removed",
            path.display(),
            written.load(Ordering::Relaxed)
        ),
    )
}

fn copy_chunk(
    reader: &DiskReader,
    file: &File,
    path: &Path,
    i: u64,
    control: &FileRestoreControl,
    written: &AtomicU64,
) -> Result<()> {
    let ctx = |e| Error::catalog(format!("restore to {}", path.display()), e);
    let cs = reader.chunk_size() as u64;
    let span = cs.min(reader.size().saturating_sub(i * cs));
    let p = &control.progress;
    if reader.is_zero(i).map_err(ctx)? {
        Progress::add(&p.bytes_zero, span);
        Progress::add(&p.bytes_done, span);
        return Ok(());
    }
    let data = reader.read_chunk(i).map_err(ctx)?;
    file.write_all_at(&data, i * cs)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    written.fetch_add(data.len() as u64, Ordering::Relaxed);
    Progress::add(&p.bytes_read, data.len() as u64);
    Progress::add(&p.bytes_done, span);
    Ok(())
}

/// The raw file `raw` converted into a new qcow2 `out`; stopped (and `out` removed) on cancel.
fn convert_qcow2(raw: &Path, out: &Path, cancel: &CancellationToken) -> Result<()> {
    let what = || format!("restore to {}", out.display());
    match image::convert_raw_to_qcow2(raw, out, cancel) {
        Ok(Conversion::Done) => Ok(()),
        Ok(Conversion::Cancelled) => Err(Error::new(
            ErrorKind::Cancelled,
            format!(
                "restore to {} cancelled while converting to qcow2; nothing is left",
                out.display()
            ),
        )),
        Err(e) => Err(Error::hypervisor(what(), e)),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use catalog::{
        BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, RepoConfig,
        RepoOptions, VmIdentity,
    };

    const CS: u64 = 64 << 10;

    /// The disk's bytes: `chunks` chunks, every fourth one zero, the last one short.
    pub(crate) fn disk(chunks: u64) -> Vec<u8> {
        let mut data = vec![0u8; (chunks * CS - CS / 2) as usize];
        for (i, c) in data.chunks_mut(CS as usize).enumerate() {
            if i % 4 != 3 {
                c.iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (i * 7 + j / 512) as u8 | 1);
            }
        }
        data
    }

    /// A one-disk backup in a repository on disk: `chunks` chunks, every fourth one zero, the
    /// last one short (half a chunk).
    pub(crate) fn reader(dir: &Path, chunks: u64) -> DiskReader {
        let backend = Arc::new(FsBackend::open(dir.join("repo")).unwrap());
        let opts = RepoOptions::new(dir.join("catalog.sqlite"));
        let repo = Repository::create(backend, RepoConfig::default(), opts).unwrap();
        let size = chunks * CS - CS / 2;
        let w = repo
            .begin_backup(BackupSpec {
                vm: VmIdentity {
                    name: "v".into(),
                    uuid: "u".into(),
                },
                disks: vec![DiskSpec {
                    full_read: None,
                    target: "vda".into(),
                    size,
                    checkpoint: None,
                }],
                parent: None,
                started: 1,
            })
            .unwrap();
        w.put_chunks(0, 0, &disk(chunks)).unwrap();
        let m = w
            .commit(CommitInfo {
                vm_state: None,
                domain_xml: "<domain/>".into(),
                mode: BackupMode::Full,
                consistency: Consistency::Crash,
                finished: 2,
            })
            .unwrap();
        repo.open_disk(&m.id, "vda").unwrap()
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "repo" && n != "catalog.sqlite" && !n.starts_with("catalog.sqlite-"))
            .collect()
    }

    #[test]
    fn progress_reaches_the_plan_and_the_file_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path(), 40);
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let out = dir.path().join(format!("out-{format:?}"));
            let control = FileRestoreControl::default();
            let rep = restore_to_file_with(&r, &out, format, &control).unwrap();
            let p = control.progress.snapshot();
            assert_eq!(p.bytes_planned, r.size(), "{format:?}");
            assert_eq!(p.bytes_done, r.size(), "{format:?}");
            assert_eq!(
                p.bytes_zero,
                9 * CS + CS / 2,
                "{format:?}: every fourth chunk"
            );
            assert_eq!(p.bytes_read, rep.data_bytes, "{format:?}");
            assert_eq!(p.bytes_read + p.bytes_zero, r.size(), "{format:?}");
            if format == ImageFormat::Raw {
                assert!(
                    std::fs::read(&out).unwrap() == disk(40),
                    "raw file equals the disk"
                );
            }
            std::fs::remove_file(&out).unwrap();
        }
        // Two disks sharing one control after the caller planned both: the plan holds.
        let control = FileRestoreControl::default();
        control
            .progress
            .bytes_planned
            .store(2 * r.size(), Ordering::Relaxed);
        for n in ["a", "b"] {
            restore_to_file_with(&r, &dir.path().join(n), ImageFormat::Raw, &control).unwrap();
        }
        let p = control.progress.snapshot();
        assert_eq!(
            (p.bytes_planned, p.bytes_done),
            (2 * r.size(), 2 * r.size())
        );
    }

    #[test]
    fn a_cancelled_restore_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path(), 40);
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let out = dir.path().join("out");
            let control = FileRestoreControl::default();
            control.cancel.cancel();
            let e = restore_to_file_with(&r, &out, format, &control).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Cancelled, "{format:?}: {e}");
            assert!(
                leftovers(dir.path()).is_empty(),
                "{:?}",
                leftovers(dir.path())
            );
        }
    }

    #[test]
    fn a_restore_cancelled_midway_stops_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path(), 512);
        let out = dir.path().join("out.raw");
        let control = FileRestoreControl::default();
        let watcher = {
            let c = control.clone();
            std::thread::spawn(move || {
                while c.progress.bytes_done.load(Ordering::Relaxed) == 0 {
                    std::thread::yield_now();
                }
                c.cancel.cancel();
            })
        };
        let e = restore_to_file_with(&r, &out, ImageFormat::Raw, &control).unwrap_err();
        watcher.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
        assert!(e.to_string().contains("out.raw"), "{e}");
        let done = control.progress.bytes_done.load(Ordering::Relaxed);
        assert!(
            done < r.size() / 2,
            "stopped early: {done} of {} bytes",
            r.size()
        );
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }
}
