//! Shared helpers of the hypervisor adapter tests (included with `#[path]`): a SeaBIOS-only
//! TCG domain with qcow2 disks (no OS needed: it is "running", which is enough for
//! checkpoints and pull-mode backups), writes into its disks through the device's own block
//! backend, and NBD inspection with `nbdinfo` / `qemu-img compare`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proxy::hypervisor::qmp::QmpClient;
use std::process::{Child, Stdio};
use testbed::{ensure_libvirt, teardown_domain, virsh, ScratchDir};

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;

/// Fails (never skips) when a tool is missing.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(found, "{tool} is not installed: run `make deps`");
    }
}

/// Runs a command and returns stdout, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn qemu_io(image: &Path, cmd: &str) -> Result<()> {
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", cmd, &image.to_string_lossy()],
    )
    .map(drop)
}

pub use testbed::image::create_qcow2;

/// A TCG domain that sits in SeaBIOS, with qcow2 disks `vda`, `vdb`, ... in a scratch dir.
/// Dropping it removes the domain, its checkpoints and its files.
pub struct BiosVm {
    pub name: String,
    pub dir: ScratchDir,
    pub disks: Vec<(String, PathBuf)>,
}

impl BiosVm {
    /// Creates the images (`prepare` may write into them offline) and defines the domain.
    pub fn define(
        tag: &str,
        sizes: &[u64],
        prepare: impl FnOnce(&[(String, PathBuf)]) -> Result<()>,
    ) -> Result<Self> {
        require_tools(&[
            "virsh",
            "qemu-img",
            "qemu-io",
            "nbdinfo",
            "qemu-nbd",
            "qemu-system-x86_64",
        ]);
        ensure_libvirt()?;
        let name = format!("{}hv-{tag}-{}", testbed::NAME_PREFIX, std::process::id());
        teardown_domain(&name);
        let dir = ScratchDir::create(&name)?;
        let mut disks = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let target = format!("vd{}", (b'a' + i as u8) as char);
            let path = dir.path().join(format!("{target}.qcow2"));
            create_qcow2(&path, *size)?;
            disks.push((target, path));
        }
        prepare(&disks)?;
        let vm = Self { name, dir, disks };
        let xml = vm.dir.path().join("domain.xml");
        std::fs::write(&xml, vm.domain_xml())?;
        virsh(&["define", &xml.to_string_lossy()])?;
        Ok(vm)
    }

    fn domain_xml(&self) -> String {
        let mut disks = String::new();
        for (target, path) in &self.disks {
            disks.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
                path.display()
            ));
        }
        format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{disks}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             </devices></domain>",
            self.name
        )
    }

    pub fn start(&self) -> Result<()> {
        virsh(&["start", &self.name]).map(drop)
    }

    pub fn image(&self, target: &str) -> &Path {
        &self
            .disks
            .iter()
            .find(|(t, _)| t == target)
            .expect("known disk")
            .1
    }

    /// Writes `len` bytes of `byte` at `offset` of a running disk, through the guest device's
    /// own block backend (the only writer QEMU allows while the device holds the disk).
    pub fn write(&self, target: &str, offset: u64, len: u64, byte: u8) -> Result<()> {
        let index = self
            .disks
            .iter()
            .position(|(t, _)| t == target)
            .expect("known disk");
        let cmd = format!(
            "qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend \"write -P {byte} {offset} {len}\""
        );
        let out = virsh(&["qemu-monitor-command", &self.name, "--hmp", &cmd])?;
        if !out.trim().is_empty() && !out.contains("wrote") {
            bail!("write into {target} of {}: {out}", self.name);
        }
        Ok(())
    }

    /// The pid of the domain's QEMU.
    pub fn qemu_pid(&self) -> Result<i32> {
        let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name))?;
        Ok(pid.trim().parse()?)
    }

    pub fn state(&self) -> Result<String> {
        Ok(virsh(&["domstate", &self.name])?.trim().to_string())
    }

    pub fn wait_state(&self, want: &str) -> Result<()> {
        let start = Instant::now();
        while self.state()? != want {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("{} never reached state {want}", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for BiosVm {
    fn drop(&mut self) {
        teardown_domain(&self.name);
    }
}

pub fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Extents `(offset, length, type)` that `nbdinfo --map=CONTEXT` reports.
pub fn nbd_map(socket: &Path, export: &str, context: &str) -> Result<Vec<(u64, u64, u64)>> {
    let out = run(
        "nbdinfo",
        &[
            "--json",
            &format!("--map={context}"),
            &nbd_uri(socket, export),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let extents = v.as_array().context("nbdinfo map is not an array")?;
    Ok(extents
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
                e["type"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// The extents of `map` with type bit `bit` set, merged.
pub fn extents_with(map: &[(u64, u64, u64)], bit: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, ty) in map {
        if ty & bit == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Dirty extents of a `qemu:dirty-bitmap:` context.
pub fn dirty_extents(socket: &Path, export: &str, context: &str) -> Result<Vec<(u64, u64)>> {
    Ok(extents_with(&nbd_map(socket, export, context)?, 1))
}

/// Data (non-hole) extents of `base:allocation`.
pub fn data_extents(socket: &Path, export: &str) -> Result<Vec<(u64, u64)>> {
    let map = nbd_map(socket, export, "base:allocation")?;
    let data: Vec<_> = map
        .iter()
        .map(|&(o, l, t)| (o, l, if t & 1 == 0 { 1 } else { 0 }))
        .collect();
    Ok(extents_with(&data, 1))
}

/// Whether an NBD export holds exactly the bytes of `image` (qcow2).
pub fn export_equals(image: &Path, socket: &Path, export: &str) -> Result<()> {
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &image.to_string_lossy(),
            &nbd_uri(socket, export),
        ],
    )
    .map(drop)
}

/// Names of files left in `dir` that contain `needle`.
pub fn files_with(dir: &Path, needle: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

/// The persistent bitmaps of an image, with their flags (`qemu-img info -U`).
pub fn image_bitmaps(image: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let out = run(
        "qemu-img",
        &["info", "-U", "--output=json", &image.to_string_lossy()],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let list = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .map(|b| {
            let flags = b["flags"].as_array().map(|f| {
                f.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            });
            (
                b["name"].as_str().unwrap_or("").to_string(),
                flags.unwrap_or_default(),
            )
        })
        .collect())
}

/// A QEMU process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

pub fn blockdev_args(image: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={}", image.display()),
        "--blockdev".into(),
        "driver=qcow2,node-name=disk0,file=file0".into(),
    ]
}

pub fn spawn(program: &str, args: &[String], qmp: &Path) -> Result<Proc> {
    require_tools(&[program, "qemu-img", "qemu-io", "nbdinfo"]);
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

/// Writes through the guest device's block backend, over a second QMP monitor.
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
