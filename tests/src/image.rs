//! Files outside any VM: where the built test guest lives, and reading a disk image's bytes
//! from outside QEMU (for assertions), with `qemu-img` and force-share (`-U`), so it also works
//! while the domain runs.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The built test guest: `vmlinuz` and `initrd.img`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Whether `qemu-ga` is inside the initramfs (from `guest.info`).
    pub has_qemu_ga: bool,
}

/// Finds the test guest at `$SLUICE_TEST_GUEST_DIR` or `<workspace>/target/test-guest`.
pub fn guest_image() -> Result<GuestImage> {
    let dir = std::env::var_os("SLUICE_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-guest"));
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    if !kernel.is_file() || !initrd.is_file() {
        bail!(
            "test guest not found in {}: run `make guest` (or `make test`)",
            dir.display()
        );
    }
    let info = std::fs::read_to_string(dir.join("guest.info")).unwrap_or_default();
    Ok(GuestImage {
        kernel,
        initrd,
        has_qemu_ga: info.lines().any(|l| l.trim() == "qga=yes"),
    })
}

/// Creates an empty qcow2 image of `size` bytes.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    run_qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        size.to_string().as_ref(),
    ])
}

/// Runs the `qemu-io` command `cmd` (e.g. `write -P 0xaa 0 1M`) on the qcow2 image at `path`.
pub fn qemu_io(path: &Path, cmd: &str) -> Result<()> {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .context("cannot run qemu-io (install it with `make deps`)")?;
    if !out.status.success() {
        bail!(
            "qemu-io {cmd:?} on {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of the guest-visible contents of the image at `path`
/// (format `format`: "qcow2" or "raw"), without starting a VM and while one may run.
pub fn read_image(path: &Path, format: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let file = path
        .to_str()
        .with_context(|| format!("image path {} is not utf-8", path.display()))?;
    // QEMU option syntax escapes a comma by doubling it.
    let file = file.replace(',', ",,");
    let opts = format!(
        "driver=raw,offset={offset},size={len},file.driver={format},\
         file.file.driver=file,file.file.filename={file}"
    );
    convert_to_vec(&opts, len)
        .with_context(|| format!("read {len} bytes at {offset} of {}", path.display()))
}

/// Reads `len` bytes at `offset` of the NBD export `export` served on the unix socket
/// `socket` (e.g. a libvirt pull-mode backup export), with `qemu-img`.
pub fn read_nbd(socket: &Path, export: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let sock = socket
        .to_str()
        .with_context(|| format!("socket path {} is not utf-8", socket.display()))?
        .replace(',', ",,");
    let opts = format!(
        "driver=raw,offset={offset},size={len},file.driver=nbd,file.server.type=unix,\
         file.server.path={sock},file.export={}",
        export.replace(',', ",,")
    );
    convert_to_vec(&opts, len)
        .with_context(|| format!("read {len} bytes at {offset} of nbd export {export}"))
}

/// Runs `qemu-img convert -U --image-opts OPTS` into a temporary raw file and returns it.
fn convert_to_vec(opts: &str, len: u64) -> Result<Vec<u8>> {
    let out = tempfile::NamedTempFile::new().context("temporary file for an image read")?;
    run_qemu_img(&[
        "convert".as_ref(),
        "-U".as_ref(),
        "--image-opts".as_ref(),
        opts.as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        out.path().as_os_str(),
    ])?;
    let data = std::fs::read(out.path())?;
    if data.len() as u64 != len {
        bail!("read returned {} bytes, wanted {len}", data.len());
    }
    Ok(data)
}

fn run_qemu_img(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("cannot run qemu-img (install it with `make deps`)")?;
    if !out.status.success() {
        bail!(
            "qemu-img failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
