//! The backup job through the other two ways in: plain QEMU over QMP (no libvirt), and a
//! stopped libvirt VM read offline from its images (never started). Each backup is restored
//! through the repository and compared with the bytes written.
//!
//! A proxy that dies mid-backup over QMP leaves its fleecing export, NBD server, block job,
//! scratch node and temporary bitmap in QEMU: the next backup ends them first, and a
//! `sluice serve` killed with `kill -9` ends them when it starts again.

#[path = "hypervisor_support.rs"]
mod support;

use std::sync::Arc;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use catalog::{BackupMode, Repository};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::qmp::QmpClient;
use proxy::hypervisor::Hypervisor;
use proxy::job::{run_backup, BackupOptions, BackupReport, Progress};
use serde_json::{json, Value};
use support::{qemu_io, BiosVm, KIB, MIB};
use testbed::daemon::Daemon;
use testbed::qmp::{backup_request, guest_write, PlainQemu};
use testbed::{check_disk, TempRepo};
use tokio_util::sync::CancellationToken;

async fn backup<H: Hypervisor>(
    hv: &H,
    repo: &Repository,
    vm: &str,
    work: &std::path::Path,
) -> Result<BackupReport> {
    let opts = BackupOptions::new(work);
    Ok(run_backup(
        hv,
        repo,
        vm,
        &opts,
        Arc::new(Progress::default()),
        CancellationToken::new(),
    )
    .await?)
}

/// The expected disk: `size` zero bytes with `fills` (offset, len, byte) applied.
fn expected(size: u64, fills: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for &(o, l, b) in fills {
        v[o as usize..(o + l) as usize].fill(b);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_qemu_over_qmp_full_and_incrementals() -> Result<()> {
    let qemu = PlainQemu::start("bk-qmp", 64 * MIB, &["write -P 0xaa 0 1M"])?;
    let (hv, mut writer) = qemu.connect("vm").await?;
    let r = TempRepo::create()?;
    let work = qemu.dir().join("work");
    let mut fills = vec![(0, MIB, 0xaa)];

    let full = backup(&hv, &r, "vm", &work).await?;
    assert_eq!(full.manifest.mode, BackupMode::Full);
    check_disk(&r, &full.manifest, "disk0", &expected(64 * MIB, &fills))?;
    for (i, (off, len)) in [(8 * MIB, 64 * KIB), (16 * MIB + 4 * KIB, 4 * KIB)]
        .into_iter()
        .enumerate()
    {
        let byte = 0x21 + i as u8;
        guest_write(&mut writer, off, len, byte).await?;
        fills.push((off, len, byte));
        let inc = backup(&hv, &r, "vm", &work).await?;
        assert_eq!(inc.manifest.mode, BackupMode::Incremental);
        assert_eq!(inc.bytes_dirty, 64 * KIB);
        ensure!(inc.bytes_read <= 64 * KIB, "read {}", inc.bytes_read);
        check_disk(&r, &inc.manifest, "disk0", &expected(64 * MIB, &fills))?;
    }
    check_disk(
        &r,
        &full.manifest,
        "disk0",
        &expected(64 * MIB, &fills[..1]),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_vm_is_backed_up_offline_without_starting_it() -> Result<()> {
    let vm = BiosVm::define("bk-offline", &[32 * MIB], |disks| {
        qemu_io(&disks[0].1, "write -P 0x31 0 2M")
    })?;
    let hv = LibvirtHypervisor::connect("qemu:///system").await?;
    let r = TempRepo::create()?;
    let work = vm.dir.path().join("work");
    let mut fills = vec![(0, 2 * MIB, 0x31)];

    let full = backup(&hv, &r, &vm.name, &work).await?;
    assert_eq!(full.manifest.mode, BackupMode::Full);
    assert_eq!(vm.state()?, "shut off", "a stopped vm must not be started");
    check_disk(&r, &full.manifest, "vda", &expected(32 * MIB, &fills))?;

    qemu_io(vm.image("vda"), "write -P 0x32 4M 64k")?;
    fills.push((4 * MIB, 64 * KIB, 0x32));
    let inc = backup(&hv, &r, &vm.name, &work).await?;
    assert_eq!(inc.manifest.mode, BackupMode::Incremental);
    assert_eq!(inc.bytes_dirty, 64 * KIB);
    assert_eq!(vm.state()?, "shut off");
    check_disk(&r, &inc.manifest, "vda", &expected(32 * MIB, &fills))?;

    // Started later, the chain continues online from the checkpoint taken offline.
    vm.start()?;
    vm.write("vda", 6 * MIB, 64 * KIB, 0x33)?;
    fills.push((6 * MIB, 64 * KIB, 0x33));
    let online = backup(&hv, &r, &vm.name, &work).await?;
    assert_eq!(online.manifest.mode, BackupMode::Incremental);
    check_disk(&r, &online.manifest, "vda", &expected(32 * MIB, &fills))?;
    Ok(())
}

/// What Sluice's fleecing left in QEMU, by kind and name: exports, block jobs, nodes and
/// bitmaps whose names start with `sluice-` (checkpoint bitmaps `sluice-<secs>-…` aside).
async fn fleece_left(c: &mut QmpClient) -> Result<Vec<String>> {
    let ours = |v: &Value, key: &str| {
        v[key]
            .as_str()
            .filter(|n| {
                n.starts_with("sluice-scratch-")
                    || n.starts_with("sluice-export-")
                    || n.starts_with("sluice-backup-")
            })
            .map(|n| format!("{key} {n}"))
    };
    let mut left = Vec::new();
    let exports: Vec<Value> = c.execute("query-block-exports", json!({})).await?;
    left.extend(exports.iter().filter_map(|e| ours(e, "id")));
    let jobs: Vec<Value> = c.execute("query-block-jobs", json!({})).await?;
    left.extend(jobs.iter().filter_map(|j| ours(j, "device")));
    let nodes: Vec<Value> = c
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?;
    for n in &nodes {
        left.extend(ours(n, "node-name"));
        let bitmaps = n["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
        left.extend(bitmaps.iter().filter_map(|b| ours(b, "name")));
    }
    Ok(left)
}

/// Sluice job directories (`job-sluice-…`) in `work`.
fn job_dirs(work: &std::path::Path) -> Result<Vec<String>> {
    let Ok(rd) = std::fs::read_dir(work) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in rd {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("job-sluice-") {
            out.push(name);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleece_left_by_a_dead_proxy_is_ended_by_the_next_backup() -> Result<()> {
    let qemu = PlainQemu::start("bk-qmp-stale", 64 * MIB, &["write -P 0xaa 0 1M"])?;
    let (hv, mut writer) = qemu.connect("vm").await?;
    let r = TempRepo::create()?;
    let work = qemu.dir().join("work");
    let full = backup(&hv, &r, "vm", &work).await?;
    let base = full.manifest.disks[0]
        .checkpoint
        .clone()
        .context("checkpoint")?;

    // A proxy dies right after its point in time: everything it set up stays in QEMU (the
    // session is never finished, aborted or dropped).
    let dead = work.join("job-sluice-1000000000-0badc0de");
    std::fs::create_dir_all(&dead)?;
    let req = backup_request(
        "vm",
        "disk0",
        &dead,
        Some(&base),
        Some("sluice-1000000000-0badc0de"),
    );
    std::mem::forget(hv.begin_backup(req).await?);
    let left = fleece_left(&mut writer).await?;
    ensure!(
        left.len() >= 4,
        "the dead proxy's fleece is in qemu: {left:?}"
    );

    guest_write(&mut writer, 8 * MIB, 64 * KIB, 0x21).await?;
    let inc = backup(&hv, &r, "vm", &work).await?;
    assert_eq!(inc.manifest.mode, BackupMode::Incremental);
    assert_eq!(
        inc.bytes_dirty,
        64 * KIB,
        "dirty since the last good backup"
    );
    let fills = [(0, MIB, 0xaa), (8 * MIB, 64 * KIB, 0x21)];
    check_disk(&r, &inc.manifest, "disk0", &expected(64 * MIB, &fills))?;
    let left = fleece_left(&mut writer).await?;
    ensure!(
        left.is_empty(),
        "fleece left after the next backup: {left:?}"
    );
    ensure!(!dead.exists(), "the dead proxy's job directory is removed");
    Ok(())
}

/// Polls `check` every 200 ms until it answers, for at most `limit`.
async fn eventually<T, F>(what: &str, limit: Duration, mut check: impl FnMut() -> F) -> Result<T>
where
    F: std::future::Future<Output = Result<Option<T>>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        ensure!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A QEMU over QMP whose backup a `sluice serve` was running when it was killed with
/// `kill -9`: its fleece and job directory are left (checked).
struct Killed {
    qemu: PlainQemu,
    /// A client on QEMU's second monitor (the daemon holds the first).
    watch: QmpClient,
    dir: tempfile::TempDir,
    /// The daemon's configuration, for the restart.
    extra: String,
    /// The interrupted job.
    id: u64,
    work: std::path::PathBuf,
}

/// 48 MiB written in a 128 MiB disk; the killed full backup reads at 8 MiB/s.
const SIZE: u64 = 128 * MIB;

async fn killed_mid_backup(tag: &str) -> Result<Killed> {
    let qemu = PlainQemu::start(tag, SIZE, &["write -P 0xaa 0 48M"])?;
    let mut watch = QmpClient::connect(&qemu.dir().join("qmp2.sock")).await?;
    let dir = tempfile::tempdir()?;
    let extra = format!(
        "read_limit = 8388608\n[[hypervisors]]\nname = \"plain\"\nsocket = {:?}\nvm = \"plainvm\"\n",
        qemu.dir().join("qmp.sock")
    );
    let d = Daemon::start(dir.path(), &extra)?;
    let id = d.kill_mid_backup("plainvm")?;
    let left = fleece_left(&mut watch).await?;
    ensure!(!left.is_empty(), "the dead daemon's fleece is in qemu");
    let work = dir.path().join("data").join("work");
    ensure!(!job_dirs(&work)?.is_empty(), "and its job directory");
    Ok(Killed {
        qemu,
        watch,
        dir,
        extra,
        id,
        work,
    })
}

/// Backs up `plainvm` through the daemon after a guest write, restores the backup to a raw
/// file and compares it with what was written; no fleece is left.
async fn next_backup_is_exact(d: &Daemon, watch: &mut QmpClient) -> Result<()> {
    guest_write(watch, 64 * MIB, 64 * KIB, 0x21).await?;
    let next = d.ok(&["backup", "plainvm", "--wait"])?;
    ensure!(next["state"] == "succeeded", "backup after kill -9: {next}");
    let bid = next["backup_id"].as_str().context("backup id")?;
    let out = d.data.join("restores").join("next.raw");
    let to = out.to_str().context("path")?;
    let restore = d.ok(&["restore", bid, "--to", to, "--format", "raw"])?;
    ensure!(restore["state"] == "succeeded", "{restore}");
    let fills = [(0, 48 * MIB, 0xaa), (64 * MIB, 64 * KIB, 0x21)];
    ensure!(
        std::fs::read(&out)? == expected(SIZE, &fills),
        "restored bytes differ"
    );
    let left = fleece_left(watch).await?;
    ensure!(
        left.is_empty(),
        "fleece left after the next backup: {left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_mid_qmp_backup_is_cleaned_up_at_restart() -> Result<()> {
    let Killed {
        qemu: _qemu,
        mut watch,
        dir,
        extra,
        id,
        work,
    } = killed_mid_backup("bk-qmp-kill").await?;
    let d = Daemon::start(dir.path(), &extra)?;
    let msg = d.cleanup_note(id, Duration::from_secs(40))?;
    ensure!(
        msg.contains("cleaned up: qemu backup export ended"),
        "{msg}"
    );
    let left = fleece_left(&mut watch).await?;
    ensure!(left.is_empty(), "fleece left after the restart: {left:?}");
    let dirs = job_dirs(&work)?;
    ensure!(
        dirs.is_empty(),
        "job directories left after the restart: {dirs:?}"
    );
    next_backup_is_exact(&d, &mut watch).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hypervisor_down_at_restart_is_left_to_the_next_backup() -> Result<()> {
    let Killed {
        qemu,
        mut watch,
        dir,
        extra,
        id,
        work,
    } = killed_mid_backup("bk-qmp-down").await?;
    // QEMU stopped (SIGSTOP): its monitor accepts the connection but never answers.
    let pid = qemu_pid(qemu.dir())?;
    kill(pid, Signal::SIGSTOP)?;
    let d = Daemon::start(dir.path(), &extra);
    let msg = match &d {
        Ok(d) => d.cleanup_note(id, Duration::from_secs(40)),
        Err(_) => Ok(String::new()),
    };
    kill(pid, Signal::SIGCONT)?;
    let (d, msg) = (d?, msg?);
    ensure!(msg.contains("not cleaned up: hypervisor plain"), "{msg}");
    ensure!(
        msg.contains("the next backup of vm plainvm ends its job"),
        "{msg}"
    );
    ensure!(!job_dirs(&work)?.is_empty(), "its job directory is kept");
    ensure!(!fleece_left(&mut watch).await?.is_empty(), "and its fleece");
    // The hypervisor answers again (once its last failure is old enough to retry): the next
    // backup ends the stale job first.
    eventually("hypervisor plain up", Duration::from_secs(30), || async {
        let (_, list) = d.cli(&["hypervisor", "list"])?;
        let up = list
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["name"] == "plain" && h["state"] == "up");
        Ok(up.then_some(()))
    })
    .await?;
    next_backup_is_exact(&d, &mut watch).await?;
    let dirs = job_dirs(&work)?;
    ensure!(
        dirs.is_empty(),
        "job directories left after the next backup: {dirs:?}"
    );
    Ok(())
}

/// The pid of the QEMU whose scratch directory is `dir` (its QMP socket is in it).
fn qemu_pid(dir: &std::path::Path) -> Result<Pid> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("^qemu-system.*{}/qmp.sock", dir.display())])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = text
        .split_whitespace()
        .next()
        .context("no qemu process")?
        .parse()?;
    Ok(Pid::from_raw(pid))
}
