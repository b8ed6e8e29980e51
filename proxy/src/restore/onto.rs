//! Restore a backup back onto an existing VM's disks.
//!
//! Only onto a VM the hypervisor reports shut off (asked again once `qemu-nbd` holds the
//! images' write locks, so the VM cannot start in between), and only with an explicit
//! confirmation; otherwise [`ErrorKind::Refused`] with a message saying what to do. Each image
//! is written over NBD through a writable `qemu-nbd` (never edited behind QEMU's back).
//!
//! Which chunks are written, per disk ([`OntoPath`]):
//! - changed: the image still carries the bitmap of the checkpoint of the VM's latest backup
//!   `X` (qcow2, consistent, recording, same size, `X` in the catalog). Written: chunks dirty
//!   in that bitmap since `X` ∪ chunks whose digests differ between `X` and the restored
//!   backup `R`. Every other chunk already holds `R`'s data.
//! - full otherwise: every chunk of `R`, zero runs as NBD write-zeroes (which may deallocate).
//!
//! Checkpoints are kept, on purpose: the restore writes through QEMU's block layer, so the
//! image's enabled persistent bitmaps record it like any guest write, and the next backup
//! (incremental from `X`'s checkpoint) reads every restored chunk back. A bitmap left unusable
//! (`in-use` after a crash) makes that backup read in full, as after any unclean stop.
//!
//! It does not own the image tooling (`crate::hypervisor::{image, offline}`) or NBD bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use catalog::{BackupId, DiskReader, Manifest, Repository};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bits::Bits;
use super::diff::changed_chunks;
use super::error::{Error, ErrorKind, Result};
use crate::hypervisor::image::{self, ImageInfo};
use crate::hypervisor::offline::{self, OfflineDisk, OfflineRequest};
use crate::hypervisor::{DiskInfo, DomainInfo, Hypervisor, VmState};
use crate::job::Progress;
use crate::nbd::{Address, Client, ClientOptions};

/// What to restore onto which VM.
#[derive(Debug, Clone)]
pub struct OntoVmOptions {
    /// The VM whose disks are overwritten; it must be shut off.
    pub vm: String,
    /// The backup to restore (a backup of this VM, by UUID).
    pub backup: BackupId,
    /// Disk targets to restore (`vda`); empty: every disk of the backup.
    pub disks: Vec<String>,
    /// The explicit confirmation that the VM's disks may be overwritten.
    pub confirm: bool,
    /// Directory for the job's NBD sockets (created if missing).
    pub work_dir: PathBuf,
    /// Counters for the caller: `bytes_planned` (bytes to write), `bytes_done` (written,
    /// data or zeroes) and `bytes_zero` (of those, written as zeroes).
    pub progress: Arc<Progress>,
    /// Stops the restore between writes; the error then says the disk is partly restored.
    pub cancel: CancellationToken,
}

impl OntoVmOptions {
    /// Restore `backup` onto every disk of `vm`, not yet confirmed, sockets in `work_dir`.
    pub fn new(vm: impl Into<String>, backup: BackupId, work_dir: impl Into<PathBuf>) -> Self {
        OntoVmOptions {
            vm: vm.into(),
            backup,
            disks: Vec::new(),
            confirm: false,
            work_dir: work_dir.into(),
            progress: Arc::new(Progress::default()),
            cancel: CancellationToken::new(),
        }
    }
}

/// Which chunks of a disk a restore wrote, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OntoPath {
    /// Only chunks that can differ: dirty in `bitmap` since backup `base`, or different
    /// between `base` and the restored backup.
    Changed {
        base: BackupId,
        bitmap: String,
        /// Chunks the bitmap marked dirty.
        dirty_chunks: u64,
        /// Chunks whose digests differ between `base` and the restored backup.
        diff_chunks: u64,
    },
    /// Every chunk, because the changed path was not safe for `reason`.
    Full { reason: String },
}

/// What a restore did to one disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskOntoReport {
    pub disk: String,
    pub image: PathBuf,
    pub path: OntoPath,
    /// Chunk positions written (data or zeroes).
    pub chunks_written: u64,
    /// Bytes of data written.
    pub data_bytes: u64,
    /// Bytes written as zeroes (write-zeroes requests, no payload).
    pub zero_bytes: u64,
}

/// What a restore onto a VM did.
#[derive(Debug, Clone, PartialEq)]
pub struct OntoVmReport {
    pub vm: String,
    pub backup: BackupId,
    pub disks: Vec<DiskOntoReport>,
    /// Wall time.
    pub seconds: f64,
}

/// Writes in flight per disk.
const DEPTH: usize = 16;

/// Restores backup `opts.backup` onto the disks of the shut-off VM `opts.vm`.
pub async fn restore_onto_vm<H: Hypervisor>(
    hv: &H,
    repo: &Repository,
    opts: &OntoVmOptions,
) -> Result<OntoVmReport> {
    let start = Instant::now();
    let vm = opts.vm.as_str();
    let dom = domain(hv, vm).await?;
    let r = crate::repo::manifest(repo, &opts.backup)
        .await
        .map_err(|e| Error::catalog(&opts.backup, e))?;
    if r.vm.uuid != dom.uuid {
        return Err(Error::invalid(format!(
            "backup {} is of vm {} ({}), not of vm {vm} ({}): restore it as a new domain instead",
            r.id, r.vm.name, r.vm.uuid, dom.uuid
        )));
    }
    let targets = select_disks(&dom, &r, &opts.disks)?;
    require_shut_off(&dom, &r.id)?;
    require_confirm(opts, &r.id, &targets)?;
    let x = latest_backup(repo, &dom.uuid).await?;
    std::fs::create_dir_all(&opts.work_dir)
        .map_err(|e| Error::io(format!("work directory {}", opts.work_dir.display()), e))?;
    tracing::info!(vm, backup = %r.id, "restore onto vm started");
    let mut disks = Vec::new();
    for (disk, image) in &targets {
        let job = DiskJob {
            vm,
            r: &r,
            x: x.as_ref(),
            disk,
            image,
            opts,
        };
        match restore_one(hv, repo, job).await {
            Ok(d) => disks.push(d),
            Err(e) if disks.is_empty() => return Err(e),
            Err(e) => return Err(partly_done(e, vm, &disks)),
        }
    }
    tracing::info!(vm, backup = %r.id, "restore onto vm finished");
    Ok(OntoVmReport {
        vm: vm.to_string(),
        backup: r.id.clone(),
        disks,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn require_confirm(
    opts: &OntoVmOptions,
    backup: &BackupId,
    targets: &[(DiskInfo, PathBuf)],
) -> Result<()> {
    if opts.confirm {
        return Ok(());
    }
    let names: Vec<&str> = targets.iter().map(|(d, _)| d.target.as_str()).collect();
    Err(Error::new(
        ErrorKind::Refused,
        format!(
            "restoring backup {backup} onto vm {} overwrites its disks {}: confirm it \
             (--confirm) to go ahead",
            opts.vm,
            names.join(", ")
        ),
    ))
}

/// `e`, saying which disks were already restored before it.
fn partly_done(e: Error, vm: &str, done: &[DiskOntoReport]) -> Error {
    let names: Vec<&str> = done.iter().map(|d| d.disk.as_str()).collect();
    let message = format!(
        "restore onto vm {vm} stopped after disks {} were restored",
        names.join(", ")
    );
    Error::new(e.kind(), message).with_source(e)
}

async fn domain<H: Hypervisor>(hv: &H, vm: &str) -> Result<DomainInfo> {
    hv.domain(vm)
        .await
        .map_err(|e| Error::hypervisor(format!("vm {vm}"), e))
}

fn require_shut_off(dom: &DomainInfo, backup: &BackupId) -> Result<()> {
    if dom.state == VmState::ShutOff {
        return Ok(());
    }
    let state = match dom.state {
        VmState::Running => "running",
        VmState::Paused => "paused",
        _ => "not shut off",
    };
    Err(Error::new(
        ErrorKind::Refused,
        format!(
            "vm {vm} is {state}: shut it off (virsh shutdown {vm}) before restoring backup {backup} onto its disks",
            vm = dom.name
        ),
    ))
}

/// The VM's disks to overwrite, each with its local image.
fn select_disks(
    dom: &DomainInfo,
    r: &Manifest,
    wanted: &[String],
) -> Result<Vec<(DiskInfo, PathBuf)>> {
    let names: Vec<&str> = if wanted.is_empty() {
        r.disks.iter().map(|d| d.target.as_str()).collect()
    } else {
        wanted.iter().map(String::as_str).collect()
    };
    let mut out = Vec::new();
    for name in names {
        if !r.disks.iter().any(|d| d.target == name) {
            return Err(Error::not_found(format!(
                "backup {} has no disk {name}",
                r.id
            )));
        }
        let Some(disk) = dom.disks.iter().find(|d| d.target == name) else {
            return Err(Error::not_found(format!(
                "vm {} has no disk {name}",
                dom.name
            )));
        };
        let Some(image) = disk.source.clone() else {
            return Err(Error::invalid(format!(
                "disk {name} of vm {} is not a local image",
                dom.name
            )));
        };
        out.push((disk.clone(), image));
    }
    Ok(out)
}

/// The newest committed backup of the VM with `uuid` (the one its checkpoint belongs to).
async fn latest_backup(repo: &Repository, uuid: &str) -> Result<Option<Manifest>> {
    crate::repo::latest_backup(repo, uuid)
        .await
        .map_err(|e| Error::catalog(uuid, e))
}

/// One disk of one restore.
struct DiskJob<'a> {
    vm: &'a str,
    r: &'a Manifest,
    x: Option<&'a Manifest>,
    disk: &'a DiskInfo,
    image: &'a Path,
    opts: &'a OntoVmOptions,
}

async fn restore_one<H: Hypervisor>(
    hv: &H,
    repo: &Repository,
    job: DiskJob<'_>,
) -> Result<DiskOntoReport> {
    let (vm, target) = (job.vm, job.disk.target.as_str());
    let reader = open_reader(repo, &job.r.id, target).await?;
    let info = image::info(job.image, job.disk.format_named())
        .await
        .map_err(|e| Error::hypervisor(format!("disk {target} of vm {vm}"), e))?;
    if info.virtual_size != reader.size() {
        return Err(Error::invalid(format!(
            "disk {target} of vm {vm} is {} bytes, backup {}'s is {}: resize the image \
             (qemu-img resize) or restore to a new file",
            info.virtual_size,
            job.r.id,
            reader.size()
        )));
    }
    let (path, chunks) = plan(repo, &job, &info, &reader).await?;
    tracing::info!(vm, disk = target, ?path, "restore path chosen");
    let planned = chunks.as_ref().map_or(reader.chunk_count(), Bits::count);
    let planned = (planned * reader.chunk_size() as u64).min(reader.size());
    Progress::add(&job.opts.progress.bytes_planned, planned);
    let stats = write_image(hv, &job, &info, reader, chunks).await?;
    Ok(DiskOntoReport {
        disk: target.to_string(),
        image: job.image.to_path_buf(),
        path,
        chunks_written: stats.chunks,
        data_bytes: stats.data,
        zero_bytes: stats.zero,
    })
}

async fn open_reader(repo: &Repository, backup: &BackupId, disk: &str) -> Result<Arc<DiskReader>> {
    crate::repo::open_disk(repo, backup, disk)
        .await
        .map(Arc::new)
        .map_err(|e| Error::catalog(backup, e))
}

/// The changed path's base backup and bitmap, or why only a full write is safe.
fn changed_base<'a>(
    job: &DiskJob<'a>,
    info: &ImageInfo,
    reader: &DiskReader,
) -> std::result::Result<(&'a Manifest, &'a str), String> {
    let (vm, target) = (job.vm, job.disk.target.as_str());
    let x = job
        .x
        .ok_or_else(|| format!("the catalog holds no backup of vm {vm} to compare with"))?;
    let xd = x
        .disks
        .iter()
        .find(|d| d.target == target)
        .ok_or_else(|| format!("latest backup {} has no disk {target}", x.id))?;
    let cp = xd
        .checkpoint
        .as_deref()
        .ok_or_else(|| format!("latest backup {} recorded no checkpoint for {target}", x.id))?;
    if info.format != "qcow2" {
        return Err(format!("image is {}: it holds no bitmaps", info.format));
    }
    if let Some(problem) = image::bitmap_problem(info, target, cp) {
        return Err(format!(
            "bitmap {cp} of latest backup {} is unusable: {problem:?}",
            x.id
        ));
    }
    if xd.size != info.virtual_size || xd.chunk_size != reader.chunk_size() {
        return Err(format!(
            "disk size or chunk size changed since backup {}",
            x.id
        ));
    }
    Ok((x, cp))
}

/// Decides the path and, for the changed path, the chunks to write.
async fn plan(
    repo: &Repository,
    job: &DiskJob<'_>,
    info: &ImageInfo,
    reader: &Arc<DiskReader>,
) -> Result<(OntoPath, Option<Bits>)> {
    let (x, cp) = match changed_base(job, info, reader) {
        Ok(base) => base,
        Err(reason) => return Ok((OntoPath::Full { reason }, None)),
    };
    let dirty = match dirty_chunks(job, cp, reader).await {
        Ok(bits) => bits,
        Err(e) => {
            let reason = format!("reading bitmap {cp} failed: {}", catalog::Chain(&e));
            return Ok((OntoPath::Full { reason }, None));
        }
    };
    let (new, repo_c) = (reader.clone(), repo.clone());
    let (id, target) = (x.id.clone(), job.disk.target.clone());
    let diff = crate::repo::call(move || {
        let old = repo_c.open_disk(&id, &target)?;
        Ok(changed_chunks(&new, &old))
    })
    .await
    .map_err(|e| Error::catalog(&x.id, e))??;
    let mut write = dirty.clone();
    write.union_with(&diff);
    let path = OntoPath::Changed {
        base: x.id.clone(),
        bitmap: cp.to_string(),
        dirty_chunks: dirty.count(),
        diff_chunks: diff.count(),
    };
    Ok((path, Some(write)))
}

/// The chunks bitmap `cp` of the image marks dirty, read offline (`qemu-nbd -B`).
async fn dirty_chunks(job: &DiskJob<'_>, cp: &str, reader: &DiskReader) -> Result<Bits> {
    let (vm, target) = (job.vm, job.disk.target.as_str());
    let what = format!("bitmap {cp} of disk {target} of vm {vm}");
    let req = OfflineRequest {
        vm: vm.to_string(),
        disks: vec![OfflineDisk {
            disk: target.to_string(),
            image: job.image.to_path_buf(),
            format: job.disk.format_named().to_string(),
            tracked: true,
        }],
        incremental_from: Some(cp.to_string()),
        new_checkpoint: None,
        socket: job.opts.work_dir.join(format!("bitmap-{target}.sock")),
    };
    let session = offline::begin_offline_backup(req)
        .await
        .map_err(|e| Error::hypervisor(&what, e))?;
    let read = read_dirty(&session.exports()[0], reader).await;
    let _ = session.finish().await;
    read.map_err(|e| Error::nbd(&what, e))
}

async fn read_dirty(
    export: &crate::hypervisor::DiskExport,
    reader: &DiskReader,
) -> crate::nbd::Result<Bits> {
    let context = export.dirty_bitmap_context.clone().unwrap_or_default();
    let opts = ClientOptions {
        export: export.export_name.clone(),
        meta_contexts: vec![context.clone()],
        ..Default::default()
    };
    let client = Client::connect(&Address::Unix(export.socket.clone()), &opts).await?;
    let extents = client.extents(&context, 0, reader.size()).await;
    let _ = client.disconnect().await;
    let cs = reader.chunk_size() as u64;
    let mut bits = Bits::new(reader.chunk_count());
    for e in extents?.iter().filter(|e| e.flags & 1 != 0) {
        for i in e.offset / cs..e.end().div_ceil(cs) {
            bits.set(i, true);
        }
    }
    Ok(bits)
}

#[derive(Debug, Default)]
struct WriteStats {
    chunks: u64,
    data: u64,
    zero: u64,
}

/// Opens the image writable, checks the VM is still off, writes, flushes and closes it.
async fn write_image<H: Hypervisor>(
    hv: &H,
    job: &DiskJob<'_>,
    info: &ImageInfo,
    reader: Arc<DiskReader>,
    chunks: Option<Bits>,
) -> Result<WriteStats> {
    let (vm, target) = (job.vm, job.disk.target.as_str());
    let what = format!("disk {target} of vm {vm}");
    let socket = job.opts.work_dir.join(format!("restore-{target}.sock"));
    let image = offline::open_writable(vm, target, job.image, &info.format, &socket)
        .await
        .map_err(|e| Error::hypervisor(&what, e))?;
    let written = async {
        // qemu-nbd now holds the write lock: the VM cannot start until it is closed.
        require_shut_off(&domain(hv, vm).await?, &job.r.id)?;
        let opts = ClientOptions {
            export: target.to_string(),
            ..Default::default()
        };
        let client = Client::connect(&Address::Unix(socket.clone()), &opts)
            .await
            .map_err(|e| Error::nbd(&what, e))?;
        let stats = write_chunks(&client, reader, chunks, job.opts, &what).await;
        let flushed = client.flush().await.map_err(|e| Error::nbd(&what, e));
        let _ = client.disconnect().await;
        let stats = stats?;
        flushed.map(|()| stats)
    }
    .await;
    let closed = image.close().await.map_err(|e| Error::hypervisor(&what, e));
    let stats = written?;
    closed?;
    Ok(stats)
}

/// A write the producer hands to the NBD side.
enum Piece {
    Data { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64 },
}

/// Writes the selected chunks (all when `chunks` is `None`): chunks are read on a dedicated
/// thread (`crate::repo::dedicated`: it reads the whole disk, paced by the bounded channel)
/// and written with up to [`DEPTH`] requests in flight.
async fn write_chunks(
    client: &Client,
    reader: Arc<DiskReader>,
    chunks: Option<Bits>,
    opts: &OntoVmOptions,
    what: &str,
) -> Result<WriteStats> {
    let cs = reader.chunk_size() as u64;
    let (tx, mut rx) = mpsc::channel(DEPTH);
    let thread = format!("onto-{}", reader.manifest().target);
    let producer = crate::repo::dedicated(&thread, move || produce(&reader, chunks.as_ref(), &tx));
    let mut stats = WriteStats::default();
    let mut inflight = FuturesUnordered::new();
    let mut failure = None;
    loop {
        let piece = tokio::select! {
            biased;
            () = opts.cancel.cancelled() => {
                failure = Some(Error::new(ErrorKind::Cancelled, format!(
                    "restore onto {what} cancelled after {} bytes: the disk is partly \
                     restored; restore again before starting the vm",
                    stats.data + stats.zero
                )));
                break;
            }
            piece = rx.recv() => piece,
        };
        let piece = match piece {
            None => break,
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
        };
        count(&mut stats, &piece, cs, &opts.progress);
        inflight.push(write_piece(client.clone(), piece));
        if inflight.len() >= DEPTH {
            if let Some(Err(e)) = inflight.next().await {
                failure = Some(Error::nbd(what, e));
                break;
            }
        }
    }
    drop(rx);
    while let Some(r) = inflight.next().await {
        if let (Err(e), None) = (r, &failure) {
            failure = Some(Error::nbd(what, e));
        }
    }
    if let (Err(e), None) = (producer.await, &failure) {
        // The reader ended without sending everything (it panicked): not a whole restore.
        failure = Some(Error::catalog(what, e));
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

fn count(stats: &mut WriteStats, piece: &Piece, cs: u64, progress: &Progress) {
    match piece {
        Piece::Data { data, .. } => {
            stats.chunks += 1;
            stats.data += data.len() as u64;
            Progress::add(&progress.bytes_done, data.len() as u64);
        }
        Piece::Zero { len, .. } => {
            stats.chunks += len.div_ceil(cs);
            stats.zero += len;
            Progress::add(&progress.bytes_done, *len);
            Progress::add(&progress.bytes_zero, *len);
        }
    }
}

async fn write_piece(client: Client, piece: Piece) -> crate::nbd::Result<()> {
    match piece {
        Piece::Data { offset, data } => client.write(offset, data, false).await,
        Piece::Zero { offset, len } => client.write_zeroes(offset, len, false).await,
    }
}

/// Reads the selected chunks in order and sends them; runs of zero chunks become one piece.
fn produce(reader: &DiskReader, chunks: Option<&Bits>, tx: &mpsc::Sender<Result<Piece>>) {
    let cs = reader.chunk_size() as u64;
    let mut run: Option<(u64, u64)> = None;
    let send_run = |run: &mut Option<(u64, u64)>| match run.take() {
        Some((offset, len)) => tx.blocking_send(Ok(Piece::Zero { offset, len })).is_ok(),
        None => true,
    };
    for i in 0..reader.chunk_count() {
        if chunks.is_some_and(|b| !b.get(i)) {
            if !send_run(&mut run) {
                return;
            }
            continue;
        }
        let offset = i * cs;
        let len = (reader.size() - offset).min(cs);
        let piece = match reader.is_zero(i) {
            Ok(true) => {
                match &mut run {
                    Some((o, l)) if *o + *l == offset => *l += len,
                    _ => {
                        if !send_run(&mut run) {
                            return;
                        }
                        run = Some((offset, len));
                    }
                }
                continue;
            }
            Ok(false) => reader.read_chunk(i).map(|data| Piece::Data {
                offset,
                data: Bytes::copy_from_slice(&data),
            }),
            Err(e) => Err(e),
        };
        let piece = piece.map_err(|e| {
            Error::catalog(format!("restore onto disk {}", reader.manifest().target), e)
        });
        let failed = piece.is_err();
        if !send_run(&mut run) || tx.blocking_send(piece).is_err() || failed {
            return;
        }
    }
    send_run(&mut run);
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::{
        BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, MemBackend, RepoConfig,
        RepoOptions, VmIdentity,
    };

    const CS: u64 = 64 << 10;

    /// A one-disk backup of 8 chunks: data in chunks 0, 1 and 5, zeroes elsewhere.
    fn reader(dir: &Path) -> DiskReader {
        let opts = RepoOptions::new(dir.join("catalog.db"));
        let backend = Arc::new(MemBackend::new());
        let repo = Repository::create(backend, RepoConfig::default(), opts).unwrap();
        let w = repo
            .begin_backup(BackupSpec {
                vm: VmIdentity {
                    name: "v".into(),
                    uuid: "u".into(),
                },
                disks: vec![DiskSpec {
                    full_read: None,
                    target: "vda".into(),
                    size: 8 * CS,
                    checkpoint: None,
                }],
                parent: None,
                started: 1,
            })
            .unwrap();
        assert_eq!(w.chunk_size() as u64, CS);
        let mut data = vec![0u8; 8 * CS as usize];
        for i in [0u64, 1, 5] {
            data[(i * CS) as usize..((i + 1) * CS) as usize].fill(i as u8 + 1);
        }
        w.put_chunks(0, 0, &data).unwrap();
        let info = CommitInfo {
            vm_state: None,
            domain_xml: "<domain/>".into(),
            mode: BackupMode::Full,
            consistency: Consistency::Crash,
            finished: 2,
        };
        let m = w.commit(info).unwrap();
        repo.open_disk(&m.id, "vda").unwrap()
    }

    /// What `produce` sends, as (first chunk, chunks, is data).
    fn pieces(reader: &DiskReader, chunks: Option<&Bits>) -> Vec<(u64, u64, bool)> {
        let (tx, mut rx) = mpsc::channel(64);
        produce(reader, chunks, &tx);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(match p.unwrap() {
                Piece::Data { offset, data } => (offset / CS, data.len() as u64 / CS, true),
                Piece::Zero { offset, len } => (offset / CS, len / CS, false),
            });
        }
        out
    }

    #[test]
    fn zero_runs_are_coalesced_and_only_selected_chunks_sent() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path());
        let all = pieces(&r, None);
        let want = [
            (0, 1, true),
            (1, 1, true),
            (2, 3, false),
            (5, 1, true),
            (6, 2, false),
        ];
        assert_eq!(all, want);
        let mut sel = Bits::new(8);
        for i in [1, 2, 3, 6] {
            sel.set(i, true);
        }
        let some = pieces(&r, Some(&sel));
        assert_eq!(some, [(1, 1, true), (2, 2, false), (6, 1, false)]);
    }
}
