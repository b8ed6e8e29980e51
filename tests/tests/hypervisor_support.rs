//! Shared helpers of the hypervisor adapter tests (included with `#[path]`): a SeaBIOS-only
//! TCG domain with qcow2 disks (no OS needed: it is "running", which is enough for
//! checkpoints and pull-mode backups), writes into its disks through the device's own block
//! backend, and NBD inspection with `nbdinfo` / `qemu-img compare`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
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

// Not every test file that includes this module uses every helper.
#[allow(unused_imports)]
pub use testbed::image::{create_qcow2, qemu_io};
pub use testbed::peers::run;

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

#[allow(unused_imports)]
pub use testbed::inspect::{data_extents, dirty_extents, export_equals};

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
