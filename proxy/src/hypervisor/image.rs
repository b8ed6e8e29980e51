//! Offline image inspection and editing through `qemu-img`: virtual size, persistent bitmaps
//! and their flags, adding and removing bitmaps, creating scratch images, and converting a
//! restored raw file to qcow2.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::xml::validate_name;
use super::{failed, io_failed, Error, ErrorKind, Result};

/// A persistent bitmap stored in a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBitmap {
    pub name: String,
    pub granularity: u64,
    /// `in-use`: the image was not closed cleanly since the bitmap was last written.
    pub in_use: bool,
    /// `auto`: the bitmap records writes (enabled).
    pub enabled: bool,
}

impl ImageBitmap {
    /// Whether the bitmap can be trusted as a change list.
    pub fn is_consistent(&self) -> bool {
        !self.in_use
    }
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub bitmaps: Vec<ImageBitmap>,
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "format-specific")]
    format_specific: Option<RawSpecific>,
}

#[derive(Deserialize)]
struct RawSpecific {
    data: Option<RawData>,
}

#[derive(Deserialize)]
struct RawData {
    #[serde(default)]
    bitmaps: Vec<RawBitmap>,
}

#[derive(Deserialize)]
struct RawBitmap {
    name: String,
    granularity: u64,
    #[serde(default)]
    flags: Vec<String>,
}

/// Parses `qemu-img info --output=json`.
pub fn parse_info(json: &[u8]) -> Result<ImageInfo> {
    let raw: RawInfo = serde_json::from_slice(json)
        .map_err(|e| failed("unparsable qemu-img info output").with_source(e))?;
    let bitmaps = raw
        .format_specific
        .and_then(|s| s.data)
        .map(|d| d.bitmaps)
        .unwrap_or_default()
        .into_iter()
        .map(|b| ImageBitmap {
            in_use: b.flags.iter().any(|f| f == "in-use"),
            enabled: b.flags.iter().any(|f| f == "auto"),
            name: b.name,
            granularity: b.granularity,
        })
        .collect();
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        bitmaps,
    })
}

/// Runs a `qemu-*` tool and returns its stdout; a non-zero exit is an error naming `what`.
pub(crate) async fn run_tool(
    program: &str,
    args: &[&std::ffi::OsStr],
    what: &str,
) -> Result<Vec<u8>> {
    let out = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            io_failed(
                format!("cannot run {program} for {what} (install it: make deps)"),
                e,
            )
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!(
            "{program} failed for {what}: {}",
            stderr.trim()
        )));
    }
    Ok(out.stdout)
}

/// `qemu-img info -U -f FORMAT`: safe on an image a running QEMU holds open (flags may then
/// be stale). The format is the one the definition names, never probed.
pub async fn info(image: &Path, format: &str) -> Result<ImageInfo> {
    let what = format!("image {}", image.display());
    let args = ["info", "--output=json", "-U", "-f", format].map(std::ffi::OsStr::new);
    let mut argv: Vec<&std::ffi::OsStr> = args.to_vec();
    argv.push(image.as_os_str());
    parse_info(&run_tool("qemu-img", &argv, &what).await?)
}

/// Adds an enabled persistent bitmap to a qcow2 image nobody holds open.
pub async fn add_bitmap(image: &Path, name: &str) -> Result<()> {
    bitmap_op(image, name, "--add").await
}

/// Removes a persistent bitmap from a qcow2 image nobody holds open.
pub async fn remove_bitmap(image: &Path, name: &str) -> Result<()> {
    bitmap_op(image, name, "--remove").await
}

async fn bitmap_op(image: &Path, name: &str, op: &str) -> Result<()> {
    validate_name("bitmap", name)?;
    let what = format!("bitmap {name} on image {}", image.display());
    let argv = [
        std::ffi::OsStr::new("bitmap"),
        std::ffi::OsStr::new(op),
        std::ffi::OsStr::new("-f"),
        std::ffi::OsStr::new("qcow2"),
        image.as_os_str(),
        std::ffi::OsStr::new(name),
    ];
    run_tool("qemu-img", &argv, &what).await.map(drop)
}

/// Creates an empty qcow2 scratch image of `size` bytes (no backing file in its header; the
/// QMP adapter attaches the backing node when it opens it).
pub async fn create_scratch(path: &Path, size: u64) -> Result<()> {
    let what = format!("scratch image {}", path.display());
    let size = size.to_string();
    let argv = [
        std::ffi::OsStr::new("create"),
        std::ffi::OsStr::new("-q"),
        std::ffi::OsStr::new("-f"),
        std::ffi::OsStr::new("qcow2"),
        path.as_os_str(),
        std::ffi::OsStr::new(&size),
    ];
    run_tool("qemu-img", &argv, &what).await.map(drop)
}

/// How a [`convert_raw_to_qcow2`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    Done,
    /// `cancel` fired: `qemu-img` was killed and the output removed.
    Cancelled,
}

/// How often a running conversion looks at its cancel token.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// `qemu-img convert -f raw -O qcow2 RAW OUT` (holes stay unallocated). Blocking: call it
/// from a blocking thread (a restore's own thread). Watches `cancel` while `qemu-img` runs;
/// on cancel or failure `out` is removed.
pub fn convert_raw_to_qcow2(
    raw: &Path,
    out: &Path,
    cancel: &CancellationToken,
) -> Result<Conversion> {
    let what = format!("conversion of {} to qcow2", out.display());
    let mut child = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            io_failed(
                format!("cannot run qemu-img for {what} (install it: make deps)"),
                e,
            )
        })?;
    let status = loop {
        if cancel.is_cancelled() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(out);
            return Ok(Conversion::Cancelled);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(CANCEL_POLL),
            Err(e) => return Err(io_failed(format!("waiting for qemu-img for {what}"), e)),
        }
    };
    if status.success() {
        return Ok(Conversion::Done);
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let _ = std::fs::remove_file(out);
    Err(failed(format!(
        "qemu-img failed for {what}: {}",
        stderr.trim()
    )))
}

/// The bitmap `name` of `info`, or the problem that makes it unusable.
pub fn bitmap_problem(
    info: &ImageInfo,
    disk: &str,
    name: &str,
) -> Option<super::CheckpointProblem> {
    use super::CheckpointProblem as P;
    let disk = disk.to_string();
    match info.bitmaps.iter().find(|b| b.name == name) {
        None => Some(P::BitmapMissing { disk }),
        Some(b) if b.in_use => Some(P::BitmapInconsistent { disk }),
        Some(b) if !b.enabled => Some(P::BitmapDisabled { disk }),
        Some(_) => None,
    }
}

/// Maps "the image is not qcow2" to the right error.
pub fn require_qcow2(info: &ImageInfo, image: &Path) -> Result<()> {
    if info.format == "qcow2" {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "image {} is {}, only qcow2 holds bitmaps",
                image.display(),
                info.format
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bitmap_flags() {
        let json = br#"{"virtual-size": 1048576, "format": "qcow2", "format-specific":
          {"type": "qcow2", "data": {"compat": "1.1", "bitmaps": [
            {"flags": ["in-use", "auto"], "name": "cp1", "granularity": 65536},
            {"flags": ["auto"], "name": "cp2", "granularity": 65536},
            {"flags": [], "name": "cp3", "granularity": 65536}]}}}"#;
        let info = parse_info(json).unwrap();
        assert_eq!(info.virtual_size, 1 << 20);
        assert!(info.bitmaps[0].in_use && info.bitmaps[0].enabled);
        assert!(bitmap_problem(&info, "vda", "cp1").is_some());
        assert!(bitmap_problem(&info, "vda", "cp2").is_none());
        assert!(bitmap_problem(&info, "vda", "cp3").is_some());
        assert!(bitmap_problem(&info, "vda", "cp4").is_some());
    }

    #[test]
    fn raw_images_have_no_bitmaps() {
        let info = parse_info(br#"{"virtual-size": 512, "format": "raw"}"#).unwrap();
        assert!(info.bitmaps.is_empty());
        assert!(parse_info(b"not json").is_err());
    }
}
