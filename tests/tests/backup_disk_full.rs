//! A full disk under the repository (a tmpfs of 40 MiB, made for the test): a backup that
//! does not fit fails with ENOSPC named in its error, commits nothing and damages nothing
//! committed (verify stays clean, the earlier backup restores exactly); once space is freed
//! (the tmpfs grown), the next backup succeeds and restores exactly.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use testbed::daemon::Daemon;
use testbed::{Model, TestVm, VmSpec};

const MIB: u64 = 1 << 20;

/// A tmpfs mounted on a directory of its own; unmounted on drop.
struct SmallFs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl SmallFs {
    fn mount(size_mib: u64) -> Result<SmallFs> {
        let dir = tempfile::tempdir()?;
        let at = dir.path().join("fs");
        std::fs::create_dir(&at)?;
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0700"),
                "tmpfs",
            ],
            &at,
        )?;
        Ok(SmallFs(at, dir))
    }

    fn grow(&self, size_mib: u64) -> Result<()> {
        mount(&["-o", &format!("remount,size={size_mib}m")], &self.0)
    }
}

fn mount(args: &[&str], at: &Path) -> Result<()> {
    let out = Command::new("mount").args(args).arg(at).output()?;
    if !out.status.success() {
        bail!(
            "mount {args:?} {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Restores `id` to a raw file and compares it with the model's disk.
fn restore_equals(d: &Daemon, id: &str, model: &Model, disk: &str) -> Result<()> {
    let to = d.data.join("restores").join(format!("{id}.raw"));
    let job = d.ok(&[
        "restore",
        id,
        "--to",
        to.to_str().context("path")?,
        "--format",
        "raw",
    ])?;
    ensure!(job["state"] == "succeeded", "restore of {id}: {job}");
    ensure!(
        std::fs::read(&to)? == model.disk(disk)?,
        "backup {id} restored differs from the guest's disk"
    );
    std::fs::remove_file(&to)?;
    Ok(())
}

#[test]
fn a_full_repository_disk_fails_the_backup_with_enospc_and_damages_nothing() -> Result<()> {
    let fs = SmallFs::mount(40)?;
    let vm = TestVm::boot(VmSpec::new("bk-full").disk(128 * MIB))?;
    let disk = vm.disks()[0].target.clone();
    let dir = tempfile::tempdir()?;
    let repo = fs.0.join("repo");
    let d = Daemon::start(dir.path(), &format!("repository = {repo:?}\n"))?;
    let mut model = Model::new(&vm);
    model.write(&vm, &disk, 0, 8 * MIB, 1)?;
    vm.sync()?;
    let first = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(
        first["state"] == "succeeded",
        "the first backup fits: {first}"
    );
    let first_id = first["backup_id"]
        .as_str()
        .context("backup id")?
        .to_string();
    let at_first = model.clone();

    // 64 MiB of incompressible data cannot fit in what is left of 40 MiB.
    model.write(&vm, &disk, 16 * MIB, 64 * MIB, 2)?;
    vm.sync()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (code, job) = d.cli(&["backup", vm.name(), "--wait"])?;
    ensure!(
        code != 0 && job["state"] == "failed",
        "the backup fails: {code} {job}"
    );
    let msg = job["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("No space left on device"),
        "the error names ENOSPC: {msg}"
    );
    ensure!(job["backup_id"].is_null(), "nothing committed: {job}");
    let list = d.ok(&["backup", "list", vm.name()])?;
    ensure!(
        list.as_array().map(Vec::len) == Some(1),
        "one backup: {list}"
    );

    fs.grow(512)?;
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 1,
        "verify: {verify}"
    );
    restore_equals(&d, &first_id, &at_first, &disk)?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let next = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(
        next["state"] == "succeeded",
        "after space was freed: {next}"
    );
    let next_id = next["backup_id"].as_str().context("backup id")?.to_string();
    restore_equals(&d, &next_id, &model, &disk)?;
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 2,
        "verify: {verify}"
    );
    Ok(())
}
