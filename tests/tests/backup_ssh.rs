//! Backups of a hypervisor reached over ssh, with the proxy isolated from it: `sluice serve`
//! runs as its own unprivileged user in a mount namespace where libvirt's directories and
//! the guest's image directory are empty (`testbed::Isolated`), reaches libvirt only over
//! `qemu+ssh://root@127.0.0.1:PORT/system` with `ssh_key` and `ssh_known_hosts` (the test
//! bed's own sshd, `testbed::ssh`) and reads each disk from QEMU's NBD server over TCP with
//! TLS (`[hypervisors.backup_data]`). Driven through the CLI: a full and an incremental
//! backup restored byte-exact; a host key that changed, or is unknown, is refused at once
//! with an error naming the host and the known-hosts file, never a prompt or a hang.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use testbed::daemon::Daemon;
use testbed::remote_guest::{backup_data, RemoteGuest};
use testbed::ssh::SshHost;
use testbed::{Model, TlsHost, VmSpec};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// The configuration of a daemon whose one hypervisor, `ssh`, is the test bed's libvirt
/// over ssh (the host key checked against `known_hosts`), its backup data over TLS.
fn ssh_config(ssh: &SshHost, known_hosts: &Path, tls: &TlsHost, first_port: u16) -> String {
    format!(
        "[[hypervisors]]\nname = \"ssh\"\nlibvirt_uri = \"{uri}\"\n\
         ssh_key = \"{key}\"\nssh_known_hosts = \"{known_hosts}\"\n{data}",
        uri = ssh.uri(),
        key = ssh.key().display(),
        known_hosts = known_hosts.display(),
        data = backup_data(tls, first_port),
    )
}

/// A booted guest of the test bed's libvirt, and isolated daemons that reach it over ssh.
struct Remote {
    ssh: SshHost,
    g: RemoteGuest,
}

impl std::ops::Deref for Remote {
    type Target = RemoteGuest;

    fn deref(&self) -> &RemoteGuest {
        &self.g
    }
}

impl Remote {
    fn new(prefix: &str) -> Result<Remote> {
        let ssh = SshHost::ensure()?;
        let g = RemoteGuest::boot(prefix, VmSpec::new(prefix).disk(SIZE))?;
        Ok(Remote { ssh, g })
    }

    /// An isolated daemon whose hypervisor's host key is checked against `known_hosts`.
    fn daemon(&self, known_hosts: &Path) -> Result<Daemon> {
        self.g.daemon_with(&ssh_config(
            &self.ssh,
            known_hosts,
            &self.host,
            self.first_port,
        ))
    }
}

/// `sluice hypervisor list`: the entry of hypervisor `ssh`.
fn ssh_entry(d: &Daemon) -> Result<Value> {
    let list = d.ok(&["hypervisor", "list"])?;
    list.as_array()
        .and_then(|l| l.iter().find(|h| h["name"] == "ssh"))
        .cloned()
        .with_context(|| format!("no hypervisor ssh in {list}"))
}

/// The key file's path and the libssh form of the URI appear in no answer.
fn ensure_no_secret(r: &Remote, what: &str, text: &str) -> Result<()> {
    let key = r.ssh.key().display().to_string();
    ensure!(
        !text.contains(&key) && !text.contains("keyfile") && !text.contains("libssh://"),
        "{what} names the ssh key or the libssh URI: {text}"
    );
    Ok(())
}

#[test]
fn an_isolated_proxy_backs_up_a_hypervisor_reached_over_ssh() -> Result<()> {
    let r = Remote::new("ssh-bk")?;
    let (vm, disk) = (&r.vm, r.disk.as_str());
    ensure!(
        r.ssh.virsh(&["list", "--name"])?.contains(vm.name()),
        "the test bed's sshd reaches libvirt as root"
    );
    let d = r.daemon(&r.ssh.known_hosts())?;
    let vms = d.ok(&["vm", "list"])?;
    ensure!(
        vms["vms"].as_array().is_some_and(|l| l
            .iter()
            .any(|v| v["name"] == vm.name() && v["hypervisor"] == "ssh")),
        "vm list over qemu+ssh lacks {}: {vms}",
        vm.name()
    );
    let hv = ssh_entry(&d)?;
    ensure!(
        hv["state"] == "up" && hv["uri"] == r.ssh.uri().as_str(),
        "GET /hypervisors shows the URI as configured, without a query: {hv}"
    );
    ensure_no_secret(&r, "hypervisor list", &hv.to_string())?;

    let mut model = Model::new(vm);
    model.write(vm, disk, 0, 4 * MIB, 1)?;
    vm.sync()?;
    let full = d.backup_on("ssh", vm.name(), true)?;
    let full_id = full["backup_id"].as_str().context("backup id")?.to_string();
    let at_full = model.clone();
    // Retention orders backups by their start second, so the incremental starts later.
    std::thread::sleep(Duration::from_millis(1100));
    model.write(vm, disk, 8 * MIB, MIB, 2)?;
    vm.sync()?;
    let inc = d.backup_on("ssh", vm.name(), false)?;
    let inc_id = inc["backup_id"].as_str().context("backup id")?.to_string();
    let read = inc["progress"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        read <= 2 * MIB,
        "the incremental read {read} bytes for 1 MiB changed: {inc}"
    );
    let shown = d.ok(&["backup", "show", &inc_id])?;
    ensure!(shown["mode"] == "incremental", "second backup: {shown}");
    d.restore_equals(&full_id, &at_full, disk, "full")?;
    d.restore_equals(&inc_id, &model, disk, "inc")
}

/// What a daemon whose known-hosts file does not hold sshd's key says, through `vm list`,
/// `hypervisor list` and a backup, each within `limit`: the errors, which must name the host
/// and the known-hosts file and leave that file as it was (nothing accepted or added).
fn refused(r: &Remote, known_hosts: &Path, limit: Duration) -> Result<Vec<String>> {
    let before = std::fs::read(known_hosts)?;
    let d = r.daemon(known_hosts)?;
    let mut errors = Vec::new();
    let start = Instant::now();
    let vms = d.ok(&["vm", "list"])?;
    let took = start.elapsed();
    ensure!(took < limit, "vm list took {took:?}: {vms}");
    let unreachable = vms["unreachable"]
        .as_array()
        .and_then(|l| l.iter().find(|u| u["hypervisor"] == "ssh"))
        .with_context(|| format!("vm list names ssh unreachable: {vms}"))?;
    errors.push(
        unreachable["error"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    );
    let hv = ssh_entry(&d)?;
    ensure!(hv["state"] == "unreachable", "{hv}");
    errors.push(hv["error"].as_str().unwrap_or_default().to_string());
    let start = Instant::now();
    let out = d.command(&["backup", r.vm.name(), "--wait"])?.output()?;
    let took = start.elapsed();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && took < limit,
        "backup: {} after {took:?}: {said}",
        out.status
    );
    errors.push(said);
    for e in &errors {
        ensure!(
            e.contains("ssh host key of 127.0.0.1:")
                && e.contains("known-hosts file")
                && e.contains("ssh_known_hosts of hypervisor ssh"),
            "the refusal names the host and the known-hosts file: {e}"
        );
        ensure!(
            !e.contains("no answer within"),
            "refused, not timed out: {e}"
        );
        ensure_no_secret(r, "the refusal", e)?;
    }
    ensure!(
        std::fs::read(known_hosts)? == before,
        "the known-hosts file is left as it was"
    );
    Ok(errors)
}

/// A host key that changed is refused with libvirt's reason and what to check; so is a host
/// the known-hosts file does not know (no prompt, no key accepted): at once, not after the
/// connection timeout.
#[test]
fn a_changed_or_unknown_host_key_is_refused_naming_the_host_and_the_known_hosts_file() -> Result<()>
{
    let r = Remote::new("ssh-key")?;
    let limit = Duration::from_secs(8);
    let changed = refused(&r, &r.ssh.changed_known_hosts(), limit)?;
    ensure!(
        changed[0].contains("HOST KEY VERIFICATION FAILED")
            && changed[0].contains("stored in 'ssh_known_hosts'"),
        "libvirt's reason, with the file named by its setting: {}",
        changed[0]
    );
    let unknown = refused(&r, &r.ssh.unknown_known_hosts(), limit)?;
    ensure!(
        unknown[0].contains("Can't verify the session host key"),
        "an unknown host is refused, not asked about: {}",
        unknown[0]
    );
    Ok(())
}
