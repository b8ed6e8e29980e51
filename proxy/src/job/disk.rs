//! Reading one disk's point-in-time export into the repository.
//!
//! Walks the export window by window: block status (`base:allocation`, and the dirty bitmap
//! for an incremental) is asked once per window in a first pass, which keeps each window's
//! dirty and zero ranges (a few ranges per window, not per chunk) so the bytes to read are
//! known before reading starts; the second pass plans each window from what was kept
//! (`crate::plan`, pure) and reads batches of chunks with many NBD requests in flight,
//! assembled over zeros or the parent's chunk, handed to the repository through
//! `crate::repo::IngestSink`. Chunk memory is bounded by `depth × batch_bytes` whatever the
//! disk size.

use std::ops::Range;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::error::{Error, Result};
use super::progress::Progress;
use crate::hypervisor::DiskExport;
use crate::nbd::{self, Address, Client, ClientOptions, Extent};
use crate::plan::{self, Base, ChunkAction, ChunkPlan, Geometry};
use crate::repo::IngestSink;

/// `NBD_STATE_ZERO` in `base:allocation`: the extent reads as zeros.
const STATE_ZERO: u32 = 1 << 1;
/// Bit 0 of a `qemu:dirty-bitmap:` context: the extent changed.
const STATE_DIRTY: u32 = 1;

/// How one disk is read.
#[derive(Debug, Clone)]
pub(crate) struct DiskJob {
    pub vm: String,
    /// Index of the disk in the backup.
    pub index: usize,
    pub export: DiskExport,
    /// Whether there is no parent (untouched bytes are zero, every chunk is planned).
    pub full: bool,
    pub window: u64,
    pub batch_bytes: u64,
    pub depth: usize,
    pub connections: usize,
    pub read_limit: Option<Arc<super::RateLimit>>,
    /// For a remote export (`export.tcp_port`): the host to dial and the TLS to speak.
    pub remote: Option<(String, nbd::ClientTls)>,
}

/// Block status of one window, as asked once: its dirty and zero byte ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WindowStatus {
    window: Range<u64>,
    dirty: Vec<Range<u64>>,
    zero: Vec<Range<u64>>,
}

impl WindowStatus {
    fn dirty_bytes(&self) -> u64 {
        self.dirty.iter().map(|r| r.end - r.start).sum()
    }
}

/// What one disk cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DiskStats {
    pub bytes_read: u64,
    pub bytes_dirty: u64,
}

struct Ctx {
    job: DiskJob,
    client: Client,
    sink: IngestSink,
    geo: Geometry,
    progress: Arc<Progress>,
    max_request: u64,
}

/// Reads the disk of `job` into `sink`; stops early when `cancel` fires.
pub(crate) async fn back_up_disk(
    job: DiskJob,
    sink: IngestSink,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<DiskStats> {
    let what = format!("disk {} of vm {}", job.export.disk, job.vm);
    let client = connect(&job).await.map_err(|e| Error::nbd(&what, e))?;
    let geo = Geometry {
        disk_size: client.size(),
        chunk_size: sink.chunk_size(),
    };
    let max_request = u64::from(client.max_request()).min(job.batch_bytes.max(geo.chunk_size));
    let ctx = Ctx {
        job,
        client,
        sink,
        geo,
        progress,
        max_request,
    };
    let result = tokio::select! {
        r = ctx.run() => r,
        _ = cancel.cancelled() => Err(Error::cancelled(&ctx.job.vm)),
    };
    let _ = ctx.client.disconnect().await;
    result
}

async fn connect(job: &DiskJob) -> nbd::Result<Client> {
    let mut contexts = vec![nbd::BASE_ALLOCATION.to_string()];
    if let Some(c) = &job.export.dirty_bitmap_context {
        contexts.push(c.clone());
    }
    let opts = ClientOptions {
        export: job.export.export_name.clone(),
        meta_contexts: contexts,
        connections: job.connections.max(1),
        max_in_flight_bytes: (job.depth as u64 * job.batch_bytes) as usize,
        max_in_flight_requests: job.depth.max(1) * 4,
        ..ClientOptions::default()
    };
    match (job.export.tcp_port, &job.remote) {
        (Some(port), Some((host, tls))) => {
            let opts = ClientOptions {
                tls: Some(tls.clone()),
                ..opts
            };
            let addr = Address::Tcp {
                host: host.clone(),
                port,
            };
            Client::connect(&addr, &opts).await
        }
        (Some(port), None) => Err(nbd::Error::new(
            nbd::ErrorKind::InvalidArgument,
            format!(
                "disk {} is exported on tcp port {port}, but no remote data path is configured",
                job.export.disk
            ),
        )),
        (None, _) => Client::connect(&Address::Unix(job.export.socket.clone()), &opts).await,
    }
}

impl Ctx {
    async fn run(&self) -> Result<DiskStats> {
        // First pass: block status once per window, kept, so the bytes to read are known
        // before reading starts (progress).
        let mut stats = DiskStats::default();
        let mut statuses = Vec::new();
        for w in self.windows() {
            let status = self.status(w).await?;
            stats.bytes_dirty += status.dirty_bytes();
            let planned: u64 = self.plan(&status)?.iter().map(ChunkPlan::read_bytes).sum();
            Progress::add(&self.progress.bytes_planned, planned);
            statuses.push(status);
        }
        for status in &statuses {
            stats.bytes_read += self.ingest(self.plan(status)?).await?;
        }
        Ok(stats)
    }

    fn windows(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let (size, step) = (self.geo.disk_size, self.job.window);
        (0..size.div_ceil(step)).map(move |i| i * step..((i + 1) * step).min(size))
    }

    /// Dirty and zero byte ranges of window `w`, asked of the export.
    async fn status(&self, w: Range<u64>) -> Result<WindowStatus> {
        let what = || {
            format!(
                "block status of disk {} of vm {} at offset {}",
                self.job.export.disk, self.job.vm, w.start
            )
        };
        let all = self
            .client
            .extents_all(w.start, w.end - w.start)
            .await
            .map_err(|e| Error::nbd(what(), e))?;
        let pick = |name: &str, bit: u32| -> Vec<Range<u64>> {
            all.get(name).map(|v| select(v, bit)).unwrap_or_default()
        };
        let zero = pick(nbd::BASE_ALLOCATION, STATE_ZERO);
        let dirty = match &self.job.export.dirty_bitmap_context {
            Some(ctx) if !self.job.full => pick(ctx, STATE_DIRTY),
            _ => vec![w.clone()],
        };
        Ok(WindowStatus {
            window: w,
            dirty,
            zero,
        })
    }

    /// The plan of one window from its block status (pure: no request).
    fn plan(&self, s: &WindowStatus) -> Result<Vec<ChunkPlan>> {
        plan::plan_window(self.geo, s.window.clone(), &s.dirty, &s.zero, self.job.full)
            .map_err(|e| Error::plan(format!("plan of {}", self.what()), e))
    }

    /// Stores the planned chunks of one window; returns the bytes read from the hypervisor.
    async fn ingest(&self, plans: Vec<ChunkPlan>) -> Result<u64> {
        let (zeros, batches) = batch(plans, self.geo.chunk_size, self.job.batch_bytes);
        for z in zeros {
            let bytes = self.chunk_bytes(&z);
            self.sink
                .put_zeros(self.job.index, z)
                .await
                .map_err(|e| Error::repo(self.what(), e))?;
            Progress::add(&self.progress.bytes_zero, bytes);
            Progress::add(&self.progress.bytes_done, bytes);
        }
        let read: Vec<u64> = stream::iter(batches)
            .map(|b| self.ingest_batch(b))
            .buffer_unordered(self.job.depth.max(1))
            .try_collect()
            .await?;
        Ok(read.iter().sum())
    }

    fn chunk_bytes(&self, r: &Range<u64>) -> u64 {
        let end = (r.end * self.geo.chunk_size).min(self.geo.disk_size);
        end - r.start * self.geo.chunk_size
    }

    fn what(&self) -> String {
        format!("disk {} of vm {}", self.job.export.disk, self.job.vm)
    }

    /// Reads, assembles and stores one batch of consecutive chunks.
    async fn ingest_batch(&self, plans: Vec<ChunkPlan>) -> Result<u64> {
        let first = plans[0].index;
        let start = first * self.geo.chunk_size;
        let last = plans[plans.len() - 1].index;
        let end = self.geo.chunk_range(last).end;
        let mut buf = vec![0u8; (end - start) as usize];
        self.fill_bases(&plans, start, &mut buf).await?;
        let mut read = 0;
        let requests = plan::read_requests(&plans, self.max_request);
        let reads = requests.iter().map(|r| self.read(r.clone()));
        let parts = futures_util::future::try_join_all(reads).await?;
        for (r, data) in requests.iter().zip(parts) {
            let at = (r.start - start) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
            read += data.len() as u64;
        }
        let len = buf.len() as u64;
        self.sink
            .put_chunks(self.job.index, first, buf)
            .await
            .map_err(|e| Error::repo(self.what(), e))?;
        Progress::add(&self.progress.bytes_done, len);
        Ok(read)
    }

    /// Lays the parent's chunk under every chunk planned over the parent. Zero-based chunks
    /// and explicit zero ranges need nothing: the buffer starts zeroed and reads come after.
    async fn fill_bases(&self, plans: &[ChunkPlan], start: u64, buf: &mut [u8]) -> Result<()> {
        for p in plans {
            let ChunkAction::Assemble { base, zeros, .. } = &p.action else {
                continue;
            };
            let r = self.geo.chunk_range(p.index);
            let at = (r.start - start) as usize;
            let len = (r.end - r.start) as usize;
            if *base == Base::Parent {
                let parent = self
                    .sink
                    .parent_chunk(self.job.index, p.index, len)
                    .await
                    .map_err(|e| Error::repo(self.what(), e))?;
                buf[at..at + len].copy_from_slice(&parent);
            }
            for z in zeros {
                let zs = (z.start - start) as usize;
                buf[zs..zs + (z.end - z.start) as usize].fill(0);
            }
        }
        Ok(())
    }

    async fn read(&self, r: Range<u64>) -> Result<bytes::Bytes> {
        if let Some(limit) = &self.job.read_limit {
            limit.take(r.end - r.start).await;
        }
        let data = self
            .client
            .read(r.start, r.end - r.start)
            .await
            .map_err(|e| Error::nbd(format!("read of {} at offset {}", self.what(), r.start), e))?;
        if data.len() as u64 != r.end - r.start {
            return Err(Error::new(
                super::ErrorKind::Failed,
                format!(
                    "read of {} at offset {}: got {} bytes, asked {}",
                    self.what(),
                    r.start,
                    data.len(),
                    r.end - r.start
                ),
            ));
        }
        Progress::add(&self.progress.bytes_read, data.len() as u64);
        Ok(data)
    }
}

/// The byte ranges of `extents` whose flags have `bit` set, merged.
fn select(extents: &[Extent], bit: u32) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for e in extents.iter().filter(|e| e.flags & bit != 0) {
        match out.last_mut() {
            Some(last) if last.end == e.offset => last.end = e.end(),
            _ => out.push(e.offset..e.end()),
        }
    }
    out
}

/// Splits a window's plans into runs of zero chunks (chunk index ranges) and batches of
/// consecutive chunks to assemble, each at most `batch_bytes` long.
fn batch(
    plans: Vec<ChunkPlan>,
    chunk_size: u64,
    batch_bytes: u64,
) -> (Vec<Range<u64>>, Vec<Vec<ChunkPlan>>) {
    let per_batch = (batch_bytes / chunk_size).max(1) as usize;
    let mut zeros: Vec<Range<u64>> = Vec::new();
    let mut batches: Vec<Vec<ChunkPlan>> = Vec::new();
    for p in plans {
        if p.action == ChunkAction::Zero {
            match zeros.last_mut() {
                Some(z) if z.end == p.index => z.end += 1,
                _ => zeros.push(p.index..p.index + 1),
            }
            continue;
        }
        match batches.last_mut() {
            Some(b) if b.len() < per_batch && b.last().map(|l| l.index + 1) == Some(p.index) => {
                b.push(p)
            }
            _ => batches.push(vec![p]),
        }
    }
    (zeros, batches)
}

#[cfg(test)]
// One whole-chunk read is the natural plan of a full chunk, not a typo for a range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn plan(index: u64, action: ChunkAction) -> ChunkPlan {
        ChunkPlan { index, action }
    }

    fn full(index: u64, cs: u64) -> ChunkPlan {
        plan(
            index,
            ChunkAction::Assemble {
                base: Base::Zero,
                reads: vec![index * cs..(index + 1) * cs],
                zeros: vec![],
            },
        )
    }

    #[test]
    fn batches_are_consecutive_and_bounded_and_zero_runs_merge() {
        let cs = 64 << 10;
        let plans = vec![
            full(0, cs),
            full(1, cs),
            full(2, cs),
            plan(3, ChunkAction::Zero),
            plan(4, ChunkAction::Zero),
            full(6, cs),
            plan(8, ChunkAction::Zero),
        ];
        let (zeros, batches) = batch(plans, cs, 2 * cs);
        assert_eq!(zeros, vec![3..5, 8..9]);
        let idx: Vec<Vec<u64>> = batches
            .iter()
            .map(|b| b.iter().map(|p| p.index).collect())
            .collect();
        assert_eq!(idx, vec![vec![0, 1], vec![2], vec![6]]);
    }

    /// An in-memory export that records the offset of every block-status request.
    struct Counting {
        inner: nbd::MemoryExport,
        asked: std::sync::Mutex<Vec<u64>>,
    }

    impl nbd::BlockExport for Counting {
        fn size(&self) -> u64 {
            self.inner.size()
        }

        fn read(
            &self,
            o: u64,
            n: u32,
        ) -> nbd::BoxFuture<'_, nbd::ExportResult<Vec<nbd::ReadPart>>> {
            self.inner.read(o, n)
        }

        fn block_status(
            &self,
            context: usize,
            offset: u64,
            length: u32,
        ) -> nbd::BoxFuture<'_, nbd::ExportResult<Vec<nbd::StatusExtent>>> {
            self.asked.lock().unwrap().push(offset);
            self.inner.block_status(context, offset, length)
        }
    }

    /// Serves `data` as export `vda` on a unix socket in `dir`.
    fn serve(dir: &std::path::Path, data: &[u8]) -> (Arc<Counting>, std::path::PathBuf) {
        let export = Arc::new(Counting {
            inner: nbd::MemoryExport::from_bytes(data, false),
            asked: Default::default(),
        });
        let server = nbd::Server::new(nbd::ServerOptions::default());
        server.add_export("vda", export.clone());
        let socket = dir.join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(server.serve_unix(listener));
        (export, socket)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_is_asked_once_per_window() {
        use catalog::{BackupSpec, DiskSpec, MemBackend, RepoConfig, RepoOptions, Repository};
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = 4 << 20;
        let mut data = vec![0u8; size as usize];
        data[..64 << 10].fill(7);
        data[(3 << 20)..(3 << 20) + 4096].fill(9);
        let (export, socket) = serve(dir.path(), &data);
        let opts = RepoOptions::new(dir.path().join("catalog.db"));
        let backend = Arc::new(MemBackend::new());
        let repo = Repository::create(backend, RepoConfig::default(), opts).unwrap();
        let spec = BackupSpec {
            vm: catalog::VmIdentity {
                name: "v".into(),
                uuid: "u".into(),
            },
            disks: vec![DiskSpec {
                full_read: None,
                target: "vda".into(),
                size,
                checkpoint: None,
            }],
            parent: None,
            started: 1,
        };
        let sink = IngestSink::begin(repo, spec, None).await.unwrap();
        let window = 1 << 20;
        let job = DiskJob {
            vm: "v".into(),
            index: 0,
            export: DiskExport {
                disk: "vda".into(),
                socket,
                tcp_port: None,
                export_name: "vda".into(),
                dirty_bitmap_context: None,
                capacity: size,
            },
            full: true,
            window,
            batch_bytes: 256 << 10,
            depth: 4,
            connections: 1,
            read_limit: None,
            remote: None,
        };
        let progress = Arc::new(Progress::default());
        let stats = back_up_disk(job, sink, progress.clone(), CancellationToken::new())
            .await
            .unwrap();
        let mut asked = export.asked.lock().unwrap().clone();
        let all = asked.len();
        asked.sort_unstable();
        asked.dedup();
        assert_eq!(asked.len(), all, "an offset was asked twice: {asked:?}");
        let windows: Vec<u64> = (0..size / window).map(|i| i * window).collect();
        assert!(windows.iter().all(|w| asked.contains(w)), "{asked:?}");
        let p = progress.snapshot();
        assert_eq!(p.bytes_done, size);
        assert_eq!(stats.bytes_read, p.bytes_planned);
    }

    #[test]
    fn select_merges_touching_extents_with_the_bit() {
        let e = |offset, length, flags| Extent {
            offset,
            length,
            flags,
        };
        let v = vec![e(0, 10, 3), e(10, 5, 2), e(15, 5, 0), e(20, 5, 2)];
        assert_eq!(select(&v, STATE_ZERO), vec![0..15, 20..25]);
        assert_eq!(select(&v, 1), vec![0..10]);
    }
}
