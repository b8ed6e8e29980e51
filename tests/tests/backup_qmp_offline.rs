//! The backup job through the other two ways in: plain QEMU over QMP (no libvirt), and a
//! stopped libvirt VM read offline from its images (never started). Each backup is restored
//! through the repository and compared with the bytes written.

#[path = "hypervisor_support.rs"]
mod support;

use std::sync::Arc;

use anyhow::{ensure, Result};
use catalog::{BackupMode, Repository};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::Hypervisor;
use proxy::job::{run_backup, BackupOptions, BackupReport, Progress};
use support::{qemu_io, BiosVm, KIB, MIB};
use testbed::qmp::{guest_write, PlainQemu};
use testbed::{check_disk, TempRepo};
use tokio_util::sync::CancellationToken;

async fn backup<H: Hypervisor>(
    hv: &H,
    repo: &Repository,
    vm: &str,
    work: &std::path::Path,
) -> Result<BackupReport> {
    let opts = BackupOptions::new(work);
    Ok(run_backup(
        hv,
        repo,
        vm,
        &opts,
        Arc::new(Progress::default()),
        CancellationToken::new(),
    )
    .await?)
}

/// The expected disk: `size` zero bytes with `fills` (offset, len, byte) applied.
fn expected(size: u64, fills: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for &(o, l, b) in fills {
        v[o as usize..(o + l) as usize].fill(b);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_qemu_over_qmp_full_and_incrementals() -> Result<()> {
    let qemu = PlainQemu::start("bk-qmp", 64 * MIB, &["write -P 0xaa 0 1M"])?;
    let (hv, mut writer) = qemu.connect("vm").await?;
    let r = TempRepo::create()?;
    let work = qemu.dir().join("work");
    let mut fills = vec![(0, MIB, 0xaa)];

    let full = backup(&hv, &r, "vm", &work).await?;
    assert_eq!(full.manifest.mode, BackupMode::Full);
    check_disk(&r, &full.manifest, "disk0", &expected(64 * MIB, &fills))?;
    for (i, (off, len)) in [(8 * MIB, 64 * KIB), (16 * MIB + 4 * KIB, 4 * KIB)]
        .into_iter()
        .enumerate()
    {
        let byte = 0x21 + i as u8;
        guest_write(&mut writer, off, len, byte).await?;
        fills.push((off, len, byte));
        let inc = backup(&hv, &r, "vm", &work).await?;
        assert_eq!(inc.manifest.mode, BackupMode::Incremental);
        assert_eq!(inc.bytes_dirty, 64 * KIB);
        ensure!(inc.bytes_read <= 64 * KIB, "read {}", inc.bytes_read);
        check_disk(&r, &inc.manifest, "disk0", &expected(64 * MIB, &fills))?;
    }
    check_disk(
        &r,
        &full.manifest,
        "disk0",
        &expected(64 * MIB, &fills[..1]),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_vm_is_backed_up_offline_without_starting_it() -> Result<()> {
    let vm = BiosVm::define("bk-offline", &[32 * MIB], |disks| {
        qemu_io(&disks[0].1, "write -P 0x31 0 2M")
    })?;
    let hv = LibvirtHypervisor::connect("qemu:///system").await?;
    let r = TempRepo::create()?;
    let work = vm.dir.path().join("work");
    let mut fills = vec![(0, 2 * MIB, 0x31)];

    let full = backup(&hv, &r, &vm.name, &work).await?;
    assert_eq!(full.manifest.mode, BackupMode::Full);
    assert_eq!(vm.state()?, "shut off", "a stopped vm must not be started");
    check_disk(&r, &full.manifest, "vda", &expected(32 * MIB, &fills))?;

    qemu_io(vm.image("vda"), "write -P 0x32 4M 64k")?;
    fills.push((4 * MIB, 64 * KIB, 0x32));
    let inc = backup(&hv, &r, &vm.name, &work).await?;
    assert_eq!(inc.manifest.mode, BackupMode::Incremental);
    assert_eq!(inc.bytes_dirty, 64 * KIB);
    assert_eq!(vm.state()?, "shut off");
    check_disk(&r, &inc.manifest, "vda", &expected(32 * MIB, &fills))?;

    // Started later, the chain continues online from the checkpoint taken offline.
    vm.start()?;
    vm.write("vda", 6 * MIB, 64 * KIB, 0x33)?;
    fills.push((6 * MIB, 64 * KIB, 0x33));
    let online = backup(&hv, &r, &vm.name, &work).await?;
    assert_eq!(online.manifest.mode, BackupMode::Incremental);
    check_disk(&r, &online.manifest, "vda", &expected(32 * MIB, &fills))?;
    Ok(())
}
