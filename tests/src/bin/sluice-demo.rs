//! `make demo`: the main job end to end on embedded defaults. Boots a throwaway VM under
//! libvirt with two disks, has the guest write known data, takes a full backup into a local
//! repository (SQLite catalog beside it), lets the guest change a little, takes an
//! incremental, prints what each backup read from the hypervisor and stored, and checks that
//! both backups restore byte for byte to what the guest had written at their point in time.
//! Then it serves the latest backup as an NBD export that `nbdinfo` reads, restores it to a
//! qcow2 file and compares that with `qemu-img compare`. Everything it made is torn down at
//! the end.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use catalog::{FsBackend, RepoConfig, RepoOptions, Repository};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::job::{run_backup, BackupOptions, BackupReport, Progress};
use proxy::nbd::{Server, ServerOptions};
use proxy::restore::{restore_disk, ExportName, ExportOptions, ImageFormat, RepoExport};
use testbed::{pattern, TestVm, VmSpec};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// (disk, offset, length, seed) of each write before the full backup.
const FIRST: &[(&str, u64, u64, u64)] = &[
    ("vda", 0, 8 * MIB, 1),
    ("vda", 40 * MIB, 4 * MIB, 2),
    ("vdb", 4 * MIB, 2 * MIB, 3),
];
/// Writes between the full and the incremental: scattered and small.
const SECOND: &[(&str, u64, u64, u64)] = &[
    ("vda", 4 * KIB, 4 * KIB, 11),
    ("vda", 41 * MIB, 128 * KIB, 12),
    ("vdb", 60 * MIB, 64 * KIB, 13),
];

fn main() -> Result<()> {
    let start = Instant::now();
    println!("sluice demo: agentless changed-block backup of a libvirt VM (QEMU TCG)");
    let vm = TestVm::boot(VmSpec::new("demo").disk(64 * MIB).disk(64 * MIB))?;
    println!(
        "booted domain {} in {:.1} s",
        vm.name(),
        start.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let backend = Arc::new(FsBackend::open(dir.path().join("repo"))?);
    let repo = Repository::create(
        backend,
        RepoConfig::default(),
        RepoOptions::new(dir.path().join("catalog.db")),
    )?;
    println!(
        "repository {} (chunk size {} KiB, zstd level {})",
        dir.path().join("repo").display(),
        repo.config().chunk_size / 1024,
        repo.config().zstd_level
    );
    let rt = tokio::runtime::Runtime::new()?;
    let hv = rt.block_on(LibvirtHypervisor::connect("qemu:///system"))?;
    let opts = BackupOptions::new(vm.scratch().join("work"));

    let mut model = Model::new(&vm);
    model.apply(&vm, FIRST)?;
    let full = backup(&rt, &hv, &repo, &vm, &opts, "full")?;
    let after_full = model.clone();
    model.apply(&vm, SECOND)?;
    let incr = backup(&rt, &hv, &repo, &vm, &opts, "incremental")?;

    println!("restoring each backup through the repository and comparing with the guest's data:");
    check(&repo, &full, &after_full)?;
    check(&repo, &incr, &model)?;
    export_and_restore(&rt, &repo, &vm, &incr, &model, dir.path())?;
    let name = vm.name().to_string();
    drop(vm);
    println!("tore down {name} (domain, checkpoints, files) and the demo repository");
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn backup(
    rt: &tokio::runtime::Runtime,
    hv: &LibvirtHypervisor,
    repo: &Repository,
    vm: &TestVm,
    opts: &BackupOptions,
    what: &str,
) -> Result<BackupReport> {
    vm.sync()?;
    let t = Instant::now();
    let progress = Arc::new(Progress::default());
    let r = rt.block_on(run_backup(
        hv,
        repo,
        vm.name(),
        opts,
        progress,
        CancellationToken::new(),
    ))?;
    let s = &r.manifest.stats;
    println!(
        "{what} backup {} ({:?}, {:?}) in {:.2} s:",
        r.manifest.id,
        r.manifest.mode,
        r.manifest.consistency,
        t.elapsed().as_secs_f64()
    );
    let disk_total: u64 = r.manifest.disks.iter().map(|d| d.size).sum();
    println!(
        "  disks {} MiB; changed {} KiB; read from hypervisor {} KiB",
        disk_total / MIB,
        r.bytes_dirty / KIB,
        r.bytes_read / KIB
    );
    println!(
        "  chunks: {} new ({} KiB raw, {} KiB stored), {} deduplicated, {} zero; metadata {} B",
        s.chunks_new,
        s.bytes_new_raw / KIB,
        s.bytes_stored / KIB,
        s.chunks_dedup,
        s.chunks_zero,
        s.metadata_bytes
    );
    Ok(r)
}

fn check(repo: &Repository, r: &BackupReport, model: &Model) -> Result<()> {
    for (target, want) in &model.disks {
        let reader = repo.open_disk(&r.manifest.id, target)?;
        let mut got = vec![0u8; want.len()];
        reader.read_at(0, &mut got)?;
        let ok = &got == want;
        println!(
            "  backup {} disk {target}: {}",
            r.manifest.id,
            if ok {
                "byte-for-byte equal"
            } else {
                "DIFFERENT"
            }
        );
        ensure!(ok, "backup {} disk {target} differs", r.manifest.id);
    }
    Ok(())
}

/// The guest's disks as the host expects them.
#[derive(Clone)]
struct Model {
    disks: Vec<(String, Vec<u8>)>,
}

impl Model {
    fn new(vm: &TestVm) -> Model {
        let disks = vm
            .disks()
            .iter()
            .map(|d| (d.target.clone(), vec![0u8; d.size as usize]))
            .collect();
        Model { disks }
    }

    fn apply(&mut self, vm: &TestVm, writes: &[(&str, u64, u64, u64)]) -> Result<()> {
        println!("guest writes:");
        for &(disk, off, len, seed) in writes {
            vm.write_pattern(disk, off, len, seed)?;
            println!("  {disk} offset {off:>9} length {len:>8} seed {seed}");
            if let Some((_, d)) = self.disks.iter_mut().find(|(t, _)| t == disk) {
                d[off as usize..(off + len) as usize].copy_from_slice(&pattern(
                    seed,
                    off,
                    len as usize,
                ));
            }
        }
        Ok(())
    }
}

/// Serves the backup's `vda` over NBD, shows `nbdinfo` reading it, restores it to qcow2 and
/// compares the file with what the guest wrote.
fn export_and_restore(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    vm: &TestVm,
    r: &BackupReport,
    model: &Model,
    dir: &std::path::Path,
) -> Result<()> {
    let name = ExportName::new(vm.name(), "vda", &r.manifest.id)?;
    let export = rt.block_on(RepoExport::open(repo, &name, ExportOptions::default()))?;
    let server = Server::new(ServerOptions::default());
    server.add_export(name.to_string(), export);
    let sock = dir.join("nbd.sock");
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&sock)?
    };
    let serving = rt.spawn(server.clone().serve_unix(listener));
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    println!(
        "serving backup {} disk vda as NBD export {name}",
        r.manifest.id
    );
    let out = tool("nbdinfo", &["--map", &uri])?;
    println!("nbdinfo --map (data runs and holes, from the backup's index):");
    for line in out.lines().take(8) {
        println!("  {line}");
    }
    let restored = dir.join("vda-restored.qcow2");
    let report = rt.block_on(restore_disk(
        repo,
        &name,
        restored.clone(),
        ImageFormat::Qcow2,
    ))?;
    println!(
        "restored to {} ({} MiB disk, {} KiB of data) in {:.2} s",
        restored.display(),
        report.size / MIB,
        report.data_bytes / KIB,
        report.seconds
    );
    let raw = dir.join("vda-expected.raw");
    let (_, want) = model.disks.iter().find(|(t, _)| t == "vda").expect("vda");
    std::fs::write(&raw, want)?;
    let cmp = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&restored)],
    )?;
    println!("qemu-img compare with the guest's data: {}", cmp.trim());
    serving.abort();
    Ok(())
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn tool(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program).args(args).output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
