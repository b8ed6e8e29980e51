//! A booted test guest and what it takes to back it up with the proxy isolated from its
//! hypervisor: the test bed's libvirt over TLS ([`TlsHost`]), the isolated user
//! ([`Isolated`]), a data directory that user owns, and daemons started as that user in a
//! mount namespace hiding the guest's image directory (and libvirt's). Shared by every test
//! file of the remote data path (`backup_remote.rs`, `backup_ssh.rs`,
//! `hypervisor_reconnect.rs`).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::daemon::{binary_for, Daemon};
use crate::remote::{free_port, Isolated, TlsHost};
use crate::vm::{TestVm, VmSpec};

/// The `[[hypervisors]]` entry `remote`: the test bed's libvirt over TLS, its backup data
/// over TCP with TLS on 16 ports from `first_port`.
pub fn tls_hypervisor(host: &TlsHost, first_port: u16) -> String {
    format!(
        "[[hypervisors]]\nname = \"remote\"\nlibvirt_uri = \"{uri}\"\n{}",
        backup_data(host, first_port),
        uri = host.uri(),
    )
}

/// The `[hypervisors.backup_data]` table of [`tls_hypervisor`].
pub fn backup_data(host: &TlsHost, first_port: u16) -> String {
    format!(
        "[hypervisors.backup_data]\nports = \"{first_port}-{last}\"\n\
         ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        last = first_port.saturating_add(15),
        ca = host.ca_cert().display(),
        cert = host.client_cert().display(),
        key = host.client_key().display(),
    )
}

/// A booted guest on the test bed's libvirt, and isolated daemons over one data directory.
pub struct RemoteGuest {
    pub host: TlsHost,
    pub iso: Isolated,
    pub vm: TestVm,
    /// The guest's first disk.
    pub disk: String,
    /// The directory of the guest's images (hidden from the daemons).
    pub images: PathBuf,
    /// The daemons' directory (owned by the isolated user); dropped last.
    pub dir: tempfile::TempDir,
    /// First of the backup export ports.
    pub first_port: u16,
}

impl RemoteGuest {
    /// Boots a guest of `spec`; `prefix` names the data directory.
    pub fn boot(prefix: &str, spec: VmSpec) -> Result<RemoteGuest> {
        let host = TlsHost::ensure()?;
        let iso = Isolated::ensure()?;
        let vm = TestVm::boot(spec)?;
        let disk = vm.disks()[0].target.clone();
        let images = vm
            .disk_path(&disk)?
            .parent()
            .context("image dir")?
            .to_path_buf();
        let dir = iso.data_dir(prefix)?;
        Ok(RemoteGuest {
            host,
            iso,
            vm,
            disk,
            images,
            dir,
            first_port: free_port()?,
        })
    }

    /// An isolated daemon whose configuration is `config` (after its data directory and
    /// listen addresses), over the data directory (reused across restarts).
    pub fn daemon_with(&self, config: &str) -> Result<Daemon> {
        let bin = binary_for(&self.iso, self.dir.path())?;
        Daemon::start_as(self.dir.path(), config, |argv| {
            self.iso.command(&bin, &argv[1..], &[self.images.as_path()])
        })
    }

    /// [`RemoteGuest::daemon_with`] `top` (top-level settings) and the [`tls_hypervisor`].
    pub fn daemon(&self, top: &str) -> Result<Daemon> {
        let config = format!("{top}{}", tls_hypervisor(&self.host, self.first_port));
        self.daemon_with(&config)
    }

    /// That `d` sent libvirt XML (a backup, a checkpoint) and that none of it names a path
    /// of the proxy: its data directory or its client certificate files.
    pub fn no_proxy_path_sent(&self, d: &Daemon) -> Result<()> {
        let sent = d.sent_xml();
        ensure!(
            sent.iter().any(|l| l.contains("domainbackup")),
            "the daemon logged the backup XML it sent: {sent:?}"
        );
        let proxy: Vec<String> = [Some(self.dir.path()), self.host.client_key().parent()]
            .into_iter()
            .flatten()
            .map(|p: &Path| p.to_string_lossy().into_owned())
            .collect();
        for line in &sent {
            for p in &proxy {
                ensure!(
                    !line.contains(p.as_str()),
                    "xml sent to libvirt names {p} of the proxy: {line}"
                );
            }
        }
        Ok(())
    }
}
