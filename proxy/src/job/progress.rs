//! Live progress of a job: counters updated by the data path, read by the API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters a running job updates; cheap to share (`Arc<Progress>`).
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    /// Bytes the plan will read from the hypervisor (known after the planning pass).
    pub bytes_planned: AtomicU64,
    /// Bytes read from the hypervisor so far.
    pub bytes_read: AtomicU64,
    /// Bytes of chunks handed to the repository so far (read, assembled or zero).
    pub bytes_done: AtomicU64,
    /// Bytes of chunks found to be zero (never read, never stored).
    pub bytes_zero: AtomicU64,
    /// Bytes of chunks stored as new (known at commit).
    pub bytes_new: AtomicU64,
    /// Bytes of chunks already in the repository (known at commit).
    pub bytes_dedup: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            started: Instant::now(),
            bytes_planned: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_zero: AtomicU64::new(0),
            bytes_new: AtomicU64::new(0),
            bytes_dedup: AtomicU64::new(0),
        }
    }
}

/// A consistent-enough copy of the counters, with the rate and an estimate of time left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSnapshot {
    pub bytes_planned: u64,
    pub bytes_read: u64,
    pub bytes_done: u64,
    pub bytes_zero: u64,
    pub bytes_new: u64,
    pub bytes_dedup: u64,
    pub elapsed_secs: f64,
    /// Bytes read per second since the start.
    pub read_rate: f64,
    /// Seconds left at the current rate, when it can be told.
    pub eta_secs: Option<f64>,
}

impl Progress {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let (planned, read) = (get(&self.bytes_planned), get(&self.bytes_read));
        let rate = if elapsed > 0.0 {
            read as f64 / elapsed
        } else {
            0.0
        };
        let eta = (rate > 0.0 && planned >= read).then(|| (planned - read) as f64 / rate);
        ProgressSnapshot {
            bytes_planned: planned,
            bytes_read: read,
            bytes_done: get(&self.bytes_done),
            bytes_zero: get(&self.bytes_zero),
            bytes_new: get(&self.bytes_new),
            bytes_dedup: get(&self.bytes_dedup),
            elapsed_secs: elapsed,
            read_rate: rate,
            eta_secs: eta,
        }
    }
}
