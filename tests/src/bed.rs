//! Backup beds: a throwaway repository, the runtime and libvirt connection that back up a
//! [`TestVm`] into it, and the expected contents of its disks that every restored backup is
//! compared with, byte for byte.
//!
//! Owns: creating repositories in temporary directories ([`TempRepo`]: packs under `repo/`,
//! the catalog in `catalog.db`), running `proxy::job::run_backup` against a test VM
//! ([`Bed`]), the host's model of what the guest wrote ([`Model`]) and the comparison of a
//! backup's disk with expected bytes ([`check_disk`]). It does not own VMs (see [`crate::vm`])
//! nor NBD exports of backups (see [`crate::peers`] and [`crate::inspect`]).

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use catalog::{FsBackend, Manifest, RepoConfig, RepoOptions, Repository};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::job::{run_backup, BackupOptions, BackupReport, Progress};
use tokio_util::sync::CancellationToken;

use crate::libvirt::URI;
use crate::pattern::pattern;
use crate::vm::{TestVm, VmSpec};

/// A repository created afresh in a temporary directory, removed (with the directory) on
/// drop. Dereferences to the [`Repository`].
pub struct TempRepo {
    repo: Repository,
    dir: tempfile::TempDir,
}

impl TempRepo {
    /// A repository with the default configuration.
    pub fn create() -> Result<TempRepo> {
        TempRepo::with_config(RepoConfig::default())
    }

    /// A repository with `config` (chunk size, ...).
    pub fn with_config(config: RepoConfig) -> Result<TempRepo> {
        let dir = tempfile::tempdir().context("temporary directory for a repository")?;
        let backend = Arc::new(FsBackend::open(dir.path().join("repo"))?);
        let opts = RepoOptions::new(dir.path().join("catalog.db"));
        let repo = Repository::create(backend, config, opts)?;
        Ok(TempRepo { repo, dir })
    }

    /// The temporary directory: `repo/` (the packs) and `catalog.db` are in it; tests may put
    /// their own files (sockets, expected images) beside them.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of the repository's files (packs, indexes, manifests).
    pub fn files(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
}

impl Deref for TempRepo {
    type Target = Repository;

    fn deref(&self) -> &Repository {
        &self.repo
    }
}

/// A multi-threaded tokio runtime with two workers (the machines have two cores).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A test VM, a fresh repository, a runtime and a libvirt connection: what a test needs to
/// back the VM up with `run_backup` and check each backup.
pub struct Bed {
    pub vm: Arc<TestVm>,
    pub repo: TempRepo,
    pub hv: LibvirtHypervisor,
    pub rt: tokio::runtime::Runtime,
}

impl Bed {
    /// Boots a VM named after `prefix` with qcow2 disks of `sizes` (vda, vdb, ...).
    pub fn boot(prefix: &str, sizes: &[u64]) -> Result<Bed> {
        let spec = sizes.iter().fold(VmSpec::new(prefix), |s, &z| s.disk(z));
        Bed::with_vm(Arc::new(TestVm::boot(spec)?))
    }

    /// A bed around an already booted VM, with a default repository.
    pub fn with_vm(vm: Arc<TestVm>) -> Result<Bed> {
        Bed::with_config(vm, RepoConfig::default())
    }

    /// A bed around an already booted VM, with a repository configured by `config`.
    pub fn with_config(vm: Arc<TestVm>, config: RepoConfig) -> Result<Bed> {
        let repo = TempRepo::with_config(config)?;
        let rt = runtime()?;
        let hv = rt.block_on(LibvirtHypervisor::connect(URI))?;
        Ok(Bed { vm, repo, hv, rt })
    }

    /// Backup options with the job's work directory in the VM's scratch directory
    /// (`SCRATCH/work`, reachable by `libvirt-qemu`).
    pub fn options(&self) -> BackupOptions {
        BackupOptions::new(self.work_dir())
    }

    /// Where [`Bed::options`] puts the job's files.
    pub fn work_dir(&self) -> PathBuf {
        self.vm.scratch().join("work")
    }

    /// Syncs the guest (if it runs), then backs it up with default options.
    pub fn backup(&self) -> Result<BackupReport> {
        self.backup_with(&self.options(), CancellationToken::new())
    }

    /// Syncs the guest (if it runs), then backs it up with `opts` and `cancel`; the job's
    /// progress must agree with its report on the bytes read.
    pub fn backup_with(
        &self,
        opts: &BackupOptions,
        cancel: CancellationToken,
    ) -> Result<BackupReport> {
        if self.vm.state()? != "shut off" {
            self.vm.sync()?;
        }
        let progress = Arc::new(Progress::default());
        let r = self.rt.block_on(run_backup(
            &self.hv,
            &self.repo,
            self.vm.name(),
            opts,
            progress.clone(),
            cancel,
        ))?;
        let p = progress.snapshot();
        ensure!(
            p.bytes_read == r.bytes_read,
            "progress read {} vs report {}",
            p.bytes_read,
            r.bytes_read
        );
        Ok(r)
    }

    /// Every disk of `model` in backup `m` equals the model, byte for byte.
    pub fn check(&self, m: &Manifest, model: &Model) -> Result<()> {
        for (target, want) in &model.disks {
            check_disk(&self.repo, m, target, want)?;
        }
        Ok(())
    }

    /// The names of the VM's libvirt checkpoints.
    pub fn checkpoints(&self) -> Result<Vec<String>> {
        self.vm.checkpoints()
    }
}

/// Disk `disk` of backup `m`, read back through the repository, has the size of `want` and
/// equals it byte for byte; the error names the first differing byte.
pub fn check_disk(repo: &Repository, m: &Manifest, disk: &str, want: &[u8]) -> Result<()> {
    let reader = repo.open_disk(&m.id, disk)?;
    ensure!(
        reader.size() == want.len() as u64,
        "backup {} disk {disk} has {} bytes, expected {}",
        m.id,
        reader.size(),
        want.len()
    );
    let mut got = vec![0u8; want.len()];
    reader.read_at(0, &mut got)?;
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        bail!(
            "backup {} disk {disk} differs from the expected image at byte {at}",
            m.id
        );
    }
    Ok(())
}

/// What the guest's disks hold, as the host expects it: one image per disk target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Model {
    pub disks: BTreeMap<String, Vec<u8>>,
}

impl Model {
    /// All-zero images of the sizes of `vm`'s disks.
    pub fn new(vm: &TestVm) -> Model {
        let disks = vm
            .disks()
            .iter()
            .map(|d| (d.target.clone(), vec![0u8; d.size as usize]))
            .collect();
        Model { disks }
    }

    /// Writes the pattern of `seed` at `offset` of `disk`, in the guest and in the model.
    pub fn write(
        &mut self,
        vm: &TestVm,
        disk: &str,
        offset: u64,
        len: u64,
        seed: u64,
    ) -> Result<()> {
        vm.write_pattern(disk, offset, len, seed)?;
        self.put(disk, offset, len, seed)
    }

    /// Puts the pattern of `seed` at `offset` of `disk` in the model only (for writes made
    /// in the guest by other means, e.g. during a backup).
    pub fn put(&mut self, disk: &str, offset: u64, len: u64, seed: u64) -> Result<()> {
        let d = self.disk_mut(disk)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= d.len() as u64)
            .with_context(|| format!("write at {offset}+{len} is outside disk {disk}"))?;
        d[offset as usize..end as usize].copy_from_slice(&pattern(seed, offset, len as usize));
        Ok(())
    }

    /// The expected image of `disk`.
    pub fn disk(&self, disk: &str) -> Result<&[u8]> {
        self.disks
            .get(disk)
            .map(Vec::as_slice)
            .with_context(|| format!("no disk {disk} in the model"))
    }

    /// The expected image of `disk`, to change in place (e.g. resize).
    pub fn disk_mut(&mut self, disk: &str) -> Result<&mut Vec<u8>> {
        self.disks
            .get_mut(disk)
            .with_context(|| format!("no disk {disk} in the model"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_puts_patterns_and_refuses_writes_outside_a_disk() {
        let mut m = Model {
            disks: [("vda".to_string(), vec![0u8; 8192])].into(),
        };
        m.put("vda", 4096, 512, 7).unwrap();
        assert_eq!(
            &m.disk("vda").unwrap()[4096..4608],
            &pattern(7, 4096, 512)[..]
        );
        assert!(m.put("vda", 8000, 512, 7).is_err());
        assert!(m.put("vda", u64::MAX, 2, 7).is_err());
        assert!(m.put("vdb", 0, 1, 7).is_err());
    }
}
