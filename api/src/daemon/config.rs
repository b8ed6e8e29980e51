//! The daemon's configuration: one TOML file, every key optional, embedded defaults; and the
//! checks on it (every problem named with its line and column).
//!
//! The cluster's hypervisors are a `[[hypervisors]]` array (each a libvirt URI or a QMP
//! socket of one plain QEMU process); the top-level `libvirt_uri` is shorthand for one more
//! libvirt hypervisor named `default` (listed first), and no hypervisor at all means
//! `qemu:///system`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::daemon::hypervisors::{HvSpec, RemoteSpec, SshLogin};
use crate::wire::policy::{at, check_plain_name, PolicyError};

/// Longest hypervisor name accepted.
pub const MAX_HV_NAME: usize = 64;

/// Name of the hypervisor the top-level `libvirt_uri` (or the default) describes.
pub const DEFAULT_HV: &str = "default";

/// One `[[hypervisors]]` entry: a libvirt connection URI, or the QMP socket of one QEMU
/// process and the name its VM goes by.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    /// Unique name: letters, digits, `-`, `_`, `.` (not first).
    pub name: Spanned<String>,
    /// `qemu:///system`, `qemu+ssh://user@host/system`, `qemu+tls://host/system`.
    pub libvirt_uri: Option<String>,
    /// QMP socket of one plain QEMU process.
    pub socket: Option<PathBuf>,
    /// Name of the QMP socket's VM.
    pub vm: Option<String>,
    /// The host it runs on, for the per-host job limit (default: from the URI;
    /// `localhost` for local URIs and QMP sockets).
    pub host: Option<String>,
    /// Jobs at once on this hypervisor's host (overrides `max_jobs_per_host` there).
    pub max_jobs: Option<usize>,
    /// For a `qemu+ssh://` URI: the private key (no passphrase, mode 0600) the proxy logs in
    /// with, through libvirt's libssh transport (never the `ssh` binary or `~/.ssh`).
    pub ssh_key: Option<PathBuf>,
    /// For a `qemu+ssh://` URI: the known-hosts file holding the hypervisor's host key (mode
    /// 0600); a host key not in it, or changed, is refused.
    pub ssh_known_hosts: Option<PathBuf>,
    /// A remote libvirt hypervisor: backup data over TCP with TLS (see `BackupData`).
    /// Without it the hypervisor is local: exports on a unix socket of the proxy.
    pub backup_data: Option<BackupData>,
}

/// How backup data of a remote hypervisor reaches the proxy: QEMU there serves each export
/// over TCP with TLS (`qemu.conf`: `backup_tls_x509_cert_dir`, `backup_tls_x509_verify = 1`)
/// and the proxy checks the hypervisor's certificate and presents its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupData {
    /// What QEMU binds on the hypervisor (default: the URI's host).
    pub listen: Option<String>,
    /// What the proxy dials (default: the URI's host), e.g. a NAT address.
    pub connect: Option<String>,
    /// The name the hypervisor's certificate carries (default: `connect`).
    pub tls_name: Option<String>,
    /// Ports QEMU may serve exports on, `FIRST-LAST` (default `10900-10999`); open them on
    /// the hypervisor's firewall for the proxy.
    pub ports: Option<String>,
    /// CA certificate (PEM) that signed the hypervisor's backup certificate.
    pub ca: PathBuf,
    /// The proxy's client certificate (PEM), signed by a CA the hypervisor trusts.
    pub cert: PathBuf,
    /// Its private key (PEM), readable by the service only (mode 0600 or 0400).
    pub key: PathBuf,
    /// Whether a shut-off VM is started paused (its CPUs never run) for its backup and
    /// powered off again (default `true`); `false` refuses backups of shut-off VMs.
    pub offline: Option<bool>,
    /// A directory on the hypervisor for the backup jobs' scratch files (absolute; writable
    /// by its QEMU user). Default: libvirt puts each beside its image, which a block device
    /// or network disk does not allow.
    pub scratch_dir: Option<PathBuf>,
    /// NBD connections per disk, 1 to 8 (default 1): QEMU's read-only backup exports allow
    /// several (`NBD_FLAG_CAN_MULTI_CONN`); more help only where the proxy's TLS, not QEMU's
    /// single NBD thread, is the limit (docs/benchmarks.md).
    pub connections: Option<usize>,
}

/// Export ports of a remote hypervisor when none are configured.
pub const DEFAULT_EXPORT_PORTS: std::ops::RangeInclusive<u16> = 10900..=10999;

/// `sluice serve` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Tokens, TLS certificate, catalog, job scratch files.
    pub data_dir: PathBuf,
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Repository directory (default `<data_dir>/repo`).
    pub repository: Option<PathBuf>,
    /// Chunk size of a new repository, bytes.
    pub chunk_size: u32,
    /// Shorthand for one more libvirt hypervisor, named `default`.
    pub libvirt_uri: Option<String>,
    /// The hypervisors of this cluster (none, and no `libvirt_uri`: `qemu:///system`).
    pub hypervisors: Vec<Spanned<HypervisorConfig>>,
    /// Backup jobs running at once.
    pub max_jobs: usize,
    /// Backup jobs running at once against one hypervisor host (default: only `max_jobs`).
    pub max_jobs_per_host: Option<usize>,
    /// Bytes per second that all backup jobs together may read from the hypervisors
    /// (default: unlimited).
    pub read_limit: Option<u64>,
    /// NBD server for exports of backups (plain NBD: loopback addresses only for now).
    pub nbd_listen: Option<SocketAddr>,
    /// Serve plain HTTP (only allowed on a loopback address).
    pub insecure_http: bool,
    /// Directories restores may write image files into (default `<data_dir>/restores`).
    pub restore_dirs: Vec<PathBuf>,
    /// Serve NBD exports over TLS (STARTTLS required) with the daemon's certificate.
    pub nbd_tls: bool,
    /// CA of the client certificates the NBD server demands; required for a non-loopback
    /// `nbd_listen`.
    pub nbd_client_ca: Option<PathBuf>,
    /// The NBD server's certificate (PEM, with its chain), signed by a CA the hypervisors
    /// trust (their `nbd_tls_x509_cert_dir/ca-cert.pem`), for the name in `nbd_advertise`.
    /// Default: one made under the data directory (`nbd-tls-server/`).
    pub nbd_cert: Option<PathBuf>,
    /// Its private key (PEM), readable by the service only (mode 0600 or 0400).
    pub nbd_key: Option<PathBuf>,
    /// The host name or address QEMU on a hypervisor dials to reach the NBD server for an
    /// instant recovery (the server certificate must carry it); the port is `nbd_listen`'s.
    /// Default: `nbd_listen`'s address (none if it is unspecified, `0.0.0.0` or `::`).
    pub nbd_advertise: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/sluice"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            repository: None,
            chunk_size: 64 << 10,
            libvirt_uri: None,
            hypervisors: Vec::new(),
            max_jobs: 2,
            max_jobs_per_host: None,
            read_limit: None,
            nbd_listen: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            insecure_http: false,
            restore_dirs: Vec::new(),
            nbd_tls: true,
            nbd_client_ca: None,
            nbd_cert: None,
            nbd_key: None,
            nbd_advertise: None,
        }
    }
}

impl Config {
    /// Reads `path`, or the defaults if `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|errs| {
            let all: Vec<String> = errs
                .iter()
                .map(|e| format!("{}:{}:{}: {}", path.display(), e.line, e.column, e.message))
                .collect();
            anyhow::anyhow!("config {}", all.join("; "))
        })
    }

    /// Parses and checks a config file's text; on failure, every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<PolicyError>> {
        let c: Config = toml::from_str(text).map_err(|e| {
            let msg = e.message().trim_end().to_string();
            vec![at(text, e.span(), msg)]
        })?;
        let errors = c.check(text);
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }

    fn check(&self, text: &str) -> Vec<PolicyError> {
        let mut errors = Vec::new();
        for (i, h) in self.hypervisors.iter().enumerate() {
            let name = h.get_ref().name.get_ref();
            if let Err(why) = check_plain_name("hypervisor name", name, MAX_HV_NAME) {
                errors.push(at(text, Some(h.get_ref().name.span()), why));
            } else if self.libvirt_uri.is_some() && name == DEFAULT_HV {
                let why = format!("hypervisor name {DEFAULT_HV:?} is the top-level libvirt_uri's");
                errors.push(at(text, Some(h.get_ref().name.span()), why));
            } else if self.hypervisors[..i]
                .iter()
                .any(|o| o.get_ref().name.get_ref() == name)
            {
                let why = format!("hypervisor name {name:?} is used twice");
                errors.push(at(text, Some(h.get_ref().name.span()), why));
            }
            if let Err(why) = check_entry(h.get_ref()) {
                errors.push(at(
                    text,
                    Some(h.span()),
                    format!("hypervisor {name:?}: {why}"),
                ));
            }
        }
        if let Err((key, why)) = self.check_nbd() {
            errors.push(at(text, key_span(text, key), why));
        }
        errors
    }

    /// `nbd_cert` and `nbd_key` come together, with `nbd_tls`, as absolute paths, the key
    /// only the service's; `nbd_advertise` is a host name or address. On failure, the key
    /// at fault and why.
    fn check_nbd(&self) -> Result<(), (&'static str, String)> {
        match (&self.nbd_cert, &self.nbd_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if !self.nbd_tls {
                    return Err((
                        "nbd_cert",
                        "nbd_cert and nbd_key need nbd_tls = true".into(),
                    ));
                }
                absolute("nbd_cert", cert).map_err(|e| ("nbd_cert", e))?;
                absolute("nbd_key", key).map_err(|e| ("nbd_key", e))?;
                owner_only("nbd_key", key).map_err(|e| ("nbd_key", e))?;
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err((
                    "nbd_cert",
                    "give nbd_cert and nbd_key together: the NBD server's certificate and its key"
                        .into(),
                ))
            }
        }
        if let Some(host) = &self.nbd_advertise {
            let bad = |c: char| c.is_control() || c.is_whitespace() || "/?#@'\"<>".contains(c);
            if host.is_empty() || host.chars().any(bad) {
                return Err((
                    "nbd_advertise",
                    format!("nbd_advertise {host:?} is not a host name or address"),
                ));
            }
        }
        Ok(())
    }

    /// What QEMU on a hypervisor dials to reach the NBD server bound at `bound`:
    /// `nbd_advertise`, else the bound address unless it is unspecified.
    pub fn nbd_advertised(&self, bound: SocketAddr) -> Option<String> {
        match &self.nbd_advertise {
            Some(h) => Some(h.clone()),
            None if bound.ip().is_unspecified() => None,
            None => Some(bound.ip().to_string()),
        }
    }

    /// The hypervisors of this cluster, as the registry takes them.
    pub fn hypervisor_specs(&self) -> Vec<HvSpec> {
        let uri = match (&self.libvirt_uri, self.hypervisors.is_empty()) {
            (Some(uri), _) => Some(uri.as_str()),
            (None, true) => Some("qemu:///system"),
            (None, false) => None,
        };
        let default = uri.map(|u| HvSpec::libvirt(DEFAULT_HV, u));
        default
            .into_iter()
            .chain(self.hypervisors.iter().map(|h| spec(h.get_ref())))
            .collect()
    }

    /// The directories restores may write into.
    pub fn restore_dirs(&self) -> Vec<PathBuf> {
        if self.restore_dirs.is_empty() {
            vec![self.data_dir.join("restores")]
        } else {
            self.restore_dirs.clone()
        }
    }

    /// The repository directory.
    pub fn repo_dir(&self) -> PathBuf {
        self.repository
            .clone()
            .unwrap_or_else(|| self.data_dir.join("repo"))
    }
}

/// Where the top-level setting `key` is written in `text` (its line), if it is.
fn key_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            let start = offset + (line.len() - t.len());
            return Some(start..start + key.len());
        }
        offset += line.len();
    }
    None
}

/// The registry's view of a checked entry.
fn spec(h: &HypervisorConfig) -> HvSpec {
    let name = h.name.get_ref();
    let mut spec = match (&h.libvirt_uri, &h.socket) {
        (Some(uri), _) => HvSpec::libvirt(name, uri),
        (None, socket) => HvSpec::qmp(
            name,
            socket.clone().unwrap_or_default(),
            h.vm.as_deref().unwrap_or(""),
        ),
    };
    if let Some(host) = &h.host {
        spec.host = host.clone();
    }
    spec.max_jobs = h.max_jobs;
    if let (Some(d), Some(uri)) = (&h.backup_data, &h.libvirt_uri) {
        spec.remote = Some(remote_spec(d, uri));
    }
    if let (Some(key), Some(known_hosts)) = (&h.ssh_key, &h.ssh_known_hosts) {
        spec.ssh = Some(SshLogin {
            key: key.clone(),
            known_hosts: known_hosts.clone(),
        });
    }
    spec
}

/// The data path of a checked `backup_data` of the hypervisor at `uri`.
fn remote_spec(d: &BackupData, uri: &str) -> RemoteSpec {
    let host = crate::daemon::hypervisors::uri_host(uri);
    let listen = d.listen.clone().unwrap_or_else(|| host.clone());
    let connect = d.connect.clone().unwrap_or(host);
    RemoteSpec {
        listen,
        tls_name: d.tls_name.clone().unwrap_or_else(|| connect.clone()),
        connect,
        ports: d
            .ports
            .as_deref()
            .and_then(|p| parse_ports(p).ok())
            .unwrap_or(DEFAULT_EXPORT_PORTS),
        ca: d.ca.clone(),
        cert: d.cert.clone(),
        key: d.key.clone(),
        start_offline: d.offline.unwrap_or(true),
        scratch_dir: d.scratch_dir.clone(),
        connections: d.connections.unwrap_or(DEFAULT_CONNECTIONS),
    }
}

/// NBD connections per disk of a remote hypervisor when none are configured.
pub const DEFAULT_CONNECTIONS: usize = 1;

/// `FIRST-LAST` (or one port) as a range of ports.
fn parse_ports(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let bad = || format!("ports {text:?} is not FIRST-LAST (e.g. 10900-10999)");
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let first: u16 = a.trim().parse().map_err(|_| bad())?;
    let last: u16 = b.trim().parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(bad());
    }
    Ok(first..=last)
}

/// A `backup_data` entry: for a libvirt URI that is not local, ports that parse, and a key
/// file only the service can read.
fn check_backup_data(h: &HypervisorConfig) -> Result<(), String> {
    let Some(d) = &h.backup_data else {
        return Ok(());
    };
    let Some(uri) = &h.libvirt_uri else {
        return Err("backup_data is for a remote libvirt hypervisor, not a QMP socket".into());
    };
    if uri.contains(":///") {
        return Err(format!(
            "backup_data needs a remote libvirt_uri (qemu+tls://HOST/system), not {uri:?}"
        ));
    }
    if let Some(p) = &d.ports {
        parse_ports(p)?;
    }
    if let Some(n) = d.connections.filter(|n| !(1..=8).contains(n)) {
        return Err(format!("backup_data connections = {n}: give 1 to 8"));
    }
    if let Some(dir) = d
        .scratch_dir
        .as_ref()
        .filter(|p| !p.is_absolute() || p.to_string_lossy().chars().any(char::is_control))
    {
        return Err(format!(
            "backup_data scratch_dir {} must be an absolute path on the hypervisor",
            dir.display()
        ));
    }
    for (what, path) in [("ca", &d.ca), ("cert", &d.cert), ("key", &d.key)] {
        absolute(&format!("backup_data {what}"), path)?;
    }
    owner_only("backup_data key", &d.key)
}

/// `path` is absolute, or an error naming `what`.
fn absolute(what: &str, path: &Path) -> Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{what} {} must be an absolute path",
            path.display()
        ))
    }
}

/// The file at `path` exists and neither its group nor others may use it (mode 0600 or
/// 0400), or an error naming `what`.
fn owner_only(what: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(e) => Err(format!("{what} {}: {e}", path.display())),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Err(format!(
            "{what} {} is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            m.permissions().mode() & 0o777
        )),
        Ok(_) => Ok(()),
    }
}

/// `ssh_key` and `ssh_known_hosts`: both or neither, for a `qemu+ssh://` URI naming a host
/// and not setting what Sluice sets from them, each an absolute path to a file only the
/// service can use.
fn check_ssh(h: &HypervisorConfig) -> Result<(), String> {
    use crate::daemon::hypervisors::{ssh_driver, SSH_PARAMS};
    let (key, known_hosts) = match (&h.ssh_key, &h.ssh_known_hosts) {
        (None, None) => return Ok(()),
        (Some(k), Some(f)) => (k, f),
        _ => {
            return Err(
                "give ssh_key and ssh_known_hosts together: the key Sluice logs in \
                        with and the file holding the hypervisor's host key"
                    .into(),
            )
        }
    };
    let uri = match &h.libvirt_uri {
        Some(uri) if ssh_driver(uri).is_some() => uri,
        _ => {
            return Err(
                "ssh_key and ssh_known_hosts need a libvirt_uri of the form \
                 qemu+ssh://USER@HOST[:PORT]/system"
                    .into(),
            )
        }
    };
    let authority = uri.split_once("://").map_or("", |(_, r)| r);
    let authority = authority.split(['/', '?']).next().unwrap_or("");
    if authority.rsplit('@').next().unwrap_or("").is_empty() {
        return Err(format!("libvirt_uri {uri:?} names no host"));
    }
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    for param in query.split('&') {
        let name = param.split('=').next().unwrap_or("");
        if SSH_PARAMS.contains(&name) {
            return Err(format!(
                "libvirt_uri sets {name}: with ssh_key Sluice sets {} itself",
                SSH_PARAMS.join(", ")
            ));
        }
    }
    absolute("ssh_key", key)?;
    absolute("ssh_known_hosts", known_hosts)?;
    owner_only("ssh_key", key)?;
    owner_only("ssh_known_hosts", known_hosts)
}

/// An entry names exactly one of a libvirt URI and a QMP socket (with its VM).
fn check_entry(h: &HypervisorConfig) -> Result<(), String> {
    let bad_text = |s: &str| s.is_empty() || s.chars().any(|c| c.is_control() || c.is_whitespace());
    match (&h.libvirt_uri, &h.socket) {
        (Some(_), Some(_)) => Err("give either libvirt_uri or socket, not both".into()),
        (None, None) => Err("give libvirt_uri (libvirt) or socket and vm (QMP)".into()),
        (Some(uri), None) if bad_text(uri) || !uri.contains(":/") => Err(format!(
            "libvirt_uri {uri:?} is not a libvirt URI (e.g. qemu+ssh://host/system)"
        )),
        (Some(_), None) if h.vm.is_some() => Err("vm is only for a QMP socket".into()),
        (None, Some(sock)) if !sock.is_absolute() => Err(format!(
            "socket {} must be an absolute path",
            sock.display()
        )),
        (None, Some(_)) => match h.vm.as_deref() {
            None => Err("a QMP socket needs vm, the name its VM goes by".into()),
            Some(vm) => crate::daemon::names::validate_name("vm name", vm).map_err(|e| e.message),
        },
        _ => Ok(()),
    }
    .and_then(|()| match &h.host {
        Some(host) if bad_text(host) || host.contains('/') => {
            Err(format!("host {host:?} is not a host name"))
        }
        _ => Ok(()),
    })
    .and_then(|()| match h.max_jobs {
        Some(0) => Err("max_jobs must be at least 1".into()),
        _ => Ok(()),
    })
    .and_then(|()| check_backup_data(h))
    .and_then(|()| check_ssh(h))
}

#[cfg(test)]
mod tests {
    use super::Config;
    use crate::daemon::hypervisors::Target;

    fn remote(dir: &std::path::Path, extra: &str, key_mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("client-key.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).unwrap();
        format!(
            "[[hypervisors]]\nname = \"kvm1\"\nlibvirt_uri = \"qemu+tls://kvm1.example/system\"\n\
             [hypervisors.backup_data]\nca = \"{d}/ca.pem\"\ncert = \"{d}/cert.pem\"\nkey = \"{k}\"\n{extra}",
            d = dir.display(),
            k = key.display()
        )
    }

    #[test]
    fn a_remote_hypervisor_takes_its_data_path_with_the_uri_host_as_default() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::parse(&remote(dir.path(), "", 0o600)).expect("parses");
        let spec = c.hypervisor_specs().pop().unwrap();
        let r = spec.remote.expect("remote data path");
        assert_eq!(
            (r.listen.as_str(), r.connect.as_str()),
            ("kvm1.example", "kvm1.example")
        );
        assert_eq!(r.tls_name, "kvm1.example");
        assert_eq!(r.ports, super::DEFAULT_EXPORT_PORTS);
        let nat = "connect = \"192.0.2.7\"\nports = \"20000-20009\"\n";
        let r = Config::parse(&remote(dir.path(), nat, 0o400))
            .unwrap()
            .hypervisor_specs()
            .pop()
            .unwrap()
            .remote
            .unwrap();
        assert_eq!(
            (r.listen.as_str(), r.connect.as_str()),
            ("kvm1.example", "192.0.2.7")
        );
        assert_eq!(
            r.tls_name, "192.0.2.7",
            "the tls name defaults to the address dialled"
        );
        assert_eq!(r.ports, 20000..=20009);
    }

    #[test]
    fn a_bad_data_path_is_refused_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let open = Config::parse(&remote(dir.path(), "", 0o644)).unwrap_err();
        assert!(open[0].message.contains("readable by others"), "{open:?}");
        let ports = Config::parse(&remote(dir.path(), "ports = \"9-3\"\n", 0o600)).unwrap_err();
        assert!(ports[0].message.contains("ports \"9-3\""), "{ports:?}");
        let local = remote(dir.path(), "", 0o600)
            .replace("qemu+tls://kvm1.example/system", "qemu:///system");
        let e = Config::parse(&local).unwrap_err();
        assert!(e[0].message.contains("remote libvirt_uri"), "{e:?}");
    }

    #[test]
    fn the_nbd_server_identity_and_advertised_name_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("nbd-key.pem");
        std::fs::write(&key, "x").unwrap();
        let with = |mode: u32, extra: &str| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let text = format!(
                "max_jobs = 2\nnbd_cert = \"{d}/nbd-cert.pem\"\nnbd_key = \"{k}\"\n{extra}",
                d = dir.path().display(),
                k = key.display()
            );
            Config::parse(&text)
        };
        let c = with(0o600, "nbd_advertise = \"proxy.example\"\n").expect("parses");
        let bound: std::net::SocketAddr = "0.0.0.0:10809".parse().unwrap();
        assert_eq!(c.nbd_advertised(bound).as_deref(), Some("proxy.example"));
        let open = with(0o644, "").unwrap_err();
        assert!(
            open[0].message.contains("nbd_key") && open[0].message.contains("readable by others"),
            "{open:?}"
        );
        assert_eq!(open[0].line, 3, "{open:?}");
        let plain = with(0o600, "nbd_tls = false\n").unwrap_err();
        assert!(plain[0].message.contains("need nbd_tls"), "{plain:?}");
        let bad = with(0o600, "nbd_advertise = \"a b\"\n").unwrap_err();
        assert!(bad[0].message.contains("not a host name"), "{bad:?}");
        assert_eq!(bad[0].line, 4, "{bad:?}");
        let alone = Config::parse("nbd_key = \"/k.pem\"\n").unwrap_err();
        assert!(alone[0].message.contains("together"), "{alone:?}");

        let d = Config::default();
        assert_eq!(
            d.nbd_advertised(bound),
            None,
            "unspecified: nothing to advertise"
        );
        let lo: std::net::SocketAddr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(d.nbd_advertised(lo).as_deref(), Some("127.0.0.1"));
    }

    /// A `[[hypervisors]]` entry for `uri` with `ssh_key` and `ssh_known_hosts` files made in
    /// `dir` with these modes (`None`: the setting is left out).
    fn ssh_entry(dir: &std::path::Path, uri: &str, modes: (Option<u32>, Option<u32>)) -> String {
        use std::os::unix::fs::PermissionsExt;
        let mut text = format!("[[hypervisors]]\nname = \"kvm1\"\nlibvirt_uri = \"{uri}\"\n");
        for (setting, file, mode) in [
            ("ssh_key", "id_ed25519", modes.0),
            ("ssh_known_hosts", "known hosts&1", modes.1),
        ] {
            let Some(mode) = mode else { continue };
            let path = dir.join(file);
            std::fs::write(&path, "x").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            text.push_str(&format!("{setting} = \"{}\"\n", path.display()));
        }
        text
    }

    #[test]
    fn an_ssh_hypervisor_is_opened_over_libssh_with_its_key_and_known_hosts_only() {
        use crate::daemon::hypervisors::{libssh_uri, shown_uri, Hypervisors};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let uri = "qemu+ssh://backup@kvm1.example:2222/system";
        let c =
            Config::parse(&ssh_entry(dir.path(), uri, (Some(0o600), Some(0o400)))).expect("parses");
        let spec = c.hypervisor_specs().pop().unwrap();
        let login = spec.ssh.clone().expect("an ssh login");
        assert_eq!(login.key, dir.path().join("id_ed25519"));
        assert_eq!(
            libssh_uri(uri, &login),
            format!(
                "qemu+libssh://backup@kvm1.example:2222/system?keyfile={d}/id_ed25519\
                 &known_hosts={d}/known%20hosts%261&known_hosts_verify=normal&sshauth=privkey"
            )
        );
        // Another query parameter stays, before Sluice's (the last of a name wins).
        let with_query = libssh_uri("qemu+libssh://h/system?mode=direct", &login);
        assert!(
            with_query.starts_with("qemu+libssh://h/system?mode=direct&keyfile="),
            "{with_query}"
        );
        assert_eq!(shown_uri(&with_query), "qemu+libssh://h/system");
        assert_eq!(spec.host, "kvm1.example");
        // The API and the log show the URI as configured, without a query: no path.
        let hvs = Hypervisors::new(vec![spec]);
        let info = hvs.all()[0].info(None);
        assert_eq!(info.uri.as_deref(), Some(uri));
        assert_eq!(hvs.all()[0].address(), uri);
        let tls = Hypervisors::new(
            Config::parse("libvirt_uri = \"qemu+tls://h/system?pkipath=/etc/pki/h\"\n")
                .unwrap()
                .hypervisor_specs(),
        );
        assert_eq!(
            tls.all()[0].info(None).uri.as_deref(),
            Some("qemu+tls://h/system")
        );
        assert!(tls.all()[0].spec.ssh.is_none());
    }

    #[test]
    fn ssh_settings_are_refused_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let uri = "qemu+ssh://backup@kvm1/system";
        let refused = |uri: &str, modes| {
            let e = Config::parse(&ssh_entry(dir.path(), uri, modes)).unwrap_err();
            assert_eq!(e.len(), 1, "{e:?}");
            e[0].message.clone()
        };
        let open_key = refused(uri, (Some(0o644), Some(0o600)));
        assert!(
            open_key.contains("ssh_key") && open_key.contains("readable by others (mode 644)"),
            "{open_key}"
        );
        let open_hosts = refused(uri, (Some(0o600), Some(0o640)));
        assert!(
            open_hosts.contains("ssh_known_hosts") && open_hosts.contains("chmod 600"),
            "{open_hosts}"
        );
        for modes in [(Some(0o600), None), (None, Some(0o600))] {
            let alone = refused(uri, modes);
            assert!(alone.contains("together"), "{alone}");
        }
        for other in ["qemu+tls://kvm1/system", "qemu:///system"] {
            let e = refused(other, (Some(0o600), Some(0o600)));
            assert!(e.contains("qemu+ssh://USER@HOST"), "{e}");
        }
        let e = refused("qemu+ssh:///system", (Some(0o600), Some(0o600)));
        assert!(e.contains("names no host"), "{e}");
        for param in ["known_hosts_verify=ignore", "keyfile=/k", "sshauth=agent"] {
            let e = refused(
                &format!("{uri}?no_tty=1&{param}"),
                (Some(0o600), Some(0o600)),
            );
            let name = param.split('=').next().unwrap();
            assert!(e.contains(&format!("sets {name}")), "{e}");
        }
        let relative = ssh_entry(dir.path(), uri, (Some(0o600), Some(0o600))).replace(
            &format!("{}/id_ed25519", dir.path().display()),
            "id_ed25519",
        );
        let e = Config::parse(&relative).unwrap_err();
        assert!(e[0].message.contains("absolute path"), "{e:?}");
        let missing =
            ssh_entry(dir.path(), uri, (Some(0o600), Some(0o600))).replace("id_ed25519", "absent");
        let e = Config::parse(&missing).unwrap_err();
        assert!(e[0].message.contains("absent: No such file"), "{e:?}");
        // A plain qemu+ssh URI without them stays as it was: the ssh binary's own set-up.
        let plain = Config::parse(&ssh_entry(dir.path(), uri, (None, None))).unwrap();
        assert!(plain.hypervisor_specs()[0].ssh.is_none());
    }

    #[test]
    fn example_file_parses_and_unknown_keys_are_named() {
        let ex = include_str!("../../../sluice.example.toml");
        let c = Config::parse(ex).expect("example parses");
        let specs = c.hypervisor_specs();
        assert!(specs.len() >= 2, "the example names several hypervisors");
        let err = Config::parse("listn = \"x\"\n").unwrap_err();
        assert!(err[0].message.contains("listn"), "{err:?}");
        assert_eq!(err[0].line, 1);
    }

    #[test]
    fn no_hypervisor_means_local_libvirt_and_libvirt_uri_is_shorthand() {
        let specs = Config::parse("").unwrap().hypervisor_specs();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, "default");
        assert!(matches!(&specs[0].target, Target::Libvirt { uri } if uri == "qemu:///system"));
        let c = Config::parse("libvirt_uri = \"qemu+ssh://root@h1/system\"\n").unwrap();
        let specs = c.hypervisor_specs();
        assert_eq!(
            (specs[0].name.as_str(), specs[0].host.as_str()),
            ("default", "h1")
        );
    }
}
