//! The daemon's own life, end to end with a real `sluice serve`, real libvirt and a booted
//! test guest, driven only through the CLI:
//! - a policy applied with `sluice policy apply` fires from the scheduler with no manual
//!   trigger (a six-field schedule, every 20 s), its backup equals the guest disk, and its
//!   retention prunes the older backup after the success;
//! - `kill -9` of the daemon during a running backup, then a restart on the same data
//!   directory: the job shows failed ("daemon restarted"); before any new backup, the start
//!   ends the libvirt backup job the dead daemon left and removes its job directory (the job's
//!   message says so); the next backup succeeds, equals the guest disk, and leaves no libvirt
//!   job, extra checkpoint or scratch file;
//! - the same with a shut-off VM (read offline through `qemu-nbd`, which outlives the killed
//!   daemon and keeps the image locked): the restart ends that `qemu-nbd`, the next backup is
//!   exact and the VM starts again.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::daemon::Daemon;
use testbed::inspect::compare_images;
use testbed::{Model, TestVm, VmSpec};

const MIB: u64 = 1 << 20;

/// Restores backup `id` to qcow2 through the CLI and compares it with `model`'s disk.
fn restore_equals(d: &Daemon, dir: &Path, id: &str, model: &Model, disk: &str) -> Result<()> {
    let q = d.data.join("restores").join(format!("{id}.qcow2"));
    let job = d.ok(&["restore", id, "--to", q.to_str().context("path")?])?;
    ensure!(job["state"] == "succeeded", "restore of {id}: {job}");
    let raw = dir.join(format!("{id}.raw"));
    std::fs::write(&raw, model.disk(disk)?)?;
    compare_images(
        q.to_str().context("path")?,
        "qcow2",
        raw.to_str().context("path")?,
        "raw",
    )
}

/// Ids of `vm`'s backups (`backup list VM` answers 404 when there are none).
fn backup_ids(d: &Daemon, vm: &str) -> Result<Vec<String>> {
    let list = d.ok(&["backup", "list"])?;
    Ok(list
        .as_array()
        .context("backup list")?
        .iter()
        .filter(|b| b["vm"] == vm)
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect())
}

/// Waits until `check` holds for the daemon, polling every 200 ms.
fn eventually<T>(
    what: &str,
    timeout: Duration,
    check: impl Fn() -> Result<Option<T>>,
) -> Result<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        ensure!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A booted guest whose first disk holds `data` bytes of pattern `seed` (tracked by the
/// model), and a daemon on a fresh data directory with `extra` configuration.
struct Setup {
    vm: TestVm,
    disk: String,
    model: Model,
    dir: tempfile::TempDir,
    d: Daemon,
}

fn setup(prefix: &str, size: u64, data: u64, seed: u64, extra: &str) -> Result<Setup> {
    let vm = TestVm::boot(VmSpec::new(prefix).disk(size))?;
    let disk = vm.disks()[0].target.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, &disk, 0, data, seed)?;
    vm.sync()?;
    let dir = tempfile::tempdir()?;
    let d = Daemon::start(dir.path(), extra)?;
    Ok(Setup {
        vm,
        disk,
        model,
        dir,
        d,
    })
}

#[test]
fn a_policy_fires_from_the_scheduler_and_its_retention_prunes() -> Result<()> {
    let Setup {
        vm,
        disk,
        mut model,
        dir,
        mut d,
    } = setup("api-sched", 64 * MIB, 4 * MIB, 1, "")?;
    // `--wait` follows the job's event stream over TLS to the end, without falling back.
    let out = d
        .command(&["backup", vm.name(), "--full", "--wait", "--json"])?
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "backup --wait: {stderr}");
    ensure!(
        !stderr.contains("polling"),
        "the event stream broke: {stderr}"
    );
    let manual: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(manual["state"] == "succeeded", "{manual}");
    let manual = manual["backup_id"]
        .as_str()
        .context("manual backup")?
        .to_string();
    // Retention orders backups by their start second: the scheduled one starts later.
    std::thread::sleep(Duration::from_millis(1100));
    model.write(&vm, &disk, 16 * MIB, MIB, 2)?;
    vm.sync()?;

    let policy = dir.path().join("every-20s.toml");
    std::fs::write(
        &policy,
        format!(
            "name = \"every-20s\"\nvms = [\"{}\"]\nschedule = \"*/20 * * * * *\"\n[retention]\nkeep_last = 1\n",
            vm.name()
        ),
    )?;
    d.ok(&["policy", "apply", policy.to_str().context("path")?])?;
    // No trigger: the scheduler (a look every 15 s) starts the job within ~35 s.
    let job = eventually("a scheduled backup", Duration::from_secs(60), || {
        let jobs = d.ok(&["job", "list"])?;
        Ok(jobs.as_array().and_then(|l| {
            l.iter()
                .find(|j| j["policy"] == "every-20s" && j["state"] == "succeeded")
                .cloned()
        }))
    })?;
    d.ok(&["policy", "delete", "every-20s"])?;
    let scheduled = job["backup_id"].as_str().context("scheduled backup")?;
    ensure!(job["vm"] == vm.name(), "{job}");
    // Retention runs after the success: the manual backup goes, the scheduled one stays.
    let left = eventually("retention after success", Duration::from_secs(20), || {
        let ids = backup_ids(&d, vm.name())?;
        Ok((!ids.contains(&manual)).then_some(ids))
    })?;
    ensure!(
        left.iter().any(|id| id == scheduled),
        "the scheduled backup {scheduled} was kept: {left:?}"
    );
    ensure!(
        left.len() <= 2,
        "keep_last = 1 (one more may have fired since): {left:?}"
    );
    restore_equals(&d, dir.path(), scheduled, &model, &disk)?;
    ensure!(d.terminate()?, "daemon exit after SIGTERM");
    Ok(())
}

/// Whether libvirt runs a (backup) job on the domain.
fn libvirt_job(vm: &TestVm) -> Result<bool> {
    Ok(!vm.virsh(&["domjobinfo", vm.name()])?.contains("None"))
}

/// Backup job directories (`job-sluice-…`) in the daemon's work directory.
fn job_dirs(d: &Daemon) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d.data.join("work"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("job-sluice-") {
            out.push(name);
        }
    }
    Ok(out)
}

/// The read limit that keeps the first backup running long enough to be killed (64 MiB of
/// data at 8 MiB/s: about 8 s).
const SLOW: &str = "read_limit = 8388608\n";

#[test]
fn kill_9_mid_backup_then_restart_fails_the_job_and_the_next_backup_is_exact() -> Result<()> {
    let Setup {
        vm,
        disk,
        model,
        dir,
        mut d,
    } = setup("api-kill", 256 * MIB, 64 * MIB, 7, SLOW)?;
    let job = d.ok(&["backup", vm.name(), "--full"])?;
    let id = job["id"].as_u64().context("job id")?;
    let running = d.wait_job(id, Duration::from_secs(60), |j| {
        j["state"] != "queued" && j["progress"]["bytes_read"].as_u64().unwrap_or(0) > 0
    })?;
    ensure!(
        running["state"] == "running",
        "still running when killed: {running}"
    );
    d.kill()?;
    drop(d);
    ensure!(
        libvirt_job(&vm)?,
        "the dead daemon's libvirt backup job is still there"
    );
    let checkpoints_before = vm.checkpoints()?.len();

    let d = Daemon::start(dir.path(), SLOW)?;
    let dead = d.ok(&["job", "show", &id.to_string()])?;
    ensure!(dead["state"] == "failed", "after restart: {dead}");
    let msg = dead["message"].as_str().unwrap_or_default();
    ensure!(msg.contains("daemon restarted"), "{dead}");
    ensure!(
        backup_ids(&d, vm.name())?.is_empty(),
        "nothing was committed"
    );
    // Before any new backup, the start-up cleanup ends the dead daemon's libvirt job and
    // removes its job directory (in the background: the daemon answered before it ran).
    let cleaned = d.cleanup_note(id, Duration::from_secs(30))?;
    ensure!(
        cleaned.contains("cleaned up: libvirt backup job ended"),
        "the job's message says what was cleaned: {cleaned}"
    );
    ensure!(
        !libvirt_job(&vm)?,
        "the dead daemon's libvirt job is left after the restart"
    );
    let dirs = job_dirs(&d)?;
    ensure!(
        dirs.is_empty(),
        "job directories left after the restart: {dirs:?}"
    );

    let next = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(next["state"] == "succeeded", "backup after kill -9: {next}");
    let next_id = next["backup_id"].as_str().context("backup id")?;
    ensure!(
        !libvirt_job(&vm)?,
        "a libvirt job is left after the next backup"
    );
    let cps = vm.checkpoints()?;
    ensure!(
        cps.len() == 1,
        "one checkpoint (the new backup's) after {checkpoints_before} before: {cps:?}"
    );
    let left = d.scratch_files()?;
    ensure!(left.is_empty(), "scratch files left: {left:?}");
    restore_equals(&d, dir.path(), next_id, &model, &disk)?;
    let verify: Value = d.ok(&["verify", "--full"])?;
    ensure!(verify["ok"] == true, "verify: {verify}");
    Ok(())
}

/// Pids of `qemu-nbd` processes serving from a directory under `work`.
fn qemu_nbd_under(work: &Path) -> Result<Vec<String>> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("^qemu-nbd .*{}/", work.display())])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

#[test]
fn kill_9_mid_offline_backup_then_restart_ends_its_qemu_nbd() -> Result<()> {
    let Setup {
        vm,
        disk,
        model,
        dir,
        d,
    } = setup("api-kill-off", 256 * MIB, 64 * MIB, 11, SLOW)?;
    vm.shutdown()?;
    let id = d.kill_mid_backup(vm.name())?;
    let work = dir.path().join("data").join("work");
    let orphans = qemu_nbd_under(&work)?;
    ensure!(
        !orphans.is_empty(),
        "the dead daemon's qemu-nbd outlives it (the case under test)"
    );

    let d = Daemon::start(dir.path(), SLOW)?;
    let cleaned = d.cleanup_note(id, Duration::from_secs(30))?;
    ensure!(
        cleaned.contains("cleaned up: qemu-nbd of the offline backup ended"),
        "{cleaned}"
    );
    let left = qemu_nbd_under(&work)?;
    ensure!(
        left.is_empty(),
        "qemu-nbd left after the restart: {left:?} (was {orphans:?})"
    );
    let dirs = job_dirs(&d)?;
    ensure!(
        dirs.is_empty(),
        "job directories left after the restart: {dirs:?}"
    );

    let next = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(
        next["state"] == "succeeded",
        "offline backup after kill -9: {next}"
    );
    let next_id = next["backup_id"].as_str().context("backup id")?;
    restore_equals(&d, dir.path(), next_id, &model, &disk)?;
    // Nothing holds the image any more: the VM starts.
    vm.start()?;
    Ok(())
}
