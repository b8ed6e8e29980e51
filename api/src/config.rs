//! The daemon's configuration: one TOML file, every key optional, embedded defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// The hypervisor of this cluster.
    pub libvirt_uri: String,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/sluice"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            repository: None,
            chunk_size: 64 << 10,
            libvirt_uri: "qemu:///system".into(),
            max_jobs: 2,
            max_jobs_per_host: None,
            read_limit: None,
            nbd_listen: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            insecure_http: false,
            restore_dirs: Vec::new(),
            nbd_tls: true,
            nbd_client_ca: None,
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
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// The directories restores may write into.
    pub fn restore_dirs(&self) -> Vec<PathBuf> {
        if self.restore_dirs.is_empty() {
            vec![self.data_dir.join("restores")]
        } else {
            self.restore_dirs.clone()
        }
    }

    /// The hypervisor host of `libvirt_uri` (`qemu+ssh://root@h1:22/system` -> `h1`;
    /// `localhost` for local URIs), the key of the per-host job limit.
    pub fn hypervisor_host(&self) -> String {
        let rest = self.libvirt_uri.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        let host = host.split(':').next().unwrap_or("");
        if host.is_empty() {
            "localhost".into()
        } else {
            host.to_string()
        }
    }

    /// The repository directory.
    pub fn repo_dir(&self) -> PathBuf {
        self.repository
            .clone()
            .unwrap_or_else(|| self.data_dir.join("repo"))
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    #[test]
    fn example_file_parses_and_unknown_keys_are_named() {
        let ex = include_str!("../../sluice.example.toml");
        let c: Config = toml::from_str(ex).expect("example parses");
        assert_eq!(c.libvirt_uri, "qemu:///system");
        let err = toml::from_str::<Config>("listn = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn hypervisor_hosts_come_from_the_uri() {
        let host = |uri: &str| {
            let c = Config {
                libvirt_uri: uri.into(),
                ..Config::default()
            };
            c.hypervisor_host()
        };
        assert_eq!(host("qemu:///system"), "localhost");
        assert_eq!(host("qemu+ssh://root@h1:2222/system"), "h1");
        assert_eq!(host("qemu+tls://kvm-7.example/system"), "kvm-7.example");
        assert_eq!(host("test:///default"), "localhost");
    }
}
