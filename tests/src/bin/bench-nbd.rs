//! Benchmark: read a 2 GiB export served by qemu-nbd over a unix socket with Sluice's NBD
//! client and with `nbdcopy ... null:`, in the same run, and print both rates and their ratio
//! (goal: ours at least 0.9 x nbdcopy). Never fails on a slow machine; fails only when it
//! cannot run.
//!
//! The image is a fully allocated raw file of mixed content (pseudo-random, zero and
//! repeated-text megabytes), so neither reader can skip holes. Defaults: 64 requests of 256 KiB
//! in flight on one connection (`BENCH_NBD_DEPTH`, `BENCH_NBD_REQUEST_KIB`,
//! `BENCH_NBD_CONNECTIONS`, `BENCH_NBD_SIZE_MIB` override); 2 MiB requests make qemu-nbd
//! page-fault on a fresh bounce buffer per request and halve its rate. Each reader runs three times
//! after a warm-up pass that brings the file into the page cache; the best run counts.
//!
//! Then the transports a backup meets (issue 13): the same image read with Sluice's client
//! from qemu-nbd over the unix socket (a local hypervisor), over TCP on loopback, over TCP
//! with TLS (a remote hypervisor's QEMU: `tls-creds-x509` with a client certificate), and from
//! nbdkit's `delay` filter at 2 ms per read (a far hypervisor), each as GB/s and as a ratio to
//! the unix socket.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proxy::nbd::{Client, ClientOptions};
use testbed::peers;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

/// Size of the image: 2 GiB unless BENCH_NBD_SIZE_MIB says otherwise.
fn size() -> u64 {
    parse_env("BENCH_NBD_SIZE_MIB", 2 * GIB / MIB) * MIB
}

fn parse_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Write the mixed-content image: per MiB, 1/2 pseudo-random, 1/4 zeroes, 1/4 repeated text.
fn make_image(path: &std::path::Path) -> Result<()> {
    let mut file =
        std::io::BufWriter::with_capacity(4 * MIB as usize, std::fs::File::create(path)?);
    let mut block = vec![0u8; MIB as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..size() / MIB {
        match i % 4 {
            0 | 1 => {
                for word in block.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    word.copy_from_slice(&x.to_le_bytes());
                }
            }
            2 => block.fill(0),
            _ => {
                let text = b"sluice backup proxy benchmark data ";
                for (j, b) in block.iter_mut().enumerate() {
                    *b = text[j % text.len()];
                }
            }
        }
        file.write_all(&block)?;
    }
    file.flush()?;
    file.get_ref().sync_all()?;
    Ok(())
}

/// Read the whole export with `workers` tasks each keeping one `request`-byte read in flight.
async fn read_with_ours(address: &proxy::nbd::Address, workers: u64, request: u64) -> Result<f64> {
    let connections = parse_env("BENCH_NBD_CONNECTIONS", 1) as usize;
    read_with(address, None, connections, workers, request).await
}

/// [`read_with_ours`] over TLS when `tls` is given.
async fn read_with(
    address: &proxy::nbd::Address,
    tls: Option<proxy::nbd::ClientTls>,
    connections: usize,
    workers: u64,
    request: u64,
) -> Result<f64> {
    let size = size();
    let options = ClientOptions {
        tls,
        connections,
        export: "disk".into(),
        max_in_flight_requests: workers as usize,
        max_in_flight_bytes: (workers * request) as usize,
        ..ClientOptions::default()
    };
    let client = Client::connect(address, &options).await?;
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (client, next) = (client.clone(), next.clone());
        set.spawn(async move {
            let mut sum = 0u64;
            let mut buffer = proxy::nbd::BytesMut::new();
            loop {
                let offset = next.fetch_add(request, Ordering::Relaxed);
                if offset >= size {
                    return Ok::<u64, proxy::nbd::Error>(sum);
                }
                let len = request.min(size - offset);
                buffer = client.read_into(offset, len, buffer).await?;
                sum = sum.wrapping_add(buffer[buffer.len() - 1] as u64);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let secs = start.elapsed().as_secs_f64();
    client.disconnect().await?;
    Ok(size as f64 / secs / 1e9)
}

fn read_with_nbdcopy(uri: &str) -> Result<f64> {
    let start = Instant::now();
    peers::run("nbdcopy", &[uri, "null:"])?;
    Ok(size() as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn best(runs: &[f64]) -> f64 {
    runs.iter().cloned().fold(0.0, f64::max)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let workers = parse_env("BENCH_NBD_DEPTH", 64);
    let request = parse_env("BENCH_NBD_REQUEST_KIB", 256) * 1024;
    if request == 0 || request > 32 * MIB || workers == 0 {
        bail!("BENCH_NBD_REQUEST_KIB must be 1..=32768 and BENCH_NBD_DEPTH positive");
    }
    let dir = tempfile::Builder::new()
        .prefix("bench-nbd")
        .tempdir_in("/var/tmp")?;
    let image = dir.path().join("disk.raw");
    let t = Instant::now();
    make_image(&image).context("write the 2 GiB image")?;
    println!(
        "image: 2 GiB raw, mixed content, written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let socket = dir.path().join("nbd.sock");
    let peer = peers::qemu_nbd(&image, "raw", "disk", None, &[], &socket)?;
    let uri = peer.uri("disk");
    read_with_nbdcopy(&uri)?; // warm-up: page cache
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        theirs.push(read_with_nbdcopy(&uri)?);
        ours.push(read_with_ours(&peer.address(), workers, request).await?);
    }
    let (o, n) = (best(&ours), best(&theirs));
    println!(
        "sluice nbd client ({workers} x {} KiB in flight, {} connection(s)): {o:.2} GB/s (runs: {})",
        request / 1024,
        parse_env("BENCH_NBD_CONNECTIONS", 1),
        fmt_runs(&ours)
    );
    println!(
        "nbdcopy ... null:: {n:.2} GB/s (runs: {})",
        fmt_runs(&theirs)
    );
    println!("ratio sluice / nbdcopy: {:.2} (goal >= 0.90)", o / n);
    drop(peer);
    transports(&image, dir.path(), o, workers, request).await
}

/// Best of [`RUNS`] reads of the export at `address` with Sluice's client (TLS if given).
async fn best_of(
    address: &proxy::nbd::Address,
    tls: Option<&proxy::nbd::ClientTls>,
    connections: usize,
    workers: u64,
    request: u64,
) -> Result<f64> {
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(read_with(address, tls.cloned(), connections, workers, request).await?);
    }
    Ok(best(&runs))
}

/// A qemu-nbd serving `image` on 127.0.0.1 (with TLS from `tls_dir` if given), killed on drop.
struct TcpPeer(std::process::Child, u16);

impl Drop for TcpPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd_tcp(image: &std::path::Path, tls_dir: Option<&std::path::Path>) -> Result<TcpPeer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut c = std::process::Command::new("qemu-nbd");
    c.args([
        "-r",
        "-t",
        "-e",
        "8",
        "-f",
        "raw",
        "-x",
        "disk",
        "-b",
        "127.0.0.1",
    ])
    .args(["-p", &port.to_string()]);
    if let Some(d) = tls_dir {
        c.arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                d.display()
            ))
            .args(["--tls-creds", "tls0"]);
    }
    // The readiness probe below connects and hangs up, which qemu-nbd reports on stderr.
    let child = c
        .arg(image)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let peer = TcpPeer(child, port);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed().as_secs() > 10 {
            bail!("qemu-nbd did not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(peer)
}

/// The transports of a backup side by side; `unix` is the unix-socket figure measured above.
async fn transports(
    image: &std::path::Path,
    dir: &std::path::Path,
    unix: f64,
    workers: u64,
    request: u64,
) -> Result<()> {
    let certs = dir.join("tls");
    std::fs::create_dir_all(&certs)?;
    peers::make_certs(&certs)?;
    let identity = proxy::nbd::Identity {
        cert_file: certs.join("client-cert.pem"),
        key_file: certs.join("client-key.pem"),
    };
    let tls = proxy::nbd::ClientTls::new(&certs.join("ca-cert.pem"), "localhost", Some(&identity))?;
    let tcp = |port| proxy::nbd::Address::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let plain = qemu_nbd_tcp(image, None)?;
    let t = best_of(&tcp(plain.1), None, 1, workers, request).await?;
    drop(plain);
    let secure = qemu_nbd_tcp(image, Some(&certs))?;
    let s = best_of(&tcp(secure.1), Some(&tls), 1, workers, request).await?;
    // qemu-nbd -e 8 advertises multi-conn for a read-only export, as QEMU's backup exports do.
    let s2 = best_of(&tcp(secure.1), Some(&tls), 2, workers, request).await?;
    drop(secure);
    let socket = dir.join("delay.sock");
    let image_s = image.display().to_string();
    let slow = peers::nbdkit(&["--filter=delay", "file", &image_s, "rdelay=2ms"], &socket)?;
    let d = best_of(&slow.address(), None, 1, workers, request).await?;
    drop(slow);
    println!(
        "transports (sluice nbd client, {workers} x {} KiB in flight):",
        request / 1024
    );
    println!("  unix socket (qemu-nbd):            {unix:.2} GB/s");
    println!(
        "  tcp loopback (qemu-nbd):           {t:.2} GB/s  ratio to unix {:.2}",
        t / unix
    );
    println!(
        "  tcp + tls (qemu-nbd, client cert): {s:.2} GB/s  ratio to unix {:.2}",
        s / unix
    );
    println!(
        "  tcp + tls, 2 connections:          {s2:.2} GB/s  ratio to unix {:.2}",
        s2 / unix
    );
    println!(
        "  2 ms per read (nbdkit delay):      {d:.2} GB/s  ratio to unix {:.2}",
        d / unix
    );
    Ok(())
}

fn fmt_runs(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}
