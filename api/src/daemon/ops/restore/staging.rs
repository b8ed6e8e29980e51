//! Where a restore may write, and the private staging directory it writes into before the
//! result is moved into place.

use std::path::{Component, Path, PathBuf};

use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::ops::failure;
use crate::wire::jobs::JobError;

/// Longest target path accepted, bytes.
const MAX_PATH: usize = 4096;

/// Prefix of staging directories: `.sluice-restore-PID-JOB`.
const STAGING: &str = ".sluice-restore-";

fn sweep_dead_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(STAGING)
            .and_then(|r| r.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok());
        let dead = pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
        if dead {
            tracing::warn!(dir = %e.path().display(), "removing a restore staging directory left by a dead daemon");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A private directory beside the targets (same filesystem, so placing is a rename); removed
/// with whatever it still holds when dropped.
pub(super) struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// `.sluice-restore-PID-JOB` beside `target`; first removes those a daemon that no
    /// longer runs left behind (killed with `kill -9` mid-restore).
    pub(super) fn new(target: &Path, job: u64) -> Result<Staging, JobError> {
        let parent = target.parent().unwrap_or(Path::new("/"));
        sweep_dead_staging(parent);
        let dir = parent.join(format!("{STAGING}{}-{job}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| failure::io(format_args!("creating {}", dir.display()), &e))?;
        Ok(Staging { dir })
    }

    pub(super) fn file(&self, target: &Path) -> PathBuf {
        self.dir.join(target.file_name().unwrap_or_default())
    }

    /// Moves the finished copy of `target` into place; without `overwrite`, an existing file
    /// (even one created since the request) is never replaced.
    pub(super) fn place(&self, target: &Path, overwrite: bool) -> Result<(), JobError> {
        let from = self.file(target);
        let r = if overwrite {
            std::fs::rename(&from, target)
        } else {
            std::fs::hard_link(&from, target).and_then(|()| std::fs::remove_file(&from))
        };
        r.map_err(|e| {
            failure::io(
                format_args!("moving the restored file to {}", target.display()),
                &e,
            )
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn no_restore_dirs() -> ApiError {
    ApiError::bad_request("restores to files are disabled: no restore_dirs configured")
}

/// Checks a restore target: absolute, no `..` or NUL, its directory inside one of `dirs`
/// (after resolving symlinks), and no existing file there unless `overwrite`.
pub fn restore_target(dirs: &[PathBuf], raw: &str, overwrite: bool) -> ApiResult<PathBuf> {
    let bad = |why: &str| ApiError::bad_request(format!("restore target {raw:?} {why}"));
    if raw.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if raw.len() > MAX_PATH {
        return Err(ApiError::bad_request(format!(
            "restore target is longer than {MAX_PATH} bytes"
        )));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(bad("is not an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("contains `..` or `.`"));
    }
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
        return Err(bad("names no file"));
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| bad(&format!("is in a directory that cannot be used: {e}")))?;
    if dirs.is_empty() {
        return Err(no_restore_dirs());
    }
    let allowed = dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| parent.starts_with(d));
    if !allowed {
        return Err(bad(&format!(
            "is not inside a restore directory (restore_dirs: {})",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let target = parent.join(file);
    check_free(&target, raw, overwrite)?;
    Ok(target)
}

fn check_free(target: &Path, raw: &str, overwrite: bool) -> ApiResult<()> {
    match std::fs::symlink_metadata(target) {
        Err(_) => Ok(()),
        Ok(md) if md.is_file() && overwrite => Ok(()),
        Ok(md) if md.is_file() => Err(ApiError::conflict(format!(
            "restore target {raw:?} already exists; pass overwrite (--force) to replace it"
        ))),
        Ok(_) => Err(ApiError::conflict(format!(
            "restore target {raw:?} exists and is not a regular file"
        ))),
    }
}
