//! Peak memory of open, a whole-disk restore read, GC, verify and an incremental backup as
//! the repository grows: each must stay flat (GC grows slowly with its Bloom filter).
//!
//! Fabricates a repository of N synthetic chunks (tiny payloads, so millions of them are
//! cheap; real packs of 512 blobs each, as 32 MiB packs of 64 KiB chunks hold, index blocks
//! and manifests; the catalog built by `Repository::open`), then runs each phase in a fresh
//! child process and prints the child's peak RSS (`getrusage` `ru_maxrss` and `VmHWM`).
//! Two backups share all index blocks of disk `vda` but one, so the walks also skip visited
//! blocks. The first backup also has disk `vdr` of N chunk positions cycling over 32 real
//! 64 KiB chunks (distinct index blocks), which the `read` phase reads whole through
//! `DiskReader::read_at` and checks. The `backup` phase writes an incremental of `vda` on
//! top of the first backup (one changed chunk): the writer's memory for a parent of N chunks.
//! The `scatter` phase writes an incremental that changes one chunk in every index block
//! (every block dirty, none complete: the writer's worst case, which spills).
//!
//! `cargo run --release -p catalog --example bench_memory [-- SMALL_M LARGE_M [PHASES]]`
//! (millions of chunks; default 1 and 4; PHASES a comma list, default
//! `open,read,gc,verify,backup,scatter`). Scratch goes under `$TMPDIR` (default /tmp).

use anyhow::{bail, Context};
use catalog::format::blob::{self, BlobHeader, BlobKind, BLOB_HEADER_LEN};
use catalog::format::index;
use catalog::format::pack::PackBuilder;
use catalog::{
    Backend, BackupId, BackupMode, BackupStats, ChunkDigest, Consistency, DiskManifest, FsBackend,
    GcOptions, Manifest, RepoConfig, RepoOptions, Repository, VerifyMode, VmIdentity,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--measure") {
        return measure(&args[2], Path::new(&args[3]));
    }
    if args.get(1).map(String::as_str) == Some("--fabricate") {
        return fabricate(Path::new(&args[3]), args[2].parse()?);
    }
    let sizes: Vec<f64> = match args.len() {
        1 => vec![1.0, 4.0],
        3 | 4 => vec![args[1].parse()?, args[2].parse()?],
        _ => bail!("usage: bench_memory [SMALL_M LARGE_M [PHASES]]"),
    };
    let phases = args
        .get(3)
        .map_or("open,read,gc,verify,backup,scatter", String::as_str);
    println!("    chunks  phase   peak RSS (VmHWM)  time     result");
    for m in sizes {
        let n = ((m * 1e6) as u64).max(1);
        let dir = tempfile::tempdir()?;
        let t = Instant::now();
        child(&["--fabricate", &n.to_string()], dir.path())?;
        println!("{n:>10}  fabricated in {:.1} s", t.elapsed().as_secs_f64());
        for phase in phases.split(',') {
            print!("{n:>10}  {}", child(&["--measure", phase], dir.path())?);
        }
        println!(
            "{n:>10}  (a set of every live digest, or a whole-disk index, holds >= {} MiB)",
            (n * 32) >> 20
        );
    }
    Ok(())
}

/// Run this program again with `args` and `dir`; its stdout. Children do the work so that
/// each peak is its own (a child started by vfork inherits its parent's peak at exec, so the
/// parent stays small).
fn child(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn opts(dir: &Path) -> RepoOptions {
    RepoOptions::new(dir.join("catalog.sqlite"))
}

fn backend(dir: &Path) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(Arc::new(FsBackend::open(dir.join("repo"))?))
}

/// One child: run `phase` and print its peak RSS.
fn measure(phase: &str, dir: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    let repo = Repository::open(backend(dir)?, opts(dir))?;
    let result = match phase {
        "open" => format!("{} backups", repo.backups(None)?.len()),
        "gc" => {
            let r = repo.gc(GcOptions::default())?;
            format!(
                "live {} packs {} deleted {} repacked {}",
                r.live_blobs, r.packs, r.packs_deleted, r.packs_repacked
            )
        }
        "verify" => {
            let r = repo.verify(VerifyMode::Quick, None)?;
            format!("chunks {} problems {}", r.chunks, r.problems.len())
        }
        "read" => read_disk(&repo)?,
        "backup" => incremental(&repo, false)?,
        "scatter" => incremental(&repo, true)?,
        _ => bail!("unknown phase {phase}"),
    };
    println!(
        "{phase:<7} {:>5} MiB ({:>4} MiB)  {:>6.1} s  {result}",
        max_rss_kib() >> 10,
        vm_hwm_kib() >> 10,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn max_rss_kib() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we pass; no other memory is touched.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    ru.ru_maxrss as u64
}

/// Peak RSS of this process image from /proc (a cross-check of `ru_maxrss`).
fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A raw (uncompressed) chunk blob for the synthetic payload `i`.
fn chunk_blob(i: u64) -> (ChunkDigest, Vec<u8>) {
    let payload = i.to_le_bytes();
    let digest = ChunkDigest::of(&payload);
    let h = BlobHeader {
        kind: BlobKind::Chunk,
        flags: 0,
        hash_mode: 0,
        raw_len: payload.len() as u32,
        stored_len: payload.len() as u32,
        digest,
        checksum: digest.0,
    };
    let mut b = Vec::with_capacity(BLOB_HEADER_LEN + payload.len());
    b.extend_from_slice(&blob::encode_header(&h));
    b.extend_from_slice(&payload);
    (digest, b)
}

/// Blobs per fabricated pack: a 32 MiB pack of 64 KiB chunks.
const BLOBS_PER_PACK: usize = 512;

/// Real chunks the `vdr` disk cycles over.
const READ_CHUNKS: u64 = 32;

struct Packer {
    backend: Arc<dyn Backend>,
    pack: PackBuilder,
    blobs: usize,
}

impl Packer {
    fn add(&mut self, d: ChunkDigest, kind: BlobKind, b: &[u8]) -> anyhow::Result<()> {
        self.pack.add(d, kind, b);
        self.blobs += 1;
        if self.blobs >= BLOBS_PER_PACK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if !self.pack.is_empty() {
            let (id, bytes, _) = std::mem::take(&mut self.pack).finish();
            self.backend.put(&id.key(), &bytes)?;
            self.blobs = 0;
        }
        Ok(())
    }
}

/// Write N chunks, their index blocks and two backups straight into storage, then open the
/// repository (which indexes every pack into the catalog).
fn fabricate(dir: &Path, n: u64) -> anyhow::Result<()> {
    let cfg = RepoConfig::default();
    drop(Repository::create(backend(dir)?, cfg, opts(dir))?);
    let mut p = Packer {
        backend: backend(dir)?,
        pack: PackBuilder::new(),
        blobs: 0,
    };
    let block_len = cfg.index_block_len as u64;
    let mut blocks = Vec::new();
    let mut ids = Vec::with_capacity(block_len as usize);
    for i in 0..n {
        let (d, b) = chunk_blob(i);
        p.add(d, BlobKind::Chunk, &b)?;
        ids.push(d);
        if ids.len() as u64 == block_len || i + 1 == n {
            blocks.push(index_block(&mut p, &ids)?);
            ids.clear();
        }
    }
    // The second backup: its first block all zeros, every other block shared.
    let zeros = vec![ChunkDigest::ZERO; block_len.min(n) as usize];
    let mut second = blocks.clone();
    second[0] = index_block(&mut p, &zeros)?;
    let read_blocks = read_disk_blocks(&mut p, &cfg, n)?;
    p.flush()?;
    for (k, b) in [blocks, second].into_iter().enumerate() {
        let mut m = manifest(&cfg, n, b, k as i64);
        if k == 0 {
            let mut vdr = m.disks[0].clone();
            vdr.target = "vdr".into();
            vdr.index_blocks = read_blocks.clone();
            m.disks.push(vdr);
        }
        p.backend.put(&Manifest::key(&m.id), &m.encode()?)?;
    }
    let repo = Repository::open(backend(dir)?, opts(dir))?;
    let located = repo.with_catalog(|c| c.chunk_count())?;
    if located < n {
        bail!("catalog locates {located} blobs, expected at least {n}");
    }
    Ok(())
}

fn index_block(p: &mut Packer, ids: &[ChunkDigest]) -> anyhow::Result<ChunkDigest> {
    let payload = index::encode(ids);
    let d = ChunkDigest::of(&payload);
    let b = blob::encode(BlobKind::Index, d, &payload, 1).context("index block")?;
    p.add(d, BlobKind::Index, &b)?;
    Ok(d)
}

fn manifest(cfg: &RepoConfig, n: u64, blocks: Vec<ChunkDigest>, k: i64) -> Manifest {
    Manifest {
        vm_state: None,
        id: BackupId::generate(1_700_000_000 + k),
        vm: VmIdentity {
            name: "synthetic".into(),
            uuid: "00000000-0000-0000-0000-00000000beef".into(),
        },
        domain_xml: "<domain/>".into(),
        started: 1_700_000_000 + k,
        finished: 1_700_000_000 + k,
        mode: BackupMode::Full,
        consistency: Consistency::Crash,
        disks: vec![DiskManifest {
            full_read: None,
            target: "vda".into(),
            size: n * cfg.chunk_size as u64,
            chunk_size: cfg.chunk_size,
            index_block_len: cfg.index_block_len,
            index_blocks: blocks,
            checkpoint: None,
            parent_backup: None,
        }],
        stats: BackupStats::default(),
    }
}

/// The real 64 KiB chunk `k` of the `vdr` disk.
fn read_chunk(k: u64, cs: usize) -> Vec<u8> {
    let mut x = (k + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..cs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Store the `vdr` chunks and its index blocks: position i holds chunk i % 32, except that
/// block b zeroes position k * 40 for every set bit k of b, so every block is distinct.
fn read_disk_blocks(p: &mut Packer, cfg: &RepoConfig, n: u64) -> anyhow::Result<Vec<ChunkDigest>> {
    let cs = cfg.chunk_size as usize;
    let mut digests = Vec::new();
    for k in 0..READ_CHUNKS {
        let data = read_chunk(k, cs);
        let d = ChunkDigest::of(&data);
        p.add(
            d,
            BlobKind::Chunk,
            &blob::encode(BlobKind::Chunk, d, &data, 1)?,
        )?;
        digests.push(d);
    }
    let per = cfg.index_block_len as u64;
    let mut blocks = Vec::new();
    for b in 0..n.div_ceil(per) {
        let ids: Vec<ChunkDigest> = (b * per..((b + 1) * per).min(n))
            .map(|i| {
                let k = (i % per) as u32;
                let zero = k.is_multiple_of(40) && k / 40 < 64 && (b >> (k / 40)) & 1 == 1;
                if zero {
                    ChunkDigest::ZERO
                } else {
                    digests[(i % READ_CHUNKS) as usize]
                }
            })
            .collect();
        blocks.push(index_block(p, &ids)?);
    }
    Ok(blocks)
}

/// Read the first backup's `vdr` whole in 4 MiB requests, checking the first chunk of each.
fn read_disk(repo: &Repository) -> anyhow::Result<String> {
    let first = first_backup(repo)?;
    let r = repo.open_disk(&first, "vdr")?;
    let cs = r.chunk_size() as u64;
    let want: Vec<Vec<u8>> = (0..READ_CHUNKS)
        .map(|k| read_chunk(k, cs as usize))
        .collect();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    let t = Instant::now();
    while at < r.size() {
        let len = (buf.len() as u64).min(r.size() - at) as usize;
        r.read_at(at, &mut buf[..len])?;
        let i = at / cs;
        let expect = if r.is_zero(i)? {
            &vec![0u8; cs as usize]
        } else {
            &want[(i % READ_CHUNKS) as usize]
        };
        if buf[..cs as usize] != expect[..] {
            bail!("vdr chunk {i} reads wrong");
        }
        at += len as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(format!(
        "read {} GiB at {:.2} GB/s",
        r.size() >> 30,
        r.size() as f64 / secs / 1e9
    ))
}

/// An incremental of `vda` on top of the first backup: one chunk changed, or with `scatter`
/// one in every index block.
fn incremental(repo: &Repository, scatter: bool) -> anyhow::Result<String> {
    let first = first_backup(repo)?;
    let m = repo.manifest(&first)?;
    let vda = &m.disks[0];
    let w = repo.begin_backup(catalog::BackupSpec {
        vm: m.vm.clone(),
        disks: vec![catalog::DiskSpec {
            full_read: None,
            target: vda.target.clone(),
            size: vda.size,
            checkpoint: None,
        }],
        parent: Some(first),
        started: 1_800_000_000,
    })?;
    let cs = vda.chunk_size as usize;
    let per = vda.index_block_len as u64;
    let changed: Vec<u64> = if scatter {
        (0..vda.index_blocks.len() as u64)
            .map(|b| b * per)
            .collect()
    } else {
        vec![1]
    };
    for &i in &changed {
        w.put_chunk(0, i, &read_chunk(i + 99, cs))?;
    }
    let out = w.commit(catalog::CommitInfo {
        vm_state: None,
        domain_xml: "<domain/>".into(),
        mode: BackupMode::Incremental,
        consistency: Consistency::Crash,
        finished: 1_800_000_001,
    })?;
    let rewritten = (out.disks[0].index_blocks.iter())
        .zip(&vda.index_blocks)
        .filter(|(a, b)| a != b)
        .count();
    Ok(format!(
        "{} chunks changed, {rewritten} index blocks rewritten",
        changed.len()
    ))
}

/// The oldest backup (the one with disk `vdr`).
fn first_backup(repo: &Repository) -> anyhow::Result<BackupId> {
    repo.backups(None)?
        .into_iter()
        .min_by_key(|b| b.started)
        .map(|b| b.id)
        .context("no backup")
}
