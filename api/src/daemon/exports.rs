//! The daemon's NBD server and the registry of the exports the API opened on it, and the NBD
//! server's TLS material. Opening and closing are `ops::exports`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use catalog::BackupId;
use proxy::nbd::{Identity, Server};
use proxy::restore::ExportOptions;

use crate::daemon::error::{ApiError, ApiResult};
use crate::wire::exports::ExportInfo;

/// The daemon's NBD server and the exports the API opened on it.
pub struct Exports {
    pub(crate) server: Arc<Server>,
    /// `nbd://host:port` (or `nbds://`), the base of every export URI.
    base_uri: String,
    /// With TLS: the directory holding `ca-cert.pem` for clients (libnbd's
    /// `tls-certificates`, QEMU's `tls-creds-x509 dir=`).
    tls_dir: Option<PathBuf>,
    /// Where writable exports keep their overlays (default: none, writable refused).
    overlay_dir: Option<PathBuf>,
    pub(crate) open: Mutex<BTreeMap<u64, ExportInfo>>,
    pub(crate) next: Mutex<u64>,
    /// Held from the free-name check until the export is registered, so that two opens of
    /// one name cannot both pass the check, nor one replace the other's served export
    /// without its diff contexts.
    pub(crate) opening: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("base_uri", &self.base_uri)
            .finish_non_exhaustive()
    }
}

impl Exports {
    /// Exports served by `server`, reachable at `base_uri`.
    pub fn new(server: Arc<Server>, base_uri: String) -> Self {
        Exports {
            server,
            base_uri,
            tls_dir: None,
            overlay_dir: None,
            open: Mutex::new(BTreeMap::new()),
            next: Mutex::new(1),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Export URIs name `dir` as the clients' TLS certificate directory.
    pub fn with_tls_certificates(mut self, dir: PathBuf) -> Self {
        self.tls_dir = Some(dir);
        self
    }

    /// Writable exports keep their copy-on-write overlays in `dir`, a directory of their own.
    /// Exports do not survive a restart, so whatever an earlier run left there (killed with
    /// its exports open) is removed.
    pub fn with_overlay_dir(mut self, dir: PathBuf) -> Self {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            tracing::warn!(file = %e.path().display(), "removing an overlay left by an earlier run");
            let _ = std::fs::remove_file(e.path());
        }
        self.overlay_dir = Some(dir);
        self
    }

    pub(crate) fn uri(&self, name: &str) -> String {
        match &self.tls_dir {
            Some(d) => format!("{}/{name}?tls-certificates={}", self.base_uri, d.display()),
            None => format!("{}/{name}", self.base_uri),
        }
    }

    /// A name is served once: several read-only opens share it, a writable one is alone.
    pub(crate) fn check_free(&self, name: &str, writable: bool) -> ApiResult<()> {
        let open = self.open.lock().expect("exports lock");
        match open.values().find(|i| i.name == name) {
            Some(i) if writable || i.writable => Err(ApiError::conflict(format!(
                "{name} is already exported (export {}{}); close it first",
                i.id,
                if i.writable { ", writable" } else { "" }
            ))),
            _ => Ok(()),
        }
    }

    /// How to open `name`. Read-only opens of one name share the NBD export the server
    /// offers, and opening replaces it: the new one carries the diff context of every open
    /// still sharing the name, plus `changed_since`, so no client loses a context another
    /// open asked for. (A context whose open was closed stays until the name is closed:
    /// offering more contexts is harmless.)
    pub(crate) fn options(
        &self,
        name: &str,
        writable: bool,
        changed_since: Option<&BackupId>,
    ) -> ApiResult<ExportOptions> {
        let mut opts = if writable {
            let dir = self.overlay_dir.as_ref().ok_or_else(|| {
                ApiError::unavailable("writable exports are disabled (no overlay directory)")
            })?;
            ExportOptions::writable(dir)
        } else {
            ExportOptions::default()
        };
        let open = self.open.lock().expect("exports lock");
        let shared = open
            .values()
            .filter(|i| i.name == name)
            .filter_map(|i| i.changed_since.as_deref())
            .filter_map(|s| BackupId::parse(s).ok());
        for id in shared.chain(changed_since.cloned()) {
            if !opts.changed_since.contains(&id) {
                opts.changed_since.push(id);
            }
        }
        Ok(opts)
    }
}

/// The NBD server's TLS material under `<data_dir>`, made on first use: a CA certificate
/// for clients in `nbd-tls/ca-cert.pem` (the directory libnbd's `tls-certificates=` and QEMU's
/// `tls-creds-x509 dir=` take) and the server's certificate and key, signed by that CA, in
/// `nbd-tls-server/` (key 0600), for `localhost`, `127.0.0.1`, `ip` and `advertise` (the name
/// hypervisors dial for an instant recovery; the names are kept in `nbd-tls-server/names`,
/// and a start whose names differ says so). The CA key is not kept: delete both directories
/// to rotate. QEMU insists on a CA certificate with basic constraints, so the API's
/// self-signed certificate cannot serve here.
pub fn nbd_tls_material(
    data: &FsPath,
    ip: IpAddr,
    advertise: Option<&str>,
) -> anyhow::Result<(Identity, PathBuf)> {
    let client_dir = data.join("nbd-tls");
    let server_dir = data.join("nbd-tls-server");
    let identity = Identity {
        cert_file: server_dir.join("server-cert.pem"),
        key_file: server_dir.join("server-key.pem"),
    };
    let names = cert_names(ip, advertise);
    if !identity.cert_file.exists() || !client_dir.join("ca-cert.pem").exists() {
        make_nbd_certs(&client_dir, &server_dir, &names)?;
        std::fs::write(server_dir.join("names"), names.join("\n"))?;
    } else if let Ok(made) = std::fs::read_to_string(server_dir.join("names")) {
        let made: Vec<&str> = made.lines().collect();
        if let Some(missing) = names.iter().find(|n| !made.contains(&n.as_str())) {
            let msg = format!(
                "the NBD server certificate in {} does not name {missing} (it names {}): \
                 delete {} and {} to make new ones (and give hypervisors the new CA), or set nbd_cert and nbd_key",
                server_dir.display(),
                made.join(", "),
                server_dir.display(),
                client_dir.display()
            );
            tracing::warn!("{msg}");
            eprintln!("warning: {msg}");
        }
    }
    Ok((identity, client_dir))
}

/// The names the made NBD server certificate carries.
fn cert_names(ip: IpAddr, advertise: Option<&str>) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !ip.is_loopback() && !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    if let Some(a) = advertise.filter(|a| !names.iter().any(|n| n == a)) {
        names.push(a.to_string());
    }
    names
}

fn make_nbd_certs(
    client_dir: &FsPath,
    server_dir: &FsPath,
    names: &[String],
) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "sluice nbd ca");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice nbd server");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(client_dir)?;
    std::fs::create_dir_all(server_dir)?;
    std::fs::set_permissions(server_dir, std::fs::Permissions::from_mode(0o700))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(server_dir.join("server-key.pem"))?;
    f.write_all(key.serialize_pem().as_bytes())?;
    std::fs::write(server_dir.join("server-cert.pem"), cert.pem())?;
    std::fs::write(client_dir.join("ca-cert.pem"), ca_cert.pem())?;
    Ok(())
}
