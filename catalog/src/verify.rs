//! Verify: check that every chunk the committed backups need is present and intact.
//!
//! Owns the verify walk and its report. `Quick` checks manifests, index blocks (decoded and
//! hashed) and that every chunk is located in a stored pack; `Full` also re-reads and
//! re-hashes every chunk; `Sample` re-hashes a deterministic percentage (by digest). Every
//! problem names each backup, disk and offset it affects.
//!
//! Memory does not grow with the repository: the distinct chunks to check and the index
//! blocks already walked live in an on-disk scratch set (`scratch`), and chunks are checked
//! one pack at a time in the catalog's pack order. Only problems are kept in RAM.

use crate::backend::LockMode;
use crate::error::{Chain, ErrorKind, Result};
use crate::format::blob;
use crate::format::index;
use crate::ids::{BackupId, ChunkDigest, PackId};
use crate::repo::Repository;
use crate::scratch::Scratch;
use std::collections::{BTreeSet, HashMap, HashSet};

/// How deep to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Manifests, index blocks, presence of every chunk.
    Quick,
    /// Re-read and re-hash every chunk.
    Full,
    /// Re-hash this percentage of chunks (1..=100), the rest checked for presence.
    Sample(u8),
}

/// What is wrong with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not located, or its pack is gone.
    Missing,
    /// Fails its checks.
    Corrupt,
}

/// Where a bad object is used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Affected {
    /// Backup.
    pub backup: BackupId,
    /// Disk target.
    pub disk: String,
    /// Byte offset in the disk of the first affected byte.
    pub offset: u64,
}

/// One bad object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The chunk or index block (None for a manifest).
    pub digest: Option<ChunkDigest>,
    /// Missing or corrupt.
    pub kind: ProblemKind,
    /// What failed.
    pub detail: String,
    /// Every use of it (capped at 10,000 per problem).
    pub affected: Vec<Affected>,
}

/// The result of a verify run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Backups examined.
    pub backups: u64,
    /// Distinct chunks checked for presence.
    pub chunks: u64,
    /// Chunks re-read and re-hashed.
    pub chunks_rehashed: u64,
    /// Problems found.
    pub problems: Vec<Problem>,
    /// Bad chunks whose stored copy the catalog forgot: the next backup that reads the same
    /// content stores it again, healing every backup that references it.
    pub forgotten: u64,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Every backup some problem affects.
    pub fn affected_backups(&self) -> BTreeSet<BackupId> {
        self.problems
            .iter()
            .flat_map(|p| p.affected.iter().map(|a| a.backup.clone()))
            .collect()
    }
}

const AFFECTED_CAP: usize = 10_000;

struct Walk {
    report: VerifyReport,
    /// Backups whose manifest decoded (re-read to name affected offsets).
    read_ok: Vec<BackupId>,
    /// Index blocks visited and chunks needed, on disk.
    scratch: Scratch,
}

impl Repository {
    /// Verify `only` these backups, or all committed ones.
    pub fn verify(&self, mode: VerifyMode, only: Option<&[BackupId]>) -> Result<VerifyReport> {
        let _lock = self.lock(LockMode::Shared, true)?;
        let ids = match only {
            Some(v) => v.to_vec(),
            None => self.manifest_ids()?,
        };
        let mut w = Walk {
            report: VerifyReport::default(),
            read_ok: Vec::new(),
            scratch: Scratch::open(&self.inner.opts.catalog_path)?,
        };
        for id in &ids {
            self.walk_backup(id, &mut w)?;
        }
        let bad = self.check_chunks(mode, &mut w)?;
        self.name_affected(&mut w, bad);
        w.report.forgotten = self.forget_bad(&w.report)?;
        w.report.backups = ids.len() as u64;
        tracing::info!(
            backups = ids.len(),
            problems = w.report.problems.len(),
            "verify finished"
        );
        Ok(w.report)
    }

    /// Forgets the stored copy of every missing or corrupt chunk and index block (see
    /// [`crate::db::Catalog::forget_chunk`]); how many were known.
    fn forget_bad(&self, report: &VerifyReport) -> Result<u64> {
        let mut n = 0;
        for d in report.problems.iter().filter_map(|p| p.digest) {
            if self.with_catalog(|c| c.forget_chunk(&d))? {
                tracing::warn!(digest = %d.to_hex(), "bad stored copy forgotten: the next backup of this content stores it again");
                n += 1;
            }
        }
        Ok(n)
    }

    fn walk_backup(&self, id: &BackupId, w: &mut Walk) -> Result<()> {
        let m = match self.manifest(id) {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
                let kind = problem_kind(e.kind());
                let aff = Affected {
                    backup: id.clone(),
                    disk: String::new(),
                    offset: 0,
                };
                w.report.problems.push(Problem {
                    digest: None,
                    kind,
                    detail: Chain(&e).to_string(),
                    affected: vec![aff],
                });
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for d in &m.disks {
            let chunks = index::chunk_count(d.size, d.chunk_size);
            for (b, bid) in d.index_blocks.iter().enumerate() {
                if !w.scratch.first_visit(bid)? {
                    continue;
                }
                let n = index::ids_in_block(b as u64, chunks, d.index_block_len);
                match self.load_index_block(bid, n) {
                    Ok(ids) => w.scratch.add_needed(&ids)?,
                    Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
                        push_problem(&mut w.report, *bid, e.kind(), Chain(&e).to_string());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        w.read_ok.push(m.id);
        Ok(())
    }

    /// Check presence (and contents per `mode`), one pack at a time; returns the bad
    /// digests' problem indexes.
    fn check_chunks(&self, mode: VerifyMode, w: &mut Walk) -> Result<HashMap<ChunkDigest, usize>> {
        let stored: HashSet<PackId> = self.stored_packs()?.into_iter().collect();
        w.report.chunks = w.scratch.needed_count()?;
        let Walk {
            report, scratch, ..
        } = w;
        scratch.for_each_unlocated(|d| {
            let detail = format!("chunk {d} is not located in any pack");
            push_problem(report, d, ErrorKind::NotFound, detail);
            Ok(())
        })?;
        scratch.for_each_pack(|pack, group| {
            if !stored.contains(&pack) {
                for (d, _) in group {
                    let detail = format!("chunk {d}: pack {pack} is missing");
                    push_problem(report, d, ErrorKind::NotFound, detail);
                }
                return Ok(());
            }
            for (d, l) in group.into_iter().filter(|(d, _)| sampled(d, mode)) {
                report.chunks_rehashed += 1;
                let r = self.read_location(&l).and_then(|b| blob::decode(&b, d));
                match r {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
                        push_problem(report, d, e.kind(), format!("chunk {d}: {}", Chain(&e)))
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        Ok(w.report
            .problems
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.digest.map(|d| (d, i)))
            .collect())
    }

    /// Second pass: find every use of each bad digest.
    fn name_affected(&self, w: &mut Walk, bad: HashMap<ChunkDigest, usize>) {
        if bad.is_empty() {
            return;
        }
        for id in &w.read_ok {
            let Ok(m) = self.manifest(id) else {
                continue;
            };
            for d in &m.disks {
                let chunks = index::chunk_count(d.size, d.chunk_size);
                let span = d.index_block_len as u64 * d.chunk_size as u64;
                for (b, bid) in d.index_blocks.iter().enumerate() {
                    let at = |off: u64| Affected {
                        backup: m.id.clone(),
                        disk: d.target.clone(),
                        offset: off,
                    };
                    if let Some(&p) = bad.get(bid) {
                        add_affected(&mut w.report.problems[p], at(b as u64 * span));
                        continue;
                    }
                    let n = index::ids_in_block(b as u64, chunks, d.index_block_len);
                    let Ok(ids) = self.load_index_block(bid, n) else {
                        continue;
                    };
                    for (k, id) in ids.iter().enumerate() {
                        if let Some(&p) = bad.get(id) {
                            let pos = b as u64 * d.index_block_len as u64 + k as u64;
                            add_affected(&mut w.report.problems[p], at(pos * d.chunk_size as u64));
                        }
                    }
                }
            }
        }
    }
}

fn add_affected(p: &mut Problem, a: Affected) {
    if p.affected.len() < AFFECTED_CAP {
        p.affected.push(a);
    }
}

fn problem_kind(k: ErrorKind) -> ProblemKind {
    if k == ErrorKind::NotFound {
        ProblemKind::Missing
    } else {
        ProblemKind::Corrupt
    }
}

fn push_problem(report: &mut VerifyReport, d: ChunkDigest, k: ErrorKind, detail: String) {
    if report.problems.iter().any(|p| p.digest == Some(d)) {
        return;
    }
    tracing::warn!(chunk = %d, %detail, "verify found a problem");
    report.problems.push(Problem {
        digest: Some(d),
        kind: problem_kind(k),
        detail,
        affected: Vec::new(),
    });
}

fn sampled(d: &ChunkDigest, mode: VerifyMode) -> bool {
    match mode {
        VerifyMode::Quick => false,
        VerifyMode::Full => true,
        VerifyMode::Sample(pct) => {
            let v = u16::from_le_bytes([d.0[0], d.0[1]]) as u32 % 100;
            v < pct.min(100) as u32
        }
    }
}
