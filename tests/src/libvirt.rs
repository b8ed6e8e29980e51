//! The libvirt daemons and the `virsh` CLI, as the test bed uses them.
//!
//! Owns: making sure `virtlogd` and `libvirtd` run (started when absent, reused when present),
//! the `/dev/kvm` permission fix that keeps `virsh define` fast, libvirtd's TLS set-up (the
//! test bed's server certificate installed under `/etc/pki`, `listen_tls` on `127.0.0.1` in
//! `libvirtd.conf`, the backup NBD TLS keys in `qemu.conf`, QEMU's client certificate for
//! NBD disks over TLS in `/etc/pki/libvirt-nbd`, `libvirtd -l`), running `virsh`,
//! and finding QEMU processes by domain name. It does not own domains (see [`crate::vm`]) nor
//! the PKI and the client side of TLS (see [`crate::remote`]).
//!
//! libvirtd reads its certificates and both configuration files only when it starts, so all
//! of it is in place before the first start. libvirtd is restarted only when it runs without
//! listening on `127.0.0.1:16514` or the set-up had to change a file (a machine set up before
//! this code, or whose PKI was removed): under the start lock, once per machine, never by a
//! second test process. The tests of reconnects restart it ([`restart_libvirtd_now`]) or
//! stop it for a while ([`stop_libvirtd`]) on purpose, from one test binary that runs alone.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
    virsh_at(URI, args)
}

/// Runs `virsh -c URI ARGS...` and returns its stdout; a failure carries stderr.
pub fn virsh_at<S: AsRef<str>>(uri: &str, args: &[S]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
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

/// Makes sure libvirt answers on `qemu:///system` and on `qemu+tls://127.0.0.1/system`: fixes
/// `/dev/kvm`'s group and mode (what udev would do), puts the TLS set-up in place (see the
/// module header), starts `virtlogd` and `libvirtd -l` when they are not running (restarts a
/// libvirtd that does not listen on TLS), and waits until both answer. Cheap after the first
/// call in a process.
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
        "openssl",
    ] {
        if which(tool).is_none() {
            bail!("{tool} is not installed: run `make deps`");
        }
    }
    // Test processes of several crates may get here at once: one starts the daemons.
    let _lock = StartLock::acquire()?;
    fix_kvm_permissions();
    let changed = configure_tls()?;
    if virsh(&["version"]).is_err() {
        start_daemon("virtlogd", &[]);
        start_daemon("libvirtd", &["-l"]);
        wait_for_libvirt(Duration::from_secs(60))?;
        if wait_for_tls(Duration::from_secs(10)).is_err() {
            // Someone else started it meanwhile, without -l.
            restart_libvirtd()?;
        }
    } else if changed || !listening_tls() {
        restart_libvirtd()?;
    }
    *done = true;
    Ok(())
}

/// Restarts libvirtd as a hypervisor restart would, for tests of reconnects: stops it (running
/// domains stay up; it reconnects to them), starts `libvirtd -d -l` and waits until it
/// answers on `qemu:///system` and on `qemu+tls://127.0.0.1/system` again. Every client's
/// connection is cut: only a test binary that runs its tests one at a time, and no other test
/// process, may call it (`tests/tests/hypervisor_reconnect.rs`).
pub fn restart_libvirtd_now() -> Result<()> {
    ensure_libvirt()?;
    let _lock = StartLock::acquire()?;
    restart_libvirtd()?;
    let tls = crate::remote::TlsHost::ensure()?;
    let start = Instant::now();
    while let Err(e) = tls.virsh(&["version"]) {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(e.context("libvirtd does not answer over TLS after its restart"));
        }
        sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// libvirtd stopped with SIGSTOP until dropped (SIGCONT, also when a test fails): it keeps its
/// sockets open and answers nothing, like a hung hypervisor or one cut off by the network. The
/// same rule as [`restart_libvirtd_now`]: only for `tests/tests/hypervisor_reconnect.rs`.
pub struct StoppedLibvirtd {
    pids: Vec<i32>,
}

/// Stops every libvirtd process (see [`StoppedLibvirtd`]).
pub fn stop_libvirtd() -> Result<StoppedLibvirtd> {
    ensure_libvirt()?;
    let pids = pids_by_comm("libvirtd");
    if pids.is_empty() {
        bail!("no libvirtd runs");
    }
    for &pid in &pids {
        // SAFETY: kill(2) with a pid read from /proc and a valid signal number has no
        // memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    Ok(StoppedLibvirtd { pids })
}

impl Drop for StoppedLibvirtd {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: as in `stop_libvirtd`.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// Stops libvirtd (running domains stay up; it reconnects to them) and starts `libvirtd -d -l`.
fn restart_libvirtd() -> Result<()> {
    eprintln!("testbed: restarting libvirtd as `libvirtd -d -l` (TLS on {TLS_ADDR})");
    let signal_all = |sig| {
        for pid in pids_by_comm("libvirtd") {
            // SAFETY: kill(2) with a pid read from /proc and a valid signal number has no
            // memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
    };
    signal_all(libc::SIGTERM);
    let start = Instant::now();
    while !pids_by_comm("libvirtd").is_empty() {
        if start.elapsed() > Duration::from_secs(30) {
            signal_all(libc::SIGKILL);
        }
        if start.elapsed() > Duration::from_secs(40) {
            bail!("libvirtd did not exit within 40 s of SIGTERM");
        }
        sleep(Duration::from_millis(100));
    }
    start_daemon("virtlogd", &[]);
    start_daemon("libvirtd", &["-l"]);
    wait_for_libvirt(Duration::from_secs(60))?;
    wait_for_tls(Duration::from_secs(10))
}

fn wait_for_tls(limit: Duration) -> Result<()> {
    let start = Instant::now();
    while !listening_tls() {
        if start.elapsed() > limit {
            bail!(
                "libvirtd answers on {URI} but does not listen on {TLS_ADDR} (started without -l?)"
            );
        }
        sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// libvirtd's TLS listener.
const TLS_ADDR: &str = "127.0.0.1:16514";

/// Whether something listens on 127.0.0.1:16514 (or on all addresses at 16514), read from
/// `/proc/net/tcp` so that no probe connection shows up in libvirtd's log.
fn listening_tls() -> bool {
    let port = format!(":{:04X}", crate::remote::LIBVIRT_TLS_PORT);
    let ours = |local: &str| {
        local.ends_with(&port) && (local.starts_with("0100007F:") || local.starts_with("00000000:"))
    };
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && ours(f[1]) && f[3] == "0A"
        })
    })
}

/// Where the server half of the test bed's PKI goes, and the configuration that turns TLS
/// on. Returns whether any file changed (libvirtd then needs a restart to see it).
fn configure_tls() -> Result<bool> {
    let pki = crate::remote::server_pki()?;
    let qemu_gid = nix::unistd::Group::from_name("libvirt-qemu")?
        .context("group libvirt-qemu is missing: run `make deps` (libvirt-daemon-system)")?
        .gid
        .as_raw();
    make_dir(Path::new("/etc/pki/CA"), 0o755, None)?;
    make_dir(Path::new("/etc/pki/libvirt/private"), 0o700, None)?;
    make_dir(Path::new(BACKUP_CERT_DIR), 0o750, Some(qemu_gid))?;
    make_dir(Path::new(NBD_CLIENT_CERT_DIR), 0o750, Some(qemu_gid))?;
    let mut changed = false;
    for (from, to, mode, gid) in installed_files(&pki, qemu_gid) {
        changed |= install(from, Path::new(to), mode, gid)?;
    }
    for block in CONF_BLOCKS {
        changed |= edit_conf(Path::new(block.path), block.title, block.settings)?;
    }
    Ok(changed)
}

/// (source, destination, mode, group) of every PKI file libvirtd and QEMU read: libvirtd's
/// server half, QEMU's backup NBD server half, and QEMU's NBD client half (for disks on an
/// NBD export over TLS: instant recovery from Sluice's NBD server).
fn installed_files(
    pki: &crate::remote::ServerPki,
    qemu_gid: u32,
) -> [(&Path, &'static str, u32, Option<u32>); 9] {
    let q = Some(qemu_gid);
    [
        (&pki.ca_cert, "/etc/pki/CA/cacert.pem", 0o644, None),
        (
            &pki.server_cert,
            "/etc/pki/libvirt/servercert.pem",
            0o644,
            None,
        ),
        (
            &pki.server_key,
            "/etc/pki/libvirt/private/serverkey.pem",
            0o600,
            None,
        ),
        (
            &pki.ca_cert,
            "/etc/pki/libvirt-backup/ca-cert.pem",
            0o640,
            q,
        ),
        (
            &pki.server_cert,
            "/etc/pki/libvirt-backup/server-cert.pem",
            0o640,
            q,
        ),
        (
            &pki.server_key,
            "/etc/pki/libvirt-backup/server-key.pem",
            0o640,
            q,
        ),
        (&pki.ca_cert, "/etc/pki/libvirt-nbd/ca-cert.pem", 0o640, q),
        (
            &pki.client_cert,
            "/etc/pki/libvirt-nbd/client-cert.pem",
            0o640,
            q,
        ),
        (
            &pki.client_key,
            "/etc/pki/libvirt-nbd/client-key.pem",
            0o640,
            q,
        ),
    ]
}

/// The test bed's block in one libvirt configuration file.
struct ConfBlock {
    path: &'static str,
    title: &'static str,
    settings: &'static [(&'static str, &'static str)],
}

const CONF_BLOCKS: [ConfBlock; 2] = [
    ConfBlock {
        path: "/etc/libvirt/libvirtd.conf",
        title: "libvirtd -l listens with TLS on 127.0.0.1 only",
        settings: &[
            ("listen_tls", "1"),
            ("listen_tcp", "0"),
            ("listen_addr", "\"127.0.0.1\""),
        ],
    },
    ConfBlock {
        path: "/etc/libvirt/qemu.conf",
        title: "pull-mode backup exports over NBD with TLS",
        // No key for NBD disks over TLS (instant recovery): libvirt takes
        // `/etc/pki/libvirt-nbd` as `nbd_tls_x509_cert_dir` when that directory exists at
        // its start, and `nbd_tls` stays off (only disks with `tls='yes'` use TLS). Leaving
        // this block as it was keeps test beds of older checkouts from rewriting it (and
        // restarting libvirtd) back and forth.
        settings: &[
            ("backup_tls_x509_cert_dir", "\"/etc/pki/libvirt-backup\""),
            ("backup_tls_x509_verify", "1"),
        ],
    },
];

/// QEMU's server certificate for backup exports (`backup_tls_x509_cert_dir`).
const BACKUP_CERT_DIR: &str = "/etc/pki/libvirt-backup";

/// QEMU's client certificate for NBD disks over TLS: `ca-cert.pem` (the test bed's CA, which
/// signed the NBD server's certificate), `client-cert.pem`, `client-key.pem`. libvirt's
/// default `nbd_tls_x509_cert_dir` when it exists as libvirtd starts (a libvirtd already
/// running when the files are first installed is restarted once, like any change here).
const NBD_CLIENT_CERT_DIR: &str = "/etc/pki/libvirt-nbd";

/// `mkdir -p`, then mode and (when given) group.
fn make_dir(path: &Path, mode: u32, gid: Option<u32>) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(g) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(g)))
            .with_context(|| format!("chgrp {}", path.display()))?;
    }
    Ok(())
}

/// Copies `from` to `to` (owner root, `mode`, group `gid` or root) unless it is there already
/// with those bytes, mode and group. Returns whether it wrote.
fn install(from: &Path, to: &Path, mode: u32, gid: Option<u32>) -> Result<bool> {
    let want = fs::read(from).with_context(|| format!("read {}", from.display()))?;
    let gid = gid.unwrap_or(0);
    if is_installed(&want, to, mode, gid) {
        return Ok(false);
    }
    let tmp = to.with_extension("sluice-tmp");
    fs::write(&tmp, &want).with_context(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    nix::unistd::chown(
        &tmp,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )?;
    fs::rename(&tmp, to).with_context(|| format!("install {}", to.display()))?;
    Ok(true)
}

fn is_installed(want: &[u8], to: &Path, mode: u32, gid: u32) -> bool {
    fs::metadata(to).is_ok_and(|m| m.mode() & 0o7777 == mode && m.gid() == gid)
        && fs::read(to).is_ok_and(|have| have == want)
}

/// Rewrites the test bed's block in the libvirt configuration file `path` (see
/// [`with_block`]). Returns whether the file changed.
fn edit_conf(path: &Path, title: &str, settings: &[(&str, &str)]) -> Result<bool> {
    let old = fs::read_to_string(path)
        .with_context(|| format!("read {} (run `make deps`)", path.display()))?;
    let new = with_block(&old, title, settings);
    if new == old {
        return Ok(false);
    }
    let tmp = path.with_extension("sluice-tmp");
    fs::write(&tmp, &new).with_context(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path).with_context(|| format!("rewrite {}", path.display()))?;
    eprintln!("testbed: set {} in {}", keys(settings), path.display());
    Ok(true)
}

fn keys(settings: &[(&str, &str)]) -> String {
    settings
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ")
}

const BLOCK_BEGIN: &str = "# BEGIN sluice test bed";
const BLOCK_END: &str = "# END sluice test bed";

/// `text` with the test bed's block (between `# BEGIN sluice test bed` and `# END sluice test
/// bed` lines) set to `settings`, appended at the end. Every other line stays, except an
/// active setting of one of the same keys, which is commented out (marked) so the block's
/// value wins. Applying it twice gives the same text.
fn with_block(text: &str, title: &str, settings: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.starts_with(BLOCK_BEGIN) {
            in_block = true;
        } else if in_block {
            in_block = !line.starts_with(BLOCK_END);
        } else if sets_one_of(line, settings) {
            let _ = writeln!(out, "#{line}    # sluice test bed: set in its block below");
        } else {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(out, "{BLOCK_BEGIN} (tests/src/libvirt.rs): {title}");
    for (k, v) in settings {
        let _ = writeln!(out, "{k} = {v}");
    }
    let _ = writeln!(out, "{BLOCK_END}");
    out
}

/// Whether `line` is an active (not commented) `KEY = ...` for one of `settings`' keys.
fn sets_one_of(line: &str, settings: &[(&str, &str)]) -> bool {
    let Some((key, _)) = line.split_once('=') else {
        return false;
    };
    let key = key.trim();
    !key.starts_with('#') && settings.iter().any(|(k, _)| *k == key)
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

/// Starts `NAME -d EXTRA...` unless a process of that name runs. A failure is only reported:
/// the daemon may have been started by someone else meanwhile; `wait_for_libvirt` decides.
fn start_daemon(name: &str, extra: &[&str]) {
    if !pids_by_comm(name).is_empty() {
        return;
    }
    match Command::new(name).arg("-d").args(extra).status() {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SET: &[(&str, &str)] = &[("listen_tls", "1"), ("listen_addr", "\"127.0.0.1\"")];

    #[test]
    fn the_block_is_appended_once_and_other_lines_stay() {
        let conf = "# comment\n#listen_tls = 0\nunix_sock_group = \"libvirt\"\n";
        let once = with_block(conf, "tls", SET);
        assert_eq!(
            once,
            "# comment\n#listen_tls = 0\nunix_sock_group = \"libvirt\"\n\
             # BEGIN sluice test bed (tests/src/libvirt.rs): tls\n\
             listen_tls = 1\nlisten_addr = \"127.0.0.1\"\n# END sluice test bed\n"
        );
        assert_eq!(with_block(&once, "tls", SET), once);
    }

    #[test]
    fn an_active_setting_of_the_same_key_is_commented_out() {
        let once = with_block("listen_tls=0\nmax_clients = 5\n", "tls", SET);
        assert!(once.starts_with(
            "#listen_tls=0    # sluice test bed: set in its block below\nmax_clients = 5\n"
        ));
        assert_eq!(with_block(&once, "tls", SET), once);
    }

    #[test]
    fn a_changed_block_replaces_the_old_one() {
        let old = with_block("a = 1\n", "tls", &[("listen_tls", "0")]);
        let new = with_block(&old, "tls", SET);
        assert_eq!(new, with_block("a = 1\n", "tls", SET));
    }
}
