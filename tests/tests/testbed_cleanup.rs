//! A test that panics half-way leaves nothing behind: no domain, no QEMU process, no file.

use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;
use testbed::{domain_names, qemu_pids_of, SCRATCH_ROOT};

#[test]
fn panicking_test_leaves_no_domain_process_or_file() -> Result<()> {
    let prefix = format!("panic-{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_testbed-panic-child"))
        .arg(&prefix)
        .output()
        .context("run testbed-panic-child")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child should have panicked");
    assert!(
        stderr.contains("deliberate panic"),
        "child stderr: {stderr}"
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_string)
            .with_context(|| format!("child printed no {key:?}; stderr: {stderr}"))
    };
    let domain = field("domain ")?;
    let scratch = field("scratch ")?;
    assert!(domain.contains(&prefix));

    let left: Vec<String> = domain_names()?
        .into_iter()
        .filter(|n| n.contains(&prefix))
        .collect();
    assert!(left.is_empty(), "domains left behind: {left:?}");
    assert!(
        qemu_pids_of(&domain).is_empty(),
        "qemu of {domain} still runs"
    );
    assert!(!Path::new(&scratch).exists(), "{scratch} left behind");
    let files: Vec<String> = std::fs::read_dir(SCRATCH_ROOT)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(&prefix))
        .collect();
    assert!(files.is_empty(), "scratch files left behind: {files:?}");
    Ok(())
}
