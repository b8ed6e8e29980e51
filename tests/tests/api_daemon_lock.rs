//! One daemon per data directory and per repository: with a real `sluice serve` running, a
//! second one on the same configuration, and a third with its own data directory but the
//! first one's repository, are each refused at start, naming the directory and the first
//! daemon's pid, and leave the first one serving. After the first one stops, the same
//! configuration starts again.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use testbed::daemon::{sluice_bin, Daemon};

/// `sluice serve -c CONFIG`, which must exit with an error within 20 s: its stderr.
fn refused(config: &std::path::Path) -> Result<String> {
    let mut child = Command::new(sluice_bin()?)
        .args(["serve", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "a second daemon on {} started and kept running",
                config.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "a second daemon started: {stderr}");
    Ok(stderr)
}

#[test]
fn a_second_daemon_on_a_data_directory_or_repository_in_use_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut first = Daemon::start(dir.path(), "")?;
    let pid = first.pid().to_string();
    let config = dir.path().join("sluice.toml");

    let e = refused(&config)?;
    ensure!(
        e.contains("data directory") && e.contains("in use") && e.contains(&pid),
        "the refusal names the data directory and the holder's pid {pid}: {e}"
    );

    let other = tempfile::tempdir()?;
    let repo = first.data.join("repo");
    let cfg2 = other.path().join("sluice.toml");
    std::fs::write(
        &cfg2,
        format!(
            "data_dir = {:?}\nrepository = {repo:?}\nlisten = \"127.0.0.1:0\"\nnbd_listen = \"127.0.0.1:0\"\n",
            other.path().join("data")
        ),
    )?;
    let e = refused(&cfg2)?;
    ensure!(
        e.contains("repository") && e.contains("in use") && e.contains(&pid),
        "the refusal names the repository and the holder's pid {pid}: {e}"
    );
    let status = first.ok(&["hypervisor", "list"]);
    ensure!(status.is_ok(), "the first daemon still serves: {status:?}");

    ensure!(first.terminate()?, "the first daemon exits cleanly");
    let again = Daemon::start(dir.path(), "")?;
    again.ok(&["hypervisor", "list"])?;
    Ok(())
}
