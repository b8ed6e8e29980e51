//! The job history on disk: `<data_dir>/jobs.jsonl`, one JSON [`JobInfo`] line each time a
//! job is queued, starts and ends; the last line of a job wins.
//!
//! On open, a job whose last line is not final was queued or running when the daemon died
//! (a SIGTERM ends every job first): it is shown as failed, "interrupted: daemon restarted".
//! The file is then rewritten with the newest [`KEEP`] jobs only, so it stays bounded.
//! Lines are appended without fsync: the history survives a crash of the daemon, not of the
//! machine. A torn or unreadable line (a `kill -9` mid-write) is skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::auth::now;
use crate::jobs::{JobInfo, JobState};

/// Jobs kept in the history.
pub const KEEP: usize = 1000;
/// Longest line read back (a JobInfo is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// The open history file.
#[derive(Debug)]
pub struct JobLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl JobLog {
    /// Reads the history at `path` (none yet: empty), marks interrupted jobs, rewrites it
    /// compacted, and opens it for appending. Returns the log and the jobs, by id.
    pub fn open(path: &Path) -> std::io::Result<(JobLog, BTreeMap<u64, JobInfo>)> {
        let mut jobs = read(path)?;
        while jobs.len() > KEEP {
            jobs.pop_first();
        }
        for j in jobs.values_mut().filter(|j| !j.state.is_final()) {
            j.message = Some(format!(
                "interrupted: daemon restarted while the job was {}",
                if j.state == JobState::Queued {
                    "queued"
                } else {
                    "running"
                }
            ));
            j.state = JobState::Failed;
            j.finished = Some(now());
        }
        rewrite(path, jobs.values())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        let log = JobLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        };
        Ok((log, jobs))
    }

    /// Appends the job's current state.
    pub fn record(&self, job: &JobInfo) {
        let Ok(mut line) = serde_json::to_string(job) else {
            return;
        };
        line.push('\n');
        let mut f = self.file.lock().expect("job log lock");
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::error!("writing job history {}: {e}", self.path.display());
        }
    }
}

fn read(path: &Path) -> std::io::Result<BTreeMap<u64, JobInfo>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut jobs = BTreeMap::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.len() > MAX_LINE {
            continue;
        }
        match serde_json::from_slice::<JobInfo>(&line) {
            Ok(j) => {
                jobs.insert(j.id, j);
            }
            Err(e) if !line.is_empty() => {
                tracing::warn!("job history {}: skipped a line: {e}", path.display())
            }
            Err(_) => {}
        }
    }
    Ok(jobs)
}

fn rewrite<'a>(path: &Path, jobs: impl Iterator<Item = &'a JobInfo>) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = File::create(&tmp)?;
    for j in jobs {
        serde_json::to_writer(&mut f, j)?;
        f.write_all(b"\n")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
