//! The second host that shares only the network: libvirt answers on
//! `qemu+tls://127.0.0.1/system` with the test bed's client certificate, an isolated process
//! (own user, private mount namespace) reaches libvirt only that way and sees none of the
//! hypervisor's files, and a pull-mode backup served over TCP with TLS is read with the NBD
//! client certificate while plain NBD is refused.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::{Command, Output};
use testbed::remote::free_port;
use testbed::{pattern, Isolated, ScratchDir, TestVm, TlsHost, VmSpec, NAME_PREFIX};

const MIB: u64 = 1 << 20;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `Isolated::output`, failing unless it exits with success; returns stdout.
fn isolated_ok(iso: &Isolated, program: &str, args: &[&str], hide: &[&Path]) -> Result<String> {
    let out = iso.output(program, args, hide)?;
    let (stdout, stderr) = text(&out);
    ensure!(
        out.status.success(),
        "isolated {program} {args:?}: {}: {stderr}",
        out.status
    );
    Ok(stdout)
}

#[test]
fn an_isolated_process_reaches_libvirt_only_over_tls() -> Result<()> {
    let host = TlsHost::ensure()?;
    let iso = Isolated::ensure()?;
    let uri = host.uri();
    host.virsh(&["list", "--all"])?;

    let images = ScratchDir::create(&format!("{NAME_PREFIX}tls-hide-{}-0", std::process::id()))?;
    std::fs::write(images.path().join("disk.qcow2"), b"not for the proxy")?;
    let hide = [images.path()];
    let dir = images.path().to_str().context("utf-8 path")?;

    // Who it runs as: the user and its own group, nothing else.
    let id = isolated_ok(&iso, "id", &["-u"], &hide)?;
    assert_eq!(id.trim(), iso.uid.to_string());
    let groups = isolated_ok(&iso, "id", &["-G"], &hide)?;
    assert_eq!(groups.trim(), iso.gid.to_string());

    // The local socket is gone, and so are the image and libvirt's state.
    let local = iso.output("virsh", &["-c", "qemu:///system", "list", "--all"], &hide)?;
    let (_, err) = text(&local);
    assert!(!local.status.success(), "qemu:///system answered inside");
    assert!(err.contains("libvirt-sock"), "qemu:///system inside: {err}");
    let seen = isolated_ok(
        &iso,
        "find",
        &["/var/lib/libvirt", "/run/libvirt", dir, "-mindepth", "1"],
        &hide,
    )?;
    assert_eq!(seen, "", "hidden directories are not empty inside");

    // TLS works for the user with the client directory it owns.
    isolated_ok(&iso, "virsh", &["-c", &uri, "list", "--all"], &hide)?;

    // Its data directory is its own; the host's mounts are untouched.
    let data = iso.data_dir("tls-test")?;
    let marker = data.path().join("written-inside");
    let marker_s = marker.to_str().context("utf-8 path")?;
    isolated_ok(&iso, "touch", &[marker_s], &hide)?;
    assert!(marker.exists());
    assert!(images.path().join("disk.qcow2").exists());
    testbed::virsh(&["version"])?;
    Ok(())
}

/// `<domainbackup>` asking QEMU for a TCP export with TLS on `port`; no `<disks>`, so libvirt
/// puts the scratch file beside the image.
fn backup_xml(port: u16) -> String {
    format!(
        "<domainbackup mode='pull'>\
         <server transport='tcp' name='127.0.0.1' port='{port}' tls='yes'/>\
         </domainbackup>"
    )
}

fn nbd_tool(tool: &str, args: &[&str]) -> Result<Output> {
    Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool} (install it with `make deps`)"))
}

/// `nbdinfo --map` lines as (offset, length, type).
fn extents(map: &str) -> Result<Vec<(u64, u64, u32)>> {
    map.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            ensure!(f.len() >= 3, "nbdinfo --map line {l:?}");
            Ok((f[0].parse()?, f[1].parse()?, f[2].parse()?))
        })
        .collect()
}

#[test]
fn a_tls_pull_backup_is_read_with_the_client_certificate_only() -> Result<()> {
    let host = TlsHost::ensure()?;
    let iso = Isolated::ensure()?;
    let vm = TestVm::boot(VmSpec::new("tls-backup").disk(16 * MIB))?;
    vm.write_pattern("vda", 0, MIB, 7)?;
    vm.sync()?;

    let port = free_port()?;
    let xml = vm.scratch().join("backup.xml");
    std::fs::write(&xml, backup_xml(port))?;
    host.virsh(&[
        "backup-begin",
        vm.name(),
        xml.to_str().context("utf-8 path")?,
    ])?;
    // libvirt placed the scratch file beside the image: `IMAGE.TIMESTAMP` (no checkpoint).
    let job = host.virsh(&["backup-dumpxml", vm.name()])?;
    let image = vm.disk_path("vda")?.display().to_string();
    assert!(
        job.contains(&format!("<scratch file='{image}.")),
        "backup-dumpxml: {job}"
    );

    // Plain NBD: every option before STARTTLS is refused.
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/vda"))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .context("cannot run nbdinfo (install it with `make deps`)")?;
    let (_, err) = text(&plain);
    assert!(!plain.status.success(), "plain NBD was served");
    // libnbd's debug log has QEMU's reason (its own message is "Operation not supported").
    let reason: Vec<&str> = err.lines().filter(|l| l.contains("server error")).collect();
    assert!(
        reason
            .iter()
            .any(|l| l.ends_with("not permitted before TLS")),
        "plain NBD: {err}"
    );

    // TLS that trusts the CA but shows no client certificate: cut off.
    let ca_only = tempfile::tempdir()?;
    std::fs::copy(host.ca_cert(), ca_only.path().join("ca-cert.pem"))?;
    let no_cert = format!(
        "nbds://127.0.0.1:{port}/vda?tls-certificates={}",
        ca_only.path().display()
    );
    let anon = nbd_tool("nbdinfo", &[&no_cert])?;
    assert!(
        !anon.status.success(),
        "served without a client certificate"
    );
    let (_, anon_err) = text(&anon);
    assert!(
        anon_err.contains("TLS connection"),
        "no client certificate: {anon_err}"
    );

    // With it, as the isolated user that cannot see the image: the map and the bytes.
    let uri = host.nbd_uri(port, "vda");
    let map = isolated_ok(&iso, "nbdinfo", &["--map", &uri], &[vm.scratch()])?;
    // Data where the guest wrote, holes (type bit 0) everywhere else.
    eprintln!("nbdinfo --map {uri}:\n{map}");
    let ext = extents(&map)?;
    for &(off, len, kind) in &ext {
        let written = off < MIB;
        assert!(
            !written || off + len <= MIB,
            "extent {off}+{len} straddles 1 MiB: {map}"
        );
        assert_eq!(
            kind & 1 == 0,
            written,
            "extent {off}+{len} type {kind}: {map}"
        );
    }
    assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), 16 * MIB, "{map}");
    let out = tempfile::NamedTempFile::new()?;
    let copied = nbd_tool(
        "nbdcopy",
        &[&uri, out.path().to_str().context("utf-8 path")?],
    )?;
    ensure!(copied.status.success(), "nbdcopy: {}", text(&copied).1);
    let bytes = std::fs::read(out.path())?;
    assert!(bytes[..MIB as usize] == pattern(7, 0, MIB as usize)[..]);
    assert!(bytes[MIB as usize..].iter().all(|b| *b == 0));

    host.virsh(&["domjobabort", vm.name()])?;
    Ok(())
}
