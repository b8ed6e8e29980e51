//! The libvirt adapter against real libvirt and QEMU: pull-mode full and incremental exports,
//! the checkpoint chain, abort and drop cleanup, checkpoint health, an unclean QEMU kill, and
//! stopped domains read offline.

#[path = "hypervisor_support.rs"]
mod support;

use anyhow::Result;
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::{
    BackupRequest, BackupSession, CheckpointHealth, CheckpointProblem, ErrorKind, ExpectedDisk,
    Hypervisor, VmState,
};
use support::*;
use testbed::virsh;

async fn connect() -> Result<LibvirtHypervisor> {
    Ok(LibvirtHypervisor::connect(testbed::libvirt::URI).await?)
}

fn request(vm: &BiosVm, disks: &[&str], from: Option<&str>, new: Option<&str>) -> BackupRequest {
    BackupRequest {
        full_disks: Vec::new(),
        vm: vm.name.clone(),
        disks: disks.iter().map(|d| d.to_string()).collect(),
        incremental_from: from.map(String::from),
        new_checkpoint: new.map(String::from),
        scratch_dir: Some(vm.dir.path().to_path_buf()),
        socket: vm.dir.path().join("nbd.sock"),
        tcp: None,
    }
}

fn export<'a>(s: &'a BackupSession, disk: &str) -> &'a proxy::hypervisor::DiskExport {
    s.exports()
        .iter()
        .find(|e| e.disk == disk)
        .expect("export of disk")
}

fn checkpoint_names(cps: &[proxy::hypervisor::CheckpointInfo]) -> Vec<&str> {
    cps.iter().map(|c| c.name.as_str()).collect()
}

/// Two disks with data written offline; returns the VM and copies of the images as they were.
fn two_disk_vm(tag: &str) -> Result<(BiosVm, Vec<std::path::PathBuf>)> {
    let vm = BiosVm::define(tag, &[64 * MIB, 32 * MIB], |disks| {
        qemu_io(&disks[0].1, "write -P 0xaa 0 1M")?;
        qemu_io(&disks[1].1, "write -P 0x5c 4M 128k")
    })?;
    let mut copies = Vec::new();
    for (target, path) in &vm.disks {
        let copy = vm.dir.path().join(format!("{target}.reference.qcow2"));
        std::fs::copy(path, &copy)?;
        copies.push(copy);
    }
    vm.start()?;
    Ok((vm, copies))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_exports_and_checkpoint_chain() -> Result<()> {
    let (vm, refs) = two_disk_vm("chain")?;
    let hv = connect().await?;
    let info = hv.domain(&vm.name).await?;
    assert_eq!(info.state, VmState::Running);
    let targets: Vec<_> = info
        .disks
        .iter()
        .map(|d| (d.target.as_str(), d.capacity, d.format.as_deref()))
        .collect();
    assert_eq!(
        targets,
        vec![
            ("vda", 64 * MIB, Some("qcow2")),
            ("vdb", 32 * MIB, Some("qcow2"))
        ]
    );
    assert!(hv.list_domains().await?.iter().any(|d| d.name == vm.name));

    // Full backup: the export equals the disk, holes are holes, and cp1 is created with it.
    let s = hv
        .begin_backup(request(&vm, &["vda", "vdb"], None, Some("cp1")))
        .await?;
    assert_eq!(s.new_checkpoint(), Some("cp1"));
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let e = export(&s, disk);
        assert_eq!(e.dirty_bitmap_context, None);
        export_equals(&refs[i], &e.socket, &e.export_name)?;
    }
    let vda = export(&s, "vda");
    assert_eq!(data_extents(&vda.socket, &vda.export_name)?, vec![(0, MIB)]);
    assert_eq!(files_with(vm.dir.path(), "scratch").len(), 2);
    s.finish().await?;
    assert!(!hv.has_job(&vm.name).await?);
    assert!(
        files_with(vm.dir.path(), "scratch").is_empty(),
        "libvirt removes scratch files"
    );
    let cps = hv.list_checkpoints(&vm.name).await?;
    assert_eq!(checkpoint_names(&cps), vec!["cp1"]);
    assert_eq!(cps[0].disks.len(), 2);
    assert!(cps[0].xml.as_deref().unwrap_or("").contains("<domain"));

    // Incremental since cp1: exactly what was written, at the bitmap's granularity.
    vm.write("vda", 8 * MIB, 64 * KIB, 0x11)?;
    vm.write("vdb", 0, 4 * KIB, 0x22)?;
    let s = hv
        .begin_backup(request(&vm, &["vda", "vdb"], Some("cp1"), Some("cp2")))
        .await?;
    // A write made while the export is open belongs to the next backup, not this one.
    vm.write("vda", 16 * MIB, 64 * KIB, 0x33)?;
    let (a, b) = (export(&s, "vda"), export(&s, "vdb"));
    let ctx_a = a
        .dirty_bitmap_context
        .clone()
        .expect("incremental has a bitmap");
    assert_eq!(ctx_a, "qemu:dirty-bitmap:backup-vda");
    assert_eq!(
        dirty_extents(&a.socket, &a.export_name, &ctx_a)?,
        vec![(8 * MIB, 64 * KIB)]
    );
    let ctx_b = b
        .dirty_bitmap_context
        .clone()
        .expect("incremental has a bitmap");
    assert_eq!(
        dirty_extents(&b.socket, &b.export_name, &ctx_b)?,
        vec![(0, 64 * KIB)]
    );
    s.finish().await?;

    // Since cp2: only the write made during the last export. Since cp1: libvirt merges both.
    let s = hv
        .begin_backup(request(&vm, &["vda"], Some("cp2"), None))
        .await?;
    let a = export(&s, "vda");
    let ctx = a.dirty_bitmap_context.clone().expect("bitmap");
    assert_eq!(
        dirty_extents(&a.socket, &a.export_name, &ctx)?,
        vec![(16 * MIB, 64 * KIB)]
    );
    s.finish().await?;
    let s = hv
        .begin_backup(request(&vm, &["vda"], Some("cp1"), Some("cp3")))
        .await?;
    let a = export(&s, "vda");
    let ctx = a.dirty_bitmap_context.clone().expect("bitmap");
    assert_eq!(
        dirty_extents(&a.socket, &a.export_name, &ctx)?,
        vec![(8 * MIB, 64 * KIB), (16 * MIB, 64 * KIB)]
    );
    s.finish().await?;
    assert_eq!(
        checkpoint_names(&hv.list_checkpoints(&vm.name).await?),
        vec!["cp1", "cp2", "cp3"]
    );

    hv.delete_checkpoint(&vm.name, "cp2", false).await?;
    assert_eq!(
        checkpoint_names(&hv.list_checkpoints(&vm.name).await?),
        vec!["cp1", "cp3"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_drop_end_the_job_and_remove_the_new_checkpoint() -> Result<()> {
    let (vm, _refs) = two_disk_vm("abort")?;
    let hv = connect().await?;
    let s = hv
        .begin_backup(request(&vm, &["vda"], None, Some("cp1")))
        .await?;
    assert!(hv.has_job(&vm.name).await?);
    s.abort().await?;
    assert!(!hv.has_job(&vm.name).await?);
    assert!(files_with(vm.dir.path(), "scratch").is_empty());
    assert!(
        hv.list_checkpoints(&vm.name).await?.is_empty(),
        "aborted backup leaves no checkpoint"
    );

    // Dropped without finish/abort: the guard still ends the job, in the background.
    let s = hv
        .begin_backup(request(&vm, &["vda", "vdb"], None, Some("cp2")))
        .await?;
    drop(s);
    let start = std::time::Instant::now();
    while hv.has_job(&vm.name).await? {
        assert!(
            start.elapsed().as_secs() < 10,
            "dropped session did not end the job"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(files_with(vm.dir.path(), "scratch").is_empty());
    assert!(hv.list_checkpoints(&vm.name).await?.is_empty());

    // Bad requests get clear errors, not panics.
    let bad = hv
        .begin_backup(request(&vm, &["vdz"], None, None))
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::NotFound);
    let bad = hv
        .begin_backup(request(&vm, &["vda"], None, Some("../evil")))
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
    let missing = hv
        .begin_backup(request(&vm, &["vda"], Some("nope"), None))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains(&vm.name), "{missing}");
    assert!(!hv.has_job(&vm.name).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_health_redefine_and_agent() -> Result<()> {
    let (vm, _refs) = two_disk_vm("health")?;
    let hv = connect().await?;
    hv.begin_backup(request(&vm, &["vda", "vdb"], None, Some("cp1")))
        .await?
        .finish()
        .await?;
    let want = |cap_a| {
        vec![
            ExpectedDisk {
                disk: "vda".into(),
                capacity: cap_a,
            },
            ExpectedDisk {
                disk: "vdb".into(),
                capacity: 32 * MIB,
            },
        ]
    };
    assert_eq!(
        hv.check_checkpoint(&vm.name, "cp1", &want(64 * MIB))
            .await?,
        CheckpointHealth::Usable
    );
    assert_eq!(
        hv.check_checkpoint(&vm.name, "cp1", &want(32 * MIB))
            .await?,
        CheckpointHealth::Unusable(vec![CheckpointProblem::SizeChanged {
            disk: "vda".into(),
            was: 32 * MIB,
            now: 64 * MIB
        }])
    );
    assert_eq!(
        hv.check_checkpoint(&vm.name, "cp9", &want(64 * MIB))
            .await?,
        CheckpointHealth::Unusable(vec![CheckpointProblem::CheckpointMissing])
    );

    // libvirt loses the metadata; the saved XML brings it back.
    // Size estimate: libvirt adds the changed bytes per disk since the checkpoint.
    vm.write("vda", 4 * MIB, 128 * KIB, 0x77)?;
    let sized = hv.checkpoint_xml(&vm.name, "cp1", true).await?;
    assert!(sized.contains("size='131072'"), "{sized}");
    let saved = hv.list_checkpoints(&vm.name).await?[0]
        .xml
        .clone()
        .expect("xml");
    hv.delete_checkpoint(&vm.name, "cp1", true).await?;
    assert!(hv.list_checkpoints(&vm.name).await?.is_empty());
    hv.redefine_checkpoint(&vm.name, &saved).await?;
    assert!(hv
        .check_checkpoint(&vm.name, "cp1", &want(64 * MIB))
        .await?
        .is_usable());

    // The bitmap disappears behind libvirt's back: validation catches it.
    let cmd = r#"{"execute":"query-block"}"#;
    let blocks: serde_json::Value =
        serde_json::from_str(&virsh(&["qemu-monitor-command", &vm.name, cmd])?)?;
    let node = blocks["return"][0]["inserted"]["node-name"]
        .as_str()
        .expect("node")
        .to_string();
    let rm = format!(
        r#"{{"execute":"block-dirty-bitmap-remove","arguments":{{"node":"{node}","name":"cp1"}}}}"#
    );
    virsh(&["qemu-monitor-command", &vm.name, &rm])?;
    match hv
        .check_checkpoint(&vm.name, "cp1", &want(64 * MIB))
        .await?
    {
        CheckpointHealth::Unusable(p) => {
            assert!(matches!(p[0], CheckpointProblem::Refused { .. }), "{p:?}")
        }
        h => panic!("removed bitmap reported as {h:?}"),
    }
    let err = hv
        .begin_backup(request(&vm, &["vda"], Some("cp1"), None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");

    // The agent channel exists but nothing answers in SeaBIOS.
    assert!(!hv.agent_responds(&vm.name).await);
    let err = hv.freeze(&vm.name).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AgentUnavailable, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_leaves_an_inconsistent_bitmap_that_is_detected() -> Result<()> {
    let (vm, _refs) = two_disk_vm("kill")?;
    let hv = connect().await?;
    let want = vec![ExpectedDisk {
        disk: "vda".into(),
        capacity: 64 * MIB,
    }];
    let kill = || -> Result<()> {
        // SAFETY: kill(2) of a pid read from libvirt's pid file, with a valid signal.
        unsafe { libc::kill(vm.qemu_pid()?, libc::SIGKILL) };
        vm.wait_state("shut off")
    };

    // Killed before QEMU ever stored it: the bitmap is simply not in the image.
    hv.begin_backup(request(&vm, &["vda"], None, Some("cp1")))
        .await?
        .finish()
        .await?;
    kill()?;
    assert_eq!(
        hv.check_checkpoint(&vm.name, "cp1", &want).await?,
        CheckpointHealth::Unusable(vec![CheckpointProblem::BitmapMissing {
            disk: "vda".into()
        }])
    );

    // Stored by a clean stop, loaded (and marked in-use) by the next start, then killed.
    vm.start()?;
    hv.begin_backup(request(&vm, &["vda"], None, Some("cp2")))
        .await?
        .finish()
        .await?;
    virsh(&["destroy", &vm.name, "--graceful"])?;
    assert!(hv
        .check_checkpoint(&vm.name, "cp2", &want)
        .await?
        .is_usable());
    vm.start()?;
    vm.write("vda", 2 * MIB, 64 * KIB, 0x44)?;
    kill()?;
    let flags = image_bitmaps(vm.image("vda"))?;
    assert!(
        flags
            .iter()
            .any(|(n, f)| n == "cp2" && f.iter().any(|x| x == "in-use")),
        "{flags:?}"
    );
    assert_eq!(
        hv.check_checkpoint(&vm.name, "cp2", &want).await?,
        CheckpointHealth::Unusable(vec![CheckpointProblem::BitmapInconsistent {
            disk: "vda".into()
        }])
    );
    let err = hv
        .begin_backup(request(&vm, &["vda"], Some("cp2"), None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");

    // The fallback, a full read of the stopped domain, works and starts a new chain.
    let s = hv
        .begin_backup(request(&vm, &["vda"], None, Some("cp3")))
        .await?;
    let e = export(&s, "vda");
    export_equals(vm.image("vda"), &e.socket, &e.export_name)?;
    s.finish().await?;
    let bitmaps = image_bitmaps(vm.image("vda"))?;
    assert!(
        bitmaps
            .iter()
            .any(|(n, f)| n == "cp3" && f.iter().any(|x| x == "auto")),
        "{bitmaps:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_domain_is_read_offline_with_its_bitmap() -> Result<()> {
    let vm = BiosVm::define("offline", &[64 * MIB], |disks| {
        let img = &disks[0].1;
        qemu_io(img, "write -P 0x01 0 4M")?;
        run(
            "qemu-img",
            &["bitmap", "--add", &img.to_string_lossy(), "cp0"],
        )?;
        qemu_io(img, "write -P 0x02 2M 128k")?;
        qemu_io(img, "write -P 0x03 40M 4k")
    })?;
    let hv = connect().await?;
    assert_eq!(hv.domain(&vm.name).await?.state, VmState::ShutOff);
    let s = hv
        .begin_backup(request(&vm, &["vda"], Some("cp0"), Some("cp1")))
        .await?;
    let e = export(&s, "vda").clone();
    assert_eq!(e.capacity, 64 * MIB);
    assert_eq!(
        e.dirty_bitmap_context.as_deref(),
        Some("qemu:dirty-bitmap:cp0")
    );
    let dirty = dirty_extents(&e.socket, &e.export_name, "qemu:dirty-bitmap:cp0")?;
    assert_eq!(dirty, vec![(2 * MIB, 128 * KIB), (40 * MIB, 64 * KIB)]);
    export_equals(vm.image("vda"), &e.socket, &e.export_name)?;
    s.finish().await?;
    assert!(!e.socket.exists(), "the qemu-nbd socket is removed");
    let names: Vec<_> = image_bitmaps(vm.image("vda"))?
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(names, vec!["cp0", "cp1"]);

    // A failed offline backup removes the bitmap it added.
    let s = hv
        .begin_backup(request(&vm, &["vda"], Some("cp1"), Some("cp2")))
        .await?;
    s.abort().await?;
    let names: Vec<_> = image_bitmaps(vm.image("vda"))?
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(names, vec!["cp0", "cp1"]);

    // libvirt learned cp1 (not the failed cp2): once started, the next online incremental
    // starts from it.
    assert_eq!(
        checkpoint_names(&hv.list_checkpoints(&vm.name).await?),
        vec!["cp1"]
    );
    vm.start()?;
    let want = vec![ExpectedDisk {
        disk: "vda".into(),
        capacity: 64 * MIB,
    }];
    assert!(hv
        .check_checkpoint(&vm.name, "cp1", &want)
        .await?
        .is_usable());
    vm.write("vda", 30 * MIB, 64 * KIB, 0x66)?;
    let s = hv
        .begin_backup(request(&vm, &["vda"], Some("cp1"), Some("cp3")))
        .await?;
    let e = export(&s, "vda");
    let ctx = e.dirty_bitmap_context.clone().expect("bitmap");
    assert_eq!(
        dirty_extents(&e.socket, &e.export_name, &ctx)?,
        vec![(30 * MIB, 64 * KIB)]
    );
    s.finish().await?;
    Ok(())
}

/// Listing VMs while another client defines and undefines domains never fails: a domain gone
/// between libvirt's list and its description is left out (this once failed a restore as a
/// new domain, which lists the names in use, while another test's VM was being removed).
/// The churn goes on until 30 listings have run and 100 churned domains were seen in them
/// (a sustained overlap: a few seconds here), however slow the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_survives_vms_deleted_meanwhile() -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const LISTINGS: usize = 30;
    testbed::libvirt::ensure_libvirt()?;
    let hv = connect().await?;
    let dir = tempfile::tempdir()?;
    let pid = std::process::id();
    let mut pairs = Vec::new();
    for i in 0..4 {
        let name = format!("{}churn-{pid}-{i}", testbed::vm::NAME_PREFIX);
        let xml = dir.path().join(format!("{i}.xml"));
        std::fs::write(
            &xml,
            format!(
                "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
                 <os><type arch='x86_64'>hvm</type></os></domain>"
            ),
        )?;
        pairs.push(format!("define {}\nundefine {name}\n", xml.display()));
    }
    let mut churn = std::process::Command::new("virsh")
        .args(["-c", testbed::libvirt::URI, "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut stdin = churn.stdin.take().expect("piped stdin");
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        // Blocking writes: the pipe paces the feeder to virsh's speed.
        std::thread::spawn(move || {
            let mut sent = 0usize;
            for pair in pairs.iter().cycle() {
                if stop.load(Ordering::Relaxed) || stdin.write_all(pair.as_bytes()).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    let mut seen_churn = 0;
    let mut failure = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut n = 0;
    // Until 30 listings have run and 100 churned domains were seen (virsh takes a moment to
    // start), within a minute.
    while (n < LISTINGS || seen_churn < 100) && std::time::Instant::now() < deadline {
        n += 1;
        match hv.list_domains().await {
            Ok(doms) => {
                seen_churn += doms
                    .iter()
                    .filter(|d| d.name.contains(&format!("churn-{pid}-")))
                    .count()
            }
            Err(e) => {
                failure = Some(format!(
                    "listing {n} failed while domains came and went: {e}"
                ));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().expect("feeder thread");
    let status = churn.wait()?;
    if let Some(f) = failure {
        anyhow::bail!(f);
    }
    anyhow::ensure!(status.success(), "virsh define/undefine loop: {status}");
    eprintln!(
        "{n} listings beside {sent} define/undefine pairs; {seen_churn} churned domains seen"
    );
    anyhow::ensure!(
        n >= LISTINGS && seen_churn >= 100,
        "within 60 s only {n} listings, {seen_churn} saw a churned domain: the churn did not overlap the listings"
    );
    let left = testbed::libvirt::domain_names()?;
    anyhow::ensure!(
        !left.iter().any(|n| n.contains(&format!("churn-{pid}-"))),
        "churned domains left defined: {left:?}"
    );
    Ok(())
}
