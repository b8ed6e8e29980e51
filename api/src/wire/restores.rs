//! Restore requests.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Image format of a restored file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestoreFormat {
    #[default]
    Qcow2,
    Raw,
}

/// Body of a restore request: exactly one of `to` (one disk to a file), `as_domain` (a new
/// domain), `onto_vm` (the VM's own disks) and `instant`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub backup: String,
    /// Disk target (`vda`) for `to`; default: the backup's first disk.
    pub disk: Option<String>,
    /// Absolute path of the image file to write, inside a configured restore directory.
    pub to: Option<String>,
    /// Default `qcow2`.
    pub format: Option<RestoreFormat>,
    /// Replace an existing file at `to`.
    #[serde(default)]
    pub overwrite: bool,
    /// Define a new domain of this name from the backup's saved definition (new UUID, MAC
    /// addresses and NVRAM; an existing name is refused with 409). Its disks are volumes of
    /// the storage pool `pool` on the hypervisor, uploaded over the libvirt connection, when
    /// `pool` is given or the hypervisor is remote (`backup_data` configured); else files in
    /// the first restore directory of the proxy (a proxy on the hypervisor host).
    pub as_domain: Option<String>,
    /// The storage pool on the hypervisor that gets the volumes of `as_domain`
    /// (`NAME-DISK.qcow2` or `.raw`; an existing volume is refused with 409, a missing pool
    /// with 404). Default for a remote hypervisor: `default`.
    pub pool: Option<String>,
    /// Start the domain `as_domain` defined once its disks are restored.
    #[serde(default)]
    pub start: bool,
    /// Write the backup back onto its own VM's disks (`disk`: only that one). The VM must be
    /// shut off (else 409) and `confirm` set (else 400).
    #[serde(default)]
    pub onto_vm: bool,
    /// The explicit confirmation that `onto_vm` overwrites the VM's disks.
    #[serde(default)]
    pub confirm: bool,
    /// The libvirt hypervisor `as_domain` defines the domain on, or whose VM `onto_vm`
    /// writes to. Default: the hypervisor of the backed-up VM (found by its uuid), or the
    /// only libvirt hypervisor. A QMP hypervisor is refused.
    pub hypervisor: Option<String>,
    /// Instant recovery: define a new domain (`as_domain`, default `VM-instant`) on
    /// `hypervisor` whose disks are writable NBD exports of the backup, and start it at once;
    /// the job runs until cancelled (which destroys and undefines the domain and discards
    /// its writes).
    #[serde(default)]
    pub instant: bool,
}
