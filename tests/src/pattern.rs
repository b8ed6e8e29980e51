//! The deterministic data pattern the test guest writes, recomputed on the host.
//!
//! The 8-byte little-endian word at absolute disk offset `o` (`o % 8 == 0`) is
//! `splitmix64(seed ^ (o / 8))`. It is a pure function of `(seed, offset)`, so any sub-range
//! of a write can be recomputed here and compared byte for byte. The guest twin lives in
//! `vm-images/test-guest/agent.c`; keep both in step.

use sha2::{Digest, Sha256};

/// One step of splitmix64 (Steele, Lea, Flood), the pattern's word function.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes the guest's `write DISK OFFSET LEN SEED` puts at `offset..offset + len`.
/// Any offset and length work here (the guest itself requires 512-byte alignment).
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let end = offset + len as u64;
    let mut word = offset / 8;
    while word * 8 < end {
        let bytes = splitmix64(seed ^ word).to_le_bytes();
        let start = word * 8;
        for (i, b) in bytes.iter().enumerate() {
            let at = start + i as u64;
            if at >= offset && at < end {
                out.push(*b);
            }
        }
        word += 1;
    }
    out
}

/// Lowercase hex SHA-256 of `data`, the form the guest's `sum` command answers with.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 of the pattern range, to compare with the guest's `sum` after a `write`.
pub fn pattern_sha256(seed: u64, offset: u64, len: usize) -> String {
    sha256_hex(&pattern(seed, offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_splitmix_of_seed_xor_index() {
        let p = pattern(7, 16, 16);
        assert_eq!(&p[..8], &splitmix64(7 ^ 2).to_le_bytes());
        assert_eq!(&p[8..], &splitmix64(7 ^ 3).to_le_bytes());
    }

    #[test]
    fn sub_ranges_agree_with_the_whole() {
        let whole = pattern(42, 4096, 4096);
        assert_eq!(pattern(42, 4096 + 513, 1000), &whole[513..1513]);
        assert_eq!(pattern(42, 4099, 0), Vec::<u8>::new());
    }

    #[test]
    fn known_digest_matches_the_guest() {
        // Answer of the guest agent to `sum vda 1048576 65536` after `write vda 1048576 65536 42`.
        assert_eq!(
            pattern_sha256(42, 1 << 20, 65536),
            "633ba4a05ca3f50125cf38e04897e9740a14d31634182e8fdea9af4c026c0eb9"
        );
    }
}
