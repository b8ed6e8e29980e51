//! The test VMs are fit for libvirt pull-mode backups: a checkpointed full backup exports a
//! frozen point-in-time view of both disks over NBD (on a socket in the VM's scratch
//! directory), and the next incremental's dirty bitmap shows exactly what the guest changed.

use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;
use testbed::{pattern, read_nbd, TestVm, VmSpec};

const MIB: u64 = 1 << 20;

fn backup_xml(dir: &Path, incremental: Option<&str>) -> String {
    let d = dir.display();
    let inc = incremental
        .map(|c| format!("<incremental>{c}</incremental>"))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='pull'>{inc}<server transport='unix' socket='{d}/backup.sock'/>\
         <disks>\
         <disk name='vda' backup='yes' type='file'><scratch file='{d}/vda.scratch'/></disk>\
         <disk name='vdb' backup='yes' type='file'><scratch file='{d}/vdb.scratch'/></disk>\
         </disks></domainbackup>"
    )
}

fn checkpoint_xml(name: &str) -> String {
    format!(
        "<domaincheckpoint><name>{name}</name><disks>\
         <disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='bitmap'/>\
         </disks></domaincheckpoint>"
    )
}

fn begin(vm: &TestVm, incremental: Option<&str>, checkpoint: &str) -> Result<()> {
    let b = vm.scratch().join("backup.xml");
    let c = vm.scratch().join("checkpoint.xml");
    std::fs::write(&b, backup_xml(vm.scratch(), incremental))?;
    std::fs::write(&c, checkpoint_xml(checkpoint))?;
    let (b, c) = (b.display().to_string(), c.display().to_string());
    vm.virsh(&["backup-begin", vm.name(), &b, &c])?;
    Ok(())
}

/// `nbdinfo --map=CONTEXT` lines "offset length type description" whose type is not 0.
fn flagged_extents(socket: &Path, export: &str, context: &str) -> Result<Vec<(u64, u64)>> {
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    let out = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(&uri)
        .output()
        .context("run nbdinfo (install it with `make deps`)")?;
    anyhow::ensure!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut extents = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] != "0" {
            extents.push((f[0].parse()?, f[1].parse()?));
        }
    }
    Ok(extents)
}

#[test]
fn pull_mode_backup_exports_point_in_time_and_dirty_extents() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("backup").disk(16 * MIB).disk(16 * MIB))?;
    vm.write_pattern("vda", 0, MIB, 1)?;
    vm.write_pattern("vdb", 4 * MIB, MIB, 2)?;
    vm.sync()?;
    let sock = vm.scratch().join("backup.sock");

    begin(&vm, None, "cp1")?;
    // Written after the point in time: the export must not show it.
    vm.write_pattern("vda", 0, 65536, 3)?;
    vm.sync()?;
    assert!(read_nbd(&sock, "vda", 0, MIB)? == pattern(1, 0, MIB as usize));
    assert!(read_nbd(&sock, "vdb", 4 * MIB, MIB)? == pattern(2, 4 * MIB, MIB as usize));
    vm.virsh(&["domjobabort", vm.name()])?;

    vm.write_pattern("vdb", 12 * MIB, 4096, 4)?;
    vm.sync()?;
    begin(&vm, Some("cp1"), "cp2")?;
    let vda = flagged_extents(&sock, "vda", "qemu:dirty-bitmap:backup-vda")?;
    let vdb = flagged_extents(&sock, "vdb", "qemu:dirty-bitmap:backup-vdb")?;
    assert_eq!(vda, vec![(0, 65536)], "dirty extents of vda");
    assert_eq!(vdb, vec![(12 * MIB, 65536)], "dirty extents of vdb");
    assert!(read_nbd(&sock, "vda", 0, 65536)? == pattern(3, 0, 65536));
    vm.virsh(&["domjobabort", vm.name()])?;
    let checkpoints = vm.virsh(&["checkpoint-list", vm.name(), "--name"])?;
    assert!(checkpoints.contains("cp1") && checkpoints.contains("cp2"));
    Ok(())
}
