//! The job history on disk: `<data_dir>/jobs.jsonl`, one JSON [`JobInfo`] line each time a
//! job is queued, starts and ends; the last line of a job wins.
//!
//! On open, a job whose last line is not final was queued or running when the daemon died
//! (a SIGTERM ends every job first): it is shown as failed, "interrupted: daemon restarted".
//! The ones that were running are remembered ([`JobLog::interrupted`]): what they left on
//! the hypervisor and on disk is cleaned up by the daemon's start (`crate::daemon::serve`), which
//! appends the outcome to their message.
//!
//! Durability: each line is written with one `write` and made durable (`fdatasync`) before
//! `record` returns, so a job's state survives a power loss once reported. A torn or
//! unreadable line (a crash mid-write, any line of a truncated file) is skipped: the job keeps
//! its previous line's state.
//!
//! Bound: the file holds at most [`KEEP`] jobs plus the lines appended since its last
//! compaction. Compaction keeps the newest `KEEP` jobs (by id) and every job not yet ended,
//! one line each, written to a temporary file, synced and renamed over the history (directory
//! synced). It runs on open and whenever the file reaches [`COMPACT_AT`] lines, so the file
//! never exceeds `COMPACT_AT` lines (about 1.5 MB).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::daemon::clock::now;
use crate::wire::jobs::{JobInfo, JobState};

/// Jobs kept in the history.
pub const KEEP: usize = 1000;
/// Lines at which the file is compacted back to `KEEP` jobs (a job writes about three).
pub const COMPACT_AT: usize = 4 * KEEP;
/// Longest line read back (a JobInfo is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// The open history file.
#[derive(Debug)]
pub struct JobLog {
    path: PathBuf,
    /// Jobs kept by a compaction ([`KEEP`] unless a test asks for fewer).
    keep: usize,
    /// Jobs that were running when the daemon died, found on open.
    interrupted: Vec<u64>,
    inner: Mutex<Inner>,
}

/// The appending file and what a compaction needs: each job's newest state and the file's
/// line count.
#[derive(Debug)]
struct Inner {
    file: File,
    jobs: BTreeMap<u64, JobInfo>,
    lines: usize,
}

impl JobLog {
    /// Reads the history at `path` (none yet: empty), marks interrupted jobs, rewrites it
    /// compacted, and opens it for appending. Returns the log and the jobs, by id.
    pub fn open(path: &Path) -> std::io::Result<(JobLog, BTreeMap<u64, JobInfo>)> {
        Self::open_keeping(path, KEEP)
    }

    /// [`JobLog::open`] keeping `keep` jobs (compacting at `4 × keep` lines).
    fn open_keeping(path: &Path, keep: usize) -> std::io::Result<(JobLog, BTreeMap<u64, JobInfo>)> {
        let mut jobs = read(path)?;
        let mut interrupted = Vec::new();
        for j in jobs.values_mut().filter(|j| !j.state.is_final()) {
            let was = if j.state == JobState::Queued {
                "queued"
            } else {
                interrupted.push(j.id);
                "running"
            };
            j.message = Some(format!(
                "interrupted: daemon restarted while the job was {was}"
            ));
            j.state = JobState::Failed;
            j.finished = Some(now());
        }
        bound(&mut jobs, keep);
        let file = rewrite(path, jobs.values())?;
        let inner = Inner {
            file,
            lines: jobs.len(),
            jobs: jobs.clone(),
        };
        let log = JobLog {
            path: path.to_path_buf(),
            keep,
            interrupted,
            inner: Mutex::new(inner),
        };
        Ok((log, jobs))
    }

    /// Appends the job's current state and makes it durable; compacts the file when it has
    /// reached [`COMPACT_AT`] lines (`4 × keep`). Failures are logged: the job goes on without history.
    pub fn record(&self, job: &JobInfo) {
        let Ok(mut line) = serde_json::to_string(job) else {
            return;
        };
        line.push('\n');
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.jobs.insert(job.id, job.clone());
        let r = if inner.lines + 1 >= 4 * self.keep {
            self.compact(&mut inner)
        } else {
            inner.lines += 1;
            let f = &mut inner.file;
            f.write_all(line.as_bytes()).and_then(|()| f.sync_data())
        };
        if let Err(e) = r {
            tracing::error!("writing job history {}: {e}", self.path.display());
        }
    }

    /// Rewrites the file with the bounded set of jobs (the newest state of each).
    fn compact(&self, inner: &mut Inner) -> std::io::Result<()> {
        bound(&mut inner.jobs, self.keep);
        inner.file = rewrite(&self.path, inner.jobs.values())?;
        inner.lines = inner.jobs.len();
        Ok(())
    }

    /// Ids of the jobs that were running when the daemon died (found by this open).
    pub fn interrupted(&self) -> &[u64] {
        &self.interrupted
    }

    /// Lines in the file now.
    pub fn lines(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
    }

    #[cfg(test)]
    fn jobs_held(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .jobs
            .len()
    }
}

/// Drops the oldest ended jobs beyond the newest `keep`; jobs not ended stay.
fn bound(jobs: &mut BTreeMap<u64, JobInfo>, keep: usize) {
    let Some(&cut) = jobs.keys().rev().nth(keep) else {
        return;
    };
    jobs.retain(|id, j| *id > cut || !j.state.is_final());
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

/// Writes `jobs` to a temporary file, syncs it, renames it over `path`, syncs the
/// directory; returns the new file opened for appending.
fn rewrite<'a>(path: &Path, jobs: impl Iterator<Item = &'a JobInfo>) -> std::io::Result<File> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = std::io::BufWriter::new(File::create(&tmp)?);
    for j in jobs {
        serde_json::to_writer(&mut f, j)?;
        f.write_all(b"\n")?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    std::fs::OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::jobs::{ErrorKind, JobError, JobKind, JobMode, JobProgress};

    fn job(id: u64, state: JobState) -> JobInfo {
        JobInfo {
            id,
            kind: JobKind::Backup,
            vm: format!("vm-{id}"),
            state,
            mode: JobMode::Auto,
            created: 1_700_000_000,
            finished: None,
            message: None,
            error: None,
            backup_id: None,
            policy: None,
            host: "h1".into(),
            hypervisor: None,
            progress: JobProgress::default(),
            instant: None,
        }
    }

    #[test]
    fn a_file_truncated_mid_line_keeps_every_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.jsonl");
        let (log, _) = JobLog::open(&path).unwrap();
        for (id, state) in [
            (1, JobState::Running),
            (1, JobState::Succeeded),
            (2, JobState::Running),
            (2, JobState::Succeeded),
        ] {
            log.record(&job(id, state));
        }
        drop(log);
        // A crash (or power loss) in the middle of job 2's last line.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 25).unwrap();
        drop(f);

        let (log, jobs) = JobLog::open(&path).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[&1].state, JobState::Succeeded);
        assert_eq!(
            jobs[&2].state,
            JobState::Failed,
            "its last whole line said running"
        );
        let msg = jobs[&2].message.clone().unwrap_or_default();
        assert!(msg.contains("daemon restarted"), "{msg}");
        assert_eq!(log.interrupted(), [2], "job 2 was running");
        // The reopened file is whole again: new lines append cleanly.
        log.record(&job(3, JobState::Succeeded));
        drop(log);
        let (_, jobs) = JobLog::open(&path).unwrap();
        assert_eq!(jobs.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(jobs[&3].state, JobState::Succeeded);
    }

    #[test]
    fn only_jobs_that_were_running_are_interrupted_work_to_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.jsonl");
        let (log, _) = JobLog::open(&path).unwrap();
        log.record(&job(1, JobState::Queued));
        log.record(&job(2, JobState::Running));
        log.record(&job(3, JobState::Running));
        log.record(&job(3, JobState::Failed));
        drop(log);
        let (log, jobs) = JobLog::open(&path).unwrap();
        assert_eq!(log.interrupted(), [2]);
        let queued = jobs[&1].message.clone().unwrap_or_default();
        assert!(queued.ends_with("while the job was queued"), "{queued}");
        assert_eq!(jobs[&1].state, JobState::Failed);
        drop(log);
        let (log, _) = JobLog::open(&path).unwrap();
        assert!(
            log.interrupted().is_empty(),
            "reported once, not at every start"
        );
    }

    #[test]
    fn the_file_stays_bounded_and_keeps_jobs_not_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.jsonl");
        let keep = 50;
        let (log, _) = JobLog::open_keeping(&path, keep).unwrap();
        log.record(&job(1, JobState::Running)); // never ends while the daemon lives
        let n = (5 * keep + 10) as u64;
        for id in 2..n {
            log.record(&job(id, JobState::Succeeded));
            assert!(
                log.lines() <= 4 * keep,
                "{} lines after job {id}",
                log.lines()
            );
            assert!(log.jobs_held() <= 4 * keep, "memory bounded too");
            if id % 25 == 0 || id == n - 1 {
                let lines = std::fs::read_to_string(&path).unwrap().lines().count();
                assert_eq!(lines, log.lines(), "after job {id}");
            }
        }
        assert!(log.lines() < 3 * keep, "compacted: {} lines", log.lines());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("{\"id\":1,"),
            "the running job survives compaction"
        );
        drop(log);
        let (_, jobs) = JobLog::open_keeping(&path, keep).unwrap();
        assert_eq!(jobs.len(), keep, "newest jobs once the running one failed");
        assert_eq!(*jobs.keys().next_back().unwrap(), n - 1);
        assert!(
            !jobs.contains_key(&1),
            "on reopen job 1 ended (interrupted), the oldest"
        );
    }

    #[test]
    fn typed_errors_round_trip_and_older_lines_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.jsonl");
        // A line as a daemon before typed job errors wrote it (no `error`; kinds as strings).
        std::fs::write(
            &path,
            concat!(
                r#"{"id":1,"kind":"restore","vm":"a","state":"failed","mode":"onto-vm","#,
                r#""created":1,"finished":2,"message":"boom","backup_id":null,"#,
                r#""progress":{"bytes_planned":0,"bytes_read":0,"bytes_done":0,"#,
                r#""bytes_zero":0,"bytes_new":0,"bytes_dedup":0,"elapsed_secs":0.0,"#,
                r#""read_rate":0.0,"eta_secs":null}}"#,
                "\n"
            ),
        )
        .unwrap();
        let (log, jobs) = JobLog::open(&path).unwrap();
        assert_eq!(jobs[&1].kind, JobKind::Restore);
        assert_eq!(jobs[&1].mode, JobMode::OntoVm);
        assert_eq!(jobs[&1].error, None);
        let mut failed = job(2, JobState::Failed);
        failed.error = Some(JobError::new(ErrorKind::Corrupt, "pack p: bad magic"));
        log.record(&failed);
        drop(log);
        let (_, jobs) = JobLog::open(&path).unwrap();
        assert_eq!(jobs[&2].error, failed.error);
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.contains(r#""error":{"kind":"corrupt","#), "{line}");
    }
}
