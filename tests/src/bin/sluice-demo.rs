//! `make demo`: shows the test bed end to end on embedded defaults. Boots a throwaway VM
//! under libvirt with two disks, has the guest write known patterns, prints the checksums the
//! guest reports, powers it off, verifies the bytes from outside with `qemu-img`, and tears
//! everything down. Later issues grow it into backup, incremental, export and restore.

use anyhow::{ensure, Result};
use std::time::Instant;
use testbed::{pattern, pattern_sha256, TestVm, VmSpec};

const MIB: u64 = 1 << 20;

/// (disk, offset, length, seed) of each write.
const WRITES: &[(&str, u64, u64, u64)] = &[
    ("vda", 0, MIB, 1),
    ("vda", 17 * MIB, 256 * 1024, 2),
    ("vdb", 4 * MIB, 2 * MIB, 3),
    ("vdb", 60 * MIB, 64 * 1024, 4),
];

fn main() -> Result<()> {
    let start = Instant::now();
    println!("sluice demo: the real test bed (libvirt + QEMU TCG + tiny test guest)");
    let vm = TestVm::boot(VmSpec::new("demo").disk(32 * MIB).disk(64 * MIB))?;
    println!(
        "booted domain {} in {:.1} s, disks:",
        vm.name(),
        start.elapsed().as_secs_f64()
    );
    for d in vm.disks() {
        println!(
            "  {}  {:>4} MiB  {}",
            d.target,
            d.size / MIB,
            d.path.display()
        );
    }
    write_all(&vm)?;
    vm.shutdown()?;
    println!("guest powered off; domain state: {}", vm.state()?);
    verify_outside(&vm)?;
    let name = vm.name().to_string();
    drop(vm);
    println!("tore down {name} (domain, checkpoints, files)");
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn write_all(vm: &TestVm) -> Result<()> {
    println!("guest writes (pattern = splitmix64(seed ^ offset/8) per 8-byte word):");
    for &(disk, off, len, seed) in WRITES {
        let t = Instant::now();
        vm.write_pattern(disk, off, len, seed)?;
        println!(
            "  write {disk} offset {off:>9} len {len:>8} seed {seed}  ({:.0} ms)",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    vm.sync()?;
    println!("guest checksums (sha256), compared with the host's recomputation:");
    for &(disk, off, len, seed) in WRITES {
        let guest = vm.checksum(disk, off, len)?;
        let host = pattern_sha256(seed, off, len as usize);
        let verdict = if guest == host { "match" } else { "MISMATCH" };
        println!("  {disk} {off:>9}+{len:<8} {guest}  {verdict}");
        ensure!(guest == host, "guest checksum of {disk} at {off} differs");
    }
    Ok(())
}

fn verify_outside(vm: &TestVm) -> Result<()> {
    println!("reading the qcow2 images from outside with qemu-img:");
    for &(disk, off, len, seed) in WRITES {
        let bytes = vm.read_disk(disk, off, len)?;
        let ok = bytes == pattern(seed, off, len as usize);
        println!(
            "  {disk} {off:>9}+{len:<8} {}",
            if ok {
                "byte-for-byte equal"
            } else {
                "DIFFERENT"
            }
        );
        ensure!(ok, "image bytes of {disk} at {off} differ from the pattern");
    }
    Ok(())
}
