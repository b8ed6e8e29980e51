//! A libvirt directory storage pool per test, on the test bed's libvirt: defined, built and
//! started on a fresh scratch directory (which an isolated proxy is given to hide), and on drop
//! emptied of its volumes, stopped, undefined and removed, also on panic. Pools of test
//! processes that no longer exist are swept the first time a pool is made.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use anyhow::{Context, Result};

use crate::libvirt::{ensure_libvirt, virsh, virsh_lines};
use crate::scratch::ScratchDir;
use crate::vm::NAME_PREFIX;

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A started `dir` storage pool named `sluice-t-pool-PREFIX-PID-SEQ`.
#[derive(Debug)]
pub struct TestPool {
    name: String,
    dir: ScratchDir,
}

/// A volume as `virsh vol-info --bytes` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolInfo {
    pub capacity: u64,
    pub allocation: u64,
}

impl TestPool {
    /// A new pool; `prefix` names the test (`[a-z0-9-]`).
    pub fn new(prefix: &str) -> Result<TestPool> {
        ensure_libvirt()?;
        SWEEP.call_once(sweep_dead_pools);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}pool-{prefix}-{}-{seq}", std::process::id());
        let dir = ScratchDir::create(&name)?;
        let target = dir.path().to_str().context("utf-8 pool path")?.to_string();
        virsh(&["pool-define-as", &name, "dir", "--target", &target])?;
        let pool = TestPool { name, dir };
        virsh(&["pool-build", &pool.name])?;
        virsh(&["pool-start", &pool.name])?;
        Ok(pool)
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool's directory on the hypervisor.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The names of its volumes (after a refresh, so files made behind libvirt count).
    pub fn volumes(&self) -> Result<Vec<String>> {
        virsh(&["pool-refresh", &self.name])?;
        let out = virsh(&["vol-list", "--pool", &self.name])?;
        Ok(out
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// `virsh vol-info --bytes` of volume `vol`.
    pub fn vol_info(&self, vol: &str) -> Result<VolInfo> {
        let out = virsh(&["vol-info", "--bytes", "--pool", &self.name, vol])?;
        let field = |key: &str| -> Result<u64> {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no {key} in vol-info: {out}"))
        };
        Ok(VolInfo {
            capacity: field("Capacity:")?,
            allocation: field("Allocation:")?,
        })
    }

    /// `virsh vol-path` of volume `vol`.
    pub fn vol_path(&self, vol: &str) -> Result<String> {
        Ok(virsh(&["vol-path", "--pool", &self.name, vol])?
            .trim()
            .to_string())
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        remove_pool(&self.name);
    }
}

fn remove_pool(name: &str) {
    let _ = virsh(&["pool-refresh", name]);
    if let Ok(out) = virsh(&["vol-list", "--pool", name]) {
        for vol in out
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next())
        {
            if let Err(e) = virsh(&["vol-delete", "--pool", name, vol]) {
                eprintln!("testbed: {e:#}");
            }
        }
    }
    let _ = virsh(&["pool-destroy", name]);
    if let Err(e) = virsh(&["pool-undefine", name]) {
        eprintln!("testbed: {e:#}");
    }
}

/// Removes the pools of test processes that no longer exist (their directories go with
/// [`crate::sweep_dead`]).
fn sweep_dead_pools() {
    let prefix = format!("{NAME_PREFIX}pool-");
    let Ok(names) = virsh_lines(&["pool-list", "--all", "--name"]) else {
        return;
    };
    for name in names.iter().filter(|n| n.starts_with(&prefix)) {
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            eprintln!("testbed: removing stale pool {name}");
            remove_pool(name);
            let _ = std::fs::remove_dir_all(Path::new(crate::SCRATCH_ROOT).join(name));
        }
    }
}
