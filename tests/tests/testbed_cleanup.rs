//! A test that panics half-way leaves nothing behind: no domain, no QEMU process, no file.
//! A test process killed outright (no unwinding) is swept up by the next harness user.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use testbed::{domain_names, qemu_pids_of, sweep_dead, SCRATCH_ROOT};

const CHILD: &str = env!("CARGO_BIN_EXE_testbed-panic-child");

#[test]
fn panicking_test_leaves_no_domain_process_or_file() -> Result<()> {
    let prefix = format!("panic-{}", std::process::id());
    let out = Command::new(CHILD)
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
    assert_nothing_left(&prefix, &field("domain ")?, &field("scratch ")?)
}

#[test]
fn killed_test_is_swept_by_the_next_one() -> Result<()> {
    let prefix = format!("killed-{}", std::process::id());
    let mut child = KillOnDrop(
        Command::new(CHILD)
            .args([prefix.as_str(), "hang"])
            .stdout(Stdio::piped())
            .spawn()
            .context("run testbed-panic-child")?,
    );
    let mut lines = BufReader::new(child.0.stdout.take().context("child stdout")?).lines();
    let domain = read_field(&mut lines, "domain ");
    let scratch = read_field(&mut lines, "scratch ");
    child.0.kill()?; // SIGKILL: no unwinding, no Drop
    child.0.wait()?;
    let (domain, scratch) = (domain?, scratch?);
    assert!(
        domain_names()?.contains(&domain),
        "{domain} should outlive its process"
    );
    sweep_dead();
    assert_nothing_left(&prefix, &domain, &scratch)
}

/// Kills the child process if the test ends before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_field(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    key: &str,
) -> Result<String> {
    let line = lines.next().context("child ended early")??;
    line.strip_prefix(key)
        .map(str::to_string)
        .with_context(|| format!("child printed {line:?}, wanted {key:?}"))
}

fn assert_nothing_left(prefix: &str, domain: &str, scratch: &str) -> Result<()> {
    assert!(domain.contains(prefix));
    let left: Vec<String> = domain_names()?
        .into_iter()
        .filter(|n| n.contains(prefix))
        .collect();
    assert!(left.is_empty(), "domains left behind: {left:?}");
    assert!(
        qemu_pids_of(domain).is_empty(),
        "qemu of {domain} still runs"
    );
    assert!(!Path::new(scratch).exists(), "{scratch} left behind");
    let files: Vec<String> = std::fs::read_dir(SCRATCH_ROOT)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(prefix))
        .collect();
    assert!(files.is_empty(), "scratch files left behind: {files:?}");
    Ok(())
}
