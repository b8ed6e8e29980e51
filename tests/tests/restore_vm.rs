//! Restore points of a real libvirt guest: a full backup of what the guest wrote, served as
//! a `VM/DISK@BACKUP` export, maps (`nbdinfo --map`) and compares (`qemu-img compare`) exactly
//! like the guest's disk at backup time; after more guest writes and an incremental, the
//! `sluice:changed-since:FULL` context lists exactly the chunks the guest changed.

use std::sync::Arc;

use anyhow::{ensure, Result};
use catalog::{FsBackend, Manifest, RepoConfig, RepoOptions, Repository};
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::job::{run_backup, BackupOptions, Progress};
use proxy::nbd::{Server, ServerOptions};
use proxy::restore::{changed_since_context, ExportName, ExportOptions, RepoExport};
use testbed::peers::{require, run, ServerThread};
use testbed::{pattern, TestVm, VmSpec};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

struct Bed {
    vm: TestVm,
    repo: Repository,
    dir: tempfile::TempDir,
    hv: LibvirtHypervisor,
    rt: tokio::runtime::Runtime,
    model: Vec<u8>,
}

impl Bed {
    fn new() -> Result<Bed> {
        for tool in ["nbdinfo", "qemu-img"] {
            require(tool)?;
        }
        let vm = TestVm::boot(VmSpec::new("rs-vm").disk(32 * MIB))?;
        let dir = tempfile::tempdir()?;
        let backend = Arc::new(FsBackend::open(dir.path().join("repo"))?);
        let opts = RepoOptions::new(dir.path().join("catalog.db"));
        let repo = Repository::create(backend, RepoConfig::default(), opts)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let hv = rt.block_on(LibvirtHypervisor::connect("qemu:///system"))?;
        let model = vec![0u8; 32 * MIB as usize];
        Ok(Bed {
            vm,
            repo,
            dir,
            hv,
            rt,
            model,
        })
    }

    fn write(&mut self, offset: u64, len: u64, seed: u64) -> Result<()> {
        self.vm.write_pattern("vda", offset, len, seed)?;
        self.model[offset as usize..(offset + len) as usize].copy_from_slice(&pattern(
            seed,
            offset,
            len as usize,
        ));
        Ok(())
    }

    fn backup(&self) -> Result<Manifest> {
        self.vm.sync()?;
        let opts = BackupOptions::new(self.vm.scratch().join("work"));
        let r = self.rt.block_on(run_backup(
            &self.hv,
            &self.repo,
            self.vm.name(),
            &opts,
            Arc::new(Progress::default()),
            CancellationToken::new(),
        ))?;
        Ok(r.manifest)
    }
}

fn map(uri: &str, context: &str) -> Result<Vec<u64>> {
    let want_flags = if context == "base:allocation" { 0 } else { 1 };
    let out = run("nbdinfo", &[&format!("--map={context}"), uri])?;
    let mut chunks = Vec::new();
    for l in out.lines() {
        let v: Vec<&str> = l.split_whitespace().collect();
        ensure!(v.len() >= 3, "nbdinfo line {l:?}");
        let (o, n, f): (u64, u64, u32) = (v[0].parse()?, v[1].parse()?, v[2].parse()?);
        if f == want_flags {
            chunks.extend((o / CS)..(o + n).div_ceil(CS));
        }
    }
    Ok(chunks)
}

#[test]
fn guest_backup_exports_exactly_and_diff_lists_the_guest_changes() -> Result<()> {
    let mut bed = Bed::new()?;
    bed.write(0, 2 * MIB, 1)?;
    bed.write(10 * MIB + 4096, 8192, 2)?;
    bed.write(31 * MIB, MIB, 3)?;
    let full = bed.backup()?;

    let server = Server::new(ServerOptions::default());
    let thread = ServerThread::start(server.clone(), &bed.dir.path().join("nbd.sock"))?;
    let name = ExportName::new(bed.vm.name(), "vda", &full.id)?;
    let export = RepoExport::open_blocking(&bed.repo, &name, &ExportOptions::default())?;
    server.add_export(name.to_string(), Arc::new(export));
    let uri = thread.uri(&name.to_string());

    let data: Vec<u64> = bed
        .model
        .chunks(CS as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect();
    ensure!(
        map(&uri, "base:allocation")? == data,
        "data extents of {name}"
    );
    let expected = bed.dir.path().join("expected.raw");
    std::fs::write(&expected, &bed.model)?;
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            expected.to_str().unwrap(),
            &uri,
        ],
    )?;

    // The guest changes chunks 5, 160 (two writes) and 300..302.
    bed.write(5 * CS + 512, 4096, 4)?;
    bed.write(160 * CS, 512, 5)?;
    bed.write(160 * CS + 60 * 1024, 512, 6)?;
    bed.write(300 * CS + 1024, 2 * CS, 7)?;
    let inc = bed.backup()?;
    let name2 = ExportName::new(bed.vm.name(), "vda", &inc.id)?;
    let opts = ExportOptions {
        changed_since: vec![full.id.clone()],
        ..Default::default()
    };
    let export2 = RepoExport::open_blocking(&bed.repo, &name2, &opts)?;
    server.add_export(name2.to_string(), Arc::new(export2));
    let uri2 = thread.uri(&name2.to_string());
    let changed = map(&uri2, &changed_since_context(&full.id))?;
    ensure!(
        changed == vec![5, 160, 300, 301, 302],
        "changed chunks {changed:?}"
    );
    std::fs::write(&expected, &bed.model)?;
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            expected.to_str().unwrap(),
            &uri2,
        ],
    )?;
    Ok(())
}
