//! Sluice's repository and catalog.
//!
//! Owns everything Sluice keeps on disk: the content-addressed chunk store (blobs in packs),
//! per-disk two-level indexes, backup manifests, verify, retention, prune, GC, and the SQLite
//! catalog. Synchronous by design: async code reaches it through one seam in `proxy` on a
//! bounded blocking pool. The byte formats are drawn in `docs/formats.md`.
//!
//! # Shape
//! - [`Repository::create`] / [`Repository::open`] over a [`Backend`] (`FsBackend` now).
//! - Backup: [`Repository::begin_backup`] → [`BackupWriter`] (`put_chunks_owned`,
//!   `put_chunk`, `put_zeros`, `keep_parent`) → [`BackupWriter::commit`]. Hashing and
//!   compression run on worker threads fed by bounded channels; the manifest, written last,
//!   is the commit point; dropping the writer aborts.
//! - Restore: [`Repository::open_disk`] → [`DiskReader`] (`read_at`, `digest`, `is_zero`).
//! - Upkeep: [`Repository::verify`], [`Repository::prune`], [`Repository::gc`],
//!   [`Repository::rebuild_catalog`].
//!
//! # Which operation may run beside which
//! Locks are the backend's repository lock ([`LockMode`]: `flock` on `<repo>/lock` for the
//! filesystem backend, released by the kernel if the process dies).
//!
//! | running ↓ / starting → | backup | restore read | verify | prune | gc | rebuild-catalog |
//! |---|---|---|---|---|---|---|
//! | backup (shared) | yes | yes | yes | yes | waits / `Locked` | yes |
//! | restore read (no lock) | yes | yes | yes | yes¹ | yes² | yes³ |
//! | verify (shared) | yes | yes | yes | yes | waits / `Locked` | yes |
//! | prune (shared) | yes⁴ | yes¹ | yes | yes | waits / `Locked` | yes |
//! | gc (exclusive) | waits | yes² | waits | waits | waits / `Locked` | waits |
//! | rebuild-catalog (shared) | yes³ | yes³ | yes | yes | waits / `Locked` | yes |
//!
//! 1. A reader of a backup that prune removes keeps its loaded index; once GC has run,
//!    reads of its chunks fail with `NotFound` (never wrong data). A long-lived reader
//!    therefore holds its backup ([`Repository::hold`]): prune keeps a held backup and
//!    removing it is refused, so GC keeps every chunk it names.
//! 2. GC only drops blobs no committed manifest references; a repacked blob moves, and a
//!    read that finds its pack gone looks the location up again once.
//! 3. While the catalog is rebuilt, lookups may miss: readers fail with `NotFound` and may
//!    retry; a writer may store a duplicate copy (harmless, GC reclaims it), and a writer
//!    whose parent index block is not found then fails (nothing committed; the next backup
//!    runs normally).
//! 4. A backup whose parent is pruned meanwhile still commits complete: its writer reads
//!    the parent's index blocks on demand, and GC (the only deleter of blobs) cannot run
//!    until it ends, so they stay readable.
//!
//! Why GC is exclusive rather than generation-based: a writer deduplicates against any chunk
//! the catalog knows, including chunks of pruned backups or aborted writers that no manifest
//! references. Only excluding GC for the writer's whole life makes "a backup that began
//! before GC and commits after is complete" hold without tracking every reused chunk.
//!
//! io_uring is opt-in for batched restore reads only ([`FsOptions::io_uring`], which the
//! daemon sets from `SLUICE_IO_URING=on`; `backend::uring`): `bench_read` measured no gain
//! over `pread` here (docs/benchmarks.md). The crate reads no environment variables.

pub mod backend;
mod bloom;
mod db;
mod error;
pub mod format;
mod gc;
mod hold;
mod ids;
mod lru;
mod reader;
mod repo;
pub mod retention;
mod scratch;
mod verify;
mod writer;

pub use backend::fault::FaultBackend;
pub use backend::fs::{FsBackend, FsOptions};
pub use backend::mem::MemBackend;
pub use backend::{Backend, LockGuard, LockMode};
pub use db::{BackupRow, Catalog, Location, SCHEMA_VERSION};
pub use error::{Chain, Error, ErrorKind, Result};
pub use format::config::RepoConfig;
pub use format::manifest::{
    BackupMode, BackupStats, Consistency, DiskManifest, Manifest, VmIdentity, VmStateAtBackup,
};
pub use gc::{GcOptions, GcReport, PruneReport};
pub use hold::BackupHold;
pub use ids::{BackupId, ChunkDigest, PackId};
pub use reader::DiskReader;
pub use repo::{RebuildReport, RepoOptions, Repository};
pub use retention::RetentionPolicy;
pub use verify::{Affected, Problem, ProblemKind, VerifyMode, VerifyReport};
pub use writer::{BackupSpec, BackupWriter, CommitInfo, DiskSpec};
