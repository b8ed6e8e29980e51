//! The daemon's libvirt connection across a restart of libvirtd (and a libvirtd that stops
//! answering), with the proxy isolated from its hypervisor as in `backup_remote.rs`: `sluice
//! serve` runs as its own unprivileged user in a mount namespace where libvirt's directories
//! and the guest's image directory are empty, reaches libvirt only over
//! `qemu+tls://127.0.0.1/system` and reads each disk from QEMU's own NBD server over TCP with
//! TLS. Driven through the CLI; the daemon is never restarted.
//!
//! Every test here restarts libvirtd (`testbed::libvirt::restart_libvirtd_now`) or stops it
//! for a while (`stop_libvirtd`), which cuts or stalls every client's connection on the
//! machine. So they all live in this one binary, take [`RESTARTS`] for their whole length (one
//! at a time even with `--test-threads=2`), and cargo runs this binary alone (test binaries
//! run one after another). No other test file may restart or stop libvirtd.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::daemon::Daemon;
use testbed::libvirt::{restart_libvirtd_now, stop_libvirtd};
use testbed::remote_guest::RemoteGuest;
use testbed::{Model, VmSpec};

const MIB: u64 = 1 << 20;

/// Held by each test for its whole length: one libvirtd restart at a time.
static RESTARTS: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    RESTARTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A booted guest on the test bed's libvirt and an isolated daemon that backs it up over TLS.
struct Remote {
    // Fields drop in this order: the daemon first, the guest and data directory last.
    d: Daemon,
    g: RemoteGuest,
}

impl std::ops::Deref for Remote {
    type Target = RemoteGuest;

    fn deref(&self) -> &RemoteGuest {
        &self.g
    }
}

impl Remote {
    /// A guest with one disk of `size` bytes, and a daemon with `top` (top-level settings)
    /// before its hypervisor.
    fn new(prefix: &str, size: u64, top: &str) -> Result<Remote> {
        let g = RemoteGuest::boot(prefix, VmSpec::new(prefix).disk(size))?;
        let d = g.daemon(top)?;
        Ok(Remote { d, g })
    }

    /// `sluice backup VM --wait [--full]`: the job, which must have succeeded.
    fn backup(&self, full: bool) -> Result<Value> {
        let mut args = vec!["backup", self.vm.name(), "--wait"];
        if full {
            args.push("--full");
        }
        let job = self.d.ok(&args)?;
        ensure!(job["state"] == "succeeded", "backup: {job}");
        Ok(job)
    }

    /// Restores backup `id` to qcow2 and compares it with the disk `model` says the guest had.
    fn restore_equals(&self, id: &str, model: &Model, name: &str) -> Result<()> {
        self.d.restore_equals(id, model, &self.disk, name)
    }

    /// `sluice vm list`, which must show the guest on the hypervisor and nothing unreachable.
    fn lists_the_vm(&self) -> Result<()> {
        let vms = self.d.ok(&["vm", "list"])?;
        ensure!(
            vms["unreachable"].as_array().is_some_and(|u| u.is_empty()),
            "vm list notes an unreachable hypervisor: {vms}"
        );
        ensure!(
            vms["vms"].as_array().is_some_and(|l| l
                .iter()
                .any(|v| v["name"] == self.vm.name() && v["hypervisor"] == "remote")),
            "vm list lacks {}: {vms}",
            self.vm.name()
        );
        Ok(())
    }

    /// No backup job is left on the domain: `domjobinfo` shows none, `backup-dumpxml` fails.
    fn no_job_left(&self) -> Result<()> {
        let info = self.host.virsh(&["domjobinfo", self.vm.name()])?;
        ensure!(
            info.lines()
                .any(|l| l.starts_with("Job type:") && l.contains("None")),
            "a job is left on the domain: {info}"
        );
        ensure!(
            self.host
                .virsh(&["backup-dumpxml", self.vm.name()])
                .is_err(),
            "a backup job is left on the domain"
        );
        Ok(())
    }
}

fn id_of(job: &Value) -> Result<String> {
    Ok(job["backup_id"].as_str().context("backup id")?.to_string())
}

/// `sluice backup show ID`'s mode.
fn mode_of(r: &Remote, id: &str) -> Result<String> {
    let shown = r.d.ok(&["backup", "show", id])?;
    Ok(shown["mode"].as_str().unwrap_or_default().to_string())
}

/// The daemon's connection dies with libvirtd; its very next call reconnects: `vm list`
/// right after the restart lists the guest (nothing unreachable, no wait for the registry's
/// retry), and an incremental backup through the CLI is exact.
#[test]
fn after_a_libvirtd_restart_the_next_calls_reconnect_without_a_daemon_restart() -> Result<()> {
    let _one = one_at_a_time();
    let r = Remote::new("reconnect-list", 64 * MIB, "")?;
    r.lists_the_vm()?;
    let mut model = Model::new(&r.vm);
    model.write(&r.vm, &r.disk, 0, 4 * MIB, 1)?;
    r.vm.sync()?;
    let full = r.backup(true)?;

    restart_libvirtd_now()?;
    let at = Instant::now();
    r.lists_the_vm()?;
    eprintln!(
        "vm list answered {:?} after libvirtd answered again",
        at.elapsed()
    );
    let hvs = r.d.ok(&["hypervisor", "list"])?;
    ensure!(
        hvs[0]["state"] == "up",
        "hypervisor after the restart: {hvs}"
    );

    // Retention orders backups by their start second, so the incremental starts later.
    std::thread::sleep(Duration::from_millis(1100));
    let at_full = model.clone();
    model.write(&r.vm, &r.disk, 8 * MIB, MIB, 2)?;
    r.vm.sync()?;
    let inc = r.backup(false)?;
    let inc_id = id_of(&inc)?;
    ensure!(
        mode_of(&r, &inc_id)? == "incremental",
        "after the restart: {inc}"
    );
    let read = inc["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(read <= 2 * MIB, "the incremental read {read} bytes: {inc}");
    r.no_job_left()?;
    r.restore_equals(&id_of(&full)?, &at_full, "full")?;
    r.restore_equals(&inc_id, &model, "inc")
}

/// libvirtd restarted while a backup reads: libvirt keeps the backup job across its restart
/// and QEMU's TLS export goes on serving, so the read goes on untouched and the backup
/// commits, byte-exact. Ending the job and dropping the old checkpoint, both over libvirt,
/// reconnect first: no job is left on the domain, one checkpoint remains, and the next
/// backup is an exact incremental.
#[test]
fn a_libvirtd_restart_mid_backup_reconnects_to_end_the_job() -> Result<()> {
    let _one = one_at_a_time();
    // 4 MiB/s: the 48 MiB full read takes about 12 s, the restart about 2 s.
    let r = Remote::new("reconnect-mid", 128 * MIB, "read_limit = 4194304\n")?;
    let mut model = Model::new(&r.vm);
    model.write(&r.vm, &r.disk, 0, MIB, 1)?;
    r.vm.sync()?;
    r.backup(true)?;
    model.write(&r.vm, &r.disk, 16 * MIB, 48 * MIB, 2)?;
    r.vm.sync()?;
    std::thread::sleep(Duration::from_millis(1100));

    let job = r.d.ok(&["backup", r.vm.name(), "--full"])?;
    let id = job["id"].as_u64().context("job id")?;
    r.d.wait_job(id, Duration::from_secs(60), |j| {
        j["state"] == "running" && j["progress"]["bytes_read"].as_u64().unwrap_or(0) > 0
    })?;
    restart_libvirtd_now()?;
    let j = r.d.ok(&["job", "show", &id.to_string()])?;
    let (read, planned) = (
        j["progress"]["bytes_read"].as_u64().unwrap_or(0),
        j["progress"]["bytes_planned"].as_u64().unwrap_or(0),
    );
    ensure!(
        j["state"] == "running" && read < planned,
        "libvirtd restarted mid-read: {j}"
    );
    r.host
        .virsh(&["backup-dumpxml", r.vm.name()])
        .context("libvirt kept the backup job across its restart")?;

    let done = r.d.wait_job(id, Duration::from_secs(120), |j| {
        !matches!(j["state"].as_str(), Some("running" | "queued"))
    })?;
    ensure!(
        done["state"] == "succeeded",
        "the backup across the restart: {done}"
    );
    r.no_job_left()?;
    let cps = r.vm.checkpoints()?;
    ensure!(cps.len() == 1, "only the new checkpoint remains: {cps:?}");
    let mid_id = id_of(&done)?;
    r.restore_equals(&mid_id, &model, "mid")?;

    std::thread::sleep(Duration::from_millis(1100));
    model.write(&r.vm, &r.disk, 80 * MIB, MIB, 3)?;
    r.vm.sync()?;
    let next = r.backup(false)?;
    let next_id = id_of(&next)?;
    ensure!(
        mode_of(&r, &next_id)? == "incremental",
        "next backup: {next}"
    );
    r.restore_equals(&next_id, &model, "next")
}

/// The registry's limit on one call (`api::daemon::hypervisors::CALL_TIMEOUT`) and its delay
/// before a failed connection is tried again (`RETRY_AFTER`).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A libvirtd that stops answering without closing its connections (SIGSTOP: a hung
/// hypervisor, or one the network cut off) is given up on by libvirt's keepalive: `vm list`
/// notes the hypervisor unreachable, naming the keepalive, before the registry's call
/// timeout. Once libvirtd answers again (SIGCONT) `vm list` works within the registry's
/// retry delay, without a daemon restart.
#[test]
fn a_libvirtd_that_stops_answering_is_given_up_by_keepalive_then_reconnected() -> Result<()> {
    let _one = one_at_a_time();
    let r = Remote::new("reconnect-hung", 16 * MIB, "")?;
    r.lists_the_vm()?;
    let stopped = stop_libvirtd()?;
    let at = Instant::now();
    let vms = r.d.ok(&["vm", "list"])?;
    let took = at.elapsed();
    drop(stopped);
    let error = vms["unreachable"][0]["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("keepalive") && took < CALL_TIMEOUT,
        "vm list against a stopped libvirtd, after {took:?}: {vms}"
    );
    eprintln!("vm list gave up after {took:?}: {error}");

    let at = Instant::now();
    while r.lists_the_vm().is_err() {
        ensure!(
            at.elapsed() < RETRY_AFTER + Duration::from_secs(5),
            "vm list still fails {:?} after libvirtd answers again",
            at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("vm list worked again {:?} after SIGCONT", at.elapsed());
    Ok(())
}
