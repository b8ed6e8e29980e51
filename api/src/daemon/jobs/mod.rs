//! Background jobs: the registry with its limits, progress and cancel (`registry`), the
//! durable job history (`log`, `jobs.jsonl`) and the Prometheus job metrics (`metrics`). The
//! job as the API shows it is `crate::wire::jobs`.

pub mod log;
pub mod metrics;
pub mod registry;

pub use registry::{JobDone, JobHandle, JobLimits, JobOutcome, JobSpec, Jobs};
