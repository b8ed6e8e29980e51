//! A Bloom filter of chunk digests: GC's set of live blobs in about 1.25 bytes per blob.
//!
//! Owns sizing and probing. A false positive makes GC keep a dead blob, never drop a live
//! one, so the filter may be small: 10 bits per expected item and 7 probes give a false
//! positive rate of about 0.82 % (`(1 - e^(-7/10))^7`). Each GC run draws a new seed, so a
//! dead blob kept by one run is, with the same odds, collected by the next. The size is
//! capped at [`MAX_BITS`] (256 MiB); past ~215 million items the rate grows (a repository
//! of 400 million blobs sees about 8 %), which costs space, not data.

use crate::error::{Error, Result};
use crate::ids::ChunkDigest;

/// Bits per expected item.
const BITS_PER_ITEM: u64 = 10;
/// Probes per item (optimal for 10 bits per item is 10 * ln 2 ≈ 6.9).
const PROBES: u64 = 7;
/// Smallest filter: 1 Mi bits (128 KiB), so small repositories see no false positives.
const MIN_BITS: u64 = 1 << 20;
/// Largest filter: 2 Gi bits (256 MiB).
pub(crate) const MAX_BITS: u64 = 1 << 31;

/// The filter.
pub(crate) struct Bloom {
    words: Vec<u64>,
    bits: u64,
    seed: u64,
}

impl Bloom {
    /// A filter for about `items` items, probed with `seed`.
    pub(crate) fn for_items(items: u64, seed: u64) -> Result<Self> {
        let bits = items
            .saturating_mul(BITS_PER_ITEM)
            .clamp(MIN_BITS, MAX_BITS)
            .next_multiple_of(64);
        let n = (bits / 64) as usize;
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| {
            Error::invalid(format!("gc: bloom filter of {} MiB does not fit", n >> 17))
        })?;
        words.resize(n, 0);
        Ok(Bloom { words, bits, seed })
    }

    /// Size in bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Add `d`; true if it was (probably) not there yet.
    pub(crate) fn insert(&mut self, d: &ChunkDigest) -> bool {
        let mut fresh = false;
        for p in self.probes(d) {
            let (w, m) = ((p / 64) as usize, 1u64 << (p % 64));
            fresh |= self.words[w] & m == 0;
            self.words[w] |= m;
        }
        fresh
    }

    /// Whether `d` may have been added (certainly, if it was).
    pub(crate) fn contains(&self, d: &ChunkDigest) -> bool {
        self.probes(d)
            .all(|p| self.words[(p / 64) as usize] & (1u64 << (p % 64)) != 0)
    }

    /// Bit positions of `d` by double hashing. Digests are uniform already; the seeded
    /// mix only makes the collisions differ from run to run.
    fn probes(&self, d: &ChunkDigest) -> impl Iterator<Item = u64> {
        let word =
            |i: usize| u64::from_le_bytes(d.0[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let h1 = mix(word(0) ^ self.seed);
        let h2 = mix(word(1) ^ self.seed.rotate_left(32)) | 1;
        let bits = self.bits;
        (0..PROBES).map(move |i| {
            let h = h1.wrapping_add(i.wrapping_mul(h2));
            ((h as u128 * bits as u128) >> 64) as u64
        })
    }
}

/// splitmix64's finaliser: a bijection on u64 that spreads every input bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u64) -> ChunkDigest {
        ChunkDigest::of(&i.to_le_bytes())
    }

    #[test]
    fn no_false_negatives_and_rate_near_design() {
        let n = 200_000u64;
        let mut b = Bloom::for_items(n * 8, 42).unwrap();
        // Force the designed load: 10 bits per item.
        b = Bloom {
            words: vec![0; (n * BITS_PER_ITEM / 64) as usize],
            bits: n * BITS_PER_ITEM / 64 * 64,
            seed: b.seed,
        };
        for i in 0..n {
            b.insert(&digest(i));
        }
        assert!((0..n).all(|i| b.contains(&digest(i))));
        let fp = (n..2 * n).filter(|&i| b.contains(&digest(i))).count();
        let rate = fp as f64 / n as f64;
        assert!(rate < 0.0125, "false positive rate {rate}");
    }

    #[test]
    fn sized_within_bounds() {
        assert_eq!(Bloom::for_items(0, 1).unwrap().bytes() as u64, MIN_BITS / 8);
        let b = Bloom::for_items(10_000_000, 1).unwrap();
        assert_eq!(b.bytes() as u64, 10_000_000 * BITS_PER_ITEM / 8);
    }
}
