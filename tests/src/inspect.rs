//! What ordinary tools see of NBD exports and disk images, for assertions: the extents
//! `nbdinfo --map` reports, the chunks those extents cover, and `qemu-img compare`.
//!
//! Owns parsing the text these tools print. It does not serve anything (see
//! [`crate::peers`]) and reads no repository (see [`crate::bed`]).

use anyhow::{ensure, Result};

use crate::peers::run;

/// One extent as `nbdinfo --map` prints it: (offset, length, flags).
pub type MapExtent = (u64, u64, u32);

/// The extents of `uri` in meta context `context` (`base:allocation` when `None`), as
/// `nbdinfo --map[=CONTEXT]` reports them.
pub fn nbd_map(uri: &str, context: Option<&str>) -> Result<Vec<MapExtent>> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run("nbdinfo", &[&arg, uri])?;
    out.lines().map(parse_map_line).collect()
}

/// `OFFSET LENGTH FLAGS [description]`.
fn parse_map_line(line: &str) -> Result<MapExtent> {
    let v: Vec<&str> = line.split_whitespace().collect();
    ensure!(v.len() >= 3, "nbdinfo line {line:?}");
    Ok((v[0].parse()?, v[1].parse()?, v[2].parse()?))
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
    fn map_lines_parse_and_bad_ones_are_refused() {
        let line = "         0     65536    3  hole,zero";
        assert_eq!(parse_map_line(line).unwrap(), (0, 65536, 3));
        assert!(parse_map_line("0 65536").is_err());
        assert!(parse_map_line("x 1 0").is_err());
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
