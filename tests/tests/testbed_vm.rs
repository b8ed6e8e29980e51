//! The test bed itself: a guest under libvirt writes known patterns to two disks, and the
//! bytes are checked inside the guest and from outside, byte for byte.

use anyhow::Result;
use testbed::{pattern, pattern_sha256, read_image, TestVm, VmSpec};

const MIB: u64 = 1 << 20;

/// (disk, offset, length, seed) of every write.
const WRITES: &[(&str, u64, u64, u64)] = &[
    ("vda", 0, 64 * 1024, 1),
    ("vda", 5 * MIB + 4096, 1536, 2),
    ("vda", 31 * MIB, MIB, 3),
    ("vdb", 512, 4096, 4),
    ("vdb", 7 * MIB, 3 * MIB, 5),
    ("vdb", 48 * MIB - 65536, 65536, 6),
];

#[test]
fn guest_writes_patterns_seen_inside_and_outside() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("two-disks").disk(32 * MIB).disk(48 * MIB))?;
    assert_eq!(vm.state()?, "running");
    for &(disk, off, len, seed) in WRITES {
        vm.write_pattern(disk, off, len, seed)?;
    }
    vm.sync()?;
    for &(disk, off, len, seed) in WRITES {
        let sum = vm.checksum(disk, off, len)?;
        assert_eq!(
            sum,
            pattern_sha256(seed, off, len as usize),
            "{disk} at {off}"
        );
    }
    // A sub-range of a write, and untouched space (zeroes) beside it.
    let sum = vm.checksum("vdb", 8 * MIB, 4096)?;
    assert_eq!(sum, pattern_sha256(5, 8 * MIB, 4096));
    assert_eq!(
        vm.checksum("vda", MIB, 4096)?,
        testbed::sha256_hex(&[0; 4096])
    );

    vm.shutdown()?;
    assert_eq!(vm.state()?, "shut off");
    for &(disk, off, len, seed) in WRITES {
        let outside = read_image(vm.disk_path(disk)?, "qcow2", off, len)?;
        assert!(
            outside == pattern(seed, off, len as usize),
            "{disk} at {off} differs"
        );
    }
    // Everything else is still zero: the whole of vda, compared with the expected image.
    let whole = vm.read_disk("vda", 0, 32 * MIB)?;
    let mut expected = vec![0u8; 32 * MIB as usize];
    for &(_, off, len, seed) in WRITES.iter().filter(|w| w.0 == "vda") {
        expected[off as usize..(off + len) as usize].copy_from_slice(&pattern(
            seed,
            off,
            len as usize,
        ));
    }
    assert!(whole == expected, "vda holds bytes nobody wrote");
    Ok(())
}

#[test]
fn discard_zeroes_and_restart_keeps_data() -> Result<()> {
    let vm = TestVm::boot(VmSpec::new("discard").disk(16 * MIB))?;
    vm.write_pattern("vda", 0, 4 * MIB, 9)?;
    vm.discard("vda", MIB, MIB)?;
    vm.sync()?;
    assert_eq!(
        vm.checksum("vda", MIB, MIB)?,
        testbed::sha256_hex(&vec![0; MIB as usize])
    );
    assert_eq!(
        vm.checksum("vda", 0, MIB)?,
        pattern_sha256(9, 0, MIB as usize)
    );
    vm.shutdown()?;
    vm.start()?;
    assert_eq!(
        vm.checksum("vda", 2 * MIB, 2 * MIB)?,
        pattern_sha256(9, 2 * MIB, 2 * MIB as usize)
    );
    // Bad requests get an error answer, and the agent keeps serving.
    assert!(vm.command("write vda 1 512 3").is_err());
    assert!(vm.command("bogus").is_err());
    assert!(vm.write_pattern("vda", 16 * MIB, 512, 1).is_err());
    assert_eq!(vm.command("ping x")?, "pong x");
    Ok(())
}
