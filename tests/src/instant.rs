//! Instant recovery for tests: a writable export of one disk of a backup, served by our own
//! NBD server on a unix socket that `libvirt-qemu` can reach, and the libvirt `<disk>` element
//! that boots a domain from it.
//!
//! Owns the socket (`DIR/instant.sock`, mode 0777), the overlay directory (`DIR/overlay`) and
//! the server thread; dropping it stops the server. It does not own the domain booted from
//! the export (see [`crate::vm`]) nor the repository (see [`crate::bed`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use catalog::{Manifest, Repository};
use proxy::nbd::{Server, ServerOptions};
use proxy::restore::{ExportName, ExportOptions, RepoExport};

use crate::peers::ServerThread;

/// A writable export of a backup's disk on `DIR/instant.sock`, overlay in `DIR/overlay`.
pub struct InstantExport {
    server: Arc<Server>,
    thread: Option<ServerThread>,
    socket: PathBuf,
    overlay_dir: PathBuf,
    name: ExportName,
    export: Arc<RepoExport>,
}

impl InstantExport {
    /// Serves disk `disk` of backup `backup` of VM `vm` writable, with its socket and overlay
    /// in `dir` (e.g. a [`crate::TestVm`]'s scratch directory, which QEMU can reach).
    pub fn serve(
        repo: &Repository,
        dir: &Path,
        vm: &str,
        disk: &str,
        backup: &Manifest,
    ) -> Result<InstantExport> {
        let socket = dir.join("instant.sock");
        let overlay_dir = dir.join("overlay");
        std::fs::create_dir(&overlay_dir)
            .with_context(|| format!("create {}", overlay_dir.display()))?;
        let server = Server::new(ServerOptions::default());
        let thread = ServerThread::start(server.clone(), &socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777))?;
        let name = ExportName::new(vm, disk, &backup.id)?;
        let opts = ExportOptions::writable(&overlay_dir);
        let export = Arc::new(RepoExport::open_blocking(repo, &name, &opts)?);
        server.add_export(name.to_string(), export.clone());
        Ok(InstantExport {
            server,
            thread: Some(thread),
            socket,
            overlay_dir,
            name,
            export,
        })
    }

    /// The libvirt `<disk>` element of this export as a raw virtio disk `target` (e.g.
    /// `vda`), for [`crate::VmSpec::raw_disk`].
    pub fn disk_xml(&self, target: &str) -> String {
        format!(
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
             <source protocol='nbd' name='{}'><host transport='unix' socket='{}'/>\
             </source><target dev='{target}' bus='virtio'/></disk>",
            self.name,
            self.socket.display()
        )
    }

    /// The export's name, `VM/DISK@BACKUP`.
    pub fn name(&self) -> &ExportName {
        &self.name
    }

    /// The served export (overlay size, ...).
    pub fn export(&self) -> &Arc<RepoExport> {
        &self.export
    }

    /// The server, to add or remove more exports on the same socket.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The unix socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where the export keeps its overlay.
    pub fn overlay_dir(&self) -> &Path {
        &self.overlay_dir
    }

    /// Stops the server and closes every connection (also done on drop).
    pub fn stop(&mut self) {
        self.thread = None;
    }
}
