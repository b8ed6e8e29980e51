//! Instant recovery through the CLI with the proxy isolated from its hypervisor (as in
//! `backup_remote.rs`: `sluice serve` as its own user in a mount namespace, libvirt only over
//! `qemu+tls://`): `sluice restore ID --instant --as-domain NAME` defines a new domain whose
//! disk is a writable export on the daemon's NBD server, dialled by QEMU over TLS with the
//! test bed's client certificate (`nbd_tls_x509_cert_dir`), and starts it. The guest reports
//! over its command channel the checksums of backup time, writes and reads back; `job list`
//! shows the job running from the repository; prune (`--keep-last 1`, which would remove
//! the backup) and GC neither remove the backup nor break the guest (ranges it never read
//! before read right after them); a plain `job cancel` is refused, `--discard-writes` ends
//! it: the domain is gone, the export closed, the overlay deleted, the backup unheld.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::channel::Channel;
use testbed::daemon::{files_under, Daemon};
use testbed::remote_guest::RemoteGuest;
use testbed::{
    domain_names, pattern_sha256, sha256_hex, teardown_domain, Model, VmSpec, NAME_PREFIX,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Ranges the guest writes before the backup: (offset, len, seed).
const WRITES: [(u64, u64, u64); 3] = [
    (0, 4 * MIB, 1),
    (20 * MIB + 4096, 64 << 10, 2),
    (48 * MIB, MIB, 3),
];
/// Ranges checked right after boot, and ranges first read after prune and GC.
const EARLY: [(u64, u64); 2] = [(0, MIB), (20 * MIB, MIB)];
const LATE: [(u64, u64); 3] = [(MIB, 3 * MIB), (48 * MIB, MIB), (56 * MIB, MIB)];
/// What the recovered guest writes.
const GUEST_WRITE: (u64, u64, u64) = (32 * MIB, MIB, 77);

/// A domain this test made (through the daemon); removed on drop if it is still there.
struct Copy(String);

impl Drop for Copy {
    fn drop(&mut self) {
        if domain_names().is_ok_and(|n| n.contains(&self.0)) {
            teardown_domain(&self.0);
        }
    }
}

/// `sluice backup VM --wait [--full]` on the hypervisor `remote`: the backup's id.
fn backup(d: &Daemon, vm: &str, full: bool) -> Result<String> {
    let job = d.backup_on("remote", vm, full)?;
    Ok(job["backup_id"].as_str().context("backup id")?.to_string())
}

/// The job `id` as `sluice job list` shows it.
fn listed(d: &Daemon, id: u64) -> Result<Value> {
    let list = d.ok(&["job", "list"])?;
    list.as_array()
        .and_then(|l| l.iter().find(|j| j["id"] == id))
        .cloned()
        .with_context(|| format!("job {id} is not in the job list: {list}"))
}

/// The export names the daemon's NBD server offers (`nbdinfo --list` with the test bed's
/// client certificate).
fn offered(nbd: &str, certs: &Path) -> Result<Vec<String>> {
    let uri = format!("{nbd}/?tls-certificates={}", certs.display());
    let out = std::process::Command::new("nbdinfo")
        .args(["--list", "--json", &uri])
        .output()
        .context("run nbdinfo (make deps)")?;
    ensure!(
        out.status.success(),
        "nbdinfo --list {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["exports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["export-name"].as_str().map(String::from))
        .collect())
}

/// The guest's checksum of each range equals the model's (what the backup holds).
fn sums_match(ch: &mut Channel, disk: &str, model: &[u8], ranges: &[(u64, u64)]) -> Result<()> {
    for &(off, len) in ranges {
        let got = ch.call(&format!("sum {disk} {off} {len}"), Duration::from_secs(120))?;
        let want = sha256_hex(&model[off as usize..(off + len) as usize]);
        ensure!(
            got == want,
            "recovered guest's sum at {off}+{len}: {got} != {want}"
        );
    }
    Ok(())
}

/// Overlay files under the daemon's work directory.
fn overlays(d: &Daemon) -> Result<Vec<std::path::PathBuf>> {
    Ok(files_under(&d.data.join("work"))?
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".overlay"))
        .collect())
}

#[test]
fn an_instant_recovery_runs_a_backup_over_tls_until_it_is_cancelled() -> Result<()> {
    let r = RemoteGuest::boot("inst-rem", VmSpec::new("inst-rem").disk(SIZE))?;
    let (vm, disk) = (&r.vm, r.disk.clone());
    let (cert, key) = r.host.sluice_nbd_identity()?;
    let top = format!(
        "nbd_cert = {cert:?}\nnbd_key = {key:?}\nnbd_client_ca = {:?}\n",
        r.host.ca_cert()
    );
    let d = r.daemon(&top)?;

    let mut model = Model::new(vm);
    for (off, len, seed) in WRITES {
        model.write(vm, &disk, off, len, seed)?;
    }
    vm.sync()?;
    let at_backup = model.disk(&disk)?.to_vec();
    let first = backup(&d, vm.name(), true)?;
    // Two later backups: retention keeps the newest, so `--keep-last 1` would remove the
    // first one (the one recovered) and the second.
    for seed in [4, 5] {
        std::thread::sleep(Duration::from_millis(1100));
        model.write(vm, &disk, 8 * MIB, MIB, seed)?;
        vm.sync()?;
        backup(&d, vm.name(), false)?;
    }

    let name = format!("{NAME_PREFIX}inst-rem-copy-{}-900", std::process::id());
    let _copy = Copy(name.clone());
    let job = d.ok(&["restore", &first, "--instant", "--as-domain", &name])?;
    let id = job["id"].as_u64().context("job id")?;
    ensure!(
        job["state"] == "running"
            && job["mode"] == "instant"
            && job["instant"]["state"] == "running",
        "the CLI returns once the domain runs: {job}"
    );
    let nbd = job["instant"]["nbd"]
        .as_str()
        .context("nbd address")?
        .to_string();
    let export = format!("sluice-instant-{id}/{disk}");
    ensure!(
        job["instant"]["disks"][0]["export"] == export.as_str(),
        "{job}"
    );

    // libvirt's own view of the domain: an NBD disk over TLS at the daemon, no proxy path.
    let xml = r.host.virsh(&["dumpxml", &name])?;
    let port = nbd.rsplit(':').next().context("port")?;
    ensure!(
        xml.contains("protocol='nbd'")
            && xml.contains(&format!("name='{export}'"))
            && xml.contains("tls='yes'")
            && xml.contains(&format!("<host name='127.0.0.1' port='{port}'/>")),
        "the domain's disk is not the TLS export: {xml}"
    );
    ensure!(
        !xml.contains(&*r.dir.path().to_string_lossy()),
        "the domain names a proxy path: {xml}"
    );
    ensure!(
        d.sent_xml().iter().any(|l| l.contains(&name)),
        "the daemon logged the domain XML it sent"
    );
    r.no_proxy_path_sent(&d)?;

    // The copy's command socket was renamed beside the original's, on the hypervisor.
    let socket = vm.scratch().join(format!("{name}.agent.sock"));
    let mut ch = Channel::connect(&socket, Duration::from_secs(30))?;
    ch.wait_ready(Duration::from_secs(180))?;
    sums_match(&mut ch, &disk, &at_backup, &EARLY)?;
    let (w_off, w_len, w_seed) = GUEST_WRITE;
    ch.call(
        &format!("write {disk} {w_off} {w_len} {w_seed}"),
        Duration::from_secs(60),
    )?;
    ch.call("sync", Duration::from_secs(60))?;
    let sum = ch.call(
        &format!("sum {disk} {w_off} {w_len}"),
        Duration::from_secs(60),
    )?;
    ensure!(
        sum == pattern_sha256(w_seed, w_off, w_len as usize),
        "the guest reads back its write"
    );

    // `job list`: running from the repository, the guest's write counted in the overlay.
    let j = d.wait_job(id, Duration::from_secs(30), |j| {
        j["instant"]["disks"][0]["written"].as_u64().unwrap_or(0) >= w_len
    })?;
    ensure!(
        j["state"] == "running" && j["instant"]["domain_state"] == "running",
        "{j}"
    );
    let l = listed(&d, id)?;
    ensure!(
        l["state"] == "running"
            && l["mode"] == "instant"
            && l["instant"]["domain"] == name.as_str(),
        "{l}"
    );
    ensure!(
        !overlays(&d)?.is_empty(),
        "the export's overlay is in the daemon's work directory"
    );
    let certs = r.host.nbd_tls_dir();
    ensure!(
        offered(&nbd, certs)?.contains(&export),
        "the NBD server offers {export}"
    );

    // Prune and GC leave the held backup and the running guest alone.
    let pruned = d.ok(&["prune", "--keep-last", "1"])?;
    let kept: Vec<&str> = pruned["kept"]
        .as_array()
        .context("kept")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        kept.contains(&first.as_str()),
        "prune removed the recovered backup: {pruned}"
    );
    ensure!(
        pruned["removed"].as_array().is_some_and(|r| r.len() == 1),
        "{pruned}"
    );
    d.ok(&["gc"])?;
    let v = d.ok(&["verify", &first])?;
    ensure!(v["ok"] == true, "{v}");
    sums_match(&mut ch, &disk, &at_backup, &LATE)?;
    sums_match(&mut ch, &disk, &at_backup, &EARLY)?;
    let sum = ch.call(
        &format!("sum {disk} {w_off} {w_len}"),
        Duration::from_secs(60),
    )?;
    ensure!(
        sum == pattern_sha256(w_seed, w_off, w_len as usize),
        "the guest's write after gc"
    );
    drop(ch);

    // Cancel: refused without --discard-writes, then the domain, export and overlay go.
    let (code, _) = d.cli(&["job", "cancel", &id.to_string()])?;
    ensure!(
        code == 2,
        "a plain cancel of an instant recovery is refused (exit {code})"
    );
    ensure!(
        listed(&d, id)?["state"] == "running",
        "still running after the refusal"
    );
    d.ok(&["job", "cancel", &id.to_string(), "--discard-writes"])?;
    let end = d.wait_job(id, Duration::from_secs(60), |j| j["state"] != "running")?;
    let msg = end["message"].as_str().unwrap_or_default();
    ensure!(
        end["state"] == "cancelled"
            && msg.contains(&format!("domain {name} destroyed and undefined"))
            && msg.contains("exports closed"),
        "{end}"
    );
    ensure!(!domain_names()?.contains(&name), "domain {name} is gone");
    ensure!(
        !offered(&nbd, certs)?.contains(&export),
        "export {export} is closed"
    );
    ensure!(
        overlays(&d)?.is_empty(),
        "overlays left: {:?}",
        overlays(&d)?
    );
    // Unheld: the same prune now removes it.
    let pruned = d.ok(&["prune", "--keep-last", "1"])?;
    ensure!(
        pruned["removed"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == first.as_str())),
        "{pruned}"
    );
    Ok(())
}

/// A daemon killed (`kill -9`) under a running instant recovery leaves its domain on the
/// hypervisor, its disks on exports that died with it; the restart's clean-up destroys and
/// undefines it (from what the job history recorded) and says so in the job's message. A
/// daemon stopped with SIGTERM ends its instant recoveries itself before it exits.
#[test]
fn a_killed_daemon_s_instant_domain_is_ended_by_the_restart_and_sigterm_ends_one_itself(
) -> Result<()> {
    let r = RemoteGuest::boot("inst-kill", VmSpec::new("inst-kill").disk(SIZE))?;
    let (vm, disk) = (&r.vm, r.disk.clone());
    let (cert, key) = r.host.sluice_nbd_identity()?;
    let top = format!(
        "nbd_cert = {cert:?}\nnbd_key = {key:?}\nnbd_client_ca = {:?}\n",
        r.host.ca_cert()
    );
    let mut d = r.daemon(&top)?;
    let mut model = Model::new(vm);
    model.write(vm, &disk, 0, MIB, 9)?;
    vm.sync()?;
    let id = backup(&d, vm.name(), true)?;

    let name = format!("{NAME_PREFIX}inst-kill-copy-{}-901", std::process::id());
    let _copy = Copy(name.clone());
    let job = d.ok(&["restore", &id, "--instant", "--as-domain", &name])?;
    let jid = job["id"].as_u64().context("job id")?;
    ensure!(job["instant"]["state"] == "running", "{job}");
    d.kill()?;
    ensure!(
        domain_names()?.contains(&name),
        "the killed daemon's domain is still defined"
    );

    let mut d = r.daemon(&top)?;
    let note = d.cleanup_note(jid, Duration::from_secs(60))?;
    ensure!(
        note.contains(&format!(
            "cleaned up: instant-recovery domain {name} destroyed and undefined"
        )),
        "the interrupted job's message: {note}"
    );
    ensure!(
        !domain_names()?.contains(&name),
        "domain {name} is gone after the restart"
    );
    ensure!(
        overlays(&d)?.is_empty(),
        "overlays left: {:?}",
        overlays(&d)?
    );

    let job = d.ok(&["restore", &id, "--instant", "--as-domain", &name])?;
    ensure!(job["instant"]["state"] == "running", "{job}");
    ensure!(d.terminate()?, "sluice serve exits cleanly on SIGTERM");
    ensure!(
        !domain_names()?.contains(&name),
        "SIGTERM ended domain {name}"
    );
    Ok(())
}
