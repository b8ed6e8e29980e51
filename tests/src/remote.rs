//! A second host that shares only the network with the proxy under test: libvirt over TLS on
//! loopback, and the proxy run as its own unprivileged user in a private mount namespace where
//! the hypervisor's files are out of sight.
//!
//! Owns: the throwaway PKI under [`TLS_DIR`] (a CA, a server certificate for `127.0.0.1` and
//! `localhost`, a client certificate), made once per machine with the `openssl` CLI and reused
//! by every later process, because libvirtd loads it only when it starts; the client's copies
//! of it in libvirt's `pkipath` layout and in the libnbd/QEMU layout ([`TlsHost`]); the
//! unprivileged user, its data directories and the isolated command ([`Isolated`]).
//!
//! It does not own libvirtd's configuration files or its start: [`crate::ensure_libvirt`]
//! installs the server half (`/etc/pki/...`, `libvirtd.conf`, `qemu.conf`) before libvirtd is
//! first started, and [`TlsHost::ensure`] goes through it.
//!
//! | what | where |
//! |---|---|
//! | CA certificate and key (root only) | `TLS_DIR/ca/cacert.pem`, `TLS_DIR/ca/cakey.pem` |
//! | server certificate and key (root only), CA copy | `TLS_DIR/server/{server-cert,server-key,ca-cert}.pem` |
//! | libvirt client (`?pkipath=`) | `TLS_DIR/libvirt-client/{cacert,clientcert,clientkey}.pem` |
//! | NBD client (libnbd `tls-certificates=`) | `TLS_DIR/nbd-client/{ca-cert,client-cert,client-key}.pem` |
//! | Sluice's NBD server (an isolated daemon's `nbd_cert`, `nbd_key`) | `TESTBED_DIR/nbd-server/{server-cert,server-key}.pem` |
//! | the isolated user's home and data directories | `TESTBED_DIR/home/USER`, `TESTBED_DIR/isolated/` |
//!
//! The client directories belong to [`ISOLATED_USER`] (mode 0750, keys 0600, certificates
//! 0640): the user and root can read them, nobody else.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::libvirt::{ensure_libvirt, virsh_at};

/// The test bed's stable directory for what outlives a test process (the PKI, the isolated
/// user's files). Outside [`crate::SCRATCH_ROOT`], so hiding the scratch directories from an
/// isolated process leaves these visible.
pub const TESTBED_DIR: &str = "/var/tmp/sluice-testbed";

/// Where the PKI lives; present only when complete (it is made in a temporary directory and
/// renamed).
pub const TLS_DIR: &str = "/var/tmp/sluice-testbed/tls";

/// The unprivileged user the proxy under test runs as.
pub const ISOLATED_USER: &str = "sluice-test";

/// The hypervisor's address: libvirtd and QEMU's backup NBD servers listen on loopback only.
pub const HOST: &str = "127.0.0.1";

/// libvirtd's TLS port.
pub const LIBVIRT_TLS_PORT: u16 = 16514;

/// Directories an isolated process never sees: libvirt's state and its sockets.
const ALWAYS_HIDDEN: [&str; 2] = ["/var/lib/libvirt", "/run/libvirt"];

/// The libvirt host as the proxy reaches it over the network: `qemu+tls://127.0.0.1/system`
/// with the client certificate, and the client half of QEMU's backup NBD TLS.
#[derive(Debug, Clone)]
pub struct TlsHost {
    libvirt_pki: PathBuf,
    nbd_tls: PathBuf,
}

impl TlsHost {
    /// Makes sure libvirtd runs and listens on `127.0.0.1:16514` with the test bed's PKI
    /// (see [`crate::ensure_libvirt`]) and returns the client side.
    pub fn ensure() -> Result<TlsHost> {
        ensure_libvirt()?;
        let tls = Path::new(TLS_DIR);
        let host = TlsHost {
            libvirt_pki: tls.join("libvirt-client"),
            nbd_tls: tls.join("nbd-client"),
        };
        for f in [host.ca_cert(), host.client_cert(), host.client_key()] {
            if !f.is_file() {
                bail!("{} is missing: remove {TLS_DIR} to make the PKI again (libvirtd is restarted then)", f.display());
            }
        }
        Ok(host)
    }

    /// `127.0.0.1`: what the backup XML's `<server name=…>` names and the proxy dials.
    pub fn host(&self) -> &'static str {
        HOST
    }

    /// `qemu+tls://127.0.0.1/system?pkipath=DIR`.
    pub fn uri(&self) -> String {
        format!(
            "qemu+tls://{HOST}/system?pkipath={}",
            self.libvirt_pki.display()
        )
    }

    /// The libvirt client directory (`cacert.pem`, `clientcert.pem`, `clientkey.pem`).
    pub fn pki_dir(&self) -> &Path {
        &self.libvirt_pki
    }

    /// The NBD client directory in libnbd's and QEMU's layout (`ca-cert.pem`,
    /// `client-cert.pem`, `client-key.pem`), for QEMU's backup NBD servers.
    pub fn nbd_tls_dir(&self) -> &Path {
        &self.nbd_tls
    }

    /// The CA that signed libvirtd's and QEMU's server certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.nbd_tls.join("ca-cert.pem")
    }

    /// The client certificate (extendedKeyUsage clientAuth), for libvirt and NBD alike.
    pub fn client_cert(&self) -> PathBuf {
        self.nbd_tls.join("client-cert.pem")
    }

    /// The client certificate's key.
    pub fn client_key(&self) -> PathBuf {
        self.nbd_tls.join("client-key.pem")
    }

    /// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR`: a backup export as libnbd tools
    /// (`nbdinfo`, `nbdcopy`) reach it with the client certificate.
    pub fn nbd_uri(&self, port: u16, export: &str) -> String {
        format!(
            "nbds://{HOST}:{port}/{export}?tls-certificates={}",
            self.nbd_tls.display()
        )
    }

    /// Runs `virsh -c URI ARGS...` (as root, over TLS) and returns its stdout.
    pub fn virsh<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        virsh_at(&self.uri(), args)
    }

    /// The certificate and key of Sluice's own NBD server for an isolated daemon
    /// (`nbd_cert`, `nbd_key`): the test bed's server certificate (for `127.0.0.1` and
    /// `localhost`, signed by the test bed's CA, which QEMU's NBD client directory
    /// `/etc/pki/libvirt-nbd` trusts), copied once into [`NBD_SERVER_DIR`] for
    /// [`ISOLATED_USER`] (key 0600). Its client CA (`nbd_client_ca`) is [`TlsHost::ca_cert`]:
    /// QEMU presents the test bed's client certificate.
    pub fn sluice_nbd_identity(&self) -> Result<(PathBuf, PathBuf)> {
        let dir = Path::new(NBD_SERVER_DIR);
        let (cert, key) = (dir.join("server-cert.pem"), dir.join("server-key.pem"));
        if cert.is_file() && key.is_file() {
            return Ok((cert, key));
        }
        let iso = Isolated::ensure()?;
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        make_dir(&tmp, 0o750, Some(&iso))?;
        let server = Path::new(TLS_DIR).join("server");
        copy_file(
            &server.join("server-cert.pem"),
            &tmp.join("server-cert.pem"),
            0o640,
            Some(&iso),
        )?;
        copy_file(
            &server.join("server-key.pem"),
            &tmp.join("server-key.pem"),
            0o600,
            Some(&iso),
        )?;
        // Another test process may have made it meanwhile: then its copy serves.
        if fs::rename(&tmp, dir).is_err() {
            fs::remove_dir_all(&tmp)?;
        }
        Ok((cert, key))
    }
}

/// Where [`TlsHost::sluice_nbd_identity`] keeps the isolated daemon's NBD server identity.
pub const NBD_SERVER_DIR: &str = "/var/tmp/sluice-testbed/nbd-server";

/// A loopback TCP port nobody listens on now (bound and released), for a backup export.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((HOST, 0)).context("bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// An unprivileged system user that runs commands in a private mount namespace where
/// libvirt's directories and the given image directories are empty tmpfs mounts.
#[derive(Debug, Clone)]
pub struct Isolated {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

impl Isolated {
    /// [`ISOLATED_USER`], created when missing.
    pub fn ensure() -> Result<Isolated> {
        Isolated::ensure_user(ISOLATED_USER)
    }

    /// The system user `name` (with its own group), created when missing
    /// (`useradd --system --no-create-home --user-group`), and its home directory under
    /// [`TESTBED_DIR`].
    pub fn ensure_user(name: &str) -> Result<Isolated> {
        let iso = match lookup_user(name)? {
            Some(iso) => iso,
            None => {
                add_user(name)?;
                lookup_user(name)?.with_context(|| format!("user {name} missing after useradd"))?
            }
        };
        make_dir(&iso.home(), 0o700, Some(&iso))?;
        Ok(iso)
    }

    /// `TESTBED_DIR/home/USER`: `$HOME` of isolated commands, owned by the user.
    pub fn home(&self) -> PathBuf {
        Path::new(TESTBED_DIR).join("home").join(&self.user)
    }

    /// A fresh data directory `TESTBED_DIR/isolated/PREFIX-XXXXXX` owned by the user, mode
    /// 0700 (so QEMU, running as `libvirt-qemu`, cannot use a path in it), removed on drop.
    pub fn data_dir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let parent = Path::new(TESTBED_DIR).join("isolated");
        make_dir(&parent, 0o755, None)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir_in(&parent)
            .with_context(|| format!("create a data directory in {}", parent.display()))?;
        self.chown(dir.path())?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    /// `PROGRAM ARGS...` as this user (its own group only, `$HOME` its home) in a private mount
    /// namespace where `/var/lib/libvirt`, `/run/libvirt` and every directory in `hide` are
    /// empty tmpfs mounts. Nothing of that reaches the host's mounts. Spawn it like any
    /// command; its pid is the program's (every step `exec`s the next), so killing the child
    /// kills the program.
    pub fn command<P, S>(&self, program: P, args: &[S], hide: &[&Path]) -> Command
    where
        P: AsRef<OsStr>,
        S: AsRef<OsStr>,
    {
        // Paths and arguments travel as positional parameters: nothing is quoted.
        let script = format!(
            "set -e\n\
             n=$1; shift\n\
             mount --make-rprivate /\n\
             while [ \"$n\" -gt 0 ]; do\n\
               mount -t tmpfs -o mode=0755,size=1m sluice-hidden \"$1\"; shift; n=$((n - 1))\n\
             done\n\
             exec setpriv --reuid={} --regid={} --clear-groups -- \"$@\"",
            self.uid, self.gid
        );
        let hidden: Vec<&OsStr> = ALWAYS_HIDDEN
            .iter()
            .map(OsStr::new)
            .chain(hide.iter().map(|p| p.as_os_str()))
            .collect();
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c", &script, "sluice-isolated"])
            .arg(hidden.len().to_string())
            .args(hidden)
            .arg(program)
            .args(args)
            .current_dir(self.home())
            .env("HOME", self.home())
            .env("USER", &self.user)
            .env("LOGNAME", &self.user);
        c
    }

    /// Runs [`Isolated::command`] to its end and returns its output (success or not).
    pub fn output<P, S>(&self, program: P, args: &[S], hide: &[&Path]) -> Result<Output>
    where
        P: AsRef<OsStr>,
        S: AsRef<OsStr>,
    {
        let name = program.as_ref().to_string_lossy().into_owned();
        self.command(program, args, hide)
            .output()
            .with_context(|| format!("run {name} isolated (unshare and setpriv: util-linux)"))
    }

    fn chown(&self, path: &Path) -> Result<()> {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .with_context(|| format!("chown {} to {}", path.display(), self.user))
    }
}

fn lookup_user(name: &str) -> Result<Option<Isolated>> {
    let user =
        nix::unistd::User::from_name(name).with_context(|| format!("look up user {name}"))?;
    Ok(user.map(|u| Isolated {
        user: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }))
}

fn add_user(name: &str) -> Result<()> {
    let out = Command::new("useradd")
        .args(["--system", "--no-create-home", "--user-group"])
        .args([
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .output()
        .context("run useradd (package passwd)")?;
    // Another test process may have added it meanwhile: the lookup after this decides.
    if !out.status.success() && lookup_user(name)?.is_none() {
        bail!(
            "useradd {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `mkdir -p PATH`, then its mode, and its owner when `owner` is given.
fn make_dir(path: &Path, mode: u32, owner: Option<&Isolated>) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    if let Some(o) = owner {
        o.chown(path)?;
    }
    Ok(())
}

/// The server half of the PKI, for [`crate::libvirt`] to install where libvirt and QEMU look.
pub(crate) struct ServerPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// QEMU's client certificate and key for NBD disks over TLS (root only).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// The PKI under [`TLS_DIR`], made when absent. The caller holds the libvirt start lock, so
/// one process makes it and the others reuse it.
pub(crate) fn server_pki() -> Result<ServerPki> {
    let tls = Path::new(TLS_DIR);
    if !tls.is_dir() {
        make_pki(tls)?;
    }
    let server = tls.join("server");
    Ok(ServerPki {
        ca_cert: server.join("ca-cert.pem"),
        server_cert: server.join("server-cert.pem"),
        server_key: server.join("server-key.pem"),
        client_cert: tls.join("ca").join("client-cert.pem"),
        client_key: tls.join("ca").join("client-key.pem"),
    })
}

const CA_CNF: &str = "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3\n\
[dn]\nCN = sluice test bed CA\n\
[v3]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
subjectKeyIdentifier = hash\n";

const EXT_CNF: &str = "[server]\nbasicConstraints = critical,CA:FALSE\n\
keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
subjectAltName = IP:127.0.0.1,DNS:localhost\n\
[client]\nbasicConstraints = critical,CA:FALSE\n\
keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = clientAuth\n";

/// Makes the CA, server and client certificates in a temporary directory beside `tls`, lays
/// out the client directories for [`ISOLATED_USER`] and renames it all to `tls`.
fn make_pki(tls: &Path) -> Result<()> {
    let iso = Isolated::ensure()?;
    let tmp = tls.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    let ca = tmp.join("ca");
    make_dir(&ca, 0o700, None)?;
    make_certs(&ca)?;
    let server = tmp.join("server");
    make_dir(&server, 0o700, None)?;
    for (from, to) in [
        ("cacert.pem", "ca-cert.pem"),
        ("server-cert.pem", "server-cert.pem"),
        ("server-key.pem", "server-key.pem"),
    ] {
        copy_file(&ca.join(from), &server.join(to), 0o600, None)?;
    }
    let client = |dir: &str, names: [&str; 3]| -> Result<()> {
        let d = tmp.join(dir);
        make_dir(&d, 0o750, Some(&iso))?;
        let [ca_name, cert_name, key_name] = names;
        copy_file(&ca.join("cacert.pem"), &d.join(ca_name), 0o640, Some(&iso))?;
        copy_file(
            &ca.join("client-cert.pem"),
            &d.join(cert_name),
            0o640,
            Some(&iso),
        )?;
        copy_file(
            &ca.join("client-key.pem"),
            &d.join(key_name),
            0o600,
            Some(&iso),
        )
    };
    client(
        "libvirt-client",
        ["cacert.pem", "clientcert.pem", "clientkey.pem"],
    )?;
    client(
        "nbd-client",
        ["ca-cert.pem", "client-cert.pem", "client-key.pem"],
    )?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, tls).with_context(|| format!("rename {} to {}", tmp.display(), tls.display()))
}

/// `openssl` in `dir`: a self-signed CA (`cacert.pem`, `cakey.pem`) and, signed by it, a
/// server certificate for `127.0.0.1`/`localhost` and a client certificate
/// (`{server,client}-{cert,key}.pem`). RSA 2048, ten years.
fn make_certs(dir: &Path) -> Result<()> {
    fs::write(dir.join("ca.cnf"), CA_CNF)?;
    fs::write(dir.join("ext.cnf"), EXT_CNF)?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-config",
            "ca.cnf",
            "-keyout",
            "cakey.pem",
            "-out",
            "cacert.pem",
        ],
    )?;
    for (serial, role) in [("2", "server"), ("3", "client")] {
        let (key, csr, cert) = (
            format!("{role}-key.pem"),
            format!("{role}.csr"),
            format!("{role}-cert.pem"),
        );
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &key,
            ],
        )?;
        let subject = format!("/CN=sluice test bed {role}");
        openssl(
            dir,
            &[
                "req", "-new", "-config", "ca.cnf", "-key", &key, "-subj", &subject, "-out", &csr,
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "cacert.pem",
                "-CAkey",
                "cakey.pem",
                "-set_serial",
                serial,
                "-days",
                "3650",
                "-extfile",
                "ext.cnf",
                "-extensions",
                role,
                "-out",
                &cert,
            ],
        )?;
        fs::remove_file(dir.join(&csr))?;
    }
    for key in ["cakey.pem", "server-key.pem", "client-key.pem"] {
        fs::set_permissions(dir.join(key), fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Runs `openssl ARGS...` in `dir`; a failure carries its stderr.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("cannot run openssl (install it with `make deps`)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Copies `from` to `to` with `mode`, owned by `owner` when given.
fn copy_file(from: &Path, to: &Path, mode: u32, owner: Option<&Isolated>) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    if let Some(o) = owner {
        o.chown(to)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn openssl_out(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_pki_verifies_for_its_purposes_and_belongs_to_the_user() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let tls = dir.path().join("tls");
        make_pki(&tls)?;
        let ca = tls.join("ca/cacert.pem");
        let ca = ca.to_str().unwrap();
        let server = tls.join("server/server-cert.pem");
        let client = tls.join("nbd-client/client-cert.pem");
        for (cert, purpose) in [(&server, "sslserver"), (&client, "sslclient")] {
            let cert = cert.to_str().unwrap();
            let ok = openssl_out(&["verify", "-purpose", purpose, "-CAfile", ca, cert]);
            assert!(ok.trim().ends_with(": OK"), "{ok}");
        }
        let text = openssl_out(&["x509", "-noout", "-text", "-in", server.to_str().unwrap()]);
        assert!(
            text.contains("IP Address:127.0.0.1, DNS:localhost"),
            "{text}"
        );
        let text = openssl_out(&["x509", "-noout", "-text", "-in", ca]);
        assert!(text.contains("X509v3 Basic Constraints: critical\n                CA:TRUE"));

        let iso = Isolated::ensure()?;
        for (d, key) in [
            ("libvirt-client", "clientkey.pem"),
            ("nbd-client", "client-key.pem"),
        ] {
            let m = fs::metadata(tls.join(d))?;
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o777),
                (iso.uid, iso.gid, 0o750)
            );
            let k = fs::metadata(tls.join(d).join(key))?;
            assert_eq!((k.uid(), k.mode() & 0o777), (iso.uid, 0o600));
        }
        assert_eq!(fs::metadata(tls.join("ca"))?.mode() & 0o777, 0o700);
        Ok(())
    }
}
