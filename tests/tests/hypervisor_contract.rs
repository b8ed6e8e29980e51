//! One contract, written once against the `Hypervisor` trait, run against every adapter: the
//! libvirt adapter (a SeaBIOS TCG domain) and the QMP adapter (`qemu-system-x86_64 -qmp`).

#[path = "hypervisor_support.rs"]
mod support;

use anyhow::Result;
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::{
    BackupRequest, CheckpointHealth, CheckpointProblem, ErrorKind, ExpectedDisk, Hypervisor,
};
use support::*;
use testbed::inspect::bitmap_extents;
use testbed::qmp::{backup_request, checkpoint_names, guest_write, PlainQemu};

/// The VM under test: its name, the disk to back up and where scratch files and sockets go.
struct Subject<'a> {
    vm: &'a str,
    disk: &'a str,
    dir: &'a std::path::Path,
}

impl Subject<'_> {
    fn request(&self, from: Option<&str>, new: Option<&str>) -> BackupRequest {
        backup_request(self.vm, self.disk, self.dir, from, new)
    }
}

/// The disk is 64 MiB with its first MiB written; `write(offset, len, byte)` changes it while
/// it runs.
async fn contract<H: Hypervisor>(
    hv: &H,
    s: &Subject<'_>,
    mut write: impl AsyncFnMut(u64, u64, u8) -> Result<()>,
) -> Result<()> {
    let info = hv.domain(s.vm).await?;
    let disk = info
        .disks
        .iter()
        .find(|d| d.target == s.disk)
        .expect("disk listed");
    assert_eq!(disk.capacity, 64 * MIB);

    // Full: the whole disk, holes as holes, no bitmap; creates the first checkpoint.
    let b = hv.begin_backup(s.request(None, Some("c1"))).await?;
    let e = b.exports()[0].clone();
    assert_eq!(
        (
            e.disk.as_str(),
            e.capacity,
            e.dirty_bitmap_context.as_deref()
        ),
        (s.disk, 64 * MIB, None)
    );
    assert_eq!(data_extents(&e.socket, &e.export_name)?, vec![(0, MIB)]);
    b.finish().await?;
    assert!(checkpoint_names(hv, s.vm)
        .await?
        .contains(&"c1".to_string()));
    let want = |capacity| {
        vec![ExpectedDisk {
            disk: s.disk.into(),
            capacity,
        }]
    };
    assert!(hv
        .check_checkpoint(s.vm, "c1", &want(64 * MIB))
        .await?
        .is_usable());
    let resized = CheckpointProblem::SizeChanged {
        disk: s.disk.into(),
        was: 32 * MIB,
        now: 64 * MIB,
    };
    assert_eq!(
        hv.check_checkpoint(s.vm, "c1", &want(32 * MIB)).await?,
        CheckpointHealth::Unusable(vec![resized])
    );
    assert!(!hv
        .check_checkpoint(s.vm, "c0", &want(64 * MIB))
        .await?
        .is_usable());

    // A failed incremental does not advance the chain: the next one still sees the change.
    write(8 * MIB, 64 * KIB, 0x31).await?;
    let b = hv.begin_backup(s.request(Some("c1"), Some("c2"))).await?;
    assert_eq!(bitmap_extents(&b.exports()[0])?, vec![(8 * MIB, 64 * KIB)]);
    b.abort().await?;
    assert!(!checkpoint_names(hv, s.vm)
        .await?
        .contains(&"c2".to_string()));
    assert!(files_with(s.dir, "scratch").is_empty());
    let b = hv.begin_backup(s.request(Some("c1"), Some("c3"))).await?;
    assert_eq!(bitmap_extents(&b.exports()[0])?, vec![(8 * MIB, 64 * KIB)]);
    b.finish().await?;

    hv.delete_checkpoint(s.vm, "c1", false).await?;
    assert_eq!(checkpoint_names(hv, s.vm).await?, vec!["c3"]);

    // Bad input: clear errors, nothing started.
    let bad = |r| async move { hv.begin_backup(r).await.unwrap_err().kind() };
    assert_eq!(
        bad(s.request(None, Some("a/b"))).await,
        ErrorKind::InvalidInput
    );
    let mut nodisk = s.request(None, None);
    nodisk.disks = vec!["nosuchdisk".into()];
    assert_eq!(bad(nodisk).await, ErrorKind::NotFound);
    assert!(files_with(s.dir, "scratch").is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_adapter_meets_the_contract() -> Result<()> {
    let vm = BiosVm::define("contract", &[64 * MIB], |d| {
        qemu_io(&d[0].1, "write -P 0xaa 0 1M")
    })?;
    vm.start()?;
    let hv = LibvirtHypervisor::connect(testbed::libvirt::URI).await?;
    let subject = Subject {
        vm: &vm.name,
        disk: "vda",
        dir: vm.dir.path(),
    };
    contract(&hv, &subject, async |off, len, byte| {
        vm.write("vda", off, len, byte)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_adapter_meets_the_contract() -> Result<()> {
    let qemu = PlainQemu::start("hv-contract", 64 * MIB, &["write -P 0xaa 0 1M"])?;
    let (hv, mut writer) = qemu.connect("vm").await?;
    let subject = Subject {
        vm: "vm",
        disk: "disk0",
        dir: qemu.dir(),
    };
    contract(&hv, &subject, async |off, len, byte| {
        guest_write(&mut writer, off, len, byte).await
    })
    .await
}
