//! Instant recovery: a second libvirt domain boots with a WRITABLE export of a backup of the
//! first guest's vda as its own vda (a libvirt `protocol='nbd'` network disk on our unix
//! socket). Inside it the guest reads exactly what the first guest had written before the
//! backup; its writes land in the export's overlay, and the repository stays unchanged
//! (full verify passes, a read-only export of the backup still holds the old data).

use std::sync::Arc;

use anyhow::{ensure, Result};
use catalog::VerifyMode;
use proxy::restore::{ExportOptions, RepoExport};
use testbed::instant::InstantExport;
use testbed::{pattern_sha256, read_nbd, Bed, TestVm, VmSpec};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;

/// Ranges the source guest writes before the backup: (offset, len, seed).
const WRITES: [(u64, u64, u64); 3] = [
    (0, MIB, 11),
    (8 * MIB + 4096, 64 << 10, 12),
    (31 * MIB, MIB, 13),
];

#[test]
fn guest_boots_from_a_writable_export_of_its_backup() -> Result<()> {
    let bed = Bed::boot("ri-src", &[DISK])?;
    let (src, repo) = (&bed.vm, &bed.repo);

    let mut sums = Vec::new();
    for (offset, len, seed) in WRITES {
        src.write_pattern("vda", offset, len, seed)?;
        sums.push((offset, len, pattern_sha256(seed, offset, len as usize)));
    }
    sums.push((16 * MIB, MIB, src.checksum("vda", 16 * MIB, MIB)?));
    src.sync()?;
    for (offset, len, sum) in &sums {
        ensure!(
            src.checksum("vda", *offset, *len)? == *sum,
            "source sum at {offset}"
        );
    }
    let report = bed.backup()?;
    src.shutdown()?;

    // The export lives in the source VM's scratch directory, which libvirt-qemu can reach.
    let mut instant =
        InstantExport::serve(repo, src.scratch(), src.name(), "vda", &report.manifest)?;
    let (export, socket) = (instant.export().clone(), instant.socket().to_path_buf());
    let xml = instant.disk_xml("vda");
    let vm = TestVm::boot(VmSpec::new("ri-inst").raw_disk(DISK, &xml))?;
    for (offset, len, sum) in &sums {
        let got = vm.checksum("vda", *offset, *len)?;
        ensure!(
            got == *sum,
            "recovered guest sum at {offset}+{len}: {got} != {sum}"
        );
    }

    // A write in the recovered guest lands in the overlay, not in the repository.
    let (w_off, w_len) = (20 * MIB, 128 << 10);
    vm.write_pattern("vda", w_off, w_len, 14)?;
    vm.sync()?;
    ensure!(vm.checksum("vda", w_off, w_len)? == pattern_sha256(14, w_off, w_len as usize));
    ensure!(
        export.overlay_bytes() >= w_len,
        "overlay holds {} bytes after a {w_len}-byte guest write",
        export.overlay_bytes()
    );
    drop(vm);

    ensure!(
        repo.verify(VerifyMode::Full, None)?.is_ok(),
        "repository verify"
    );
    let ro_name = "ro";
    let ro = RepoExport::open_blocking(repo, instant.name(), &ExportOptions::default())?;
    instant
        .server()
        .add_export(ro_name.to_string(), Arc::new(ro));
    let old = read_nbd(&socket, ro_name, w_off, w_len)?;
    ensure!(
        old.iter().all(|&b| b == 0),
        "backup changed under the overlay"
    );
    for (offset, len, seed) in WRITES {
        let data = read_nbd(&socket, ro_name, offset, len)?;
        ensure!(testbed::sha256_hex(&data) == pattern_sha256(seed, offset, len as usize));
    }
    instant.stop();
    Ok(())
}
