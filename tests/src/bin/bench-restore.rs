//! Benchmark: sequential read of a restore point. `nbdcopy` from our `RepoExport` against
//! `nbdcopy` from `qemu-nbd` serving a qcow2 of the same content, in the same run (ratio; goal
//! at least 0.8), and restore-to-raw throughput. Prints figures; never fails on a slow
//! machine, only when it cannot run.
//!
//! Content (BENCH_RESTORE_SIZE_MIB, default 1024): per MiB, 1/2 pseudo-random, 1/4 zeroes,
//! 1/4 repeated text, backed up with catalog's `BackupWriter`. Each reader gets a warm-up
//! pass, then the best of three runs counts; the runs alternate between the two readers.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, FsBackend, RepoConfig, RepoOptions,
    Repository, VmIdentity,
};
use proxy::nbd::{Server, ServerOptions};
use proxy::restore::{restore_to_file, ExportName, ExportOptions, ImageFormat, RepoExport};
use testbed::peers::{self, ServerThread};

const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

fn size() -> u64 {
    std::env::var("BENCH_RESTORE_SIZE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
        * MIB
}

fn megabyte(i: u64, x: &mut u64, block: &mut [u8]) {
    match i % 4 {
        0 | 1 => {
            for word in block.chunks_exact_mut(8) {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
        }
        2 => block.fill(0),
        _ => {
            let text = b"sluice restore benchmark data ";
            for (j, b) in block.iter_mut().enumerate() {
                *b = text[j % text.len()];
            }
        }
    }
}

/// Back the content up into `repo` and write it as a raw file at `raw`.
fn make(repo: &Repository, raw: &Path) -> Result<catalog::Manifest> {
    use std::io::Write;
    let spec = BackupSpec {
        vm: VmIdentity {
            name: "bench".into(),
            uuid: "be0c0000-0000-4000-8000-000000000001".into(),
        },
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".into(),
            size: size(),
            checkpoint: None,
        }],
        parent: None,
        started: 1_700_000_000,
    };
    let w = repo.begin_backup(spec)?;
    let per_mib = MIB / w.chunk_size() as u64;
    let mut file = std::io::BufWriter::with_capacity(4 * MIB as usize, std::fs::File::create(raw)?);
    let (mut x, mut block) = (0x9e37_79b9_7f4a_7c15u64, vec![0u8; MIB as usize]);
    for i in 0..size() / MIB {
        megabyte(i, &mut x, &mut block);
        file.write_all(&block)?;
        w.put_chunks(0, i * per_mib, &block)?;
    }
    file.flush()?;
    Ok(w.commit(CommitInfo {
        vm_state: None,
        domain_xml: "<domain/>".into(),
        mode: BackupMode::Full,
        consistency: Consistency::Crash,
        finished: 1_700_000_001,
    })?)
}

/// Best rates (MB/s) of `nbdcopy URI null:` for each of `uris`: one warm-up each, then RUNS
/// rounds that take the readers in turn, so a burst of load elsewhere on the machine hits
/// both sides alike.
fn nbdcopy_rates(uris: &[String]) -> Result<Vec<f64>> {
    for uri in uris {
        peers::run("nbdcopy", &[uri, "null:"])?;
    }
    let mut best = vec![0f64; uris.len()];
    for _ in 0..RUNS {
        for (uri, best) in uris.iter().zip(best.iter_mut()) {
            let t = Instant::now();
            peers::run("nbdcopy", &[uri, "null:"])?;
            *best = best.max(size() as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
    }
    Ok(best)
}

fn main() -> Result<()> {
    for tool in ["nbdcopy", "qemu-nbd", "qemu-img"] {
        peers::require(tool)?;
    }
    let dir = tempfile::tempdir()?;
    let backend = Arc::new(FsBackend::open(dir.path().join("repo"))?);
    let opts = RepoOptions::new(dir.path().join("catalog.db"));
    let repo = Repository::create(backend, RepoConfig::default(), opts)?;
    let raw = dir.path().join("content.raw");
    let t = Instant::now();
    let m = make(&repo, &raw)?;
    println!(
        "content: {} MiB backed up in {:.1}s",
        size() / MIB,
        t.elapsed().as_secs_f64()
    );
    let qcow2 = dir.path().join("content.qcow2");
    peers::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap_or(""),
            qcow2.to_str().unwrap_or(""),
        ],
    )?;
    std::fs::remove_file(&raw)?;

    let name = ExportName::new("bench", "vda", &m.id)?;
    let server = Server::new(ServerOptions::default());
    let export = Arc::new(RepoExport::open_blocking(
        &repo,
        &name,
        &ExportOptions::default(),
    )?);
    server.add_export(name.to_string(), export);
    let ours = ServerThread::start(server, &dir.path().join("ours.sock"))?;
    let peer = peers::qemu_nbd(
        &qcow2,
        "qcow2",
        "bench",
        None,
        &[],
        &dir.path().join("qemu.sock"),
    )?;

    let rates = nbdcopy_rates(&[ours.uri(&name.to_string()), peer.uri("bench")])?;
    let (ours_rate, qemu_rate) = (rates[0], rates[1]);
    println!("nbdcopy from our export:        {ours_rate:8.0} MB/s");
    println!("nbdcopy from qemu-nbd (qcow2):  {qemu_rate:8.0} MB/s");
    println!(
        "ratio ours/qemu-nbd: {:.2} (goal >= 0.80)",
        ours_rate / qemu_rate
    );
    drop(peer);
    drop(ours);

    let reader = repo.open_disk(&m.id, "vda")?;
    let mut best = 0f64;
    let mut data = 0;
    for run in 0..RUNS {
        let out = dir.path().join(format!("restored-{run}.raw"));
        let rep = restore_to_file(&reader, &out, ImageFormat::Raw)?;
        std::fs::remove_file(&out)?;
        data = rep.data_bytes;
        best = best.max(size() as f64 / rep.seconds / 1e6);
    }
    if data == 0 {
        bail!("restore wrote no data");
    }
    println!(
        "restore to raw: {best:.0} MB/s of disk ({:.0} MB/s of data; {} of {} MiB are data)",
        best * data as f64 / size() as f64,
        data / MIB,
        size() / MIB
    );
    Ok(())
}
