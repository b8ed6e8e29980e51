//! A restore as its job will do it, once `start` has checked the request.

use std::path::PathBuf;
use std::sync::Arc;

use catalog::BackupId;
use proxy::restore::{ExportName, ImageFormat};

use crate::daemon::hypervisors::Member;
use crate::wire::restores::RestoreFormat;

/// A restore as its job will do it.
pub(crate) enum Plan {
    File {
        name: ExportName,
        target: PathBuf,
        overwrite: bool,
    },
    Domain {
        hv: Arc<Member>,
        new_name: String,
        xml: String,
        disks: Vec<(ExportName, PathBuf)>,
        start: bool,
    },
    /// As a new domain whose disks are volumes of a storage pool on the hypervisor.
    Pool {
        hv: Arc<Member>,
        new_name: String,
        pool: String,
        xml: String,
        disks: Vec<ExportName>,
        start: bool,
    },
    Onto {
        hv: Arc<Member>,
        vm: String,
        backup: BackupId,
        disks: Vec<String>,
    },
}

impl RestoreFormat {
    pub(crate) fn image(self) -> ImageFormat {
        match self {
            RestoreFormat::Qcow2 => ImageFormat::Qcow2,
            RestoreFormat::Raw => ImageFormat::Raw,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            RestoreFormat::Qcow2 => "qcow2",
            RestoreFormat::Raw => "raw",
        }
    }
}
