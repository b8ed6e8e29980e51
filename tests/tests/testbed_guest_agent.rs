//! The qemu-guest-agent is there when a VM asks for it, and absent when it does not.

use anyhow::Result;
use testbed::{TestVm, VmSpec};

#[test]
fn guest_agent_answers_only_when_enabled() -> Result<()> {
    let with = TestVm::boot(VmSpec::new("qga-on").disk(8 << 20).guest_agent(true))?;
    let without = TestVm::boot(VmSpec::new("qga-off").disk(8 << 20))?;
    assert!(with.has_guest_agent() && !without.has_guest_agent());

    let ping = retry_ping(&with)?;
    assert!(ping.contains("\"return\""), "guest-ping answered {ping}");
    let frozen = with.guest_agent_command(r#"{"execute":"guest-fsfreeze-freeze"}"#)?;
    // No filesystem is mounted from a disk, so there is nothing to freeze: 0 frozen.
    assert!(frozen.contains("\"return\":0"), "freeze answered {frozen}");
    with.guest_agent_command(r#"{"execute":"guest-fsfreeze-thaw"}"#)?;
    let status = with.guest_agent_command(r#"{"execute":"guest-fsfreeze-status"}"#)?;
    assert!(status.contains("thawed"), "status answered {status}");

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
