//! What ordinary tools see of NBD exports and disk images, for assertions: the extents
//! `nbdinfo --map` reports, the chunks those extents cover, and `qemu-img compare`.
//!
//! Owns parsing the text these tools print. It does not serve anything (see
//! [`crate::peers`]) and reads no repository (see [`crate::bed`]).

use std::path::Path;

use anyhow::{Context, Result};
use proxy::hypervisor::DiskExport;

use crate::peers::{nbd_unix_uri, run};

/// One extent as `nbdinfo --map` prints it: (offset, length, flags).
pub type MapExtent = (u64, u64, u32);

/// The extents of `uri` in meta context `context` (`base:allocation` when `None`), as
/// `nbdinfo --json --map[=CONTEXT]` reports them.
pub fn nbd_map(uri: &str, context: Option<&str>) -> Result<Vec<MapExtent>> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    parse_json_map(&run("nbdinfo", &["--json", &arg, uri])?)
}

/// `[{"offset": O, "length": L, "type": FLAGS, ...}, ...]`.
fn parse_json_map(text: &str) -> Result<Vec<MapExtent>> {
    let v: serde_json::Value = serde_json::from_str(text).context("nbdinfo map is not json")?;
    let extents = v.as_array().context("nbdinfo map is not an array")?;
    extents
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_u64().with_context(|| format!("nbdinfo extent {e}"));
            Ok((
                field("offset")?,
                field("length")?,
                u32::try_from(field("type")?)?,
            ))
        })
        .collect()
}

/// The extents of `map` with flag bit `bit` set, adjacent ones merged: (offset, length).
pub fn extents_with(map: &[MapExtent], bit: u32) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, flags) in map {
        if flags & bit == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Dirty extents of export `export` on `socket` in a `qemu:dirty-bitmap:` context, merged.
pub fn dirty_extents(socket: &Path, export: &str, context: &str) -> Result<Vec<(u64, u64)>> {
    let map = nbd_map(&nbd_unix_uri(socket, export), Some(context))?;
    Ok(extents_with(&map, 1))
}

/// Data (non-hole) extents of export `export` on `socket` in `base:allocation`, merged.
pub fn data_extents(socket: &Path, export: &str) -> Result<Vec<(u64, u64)>> {
    let map = nbd_map(&nbd_unix_uri(socket, export), Some("base:allocation"))?;
    let data: Vec<MapExtent> = map.iter().map(|&(o, l, t)| (o, l, !t & 1)).collect();
    Ok(extents_with(&data, 1))
}

/// The dirty extents of a hypervisor backup export in its own dirty-bitmap context (an
/// incremental's); an error for an export without one (a full).
pub fn bitmap_extents(e: &DiskExport) -> Result<Vec<(u64, u64)>> {
    let ctx = e
        .dirty_bitmap_context
        .as_deref()
        .with_context(|| format!("export {} has no dirty bitmap", e.export_name))?;
    dirty_extents(&e.socket, &e.export_name, ctx)
}

/// Whether export `export` on `socket` holds exactly the bytes of the qcow2 `image` (read
/// with force-share, so QEMU may hold it).
pub fn export_equals(image: &Path, socket: &Path, export: &str) -> Result<()> {
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &image.to_string_lossy(),
            &nbd_unix_uri(socket, export),
        ],
    )
    .map(drop)
}

/// The indexes of the `chunk`-byte chunks covered by the extents whose flags equal `flags`,
/// in extent order.
pub fn chunks_with(extents: &[MapExtent], flags: u32, chunk: u64) -> Vec<u64> {
    extents
        .iter()
        .filter(|e| e.2 == flags)
        .flat_map(|&(o, l, _)| (o / chunk)..(o + l).div_ceil(chunk))
        .collect()
}

/// The indexes of the `chunk`-byte chunks of `data` that hold a non-zero byte.
pub fn data_chunks(data: &[u8], chunk: u64) -> Vec<u64> {
    data.chunks(chunk as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

/// `qemu-img compare -f A_FORMAT -F B_FORMAT A B`: fails, naming the first difference, unless
/// the two images (files or NBD URIs) hold the same guest-visible bytes.
pub fn compare_images(a: &str, a_format: &str, b: &str, b_format: &str) -> Result<()> {
    run(
        "qemu-img",
        &["compare", "-f", a_format, "-F", b_format, a, b],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_maps_parse_and_bad_ones_are_refused() {
        let text = r#"[{"offset":0,"length":65536,"type":3,"description":"hole,zero"},
                       {"offset":65536,"length":4096,"type":0}]"#;
        assert_eq!(
            parse_json_map(text).unwrap(),
            vec![(0, 65536, 3), (65536, 4096, 0)]
        );
        assert!(parse_json_map(r#"[{"offset":0,"length":1}]"#).is_err());
        assert!(parse_json_map(r#"{"offset":0}"#).is_err());
        assert!(parse_json_map(r#"[{"offset":0,"length":1,"type":4294967296}]"#).is_err());
    }

    #[test]
    fn flagged_extents_merge_when_adjacent() {
        let map = [(0, 10, 1), (10, 5, 3), (15, 5, 0), (20, 5, 1)];
        assert_eq!(extents_with(&map, 1), vec![(0, 15), (20, 5)]);
        assert_eq!(extents_with(&map, 2), vec![(10, 5)]);
    }

    #[test]
    fn chunks_cover_partial_extents() {
        let map = [(0, 4096, 0), (4096, 131072 - 4096, 3), (131072, 1, 0)];
        assert_eq!(chunks_with(&map, 0, 65536), vec![0, 2]);
        assert_eq!(chunks_with(&map, 3, 65536), vec![0, 1]);
        let mut data = vec![0u8; 4 * 65536];
        data[65536 * 3 + 7] = 1;
        assert_eq!(data_chunks(&data, 65536), vec![3]);
    }
}
