//! End to end through the daemon: starts the real `sluice serve` (TLS, self-signed
//! certificate pinned by its fingerprint) against real libvirt and a booted test guest, and
//! drives it only with the `sluice` CLI: vm list, full backup with --wait, guest writes, an
//! incremental, verify, prune; then SIGTERM stops the daemon cleanly.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use testbed::{TestVm, VmSpec};

const MIB: u64 = 1 << 20;

/// The `sluice` binary beside this test's executable (built by `cargo test --workspace`).
fn sluice_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable path")?;
    let bin = dir.join("sluice");
    ensure!(
        bin.exists(),
        "{} is missing: run `cargo build -p api` (or `make test`)",
        bin.display()
    );
    Ok(bin)
}

/// The daemon, killed when dropped.
struct Daemon {
    child: Child,
    url: String,
    token: String,
    fingerprint: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts a daemon keeping its data under `dir` (reused across restarts).
    fn start(dir: &std::path::Path) -> Result<Daemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let nbd = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cfg = dir.join("sluice.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nnbd_listen = \"127.0.0.1:{nbd}\"\nlibvirt_uri = \"qemu:///system\"\n",
                dir.join("data")
            ),
        )?;
        let mut child = Command::new(sluice_bin()?)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or("warn".into()),
            )
            .args(["serve", "-c"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().context("daemon stdout")?;
        let mut d = Daemon {
            child,
            url: String::new(),
            token: String::new(),
            fingerprint: String::new(),
        };
        for line in BufReader::new(out).lines() {
            let line = line?;
            if let Some(fp) = line.strip_prefix("tls certificate sha256 fingerprint: ") {
                d.fingerprint = fp.trim().to_string();
            }
            if let Some(url) = line.strip_prefix("sluice listening on ") {
                d.url = url.trim().to_string();
                break;
            }
        }
        ensure!(!d.url.is_empty(), "sluice serve exited before listening");
        ensure!(
            !d.fingerprint.is_empty(),
            "sluice serve printed no fingerprint"
        );
        let tok = dir.join("data/admin.token");
        d.token = std::fs::read_to_string(&tok)?.trim().to_string();
        Ok(d)
    }

    /// Runs `sluice ARGS --json`; returns (exit code, parsed stdout).
    fn cli(&self, args: &[&str]) -> Result<(i32, Value)> {
        let out = Command::new(sluice_bin()?)
            .args(args)
            .arg("--json")
            .env("SLUICE_URL", &self.url)
            .env("SLUICE_TOKEN", &self.token)
            .env("SLUICE_FINGERPRINT", &self.fingerprint)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = out.status.code().unwrap_or(-1);
        if code != 0 {
            eprintln!(
                "sluice {args:?} -> {code}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((code, v))
    }

    fn ok(&self, args: &[&str]) -> Result<Value> {
        let (code, v) = self.cli(args)?;
        if code != 0 {
            bail!("sluice {args:?} exited with {code}");
        }
        Ok(v)
    }
}

#[test]
fn the_cli_drives_full_incremental_verify_and_prune_through_the_daemon() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("api-e2e").disk(64 * MIB))?;
    let disk = vm.disks()[0].target.clone();
    let dir = tempfile::tempdir()?;
    let d = Daemon::start(dir.path())?;

    let vms = d.ok(&["vm", "list"])?;
    let listed = vms.as_array().context("vm list")?;
    ensure!(
        listed.iter().any(|v| v["name"] == vm.name()),
        "vm list lacks {}: {vms}",
        vm.name()
    );

    vm.write_pattern(&disk, 0, 4 * MIB, 1)?;
    vm.sync()?;
    let full = d.ok(&["backup", vm.name(), "--full", "--wait"])?;
    ensure!(full["state"] == "succeeded", "full backup: {full}");
    let full_id = full["backup_id"].as_str().context("backup id")?.to_string();

    // Retention orders backups by their start second and does not break ties within one
    // second (catalog), so the incremental must start in a later second than the full.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    vm.write_pattern(&disk, 8 * MIB, MIB, 2)?;
    vm.sync()?;
    let inc = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(inc["state"] == "succeeded", "incremental: {inc}");
    let inc_id = inc["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &inc_id])?;
    ensure!(shown["mode"] == "incremental", "second backup: {shown}");
    ensure!(
        inc["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX) <= 2 * MIB,
        "incremental read too much: {inc}"
    );

    let export = d.ok(&["export", &inc_id])?;
    let uri = export["uri"].as_str().context("export uri")?.to_string();
    let info = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .context("running nbdinfo (install libnbd-bin: make deps)")?;
    let size = String::from_utf8_lossy(&info.stdout).trim().to_string();
    ensure!(
        size == (64 * MIB).to_string(),
        "nbdinfo --size {uri}: {size:?} {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let n = export["id"].to_string();
    d.ok(&["export", "close", &n])?;
    ensure!(
        d.ok(&["export", "list"])? == serde_json::json!([]),
        "export still listed"
    );

    let list = d.ok(&["backup", "list", vm.name()])?;
    ensure!(
        list.as_array().map(|a| a.len()) == Some(2),
        "backup list: {list}"
    );
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 2,
        "verify: {verify}"
    );

    let prune = d.ok(&["prune", "--keep-last", "1"])?;
    ensure!(
        prune["removed"] == serde_json::json!([full_id]),
        "prune: {prune}"
    );
    ensure!(
        prune["kept"] == serde_json::json!([inc_id]),
        "prune: {prune}"
    );
    d.ok(&["gc"])?;
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 1,
        "verify after gc: {verify}"
    );

    let (code, _) = d.cli(&["backup", "show", "20200101-nope"])?;
    ensure!(code == 4, "unknown backup exit code {code}");

    let mut d = d;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = d.child.wait()?;
    ensure!(status.success(), "daemon exit after SIGTERM: {status}");
    Ok(())
}

/// No libvirt job, no checkpoint beyond those of committed backups, no scratch file.
fn assert_nothing_left(vm: &TestVm, data: &std::path::Path, committed: usize) -> Result<()> {
    let job = vm.virsh(&["domjobinfo", vm.name()])?;
    ensure!(job.contains("None"), "a libvirt job is left: {job}");
    let cps = vm.virsh(&["checkpoint-list", vm.name(), "--name"])?;
    let n = cps.lines().filter(|l| !l.trim().is_empty()).count();
    ensure!(n <= committed, "checkpoints left behind: {cps}");
    let work = data.join("work");
    let left: Vec<_> = walk(&work)?;
    ensure!(left.is_empty(), "scratch files left: {left:?}");
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

#[test]
fn sigterm_during_a_backup_leaves_nothing_and_the_next_backup_succeeds() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("api-term").disk(256 * MIB))?;
    let disk = vm.disks()[0].target.clone();
    vm.write_pattern(&disk, 0, 64 * MIB, 7)?;
    vm.sync()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut d = Daemon::start(dir.path())?;
    let job = d.ok(&["backup", vm.name(), "--full"])?;
    ensure!(job["state"] == "queued", "{job}");
    std::thread::sleep(std::time::Duration::from_millis(150));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = d.child.wait()?;
    ensure!(status.success(), "daemon exit after SIGTERM: {status}");
    drop(d);

    let d = Daemon::start(dir.path())?;
    // The job was cancelled (nothing committed) unless it won the race and committed.
    let committed = d.ok(&["backup", "list"])?.as_array().map_or(0, |a| a.len());
    assert_nothing_left(&vm, &data, committed)?;
    let next = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(next["state"] == "succeeded", "backup after SIGTERM: {next}");
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(verify["ok"] == true, "verify: {verify}");
    assert_nothing_left(&vm, &data, 1)?;
    Ok(())
}
