//! A bandwidth limit on reads from the hypervisor: one [`RateLimit`] shared (`Arc`) by every
//! disk of a job, or by every job of a daemon, paces the reads of all of them together.
//!
//! Each read reserves the next `len / rate` seconds of the line and waits until its slot
//! ends, so `n` bytes never take less than `n / rate` seconds, whatever the read sizes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `bytes_per_sec` bytes per second, over every reader sharing it.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    /// When the line is free again.
    next: Mutex<Instant>,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// The limit, bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Waits until `len` bytes may be read.
    pub async fn take(&self, len: u64) {
        let cost = Duration::from_secs_f64(len as f64 / self.bytes_per_sec as f64);
        let end = {
            let mut next = self.next.lock().expect("rate limit lock");
            let end = (*next).max(Instant::now()) + cost;
            *next = end;
            end
        };
        tokio::time::sleep_until(end.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;
    use std::sync::Arc;
    use std::time::Instant;

    #[tokio::test]
    async fn readers_sharing_a_limit_are_paced_together() {
        let limit = Arc::new(RateLimit::new(1 << 20));
        let start = Instant::now();
        let readers = (0..4).map(|_| {
            let l = limit.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    l.take(64 << 10).await;
                }
            })
        });
        for r in readers {
            r.await.unwrap();
        }
        // 12 reads of 64 KiB = 768 KiB at 1 MiB/s: 0.75 s.
        let took = start.elapsed().as_secs_f64();
        assert!((0.74..1.5).contains(&took), "took {took} s");
    }
}
