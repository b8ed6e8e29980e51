//! One daemon per data directory and per repository: `sluice serve` holds an exclusive lock
//! on `DATA/.daemon-lock` and on `REPO/.daemon-lock` for its whole life (`flock`, released by
//! the kernel however the daemon ends). A second daemon on either is refused at start, naming
//! the holder's pid: two would clean up each other's exports and `qemu-nbd`, and two catalogs
//! on one repository drift until one's GC removes chunks the other still deduplicates
//! against.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A held daemon lock; dropping it releases it.
#[derive(Debug)]
pub struct DaemonLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

/// Name of the lock file (a dot file: never a repository object).
pub const LOCK_FILE: &str = ".daemon-lock";

/// Takes the lock of `dir` (`what` names it in errors: "data directory", "repository").
pub fn lock(dir: &Path, what: &str) -> anyhow::Result<DaemonLock> {
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns, kept open in the returned guard.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::WouldBlock {
            anyhow::bail!("locking {}: {err}", path.display());
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() {
            "another sluice serve".to_string()
        } else {
            format!("another sluice serve (pid {holder})")
        };
        anyhow::bail!(
            "{what} {} is in use by {who}: one daemon per {what}; stop it, or give this one its own",
            dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_data()?;
    Ok(DaemonLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_free_again_after_drop() {
        let d = tempfile::tempdir().unwrap();
        let first = lock(d.path(), "data directory").unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let e = lock(d.path(), "data directory").unwrap_err().to_string();
        assert!(e.contains("in use by another sluice serve (pid "), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        lock(d.path(), "data directory").unwrap();
    }
}
