//! Restore as a new domain on a remote hypervisor, with the proxy isolated as in
//! `backup_remote` (its own user, a mount namespace hiding libvirt's directories, the guest's
//! image directory and the storage pool's directory; libvirt only over
//! `qemu+tls://127.0.0.1/system`). Driven through the CLI: `sluice restore ID --hypervisor
//! remote --as-domain NAME --pool POOL --start` uploads each disk into a volume of a
//! directory pool over the libvirt connection (holes stay holes: the volume's allocation is
//! about its data), defines the copy and starts it beside the still-running original; the
//! copy's guest reports over its command channel the checksums of the backup. Existing
//! domains and volumes are refused with nothing made, and a restore cancelled mid-upload
//! leaves no volume and no domain.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use testbed::channel::Channel;
use testbed::daemon::{binary_for, Daemon};
use testbed::pool::TestPool;
use testbed::remote::free_port;
use testbed::{domain_names, sha256_hex, teardown_domain, virsh, Isolated, Model, TestVm, TlsHost};
use testbed::{VmSpec, NAME_PREFIX};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Ranges whose checksums the copy must report: data, a partial chunk, zeroes.
const RANGES: [(u64, u64); 3] = [(0, MIB), (20 * MIB, MIB), (40 * MIB, MIB)];

/// A domain a test made (or a restore may have made); removed on drop, also on panic.
struct Defined(String);

impl Drop for Defined {
    fn drop(&mut self) {
        teardown_domain(&self.0);
    }
}

/// A booted guest, a pool for the copies and an isolated daemon's data directory.
struct Remote {
    host: TlsHost,
    iso: Isolated,
    vm: TestVm,
    disk: String,
    pool: TestPool,
    dir: tempfile::TempDir,
    first_port: u16,
}

impl Remote {
    fn new(prefix: &str) -> Result<Remote> {
        let host = TlsHost::ensure()?;
        let iso = Isolated::ensure()?;
        let vm = TestVm::boot(VmSpec::new(prefix).disk(SIZE))?;
        let disk = vm.disks()[0].target.clone();
        let dir = iso.data_dir(prefix)?;
        Ok(Remote {
            host,
            iso,
            vm,
            disk,
            pool: TestPool::new(prefix)?,
            dir,
            first_port: free_port()?,
        })
    }

    /// An isolated daemon (libvirt over TLS only) with `top` before its hypervisor `remote`;
    /// it sees neither the guest's directory nor the pool's.
    fn daemon(&self, top: &str) -> Result<Daemon> {
        let bin = binary_for(&self.iso, self.dir.path())?;
        let config = format!(
            "{top}[[hypervisors]]\nname = \"remote\"\nlibvirt_uri = \"{uri}\"\n\
             [hypervisors.backup_data]\nports = \"{p}-{last}\"\n\
             ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            uri = self.host.uri(),
            p = self.first_port,
            last = self.first_port.saturating_add(15),
            ca = self.host.ca_cert().display(),
            cert = self.host.client_cert().display(),
            key = self.host.client_key().display(),
        );
        let hide = [self.vm.scratch(), self.pool.dir()];
        Daemon::start_as(self.dir.path(), &config, |argv| {
            self.iso.command(&bin, &argv[1..], &hide)
        })
    }

    /// A full backup through the CLI; its id.
    fn backup(&self, d: &Daemon) -> Result<String> {
        let job = d.backup_on("remote", self.vm.name(), true)?;
        Ok(job["backup_id"].as_str().context("backup id")?.to_string())
    }

    /// A name for a copy of the guest (the test bed sweeps it if this process dies).
    fn copy_name(&self, what: &str) -> String {
        format!("{NAME_PREFIX}{what}-{}-900", std::process::id())
    }

    /// `sluice restore ID --hypervisor remote --as-domain NAME --pool POOL EXTRA…`.
    fn restore_args<'a>(&'a self, id: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "restore",
            id,
            "--hypervisor",
            "remote",
            "--as-domain",
            name,
            "--pool",
            self.pool.name(),
        ];
        args.extend_from_slice(extra);
        args
    }
}

/// Whether libvirt has a domain `name` (other tests define theirs meanwhile: only this
/// name tells).
fn defined(name: &str) -> Result<bool> {
    Ok(domain_names()?.iter().any(|n| n == name))
}

fn uuid(name: &str) -> Result<String> {
    Ok(virsh(&["domuuid", name])?.trim().to_string())
}

#[test]
fn a_backup_restored_through_the_cli_as_a_domain_on_a_remote_pool_boots_with_its_data() -> Result<()>
{
    let r = Remote::new("rrd-boot")?;
    let (vm, disk) = (&r.vm, r.disk.as_str());
    let mut model = Model::new(vm);
    model.write(vm, disk, 0, MIB, 1)?;
    model.write(vm, disk, 20 * MIB + 4096, 64 << 10, 2)?;
    vm.sync()?;
    let mut sums = Vec::new();
    for (offset, len) in RANGES {
        let sum = vm.checksum(disk, offset, len)?;
        let want = &model.disk(disk)?[offset as usize..(offset + len) as usize];
        ensure!(sum == sha256_hex(want), "source sum at {offset}");
        sums.push(sum);
    }
    let d = r.daemon("")?;
    let id = r.backup(&d)?;
    // The original moves on after the backup; the copy must show the backup, not this.
    model.write(vm, disk, 0, 4096, 3)?;
    vm.sync()?;
    let original_xml = virsh(&["dumpxml", "--inactive", vm.name()])?;

    let copy = r.copy_name("rrd-copy");
    let _guard = Defined(copy.clone());
    let job = d.ok(&r.restore_args(&id, &copy, &["--start"]))?;
    ensure!(job["state"] == "succeeded", "restore: {job}");
    ensure!(
        job["mode"] == "as-domain" && job["hypervisor"] == "remote",
        "{job}"
    );
    let message = job["message"].as_str().unwrap_or_default();
    eprintln!("restore job: {message}");
    let p = &job["progress"];
    ensure!(
        p["bytes_done"] == SIZE && p["bytes_planned"] == SIZE,
        "progress reaches the disk's size: {p}"
    );
    ensure!(
        p["bytes_zero"].as_u64().unwrap_or(0) >= SIZE - 4 * MIB,
        "the disk's holes went as holes: {p}"
    );

    // Holes stay holes: the volume holds the data, not the whole disk.
    let vol = format!("{copy}-{disk}.qcow2");
    let info = r.pool.vol_info(&vol)?;
    ensure!(info.capacity == SIZE, "volume capacity: {info:?}");
    ensure!(
        info.allocation < 8 * MIB,
        "the volume allocates about its data (1.1 MiB written), not the {SIZE}-byte disk: {info:?}"
    );
    ensure!(
        r.pool.volumes()? == [vol.clone()],
        "only the copy's volume is left in the pool (no upload volume): {:?}",
        r.pool.volumes()?
    );
    let copy_xml = virsh(&["dumpxml", &copy])?;
    let path = r.pool.vol_path(&vol)?;
    ensure!(
        copy_xml.contains(&format!("<source file='{path}'")) && copy_xml.contains("type='qcow2'"),
        "the copy's disk is the pool volume: {copy_xml}"
    );

    // The copy's command channel sits beside the original's, under its own name.
    let sock = vm.scratch().join(format!("{copy}-agent.sock"));
    let mut channel = Channel::connect(&sock, Duration::from_secs(30))?;
    channel.wait_ready(Duration::from_secs(180))?;
    for ((offset, len), want) in RANGES.iter().zip(&sums) {
        let got = channel.call(
            &format!("sum {disk} {offset} {len}"),
            Duration::from_secs(60),
        )?;
        ensure!(
            &got == want,
            "copy's sum at {offset}+{len}: {got} != {want}"
        );
    }

    // The original: same definition, its own identity and MACs, running with its own data.
    ensure!(virsh(&["dumpxml", "--inactive", vm.name()])? == original_xml);
    ensure!(
        uuid(vm.name())? != uuid(&copy)?,
        "copy shares the original's uuid"
    );
    ensure!(vm.state()? == "running", "original is {}", vm.state()?);
    let now = vm.checksum(disk, 0, MIB)?;
    ensure!(now == sha256_hex(&model.disk(disk)?[..MIB as usize]));
    no_proxy_path_sent(&r, &d)
}

/// That `d` sent libvirt a domain and a volume XML and none names a path of the proxy.
fn no_proxy_path_sent(r: &Remote, d: &Daemon) -> Result<()> {
    let sent = d.sent_xml();
    ensure!(
        sent.iter().any(|l| l.contains("<volume>")) && sent.iter().any(|l| l.contains("<domain")),
        "the daemon logged the volume and domain XML it sent: {sent:?}"
    );
    let proxy = r.dir.path().to_string_lossy().into_owned();
    for line in &sent {
        ensure!(
            !line.contains(&proxy),
            "xml sent to libvirt names {proxy}: {line}"
        );
    }
    Ok(())
}

#[test]
fn existing_domains_and_volumes_are_refused_and_nothing_is_made() -> Result<()> {
    let r = Remote::new("rrd-taken")?;
    let (vm, disk) = (&r.vm, r.disk.as_str());
    let mut model = Model::new(vm);
    model.write(vm, disk, 0, MIB, 4)?;
    vm.sync()?;
    let d = r.daemon("")?;
    let id = r.backup(&d)?;

    // The original's own name.
    let (code, _) = d.cli(&r.restore_args(&id, vm.name(), &[]))?;
    ensure!(
        code == 1,
        "an existing domain is refused (409): exit {code}"
    );
    ensure!(
        r.pool.volumes()?.is_empty(),
        "no volume made: {:?}",
        r.pool.volumes()?
    );

    // A volume of the name the restore would use, with content of its own.
    let copy = r.copy_name("rrd-taken");
    let _guard = Defined(copy.clone());
    let vol = format!("{copy}-{disk}.qcow2");
    virsh(&[
        "vol-create-as",
        r.pool.name(),
        &vol,
        "1M",
        "--format",
        "qcow2",
    ])?;
    let before = std::fs::read(r.pool.dir().join(&vol))?;
    let (code, out) = d.cli(&r.restore_args(&id, &copy, &[]))?;
    ensure!(
        code == 1,
        "an existing volume is refused (409): exit {code} {out}"
    );
    ensure!(
        std::fs::read(r.pool.dir().join(&vol))? == before,
        "the existing volume is untouched"
    );
    ensure!(
        r.pool.volumes()? == [vol.clone()],
        "no volume made: {:?}",
        r.pool.volumes()?
    );
    ensure!(!defined(&copy)?, "no domain made");

    // A pool the hypervisor does not have: 404, naming the pools there are.
    let (code, _) = d.cli(&[
        "restore",
        &id,
        "--hypervisor",
        "remote",
        "--as-domain",
        &copy,
        "--pool",
        "no-such-pool",
    ])?;
    ensure!(code == 4, "a missing pool is not found (404): exit {code}");
    ensure!(!defined(&copy)?, "no domain made");
    Ok(())
}

#[test]
fn a_restore_cancelled_mid_upload_leaves_no_volume_and_no_domain() -> Result<()> {
    let r = Remote::new("rrd-cancel")?;
    let (vm, disk) = (&r.vm, r.disk.as_str());
    let mut model = Model::new(vm);
    model.write(vm, disk, 0, 24 * MIB, 5)?;
    vm.sync()?;
    let id = r.backup(&r.daemon("")?)?;
    // The upload is paced by read_limit (2 MiB/s: about 12 s for the 24 MiB of data).
    let d = r.daemon("read_limit = 2097152\n")?;
    let copy = r.copy_name("rrd-cancel");
    let _guard = Defined(copy.clone());
    let job = d.ok(&r.restore_args(&id, &copy, &["--no-wait"]))?;
    let jid = job["id"].as_u64().context("job id")?;
    let running = d.wait_job(jid, Duration::from_secs(60), |j| {
        j["state"] == "running" && j["progress"]["bytes_read"].as_u64().unwrap_or(0) > 0
    })?;
    let uploading = r.pool.volumes()?;
    ensure!(
        uploading == [format!(".{copy}-{disk}.qcow2.sluice-raw")],
        "the upload volume exists while uploading: {uploading:?} {running}"
    );
    d.ok(&["job", "cancel", &jid.to_string()])?;
    let end = d.wait_job(jid, Duration::from_secs(60), |j| {
        j["state"] != "running" && j["state"] != "queued"
    })?;
    ensure!(
        end["state"] == "cancelled",
        "the restore ends cancelled: {end}"
    );
    let read = end["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        read < 24 * MIB,
        "cancelled mid-upload, after {read} bytes: {end}"
    );
    let msg = end["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("removed what it made") && msg.contains("sluice-raw"),
        "the error names what it removed: {msg}"
    );
    ensure!(
        r.pool.volumes()?.is_empty(),
        "no volume left: {:?}",
        r.pool.volumes()?
    );
    ensure!(!defined(&copy)?, "no domain left");
    ensure!(vm.state()? == "running", "the original runs on");
    Ok(())
}
