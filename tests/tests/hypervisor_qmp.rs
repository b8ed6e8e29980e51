//! The QMP adapter against real `qemu-storage-daemon` and `qemu-system-x86_64 -qmp`, and the
//! offline path against images left by a QEMU killed with SIGKILL.

#[path = "hypervisor_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use proxy::hypervisor::offline::{self, OfflineDisk, OfflineRequest};
use proxy::hypervisor::qmp::QmpHypervisor;
use proxy::hypervisor::{
    BackupRequest, CheckpointHealth, CheckpointProblem, ErrorKind, ExpectedDisk, Hypervisor,
};
use support::*;
use testbed::inspect::bitmap_extents;
use testbed::qmp::{backup_request, checkpoint_names, guest_write, qsd, PlainQemu};
use testbed::ScratchDir;

/// A backup request for `disk0` of `vm`.
fn request(dir: &Path, vm: &str, from: Option<&str>, new: Option<&str>) -> BackupRequest {
    backup_request(vm, "disk0", dir, from, new)
}

/// A 64 MiB image with data, bitmap `cp0`, then writes that `cp0` records; and a copy.
fn prepared_image(dir: &ScratchDir) -> Result<(PathBuf, PathBuf)> {
    let image = dir.path().join("disk0.qcow2");
    create_qcow2(&image, 64 * MIB)?;
    qemu_io(&image, "write -P 0xaa 0 1M")?;
    run(
        "qemu-img",
        &["bitmap", "--add", &image.to_string_lossy(), "cp0"],
    )?;
    qemu_io(&image, "write -P 0x11 2M 64k")?;
    qemu_io(&image, "write -P 0x12 5M 4k")?;
    let reference = dir.path().join("reference.qcow2");
    std::fs::copy(&image, &reference)?;
    Ok((image, reference))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_daemon_full_incremental_abort_and_drop() -> Result<()> {
    let dir = ScratchDir::create(&format!("hv-qsd-{}", std::process::id()))?;
    let (image, reference) = prepared_image(&dir)?;
    let qmp = dir.path().join("qmp.sock");
    let _qsd = qsd(&image, &qmp)?;
    let hv = QmpHypervisor::connect(&qmp, "qsd").await?;
    let info = hv.domain("qsd").await?;
    assert_eq!(info.disks.len(), 1);
    assert_eq!(
        (info.disks[0].target.as_str(), info.disks[0].capacity),
        ("disk0", 64 * MIB)
    );
    assert_eq!(checkpoint_names(&hv, "qsd").await?, vec!["cp0"]);

    let s = hv
        .begin_backup(request(dir.path(), "qsd", None, Some("cp1")))
        .await?;
    let e = s.exports()[0].clone();
    assert_eq!(e.dirty_bitmap_context, None);
    export_equals(&reference, &e.socket, &e.export_name)?;
    assert_eq!(
        data_extents(&e.socket, &e.export_name)?,
        vec![(0, MIB), (2 * MIB, 64 * KIB), (5 * MIB, 64 * KIB)]
    );
    s.finish().await?;
    assert!(files_with(dir.path(), "scratch").is_empty());
    assert_eq!(checkpoint_names(&hv, "qsd").await?, vec!["cp0", "cp1"]);

    let s = hv
        .begin_backup(request(dir.path(), "qsd", Some("cp0"), Some("cp2")))
        .await?;
    let e = s.exports()[0].clone();
    let ctx = e
        .dirty_bitmap_context
        .clone()
        .expect("incremental has a bitmap");
    assert_eq!(ctx, "qemu:dirty-bitmap:sluice-backup-disk0");
    assert_eq!(
        bitmap_extents(&e)?,
        vec![(2 * MIB, 64 * KIB), (5 * MIB, 64 * KIB)]
    );
    export_equals(&reference, &e.socket, &e.export_name)?;
    s.abort().await?;
    assert_eq!(
        checkpoint_names(&hv, "qsd").await?,
        vec!["cp0", "cp1"],
        "abort removes the new checkpoint"
    );
    let bitmaps = hv.bitmaps().await?;
    assert!(
        bitmaps["disk0"]
            .iter()
            .all(|b| !b.name.starts_with("sluice-")),
        "{bitmaps:?}"
    );
    assert!(files_with(dir.path(), "scratch").is_empty());

    // Dropped without finish/abort: torn down in the background, so the next one can start.
    let s = hv
        .begin_backup(request(dir.path(), "qsd", Some("cp1"), None))
        .await?;
    drop(s);
    let start = Instant::now();
    while !files_with(dir.path(), "scratch").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dropped session was not torn down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = hv
        .begin_backup(request(dir.path(), "qsd", Some("cp1"), None))
        .await?;
    assert!(
        bitmap_extents(&s.exports()[0])?.is_empty(),
        "nothing changed since cp1"
    );
    s.finish().await?;

    let want = |capacity| {
        vec![ExpectedDisk {
            disk: "disk0".into(),
            capacity,
        }]
    };
    assert!(hv
        .check_checkpoint("qsd", "cp1", &want(64 * MIB))
        .await?
        .is_usable());
    assert_eq!(
        hv.check_checkpoint("qsd", "cp1", &want(MIB)).await?,
        CheckpointHealth::Unusable(vec![CheckpointProblem::SizeChanged {
            disk: "disk0".into(),
            was: MIB,
            now: 64 * MIB
        }])
    );
    assert_eq!(
        hv.check_checkpoint("qsd", "cp7", &want(64 * MIB)).await?,
        CheckpointHealth::Unusable(vec![CheckpointProblem::BitmapMissing {
            disk: "disk0".into()
        }])
    );
    let err = hv
        .begin_backup(request(dir.path(), "qsd", Some("cp7"), None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent);
    hv.delete_checkpoint("qsd", "cp0", false).await?;
    assert_eq!(checkpoint_names(&hv, "qsd").await?, vec!["cp1"]);
    assert!(!hv.agent_responds("qsd").await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_system_incrementals_see_exactly_the_writes() -> Result<()> {
    let qemu = PlainQemu::start("hv-qemu", 64 * MIB, &["write -P 0xaa 0 1M"])?;
    let (hv, mut writer) = qemu.connect("vm").await?;
    let dir = qemu.dir();
    assert_eq!(hv.domain("vm").await?.disks[0].target, "disk0");

    hv.begin_backup(request(dir, "vm", None, Some("cp1")))
        .await?
        .finish()
        .await?;
    guest_write(&mut writer, 8 * MIB, 64 * KIB, 0x21).await?;
    let s = hv
        .begin_backup(request(dir, "vm", Some("cp1"), Some("cp2")))
        .await?;
    guest_write(&mut writer, 16 * MIB, 64 * KIB, 0x22).await?; // during the export
    let e = s.exports()[0].clone();
    assert_eq!(bitmap_extents(&e)?, vec![(8 * MIB, 64 * KIB)]);
    // The export is the point in time: the write made during it reads as the old zeros.
    let map = data_extents(&e.socket, &e.export_name)?;
    assert!(
        map.iter()
            .all(|&(o, l)| o + l <= 16 * MIB || o >= 16 * MIB + 64 * KIB),
        "{map:?}"
    );
    s.finish().await?;

    let s = hv
        .begin_backup(request(dir, "vm", Some("cp2"), Some("cp3")))
        .await?;
    assert_eq!(bitmap_extents(&s.exports()[0])?, vec![(16 * MIB, 64 * KIB)]);
    s.finish().await?;
    assert_eq!(
        checkpoint_names(&hv, "vm").await?,
        vec!["cp1", "cp2", "cp3"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_leaves_bitmap_in_use_and_every_path_refuses_it() -> Result<()> {
    let dir = ScratchDir::create(&format!("hv-kill-{}", std::process::id()))?;
    let (image, _reference) = prepared_image(&dir)?;
    let qmp = dir.path().join("qmp.sock");
    let mut daemon = qsd(&image, &qmp)?;
    daemon.kill9();
    let flags = image_bitmaps(&image)?;
    assert!(
        flags
            .iter()
            .any(|(n, f)| n == "cp0" && f.iter().any(|x| x == "in-use")),
        "{flags:?}"
    );

    // Offline: the health check and the export both refuse the bitmap.
    let disks = vec![OfflineDisk {
        disk: "disk0".into(),
        image: image.clone(),
        format: "qcow2".into(),
        tracked: true,
    }];
    let want = vec![ExpectedDisk {
        disk: "disk0".into(),
        capacity: 64 * MIB,
    }];
    let inconsistent = CheckpointHealth::Unusable(vec![CheckpointProblem::BitmapInconsistent {
        disk: "disk0".into(),
    }]);
    assert_eq!(
        offline::check_bitmaps(&disks, "cp0", &want).await?,
        inconsistent
    );
    let req = OfflineRequest {
        vm: "vm".into(),
        disks: disks.clone(),
        incremental_from: Some("cp0".into()),
        new_checkpoint: Some("cp1".into()),
        socket: dir.path().join("nbd.sock"),
    };
    let err = offline::begin_offline_backup(req.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");
    let names: Vec<_> = image_bitmaps(&image)?.into_iter().map(|b| b.0).collect();
    assert_eq!(names, vec!["cp0"], "a refused backup adds no bitmap");

    // Offline full read is the fallback and works.
    let full = OfflineRequest {
        incremental_from: None,
        ..req
    };
    let s = offline::begin_offline_backup(full).await?;
    let e = s.exports()[0].clone();
    assert_eq!(e.socket, dir.path().join("nbd.sock.disk0"));
    export_equals(&image, &e.socket, &e.export_name)?;
    s.finish().await?;
    assert!(!e.socket.exists());

    // Online: QEMU loads it as inconsistent; the adapter says so and refuses an incremental.
    let _daemon = qsd(&image, &qmp)?;
    let hv = QmpHypervisor::connect(&qmp, "vm").await?;
    assert_eq!(hv.check_checkpoint("vm", "cp0", &want).await?, inconsistent);
    let err = hv
        .begin_backup(request(dir.path(), "vm", Some("cp0"), None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");
    hv.delete_checkpoint("vm", "cp0", false).await?;
    assert!(hv.check_checkpoint("vm", "cp1", &want).await?.is_usable());
    Ok(())
}
