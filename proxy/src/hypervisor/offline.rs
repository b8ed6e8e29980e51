//! Stopped VMs: the images are read directly, read-only, through one `qemu-nbd` per disk that
//! also exports the persistent bitmap of the base checkpoint. The next checkpoint is a new
//! persistent bitmap added with `qemu-img bitmap --add` before the export opens (nothing writes
//! to a stopped VM's image, so "now" is the same instant for both). The guest is never started.
//!
//! Restores write a stopped VM's image the same way, through one writable `qemu-nbd`
//! ([`open_writable`], a [`WritableImage`] guard), never behind QEMU's back.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::image::{self, ImageInfo};
use super::session::{BoxFuture, Release};
use super::xml::validate_name;
use super::{
    failed, io_failed, BackupSession, CheckpointHealth, CheckpointProblem, DiskExport, Error,
    ErrorKind, ExpectedDisk, Result,
};

/// One disk image of a stopped VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineDisk {
    pub disk: String,
    pub image: PathBuf,
    /// The format the domain definition names (`qcow2`, `raw`): given to every tool, never
    /// probed (a guest may write any header into a raw disk).
    pub format: String,
    /// Whether the disk's changes are tracked (a qcow2 image: its bitmaps are the base and
    /// the next checkpoint); an untracked disk is read in full and its image left as it is.
    pub tracked: bool,
}

/// An offline backup: like [`super::BackupRequest`] with image paths instead of a VM handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineRequest {
    pub vm: String,
    pub disks: Vec<OfflineDisk>,
    /// The base checkpoint: its bitmap must exist and be consistent on every tracked disk.
    pub incremental_from: Option<String>,
    /// Added as an enabled persistent bitmap on every tracked disk.
    pub new_checkpoint: Option<String>,
    /// Each disk's socket is this path with `.DISK` appended.
    pub socket: PathBuf,
}

/// How long `qemu-nbd` may take to open its socket.
const STARTUP: Duration = Duration::from_secs(10);

/// The socket `qemu-nbd` serves `disk` on.
pub fn disk_socket(base: &Path, disk: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{disk}"));
    PathBuf::from(s)
}

/// Whether `bitmap` can serve as the base of an incremental on each disk.
pub async fn check_bitmaps(
    disks: &[OfflineDisk],
    bitmap: &str,
    expected: &[ExpectedDisk],
) -> Result<CheckpointHealth> {
    validate_name("bitmap", bitmap)?;
    let mut problems = Vec::new();
    for want in expected {
        let Some(d) = disks.iter().find(|d| d.disk == want.disk) else {
            problems.push(CheckpointProblem::DiskMissing {
                disk: want.disk.clone(),
            });
            continue;
        };
        let info = image::info(&d.image, &d.format).await?;
        if info.virtual_size != want.capacity {
            let (was, now) = (want.capacity, info.virtual_size);
            problems.push(CheckpointProblem::SizeChanged {
                disk: want.disk.clone(),
                was,
                now,
            });
        }
        problems.extend(image::bitmap_problem(&info, &want.disk, bitmap));
    }
    Ok(CheckpointHealth::from_problems(problems))
}

/// Inspects every disk and refuses a request the images cannot serve.
async fn inspect(req: &OfflineRequest) -> Result<Vec<ImageInfo>> {
    for cp in req.incremental_from.iter().chain(req.new_checkpoint.iter()) {
        validate_name("checkpoint", cp)?;
    }
    let mut infos = Vec::new();
    for d in &req.disks {
        validate_name("disk", &d.disk)?;
        let info = image::info(&d.image, &d.format).await?;
        if !d.tracked {
            infos.push(info);
            continue;
        }
        if req.incremental_from.is_some() || req.new_checkpoint.is_some() {
            image::require_qcow2(&info, &d.image)?;
        }
        if let Some(base) = &req.incremental_from {
            if let Some(problem) = image::bitmap_problem(&info, &d.disk, base) {
                return Err(Error::new(
                    ErrorKind::Inconsistent,
                    format!(
                        "bitmap {base} of disk {} of vm {} is unusable: {problem:?}",
                        d.disk, req.vm
                    ),
                ));
            }
        }
        infos.push(info);
    }
    Ok(infos)
}

/// Starts `qemu-nbd` for each disk and returns the session that stops them.
pub async fn begin_offline_backup(req: OfflineRequest) -> Result<BackupSession> {
    let (vm, cp) = (req.vm.clone(), req.new_checkpoint.clone());
    let (exports, end) = open(req).await?;
    Ok(BackupSession::new(vm, exports, cp, Box::new(end)))
}

/// Adds the new bitmap and starts the exports; the returned release stops them.
pub(crate) async fn open(req: OfflineRequest) -> Result<(Vec<DiskExport>, OfflineEnd)> {
    let infos = inspect(&req).await?;
    let mut added = Vec::new();
    if let Some(cp) = &req.new_checkpoint {
        for d in req.disks.iter().filter(|d| d.tracked) {
            if let Err(e) = image::add_bitmap(&d.image, cp).await {
                remove_bitmaps(&added, cp).await;
                return Err(e);
            }
            added.push(d.image.clone());
        }
    }
    let mut servers = Servers {
        children: Vec::new(),
        sockets: Vec::new(),
    };
    let mut exports = Vec::new();
    for (d, info) in req.disks.iter().zip(&infos) {
        match serve(&req, d, &mut servers).await {
            Ok(socket) => exports.push(export_of(&req, d, info, socket)),
            Err(e) => {
                servers.stop().await;
                if let Some(cp) = &req.new_checkpoint {
                    remove_bitmaps(&added, cp).await;
                }
                return Err(e);
            }
        }
    }
    let end = OfflineEnd {
        servers,
        images: added,
        new_checkpoint: req.new_checkpoint,
    };
    Ok((exports, end))
}

fn export_of(
    req: &OfflineRequest,
    d: &OfflineDisk,
    info: &ImageInfo,
    socket: PathBuf,
) -> DiskExport {
    DiskExport {
        disk: d.disk.clone(),
        socket,
        tcp_port: None,
        export_name: d.disk.clone(),
        dirty_bitmap_context: req
            .incremental_from
            .as_ref()
            .filter(|_| d.tracked)
            .map(|b| format!("qemu:dirty-bitmap:{b}")),
        capacity: info.virtual_size,
    }
}

async fn serve(req: &OfflineRequest, d: &OfflineDisk, servers: &mut Servers) -> Result<PathBuf> {
    let socket = disk_socket(&req.socket, &d.disk);
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--read-only").arg("--persistent").arg("--shared=8");
    cmd.arg("--format").arg(&d.format);
    cmd.arg("--export-name")
        .arg(&d.disk)
        .arg("--socket")
        .arg(&socket);
    if let Some(base) = req.incremental_from.as_ref().filter(|_| d.tracked) {
        cmd.arg("--bitmap").arg(base);
    }
    cmd.arg(&d.image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("disk {} of vm {}", d.disk, req.vm);
    let child = cmd
        .spawn()
        .map_err(|e| io_failed(format!("cannot run qemu-nbd for {what} (make deps)"), e))?;
    servers.children.push(child);
    servers.sockets.push(socket.clone());
    let child = servers.children.last_mut().expect("just pushed");
    wait_for_socket(child, &socket, &what).await?;
    tracing::info!(socket = %socket.display(), "{what}: qemu-nbd export opened");
    Ok(socket)
}

/// Waits until `socket` accepts connections, or reports why `qemu-nbd` exited.
async fn wait_for_socket(child: &mut Child, socket: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = (&mut err).take(64 * 1024).read_to_string(&mut stderr).await;
            }
            return Err(exit_error(what, status, stderr.trim()));
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "qemu-nbd for {what} did not open {}",
                socket.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn exit_error(what: &str, status: std::process::ExitStatus, stderr: &str) -> Error {
    let kind = if stderr.contains("inconsistent") || stderr.contains("in use") {
        ErrorKind::Inconsistent
    } else {
        ErrorKind::Failed
    };
    Error::new(
        kind,
        format!("qemu-nbd for {what} exited ({status}): {stderr}"),
    )
}

async fn remove_bitmaps(images: &[PathBuf], bitmap: &str) {
    for image in images {
        if let Err(e) = image::remove_bitmap(image, bitmap).await {
            tracing::warn!(image = %image.display(), bitmap, error = %catalog::Chain(&e), "cannot remove the bitmap of a failed backup");
        }
    }
}

/// The running `qemu-nbd` processes and their sockets.
struct Servers {
    children: Vec<Child>,
    sockets: Vec<PathBuf>,
}

impl Servers {
    async fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
        self.children.clear();
        for s in self.sockets.drain(..) {
            let _ = std::fs::remove_file(s);
        }
    }

    fn stop_now(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for s in self.sockets.drain(..) {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Stops the exports; after a failure also removes the new checkpoint's bitmaps.
pub(crate) struct OfflineEnd {
    servers: Servers,
    images: Vec<PathBuf>,
    new_checkpoint: Option<String>,
}

impl Release for OfflineEnd {
    fn release(mut self: Box<Self>, success: bool) -> BoxFuture<Result<()>> {
        Box::pin(async move {
            self.servers.stop().await;
            if let (false, Some(cp)) = (success, &self.new_checkpoint) {
                remove_bitmaps(&self.images, cp).await;
            }
            Ok(())
        })
    }

    fn release_in_background(mut self: Box<Self>) {
        // Killing is immediate; the bitmap of the unfinished backup stays (a later backup
        // names its checkpoints uniquely and the job removes strays).
        self.servers.stop_now();
    }
}

/// A stopped VM's disk image opened for writing through one `qemu-nbd` (a restore writes it
/// over NBD, never behind QEMU's back). `qemu-nbd` holds the image's write lock, so the VM
/// cannot start while this is open. [`WritableImage::close`] ends it cleanly (SIGTERM: the
/// image and its persistent bitmaps are closed properly); dropping it kills it and logs.
#[derive(Debug)]
pub struct WritableImage {
    child: Option<Child>,
    socket: PathBuf,
    what: String,
}

/// Serves `image` (format `format`, e.g. `qcow2` or `raw`; never probed) writable as export
/// `disk` on `socket`; zero writes may deallocate.
pub async fn open_writable(
    vm: &str,
    disk: &str,
    image: &Path,
    format: &str,
    socket: &Path,
) -> Result<WritableImage> {
    validate_name("disk", disk)?;
    if !matches!(format, "qcow2" | "raw") {
        let msg = format!("disk {disk} of vm {vm} is {format}: only qcow2 and raw are written");
        return Err(Error::new(ErrorKind::Unsupported, msg));
    }
    let _ = std::fs::remove_file(socket);
    let what = format!("disk {disk} of vm {vm}");
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--persistent")
        .arg("--shared=2")
        .arg("--discard=unmap");
    cmd.arg("--format")
        .arg(format)
        .arg("--export-name")
        .arg(disk);
    cmd.arg("--socket").arg(socket).arg(image);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| io_failed(format!("cannot run qemu-nbd for {what} (make deps)"), e))?;
    let mut w = WritableImage {
        child: Some(child),
        socket: socket.to_path_buf(),
        what,
    };
    let child = w.child.as_mut().expect("just set");
    wait_for_socket(child, socket, &w.what).await?;
    tracing::info!(socket = %socket.display(), "{}: writable qemu-nbd export opened", w.what);
    Ok(w)
}

/// How long `qemu-nbd` may take to close the image after SIGTERM.
const CLOSE: Duration = Duration::from_secs(60);

impl WritableImage {
    /// The unix socket serving the image.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Ends `qemu-nbd` with SIGTERM and waits until it has closed the image.
    pub async fn close(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = std::fs::remove_file(&self.socket);
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid of our own child that has not been reaped yet (we
            // hold its `Child` and have not waited on it), so the pid cannot be reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let status = match tokio::time::timeout(CLOSE, child.wait()).await {
            Ok(s) => {
                s.map_err(|e| io_failed(format!("waiting for qemu-nbd of {}", self.what), e))?
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(failed(format!(
                    "qemu-nbd of {} did not close the image",
                    self.what
                )));
            }
        };
        if !status.success() {
            return Err(failed(format!(
                "qemu-nbd of {} exited ({status})",
                self.what
            )));
        }
        tracing::info!("{}: writable qemu-nbd export closed", self.what);
        Ok(())
    }
}

impl Drop for WritableImage {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            tracing::error!(
                "{}: writable export dropped without close; killing qemu-nbd",
                self.what
            );
            let _ = child.start_kill();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_per_disk() {
        assert_eq!(
            disk_socket(Path::new("/run/s/vm1.sock"), "vda"),
            PathBuf::from("/run/s/vm1.sock.vda")
        );
    }
}
