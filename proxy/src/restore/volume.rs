//! Restore as a new domain into a libvirt storage pool: for a hypervisor that shares nothing
//! with the proxy but the network. Each disk becomes a volume of the pool, filled over the
//! libvirt connection (a sparse upload: zero chunks go as holes and stay unallocated), and the
//! domain is defined from the backup's saved definition with a new name, UUID, MACs and NVRAM,
//! its disks on the new volumes and its character devices renamed beside the original's
//! (`PREFIX-NAME` in the same directory; see `crate::hypervisor::xml_restore`).
//!
//! Owns the rules: volume names (`NAME-DISK.qcow2` or `.raw`), never over an existing volume
//! or domain (checked first, and libvirt refuses to create either over an existing one, so a
//! race loses nothing), the order of the steps, and undoing them: a restore that fails or is
//! cancelled deletes the volumes it created and undefines the domain if it defined it, and
//! its error says what it removed (or what it could not remove, and why). Only what this
//! restore created is ever removed.
//!
//! Formats: libvirt writes an upload's bytes into the volume file as they come, whatever the
//! volume's format (a raw upload into a qcow2 volume overwrites its header: measured on
//! libvirt 9.0, `qemu-img info` then says `raw`). So the disk is uploaded into a raw volume,
//! and a qcow2 restore has the hypervisor convert it (`virStorageVolCreateXMLFrom`, which runs
//! `qemu-img convert` there and keeps holes unallocated) into the final volume, then deletes
//! the raw one (named `.NAME-DISK.qcow2.sluice-raw` meanwhile). qcow2 needs a file pool
//! (`dir`, `fs`, `netfs`); other pools take raw volumes.
//!
//! Data path: a dedicated thread reads the disk through `crate::repo::dedicated` (zero runs
//! from the index, data chunks in batches) into a bounded channel; the async loop paces the
//! data bytes (`RateLimit`), honours cancel between pieces and hands them to the upload thread
//! of the adapter (`crate::hypervisor::libvirt::upload`, also bounded). Progress:
//! `bytes_planned` the disks' sizes, `bytes_done` every byte handed to the upload (holes
//! included), `bytes_read` the data bytes, `bytes_zero` the hole bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use catalog::{DiskReader, Repository};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::domain::check_name;
use super::error::{Error, ErrorKind, Result};
use super::file::{open_reader, ImageFormat, BATCH};
use super::name::ExportName;
use crate::hypervisor::libvirt::storage::{PoolInfo, VolumeInfo, VolumeKind};
use crate::hypervisor::libvirt::upload::{Piece, VolumeUpload, DEPTH};
use crate::hypervisor::libvirt::LibvirtHypervisor;
use crate::hypervisor::xml_restore::{self, CopyDisk, CopySource};
use crate::job::{Progress, RateLimit};

/// Chunks one hole piece covers at most, so a reader far into a huge hole still notices a
/// cancelled restore soon.
const HOLE_RUN: u64 = 1 << 16;

/// What a restore into a storage pool does.
#[derive(Debug, Clone)]
pub struct PoolRestoreOptions {
    /// The new domain's name.
    pub new_name: String,
    /// The storage pool on the hypervisor that gets the volumes.
    pub pool: String,
    /// The volumes' format.
    pub format: ImageFormat,
    /// Start the domain once it is defined.
    pub start: bool,
    /// The backup's saved domain definition.
    pub domain_xml: String,
    /// Every disk of the backup to restore (each disk of the definition needs one).
    pub disks: Vec<ExportName>,
    pub cancel: CancellationToken,
    pub progress: Arc<Progress>,
    /// Paces the data bytes uploaded (shared with other jobs).
    pub limit: Option<Arc<RateLimit>>,
}

/// What a restore into a storage pool did.
#[derive(Debug, Clone)]
pub struct PoolRestoreReport {
    pub domain: String,
    /// The new volumes, as the pool describes them after the restore.
    pub volumes: Vec<VolumeInfo>,
    pub started: bool,
    /// Data bytes uploaded, and hole bytes sent as holes.
    pub data_bytes: u64,
    pub hole_bytes: u64,
    /// Seconds spent uploading (all disks), and in all.
    pub upload_seconds: f64,
    pub seconds: f64,
}

/// The volume a disk `target` of domain `new_name` is restored to: `NAME-vda.qcow2`.
pub fn volume_name(new_name: &str, target: &str, format: ImageFormat) -> String {
    let ext = match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    };
    format!("{new_name}-{target}.{ext}")
}

/// The raw volume a qcow2 restore uploads into before the hypervisor converts it.
fn upload_name(final_name: &str) -> String {
    format!(".{final_name}.sluice-raw")
}

/// Every volume name a restore of `targets` as `new_name` in `format` uses.
fn names_used(new_name: &str, targets: &[&str], format: ImageFormat) -> Vec<String> {
    let mut out = Vec::new();
    for t in targets {
        let v = volume_name(new_name, t, format);
        if format == ImageFormat::Qcow2 {
            out.push(upload_name(&v));
        }
        out.push(v);
    }
    out
}

fn hv_err(what: String) -> impl FnOnce(crate::hypervisor::Error) -> Error {
    move |e| Error::hypervisor(what, e)
}

/// Checks a restore of disks `targets` as domain `new_name` into `pool` before anything is
/// made: a valid name no domain has, an active pool that takes `format`, and no volume of
/// the names it would use. [`ErrorKind::Refused`] for what exists already or an inactive
/// pool, [`ErrorKind::NotFound`] for a missing pool (naming the pools there are),
/// [`ErrorKind::InvalidInput`] for a bad name or qcow2 in a pool that cannot hold it.
pub async fn check_pool_restore(
    hv: &LibvirtHypervisor,
    new_name: &str,
    pool: &str,
    targets: &[&str],
    format: ImageFormat,
) -> Result<PoolInfo> {
    check_name(new_name)?;
    let ctx = || format!("restore as domain {new_name}");
    if hv.has_domain(new_name).await.map_err(hv_err(ctx()))? {
        return Err(Error::new(
            ErrorKind::Refused,
            format!("domain {new_name} already exists; choose another name"),
        ));
    }
    let info = hv.storage_pool(pool).await.map_err(hv_err(ctx()))?;
    if !info.active {
        return Err(Error::new(
            ErrorKind::Refused,
            format!("storage pool {pool} is not active: start it (virsh pool-start {pool})"),
        ));
    }
    if format == ImageFormat::Qcow2 && !info.is_file_pool() {
        return Err(Error::invalid(format!(
            "storage pool {pool} (type {}) holds no qcow2 volumes: restore as raw",
            info.pool_type
        )));
    }
    for v in names_used(new_name, targets, format) {
        if hv
            .storage_volume(pool, &v)
            .await
            .map_err(hv_err(ctx()))?
            .is_some()
        {
            return Err(exists(pool, &v));
        }
    }
    Ok(info)
}

fn exists(pool: &str, volume: &str) -> Error {
    Error::new(
        ErrorKind::Refused,
        format!("volume {volume} already exists in storage pool {pool}; choose another name"),
    )
}

/// Restores every disk of `opts.disks` into volumes of `opts.pool` and defines (and, with
/// `opts.start`, starts) the new domain. See the module header for the steps and what a
/// failed or cancelled restore leaves (nothing, or what its error names).
pub async fn restore_to_pool(
    hv: &LibvirtHypervisor,
    repo: &Repository,
    opts: &PoolRestoreOptions,
) -> Result<PoolRestoreReport> {
    let start = Instant::now();
    let targets: Vec<&str> = opts.disks.iter().map(|d| d.disk.as_str()).collect();
    check_pool_restore(hv, &opts.new_name, &opts.pool, &targets, opts.format).await?;
    let mut readers = Vec::with_capacity(opts.disks.len());
    for d in &opts.disks {
        readers.push(open_reader(repo, d).await?);
    }
    let planned = readers.iter().map(DiskReader::size).sum();
    opts.progress
        .bytes_planned
        .store(planned, Ordering::Relaxed);
    let mut made = Made::new(hv, &opts.pool);
    let mut report = match build(hv, &mut made, readers, opts).await {
        Ok(r) => r,
        Err(e) => return Err(made.undo(e, &opts.new_name).await),
    };
    made.keep();
    if opts.start {
        hv.start_domain(&opts.new_name).await.map_err(|e| {
            Error::new(
                crate::job::ErrorKind::from(e.kind()),
                format!(
                    "domain {} is restored and defined with its volumes (kept), but it did not start",
                    opts.new_name
                ),
            )
            .with_source(e)
        })?;
        report.started = true;
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Uploads every disk, converts, defines: everything made is recorded in `made`.
async fn build(
    hv: &LibvirtHypervisor,
    made: &mut Made,
    readers: Vec<DiskReader>,
    opts: &PoolRestoreOptions,
) -> Result<PoolRestoreReport> {
    let mut report = PoolRestoreReport {
        domain: opts.new_name.clone(),
        volumes: Vec::new(),
        started: false,
        data_bytes: 0,
        hole_bytes: 0,
        upload_seconds: 0.0,
        seconds: 0.0,
    };
    for reader in readers {
        let target = reader.manifest().target.clone();
        let vol = restore_volume(hv, made, reader, opts, &mut report).await?;
        report.volumes.push(vol);
        check_cancel(opts, &target)?;
    }
    let xml = domain_xml(opts, &report.volumes)?;
    check_cancel(opts, "the domain definition")?;
    let what = format!("defining domain {}", opts.new_name);
    hv.define_domain(&xml).await.map_err(hv_err(what))?;
    made.domain = Some(opts.new_name.clone());
    Ok(report)
}

/// One disk into its volume (uploaded raw; converted to qcow2 by the hypervisor if asked).
async fn restore_volume(
    hv: &LibvirtHypervisor,
    made: &mut Made,
    reader: DiskReader,
    opts: &PoolRestoreOptions,
    report: &mut PoolRestoreReport,
) -> Result<VolumeInfo> {
    let target = reader.manifest().target.clone();
    let final_name = volume_name(&opts.new_name, &target, opts.format);
    let raw_name = match opts.format {
        ImageFormat::Raw => final_name.clone(),
        ImageFormat::Qcow2 => upload_name(&final_name),
    };
    let pool = &opts.pool;
    let ctx = |v: &str| format!("restore of disk {target} to volume {v} of storage pool {pool}");
    let raw = hv
        .create_volume(pool, &raw_name, reader.size(), "raw")
        .await
        .map_err(hv_err(ctx(&raw_name)))?
        .ok_or_else(|| exists(pool, &raw_name))?;
    made.volumes.push(raw_name.clone());
    let began = Instant::now();
    let (data, holes) = upload(hv, &raw, reader, opts).await?;
    report.upload_seconds += began.elapsed().as_secs_f64();
    report.data_bytes += data;
    report.hole_bytes += holes;
    if opts.format == ImageFormat::Raw {
        return refreshed(hv, pool, &raw_name).await;
    }
    check_cancel(opts, &target)?;
    hv.copy_volume(pool, &raw_name, &final_name, "qcow2")
        .await
        .map_err(hv_err(ctx(&final_name)))?
        .ok_or_else(|| exists(pool, &final_name))?;
    made.volumes.push(final_name.clone());
    hv.delete_volume(pool, &raw_name)
        .await
        .map_err(hv_err(ctx(&raw_name)))?;
    made.volumes.retain(|v| *v != raw_name);
    refreshed(hv, pool, &final_name).await
}

/// Volume `name` as the pool describes it now (its allocation after the upload).
async fn refreshed(hv: &LibvirtHypervisor, pool: &str, name: &str) -> Result<VolumeInfo> {
    hv.storage_volume(pool, name)
        .await
        .map_err(hv_err(format!("volume {name} of storage pool {pool}")))?
        .ok_or_else(|| {
            Error::not_found(format!(
                "volume {name} of storage pool {pool} vanished after its restore"
            ))
        })
}

/// The new domain's XML: the saved definition on the new volumes, character devices
/// renamed beside the original's.
fn domain_xml(opts: &PoolRestoreOptions, volumes: &[VolumeInfo]) -> Result<String> {
    let format = match opts.format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    };
    let paths: Vec<std::path::PathBuf> = volumes.iter().map(|v| v.path.clone().into()).collect();
    let copies: Vec<CopyDisk> = opts
        .disks
        .iter()
        .zip(volumes)
        .zip(&paths)
        .map(|((d, v), p)| CopyDisk {
            target: &d.disk,
            source: match v.kind {
                VolumeKind::File => CopySource::File(p),
                VolumeKind::Block => CopySource::Block(p),
                VolumeKind::Other => CopySource::Volume {
                    pool: &v.pool,
                    volume: &v.name,
                },
            },
            format,
        })
        .collect();
    let name = &opts.new_name;
    let ctx = || format!("domain {name}");
    let xml = xml_restore::copy_domain_xml(&opts.domain_xml, name, &copies)
        .map_err(|e| Error::hypervisor(ctx(), e))?;
    xml_restore::prefix_chardevs(&xml, name).map_err(|e| Error::hypervisor(ctx(), e))
}

fn check_cancel(opts: &PoolRestoreOptions, at: &str) -> Result<()> {
    match opts.cancel.is_cancelled() {
        true => Err(cancelled(opts, at)),
        false => Ok(()),
    }
}

fn cancelled(opts: &PoolRestoreOptions, at: &str) -> Error {
    let done = opts.progress.bytes_done.load(Ordering::Relaxed);
    Error::new(
        ErrorKind::Cancelled,
        format!(
            "restore as domain {} cancelled at {at}, after {done} bytes uploaded",
            opts.new_name
        ),
    )
}

/// Uploads `reader`'s disk into `vol`; returns (data bytes, hole bytes).
async fn upload(
    hv: &LibvirtHypervisor,
    vol: &VolumeInfo,
    reader: DiskReader,
    opts: &PoolRestoreOptions,
) -> Result<(u64, u64)> {
    let size = reader.size();
    let what = format!("upload to volume {} of storage pool {}", vol.name, vol.pool);
    let mut up = hv
        .upload_volume(vol, size)
        .await
        .map_err(hv_err(what.clone()))?;
    let (tx, mut rx) = mpsc::channel(DEPTH);
    let thread = format!("restore-{}", reader.manifest().target);
    let producer = crate::repo::dedicated(&thread, move || produce(&reader, &tx));
    let pumped = pump(&mut up, &mut rx, opts, &vol.name).await;
    // The reader stops at its next piece once nobody takes them.
    drop(rx);
    let _ = producer.await;
    let sent = match pumped {
        Ok(n) if n.0 + n.1 == size => n,
        Ok((d, h)) => {
            up.abort().await;
            return Err(Error::new(
                ErrorKind::Failed,
                format!("{what}: the reader ended after {} of {size} bytes", d + h),
            ));
        }
        Err(e) => {
            up.abort().await;
            return Err(e);
        }
    };
    up.finish().await.map_err(hv_err(what))?;
    Ok(sent)
}

/// Takes pieces from the reader and hands them to the upload until the reader is done.
async fn pump(
    up: &mut VolumeUpload,
    rx: &mut mpsc::Receiver<catalog::Result<Piece>>,
    opts: &PoolRestoreOptions,
    vol: &str,
) -> Result<(u64, u64)> {
    let (mut data, mut holes) = (0u64, 0u64);
    loop {
        let step = async {
            let Some(item) = rx.recv().await else {
                return Ok(None);
            };
            let piece = item.map_err(|e| Error::catalog(format!("reading for volume {vol}"), e))?;
            if let (Piece::Data(d), Some(limit)) = (&piece, &opts.limit) {
                limit.take(d.len() as u64).await;
            }
            let len = match &piece {
                Piece::Data(d) => d.len() as u64,
                Piece::Hole(n) => *n,
            };
            let is_data = matches!(piece, Piece::Data(_));
            up.send(piece)
                .await
                .map_err(hv_err(format!("upload to volume {vol}")))?;
            Ok(Some((len, is_data)))
        };
        let next = tokio::select! {
            biased;
            _ = opts.cancel.cancelled() => None,
            r = step => Some(r),
        };
        let Some(r) = next else {
            return Err(cancelled(opts, &format!("volume {vol}")));
        };
        let Some((len, is_data)) = r? else {
            return Ok((data, holes));
        };
        let p = &opts.progress;
        if is_data {
            data += len;
            Progress::add(&p.bytes_read, len);
        } else {
            holes += len;
            Progress::add(&p.bytes_zero, len);
        }
        Progress::add(&p.bytes_done, len);
    }
}

/// Reads the disk in order: runs of zero chunks as one hole, data chunks in batches of
/// [`BATCH`]. Stops at the first error (sent on) or once the receiver is gone.
fn produce(reader: &DiskReader, tx: &mpsc::Sender<catalog::Result<Piece>>) {
    let (n, cs, size) = (
        reader.chunk_count(),
        reader.chunk_size() as u64,
        reader.size(),
    );
    let mut i = 0;
    while i < n {
        let run = match run_from(reader, i) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let items: Vec<catalog::Result<Piece>> = match run {
            (end, true) => vec![Ok(Piece::Hole((end * cs).min(size) - i * cs))],
            (end, false) => match reader.read_chunks(i, end - i) {
                Ok(chunks) => chunks.into_iter().map(|c| Ok(Piece::Data(c))).collect(),
                Err(e) => vec![Err(e)],
            },
        };
        for item in items {
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
        i = run.0;
    }
}

/// The end of the run of chunks starting at `i` that are all zero or all data (at most
/// [`HOLE_RUN`] or [`BATCH`] chunks), and whether it is zero.
fn run_from(reader: &DiskReader, i: u64) -> catalog::Result<(u64, bool)> {
    let zero = reader.is_zero(i)?;
    let max = if zero { HOLE_RUN } else { BATCH };
    let mut end = i + 1;
    while end < reader.chunk_count() && end - i < max && reader.is_zero(end)? == zero {
        end += 1;
    }
    Ok((end, zero))
}

/// What a restore has made on the hypervisor so far, undone unless kept.
struct Made {
    hv: LibvirtHypervisor,
    pool: String,
    volumes: Vec<String>,
    domain: Option<String>,
    settled: bool,
}

impl Made {
    fn new(hv: &LibvirtHypervisor, pool: &str) -> Made {
        Made {
            hv: hv.clone(),
            pool: pool.to_string(),
            volumes: Vec::new(),
            domain: None,
            settled: false,
        }
    }

    /// The restore succeeded: everything stays.
    fn keep(&mut self) {
        self.settled = true;
    }

    /// Undefines the domain and deletes the volumes made, newest first; `e` (why the restore
    /// failed) wrapped in an error saying what was removed and what is left.
    async fn undo(mut self, e: Error, name: &str) -> Error {
        self.settled = true;
        let mut removed = Vec::new();
        let mut left = Vec::new();
        if let Some(d) = self.domain.take() {
            match self.hv.undefine_domain(&d).await {
                Ok(()) => removed.push(format!("domain {d}")),
                Err(x) => left.push(format!("domain {d} ({})", catalog::Chain(&x))),
            }
        }
        for v in std::mem::take(&mut self.volumes).into_iter().rev() {
            match self.hv.delete_volume(&self.pool, &v).await {
                Ok(()) => removed.push(format!("volume {v}")),
                Err(x) => left.push(format!("volume {v} ({})", catalog::Chain(&x))),
            }
        }
        let mut what = format!("restore as domain {name} in storage pool {}", self.pool);
        if !removed.is_empty() {
            what.push_str(&format!(" (removed what it made: {})", removed.join(", ")));
        }
        if !left.is_empty() {
            tracing::error!(vm = name, left = %left.join("; "), "a failed restore left what it made");
            what.push_str(&format!(" (could not remove: {})", left.join("; ")));
        }
        Error::new(e.kind(), what).with_source(e)
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.settled || (self.volumes.is_empty() && self.domain.is_none()) {
            return;
        }
        tracing::error!(
            pool = %self.pool,
            volumes = ?self.volumes,
            domain = ?self.domain,
            "a restore into a storage pool was dropped midway: removing what it made in the background"
        );
        let volumes = self
            .volumes
            .drain(..)
            .map(|v| (self.pool.clone(), v))
            .collect();
        self.hv.forget_in_background(self.domain.take(), volumes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::file::tests::{disk, reader};

    #[test]
    fn volume_names_follow_the_domain_and_disk() {
        assert_eq!(
            volume_name("web-2", "vda", ImageFormat::Qcow2),
            "web-2-vda.qcow2"
        );
        assert_eq!(
            volume_name("web-2", "vdb", ImageFormat::Raw),
            "web-2-vdb.raw"
        );
        assert_eq!(
            names_used("w", &["vda", "vdb"], ImageFormat::Qcow2),
            [
                ".w-vda.qcow2.sluice-raw",
                "w-vda.qcow2",
                ".w-vdb.qcow2.sluice-raw",
                "w-vdb.qcow2"
            ]
        );
        assert_eq!(names_used("w", &["vda"], ImageFormat::Raw), ["w-vda.raw"]);
    }

    /// Every piece the reader sends for a disk of `chunks` 64 KiB chunks (every fourth zero,
    /// the last one short).
    fn pieces(chunks: u64) -> Vec<Piece> {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path(), chunks);
        let (tx, mut rx) = mpsc::channel(DEPTH);
        let t = std::thread::spawn(move || produce(&r, &tx));
        let mut out = Vec::new();
        while let Some(p) = rx.blocking_recv() {
            out.push(p.unwrap());
        }
        t.join().unwrap();
        out
    }

    #[test]
    fn the_reader_sends_the_disk_in_order_with_zero_chunks_as_holes() {
        let cs = 64u64 << 10;
        let got = pieces(40);
        let mut bytes = Vec::new();
        for p in &got {
            match p {
                Piece::Data(d) => bytes.extend_from_slice(d),
                Piece::Hole(n) => bytes.resize(bytes.len() + *n as usize, 0),
            }
        }
        assert_eq!(bytes, disk(40), "the pieces are the disk");
        let holes: Vec<u64> = got
            .iter()
            .filter_map(|p| match p {
                Piece::Hole(n) => Some(*n),
                Piece::Data(_) => None,
            })
            .collect();
        // Chunks 3, 7, … 39 are zero; 39 is the short last one.
        assert_eq!(holes.len(), 10);
        assert!(holes[..9].iter().all(|&n| n == cs), "{holes:?}");
        assert_eq!(holes[9], cs / 2);
    }

    #[test]
    fn a_reader_nobody_listens_to_stops() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path(), 512);
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        produce(&r, &tx);
    }
}
