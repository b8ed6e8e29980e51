//! Throwaway test VMs: a uniquely named TCG libvirt domain booting the test guest with N qcow2
//! disks, driven through the guest's command agent, and torn down completely on drop.
//!
//! Owns the domain's life: its name (`sluice-t-PREFIX-PID-SEQ`), scratch directory, disk
//! images, domain XML, start, command channel, shutdown and teardown (destroy, checkpoint
//! metadata, undefine, leftover QEMU processes, files). Teardown runs in `Drop`, so it also
//! runs when a test panics (unwinding). Domains left by test processes that died without
//! unwinding (`kill -9`) are swept by the next `TestVm::boot` on the machine.

use crate::channel::Channel;
use crate::image::{create_qcow2, guest_image, read_image};
use crate::libvirt::{domain_names, ensure_libvirt, qemu_pids_of, virsh, virsh_lines};
use crate::scratch::{scratch_entries, ScratchDir, SCRATCH_ROOT};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Every test domain's name starts with this.
pub const NAME_PREFIX: &str = "sluice-t-";

const BOOT_LIMIT: Duration = Duration::from_secs(180);
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Short name part, `[a-z0-9-]`, at most 24 characters; names the test.
    pub prefix: String,
    /// Virtual size of each disk in bytes, in target order (vda, vdb, ...).
    pub disk_sizes: Vec<u64>,
    /// Give the guest a `org.qemu.guest_agent.0` channel so `qemu-ga` runs.
    pub guest_agent: bool,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Disks given as raw libvirt `<disk>` XML with their virtual sizes (e.g. an NBD network
    /// disk). They take the first targets (vda, ...), before the qcow2 disks; each XML must
    /// name its target.
    pub raw_disks: Vec<(u64, String)>,
    /// Indexes into `disk_sizes` of the disks whose image is a raw file instead of qcow2.
    pub raw_images: Vec<usize>,
}

impl VmSpec {
    /// A spec with no disks yet, no guest agent, 256 MiB of memory.
    pub fn new(prefix: &str) -> VmSpec {
        VmSpec {
            prefix: prefix.to_string(),
            disk_sizes: Vec::new(),
            guest_agent: false,
            memory_mib: 256,
            raw_disks: Vec::new(),
            raw_images: Vec::new(),
        }
    }

    /// Adds a disk of `size` bytes whose image is a raw file (`<driver type='raw'/>`): it
    /// can carry no dirty bitmap.
    pub fn raw_image(mut self, size: u64) -> VmSpec {
        self.raw_images.push(self.disk_sizes.len());
        self.disk_sizes.push(size);
        self
    }

    /// Adds a disk of `size` bytes (the next target: vda, vdb, ...).
    pub fn disk(mut self, size: u64) -> VmSpec {
        self.disk_sizes.push(size);
        self
    }

    /// Adds a disk of `size` bytes given as raw `<disk>` XML (see [`VmSpec::raw_disks`]).
    pub fn raw_disk(mut self, size: u64, xml: &str) -> VmSpec {
        self.raw_disks.push((size, xml.to_string()));
        self
    }

    /// Turns the qemu-guest-agent channel on or off.
    pub fn guest_agent(mut self, on: bool) -> VmSpec {
        self.guest_agent = on;
        self
    }

    fn validate(&self) -> Result<()> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if self.prefix.is_empty() || self.prefix.len() > 24 || !self.prefix.chars().all(ok_char) {
            bail!(
                "vm prefix {:?} must be 1-24 characters of [a-z0-9-]",
                self.prefix
            );
        }
        let count = self.disk_sizes.len() + self.raw_disks.len();
        if count == 0 || count > 20 {
            bail!("vm {} needs 1 to 20 disks", self.prefix);
        }
        if let Some(s) = self
            .disk_sizes
            .iter()
            .chain(self.raw_disks.iter().map(|(s, _)| s))
            .find(|s| **s == 0 || !s.is_multiple_of(512))
        {
            bail!(
                "disk size {s} of vm {} is not a positive multiple of 512",
                self.prefix
            );
        }
        Ok(())
    }
}

/// One disk of a test VM.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Guest target name: `vda`, `vdb`, ...
    pub target: String,
    /// The image on the host (empty for a disk given as raw XML).
    pub path: PathBuf,
    /// Its format: `qcow2`, or `raw` ([`VmSpec::raw_image`]; also for raw XML).
    pub format: &'static str,
    /// Virtual size in bytes.
    pub size: u64,
}

/// A running (or shut off) test VM. Dropping it removes every trace of it.
pub struct TestVm {
    name: String,
    disks: Vec<Disk>,
    guest_agent: bool,
    raw_xml: Vec<String>,
    channel: Mutex<Option<Channel>>,
    // Dropped after `Drop::drop` has torn the domain down.
    scratch: ScratchDir,
}

impl TestVm {
    /// Defines and starts a new domain for `spec` and waits until its agent answers.
    pub fn boot(spec: VmSpec) -> Result<TestVm> {
        spec.validate()?;
        ensure_libvirt()?;
        SWEEP.call_once(sweep_dead);
        let image = guest_image()?;
        if spec.guest_agent && !image.has_qemu_ga {
            bail!("the test guest was built without qemu-ga: see target/test-guest/build.log");
        }
        let name = format!(
            "{NAME_PREFIX}{}-{}-{}",
            spec.prefix,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let scratch = ScratchDir::create(&name)?;
        let mut disks = raw_disks(&spec.raw_disks);
        disks.extend(make_disks(
            scratch.path(),
            disks.len(),
            &spec.disk_sizes,
            &spec.raw_images,
        )?);
        let vm = TestVm {
            disks,
            name,
            guest_agent: spec.guest_agent,
            raw_xml: spec.raw_disks.iter().map(|(_, x)| x.clone()).collect(),
            channel: Mutex::new(None),
            scratch,
        };
        std::fs::copy(&image.kernel, vm.scratch.path().join("vmlinuz"))?;
        std::fs::copy(&image.initrd, vm.scratch.path().join("initrd.img"))?;
        let xml_path = vm.scratch.path().join("domain.xml");
        std::fs::write(&xml_path, vm.domain_xml(spec.memory_mib))?;
        virsh(&["define", path_str(&xml_path)?])?;
        vm.start()?;
        Ok(vm)
    }

    /// Starts the (shut off) domain again and waits until its agent answers.
    pub fn start(&self) -> Result<()> {
        let mut channel = self.lock_channel();
        *channel = None;
        virsh(&["start", &self.name])?;
        let mut ch = Channel::connect(&self.agent_socket(), Duration::from_secs(30))?;
        ch.wait_ready(BOOT_LIMIT).with_context(|| {
            format!(
                "vm {} did not boot; console:\n{}",
                self.name,
                self.console_tail()
            )
        })?;
        *channel = Some(ch);
        Ok(())
    }

    /// The libvirt domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scratch directory (usable by `libvirt-qemu`) holding this VM's files; put the
    /// test's own sockets and scratch images here too.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The disks, in target order.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The host path of the qcow2 image behind `target` (e.g. "vda").
    pub fn disk_path(&self, target: &str) -> Result<&Path> {
        Ok(&self.disk(target)?.path)
    }

    /// Whether this VM was given a qemu-guest-agent channel.
    pub fn has_guest_agent(&self) -> bool {
        self.guest_agent
    }

    /// Runs `virsh ARGS...` (against `qemu:///system`) and returns its stdout.
    pub fn virsh<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        virsh(args)
    }

    /// The names of the domain's libvirt checkpoints (`virsh checkpoint-list --name`).
    pub fn checkpoints(&self) -> Result<Vec<String>> {
        virsh_lines(&["checkpoint-list", "--name", &self.name])
    }

    /// libvirt's state of the domain: "running", "shut off", ...
    pub fn state(&self) -> Result<String> {
        Ok(virsh(&["domstate", &self.name])?.trim().to_string())
    }

    /// Writes the deterministic pattern of `seed` (see [`crate::pattern()`]) at
    /// `offset..offset + len` of `disk`; 512-byte aligned.
    pub fn write_pattern(&self, disk: &str, offset: u64, len: u64, seed: u64) -> Result<()> {
        self.check_range(disk, offset, len)?;
        self.call(
            &format!("write {disk} {offset} {len} {seed}"),
            io_limit(len),
        )?;
        Ok(())
    }

    /// Discards (BLKDISCARD) `offset..offset + len` of `disk`; 512-byte aligned.
    pub fn discard(&self, disk: &str, offset: u64, len: u64) -> Result<()> {
        self.check_range(disk, offset, len)?;
        self.call(&format!("discard {disk} {offset} {len}"), io_limit(len))?;
        Ok(())
    }

    /// Flushes every disk of the guest to the host.
    pub fn sync(&self) -> Result<()> {
        self.call("sync", Duration::from_secs(60))?;
        Ok(())
    }

    /// SHA-256 (lowercase hex) of `offset..offset + len` of `disk`, computed inside the guest.
    pub fn checksum(&self, disk: &str, offset: u64, len: u64) -> Result<String> {
        self.check_range(disk, offset, len)?;
        self.call(&format!("sum {disk} {offset} {len}"), io_limit(len))
    }

    /// Makes an ext2 filesystem on all of `disk` (for filesystem-freeze tests).
    pub fn mkfs(&self, disk: &str) -> Result<()> {
        self.disk(disk)?;
        self.call(&format!("mkfs {disk}"), Duration::from_secs(120))?;
        Ok(())
    }

    /// Mounts `disk`'s ext2 filesystem at `/mnt/DISK` in the guest.
    pub fn mount(&self, disk: &str) -> Result<()> {
        self.disk(disk)?;
        self.call(&format!("mount {disk}"), Duration::from_secs(60))?;
        Ok(())
    }

    /// Unmounts `/mnt/DISK` in the guest.
    pub fn umount(&self, disk: &str) -> Result<()> {
        self.disk(disk)?;
        self.call(&format!("umount {disk}"), Duration::from_secs(60))?;
        Ok(())
    }

    /// Writes `len` bytes (512-aligned) of the pattern of `seed`, as if at offset 0, into
    /// the file `/mnt/DISK/NAME` and fsyncs it.
    pub fn write_file(&self, disk: &str, name: &str, len: u64, seed: u64) -> Result<()> {
        self.disk(disk)?;
        self.call(
            &format!("writefile {disk} {name} {len} {seed}"),
            io_limit(len),
        )?;
        Ok(())
    }

    /// Sends a raw agent command line and returns the text after `ok`.
    pub fn command(&self, line: &str) -> Result<String> {
        self.call(line, Duration::from_secs(120))
    }

    /// Sends a qemu-guest-agent command (JSON) through libvirt and returns its answer.
    pub fn guest_agent_command(&self, json: &str) -> Result<String> {
        if !self.guest_agent {
            bail!("vm {} has no guest agent channel", self.name);
        }
        virsh(&["qemu-agent-command", &self.name, json, "--timeout", "10"])
    }

    /// Powers the guest off from inside (after a sync) and waits until libvirt reports the
    /// domain shut off.
    pub fn shutdown(&self) -> Result<()> {
        let mut channel = self.lock_channel();
        if let Some(ch) = channel.as_mut() {
            // The answer may be lost as the VM goes down; the state below is what counts.
            let _ = ch.call("poweroff", Duration::from_secs(30));
        }
        *channel = None;
        let start = Instant::now();
        while start.elapsed() < SHUTDOWN_LIMIT {
            if self.state()? == "shut off" {
                return Ok(());
            }
            sleep(Duration::from_millis(100));
        }
        bail!(
            "vm {} did not power off within {SHUTDOWN_LIMIT:?}",
            self.name
        )
    }

    /// Kills the guest's QEMU with SIGKILL (an unclean stop: its persistent bitmaps stay
    /// marked in use) and waits until libvirt reports the domain shut off.
    pub fn kill_unclean(&self) -> Result<()> {
        *self.lock_channel() = None;
        for pid in qemu_pids_of(&self.name) {
            // SAFETY: kill(2) with a pid read from /proc and a valid signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let start = Instant::now();
        while self.state()? != "shut off" {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("vm {} still {} after SIGKILL", self.name, self.state()?);
            }
            sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `disk`'s image from outside the guest (`qemu-img`
    /// with force-share, so it works while the VM runs, but is only sure to see flushed
    /// writes; after [`TestVm::shutdown`] it sees everything).
    pub fn read_disk(&self, disk: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(disk, offset, len)?;
        read_image(&self.disk(disk)?.path, "qcow2", offset, len)
    }

    /// The last lines of the guest's serial console (ttyS0) log.
    pub fn console_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.scratch.path().join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn disk(&self, target: &str) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .with_context(|| format!("vm {} has no disk {target}", self.name))
    }

    fn check_range(&self, disk: &str, offset: u64, len: u64) -> Result<()> {
        let d = self.disk(disk)?;
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) || end.is_none_or(|e| e > d.size)
        {
            bail!(
                "range {offset}+{len} of disk {disk} (size {}) of vm {} is not 512-aligned inside the disk",
                d.size,
                self.name
            );
        }
        Ok(())
    }

    fn call(&self, line: &str, limit: Duration) -> Result<String> {
        let mut channel = self.lock_channel();
        let ch = channel
            .as_mut()
            .with_context(|| format!("vm {} is not running", self.name))?;
        ch.call(line, limit)
            .with_context(|| format!("vm {}: `{line}`", self.name))
    }

    fn lock_channel(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn agent_socket(&self) -> PathBuf {
        self.scratch.path().join("agent.sock")
    }

    fn domain_xml(&self, memory_mib: u32) -> String {
        let dir = self.scratch.path().display().to_string();
        let mut x = String::new();
        let _ = writeln!(
            x,
            "<domain type='qemu'>\n  <name>{}</name>",
            esc(&self.name)
        );
        let _ = writeln!(
            x,
            "  <memory unit='MiB'>{memory_mib}</memory>\n  <vcpu>1</vcpu>"
        );
        let _ = writeln!(x, "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>");
        let _ = writeln!(x, "    <kernel>{}/vmlinuz</kernel>", esc(&dir));
        let _ = writeln!(x, "    <initrd>{}/initrd.img</initrd>", esc(&dir));
        x.push_str("    <cmdline>console=ttyS0 panic=-1 mitigations=off</cmdline>\n  </os>\n");
        x.push_str("  <features><acpi/></features>\n");
        x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n");
        x.push_str("  <on_crash>destroy</on_crash>\n  <devices>\n");
        for r in &self.raw_xml {
            let _ = writeln!(x, "    {}", r.trim());
        }
        for d in &self.disks[self.raw_xml.len()..] {
            x.push_str(&disk_xml(d));
        }
        let _ = writeln!(
            x,
            "    <serial type='file'><source path='{}/console.log'/><target port='0'/></serial>",
            esc(&dir)
        );
        let _ = writeln!(
            x,
            "    <serial type='unix'><source mode='bind' path='{}'/><target port='1'/></serial>",
            esc(&self.agent_socket().display().to_string())
        );
        if self.guest_agent {
            x.push_str("    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n");
        }
        x.push_str("    <memballoon model='none'/>\n  </devices>\n</domain>\n");
        x
    }
}

// Tests share one VM between threads (`Arc<TestVm>`): keep it Send + Sync.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<TestVm>();
};

impl Drop for TestVm {
    fn drop(&mut self) {
        *self.lock_channel() = None;
        teardown_domain(&self.name);
    }
}

fn disk_xml(d: &Disk) -> String {
    format!(
        "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}' discard='unmap'/>\n      <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
        d.format,
        esc(&d.path.display().to_string()),
        esc(&d.target)
    )
}

fn target_name(i: usize) -> String {
    format!("vd{}", (b'a' + i as u8) as char)
}

/// The disks given as raw XML: targets from vda, no image path.
fn raw_disks(raw: &[(u64, String)]) -> Vec<Disk> {
    raw.iter()
        .enumerate()
        .map(|(i, (size, _))| Disk {
            target: target_name(i),
            path: PathBuf::new(),
            format: "raw",
            size: *size,
        })
        .collect()
}

fn make_disks(dir: &Path, first: usize, sizes: &[u64], raw: &[usize]) -> Result<Vec<Disk>> {
    let mut disks = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let target = target_name(first + i);
        let format = if raw.contains(&i) { "raw" } else { "qcow2" };
        let path = dir.join(format!("{target}.{format}"));
        if format == "raw" {
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(*size))
                .with_context(|| format!("creating {}", path.display()))?;
        } else {
            create_qcow2(&path, *size)?;
        }
        disks.push(Disk {
            target,
            path,
            format,
            size: *size,
        });
    }
    Ok(disks)
}

/// Time allowed for an agent command touching `len` bytes under TCG.
fn io_limit(len: u64) -> Duration {
    Duration::from_secs(60 + len / (1 << 20))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not utf-8", p.display()))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// Removes domain `name` from libvirt, whatever its state: aborts jobs, destroys it, deletes
/// its checkpoint metadata, undefines it and kills a QEMU process that outlived all that.
/// Never fails; problems are printed to stderr.
pub fn teardown_domain(name: &str) {
    let _ = virsh(&["domjobabort", name]);
    let _ = virsh(&["destroy", name]);
    if let Ok(list) = virsh(&["checkpoint-list", name, "--name"]) {
        for cp in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Err(e) = virsh(&["checkpoint-delete", name, cp, "--metadata"]) {
                eprintln!("testbed: {e:#}");
            }
        }
    }
    if virsh(&["undefine", name, "--checkpoints-metadata"]).is_err() {
        if let Err(e) = virsh(&["undefine", name]) {
            if domain_names().is_ok_and(|n| n.iter().any(|d| d == name)) {
                eprintln!("testbed: {e:#}");
            }
        }
    }
    kill_leftover_qemu(name);
}

fn kill_leftover_qemu(name: &str) {
    let start = Instant::now();
    while !qemu_pids_of(name).is_empty() && start.elapsed() < Duration::from_secs(10) {
        sleep(Duration::from_millis(100));
    }
    for pid in qemu_pids_of(name) {
        eprintln!("testbed: killing leftover qemu {pid} of {name}");
        // SAFETY: kill(2) with a pid read from /proc and a valid signal number has no
        // memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The pid embedded in a test domain or scratch name `sluice-t-PREFIX-PID-SEQ`.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let _seq: u32 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the domains and scratch directories of test processes that no longer exist
/// (killed without unwinding). `TestVm::boot` runs it once per process.
pub fn sweep_dead() {
    let dead = |n: &String| owner_pid(n).is_some_and(|p| !pid_alive(p));
    for name in domain_names()
        .unwrap_or_default()
        .iter()
        .filter(|n| dead(n))
    {
        eprintln!("testbed: removing stale domain {name}");
        teardown_domain(name);
    }
    for entry in scratch_entries().iter().filter(|n| dead(n)) {
        let _ = std::fs::remove_dir_all(Path::new(SCRATCH_ROOT).join(entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_parsed_from_names() {
        assert_eq!(owner_pid("sluice-t-two-disks-1234-7"), Some(1234));
        assert_eq!(owner_pid("sluice-t-x-1-0"), Some(1));
        assert_eq!(owner_pid("other-1234-7"), None);
        assert_eq!(owner_pid("sluice-t-x-y"), None);
    }

    #[test]
    fn specs_are_validated() {
        assert!(VmSpec::new("ok-name").disk(1 << 20).validate().is_ok());
        assert!(VmSpec::new("Bad").disk(1 << 20).validate().is_err());
        assert!(VmSpec::new("../x").disk(1 << 20).validate().is_err());
        assert!(VmSpec::new("nodisk").validate().is_err());
        assert!(VmSpec::new("odd").disk(1000).validate().is_err());
    }
}
