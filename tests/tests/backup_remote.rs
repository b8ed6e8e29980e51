//! Backups of a remote hypervisor, with the proxy isolated from it: `sluice serve` runs as
//! its own unprivileged user in a mount namespace where libvirt's directories and the guest's
//! image directory are empty (`testbed::Isolated`), reaches libvirt only over
//! `qemu+tls://127.0.0.1/system` and reads each disk from QEMU's own NBD server over TCP with
//! TLS (`[hypervisors.backup_data]`). Driven through the CLI: a full and an incremental
//! backup of a booted test guest, each restored to qcow2 and compared with the guest's disk
//! at that point.

use std::os::unix::fs::PermissionsExt;

use anyhow::{ensure, Context, Result};
use testbed::daemon::Daemon;
use testbed::remote_guest::{tls_hypervisor, RemoteGuest};
use testbed::{Model, VmSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// `sluice backup VM --wait [--full]` on the hypervisor `remote`: the job, which must have
/// succeeded.
fn backup(d: &Daemon, vm: &str, full: bool) -> Result<serde_json::Value> {
    d.backup_on("remote", vm, full)
}

/// Restores `id` and compares it with the disk the model says the guest had.
fn restore_equals(d: &Daemon, id: &str, model: &Model, disk: &str, name: &str) -> Result<()> {
    d.restore_equals(id, model, disk, name)
}

/// A guest with one disk of [`SIZE`] bytes.
fn guest(prefix: &str) -> Result<RemoteGuest> {
    RemoteGuest::boot(prefix, VmSpec::new(prefix).disk(SIZE))
}

#[test]
fn an_isolated_proxy_backs_up_a_remote_hypervisor_over_tls() -> Result<()> {
    let r = guest("remote-bk")?;
    let (vm, disk, images) = (&r.vm, r.disk.clone(), r.images.clone());
    let d = r.daemon("")?;
    let vms = d.ok(&["vm", "list"])?;
    ensure!(
        vms["vms"].as_array().is_some_and(|l| l
            .iter()
            .any(|v| v["name"] == vm.name() && v["hypervisor"] == "remote")),
        "vm list over qemu+tls lacks {}: {vms}",
        vm.name()
    );

    let mut model = Model::new(vm);
    model.write(vm, &disk, 0, 4 * MIB, 1)?;
    vm.sync()?;
    let full = backup(&d, vm.name(), true)?;
    let full_id = full["backup_id"].as_str().context("backup id")?.to_string();
    let at_full = model.clone();
    // Retention orders backups by their start second, so the incremental starts later.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    model.write(vm, &disk, 8 * MIB, MIB, 2)?;
    vm.sync()?;
    let inc = backup(&d, vm.name(), false)?;
    let inc_id = inc["backup_id"].as_str().context("backup id")?.to_string();
    let read = inc["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        read <= 2 * MIB,
        "the incremental read {read} bytes for 1 MiB changed: {inc}"
    );
    let shown = d.ok(&["backup", "show", &inc_id])?;
    ensure!(shown["mode"] == "incremental", "second backup: {shown}");

    restore_equals(&d, &full_id, &at_full, &disk, "full")?;
    restore_equals(&d, &inc_id, &model, &disk, "inc")?;
    r.no_proxy_path_sent(&d)?;
    // The job's scratch files lived beside the image, on the hypervisor, and are gone.
    let left: Vec<_> = std::fs::read_dir(&images)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".sluice-"))
        .collect();
    ensure!(
        left.is_empty(),
        "scratch files left beside the image: {left:?}"
    );
    Ok(())
}

/// kill -9 of the isolated proxy in the middle of a remote backup leaves libvirt's backup job
/// (and QEMU's TLS export) running on the hypervisor; the restarted daemon ends it over the
/// libvirt connection alone, and the next backup is exact.
#[test]
fn after_kill_9_mid_remote_backup_the_restart_ends_the_job_and_the_next_backup_is_exact(
) -> Result<()> {
    let r = guest("remote-kill")?;
    let mut model = Model::new(&r.vm);
    model.write(&r.vm, &r.disk, 0, 32 * MIB, 3)?;
    r.vm.sync()?;
    let slow = "read_limit = 8388608\n";
    let id = r.daemon(slow)?.kill_mid_backup(r.vm.name())?;
    let job_xml = r
        .host
        .virsh(&["backup-dumpxml", r.vm.name()])
        .context("the killed proxy's backup job is still on the hypervisor")?;
    // What the proxy asked of libvirt, as libvirt keeps it: a TLS server on the hypervisor
    // and scratch files beside the image, no path of the proxy's.
    let proxy_dir = r.dir.path().to_string_lossy().into_owned();
    ensure!(
        !job_xml.contains(&proxy_dir) && job_xml.contains("tls='yes'"),
        "the backup job names a path of the proxy ({proxy_dir}) or no TLS: {job_xml}"
    );
    let image = r.vm.disk_path(&r.disk)?.to_string_lossy().into_owned();
    ensure!(
        job_xml.contains(&format!("<scratch file='{image}.")),
        "libvirt placed the scratch file beside the image {image}: {job_xml}"
    );
    let d = r.daemon(slow)?;
    let note = d.cleanup_note(id, std::time::Duration::from_secs(30))?;
    ensure!(
        note.contains("cleaned up: remote libvirt backup job"),
        "the interrupted job's message: {note}"
    );
    ensure!(
        r.host.virsh(&["backup-dumpxml", r.vm.name()]).is_err(),
        "no backup job is left on the hypervisor"
    );
    let job = backup(&d, r.vm.name(), false)?;
    let id = job["backup_id"].as_str().context("backup id")?.to_string();
    restore_equals(&d, &id, &model, &r.disk, "after-kill")
}

/// A shut-off VM of a remote hypervisor is started paused for its backup (an incremental from
/// its persistent bitmap), powered off again, and the next online backup is incremental.
#[test]
fn a_shut_off_vm_of_a_remote_hypervisor_is_backed_up_paused_and_stays_off() -> Result<()> {
    let r = guest("remote-off")?;
    let d = r.daemon("")?;
    let name = r.vm.name();
    let mut model = Model::new(&r.vm);
    model.write(&r.vm, &r.disk, 0, 4 * MIB, 5)?;
    r.vm.sync()?;
    backup(&d, name, true)?;
    model.write(&r.vm, &r.disk, 16 * MIB, MIB, 6)?;
    r.vm.sync()?;
    r.vm.shutdown()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let off = backup(&d, name, false)?;
    let off_id = off["backup_id"].as_str().context("backup id")?.to_string();
    ensure!(
        r.vm.state()? == "shut off",
        "the vm is shut off again after its offline backup: {}",
        r.vm.state()?
    );
    let shown = d.ok(&["backup", "show", &off_id])?;
    ensure!(
        shown["mode"] == "incremental",
        "the offline backup is an incremental from the persistent bitmap: {shown}"
    );
    let read = off["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        read <= 2 * MIB,
        "the offline incremental read {read} bytes: {off}"
    );
    restore_equals(&d, &off_id, &model, &r.disk, "offline")?;
    r.no_proxy_path_sent(&d)?;
    r.vm.start()?;
    model.write(&r.vm, &r.disk, 24 * MIB, MIB, 7)?;
    r.vm.sync()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let on = backup(&d, name, false)?;
    let on_id = on["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &on_id])?;
    ensure!(
        shown["mode"] == "incremental",
        "online after offline: {shown}"
    );
    restore_equals(&d, &on_id, &model, &r.disk, "online")
}

/// `backup_data.offline = false` refuses a shut-off VM with the reason, and leaves it off.
#[test]
fn a_hypervisor_that_forbids_starting_vms_paused_refuses_a_shut_off_vm() -> Result<()> {
    let r = guest("remote-noff")?;
    r.vm.shutdown()?;
    let config = format!("{}offline = false\n", tls_hypervisor(&r.host, r.first_port));
    let d = r.daemon_with(&config)?;
    let (code, job) = d.cli(&["backup", r.vm.name(), "--wait"])?;
    ensure!(code == 5, "the backup fails (exit 5): {code} {job}");
    ensure!(job["error"]["kind"] == "refused", "{job}");
    let msg = job["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("offline = false"),
        "the reason names the setting: {msg}"
    );
    ensure!(r.vm.state()? == "shut off", "left shut off");
    Ok(())
}

/// `sluice backup show ID`: the backup's mode and, for a full read, why.
fn mode_of(d: &Daemon, id: &str) -> Result<(String, String)> {
    let shown = d.ok(&["backup", "show", id])?;
    let mode = shown["mode"].as_str().unwrap_or_default().to_string();
    let reason = shown["reason"].as_str().unwrap_or_default().to_string();
    Ok((mode, reason))
}

/// Self-healing change tracking over TLS, the proxy isolated: a deleted checkpoint and an
/// unclean kill of the guest (its bitmap left in use) each give a full read with the
/// reason, byte-exact, and the chain goes on incrementally.
#[test]
fn broken_change_tracking_of_a_remote_vm_falls_back_to_a_full_read_with_the_reason() -> Result<()> {
    let r = guest("remote-heal")?;
    let d = r.daemon("")?;
    let (vm, disk) = (&r.vm, r.disk.as_str());
    let mut model = Model::new(vm);
    model.write(vm, disk, 0, MIB, 1)?;
    vm.sync()?;
    let full = backup(&d, vm.name(), true)?;
    let full_id = full["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &full_id])?;
    let cp = shown["disks"][0]["checkpoint"]
        .as_str()
        .context("the full backup's checkpoint")?
        .to_string();
    vm.virsh(&["checkpoint-delete", vm.name(), &cp])?;
    model.write(vm, disk, 2 * MIB, MIB, 2)?;
    vm.sync()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let healed = backup(&d, vm.name(), false)?;
    let healed_id = healed["backup_id"]
        .as_str()
        .context("backup id")?
        .to_string();
    let (mode, reason) = mode_of(&d, &healed_id)?;
    ensure!(
        mode == "full_because" && reason.contains(&cp),
        "a deleted checkpoint gives a full read naming it: {mode} {reason}"
    );
    restore_equals(&d, &healed_id, &model, disk, "healed")?;

    model.write(vm, disk, 4 * MIB, MIB, 3)?;
    vm.sync()?;
    vm.kill_unclean()?;
    vm.start()?;
    model.write(vm, disk, 6 * MIB, MIB, 4)?;
    vm.sync()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let after_kill = backup(&d, vm.name(), false)?;
    let kill_id = after_kill["backup_id"]
        .as_str()
        .context("backup id")?
        .to_string();
    let (mode, reason) = mode_of(&d, &kill_id)?;
    ensure!(
        mode == "full_because" && reason.to_lowercase().contains("inconsistent"),
        "an unclean kill gives a full read naming the inconsistent bitmap: {mode} {reason}"
    );
    restore_equals(&d, &kill_id, &model, disk, "after-unclean-kill")?;

    model.write(vm, disk, 8 * MIB, MIB, 5)?;
    vm.sync()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let next = backup(&d, vm.name(), false)?;
    let next_id = next["backup_id"].as_str().context("backup id")?.to_string();
    let (mode, _) = mode_of(&d, &next_id)?;
    ensure!(
        mode == "incremental",
        "the chain goes on incrementally: {mode}"
    );
    restore_equals(&d, &next_id, &model, disk, "next")
}

/// A disk resized on the hypervisor gives a full read with the reason, at its new size.
#[test]
fn a_resized_disk_of_a_remote_vm_forces_a_full_read() -> Result<()> {
    let r = guest("remote-resize")?;
    let d = r.daemon("")?;
    let (vm, disk) = (&r.vm, r.disk.as_str());
    let mut model = Model::new(vm);
    model.write(vm, disk, MIB, MIB, 1)?;
    vm.sync()?;
    backup(&d, vm.name(), true)?;
    let bigger = SIZE + 16 * MIB;
    vm.virsh(&[
        "blockresize",
        vm.name(),
        disk,
        &format!("{}M", bigger / MIB),
    ])?;
    model.disk_mut(disk)?.resize(bigger as usize, 0);
    model.write(vm, disk, 3 * MIB, MIB, 2)?;
    vm.sync()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let job = backup(&d, vm.name(), false)?;
    let id = job["backup_id"].as_str().context("backup id")?.to_string();
    let (mode, reason) = mode_of(&d, &id)?;
    ensure!(
        mode == "full_because" && reason.contains("SizeChanged"),
        "a resize gives a full read with the reason: {mode} {reason}"
    );
    let shown = d.ok(&["backup", "show", &id])?;
    ensure!(shown["disks"][0]["size"] == bigger, "the new size: {shown}");
    restore_equals(&d, &id, &model, disk, "resized")
}

/// The guest agent answers over the remote connection: the backup is application-consistent
/// (filesystems frozen and thawed through libvirt over TLS), and the guest still writes.
#[test]
fn a_remote_vm_with_its_guest_agent_is_backed_up_application_consistent() -> Result<()> {
    let spec = VmSpec::new("remote-agent")
        .disk(SIZE)
        .disk(16 * MIB)
        .guest_agent(true);
    let r = RemoteGuest::boot("remote-agent", spec)?;
    let vm = &r.vm;
    vm.mkfs("vdb")?;
    vm.mount("vdb")?;
    let d = r.daemon("")?;
    let mut model = Model::new(vm);
    model.disks.remove("vdb");
    model.write(vm, &r.disk, 0, MIB, 1)?;
    vm.sync()?;
    let job = backup(&d, vm.name(), true)?;
    let id = job["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &id])?;
    ensure!(
        shown["consistency"] == "application",
        "frozen through the agent: {shown}"
    );
    let at_backup = model.clone();
    // Thawed: the guest still writes.
    model.write(vm, &r.disk, 2 * MIB, MIB, 2)?;
    vm.sync()?;
    restore_equals(&d, &id, &at_backup, &r.disk, "agent")
}

/// The disks of a shown backup: `(target, full_read reason or "")`.
fn disk_reads(shown: &serde_json::Value) -> Vec<(String, String)> {
    let disks = shown["disks"].as_array().cloned().unwrap_or_default();
    disks
        .iter()
        .map(|d| {
            let t = d["target"].as_str().unwrap_or_default().to_string();
            (t, d["full_read"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// A VM with a qcow2 and a raw disk, the proxy isolated over TLS: the decision is per disk.
/// The qcow2 disk stays incremental (it alone carries the checkpoint's bitmap); the raw one
/// is read in full every time, and the manifest says so and why. Online and offline (started
/// paused), every point byte-exact on both disks.
#[test]
fn a_vm_with_a_qcow2_and_a_raw_disk_keeps_the_qcow2_disk_incremental() -> Result<()> {
    let spec = VmSpec::new("remote-mixed").disk(SIZE).raw_image(SIZE);
    let r = RemoteGuest::boot("remote-mixed", spec)?;
    let (vm, q, raw) = (&r.vm, r.disk.clone(), r.vm.disks()[1].target.clone());
    ensure!(r.vm.disks()[1].format == "raw", "second disk is raw");
    let d = r.daemon("")?;
    let mut model = Model::new(vm);
    model.write(vm, &q, 0, 2 * MIB, 11)?;
    model.write(vm, &raw, 0, 2 * MIB, 12)?;
    vm.sync()?;
    let full = backup(&d, vm.name(), true)?;
    let full_id = full["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &full_id])?;
    let reads = disk_reads(&shown);
    ensure!(
        reads
            .iter()
            .any(|(t, why)| *t == raw && why.contains("raw")),
        "the raw disk's full read is recorded with its reason: {shown}"
    );
    ensure!(
        reads.iter().any(|(t, why)| *t == q && why.is_empty()),
        "the qcow2 disk tracks changes: {shown}"
    );
    let at_full = model.clone();

    std::thread::sleep(std::time::Duration::from_millis(1100));
    model.write(vm, &q, 8 * MIB, MIB, 13)?;
    model.write(vm, &raw, 8 * MIB, MIB, 14)?;
    vm.sync()?;
    let inc = backup(&d, vm.name(), false)?;
    let inc_id = inc["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &inc_id])?;
    ensure!(
        shown["mode"] == "incremental",
        "a raw disk does not make the vm's backup full: {shown}"
    );
    let disks = shown["disks"].as_array().cloned().unwrap_or_default();
    let checkpoint = |t: &str| {
        disks
            .iter()
            .find(|d| d["target"] == t)
            .map(|d| d["checkpoint"].clone())
    };
    ensure!(
        checkpoint(&q).is_some_and(|c| c.is_string())
            && checkpoint(&raw) == Some(serde_json::Value::Null),
        "only the qcow2 disk carries the checkpoint: {shown}"
    );
    // The raw disk is read in full (its 3 MiB of data at least); the qcow2 disk only its
    // changed MiB: together far less than both disks.
    let read = inc["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        (3 * MIB..=SIZE).contains(&read),
        "the incremental read {read} bytes: the raw disk in full, the qcow2 disk's changes: {inc}"
    );

    r.vm.shutdown()?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let off = backup(&d, vm.name(), false)?;
    let off_id = off["backup_id"].as_str().context("backup id")?.to_string();
    let shown = d.ok(&["backup", "show", &off_id])?;
    ensure!(
        shown["mode"] == "incremental" && shown["vm_state"] == "started_paused",
        "the shut-off vm was started paused and its qcow2 disk read incrementally: {shown}"
    );
    ensure!(r.vm.state()? == "shut off", "shut off again");
    for (id, m, tag) in [
        (&full_id, &at_full, "full"),
        (&inc_id, &model, "inc"),
        (&off_id, &model, "off"),
    ] {
        restore_equals(&d, id, m, &q, &format!("{tag}-q"))?;
        restore_equals(&d, id, m, &raw, &format!("{tag}-raw"))?;
    }
    // The scratch files Sluice named beside the images (libvirt created them) are gone.
    let left: Vec<_> = std::fs::read_dir(&r.images)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".sluice-"))
        .collect();
    ensure!(
        left.is_empty(),
        "scratch files left beside the images: {left:?}"
    );
    r.no_proxy_path_sent(&d)
}

/// A shut-off VM started paused for its backup and resumed by someone meanwhile: the backup
/// ends with the reason and commits nothing, the VM is left running, no backup job stays on
/// the hypervisor, and the next backup (online now) is exact.
#[test]
fn a_vm_resumed_during_its_offline_backup_ends_the_backup_with_the_reason() -> Result<()> {
    let r = guest("remote-resume")?;
    let mut model = Model::new(&r.vm);
    model.write(&r.vm, &r.disk, 0, 32 * MIB, 21)?;
    r.vm.sync()?;
    r.vm.shutdown()?;
    let d = r.daemon("read_limit = 8388608\n")?;
    let name = r.vm.name();
    let job = d.ok(&["backup", name, "--full"])?;
    let id = job["id"].as_u64().context("job id")?;
    d.wait_job(id, std::time::Duration::from_secs(60), |j| {
        j["state"] == "running" && j["progress"]["bytes_read"].as_u64().unwrap_or(0) > 0
    })?;
    ensure!(
        r.vm.state()? == "paused",
        "started paused: {}",
        r.vm.state()?
    );
    r.host.virsh(&["resume", name])?;
    let end = d.wait_job(id, std::time::Duration::from_secs(120), |j| {
        j["state"] != "running" && j["state"] != "queued"
    })?;
    ensure!(end["state"] == "failed", "the backup ends: {end}");
    ensure!(end["error"]["kind"] == "refused", "{end}");
    let msg = end["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("started paused") && msg.contains("running now"),
        "the reason says what happened: {msg}"
    );
    ensure!(end["backup_id"].is_null(), "nothing committed: {end}");
    ensure!(
        r.vm.state()? == "running",
        "left running: {}",
        r.vm.state()?
    );
    ensure!(
        r.host.virsh(&["backup-dumpxml", name]).is_err(),
        "no backup job is left on the hypervisor"
    );
    let next = backup(&d, name, false)?;
    let next_id = next["backup_id"].as_str().context("backup id")?.to_string();
    restore_equals(&d, &next_id, &model, &r.disk, "after-resume")
}

/// `backup_data.scratch_dir`: a directory on the hypervisor (hidden from the isolated proxy)
/// takes every scratch file instead of the images' directory; the XML sent names it, not a
/// path of the proxy; nothing is left in it; the backups restore byte-exact.
#[test]
fn a_hypervisor_side_scratch_dir_holds_the_scratch_files() -> Result<()> {
    let spec = VmSpec::new("remote-scr").disk(SIZE).raw_image(SIZE);
    let r = RemoteGuest::boot("remote-scr", spec)?;
    let scratch = r.images.join("hv-scratch");
    std::fs::create_dir(&scratch)?;
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o777))?;
    let config = format!(
        "{}scratch_dir = \"{}\"\n",
        tls_hypervisor(&r.host, r.first_port),
        scratch.display()
    );
    let d = r.daemon_with(&config)?;
    let (vm, q, raw) = (&r.vm, r.disk.clone(), r.vm.disks()[1].target.clone());
    let mut model = Model::new(vm);
    model.write(vm, &q, 0, MIB, 31)?;
    model.write(vm, &raw, 0, MIB, 32)?;
    vm.sync()?;
    backup(&d, vm.name(), true)?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    model.write(vm, &q, 4 * MIB, MIB, 33)?;
    vm.sync()?;
    let inc = backup(&d, vm.name(), false)?;
    let inc_id = inc["backup_id"].as_str().context("backup id")?.to_string();
    let want = format!("<scratch file='{}/{}.", scratch.display(), vm.name());
    let sent = d.sent_xml();
    ensure!(
        sent.iter()
            .filter(|l| l.contains("domainbackup"))
            .all(|l| l.matches(&want).count() == 2),
        "every backup XML names both scratch files in scratch_dir ({want}): {sent:?}"
    );
    r.no_proxy_path_sent(&d)?;
    let left: Vec<_> = std::fs::read_dir(&scratch)?.flatten().collect();
    ensure!(
        left.is_empty(),
        "scratch files left in scratch_dir: {left:?}"
    );
    restore_equals(&d, &inc_id, &model, &q, "scr-q")?;
    restore_equals(&d, &inc_id, &model, &raw, "scr-raw")
}
