//! Instant recovery, then moving the data back: a domain runs from a writable export of a
//! backup (an NBD network disk on our socket), `virsh blockcopy --pivot` mirrors it into a
//! local qcow2 file while the guest keeps running, and the export is closed. The guest stays
//! healthy on the local file: the backup's data and what it wrote while running from the
//! export read back with the same checksums, later writes work, and the local file holds all
//! of it once the guest is off. The export's overlay is gone with the export.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use testbed::bed::{Bed, Model};
use testbed::instant::InstantExport;
use testbed::{read_image, sha256_hex, virsh, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;

/// Every `len`-byte range at `offsets` of the guest's vda has the model's checksum.
fn sums_match(vm: &TestVm, model: &Model, ranges: &[(u64, u64)]) -> Result<()> {
    for &(offset, len) in ranges {
        let want = sha256_hex(&model.disk("vda")?[offset as usize..(offset + len) as usize]);
        let got = vm.checksum("vda", offset, len)?;
        ensure!(got == want, "guest sum at {offset}+{len}: {got} != {want}");
    }
    Ok(())
}

/// Waits until no file is left in `dir` (the export's overlay is removed when the export
/// is dropped, after QEMU's last connection closed).
fn wait_empty(dir: &std::path::Path) -> Result<()> {
    let start = Instant::now();
    while std::fs::read_dir(dir)?.next().is_some() {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "overlay left in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn instant_recovery_moves_its_data_back_with_blockcopy() -> Result<()> {
    let bed = Bed::boot("rbc-src", &[DISK])?;
    let src = bed.vm.clone();
    let mut model = Model::new(&src);
    model.write(&src, "vda", 0, MIB, 21)?;
    model.write(&src, "vda", 12 * MIB + 4096, 64 << 10, 22)?;
    model.write(&src, "vda", 31 * MIB, MIB, 23)?;
    let backup = bed.backup()?.manifest;
    src.shutdown()?;

    let instant = InstantExport::serve(&bed.repo, src.scratch(), src.name(), "vda", &backup)?;
    let name = instant.name().to_string();
    let overlay_dir = instant.overlay_dir().to_path_buf();
    let vm = TestVm::boot(VmSpec::new("rbc-inst").raw_disk(DISK, &instant.disk_xml("vda")))?;
    model.write(&vm, "vda", 20 * MIB, 128 << 10, 24)?;
    vm.sync()?;
    let ranges = [(0, MIB), (12 * MIB, MIB), (20 * MIB, MIB), (31 * MIB, MIB)];
    sums_match(&vm, &model, &ranges)?;

    let local = src.scratch().join("recovered-vda.qcow2");
    let local_s = local.to_str().context("path")?;
    let copy = [
        "blockcopy",
        vm.name(),
        "vda",
        local_s,
        "--format",
        "qcow2",
        "--wait",
        "--pivot",
        "--transient-job",
    ];
    virsh(&copy)?;
    let disks = virsh(&["domblklist", vm.name()])?;
    ensure!(disks.contains(local_s), "vda not pivoted: {disks}");
    ensure!(
        instant.server().remove_export(&name),
        "export {name} was not served"
    );
    drop(instant); // the server stops and the last handle on the export goes
    wait_empty(&overlay_dir)?;

    sums_match(&vm, &model, &ranges)?;
    model.write(&vm, "vda", 24 * MIB, MIB, 25)?;
    sums_match(&vm, &model, &[(24 * MIB, MIB)])?;
    vm.shutdown()?;
    let data = read_image(&local, "qcow2", 0, DISK)?;
    let at = data
        .iter()
        .zip(model.disk("vda")?)
        .position(|(a, b)| a != b);
    ensure!(at.is_none(), "local copy differs at byte {at:?}");
    Ok(())
}
