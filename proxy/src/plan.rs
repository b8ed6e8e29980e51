//! Extent-to-chunk planning: pure arithmetic, no I/O.
//!
//! Owns the translation from what the hypervisor reports (dirty extents from
//! `qemu:dirty-bitmap:…`, allocation extents from `base:allocation`) into what the backup
//! does with each repository chunk: keep the parent's chunk, store the zero chunk, or assemble
//! the chunk from bytes read over NBD laid over a base (zeros, or the parent's chunk when only
//! part of the chunk is dirty). It also coalesces the byte ranges to read into NBD requests.
//!
//! It does not own reading, hashing or storing; it never sees data.
//!
//! A full backup is planned as an incremental whose dirty set is the whole disk and whose
//! base is zeros, so there is one code path for both.

use std::ops::Range;

/// Byte geometry of one disk as the repository cuts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual size of the disk in bytes.
    pub disk_size: u64,
    /// Repository chunk size in bytes (a power of two).
    pub chunk_size: u64,
}

impl Geometry {
    /// Number of chunk positions covering the disk (the last one may be short).
    pub fn chunk_count(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size)
    }

    /// Byte range of chunk `index`, clipped to the disk size.
    pub fn chunk_range(&self, index: u64) -> Range<u64> {
        let start = index * self.chunk_size;
        start..(start + self.chunk_size).min(self.disk_size)
    }
}

/// What the base of a partly rewritten chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Bytes not read are zero (full backup, or the whole chunk is covered).
    Zero,
    /// Bytes not read come from the parent backup's chunk at the same position.
    Parent,
}

/// What to do with one chunk position. Positions absent from a plan keep the parent's chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkAction {
    /// The whole chunk reads as zero: store the zero chunk, read nothing.
    Zero,
    /// Build the chunk: start from `base`, write zeros over `zeros`, then the bytes read from
    /// the hypervisor over `reads`. Ranges are absolute disk offsets inside the chunk, sorted
    /// and disjoint.
    Assemble {
        base: Base,
        reads: Vec<Range<u64>>,
        zeros: Vec<Range<u64>>,
    },
}

/// One chunk position and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPlan {
    pub index: u64,
    pub action: ChunkAction,
}

impl ChunkPlan {
    /// Bytes this chunk reads from the hypervisor.
    pub fn read_bytes(&self) -> u64 {
        match &self.action {
            ChunkAction::Zero => 0,
            ChunkAction::Assemble { reads, .. } => reads.iter().map(|r| r.end - r.start).sum(),
        }
    }
}

/// Planning failed because the hypervisor's extents are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("window {start}..{end} is not chunk-aligned or exceeds the disk size {disk_size}")]
    BadWindow {
        start: u64,
        end: u64,
        disk_size: u64,
    },
    #[error("extent {offset}+{len} lies outside the window {start}..{end}")]
    ExtentOutsideWindow {
        offset: u64,
        len: u64,
        start: u64,
        end: u64,
    },
}

/// Plans the chunks of one window `[window.start, window.end)` of a disk.
///
/// `dirty` are the byte ranges that changed (for a full backup: the whole window) and
/// `zero` the byte ranges the export reports as reading zero (`base:allocation` with
/// `NBD_STATE_ZERO`); both sorted or not, overlapping or not, but inside the window.
/// `full` says there is no parent: untouched bytes of a chunk are zero, not the parent's.
/// Chunks with no dirty byte are left out (they keep the parent's chunk).
pub fn plan_window(
    geo: Geometry,
    window: Range<u64>,
    dirty: &[Range<u64>],
    zero: &[Range<u64>],
    full: bool,
) -> Result<Vec<ChunkPlan>, PlanError> {
    check_window(geo, &window)?;
    let dirty = normalize(dirty, &window)?;
    let zero = normalize(zero, &window)?;
    let mut parts: Vec<Parts> = Vec::new();
    let mut zi = 0;
    for d in &dirty {
        let first = d.start / geo.chunk_size;
        let last = (d.end - 1) / geo.chunk_size;
        for index in first..=last {
            let chunk = geo.chunk_range(index);
            let part = d.start.max(chunk.start)..d.end.min(chunk.end);
            if parts.last().map(|p| p.index) != Some(index) {
                parts.push(Parts::new(index));
            }
            if let Some(p) = parts.last_mut() {
                p.add(part, &zero, &mut zi);
            }
        }
    }
    Ok(parts.into_iter().map(|p| p.finish(geo, full)).collect())
}

/// The dirty bytes of one chunk, split into bytes to read and bytes known to be zero.
struct Parts {
    index: u64,
    reads: Vec<Range<u64>>,
    zeros: Vec<Range<u64>>,
}

fn check_window(geo: Geometry, w: &Range<u64>) -> Result<(), PlanError> {
    let aligned = w.start.is_multiple_of(geo.chunk_size)
        && (w.end.is_multiple_of(geo.chunk_size) || w.end == geo.disk_size);
    if !aligned || w.start > w.end || w.end > geo.disk_size {
        return Err(PlanError::BadWindow {
            start: w.start,
            end: w.end,
            disk_size: geo.disk_size,
        });
    }
    Ok(())
}

/// Sorts, merges and validates a set of ranges against the window; drops empty ones.
fn normalize(ranges: &[Range<u64>], w: &Range<u64>) -> Result<Vec<Range<u64>>, PlanError> {
    let mut v: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| r.end > r.start) {
        if r.start < w.start || r.end > w.end {
            return Err(PlanError::ExtentOutsideWindow {
                offset: r.start,
                len: r.end.saturating_sub(r.start),
                start: w.start,
                end: w.end,
            });
        }
        v.push(r.clone());
    }
    v.sort_by_key(|r| r.start);
    Ok(coalesce(v))
}

fn coalesce(sorted: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl Parts {
    fn new(index: u64) -> Self {
        Parts {
            index,
            reads: Vec::new(),
            zeros: Vec::new(),
        }
    }

    /// Adds the dirty bytes `part` of this chunk. `zero` is sorted and disjoint; `zi` is a
    /// cursor into it shared across calls (parts arrive in ascending order).
    fn add(&mut self, part: Range<u64>, zero: &[Range<u64>], zi: &mut usize) {
        while *zi < zero.len() && zero[*zi].end <= part.start {
            *zi += 1;
        }
        let mut pos = part.start;
        let mut k = *zi;
        while pos < part.end {
            match zero.get(k) {
                Some(z) if z.start <= pos => {
                    let end = z.end.min(part.end);
                    push_range(&mut self.zeros, pos..end);
                    pos = end;
                    k += 1;
                }
                Some(z) if z.start < part.end => {
                    push_range(&mut self.reads, pos..z.start);
                    pos = z.start;
                }
                _ => {
                    push_range(&mut self.reads, pos..part.end);
                    pos = part.end;
                }
            }
        }
    }

    /// Decides the chunk's action once all its dirty bytes are known: a chunk whose dirty
    /// bytes cover it needs no parent base; one with nothing to read over a zero base is the
    /// zero chunk.
    fn finish(self, geo: Geometry, full: bool) -> ChunkPlan {
        let chunk = geo.chunk_range(self.index);
        let covered: u64 = self
            .reads
            .iter()
            .chain(self.zeros.iter())
            .map(|r| r.end - r.start)
            .sum();
        let base = if full || covered == chunk.end - chunk.start {
            Base::Zero
        } else {
            Base::Parent
        };
        let action = if self.reads.is_empty() && base == Base::Zero {
            ChunkAction::Zero
        } else {
            ChunkAction::Assemble {
                base,
                reads: self.reads,
                zeros: self.zeros,
            }
        };
        ChunkPlan {
            index: self.index,
            action,
        }
    }
}

fn push_range(v: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    match v.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => v.push(r),
    }
}

/// Coalesces the read ranges of a plan into NBD read requests of at most `max_len` bytes,
/// merging ranges that touch (never reading a byte that is not planned).
pub fn read_requests(plans: &[ChunkPlan], max_len: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let ranges = plans.iter().flat_map(|p| match &p.action {
        ChunkAction::Zero => [].iter(),
        ChunkAction::Assemble { reads, .. } => reads.iter(),
    });
    for r in ranges {
        let mut start = r.start;
        while start < r.end {
            match out.last_mut() {
                Some(last) if last.end == start && last.end - last.start < max_len => {
                    let end = r.end.min(last.start + max_len);
                    last.end = end;
                    start = end;
                }
                _ => {
                    let end = r.end.min(start + max_len);
                    out.push(start..end);
                    start = end;
                }
            }
        }
    }
    out
}

#[cfg(test)]
// Slices of one range are the natural input here (one dirty extent), not a typo for a range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const CS: u64 = 64 * K;

    fn geo(size: u64) -> Geometry {
        Geometry {
            disk_size: size,
            chunk_size: CS,
        }
    }

    fn assemble(base: Base, reads: &[Range<u64>], zeros: &[Range<u64>]) -> ChunkAction {
        ChunkAction::Assemble {
            base,
            reads: reads.to_vec(),
            zeros: zeros.to_vec(),
        }
    }

    #[test]
    fn full_backup_reads_data_and_skips_zero_chunks() {
        let g = geo(4 * CS);
        let plans = plan_window(g, 0..4 * CS, &[0..4 * CS], &[CS..3 * CS + 10], true).unwrap();
        assert_eq!(plans.len(), 4);
        assert_eq!(plans[0].action, assemble(Base::Zero, &[0..CS], &[]));
        assert_eq!(plans[1].action, ChunkAction::Zero);
        assert_eq!(plans[2].action, ChunkAction::Zero);
        assert_eq!(
            plans[3].action,
            assemble(Base::Zero, &[3 * CS + 10..4 * CS], &[3 * CS..3 * CS + 10])
        );
    }

    #[test]
    fn incremental_leaves_clean_chunks_out() {
        let g = geo(10 * CS);
        let plans =
            plan_window(g, 0..10 * CS, &[2 * CS..3 * CS, 7 * CS..8 * CS], &[], false).unwrap();
        let idx: Vec<u64> = plans.iter().map(|p| p.index).collect();
        assert_eq!(idx, vec![2, 7]);
        assert_eq!(
            plans[0].action,
            assemble(Base::Zero, &[2 * CS..3 * CS], &[])
        );
    }

    #[test]
    fn partly_dirty_chunk_reads_only_dirty_bytes_over_parent() {
        let g = Geometry {
            disk_size: 8 << 20,
            chunk_size: 1 << 20,
        };
        let dirty = [
            (1 << 20) + 4096..(1 << 20) + 8192,
            (1 << 20) + 65536..(1 << 20) + 131072,
        ];
        let plans = plan_window(g, 0..8 << 20, &dirty, &[], false).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].index, 1);
        assert_eq!(plans[0].action, assemble(Base::Parent, &dirty, &[]));
        assert_eq!(plans[0].read_bytes(), 4096 + 65536);
    }

    #[test]
    fn dirty_zeroed_range_is_zeros_not_read() {
        let g = geo(4 * CS);
        // The guest discarded half of chunk 1: dirty, and reads as zero.
        let plans =
            plan_window(g, 0..4 * CS, &[CS..CS + CS / 2], &[CS..CS + CS / 2], false).unwrap();
        assert_eq!(
            plans[0].action,
            assemble(Base::Parent, &[], &[CS..CS + CS / 2])
        );
        assert_eq!(plans[0].read_bytes(), 0);
        // Discarded whole: the zero chunk.
        let plans = plan_window(g, 0..4 * CS, &[CS..2 * CS], &[0..4 * CS], false).unwrap();
        assert_eq!(plans[0].action, ChunkAction::Zero);
    }

    #[test]
    fn short_last_chunk_is_covered() {
        let g = geo(2 * CS + 512);
        let plans = plan_window(g, 0..g.disk_size, &[0..g.disk_size], &[], true).unwrap();
        assert_eq!(plans.len(), 3);
        assert_eq!(
            plans[2].action,
            assemble(Base::Zero, &[2 * CS..2 * CS + 512], &[])
        );
        assert_eq!(g.chunk_count(), 3);
    }

    #[test]
    fn overlapping_unsorted_extents_are_merged() {
        let g = geo(4 * CS);
        let plans = plan_window(
            g,
            0..4 * CS,
            &[CS + 100..CS + 300, CS..CS + 200],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(
            plans[0].action,
            assemble(Base::Parent, &[CS..CS + 300], &[])
        );
    }

    #[test]
    fn extents_outside_window_and_bad_windows_are_errors() {
        let g = geo(4 * CS);
        let e = plan_window(g, 0..2 * CS, &[CS..3 * CS], &[], false).unwrap_err();
        assert!(matches!(e, PlanError::ExtentOutsideWindow { .. }));
        let e = plan_window(g, 100..2 * CS, &[], &[], false).unwrap_err();
        assert!(matches!(e, PlanError::BadWindow { .. }));
        let e = plan_window(g, 0..5 * CS, &[], &[], false).unwrap_err();
        assert!(matches!(e, PlanError::BadWindow { .. }));
    }

    #[test]
    fn read_requests_merge_touching_ranges_and_split_at_max() {
        let g = geo(8 * CS);
        let plans =
            plan_window(g, 0..8 * CS, &[0..5 * CS, 6 * CS..6 * CS + 10], &[], true).unwrap();
        let reqs = read_requests(&plans, 2 * CS);
        assert_eq!(
            reqs,
            vec![
                0..2 * CS,
                2 * CS..4 * CS,
                4 * CS..5 * CS,
                6 * CS..6 * CS + 10
            ]
        );
        let total: u64 = reqs.iter().map(|r| r.end - r.start).sum();
        let planned: u64 = plans.iter().map(ChunkPlan::read_bytes).sum();
        assert_eq!(total, planned);
    }

    #[test]
    fn read_bytes_never_exceed_dirty_bytes() {
        // Scattered 4 KiB writes with 1 MiB chunks: reads equal the dirty bytes exactly.
        let g = Geometry {
            disk_size: 64 << 20,
            chunk_size: 1 << 20,
        };
        let dirty: Vec<Range<u64>> = (0..200u64)
            .map(|i| {
                let o = (i * 7919 * 4096) % (64 << 20);
                o..o + 4096
            })
            .collect();
        let plans = plan_window(g, 0..64 << 20, &dirty, &[], false).unwrap();
        let dirty_bytes: u64 = normalize(&dirty, &(0..64 << 20))
            .unwrap()
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        let read: u64 = plans.iter().map(ChunkPlan::read_bytes).sum();
        assert_eq!(read, dirty_bytes);
    }
}
