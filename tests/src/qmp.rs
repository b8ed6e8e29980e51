//! Plain QEMU for the QMP adapter's tests, outside libvirt: `qemu-storage-daemon` and a TCG
//! `qemu-system-x86_64` with no OS, each on one qcow2 image (node `disk0`), with QMP monitors
//! on unix sockets, killed and reaped on drop; writes through the guest device's own block
//! backend; and the adapter-side helpers those tests share (backup requests, checkpoint
//! names).
//!
//! It does not own NBD peers (see [`crate::peers`]) nor libvirt domains (see [`crate::vm`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use proxy::hypervisor::qmp::{QmpClient, QmpHypervisor};
use proxy::hypervisor::{BackupRequest, Hypervisor};

use crate::image::{create_qcow2, qemu_io};
use crate::peers::require;
use crate::scratch::ScratchDir;

/// A QEMU process killed (and reaped) on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Kills the process with SIGKILL now (as a crash would) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 20 s) until the unix socket `socket` accepts a connection.
pub fn wait_socket(socket: &Path) -> Result<()> {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{} never opened", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `--blockdev` options opening `image` as qcow2 node `disk0` (over file node `file0`).
pub fn blockdev_args(image: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={}", image.display()),
        "--blockdev".into(),
        "driver=qcow2,node-name=disk0,file=file0".into(),
    ]
}

/// Starts `program ARGS...` and waits until its QMP socket `qmp` accepts connections.
pub fn spawn(program: &str, args: &[String], qmp: &Path) -> Result<Proc> {
    for tool in [program, "qemu-img", "qemu-io", "nbdinfo"] {
        require(tool)?;
    }
    let _ = std::fs::remove_file(qmp);
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    wait_socket(qmp)?;
    Ok(proc)
}

/// `qemu-storage-daemon` with `image` as node `disk0` and a QMP monitor on `qmp`.
pub fn qsd(image: &Path, qmp: &Path) -> Result<Proc> {
    let mut args = blockdev_args(image);
    args.extend([
        "--chardev".into(),
        format!("socket,id=qmp0,path={},server=on,wait=off", qmp.display()),
        "--monitor".into(),
        "chardev=qmp0".into(),
    ]);
    spawn("qemu-storage-daemon", &args, qmp)
}

/// A TCG QEMU (no OS) with the disk on a virtio device `vda` and two QMP sockets.
pub fn qemu(image: &Path, qmp: &Path, qmp2: &Path) -> Result<Proc> {
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-M",
        "pc",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
    ]
    .map(String::from)
    .to_vec();
    args.extend(
        blockdev_args(image)
            .into_iter()
            .map(|a| a.replacen("--", "-", 1)),
    );
    args.extend(["-device".into(), "virtio-blk-pci,drive=disk0,id=vda".into()]);
    for sock in [qmp, qmp2] {
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", sock.display()),
        ]);
    }
    let _ = std::fs::remove_file(qmp2);
    let proc = spawn("qemu-system-x86_64", &args, qmp)?;
    wait_socket(qmp2)?;
    Ok(proc)
}

/// Writes `len` bytes of `byte` at `offset` through the guest device's block backend, over a
/// second QMP monitor (the only writer QEMU allows while the device holds the disk).
pub async fn guest_write(c: &mut QmpClient, offset: u64, len: u64, byte: u8) -> Result<()> {
    let line = format!(
        "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P {byte} {offset} {len}\""
    );
    let out = c
        .execute_value(
            "human-monitor-command",
            serde_json::json!({"command-line": line}),
        )
        .await?;
    let out = out.as_str().unwrap_or_default();
    if !out.is_empty() && !out.contains("wrote") {
        bail!("guest write failed: {out}");
    }
    Ok(())
}

/// A running [`qemu`] on a fresh image in its own scratch directory: `disk0.qcow2`, the
/// adapter's monitor `qmp.sock` and the writer's monitor `qmp2.sock`. Dropping it kills QEMU,
/// then removes the directory.
#[derive(Debug)]
pub struct PlainQemu {
    _qemu: Proc,
    dir: ScratchDir,
    image: PathBuf,
}

impl PlainQemu {
    /// Creates `SCRATCH/TAG-PID` with a qcow2 image of `size` bytes, runs the `qemu-io`
    /// commands `prepare` on it (e.g. `write -P 0xaa 0 1M`), then starts QEMU on it.
    pub fn start(tag: &str, size: u64, prepare: &[&str]) -> Result<PlainQemu> {
        let dir = ScratchDir::create(&format!("{tag}-{}", std::process::id()))?;
        let image = dir.path().join("disk0.qcow2");
        create_qcow2(&image, size)?;
        for cmd in prepare {
            qemu_io(&image, cmd)?;
        }
        let (qmp, qmp2) = (dir.path().join("qmp.sock"), dir.path().join("qmp2.sock"));
        let qemu = qemu(&image, &qmp, &qmp2)?;
        Ok(PlainQemu {
            _qemu: qemu,
            dir,
            image,
        })
    }

    /// The adapter on the first monitor (its VM named `vm`) and a client on the second, for
    /// [`guest_write`].
    pub async fn connect(&self, vm: &str) -> Result<(QmpHypervisor, QmpClient)> {
        let hv = QmpHypervisor::connect(&self.dir.path().join("qmp.sock"), vm).await?;
        let writer = QmpClient::connect(&self.dir.path().join("qmp2.sock")).await?;
        Ok((hv, writer))
    }

    /// The scratch directory (reachable by QEMU): put sockets and work files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The qcow2 image behind `disk0`.
    pub fn image(&self) -> &Path {
        &self.image
    }
}

/// A backup request for one disk of `vm`, with scratch files in `dir` and the NBD socket
/// `dir/nbd.sock`: a full one when `from` is `None`, a new checkpoint when `new` is given.
pub fn backup_request(
    vm: &str,
    disk: &str,
    dir: &Path,
    from: Option<&str>,
    new: Option<&str>,
) -> BackupRequest {
    BackupRequest {
        vm: vm.into(),
        disks: vec![disk.into()],
        incremental_from: from.map(String::from),
        new_checkpoint: new.map(String::from),
        scratch_dir: Some(dir.to_path_buf()),
        full_disks: Vec::new(),
        socket: dir.join("nbd.sock"),
        tcp: None,
    }
}

/// The names of `vm`'s checkpoints as adapter `hv` lists them, oldest first.
pub async fn checkpoint_names<H: Hypervisor>(hv: &H, vm: &str) -> Result<Vec<String>> {
    Ok(hv
        .list_checkpoints(vm)
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect())
}
