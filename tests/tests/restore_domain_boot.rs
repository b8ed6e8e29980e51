//! Restore as a new domain, defined and booted: a guest's backup is restored to a qcow2 file,
//! its saved definition rewritten by `restore_as_domain` (new name, disk on the restored
//! file) and `relocate_chardevs` (its own console log and command socket), defined through
//! libvirt and started beside the still-running original. The copy's guest reports over its
//! command channel the checksums the original reported before the backup; the original is
//! untouched (same definition, same UUID, its own later writes intact); existing names are
//! refused.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use proxy::restore::{
    relocate_chardevs, restore_as_domain, restore_disk, ErrorKind, ExportName, ImageFormat,
    RestoredDisk,
};
use testbed::bed::{Bed, Model};
use testbed::channel::Channel;
use testbed::{domain_names, sha256_hex, teardown_domain, virsh, NAME_PREFIX};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
/// Ranges whose checksums the copy must report: data, a partial chunk, zeroes.
const RANGES: [(u64, u64); 3] = [(0, MIB), (20 * MIB, MIB), (28 * MIB, MIB)];

/// A domain this test defined; removed on drop, also on panic.
struct Defined(String);

impl Drop for Defined {
    fn drop(&mut self) {
        teardown_domain(&self.0);
    }
}

fn uuid(name: &str) -> Result<String> {
    Ok(virsh(&["domuuid", name])?.trim().to_string())
}

#[test]
fn a_backup_restored_as_a_new_domain_boots_beside_the_original() -> Result<()> {
    let bed = Bed::boot("rdom", &[DISK])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, MIB, 1)?;
    model.write(&vm, "vda", 20 * MIB + 4096, 64 << 10, 2)?;
    let mut sums = Vec::new();
    for (offset, len) in RANGES {
        let sum = vm.checksum("vda", offset, len)?;
        let want = &model.disk("vda")?[offset as usize..(offset + len) as usize];
        ensure!(sum == sha256_hex(want), "source sum at {offset}");
        sums.push(sum);
    }
    let backup = bed.backup()?.manifest;
    // The original moves on after the backup; the copy must show the backup, not this.
    model.write(&vm, "vda", 0, 4096, 3)?;
    let original_xml = virsh(&["dumpxml", "--inactive", vm.name()])?;

    let dir = vm.scratch().join("copy");
    std::fs::create_dir(&dir)?;
    let image = dir.join("vda.qcow2");
    let name = ExportName::new(vm.name(), "vda", &backup.id)?;
    bed.rt.block_on(restore_disk(
        &bed.repo,
        &name,
        image.clone(),
        ImageFormat::Qcow2,
    ))?;
    let disks = [RestoredDisk {
        target: "vda".into(),
        path: image,
        format: ImageFormat::Qcow2,
    }];
    let taken = restore_as_domain(&backup.domain_xml, vm.name(), &disks, &domain_names()?)
        .err()
        .context("the original's name was accepted")?;
    ensure!(
        taken.kind() == ErrorKind::Refused && taken.to_string().contains("already exists"),
        "{taken}"
    );

    let copy = format!("{NAME_PREFIX}rdom-copy-{}-900", std::process::id());
    let xml = restore_as_domain(&backup.domain_xml, &copy, &disks, &domain_names()?)?;
    let xml = relocate_chardevs(&xml, &dir)?;
    let xml_path = dir.join("copy.xml");
    std::fs::write(&xml_path, &xml)?;
    virsh(&["define", xml_path.to_str().context("path")?])?;
    let _copy_guard = Defined(copy.clone());
    virsh(&["start", &copy])?;
    let mut channel = Channel::connect(&dir.join("agent.sock"), Duration::from_secs(30))?;
    channel.wait_ready(Duration::from_secs(180))?;
    for ((offset, len), want) in RANGES.iter().zip(&sums) {
        let got = channel.call(&format!("sum vda {offset} {len}"), Duration::from_secs(60))?;
        ensure!(
            &got == want,
            "copy's sum at {offset}+{len}: {got} != {want}"
        );
    }

    // The original: same definition, its own identity, still running with its own data.
    ensure!(virsh(&["dumpxml", "--inactive", vm.name()])? == original_xml);
    ensure!(
        uuid(vm.name())? != uuid(&copy)?,
        "copy shares the original's uuid"
    );
    ensure!(vm.state()? == "running", "original is {}", vm.state()?);
    let now = vm.checksum("vda", 0, MIB)?;
    ensure!(now == sha256_hex(&model.disk("vda")?[..MIB as usize]));
    let again = restore_as_domain(&backup.domain_xml, &copy, &disks, &domain_names()?)
        .err()
        .context("the copy's name was accepted twice")?;
    ensure!(
        again.kind() == ErrorKind::Refused && again.to_string().contains("already exists"),
        "{again}"
    );
    Ok(())
}
