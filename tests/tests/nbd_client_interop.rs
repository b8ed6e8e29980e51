//! Our NBD client against real servers: qemu-nbd (dirty bitmaps, multi-conn, TLS),
//! qemu-storage-daemon (dirty bitmaps, allocation depth) and nbdkit (plain reads, injected
//! errors). Every test asserts what a backup relies on: exactly the written extents are dirty,
//! reads equal the image, errors surface as errors.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use proxy::nbd::{
    dirty_bitmap_context, proto::state, Client, ClientOptions, ClientTls, ErrorKind, Extent,
    Identity, BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH,
};
use testbed::pattern;
use testbed::peers::{self, make_certs, run};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const BITMAP: &str = "bm0";

/// A qcow2 image: pattern data at [0, 4M) and [12M, 13M), holes elsewhere; then bitmap `bm0`
/// added and two writes made with qemu-io (4 KiB at 1 MiB, 128 KiB at 20 MiB).
struct Image {
    dir: tempfile::TempDir,
    qcow2: PathBuf,
    raw: PathBuf,
    contents: Vec<u8>,
}

/// The dirty extents the bitmap must show (64 KiB granularity).
fn expected_dirty() -> Vec<(u64, u64)> {
    vec![(MIB, 64 * 1024), (20 * MIB, 128 * 1024)]
}

fn make_image() -> Result<Image> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    let mut contents = vec![0u8; SIZE as usize];
    contents[..4 * MIB as usize].copy_from_slice(&pattern(1, 0, 4 * MIB as usize));
    contents[12 * MIB as usize..13 * MIB as usize].copy_from_slice(&pattern(
        2,
        12 * MIB,
        MIB as usize,
    ));
    std::fs::write(&raw, &contents)?;
    let (r, q) = (raw.display().to_string(), qcow2.display().to_string());
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &r, &q])?;
    run("qemu-img", &["bitmap", "--add", &q, BITMAP])?;
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 4k",
            "-c",
            "write -P 0x33 20M 128k",
            &q,
        ],
    )?;
    contents[MIB as usize..MIB as usize + 4096].fill(0x5a);
    contents[20 * MIB as usize..20 * MIB as usize + 128 * 1024].fill(0x33);
    std::fs::write(&raw, &contents)?;
    Ok(Image {
        dir,
        qcow2,
        raw,
        contents,
    })
}

fn options(export: &str, contexts: &[&str]) -> ClientOptions {
    ClientOptions {
        export: export.to_string(),
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        ..ClientOptions::default()
    }
}

fn flagged(extents: &[Extent], bit: u32) -> Vec<(u64, u64)> {
    extents
        .iter()
        .filter(|e| e.flags & bit != 0)
        .map(|e| (e.offset, e.length))
        .collect()
}

/// Read the whole export with 16 requests of 1 MiB in flight and compare.
async fn assert_reads_equal(client: &Client, contents: &[u8]) -> Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for offset in (0..client.size()).step_by(MIB as usize) {
        let c = client.clone();
        set.spawn(async move { (offset, c.read(offset, MIB).await) });
    }
    while let Some(done) = set.join_next().await {
        let (offset, data) = done?;
        let data = data?;
        let want = &contents[offset as usize..(offset + MIB) as usize];
        assert!(
            data == want,
            "data at offset {offset} differs from the image"
        );
    }
    Ok(())
}

impl Image {
    /// Where a peer serving this image listens.
    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }
}

/// A fresh [`Image`] served by qemu-nbd as export `disk` with bitmap `bm0`, plus `extra`
/// qemu-nbd options.
fn qemu_nbd_with_bitmap(extra: &[&str]) -> Result<(Image, peers::Peer)> {
    let img = make_image()?;
    let peer = peers::qemu_nbd(
        &img.qcow2,
        "qcow2",
        "disk",
        Some(BITMAP),
        extra,
        &img.socket(),
    )?;
    Ok((img, peer))
}

/// The extents of `extents` with the dirty flag set equal those [`make_image`] wrote.
fn assert_dirty_as_written(extents: &[Extent]) {
    assert_eq!(flagged(extents, 1), expected_dirty(), "dirty extents");
}

#[tokio::test]
async fn qemu_nbd_dirty_bitmap_extents_and_reads() -> Result<()> {
    let (img, peer) = qemu_nbd_with_bitmap(&[])?;
    let ctx = dirty_bitmap_context(BITMAP);
    let client =
        Client::connect(&peer.address(), &options("disk", &[BASE_ALLOCATION, &ctx])).await?;
    assert_eq!(client.size(), SIZE);
    assert!(client.info().is_read_only());
    let all = client.extents_all(0, SIZE).await?;
    assert_dirty_as_written(&all[&ctx]);
    // The unwritten middle of the image is a hole in base:allocation.
    let holes = flagged(&all[BASE_ALLOCATION], state::HOLE);
    assert!(
        holes
            .iter()
            .any(|&(o, l)| o <= 5 * MIB && o + l >= 11 * MIB),
        "expected a hole over [5M, 11M), got {holes:?}"
    );
    // Several block status requests of odd lengths still cover the range exactly.
    let part = client.extents(&ctx, MIB - 4096, 3 * 65536).await?;
    assert_eq!(part.first().map(|e| e.offset), Some(MIB - 4096));
    assert_eq!(part.last().map(Extent::end), Some(MIB - 4096 + 3 * 65536));
    assert_reads_equal(&client, &img.contents).await?;
    client.disconnect().await?;
    assert_eq!(
        client.read(0, 512).await.unwrap_err().kind(),
        ErrorKind::Connection
    );
    Ok(())
}

#[tokio::test]
async fn qemu_nbd_lists_exports_and_contexts_and_refuses_missing_bitmap() -> Result<()> {
    let (_img, peer) = qemu_nbd_with_bitmap(&[])?;
    let exports = proxy::nbd::list_exports(&peer.address(), None).await?;
    assert_eq!(
        exports.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        vec!["disk"]
    );
    let contexts = proxy::nbd::list_meta_contexts(
        &peer.address(),
        None,
        "disk",
        &["qemu:dirty-bitmap:".to_string()],
    )
    .await?;
    assert_eq!(contexts, vec![dirty_bitmap_context(BITMAP)]);
    let err = Client::connect(
        &peer.address(),
        &options("disk", &["qemu:dirty-bitmap:nope"]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"), "{err}");
    let err = Client::connect(&peer.address(), &options("other", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    Ok(())
}

#[tokio::test]
async fn qemu_nbd_multi_conn_reads_over_several_connections() -> Result<()> {
    let img = make_image()?;
    let peer = peers::qemu_nbd(&img.raw, "raw", "disk", None, &[], &img.socket())?;
    let opts = ClientOptions {
        connections: 4,
        ..options("disk", &[])
    };
    let client = Client::connect(&peer.address(), &opts).await?;
    assert!(client.info().can_multi_conn());
    assert_eq!(client.connections(), 4);
    assert_reads_equal(&client, &img.contents).await?;
    // A read larger than the 32 MiB maximum request is split transparently.
    let whole = client.read(0, SIZE).await?;
    assert!(whole == img.contents);
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn qemu_storage_daemon_dirty_bitmap_and_allocation_depth() -> Result<()> {
    let img = make_image()?;
    let peer = peers::qemu_storage_daemon(&img.qcow2, "disk", &[BITMAP], &img.socket())?;
    let ctx = dirty_bitmap_context(BITMAP);
    let wanted = [BASE_ALLOCATION, ctx.as_str(), QEMU_ALLOCATION_DEPTH];
    let client = Client::connect(&peer.address(), &options("disk", &wanted)).await?;
    let all = client.extents_all(0, SIZE).await?;
    assert_dirty_as_written(&all[&ctx]);
    // Depth 1 where the qcow2 has data, 0 (unallocated) in the holes.
    let depth = &all[QEMU_ALLOCATION_DEPTH];
    let at = |o: u64| {
        depth
            .iter()
            .find(|e| e.offset <= o && o < e.end())
            .map(|e| e.flags)
    };
    assert_eq!(at(0), Some(1));
    assert_eq!(at(6 * MIB), Some(0));
    assert_reads_equal(&client, &img.contents).await?;
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn nbdkit_reads_equal_file_and_injected_errors_surface() -> Result<()> {
    let img = make_image()?;
    let trigger = img.dir.path().join("fail-now");
    let raw = img.raw.display().to_string();
    let error_file = format!("error-pread-file={}", trigger.display());
    let args = [
        "--filter=error",
        "file",
        &raw,
        "error-pread-rate=1",
        "error-pread=EIO",
        &error_file,
    ];
    let peer = peers::nbdkit(&args, &img.socket())?;
    let client = Client::connect(&peer.address(), &options("", &[BASE_ALLOCATION])).await?;
    assert_reads_equal(&client, &img.contents).await?;
    std::fs::write(&trigger, b"")?;
    let err = client.read(4 * MIB, 65536).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Remote, "{err}");
    assert_eq!(err.errno(), Some(proxy::nbd::proto::errno::EIO), "{err}");
    assert!(err.to_string().contains("offset 4194304"), "{err}");
    // The connection survives a failed request.
    std::fs::remove_file(&trigger)?;
    assert!(
        client.read(4 * MIB, 65536).await?
            == img.contents[4 * MIB as usize..4 * MIB as usize + 65536]
    );
    client.disconnect().await?;
    Ok(())
}

fn tls_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    make_certs(dir.path())?;
    Ok(dir)
}

pub fn client_tls(certs: &Path) -> Result<ClientTls> {
    let identity = Identity {
        cert_file: certs.join("client-cert.pem"),
        key_file: certs.join("client-key.pem"),
    };
    ClientTls::new(&certs.join("ca-cert.pem"), "localhost", Some(&identity)).context("client tls")
}

#[tokio::test]
async fn qemu_nbd_with_tls_creds_serves_our_client() -> Result<()> {
    let certs = tls_dir()?;
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        certs.path().display()
    );
    let extra = ["--object", object.as_str(), "--tls-creds", "tls0"];
    let (img, peer) = qemu_nbd_with_bitmap(&extra)?;
    let plain = Client::connect(&peer.address(), &options("disk", &[]))
        .await
        .unwrap_err();
    assert_eq!(plain.kind(), ErrorKind::Refused, "{plain}");
    let ctx = dirty_bitmap_context(BITMAP);
    let opts = ClientOptions {
        tls: Some(client_tls(certs.path())?),
        ..options("disk", &[&ctx])
    };
    let client = Client::connect(&peer.address(), &opts).await?;
    assert_dirty_as_written(&client.extents(&ctx, 0, SIZE).await?);
    assert_reads_equal(&client, &img.contents).await?;
    client.disconnect().await?;
    Ok(())
}
