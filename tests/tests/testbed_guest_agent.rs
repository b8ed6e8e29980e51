//! The qemu-guest-agent is there when a VM asks for it, and absent when it does not; with a
//! mounted filesystem it really freezes and thaws it.

use anyhow::Result;
use testbed::{TestVm, VmSpec};

const FREEZE: &str = r#"{"execute":"guest-fsfreeze-freeze"}"#;
const THAW: &str = r#"{"execute":"guest-fsfreeze-thaw"}"#;
const STATUS: &str = r#"{"execute":"guest-fsfreeze-status"}"#;

#[test]
fn guest_agent_answers_only_when_enabled() -> Result<()> {
    let with = TestVm::boot(
        VmSpec::new("qga-on")
            .disk(8 << 20)
            .disk(16 << 20)
            .guest_agent(true),
    )?;
    let without = TestVm::boot(VmSpec::new("qga-off").disk(8 << 20))?;
    assert!(with.has_guest_agent() && !without.has_guest_agent());

    let ping = retry_ping(&with)?;
    assert!(ping.contains("\"return\""), "guest-ping answered {ping}");
    // Nothing mounted from a disk yet: nothing to freeze.
    let frozen = with.guest_agent_command(FREEZE)?;
    assert!(frozen.contains("\"return\":0"), "freeze answered {frozen}");
    with.guest_agent_command(THAW)?;

    with.mkfs("vdb")?;
    with.mount("vdb")?;
    with.write_file("vdb", "data.bin", 1 << 20, 5)?;
    let frozen = with.guest_agent_command(FREEZE)?;
    assert!(frozen.contains("\"return\":1"), "freeze answered {frozen}");
    let status = with.guest_agent_command(STATUS)?;
    assert!(status.contains("frozen"), "status answered {status}");
    let thawed = with.guest_agent_command(THAW)?;
    assert!(thawed.contains("\"return\":1"), "thaw answered {thawed}");
    let status = with.guest_agent_command(STATUS)?;
    assert!(status.contains("thawed"), "status answered {status}");
    with.umount("vdb")?;

    // libvirt itself refuses: the domain has no agent channel.
    let err = without
        .virsh(&[
            "qemu-agent-command",
            without.name(),
            r#"{"execute":"guest-ping"}"#,
        ])
        .unwrap_err();
    assert!(format!("{err:#}").contains("agent"), "{err:#}");
    Ok(())
}

/// qemu-ga starts a moment after the command agent; give it a few seconds.
fn retry_ping(vm: &TestVm) -> Result<String> {
    let mut last = None;
    for _ in 0..30 {
        match vm.guest_agent_command(r#"{"execute":"guest-ping"}"#) {
            Ok(answer) => return Ok(answer),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let err = last.expect("at least one attempt");
    Err(err.context(format!("console of {}:\n{}", vm.name(), vm.console_tail())))
}
