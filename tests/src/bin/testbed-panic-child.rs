//! Helper of the `testbed_cleanup` tests: boots a test VM (with a checkpoint, so teardown
//! must remove checkpoint metadata too), prints what it made, then either panics mid-test
//! (`testbed-panic-child PREFIX`) or waits to be killed (`testbed-panic-child PREFIX hang`).

use anyhow::Result;
use std::io::Write;
use testbed::{TestVm, VmSpec};

fn main() -> Result<()> {
    let prefix = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "panic-child".into());
    let hang = std::env::args().nth(2).as_deref() == Some("hang");
    let vm = TestVm::boot(VmSpec::new(&prefix).disk(8 << 20).disk(8 << 20))?;
    vm.write_pattern("vda", 0, 65536, 11)?;
    vm.virsh(&[
        "checkpoint-create-as",
        vm.name(),
        "--name",
        "cp1",
        "--diskspec",
        "vda,checkpoint=bitmap",
        "--diskspec",
        "vdb,checkpoint=bitmap",
    ])?;
    println!("domain {}", vm.name());
    println!("scratch {}", vm.scratch().display());
    std::io::stdout().flush()?;
    if hang {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    panic!(
        "deliberate panic in the middle of a test with vm {}",
        vm.name()
    );
}
