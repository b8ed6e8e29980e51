//! End to end through the daemon: starts the real `sluice serve` (TLS, self-signed
//! certificate pinned by its fingerprint; NBD exports over TLS) against real libvirt and a
//! booted test guest, and drives it only with the `sluice` CLI: vm list, full backup with
//! --wait, guest writes, an incremental, an export read with `nbdinfo`/`nbdcopy` over TLS, a
//! writable export, restores to qcow2 equal to the disk at each point (`qemu-img compare`), a
//! restore as a new domain, a restore back onto the shut-off VM, verify, prune; then SIGTERM
//! stops the daemon cleanly. A second test sends SIGTERM during a running backup.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use testbed::daemon::Daemon;
use testbed::inspect::compare_images;
use testbed::peers::run as tool;
use testbed::remote_guest::RemoteGuest;
use testbed::{read_image, teardown_domain, Model, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// Writes the model's image of `disk` to a raw file.
fn model_file(model: &Model, disk: &str, path: &Path) -> Result<String> {
    std::fs::write(path, model.disk(disk)?)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Undefines a domain the test defined, pass or fail.
struct DefinedDomain(String);

impl Drop for DefinedDomain {
    fn drop(&mut self) {
        teardown_domain(&self.0);
    }
}

/// Where the story's guest and daemon live.
enum Env {
    /// The daemon beside the hypervisor, on `qemu:///system`.
    Local(TestVm),
    /// The daemon isolated from it (its own user, the hypervisor's files hidden, libvirt
    /// over TLS, backup data over TCP with TLS): `testbed::remote_guest`.
    Isolated(Box<RemoteGuest>),
}

struct Story {
    // Dropped first: the daemon, then the guest (and the isolated data directory).
    d: Daemon,
    env: Env,
    disk: String,
    dir: tempfile::TempDir,
    model: Model,
}

impl Story {
    fn vm(&self) -> &TestVm {
        vm_of(&self.env)
    }

    fn restores(&self) -> PathBuf {
        self.d.data.join("restores")
    }

    fn backup(&self, full: bool) -> Result<String> {
        let mut args = vec!["backup", self.vm().name(), "--wait"];
        if full {
            args.push("--full");
        }
        let job = self.d.ok(&args)?;
        ensure!(job["state"] == "succeeded", "backup: {job}");
        if !full {
            ensure!(
                job["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX) <= 2 * MIB,
                "incremental read too much: {job}"
            );
        }
        Ok(job["backup_id"].as_str().context("backup id")?.to_string())
    }

    /// Restores `id` to qcow2 and compares it with `model` (the disk at that point).
    fn restore_equals(&self, id: &str, model: &Model, name: &str) -> Result<()> {
        let q = self.restores().join(format!("{name}.qcow2"));
        let q = q.to_str().context("path")?;
        let job = self
            .d
            .ok(&["restore", id, "--to", q, "--format", "qcow2"])?;
        ensure!(job["state"] == "succeeded", "restore: {job}");
        let raw = model_file(
            model,
            &self.disk,
            &self.dir.path().join(format!("{name}.raw")),
        )?;
        compare_images(q, "qcow2", &raw, "raw")?;
        let (code, _) = self.d.cli(&["restore", id, "--to", q])?;
        ensure!(
            code == 1,
            "a second restore to {q} must be refused (409): {code}"
        );
        Ok(())
    }
}

fn start_story() -> Result<Story> {
    let vm = TestVm::boot(VmSpec::new("api-e2e").disk(SIZE))?;
    let disk = vm.disks()[0].target.clone();
    let dir = tempfile::tempdir()?;
    let d = Daemon::start(dir.path(), "")?;
    let model = Model::new(&vm);
    Ok(Story {
        d,
        env: Env::Local(vm),
        disk,
        dir,
        model,
    })
}

/// The story's daemon isolated from its hypervisor.
fn start_isolated_story() -> Result<Story> {
    let g = RemoteGuest::boot("api-e2e-iso", VmSpec::new("api-e2e-iso").disk(SIZE))?;
    let d = g.daemon("")?;
    Ok(Story {
        d,
        disk: g.disk.clone(),
        model: Model::new(&g.vm),
        env: Env::Isolated(Box::new(g)),
        dir: tempfile::tempdir()?,
    })
}

#[test]
fn the_cli_drives_backup_export_restore_verify_and_prune_through_the_daemon() -> Result<()> {
    let mut s = start_story()?;
    let (full_id, inc_id, at_full) = backups_exports_and_restores(&mut s)?;
    // A local hypervisor's backup XML names the job's socket in the data directory: the log
    // of sent XML that the isolated story searches for proxy paths does show them.
    let data = s.d.data.to_string_lossy().into_owned();
    ensure!(
        s.d.sent_xml()
            .iter()
            .any(|l| l.contains("domainbackup") && l.contains(&data)),
        "the sent backup XML names the socket under {data}: {:?}",
        s.d.sent_xml()
    );
    restore_as_domain(&s, &inc_id)?;
    restore_onto_vm(&s, &full_id, &at_full)?;
    verify_prune_and_stop(s, &full_id, &inc_id)
}

/// The same story with the daemon isolated from its hypervisor (its own user, a mount
/// namespace hiding the hypervisor's files, libvirt over TLS, backup data over TCP with
/// TLS): everything but the restores that write on the hypervisor (as a new domain, onto the
/// VM), which need the network restores of issue 14.
#[test]
fn the_cli_drives_an_isolated_daemon_through_backup_export_restore_verify_and_prune() -> Result<()>
{
    let mut s = start_isolated_story()?;
    let (full_id, inc_id, _) = backups_exports_and_restores(&mut s)?;
    if let Env::Isolated(g) = &s.env {
        g.no_proxy_path_sent(&s.d)?;
    }
    verify_prune_and_stop(s, &full_id, &inc_id)
}

/// vm list, a full and an incremental backup, the exports and restores to files: the ids of
/// both backups and the model at the full.
fn backups_exports_and_restores(s: &mut Story) -> Result<(String, String, Model)> {
    let vms = s.d.ok(&["vm", "list"])?;
    ensure!(
        vms["vms"]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v["name"] == s.vm().name())),
        "vm list lacks {}: {vms}",
        s.vm().name()
    );
    let disk = s.disk.clone();
    s.model.write(vm_of(&s.env), &disk, 0, 4 * MIB, 1)?;
    s.vm().sync()?;
    let full_id = s.backup(true)?;
    let at_full = s.model.clone();
    // Retention orders backups by their start second, so the incremental starts later.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    s.model.write(vm_of(&s.env), &disk, 8 * MIB, MIB, 2)?;
    s.vm().sync()?;
    let inc_id = s.backup(false)?;
    let shown = s.d.ok(&["backup", "show", &inc_id])?;
    ensure!(shown["mode"] == "incremental", "second backup: {shown}");
    read_export_over_tls(s, &inc_id)?;
    writable_export(s, &inc_id)?;
    s.restore_equals(&inc_id, &s.model, "inc")?;
    s.restore_equals(&full_id, &at_full, "full")?;
    Ok((full_id, inc_id, at_full))
}

fn vm_of(env: &Env) -> &TestVm {
    match env {
        Env::Local(vm) => vm,
        Env::Isolated(g) => &g.vm,
    }
}

/// The export's URI (nbds://, with the client certificate directory) works as given.
fn read_export_over_tls(s: &Story, id: &str) -> Result<()> {
    let export = s.d.ok(&["export", id])?;
    let uri = export["uri"].as_str().context("export uri")?.to_string();
    ensure!(uri.starts_with("nbds://"), "export over plain NBD: {uri}");
    let size = tool("nbdinfo", &["--size", &uri])?;
    ensure!(
        size.trim() == SIZE.to_string(),
        "nbdinfo --size {uri}: {size:?}"
    );
    qemu_img_over_tls(&uri)?;
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let refused = Command::new("nbdinfo").args(["--size", &plain]).output()?;
    ensure!(!refused.status.success(), "plain NBD was served: {plain}");
    let copy = s.dir.path().join("export.raw");
    tool("nbdcopy", &[&uri, copy.to_str().context("path")?])?;
    ensure!(
        std::fs::read(&copy)? == s.model.disk(&s.disk)?,
        "export bytes differ from the guest's disk"
    );
    std::fs::remove_file(&copy)?;
    let n = export["id"].to_string();
    s.d.ok(&["export", "close", &n])?;
    ensure!(
        s.d.ok(&["export", "list"])? == json!([]),
        "export still listed"
    );
    Ok(())
}

/// QEMU reads the export over TLS with the certificate directory the URI names (as in
/// docs/api.md).
fn qemu_img_over_tls(uri: &str) -> Result<()> {
    let rest = uri.strip_prefix("nbds://").context("nbds uri")?;
    let (addr, rest) = rest.split_once('/').context("uri path")?;
    let (export, dir) = rest
        .split_once("?tls-certificates=")
        .context("uri certificate directory")?;
    let (host, port) = addr.split_once(':').context("uri port")?;
    let info = tool(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client"),
            "--image-opts",
            &format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0"),
        ],
    )?;
    let v: Value = serde_json::from_str(&info)?;
    ensure!(v["virtual-size"] == SIZE, "qemu-img info over tls: {info}");
    Ok(())
}

/// Writes to a writable export land in its overlay; the backup does not change.
fn writable_export(s: &Story, id: &str) -> Result<()> {
    let export = s.d.ok(&["export", id, "--writable"])?;
    ensure!(export["writable"] == true, "{export}");
    let uri = export["uri"].as_str().context("export uri")?.to_string();
    let src = s.dir.path().join("ones.raw");
    std::fs::write(&src, vec![0xa5u8; MIB as usize])?;
    tool(
        "nbdcopy",
        &["--destination-is-zero", src.to_str().context("path")?, &uri],
    )
    .or_else(|_| tool("nbdcopy", &[src.to_str().context("path")?, &uri]))?;
    let back = s.dir.path().join("back.raw");
    tool("nbdcopy", &[&uri, back.to_str().context("path")?])?;
    let data = std::fs::read(&back)?;
    ensure!(
        data[..MIB as usize].iter().all(|&b| b == 0xa5),
        "write did not land"
    );
    ensure!(
        data[MIB as usize..] == s.model.disk(&s.disk)?[MIB as usize..],
        "writable export changed bytes it was not asked to"
    );
    s.d.ok(&["export", "close", &export["id"].to_string()])?;
    for f in [src, back] {
        std::fs::remove_file(f)?;
    }
    let overlays = s.d.data.join("work/overlays");
    ensure!(
        std::fs::read_dir(&overlays)?.next().is_none(),
        "overlay left after close in {}",
        overlays.display()
    );
    Ok(())
}

fn restore_as_domain(s: &Story, id: &str) -> Result<()> {
    let name = format!("{}-copy", s.vm().name());
    let _guard = DefinedDomain(name.clone());
    let job = s.d.ok(&["restore", id, "--as-domain", &name])?;
    ensure!(job["state"] == "succeeded", "restore as domain: {job}");
    let state = s.vm().virsh(&["domstate", &name])?;
    ensure!(
        state.trim() == "shut off",
        "restored domain state {state:?}"
    );
    let (code, _) = s.d.cli(&["restore", id, "--as-domain", s.vm().name()])?;
    ensure!(
        code == 1,
        "an existing domain name must be refused (409): {code}"
    );
    Ok(())
}

/// Refused while running and without --confirm; then the shut-off VM's disk is the backup's.
fn restore_onto_vm(s: &Story, id: &str, at: &Model) -> Result<()> {
    let (code, _) = s.d.cli(&["restore", id, "--onto-vm", "--confirm"])?;
    ensure!(
        code == 1,
        "restore onto a running vm must be refused: {code}"
    );
    s.vm().shutdown()?;
    let (code, _) = s.d.cli(&["restore", id, "--onto-vm"])?;
    ensure!(
        code == 1,
        "restore onto a vm without --confirm must be refused: {code}"
    );
    let job = s.d.ok(&["restore", id, "--onto-vm", "--confirm"])?;
    ensure!(job["state"] == "succeeded", "restore onto vm: {job}");
    let image = read_image(s.vm().disk_path(&s.disk)?, "qcow2", 0, SIZE)?;
    ensure!(
        image == at.disk(&s.disk)?,
        "vm disk differs from the backup"
    );
    Ok(())
}

fn verify_prune_and_stop(s: Story, full_id: &str, inc_id: &str) -> Result<()> {
    let list = s.d.ok(&["backup", "list", s.vm().name()])?;
    ensure!(
        list.as_array().map(Vec::len) == Some(2),
        "backup list: {list}"
    );
    let verify = s.d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 2,
        "verify: {verify}"
    );
    let prune = s.d.ok(&["prune", "--keep-last", "1"])?;
    ensure!(prune["removed"] == json!([full_id]), "prune: {prune}");
    ensure!(prune["kept"] == json!([inc_id]), "prune: {prune}");
    s.d.ok(&["gc"])?;
    let verify = s.d.ok(&["verify", "--full"])?;
    ensure!(
        verify["ok"] == true && verify["backups"] == 1,
        "verify after gc: {verify}"
    );
    let (code, _) = s.d.cli(&["backup", "show", "20200101-nope"])?;
    ensure!(code == 4, "unknown backup exit code {code}");
    owner_only(&s.d.data)?;
    let mut d = s.d;
    ensure!(d.terminate()?, "daemon exit after SIGTERM");
    Ok(())
}

/// Everything under the data directory (repository, catalog, tokens, logs, restores, TLS
/// material) is its owner's only; the data, work and restores directories are 0711 (QEMU of
/// a local hypervisor passes through to its job directory or a restored image, nobody lists
/// them).
fn owner_only(data: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
    let passable = [data.to_path_buf(), data.join("work"), data.join("restores")];
    for dir in &passable {
        ensure!(
            mode(dir)? == 0o711,
            "{} is {:o}, not 0711",
            dir.display(),
            mode(dir)?
        );
    }
    let mut open = Vec::new();
    let mut stack = vec![data.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let m = mode(&p)?;
            if m & 0o077 != 0 && !passable.contains(&p) {
                open.push(format!("{} {m:o}", p.display()));
            }
        }
    }
    ensure!(
        open.is_empty(),
        "open to other users under {}: {open:?}",
        data.display()
    );
    Ok(())
}

/// No libvirt job, no checkpoint beyond those of committed backups, no scratch file.
fn assert_nothing_left(vm: &TestVm, data: &Path, committed: usize) -> Result<()> {
    let job = vm.virsh(&["domjobinfo", vm.name()])?;
    ensure!(job.contains("None"), "a libvirt job is left: {job}");
    let cps = vm.virsh(&["checkpoint-list", vm.name(), "--name"])?;
    let n = cps.lines().filter(|l| !l.trim().is_empty()).count();
    ensure!(n <= committed, "checkpoints left behind: {cps}");
    let left: Vec<_> = files(&data.join("work"))?;
    ensure!(left.is_empty(), "scratch files left: {left:?}");
    Ok(())
}

fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(files(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

#[test]
fn sigterm_during_a_backup_leaves_nothing_and_the_next_backup_succeeds() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("api-term").disk(256 * MIB))?;
    let disk = vm.disks()[0].target.clone();
    vm.write_pattern(&disk, 0, 64 * MIB, 7)?;
    vm.sync()?;
    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start(dir.path(), "")?;
    let data = d.data.clone();
    let job = d.ok(&["backup", vm.name(), "--full"])?;
    ensure!(job["state"] == "queued", "{job}");
    std::thread::sleep(std::time::Duration::from_millis(150));
    ensure!(d.terminate()?, "daemon exit after SIGTERM");
    drop(d);

    let d = Daemon::start(dir.path(), "")?;
    // The job was cancelled (nothing committed) unless it won the race and committed.
    let committed = d.ok(&["backup", "list"])?.as_array().map_or(0, Vec::len);
    assert_nothing_left(&vm, &data, committed)?;
    let next = d.ok(&["backup", vm.name(), "--wait"])?;
    ensure!(next["state"] == "succeeded", "backup after SIGTERM: {next}");
    let verify: Value = d.ok(&["verify", "--full"])?;
    ensure!(verify["ok"] == true, "verify: {verify}");
    assert_nothing_left(&vm, &data, 1)?;
    Ok(())
}
