//! `make bench`: full and incremental backup throughput of a 4 GiB disk holding 1.5 GiB of
//! mixed data (text-like, zeros, random), through libvirt pull mode, with the machine's own
//! ceilings measured in the same run: blake3 and zstd-1 on one core, and `nbdcopy` reading
//! the same image from `qemu-nbd`. Prints figures and ratios; never fails on a slow machine.
//!
//! The VM sits in SeaBIOS (no OS): that is "running", which is all a pull-mode backup needs,
//! and it lets the disk be filled offline at host speed. Changes for the incremental are
//! written through the device's own block backend (`qemu-io` in the monitor).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use catalog::{FsBackend, RepoConfig, RepoOptions, Repository};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::job::{run_backup, BackupOptions, BackupReport, Progress};
use testbed::{ensure_libvirt, teardown_domain, virsh, ScratchDir};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const DISK: u64 = 4 * GIB;

fn main() -> Result<()> {
    ensure_libvirt()?;
    let name = format!(
        "{}bench-backup-{}",
        testbed::NAME_PREFIX,
        std::process::id()
    );
    let dir = ScratchDir::create(&name)?;
    let raw = dir.path().join("mixed.raw");
    let image = dir.path().join("vda.qcow2");
    let t = Instant::now();
    let data = fill_mixed(&raw)?;
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&image),
        ],
    )?;
    std::fs::remove_file(&raw)?;
    println!(
        "disk: 4 GiB qcow2, 1.5 GiB of mixed runs (text-like, random, zeros left as holes): {:.2} GiB written, made in {:.1} s",
        data as f64 / GIB as f64,
        t.elapsed().as_secs_f64()
    );
    ceilings(&image)?;
    let _vm = Domain::start(&name, &image, dir.path())?;
    let repo_dir = tempfile::tempdir()?;
    let repo = Repository::create(
        Arc::new(FsBackend::open(repo_dir.path().join("repo"))?),
        RepoConfig::default(),
        RepoOptions::new(repo_dir.path().join("catalog.db")),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let hv = rt.block_on(LibvirtHypervisor::connect("qemu:///system"))?;
    let opts = BackupOptions::new(dir.path().join("work"));
    let full = timed(&rt, &hv, &repo, &name, &opts, "full backup")?;
    // 1 % of the disk changed in scattered 64 KiB writes (one per 6.4 MiB, not aligned to
    // the bitmap granularity, so most touch two 64 KiB granules).
    let t = Instant::now();
    let writes = (DISK / 100) / (64 * 1024);
    for i in 0..writes {
        let off = i * (DISK / writes);
        monitor_write(&name, off, 64 * 1024, (i % 250) as u8 + 1)?;
    }
    println!(
        "guest device: {writes} scattered 64 KiB writes in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let incr = timed(&rt, &hv, &repo, &name, &opts, "incremental")?;
    println!(
        "incremental read {:.2}× the dirty bytes; stored {} MiB for {} MiB changed",
        incr.bytes_read as f64 / incr.bytes_dirty.max(1) as f64,
        incr.manifest.stats.bytes_stored / MIB,
        incr.bytes_dirty / MIB
    );
    let _ = full;
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program} (install it with `make deps`)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes 1.5 GiB of mixed data into a sparse 4 GiB raw file; returns the data bytes.
fn fill_mixed(path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path)?;
    f.set_len(DISK)?;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut block = vec![0u8; 4 * MIB as usize];
    let blocks = (3 * GIB / 2) / block.len() as u64;
    for i in 0..blocks {
        match i % 3 {
            0 => text_like(&mut block, i),
            1 => random(&mut block, &mut state),
            _ => block.fill(0),
        }
        // Spread the data over the disk: 1.5 GiB in 4 MiB runs, one in every ~10.7 MiB.
        f.seek(SeekFrom::Start(i * (DISK / blocks)))?;
        if i % 3 != 2 {
            f.write_all(&block)?;
        }
    }
    f.sync_all()?;
    Ok(blocks.div_ceil(3) * 2 * block.len() as u64)
}

fn text_like(buf: &mut [u8], seed: u64) {
    const WORDS: &[&str] = &[
        "backup ",
        "sluice ",
        "chunk ",
        "qemu ",
        "libvirt\n",
        "index ",
        "dirty ",
    ];
    let mut i = 0;
    let mut k = seed as usize;
    while i < buf.len() {
        let w = WORDS[k % WORDS.len()].as_bytes();
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        k = k.wrapping_mul(31).wrapping_add(7);
    }
}

fn random(buf: &mut [u8], state: &mut u64) {
    for c in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..c.len()]);
    }
}

/// The machine's own ceilings, measured now.
fn ceilings(image: &Path) -> Result<()> {
    let mut buf = vec![0u8; 256 * MIB as usize];
    text_like(&mut buf[..128 * MIB as usize], 3);
    let mut st = 42;
    random(&mut buf[128 * MIB as usize..], &mut st);
    let t = Instant::now();
    for c in buf.chunks(64 * 1024) {
        std::hint::black_box(blake3::hash(c));
    }
    let b3 = buf.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    for c in buf.chunks(64 * 1024) {
        std::hint::black_box(zstd::bulk::compress(c, 1)?);
    }
    let zs = buf.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("ceiling: blake3 one core {b3:.2} GB/s; zstd-1 one core {zs:.2} GB/s (half text, half random)");
    let sock = image.with_extension("sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-k", s(&sock), s(image)])
        .spawn()
        .context("qemu-nbd (make deps)")?;
    let start = Instant::now();
    while !sock.exists() && start.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let t = Instant::now();
    let r = run(
        "nbdcopy",
        &[&format!("nbd+unix:///?socket={}", s(&sock)), "null:"],
    );
    let secs = t.elapsed().as_secs_f64();
    let _ = nbd.kill();
    let _ = nbd.wait();
    r?;
    println!(
        "ceiling: nbdcopy of the whole image from qemu-nbd (skips holes): {:.2} s, {:.2} GB/s of disk",
        secs,
        DISK as f64 / secs / 1e9
    );
    Ok(())
}

fn timed(
    rt: &tokio::runtime::Runtime,
    hv: &LibvirtHypervisor,
    repo: &Repository,
    vm: &str,
    opts: &BackupOptions,
    what: &str,
) -> Result<BackupReport> {
    let t = Instant::now();
    let r = rt.block_on(run_backup(
        hv,
        repo,
        vm,
        opts,
        Arc::new(Progress::default()),
        CancellationToken::new(),
    ))?;
    let secs = t.elapsed().as_secs_f64();
    let st = &r.manifest.stats;
    println!(
        "{what}: {secs:.2} s; read {:.0} MiB ({:.2} GB/s); disk {:.2} GB/s logical; stored {:.0} MiB ({} new, {} dedup, {} zero chunks)",
        r.bytes_read as f64 / MIB as f64,
        r.bytes_read as f64 / secs / 1e9,
        DISK as f64 / secs / 1e9,
        st.bytes_stored as f64 / MIB as f64,
        st.chunks_new,
        st.chunks_dedup,
        st.chunks_zero
    );
    Ok(r)
}

fn monitor_write(vm: &str, off: u64, len: u64, byte: u8) -> Result<()> {
    let cmd = format!(
        "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P {byte} {off} {len}\""
    );
    let out = virsh(&["qemu-monitor-command", vm, "--hmp", &cmd])?;
    if out.to_lowercase().contains("error") {
        bail!("monitor write at {off}: {out}");
    }
    Ok(())
}

/// A TCG domain sitting in SeaBIOS with one qcow2 disk; torn down on drop.
struct Domain {
    name: String,
}

impl Domain {
    fn start(name: &str, image: &Path, dir: &Path) -> Result<Domain> {
        teardown_domain(name);
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            image.display()
        );
        let path: PathBuf = dir.join("domain.xml");
        std::fs::write(&path, xml)?;
        virsh(&["define", s(&path)])?;
        let d = Domain {
            name: name.to_string(),
        };
        virsh(&["start", name])?;
        Ok(d)
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        teardown_domain(&self.name);
    }
}
