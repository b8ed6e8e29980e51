//! Local filesystem backend: one file per object under a root directory.
//!
//! Owns atomic durable writes (temp name, fsync, rename, directory fsync), ranged reads with
//! `pread` (batched reads through io_uring when [`FsOptions::io_uring`] asks and the kernel
//! allows it), and the repository lock as `flock` on `<root>/lock` (released by the kernel
//! when a process dies, so `kill -9` never leaves a stale lock).

use super::uring::{self, ReadPath};
use super::{check_range, validate_key, Backend, LockGuard, LockMode};
use crate::error::{Error, ErrorKind, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Objects as files under `root`.
#[derive(Debug, Clone)]
pub struct FsBackend {
    root: PathBuf,
    /// How [`Backend::get_ranges`] reads.
    batch_path: ReadPath,
}

/// How an [`FsBackend`] reads (the daemon fills it from its environment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsOptions {
    /// Batched ranged reads (restores) through io_uring where a runtime probe passes (see
    /// [`super::uring`]); off (the default): `pread`.
    pub io_uring: bool,
}

impl FsBackend {
    /// Use (and create if needed) the directory `root`, with the default [`FsOptions`].
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(root, FsOptions::default())
    }

    /// Use (and create if needed) the directory `root`, reading as `opts` says.
    pub fn open_with(root: impl Into<PathBuf>, opts: FsOptions) -> Result<Self> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&root)
            .map_err(|e| Error::io(format!("creating repository dir {}", root.display()), e))?;
        owner_only(&root)?;
        let on = opts.io_uring && uring::probe_ok();
        if opts.io_uring {
            tracing::debug!(io_uring = on, "batched read path chosen");
        }
        let batch_path = if on { ReadPath::Uring } else { ReadPath::Pread };
        Ok(FsBackend { root, batch_path })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether batched reads go through io_uring (asked for, and the probe passed).
    pub fn uses_io_uring(&self) -> bool {
        self.batch_path == ReadPath::Uring
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn open_read(&self, key: &str) -> Result<File> {
        let p = self.path(key)?;
        File::open(&p).map_err(|e| Error::io(format!("opening object {key}"), e))
    }

    /// Create `dir` and make its entry durable in its parent.
    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
        }
        match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => sync_dir(dir.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io(format!("creating dir {}", dir.display()), e)),
        }
    }
}

/// Mode of every directory of the repository: the owner's only (it holds every guest's data).
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file of the repository.
pub const FILE_MODE: u32 = 0o600;

/// Takes group and other permissions off the repository's root (a directory made by hand, or
/// by an older version), saying so.
fn owner_only(root: &Path) -> Result<()> {
    let meta = fs::metadata(root)
        .map_err(|e| Error::io(format!("stat of repository dir {}", root.display()), e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    tracing::warn!(dir = %root.display(), mode = format!("{mode:o}"), "repository directory was open to other users: set to 0700");
    fs::set_permissions(root, fs::Permissions::from_mode(mode & 0o700))
        .map_err(|e| Error::io(format!("chmod of repository dir {}", root.display()), e))
}

/// fsync a directory so renames and new entries in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing dir {}", dir.display()), e))
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("listing dir {}", dir.display()), e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("listing dir {}", dir.display()), e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&ent.path(), &key, out)?;
        } else if validate_key(&key).is_ok() {
            out.push(key);
        }
    }
    Ok(())
}

impl Backend for FsBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.ensure_dir(&dir)?;
        let name = key.rsplit('/').next().unwrap_or(key);
        let tmp = dir.join(format!(".tmp-{name}-{:08x}", crate::ids::random_u32()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("writing object {key}"), e));
        }
        sync_dir(&dir)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let p = self.path(key)?;
        fs::read(&p).map_err(|e| Error::io(format!("reading object {key}"), e))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = self.open_read(key)?;
        let total = f
            .metadata()
            .map_err(|e| Error::io(format!("stat of object {key}"), e))?
            .len();
        check_range(key, total, offset, len)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(format!("reading {len} bytes at {offset} of {key}"), e))?;
        Ok(buf)
    }

    fn get_ranges(&self, reqs: &[super::RangeRequest]) -> Vec<Result<Vec<u8>>> {
        uring::read_ranges(&self.root, reqs, self.batch_path)
    }

    fn len(&self, key: &str) -> Result<u64> {
        let p = self.path(key)?;
        fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|e| Error::io(format!("stat of object {key}"), e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir_rel = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let mut out = Vec::new();
        walk(&self.root.join(dir_rel), dir_rel, &mut out)?;
        out.retain(|k| k.starts_with(prefix) && k != "lock");
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key)?;
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(p.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("deleting object {key}"), e)),
        }
    }

    fn lock(&self, mode: LockMode, wait: bool) -> Result<LockGuard> {
        let path = self.root.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(|e| Error::io(format!("opening lock {}", path.display()), e))?;
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        // SAFETY: flock on a file descriptor we own and keep open for the guard's lifetime.
        let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let kind = if e.kind() == std::io::ErrorKind::WouldBlock {
                ErrorKind::Locked
            } else {
                ErrorKind::Io
            };
            return Err(
                Error::new(kind, format!("repository lock {}", path.display())).with_source(e),
            );
        }
        Ok(LockGuard::new(f))
    }
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    /// Every directory and file the repository writes is its owner's only, whatever the
    /// umask; a root made open by hand is closed.
    #[test]
    fn objects_directories_and_lock_are_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("repo");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: umask only changes this process's default mode for new files.
        let old = unsafe { libc::umask(0) };
        let b = FsBackend::open(&root).unwrap();
        b.put("packs/5e/pack-1", b"data").unwrap();
        b.put("manifests/m1", b"m").unwrap();
        let _g = b.lock(LockMode::Shared, false).unwrap();
        let db = t.path().join("catalog.sqlite");
        drop(crate::db::Catalog::open(&db).unwrap());
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        for dir in ["packs", "packs/5e", "manifests"] {
            assert_eq!(mode(&root.join(dir)), DIR_MODE, "{dir}");
        }
        for file in ["packs/5e/pack-1", "manifests/m1", "lock"] {
            assert_eq!(mode(&root.join(file)), FILE_MODE, "{file}");
        }
        assert_eq!(mode(&db), 0o600, "the catalog");
    }
}
