//! Byte encodings of everything stored in a repository (drawn in `docs/formats.md`).
//!
//! Owns encoding, decoding and checking of blobs, packs, index blocks, manifests and the
//! repository config. Does not own storage (see `backend`) or policy.

pub mod blob;
pub mod config;
pub mod index;
pub mod manifest;
pub mod pack;

/// Little-endian u32 at `at` (caller checked the length).
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Little-endian u64 at `at` (caller checked the length).
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// 32 bytes at `at` (caller checked the length).
pub(crate) fn arr32(b: &[u8], at: usize) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(&b[at..at + 32]);
    a
}
