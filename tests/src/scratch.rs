//! Per-test scratch directories that the `libvirt-qemu` user can use (disk images, sockets,
//! logs), removed when dropped, and the sweep that removes those of dead test processes.

use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where every scratch directory lives. QEMU (user `libvirt-qemu`) must reach it.
pub const SCRATCH_ROOT: &str = "/var/lib/sluice-test";

/// A directory under [`SCRATCH_ROOT`], mode 0777, removed (with its contents) on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `SCRATCH_ROOT/NAME` afresh (an old one of the same name is removed first).
    pub fn create(name: &str) -> Result<ScratchDir> {
        let root = Path::new(SCRATCH_ROOT);
        fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        let path = root.join(name);
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        // Writable by libvirt-qemu (QEMU creates sockets and scratch images here).
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("testbed: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Names of the entries directly under [`SCRATCH_ROOT`].
pub fn scratch_entries() -> Vec<String> {
    let Ok(dir) = fs::read_dir(SCRATCH_ROOT) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}
