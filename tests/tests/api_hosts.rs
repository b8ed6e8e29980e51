//! One `sluice serve` in front of several hypervisors at once: a booted libvirt test VM
//! (`qemu:///system`, the config's top-level `libvirt_uri`, hypervisor `default`), a plain
//! QEMU reached by its QMP socket (hypervisor `plain`) and a libvirt host that does not exist
//! (`gone`). The daemon starts although `gone` is down; through the CLI only, `hypervisor
//! list` shows the three with their states, `vm list` lists the VMs of both others and notes
//! `gone` unreachable on stderr (exit 0), one VM on each is backed up (one of them named with
//! `--hypervisor`, which a VM of another hypervisor does not pass), and each backup restored
//! to qcow2 equals its disk.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::daemon::Daemon;
use testbed::inspect::compare_images;
use testbed::qmp::PlainQemu;
use testbed::{Model, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// Backs up `vm` in full with `--wait` (and `extra` arguments); returns the job.
fn backup(d: &Daemon, vm: &str, extra: &[&str]) -> Result<Value> {
    let args = [&["backup", vm, "--full", "--wait"][..], extra].concat();
    let job = d.ok(&args)?;
    ensure!(job["state"] == "succeeded", "backup of {vm}: {job}");
    Ok(job)
}

/// `sluice ARGS` as a user runs it (tables, no `--json`): exit code, stdout, stderr.
fn human(d: &Daemon, args: &[&str]) -> Result<(i32, String, String)> {
    let out = d.command(args)?.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// `hypervisor list` as JSON and as a table: the three hypervisors with kind and state.
fn check_hypervisor_list(d: &Daemon, qmp_socket: &str) -> Result<()> {
    let hvs = d.ok(&["hypervisor", "list"])?;
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
    let (code, table, _) = human(d, &["hypervisor", "list"])?;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(code == 0 && rows.len() == 3, "hypervisor list: {table}");
    ensure!(
        rows[0][..5] == ["default", "libvirt", "qemu:///system", "localhost", "up"]
            && rows[1][..5] == ["plain", "qmp", qmp_socket, "localhost", "up"]
            && rows[2][..5]
                == [
                    "gone",
                    "libvirt",
                    "qemu+ssh://nonexistent.invalid/system",
                    "nonexistent.invalid",
                    "unreachable"
                ]
            && rows[2].len() > 7,
        "hypervisor list table: {table}"
    );
    Ok(())
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
    let (code, table, notes) = human(&d, &["vm", "list"])?;
    ensure!(
        code == 0
            && table.lines().next().unwrap_or("").contains("HYPERVISOR")
            && table
                .lines()
                .any(|l| l.starts_with("plainvm ") && l.contains(" plain "))
            && !table.contains("gone"),
        "vm list table: {table}"
    );
    ensure!(
        notes.starts_with("note: the VMs of hypervisor gone are not listed: ")
            && notes.lines().count() == 1,
        "vm list stderr: {notes}"
    );
    let sock = qemu.dir().join("qmp.sock");
    check_hypervisor_list(&d, sock.to_str().context("socket path")?)?;

    // The libvirt VM named on its hypervisor; not found on the QMP one (exit 4, no job).
    let (code, _, err) = human(&d, &["backup", vm.name(), "--hypervisor", "plain"])?;
    ensure!(
        code == 4 && err.contains("not found on hypervisor plain"),
        "backup on the wrong hypervisor: {code} {err}"
    );
    let lv = backup(&d, vm.name(), &["--hypervisor", "default"])?;
    ensure!(lv["hypervisor"] == "default", "{lv}");
    let qm = backup(&d, "plainvm", &[])?;
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
    let listed = d.ok(&["backup", "list", "--hypervisor", "plain"])?;
    ensure!(
        listed.as_array().map(Vec::len) == Some(1) && listed[0]["id"] == qm["backup_id"],
        "backup list --hypervisor plain: {listed}"
    );
    let jobs = d.ok(&["job", "list"])?;
    let backups = jobs
        .as_array()
        .map_or(0, |a| a.iter().filter(|j| j["kind"] == "backup").count());
    ensure!(
        backups == 2,
        "two backup jobs, none from the refused one: {jobs}"
    );
    let verify = d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 2,
        "verify: {verify}"
    );
    Ok(())
}
