//! Hypervisor adapters: libvirt and plain QEMU (QMP), plus the offline path for stopped VMs.
//!
//! Owns every conversation with the hypervisor: libvirt XML and QMP JSON are built and parsed
//! only below this module, and `qemu-nbd` / `qemu-img` are spawned only here (and by the test
//! harness). It hands the backup job the location of a point-in-time NBD export per disk (unix
//! socket, export name, dirty-bitmap context); it does not read NBD itself (`crate::nbd` does).
//!
//! Lifecycles that can leak hypervisor state are guards: [`BackupSession`] (a pull-mode backup
//! job, or an offline `qemu-nbd`) and [`FreezeGuard`] (frozen guest filesystems). Their explicit
//! `finish`/`abort`/`thaw` releases them; dropping one without that logs an error and still
//! releases it in the background.

mod error;
pub mod image;
pub mod libvirt;
pub mod offline;
pub mod qmp;
mod session;
pub mod xml;
pub mod xml_instant;
pub mod xml_restore;

use std::future::Future;
use std::path::PathBuf;

pub(crate) use error::{failed, io_failed, Cause};
pub use error::{Error, ErrorKind, Result};
pub use session::{BackupSession, FreezeGuard};

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    ShutOff,
    /// Crashed, suspended to disk, shutting down, or anything else.
    Other,
}

/// A VM as the hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    pub disks: Vec<DiskInfo>,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Target name (`vda`) for libvirt, node name for QMP.
    pub target: String,
    /// Image file or block device, if the disk is local.
    pub source: Option<PathBuf>,
    /// Image format (`qcow2`, `raw`), if known.
    pub format: Option<String>,
    /// What backs the disk on the hypervisor.
    pub kind: DiskKind,
    /// Virtual size in bytes (0 if the hypervisor could not tell).
    pub capacity: u64,
}

/// What backs a disk on the hypervisor (libvirt's `<disk type=…>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// An image file.
    File,
    /// A block device.
    Block,
    /// A network disk (RBD, iSCSI, NBD, …).
    Network,
    /// A storage pool volume, or a type Sluice does not know.
    Other,
}

impl DiskKind {
    fn describe(self) -> &'static str {
        match self {
            DiskKind::File => "image",
            DiskKind::Block => "block device",
            DiskKind::Network => "network disk",
            DiskKind::Other => "disk",
        }
    }
}

impl DiskInfo {
    /// Whether the disk can hold persistent dirty bitmaps (only qcow2 can).
    pub fn supports_bitmaps(&self) -> bool {
        self.format.as_deref() == Some("qcow2")
    }

    /// The format the definition names; libvirt's default when it names none is raw (a
    /// format is never probed: a guest could write any header into a raw disk).
    pub fn format_named(&self) -> &str {
        self.format.as_deref().unwrap_or("raw")
    }

    /// Why this disk is read in full by every backup (`None`: it tracks changes).
    pub fn full_read_reason(&self) -> Option<String> {
        (!self.supports_bitmaps()).then(|| {
            format!(
                "{} {}: only qcow2 images carry dirty bitmaps, so every backup reads it in full \
                 (deduplication stores only the chunks that changed)",
                self.format_named(),
                self.kind.describe()
            )
        })
    }
}

/// A checkpoint: a named point in time with one dirty bitmap per disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub name: String,
    pub parent: Option<String>,
    /// Seconds since the epoch, when known.
    pub creation_time: Option<i64>,
    /// Disks that carry a bitmap for this checkpoint, with the bitmap's name.
    pub disks: Vec<CheckpointDisk>,
    /// The full checkpoint XML (libvirt) to keep in the manifest for a later redefine.
    pub xml: Option<String>,
}

/// One disk's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDisk {
    pub disk: String,
    pub bitmap: String,
}

/// What a pull-mode backup should export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRequest {
    pub vm: String,
    /// Disk targets to export (others are left out).
    pub disks: Vec<String>,
    /// Export the dirty bitmap since this checkpoint; `None` for a full backup.
    pub incremental_from: Option<String>,
    /// Disks of `disks` read in full even in an incremental: they carry no bitmap (raw
    /// images, block devices, network disks); the checkpoint tracks none of them.
    pub full_disks: Vec<String>,
    /// Create this checkpoint atomically with the backup's point in time.
    pub new_checkpoint: Option<String>,
    /// Directory for scratch (fleecing) images, as the hypervisor sees it; must be writable
    /// by the QEMU user. `None` (remote hypervisors only): libvirt places each beside its
    /// image.
    pub scratch_dir: Option<PathBuf>,
    /// Unix socket the NBD server listens on; must be reachable by the QEMU user. Unused
    /// when `tcp` is set.
    pub socket: PathBuf,
    /// Serve the exports over TCP with TLS on the hypervisor instead (a remote hypervisor):
    /// QEMU listens there with the certificate libvirt's `qemu.conf` names
    /// (`backup_tls_x509_cert_dir`), and libvirt places each scratch file beside its image,
    /// so no path of the proxy reaches the hypervisor.
    pub tcp: Option<TcpServer>,
}

/// Where QEMU serves a remote backup's exports: the address it listens on, on the
/// hypervisor, and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpServer {
    /// Host name or address QEMU binds (libvirt's `<server name=…>`).
    pub listen: String,
    pub port: u16,
}

/// Where the backup job reads one disk's point-in-time view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskExport {
    pub disk: String,
    /// The unix socket of a local export (unused when `tcp_port` is set).
    pub socket: PathBuf,
    /// The TCP port of a remote export (TLS; the host is the proxy's to choose, see
    /// `job::RemoteData`).
    pub tcp_port: Option<u16>,
    pub export_name: String,
    /// `qemu:dirty-bitmap:NAME` for an incremental, `None` for a full backup.
    pub dirty_bitmap_context: Option<String>,
    /// Virtual size of the disk at the backup's point in time.
    pub capacity: u64,
}

/// A problem that makes a checkpoint unusable as the base of an incremental.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointProblem {
    CheckpointMissing,
    DiskMissing {
        disk: String,
    },
    BitmapMissing {
        disk: String,
    },
    /// Left `in-use` by an unclean QEMU exit, or flagged inconsistent.
    BitmapInconsistent {
        disk: String,
    },
    /// Not recording changes.
    BitmapDisabled {
        disk: String,
    },
    SizeChanged {
        disk: String,
        was: u64,
        now: u64,
    },
    /// The hypervisor itself refused it (e.g. libvirt's redefine validation).
    Refused {
        reason: String,
    },
}

/// Whether a checkpoint can be trusted for an incremental.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointHealth {
    Usable,
    Unusable(Vec<CheckpointProblem>),
}

impl CheckpointHealth {
    fn from_problems(problems: Vec<CheckpointProblem>) -> Self {
        if problems.is_empty() {
            Self::Usable
        } else {
            Self::Unusable(problems)
        }
    }

    pub fn is_usable(&self) -> bool {
        matches!(self, Self::Usable)
    }
}

/// A disk the caller expects in a checkpoint, with its size at the last good backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedDisk {
    pub disk: String,
    pub capacity: u64,
}

/// The operations the backup job needs from a hypervisor. Implemented by
/// [`libvirt::LibvirtHypervisor`] and [`qmp::QmpHypervisor`]; every blocking call runs off the
/// async runtime's worker threads.
pub trait Hypervisor: Send + Sync {
    /// Every VM the adapter can see.
    fn list_domains(&self) -> impl Future<Output = Result<Vec<DomainInfo>>> + Send;

    /// One VM.
    fn domain(&self, vm: &str) -> impl Future<Output = Result<DomainInfo>> + Send;

    /// The VM's definition as the hypervisor gives it (libvirt domain XML), kept in manifests
    /// so a backup can be restored as a new domain.
    fn domain_xml(&self, vm: &str) -> impl Future<Output = Result<String>> + Send;

    /// The VM's checkpoints, oldest first.
    fn list_checkpoints(
        &self,
        vm: &str,
    ) -> impl Future<Output = Result<Vec<CheckpointInfo>>> + Send;

    /// Starts a pull-mode backup and returns the guard that ends it.
    fn begin_backup(
        &self,
        req: BackupRequest,
    ) -> impl Future<Output = Result<BackupSession>> + Send;

    /// Deletes a checkpoint and its bitmaps (`metadata_only`: forget it, keep the bitmaps).
    fn delete_checkpoint(
        &self,
        vm: &str,
        checkpoint: &str,
        metadata_only: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Checks that `checkpoint` can serve as the base of an incremental of `disks`.
    fn check_checkpoint(
        &self,
        vm: &str,
        checkpoint: &str,
        disks: &[ExpectedDisk],
    ) -> impl Future<Output = Result<CheckpointHealth>> + Send;

    /// Ends a backup job that an earlier run left behind (the proxy was killed mid-backup),
    /// but only one whose NBD socket path contains `marker` (Sluice's job directories), so
    /// another tool's job is never touched. Returns the aborted job's socket path.
    fn abort_stale_backup(
        &self,
        vm: &str,
        marker: &str,
    ) -> impl Future<Output = Result<Option<PathBuf>>> + Send;

    /// Ends a pull-mode backup job of `vm` that serves its exports over TCP on a port of
    /// `ports` (a remote backup an earlier run of the proxy left, killed mid-backup: one job
    /// holds a VM at a time, so no live backup of this proxy's has one); returns that port.
    /// Adapters without remote backups have none.
    fn abort_stale_tcp_backup(
        &self,
        vm: &str,
        ports: std::ops::RangeInclusive<u16>,
    ) -> impl Future<Output = Result<Option<u16>>> + Send {
        let _ = (vm, ports);
        async { Ok(None) }
    }

    /// Starts the shut-off `vm` with its CPUs paused (they never run), so a remote
    /// hypervisor's QEMU can serve its disks for a backup. Adapters that cannot refuse.
    fn start_paused(&self, vm: &str) -> impl Future<Output = Result<()>> + Send {
        let msg = format!("vm {vm}: this hypervisor cannot start a vm paused");
        async move { Err(Error::new(ErrorKind::Unsupported, msg)) }
    }

    /// Powers `vm` off at once (the paused domain an offline backup started).
    fn destroy(&self, vm: &str) -> impl Future<Output = Result<()>> + Send {
        let msg = format!("vm {vm}: this hypervisor cannot destroy a vm");
        async move { Err(Error::new(ErrorKind::Unsupported, msg)) }
    }

    /// Whether the guest agent answers right now.
    fn agent_responds(&self, vm: &str) -> impl Future<Output = bool> + Send;

    /// Freezes the guest's filesystems; the guard thaws them.
    fn freeze(&self, vm: &str) -> impl Future<Output = Result<FreezeGuard>> + Send;
}
