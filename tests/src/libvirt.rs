//! The libvirt daemons and the `virsh` CLI, as the test bed uses them.
//!
//! Owns: making sure `virtlogd` and `libvirtd` run (started when absent, reused when present),
//! the `/dev/kvm` permission fix that keeps `virsh define` fast, running `virsh` against
//! `qemu:///system`, and finding QEMU processes by domain name. It does not own domains: see
//! [`crate::vm`].

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The connection URI every test uses.
pub const URI: &str = "qemu:///system";

static ENSURED: Mutex<bool> = Mutex::new(false);

/// Runs `virsh -c qemu:///system ARGS...` and returns its stdout; a failure carries stderr.
pub fn virsh<S: AsRef<str>>(args: &[S]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(&args)
        .output()
        .context("cannot run virsh (install it with `make deps`)")?;
    if !out.status.success() {
        bail!(
            "virsh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes sure libvirt answers on `qemu:///system`: fixes `/dev/kvm`'s group and mode (what udev
/// would do), starts `virtlogd` and `libvirtd` when they are not running, and waits until
/// `virsh version` answers. Cheap after the first call in a process.
pub fn ensure_libvirt() -> Result<()> {
    let mut done = ENSURED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    for tool in [
        "virsh",
        "virtlogd",
        "libvirtd",
        "qemu-img",
        "qemu-system-x86_64",
    ] {
        if which(tool).is_none() {
            bail!("{tool} is not installed: run `make deps`");
        }
    }
    // Test processes of several crates may get here at once: one starts the daemons.
    let _lock = StartLock::acquire()?;
    fix_kvm_permissions();
    if virsh(&["version"]).is_err() {
        start_daemon("virtlogd");
        start_daemon("libvirtd");
        wait_for_libvirt(Duration::from_secs(60))?;
    }
    *done = true;
    Ok(())
}

/// An exclusive `flock` on a file beside the scratch directories, released on drop.
struct StartLock {
    _file: fs::File,
}

impl StartLock {
    fn acquire() -> Result<StartLock> {
        let root = Path::new(crate::scratch::SCRATCH_ROOT);
        fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        let path = root.join(".libvirt-start.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: flock on a file descriptor owned by `file`, which outlives the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("lock {}", path.display()));
        }
        Ok(StartLock { _file: file })
    }
}

/// `chgrp kvm /dev/kvm && chmod 660 /dev/kvm`: without it libvirt re-probes QEMU on every
/// `define` (about 48 s each). Best effort: TCG domains work either way.
fn fix_kvm_permissions() {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return;
    }
    let _ = Command::new("chgrp").arg("kvm").arg(kvm).status();
    let _ = fs::set_permissions(kvm, fs::Permissions::from_mode(0o660));
}

/// Starts `NAME -d` unless a process of that name runs. A failure is only reported: the
/// daemon may have been started by someone else meanwhile; `wait_for_libvirt` decides.
fn start_daemon(name: &str) {
    if !pids_by_comm(name).is_empty() {
        return;
    }
    match Command::new(name).arg("-d").status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("testbed: {name} -d exited with {status}"),
        Err(e) => eprintln!("testbed: cannot start {name} (run `make deps`): {e}"),
    }
}

fn wait_for_libvirt(limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match virsh(&["version"]) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!("libvirtd did not answer within {limit:?}")))
            }
            Err(_) => sleep(Duration::from_millis(200)),
        }
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Process ids whose `/proc/PID/comm` is exactly `comm`.
pub fn pids_by_comm(comm: &str) -> Vec<i32> {
    proc_pids()
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .collect()
}

/// Process ids of QEMU processes running the domain `name` (their command line carries
/// `-name guest=NAME,...`).
pub fn qemu_pids_of(name: &str) -> Vec<i32> {
    let needle = format!("guest={name},");
    proc_pids()
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|arg| arg.starts_with(needle.as_bytes()))
            })
        })
        .collect()
}

fn proc_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Names of all domains (running or not) known to libvirt.
pub fn domain_names() -> Result<Vec<String>> {
    virsh_lines(&["list", "--all", "--name"])
}

/// The non-empty lines of `virsh ARGS...`' output, trimmed (the `--name` lists).
pub fn virsh_lines<S: AsRef<str>>(args: &[S]) -> Result<Vec<String>> {
    let out = virsh(args)?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}
