//! A hypervisor reached over ssh: Debian's `sshd` on loopback in front of the test bed's
//! libvirt, for `qemu+ssh://` with a key file and a known-hosts file.
//!
//! Owns everything under [`SSH_DIR`]: sshd's own configuration, host key, pid file and log;
//! the login key and the `authorized_keys` that admits it; the client's files; and the sshd
//! process itself, started once per machine (on a free high port of `127.0.0.1`) and reused
//! by later test processes, restarted only when it is gone or its configuration changed. It
//! never touches the system's sshd, `/etc/ssh` or `/root/.ssh` (it only makes sshd's
//! privilege-separation directory `/run/sshd` when it is missing, as the package's init
//! script would).
//!
//! The login is `root`, held by `authorized_keys` to `virt-ssh-helper qemu:///system` (no
//! shell, pty or forwarding): the test machines run no polkit, so libvirt's read-write
//! socket refuses every other user ("Unable to get system bus connection"), members of
//! group `libvirt` included.
//!
//! | what | where |
//! |---|---|
//! | sshd's configuration, pid file, log | `SSH_DIR/sshd_config`, `SSH_DIR/sshd.pid`, `SSH_DIR/sshd.log` |
//! | the host key (root only); another key, for a host key that changed | `SSH_DIR/keys/host/`, `SSH_DIR/keys/other-host/` |
//! | the keys sshd admits, per user | `SSH_DIR/keys/authorized_keys/root` |
//! | the client's key and known-hosts files | `SSH_DIR/keys/client/{id_ed25519,known_hosts,known_hosts.changed,known_hosts.unknown}` |
//!
//! The client directory and its files belong to [`crate::remote::ISOLATED_USER`] (mode 0700,
//! files 0600): the isolated proxy and root can read them, nobody else.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::libvirt::{ensure_libvirt, virsh_at};
use crate::remote::{free_port, Isolated, HOST, TESTBED_DIR};

/// Where the test bed's sshd and its keys live.
pub const SSH_DIR: &str = "/var/tmp/sluice-testbed/ssh";

/// Debian's sshd (package `openssh-server`).
const SSHD: &str = "/usr/sbin/sshd";

/// What the login runs, whatever the client asks for (package `libvirt-daemon`).
const HELPER: &str = "/usr/bin/virt-ssh-helper";

/// The user libvirt logs in as.
pub const LOGIN: &str = "root";

/// The test bed's libvirt as the proxy reaches it over ssh.
#[derive(Debug, Clone)]
pub struct SshHost {
    port: u16,
    client: PathBuf,
}

impl SshHost {
    /// Makes sure libvirtd runs (see [`crate::ensure_libvirt`]) and the test bed's sshd
    /// answers on `127.0.0.1`, with the client files in place; returns the client side.
    pub fn ensure() -> Result<SshHost> {
        ensure_libvirt()?;
        for tool in [SSHD, HELPER, "/usr/bin/ssh-keygen"] {
            if !Path::new(tool).is_file() {
                bail!("{tool} is missing: run `make deps` (openssh-server, libvirt-daemon-system)");
            }
        }
        let iso = Isolated::ensure()?;
        // Test processes of one machine may get here at once: one makes keys and starts sshd.
        let _lock = Lock::acquire(&Path::new(TESTBED_DIR).join(".ssh.lock"))?;
        let dir = Path::new(SSH_DIR);
        let keys = dir.join("keys");
        if !keys.is_dir() {
            make_keys(&keys, &iso)?;
        }
        let port = ensure_sshd(dir, &keys)?;
        let host = SshHost {
            port,
            client: keys.join("client"),
        };
        host.write_known_hosts(&keys, &iso)?;
        Ok(host)
    }

    /// sshd's port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `qemu+ssh://root@127.0.0.1:PORT/system`: what an operator writes in `sluice.toml`.
    pub fn uri(&self) -> String {
        format!("qemu+ssh://{LOGIN}@{HOST}:{}/system", self.port)
    }

    /// The login's private key (no passphrase).
    pub fn key(&self) -> PathBuf {
        self.client.join("id_ed25519")
    }

    /// A known-hosts file holding sshd's host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.client.join("known_hosts")
    }

    /// A known-hosts file holding another key for `[127.0.0.1]:PORT`: the host key "changed".
    pub fn changed_known_hosts(&self) -> PathBuf {
        self.client.join("known_hosts.changed")
    }

    /// A known-hosts file with sshd's key under another port only: the host is unknown.
    pub fn unknown_known_hosts(&self) -> PathBuf {
        self.client.join("known_hosts.unknown")
    }

    /// `qemu+libssh://…` with the key and `known_hosts`, as Sluice opens it.
    pub fn libssh_uri(&self, known_hosts: &Path) -> String {
        format!(
            "qemu+libssh://{LOGIN}@{HOST}:{}/system?keyfile={}&known_hosts={}\
             &known_hosts_verify=normal&sshauth=privkey",
            self.port,
            self.key().display(),
            known_hosts.display()
        )
    }

    /// Runs `virsh -c qemu+libssh://… ARGS...` (as root, over ssh, the host key checked) and
    /// returns its stdout.
    pub fn virsh<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        virsh_at(&self.libssh_uri(&self.known_hosts()), args)
    }

    /// The three known-hosts files for this port (rewritten in place when the port changed).
    fn write_known_hosts(&self, keys: &Path, iso: &Isolated) -> Result<()> {
        let key_of = |dir: &str| -> Result<String> {
            let pubkey = fs::read_to_string(keys.join(dir).join("ssh_host_ed25519_key.pub"))?;
            let mut f = pubkey.split_whitespace();
            Ok(format!(
                "{} {}",
                f.next().context("key type")?,
                f.next().context("key")?
            ))
        };
        let (host_key, other_key) = (key_of("host")?, key_of("other-host")?);
        let at = format!("[{HOST}]:{}", self.port);
        let elsewhere = format!("[{HOST}]:{}", self.port.wrapping_add(1).max(1024));
        for (path, line) in [
            (self.known_hosts(), format!("{at} {host_key}\n")),
            (self.changed_known_hosts(), format!("{at} {other_key}\n")),
            (
                self.unknown_known_hosts(),
                format!("{elsewhere} {host_key}\n"),
            ),
        ] {
            write_owned(&path, &line, 0o600, Some(iso))?;
        }
        Ok(())
    }
}

/// sshd's configuration for `port`: loopback only, the key only, the libvirt stream only.
fn sshd_config(dir: &Path, keys: &Path, port: u16) -> String {
    format!(
        "# The sluice test bed's own sshd (tests/src/ssh.rs); not the system's.\n\
         Port {port}\n\
         ListenAddress {HOST}\n\
         HostKey {host_key}\n\
         PidFile {pid}\n\
         AuthorizedKeysFile {keys}/authorized_keys/%u\n\
         # The keys lie under /var/tmp, which is world-writable.\n\
         StrictModes no\n\
         UsePAM no\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin forced-commands-only\n\
         AllowUsers {LOGIN}\n\
         AllowTcpForwarding no\n\
         X11Forwarding no\n\
         PermitTTY no\n\
         LogLevel VERBOSE\n",
        host_key = keys.join("host/ssh_host_ed25519_key").display(),
        pid = dir.join("sshd.pid").display(),
        keys = keys.display(),
    )
}

/// The port of a running sshd of ours whose configuration is current, or starts one (ending
/// any other of ours first) on a free port.
fn ensure_sshd(dir: &Path, keys: &Path) -> Result<u16> {
    let config = dir.join("sshd_config");
    if let (Some(port), Some(_)) = (configured_port(&config), listener(dir)) {
        let current = fs::read_to_string(&config).ok() == Some(sshd_config(dir, keys, port));
        if current && answers(port) {
            return Ok(port);
        }
    }
    for pid in our_sshds(&config) {
        stop(pid)?;
    }
    let port = free_port()?;
    write_owned(&config, &sshd_config(dir, keys, port), 0o644, None)?;
    let _ = fs::remove_file(dir.join("sshd.pid"));
    fs::create_dir_all("/run/sshd").context("create sshd's /run/sshd")?;
    let log = dir.join("sshd.log");
    let out = Command::new(SSHD)
        .arg("-f")
        .arg(&config)
        .arg("-E")
        .arg(&log)
        .output()
        .context("run sshd (install it with `make deps`)")?;
    if !out.status.success() {
        bail!(
            "{SSHD} -f {} failed: {} (see {})",
            config.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            log.display()
        );
    }
    // sshd listens before it writes its pid file: wait for both.
    let start = Instant::now();
    while listener(dir).is_none() || !answers(port) {
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "sshd does not answer on {HOST}:{port} (see {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "testbed: sshd listening on {HOST}:{port} ({})",
        config.display()
    );
    Ok(port)
}

/// `Port N` of the configuration file, if there is one.
fn configured_port(config: &Path) -> Option<u16> {
    let text = fs::read_to_string(config).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Port "))
        .and_then(|p| p.trim().parse().ok())
}

/// The pid of our listening sshd: the one its pid file names, if it is one of ours.
fn listener(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("sshd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    our_sshds(&dir.join("sshd_config"))
        .contains(&pid)
        .then_some(pid)
}

/// Live sshd processes started with `-f CONFIG` (the listener and its sessions). sshd
/// rewrites its command line ("sshd: /usr/sbin/sshd -f CONFIG … [listener] …"), so it is
/// searched as one text.
fn our_sshds(config: &Path) -> Vec<i32> {
    let needle = format!("-f {}", config.display());
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // A daemon's parent may not reap it: a zombie is gone too.
            let live = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state != "Z")
            });
            live && text.contains("sshd") && text.contains(&needle)
        })
        .collect()
}

/// Ends our sshd `pid` (SIGTERM) and waits for it to go.
fn stop(pid: i32) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(pid);
    match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        // A session that ended meanwhile.
        Err(nix::errno::Errno::ESRCH) => return Ok(()),
        r => r.with_context(|| format!("stop the test bed's sshd {pid}"))?,
    }
    let start = Instant::now();
    let stat = format!("/proc/{pid}/stat");
    while fs::read_to_string(&stat).is_ok_and(|st| !st.contains(") Z "))
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
fn answers(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Makes the host keys, the client key and its `authorized_keys` line in a temporary
/// directory beside `keys`, and renames it to `keys`.
fn make_keys(keys: &Path, iso: &Isolated) -> Result<()> {
    let tmp = keys.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    for (sub, mode) in [
        ("host", 0o700),
        ("other-host", 0o700),
        ("authorized_keys", 0o755),
    ] {
        make_dir(&tmp.join(sub), mode, None)?;
    }
    make_dir(&tmp.join("client"), 0o700, Some(iso))?;
    for sub in ["host", "other-host"] {
        keygen(
            &tmp.join(sub).join("ssh_host_ed25519_key"),
            "sluice test bed host",
        )?;
    }
    let key = tmp.join("client/id_ed25519");
    keygen(&key, "sluice test bed client")?;
    for f in [key.clone(), key.with_extension("pub")] {
        chown_to(iso, &f)?;
    }
    let public = fs::read_to_string(key.with_extension("pub"))?;
    let line = format!(
        "restrict,command=\"{HELPER} qemu:///system\" {}\n",
        public.trim()
    );
    write_owned(&tmp.join("authorized_keys").join(LOGIN), &line, 0o644, None)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::create_dir_all(SSH_DIR)?;
    fs::set_permissions(SSH_DIR, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, keys)
        .with_context(|| format!("rename {} to {}", tmp.display(), keys.display()))
}

/// `ssh-keygen -t ed25519` without a passphrase into `path` (and `path.pub`).
fn keygen(path: &Path, comment: &str) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .context("run ssh-keygen (openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen -f {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `mkdir -p PATH`, then its mode, and its owner when `owner` is given.
fn make_dir(path: &Path, mode: u32, owner: Option<&Isolated>) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(o) = owner {
        chown_to(o, path)?;
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary name (readers never see half a file), with
/// `mode`, owned by `owner` when given.
fn write_owned(path: &Path, text: &str, mode: u32, owner: Option<&Isolated>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    if let Some(o) = owner {
        chown_to(o, &tmp)?;
    }
    fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

/// `chown USER:GROUP path` for the isolated user.
fn chown_to(iso: &Isolated, path: &Path) -> Result<()> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(iso.uid)),
        Some(nix::unistd::Gid::from_raw(iso.gid)),
    )
    .with_context(|| format!("chown {} to {}", path.display(), iso.user))
}

/// An exclusive `flock` on a file, released on drop.
struct Lock {
    _file: fs::File,
}

impl Lock {
    fn acquire(path: &Path) -> Result<Lock> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: flock on a file descriptor owned by `file`, which outlives the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("lock {}", path.display()));
        }
        Ok(Lock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_admits_one_key_on_loopback_only() {
        let c = sshd_config(Path::new("/d"), Path::new("/d/keys"), 40022);
        for line in [
            "Port 40022\n",
            "ListenAddress 127.0.0.1\n",
            "AuthorizedKeysFile /d/keys/authorized_keys/%u\n",
            "PasswordAuthentication no\n",
            "PermitRootLogin forced-commands-only\n",
            "PidFile /d/sshd.pid\n",
        ] {
            assert!(c.contains(line), "{line:?} in {c}");
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("sshd_config");
        fs::write(&cfg, &c).unwrap();
        assert_eq!(configured_port(&cfg), Some(40022));
    }
}
