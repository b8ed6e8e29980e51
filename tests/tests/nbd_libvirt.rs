//! Our NBD client against a libvirt pull-mode backup export of a running test guest: after
//! the guest writes known data between two checkpoints, the incremental export's
//! `qemu:dirty-bitmap:backup-vda` context shows exactly the written 64 KiB blocks, and reads
//! of them return what the guest wrote.

use anyhow::Result;
use std::path::Path;

use proxy::nbd::{dirty_bitmap_context, Address, Client, ClientOptions, BASE_ALLOCATION};
use testbed::{pattern, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const KIB64: u64 = 64 * 1024;

fn begin(vm: &TestVm, incremental: Option<&str>, checkpoint: &str) -> Result<()> {
    let d = vm.scratch().display().to_string();
    let inc = incremental
        .map(|c| format!("<incremental>{c}</incremental>"))
        .unwrap_or_default();
    let backup = format!(
        "<domainbackup mode='pull'>{inc}<server transport='unix' socket='{d}/backup.sock'/>\
         <disks><disk name='vda' backup='yes' type='file'><scratch file='{d}/vda.scratch'/></disk>\
         </disks></domainbackup>"
    );
    let cp = format!(
        "<domaincheckpoint><name>{checkpoint}</name><disks><disk name='vda' checkpoint='bitmap'/>\
         </disks></domaincheckpoint>"
    );
    let (b, c) = (vm.scratch().join("backup.xml"), vm.scratch().join("cp.xml"));
    std::fs::write(&b, backup)?;
    std::fs::write(&c, cp)?;
    let (b, c) = (b.display().to_string(), c.display().to_string());
    vm.virsh(&["backup-begin", vm.name(), &b, &c])?;
    Ok(())
}

async fn connect(socket: &Path, contexts: &[&str]) -> Result<Client> {
    let options = ClientOptions {
        export: "vda".into(),
        meta_contexts: contexts.iter().map(|c| c.to_string()).collect(),
        ..ClientOptions::default()
    };
    Ok(Client::connect(&Address::Unix(socket.to_path_buf()), &options).await?)
}

#[tokio::test]
async fn libvirt_pull_backup_dirty_extents_read_by_our_client() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("nbdcli").disk(16 * MIB))?;
    vm.write_pattern("vda", 0, MIB, 1)?;
    vm.sync()?;
    let socket = vm.scratch().join("backup.sock");

    begin(&vm, None, "cp1")?;
    let full = connect(&socket, &[BASE_ALLOCATION]).await?;
    assert_eq!(full.size(), 16 * MIB);
    assert!(full.read(0, MIB).await? == pattern(1, 0, MIB as usize));
    full.disconnect().await?;
    vm.virsh(&["domjobabort", vm.name()])?;

    vm.write_pattern("vda", 4 * MIB, KIB64, 2)?;
    vm.write_pattern("vda", 9 * MIB + 4096, 4096, 3)?;
    vm.sync()?;
    begin(&vm, Some("cp1"), "cp2")?;
    let ctx = dirty_bitmap_context("backup-vda");
    let inc = connect(&socket, &[BASE_ALLOCATION, &ctx]).await?;
    let dirty: Vec<(u64, u64)> = inc
        .extents(&ctx, 0, inc.size())
        .await?
        .into_iter()
        .filter(|e| e.flags & 1 != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        dirty,
        vec![(4 * MIB, KIB64), (9 * MIB, KIB64)],
        "dirty extents"
    );
    assert!(inc.read(4 * MIB, KIB64).await? == pattern(2, 4 * MIB, KIB64 as usize));
    assert!(inc.read(9 * MIB + 4096, 4096).await? == pattern(3, 9 * MIB + 4096, 4096));
    inc.disconnect().await?;
    vm.virsh(&["domjobabort", vm.name()])?;
    Ok(())
}
