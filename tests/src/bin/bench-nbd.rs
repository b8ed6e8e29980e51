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
    let size = size();
    let options = ClientOptions {
        connections: parse_env("BENCH_NBD_CONNECTIONS", 1) as usize,
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
    Ok(())
}

fn fmt_runs(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}
