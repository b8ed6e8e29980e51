//! A real `sluice serve` for end-to-end runs, driven only through the `sluice` CLI.
//!
//! Owns starting the daemon on a throwaway data directory (free loopback ports for the API and
//! NBD, TLS on, the fingerprint and first admin token read from what it prints and writes),
//! running CLI verbs against it, and killing it when dropped (pass or panic). It does not
//! know any API route: everything goes through the CLI, as an operator would. Also the
//! backup-and-restore steps the remote tests share ([`Daemon::backup_on`],
//! [`Daemon::restore_equals`]) and the binary an isolated daemon runs ([`binary_for`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// The `sluice` binary: `$SLUICE_BIN`, else beside the running executable (a `target/*/`
/// binary) or one directory up (a test in `target/*/deps/`).
pub fn sluice_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("executable path")?;
    let candidates = [here.join("sluice"), here.join("../sluice")];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "no sluice binary beside {}: run `cargo build -p api` (or `make test`)",
                exe.display()
            )
        })
}

/// A running `sluice serve`, killed when dropped.
pub struct Daemon {
    child: Child,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The first admin token.
    pub token: String,
    /// SHA-256 of the TLS certificate, as printed.
    pub fingerprint: String,
    /// Its data directory.
    pub data: PathBuf,
    /// Every XML document it sent to libvirt (its `sluice::sent_xml` debug lines), in order.
    sent_xml: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts a daemon keeping its data under `dir/data` (reused across restarts), with
    /// `extra` appended to its configuration file (local libvirt, `qemu:///system`).
    pub fn start(dir: &Path, extra: &str) -> Result<Daemon> {
        let config = format!("libvirt_uri = \"qemu:///system\"\n{extra}");
        Daemon::start_as(dir, &config, |argv| {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        })
    }

    /// Starts a daemon with `config` after its data directory and listen addresses, run by
    /// the command `wrap` makes of `[sluice, serve, -c, CONFIG]` (e.g. as another user in a
    /// namespace of its own).
    pub fn start_as(
        dir: &Path,
        config: &str,
        wrap: impl FnOnce(Vec<std::ffi::OsString>) -> Command,
    ) -> Result<Daemon> {
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (port, nbd) = (free()?, free()?);
        let data = dir.join("data");
        let cfg = dir.join("sluice.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {data:?}\nlisten = \"127.0.0.1:{port}\"\nnbd_listen = \"127.0.0.1:{nbd}\"\n{config}"
            ),
        )?;
        let argv = vec![
            sluice_bin()?.into_os_string(),
            "serve".into(),
            "-c".into(),
            cfg.into_os_string(),
        ];
        let mut child = wrap(argv)
            .env(
                "RUST_LOG",
                // libnbd sends an IP address as TLS SNI, which rustls warns about.
                std::env::var("SLUICE_TEST_LOG")
                    .unwrap_or("warn,rustls=error,sluice::sent_xml=debug".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().context("daemon stdout")?;
        let err = child.stderr.take().context("daemon stderr")?;
        let sent_xml = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        drain_stderr(err, sent_xml.clone());
        let mut d = Daemon {
            child,
            url: String::new(),
            token: String::new(),
            fingerprint: String::new(),
            data,
            sent_xml,
        };
        d.read_banner(out)?;
        d.token = std::fs::read_to_string(d.data.join("admin.token"))?
            .trim()
            .to_string();
        Ok(d)
    }

    /// Every XML document the daemon has sent to libvirt so far (one log line each).
    pub fn sent_xml(&self) -> Vec<String> {
        self.sent_xml
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the fingerprint and URL the daemon prints, then keeps draining its stdout.
    fn read_banner(&mut self, out: std::process::ChildStdout) -> Result<()> {
        let mut lines = BufReader::new(out).lines();
        for line in lines.by_ref() {
            let line = line?;
            if let Some(fp) = line.strip_prefix("tls certificate sha256 fingerprint: ") {
                self.fingerprint = fp.trim().to_string();
            }
            if let Some(url) = line.strip_prefix("sluice listening on ") {
                self.url = url.trim().to_string();
                break;
            }
        }
        ensure!(!self.url.is_empty(), "sluice serve exited before listening");
        ensure!(
            !self.fingerprint.is_empty(),
            "sluice serve printed no fingerprint"
        );
        std::thread::spawn(move || lines.for_each(drop));
        Ok(())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited with success.
    pub fn terminate(&mut self) -> Result<bool> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(self.child.wait()?.success())
    }

    /// `kill -9`: the daemon dies at once, as in a crash (nothing of its own cleans up).
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Polls `sluice job show ID` until `done` accepts it; fails after `timeout`.
    pub fn wait_job(
        &self,
        id: u64,
        timeout: std::time::Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = std::time::Instant::now();
        loop {
            let j = self.ok(&["job", "show", &id.to_string()])?;
            if done(&j) {
                return Ok(j);
            }
            ensure!(start.elapsed() < timeout, "job {id} after {timeout:?}: {j}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Starts a full backup of `vm`, waits until it has read data, then kills the daemon
    /// with SIGKILL mid-backup (it cannot clean up). Returns the job's id.
    pub fn kill_mid_backup(mut self, vm: &str) -> Result<u64> {
        let job = self.ok(&["backup", vm, "--full"])?;
        let id = job["id"].as_u64().context("job id")?;
        self.wait_job(id, std::time::Duration::from_secs(60), |j| {
            j["state"] == "running" && j["progress"]["bytes_read"].as_u64().unwrap_or(0) > 0
        })?;
        self.kill()?;
        Ok(id)
    }

    /// The message of job `id` once the daemon's start-up clean-up has noted its outcome
    /// ("cleaned up: …" or "not cleaned up: …"); fails after `timeout`.
    pub fn cleanup_note(&self, id: u64, timeout: std::time::Duration) -> Result<String> {
        let j = self.wait_job(id, timeout, |j| {
            j["message"]
                .as_str()
                .is_some_and(|m| m.contains("cleaned up"))
        })?;
        Ok(j["message"].as_str().unwrap_or_default().to_string())
    }

    /// Files left under the daemon's scratch directory (`DATA/work`), recursively: none once
    /// every job has ended cleanly.
    pub fn scratch_files(&self) -> Result<Vec<PathBuf>> {
        files_under(&self.data.join("work"))
    }

    /// `sluice ARGS` with this daemon's URL, token and fingerprint in the environment.
    pub fn command(&self, args: &[&str]) -> Result<Command> {
        let mut c = Command::new(sluice_bin()?);
        c.args(args)
            .env("SLUICE_URL", &self.url)
            .env("SLUICE_TOKEN", &self.token)
            .env("SLUICE_FINGERPRINT", &self.fingerprint);
        Ok(c)
    }

    /// Runs `sluice ARGS --json`; returns (exit code, parsed stdout).
    pub fn cli(&self, args: &[&str]) -> Result<(i32, Value)> {
        let out: Output = self.command(args)?.arg("--json").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = out.status.code().unwrap_or(-1);
        if code != 0 {
            eprintln!(
                "sluice {args:?} -> {code}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                text
            );
        }
        Ok((code, v))
    }

    /// `cli`, failing unless the exit code is 0.
    pub fn ok(&self, args: &[&str]) -> Result<Value> {
        let (code, v) = self.cli(args)?;
        if code != 0 {
            bail!("sluice {args:?} exited with {code}");
        }
        Ok(v)
    }
}

/// The `sluice` binary copied into `dir` where the isolated user can run it (a test's
/// target directory may be private to root).
pub fn binary_for(iso: &crate::Isolated, dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("sluice");
    std::fs::copy(sluice_bin()?, &bin).context("copying the sluice binary")?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::chown(&bin, Some(iso.uid), Some(iso.gid))?;
    Ok(bin)
}

impl Daemon {
    /// `sluice backup VM --wait [--full]`: the job, which must have succeeded on hypervisor
    /// `hypervisor`.
    pub fn backup_on(&self, hypervisor: &str, vm: &str, full: bool) -> Result<Value> {
        let mut args = vec!["backup", vm, "--wait"];
        if full {
            args.push("--full");
        }
        let job = self.ok(&args)?;
        ensure!(job["state"] == "succeeded", "backup of {vm}: {job}");
        ensure!(job["hypervisor"] == hypervisor, "backup of {vm}: {job}");
        Ok(job)
    }

    /// Restores backup `id` to qcow2 in the daemon's restore directory (as `NAME.qcow2`) and
    /// compares it with the disk `disk` the model says the guest had.
    pub fn restore_equals(
        &self,
        id: &str,
        model: &crate::Model,
        disk: &str,
        name: &str,
    ) -> Result<()> {
        let q = self.data.join("restores").join(format!("{name}.qcow2"));
        let q = q.to_str().context("utf-8 path")?.to_string();
        let job = self.ok(&[
            "restore", id, "--disk", disk, "--to", &q, "--format", "qcow2",
        ])?;
        ensure!(job["state"] == "succeeded", "restore of {id}: {job}");
        let raw = self.data.join(format!("{name}.raw"));
        std::fs::write(&raw, model.disk(disk)?)?;
        crate::inspect::compare_images(&q, "qcow2", raw.to_str().context("utf-8 path")?, "raw")
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(files_under(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// Copies the daemon's log to the test's stderr, keeping its lines about XML sent to
/// libvirt (`sluice::sent_xml`) aside instead (bounded: the newest 10 000).
fn drain_stderr(
    err: std::process::ChildStderr,
    sent: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if !line.contains("sluice::sent_xml") {
                eprintln!("{line}");
                continue;
            }
            let mut s = sent.lock().unwrap_or_else(|e| e.into_inner());
            if s.len() >= 10_000 {
                s.remove(0);
            }
            s.push(line);
        }
    });
}
