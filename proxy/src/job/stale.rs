//! `qemu-nbd` servers a killed daemon left behind.
//!
//! Offline backups (a shut-off VM) and restores onto a VM run `qemu-nbd --persistent` with its
//! socket in the job's directory. Its guard stops it when the job ends, but a daemon killed
//! with `kill -9` never gets there: the server outlives it, keeps the VM's images open and
//! locked (the VM cannot start, the next backup cannot add its checkpoint bitmap). The
//! daemon's start finds such servers by their socket's directory and ends them: SIGTERM first,
//! so `qemu-nbd` closes the image (and its persistent bitmaps) cleanly, SIGKILL after
//! [`GRACE`]. Only processes that this process did not start are touched.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long a `qemu-nbd` may take to close its image after SIGTERM.
pub const GRACE: Duration = Duration::from_secs(10);

/// A `qemu-nbd` serving from a directory a dead daemon left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleServer {
    pub pid: u32,
    /// Its command line (the image it serves is one of the arguments).
    pub args: Vec<String>,
}

/// The `qemu-nbd` processes with an argument inside `dir` (its `--socket`) whose parent is
/// not this process.
pub fn stale_servers(dir: &Path) -> Vec<StaleServer> {
    let inside = format!("{}/", dir.display());
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let base = format!("/proc/{pid}");
            let comm = std::fs::read_to_string(format!("{base}/comm")).ok()?;
            if comm.trim_end() != "qemu-nbd" || parent(pid)? == me {
                return None;
            }
            let cmdline = std::fs::read(format!("{base}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter()
                .any(|a| a.starts_with(&inside))
                .then_some(StaleServer { pid, args })
        })
        .collect()
}

/// The parent pid of `pid` (`/proc/PID/stat`, the field after the parenthesised name).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Ends `servers`: SIGTERM, then SIGKILL to those still running after [`GRACE`].
pub async fn end_servers(servers: &[StaleServer]) {
    for s in servers {
        tracing::warn!(pid = s.pid, args = ?s.args, "ending a qemu-nbd left by an earlier run");
        signal(s.pid, libc::SIGTERM);
    }
    let start = Instant::now();
    while servers.iter().any(|s| alive(s.pid)) && start.elapsed() < GRACE {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in servers.iter().filter(|s| alive(s.pid)) {
        tracing::error!(pid = s.pid, "qemu-nbd did not stop after SIGTERM: killed");
        signal(s.pid, libc::SIGKILL);
    }
}

fn alive(pid: u32) -> bool {
    // A zombie has ended; /proc still lists it until its parent (init) reaps it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s[s.rfind(')')? + 1..].split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_this_process_is_read_from_proc() {
        let me = std::process::id();
        let ppid = parent(me).expect("own stat");
        assert_eq!(ppid, std::os::unix::process::parent_id());
        assert!(alive(me));
        assert!(!alive(u32::MAX), "no such process");
    }
}
