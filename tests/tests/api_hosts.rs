//! One `sluice serve` in front of several hypervisors at once: a booted libvirt test VM
//! (`qemu:///system`, the config's top-level `libvirt_uri`, hypervisor `default`), a plain
//! QEMU reached by its QMP socket (hypervisor `plain`) and a libvirt host that does not exist
//! (`gone`). The daemon starts although `gone` is down, lists the VMs of both others while
//! naming `gone` unreachable, backs up one VM on each, and each backup restored to qcow2
//! equals its disk.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::daemon::Daemon;
use testbed::inspect::compare_images;
use testbed::qmp::PlainQemu;
use testbed::{Model, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// `GET /api/v1/hypervisors` (the CLI has no verb for it), over the daemon's TLS, pinned to its
/// own certificate.
fn hypervisors(d: &Daemon) -> Result<Value> {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(d.data.join("tls-cert.pem"))
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", d.token))
        .arg(format!(
            "{}/api/v1/hypervisors",
            d.url.replace("127.0.0.1", "localhost")
        ))
        .output()
        .context("running curl (make deps)")?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Backs up `vm` in full with `--wait`; returns the job.
fn backup(d: &Daemon, vm: &str) -> Result<Value> {
    let job = d.ok(&["backup", vm, "--full", "--wait"])?;
    ensure!(job["state"] == "succeeded", "backup of {vm}: {job}");
    Ok(job)
}

/// Restores backup `id` to `DATA/restores/NAME.qcow2` and compares it with the raw `want`.
fn restore_equals(d: &Daemon, id: &str, name: &str, want: &Path) -> Result<()> {
    let q = d.data.join("restores").join(format!("{name}.qcow2"));
    let q = q.to_str().context("path")?;
    let job = d.ok(&["restore", id, "--to", q, "--format", "qcow2"])?;
    ensure!(job["state"] == "succeeded", "restore of {id}: {job}");
    compare_images(q, "qcow2", want.to_str().context("path")?, "raw")
}

#[test]
fn one_daemon_backs_up_a_libvirt_vm_and_a_qmp_qemu_while_a_third_host_is_down() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("api-hosts").disk(SIZE))?;
    let disk = vm.disks()[0].target.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, &disk, 0, 2 * MIB, 7)?;
    vm.sync()?;
    let qemu = PlainQemu::start("api-hosts", SIZE, &["write -P 0xaa 0 1M"])?;
    let dir = tempfile::tempdir()?;
    let extra = format!(
        "[[hypervisors]]\nname = \"plain\"\nsocket = {:?}\nvm = \"plainvm\"\n\n\
         [[hypervisors]]\nname = \"gone\"\nlibvirt_uri = \"qemu+ssh://nonexistent.invalid/system\"\n",
        qemu.dir().join("qmp.sock")
    );
    let d = Daemon::start(dir.path(), &extra)?;

    let list = d.ok(&["vm", "list"])?;
    let vms: Vec<(String, String)> = list["vms"]
        .as_array()
        .context("vm list")?
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("").into(),
                v["hypervisor"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    ensure!(
        vms.contains(&(vm.name().to_string(), "default".into()))
            && vms.contains(&("plainvm".into(), "plain".into())),
        "vm list: {list}"
    );
    ensure!(
        list["unreachable"][0]["hypervisor"] == "gone"
            && list["unreachable"].as_array().map(Vec::len) == Some(1),
        "vm list must name gone unreachable: {list}"
    );
    let hvs = hypervisors(&d)?;
    let state = |name: &str| {
        hvs.as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == name))
            .map(|h| (h["kind"].clone(), h["state"].clone()))
    };
    ensure!(
        state("default") == Some(("libvirt".into(), "up".into())),
        "{hvs}"
    );
    ensure!(state("plain") == Some(("qmp".into(), "up".into())), "{hvs}");
    ensure!(
        state("gone") == Some(("libvirt".into(), "unreachable".into())),
        "{hvs}"
    );

    let lv = backup(&d, vm.name())?;
    ensure!(lv["hypervisor"] == "default", "{lv}");
    let qm = backup(&d, "plainvm")?;
    ensure!(
        qm["hypervisor"] == "plain" && qm["host"] == "localhost",
        "{qm}"
    );

    let lv_raw = dir.path().join("libvirt.raw");
    std::fs::write(&lv_raw, model.disk(&disk)?)?;
    restore_equals(
        &d,
        lv["backup_id"].as_str().context("id")?,
        "libvirt",
        &lv_raw,
    )?;
    let mut want = vec![0u8; SIZE as usize];
    want[..MIB as usize].fill(0xaa);
    let qm_raw = dir.path().join("qmp.raw");
    std::fs::write(&qm_raw, &want)?;
    restore_equals(&d, qm["backup_id"].as_str().context("id")?, "qmp", &qm_raw)?;
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 2,
        "verify: {verify}"
    );
    Ok(())
}
