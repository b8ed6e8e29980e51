//! The libvirt adapter with a real booted guest: the guest agent answers, freeze and thaw
//! (also by a dropped guard), and an incremental export's bitmap shows exactly the extents the
//! guest wrote, with the guest's bytes in them.

#[path = "hypervisor_support.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::{BackupRequest, Hypervisor};
use support::*;
use testbed::{pattern, read_nbd, TestVm, VmSpec};

const STATUS: &str = r#"{"execute":"guest-fsfreeze-status"}"#;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn request(vm: &TestVm, from: Option<&str>, new: Option<&str>) -> BackupRequest {
    BackupRequest {
        full_disks: Vec::new(),
        vm: vm.name().to_string(),
        disks: vec!["vda".into(), "vdb".into()],
        incremental_from: from.map(String::from),
        new_checkpoint: new.map(String::from),
        scratch_dir: Some(vm.scratch().to_path_buf()),
        socket: vm.scratch().join("backup.sock"),
        tcp: None,
    }
}

async fn wait_agent(hv: &LibvirtHypervisor, vm: &str) {
    let start = Instant::now();
    while !hv.agent_responds(vm).await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "guest agent never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_freeze_and_guest_writes_in_incremental_bitmap() -> Result<()> {
    let vm = blocking(|| {
        TestVm::boot(
            VmSpec::new("hv-guest")
                .disk(32 * MIB)
                .disk(16 * MIB)
                .guest_agent(true),
        )
    })?;
    let hv = LibvirtHypervisor::connect(testbed::libvirt::URI).await?;
    wait_agent(&hv, vm.name()).await;

    // Freeze a mounted filesystem; thaw explicitly, then by dropping the guard.
    blocking(|| -> Result<()> {
        vm.mkfs("vdb")?;
        vm.mount("vdb")
    })?;
    let guard = hv.freeze(vm.name()).await?;
    assert!(blocking(|| vm.guest_agent_command(STATUS))?.contains("frozen"));
    guard.thaw().await?;
    assert!(blocking(|| vm.guest_agent_command(STATUS))?.contains("thawed"));
    drop(hv.freeze(vm.name()).await?);
    let start = Instant::now();
    while !blocking(|| vm.guest_agent_command(STATUS))?.contains("thawed") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dropped freeze guard did not thaw"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    blocking(|| vm.umount("vdb"))?;

    hv.begin_backup(request(&vm, None, Some("cp1")))
        .await?
        .finish()
        .await?;
    blocking(|| -> Result<()> {
        vm.write_pattern("vda", 3 * MIB, 64 * KIB, 7)?;
        vm.write_pattern("vdb", MIB + 4 * KIB, 4 * KIB, 8)?;
        vm.sync()
    })?;
    let s = hv
        .begin_backup(request(&vm, Some("cp1"), Some("cp2")))
        .await?;
    let (a, b) = (s.exports()[0].clone(), s.exports()[1].clone());
    let ctx = |e: &proxy::hypervisor::DiskExport| e.dirty_bitmap_context.clone().expect("bitmap");
    assert_eq!(
        dirty_extents(&a.socket, &a.export_name, &ctx(&a))?,
        vec![(3 * MIB, 64 * KIB)]
    );
    assert_eq!(
        dirty_extents(&b.socket, &b.export_name, &ctx(&b))?,
        vec![(MIB, 64 * KIB)]
    );
    let bytes = blocking(|| read_nbd(&a.socket, &a.export_name, 3 * MIB, 64 * KIB))?;
    assert!(
        bytes == pattern(7, 3 * MIB, 64 * 1024),
        "export holds the guest's bytes"
    );
    let bytes = blocking(|| read_nbd(&b.socket, &b.export_name, MIB + 4 * KIB, 4 * KIB))?;
    assert!(bytes == pattern(8, MIB + 4 * KIB, 4 * 1024));
    s.finish().await?;
    Ok(())
}
