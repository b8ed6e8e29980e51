//! NBD peers for interop tests: qemu-nbd, qemu-storage-daemon, nbdkit, killed on drop.
//!
//! Each peer serves on a unix socket; [`Peer`] waits until the socket accepts connections and
//! kills (SIGKILL) and reaps the process when dropped, on success and on panic alike. A
//! missing tool is an error naming `make deps`, never a skip.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running NBD server process.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    socket: PathBuf,
    program: String,
}

impl Peer {
    /// The unix socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `proxy::nbd::Address` of the socket.
    pub fn address(&self) -> proxy::nbd::Address {
        proxy::nbd::Address::Unix(self.socket.clone())
    }

    /// An NBD URI for export `export` (for nbdinfo, nbdcopy).
    pub fn uri(&self, export: &str) -> String {
        nbd_unix_uri(&self.socket, export)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The `nbd+unix` URI of `export` on `socket`.
pub fn nbd_unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Fails with a message naming `make deps` when `program` is not on the PATH.
pub fn require(program: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{program} not found: install the test dependencies with `make deps`");
    }
    Ok(())
}

/// Start `program args...` and wait until `socket` accepts connections (10 s at most).
pub fn spawn(program: &str, args: &[String], socket: &Path) -> Result<Peer> {
    require(program)?;
    let _ = std::fs::remove_file(socket);
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {program}"))?;
    let mut peer = Peer {
        child,
        socket: socket.to_path_buf(),
        program: program.to_string(),
    };
    peer.wait_ready(Duration::from_secs(10))?;
    Ok(peer)
}

impl Peer {
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if probe(&self.socket) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited before serving: {status}", self.program);
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not listen on {} within {timeout:?}",
                    self.program,
                    self.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether an NBD server answers on `socket`: read the greeting and end the session politely
/// with `NBD_OPT_ABORT` (a bare connect-and-close makes servers log a broken pipe).
fn probe(socket: &Path) -> bool {
    use proxy::nbd::proto;
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut greeting = [0u8; proto::GREETING_LEN];
    if s.read_exact(&mut greeting).is_err() {
        return false;
    }
    let mut msg = proto::client_flags::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    let abort = proto::OptionHeader {
        option: proto::opt::ABORT,
        length: 0,
    };
    msg.extend_from_slice(&abort.encode());
    if s.write_all(&msg).is_ok() {
        let mut reply = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        let _ = s.read_exact(&mut reply);
    }
    true
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `qemu-nbd` serving `image` (format `format`) read-only as `export`, persistent, with up to
/// 8 clients, optionally with dirty bitmap `bitmap` (`-B`). `extra` goes before the image.
pub fn qemu_nbd(
    image: &Path,
    format: &str,
    export: &str,
    bitmap: Option<&str>,
    extra: &[&str],
    socket: &Path,
) -> Result<Peer> {
    let mut args = strings(&["-r", "-t", "-e", "8", "-f", format, "-x", export, "-k"]);
    args.push(socket.display().to_string());
    if let Some(b) = bitmap {
        args.push("-B".into());
        args.push(b.into());
    }
    args.extend(strings(extra));
    args.push(image.display().to_string());
    spawn("qemu-nbd", &args, socket)
}

/// `qemu-storage-daemon` exporting the qcow2 `image` read-only as `export` on `socket`, with
/// the persistent dirty bitmaps `bitmaps` and `qemu:allocation-depth`.
pub fn qemu_storage_daemon(
    image: &Path,
    export: &str,
    bitmaps: &[&str],
    socket: &Path,
) -> Result<Peer> {
    let file = image.display().to_string().replace(',', ",,");
    let mut export_opts =
        format!("type=nbd,id=exp0,node-name=disk0,name={export},allocation-depth=on");
    for (i, b) in bitmaps.iter().enumerate() {
        export_opts.push_str(&format!(",bitmaps.{i}={b}"));
    }
    let args = vec![
        "--blockdev".to_string(),
        format!("driver=file,filename={file},node-name=file0,read-only=on"),
        "--blockdev".to_string(),
        "driver=qcow2,file=file0,node-name=disk0,read-only=on".to_string(),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", socket.display()),
        "--export".to_string(),
        export_opts,
    ];
    spawn("qemu-storage-daemon", &args, socket)
}

/// `nbdkit` in the foreground on `socket`, exiting with this process; `args` are the plugin,
/// filters and parameters (e.g. `["--filter=error", "file", "x.img", "error-rate=1"]`).
pub fn nbdkit(args: &[&str], socket: &Path) -> Result<Peer> {
    let mut all = strings(&["-f", "--exit-with-parent", "-U"]);
    all.push(socket.display().to_string());
    all.extend(strings(args));
    spawn("nbdkit", &all, socket)
}

/// Run `program args...`, failing with its stderr when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    require(program)?;
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Our own [`proxy::nbd::Server`] listening on a unix socket, run on a dedicated runtime
/// thread so tests may block (running qemu-img, nbdinfo...) while it serves. Dropping it stops
/// the runtime and every connection.
pub struct ServerThread {
    runtime: Option<tokio::runtime::Runtime>,
    socket: PathBuf,
}

impl std::fmt::Debug for ServerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerThread")
            .field("socket", &self.socket)
            .finish()
    }
}

impl ServerThread {
    /// Serve `server` on `socket`.
    pub fn start(server: std::sync::Arc<proxy::nbd::Server>, socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(socket)
                .with_context(|| format!("bind {}", socket.display()))?
        };
        runtime.spawn(server.serve_unix(listener));
        Ok(ServerThread {
            runtime: Some(runtime),
            socket: socket.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The NBD URI of `export`.
    pub fn uri(&self, export: &str) -> String {
        nbd_unix_uri(&self.socket, export)
    }

    /// The `proxy::nbd::Address` of the socket.
    pub fn address(&self) -> proxy::nbd::Address {
        proxy::nbd::Address::Unix(self.socket.clone())
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// PEM files of a throwaway CA, a server certificate for `localhost` and a client
/// certificate, laid out the way QEMU's `tls-creds-x509` expects (`ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`).
pub fn make_certs(dir: &Path) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "sluice test ca");
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for (role, names) in [
        ("server", vec!["localhost".to_string()]),
        ("client", vec!["client".to_string()]),
    ] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("sluice test {role}"));
        params.extended_key_usages = vec![if role == "server" {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}
