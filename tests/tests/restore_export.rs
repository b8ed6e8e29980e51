//! Restore points served by our NBD server as `VM/DISK@BACKUP` exports, read by real clients:
//! `nbdinfo --map` shows exactly the data and hole chunks, `qemu-img compare` and `nbdcopy`
//! agree with the backed-up bytes, the `sluice:changed-since:BACKUP` context lists exactly
//! the changed chunks, a writable export takes `qemu-io` writes without touching the
//! repository, a corrupt chunk fails only its range with EIO, and restores to raw and qcow2
//! equal the original with holes unallocated.
//!
//! Backups are built directly with catalog's `BackupWriter` from known bytes (fast); the real
//! VM path is in `restore_vm.rs`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use catalog::{
    BackupMode, BackupSpec, CommitInfo, Consistency, DiskSpec, Manifest, Repository, VerifyMode,
    VmIdentity,
};
use proxy::nbd::{Server, ServerOptions};
use proxy::restore::{
    changed_since_context, restore_disk, ExportName, ExportOptions, ImageFormat, RepoExport,
};
use testbed::inspect::{chunks_with, compare_images, data_chunks, nbd_map};
use testbed::peers::{require, run, ServerThread};
use testbed::{pattern, TempRepo};

const CS: u64 = 64 << 10;
const SIZE: u64 = 16 << 20;
const VM: &str = "vm-restore";

/// Data chunks: [0, 8) full, 20 (one 4 KiB run), [100, 103) and the last chunk; holes elsewhere.
fn original() -> Vec<u8> {
    let mut d = vec![0u8; SIZE as usize];
    let mut put = |off: u64, len: u64, seed: u64| {
        d[off as usize..(off + len) as usize].copy_from_slice(&pattern(seed, off, len as usize));
    };
    put(0, 8 * CS, 1);
    put(20 * CS + 4096, 4096, 2);
    put(100 * CS, 3 * CS, 3);
    put(SIZE - 512, 512, 4);
    d
}

struct Fixture {
    repo: TempRepo,
    full: Manifest,
    data: Vec<u8>,
    server: Arc<Server>,
    thread: ServerThread,
}

fn write_backup(
    repo: &Repository,
    data: &[u8],
    parent: Option<&Manifest>,
    changed: Option<&[u64]>,
    t: i64,
) -> Result<Manifest> {
    let spec = BackupSpec {
        vm: VmIdentity {
            name: VM.to_string(),
            uuid: "5e1c0000-0000-4000-8000-000000000001".to_string(),
        },
        disks: vec![DiskSpec {
            full_read: None,
            target: "vda".to_string(),
            size: data.len() as u64,
            checkpoint: None,
        }],
        parent: parent.map(|p| p.id.clone()),
        started: t,
    };
    let w = repo.begin_backup(spec)?;
    match changed {
        None => w.put_chunks(0, 0, data)?,
        Some(list) => {
            for &c in list {
                let s = (c * CS) as usize;
                w.put_chunk(0, c, &data[s..s + CS as usize])?;
            }
        }
    }
    let mode = if changed.is_some() {
        BackupMode::Incremental
    } else {
        BackupMode::Full
    };
    Ok(w.commit(CommitInfo {
        vm_state: None,
        domain_xml: "<domain/>".to_string(),
        mode,
        consistency: Consistency::Crash,
        finished: t + 1,
    })?)
}

fn start() -> Result<Fixture> {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"] {
        require(tool)?;
    }
    let repo = TempRepo::create()?;
    let data = original();
    let full = write_backup(&repo, &data, None, None, 1_700_000_000)?;
    let server = Server::new(ServerOptions::default());
    let thread = ServerThread::start(server.clone(), &repo.dir().join("nbd.sock"))?;
    Ok(Fixture {
        repo,
        full,
        data,
        server,
        thread,
    })
}

impl Fixture {
    fn name(&self, m: &Manifest) -> ExportName {
        ExportName::new(VM, "vda", &m.id).unwrap()
    }

    /// Open and serve an export; returns its name.
    fn serve(&self, m: &Manifest, opts: ExportOptions) -> Result<(String, Arc<RepoExport>)> {
        let e = Arc::new(RepoExport::open_blocking(&self.repo, &self.name(m), &opts)?);
        let name = e.name().to_string();
        self.server.add_export(name.clone(), e.clone());
        Ok((name, e))
    }

    fn file(&self, name: &str, bytes: &[u8]) -> Result<std::path::PathBuf> {
        let p = self.repo.dir().join(name);
        std::fs::write(&p, bytes)?;
        Ok(p)
    }
}

#[test]
fn export_maps_compares_and_copies_exactly() -> Result<()> {
    let f = start()?;
    let (name, _e) = f.serve(&f.full, ExportOptions::default())?;
    ensure!(name == format!("{VM}/vda@{}", f.full.id), "name {name}");
    let uri = f.thread.uri(&name);

    let extents = nbd_map(&uri, None)?;
    ensure!(
        extents.iter().map(|e| e.1).sum::<u64>() == SIZE,
        "{extents:?}"
    );
    let want_data = data_chunks(&f.data, CS);
    ensure!(
        chunks_with(&extents, 0, CS) == want_data,
        "data extents {extents:?}"
    );
    let holes = chunks_with(&extents, 3, CS);
    ensure!(
        holes.len() as u64 + want_data.len() as u64 == SIZE / CS,
        "hole extents {extents:?}"
    );

    let expected = f.file("expected.raw", &f.data)?;
    compare_images(expected.to_str().unwrap(), "raw", &uri, "raw")?;
    let copy = f.repo.dir().join("copy.raw");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()])?;
    ensure!(std::fs::read(&copy)? == f.data, "nbdcopy output differs");

    let list = run("nbdinfo", &["--list", &f.thread.uri("")])?;
    ensure!(
        list.contains("is_read_only: true") && list.contains("can_multi_conn: true"),
        "{list}"
    );
    Ok(())
}

#[test]
fn changed_since_context_lists_exactly_the_changed_chunks() -> Result<()> {
    let f = start()?;
    let mut d2 = f.data.clone();
    let changed = [3u64, 50, 101, SIZE / CS - 1];
    for &c in &changed {
        let at = (c * CS + 100) as usize;
        d2[at..at + 10].copy_from_slice(&[0xEE; 10]);
    }
    let inc = write_backup(&f.repo, &d2, Some(&f.full), Some(&changed), 1_700_000_100)?;
    let opts = ExportOptions {
        changed_since: vec![f.full.id.clone()],
        ..Default::default()
    };
    let (name, e) = f.serve(&inc, opts)?;
    ensure!(e.changed_chunks(&f.full.id) == Some(changed.to_vec()));
    let ctx = changed_since_context(&f.full.id);
    let extents = nbd_map(&f.thread.uri(&name), Some(&ctx))?;
    ensure!(
        chunks_with(&extents, 1, CS) == changed.to_vec(),
        "{ctx}: {extents:?}"
    );
    ensure!(extents.iter().map(|e| e.1).sum::<u64>() == SIZE);
    // The diff against itself is empty.
    let same = ExportOptions {
        changed_since: vec![inc.id.clone()],
        ..Default::default()
    };
    let e2 = RepoExport::open_blocking(&f.repo, &f.name(&inc), &same)?;
    ensure!(e2.changed_chunks(&inc.id) == Some(vec![]));
    Ok(())
}

#[test]
fn writable_export_takes_qemu_io_writes_and_leaves_the_repository_alone() -> Result<()> {
    let f = start()?;
    let overlays = f.repo.dir().join("overlays");
    std::fs::create_dir(&overlays)?;
    let (name, e) = f.serve(&f.full, ExportOptions::writable(&overlays))?;
    let overlay = e.overlay_path().context("no overlay")?.to_path_buf();
    drop(e);
    let uri = f.thread.uri(&name);
    // Partial blocks over data and over holes, a whole-chunk write, zeroes over data.
    let cmds = [
        "write -P 0xab 1000 5000",
        "write -P 0xcd 1310720 131072",
        "write -z 65536 65536",
        "write -P 0x11 16777000 216",
        "read -P 0xab 1000 5000",
        "read -P 0xcd 1310720 131072",
        "read -P 0 65536 65536",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    let (ok, out) = qemu_io(&args)?;
    ensure!(ok && !out.contains("failed"), "{out}");

    let mut want = f.data.clone();
    want[1000..6000].fill(0xab);
    want[1310720..1310720 + 131072].fill(0xcd);
    want[65536..131072].fill(0);
    want[16777000..].fill(0x11);
    let copy = f.repo.dir().join("written.raw");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()])?;
    ensure!(
        std::fs::read(&copy)? == want,
        "export does not read back its writes"
    );
    let extents = nbd_map(&uri, None)?;
    ensure!(
        chunks_with(&extents, 0, CS).contains(&20) && chunks_with(&extents, 3, CS).contains(&1),
        "{extents:?}"
    );

    // The repository is untouched.
    ensure!(f.repo.verify(VerifyMode::Full, None)?.is_ok());
    let r = f.repo.open_disk(&f.full.id, "vda")?;
    let mut got = vec![0u8; SIZE as usize];
    r.read_at(0, &mut got)?;
    ensure!(got == f.data, "backup changed under a writable export");

    // Closing the export removes its overlay.
    ensure!(overlay.exists());
    f.server.remove_export(&name);
    drop(f.thread);
    std::thread::sleep(std::time::Duration::from_millis(200));
    ensure!(
        !overlay.exists(),
        "overlay {} left behind",
        overlay.display()
    );
    Ok(())
}

#[test]
fn corrupt_chunk_fails_its_range_with_eio_and_the_export_keeps_serving() -> Result<()> {
    let f = start()?;
    let victim = f.repo.open_disk(&f.full.id, "vda")?.digest(5)?;
    let loc = f
        .repo
        .with_catalog(|c| c.lookup(&victim))?
        .context("victim not stored")?;
    let pack = f.repo.files().join(loc.pack.key());
    let mut bytes = std::fs::read(&pack)?;
    bytes[loc.offset as usize + loc.length as usize / 2] ^= 0x40;
    std::fs::write(&pack, bytes)?;

    let (name, _e) = f.serve(&f.full, ExportOptions::default())?;
    let uri = f.thread.uri(&name);
    let (_, out) = qemu_io(&[
        "-r",
        "-f",
        "raw",
        "-c",
        "read 327680 4096",
        "-c",
        "read -P 0 1048576 65536",
        "-c",
        "read 0 65536",
        &uri,
    ])?;
    ensure!(
        out.contains("Input/output error"),
        "corrupt read did not fail with EIO:\n{out}"
    );
    ensure!(
        out.matches("read 65536/65536").count() == 2,
        "other ranges did not read:\n{out}"
    );
    // A whole-disk copy fails rather than producing wrong data.
    let bad = f.repo.dir().join("bad.raw");
    let st = std::process::Command::new("nbdcopy")
        .args([&uri, bad.to_str().unwrap()])
        .output()?;
    ensure!(
        !st.status.success(),
        "nbdcopy of a corrupt export succeeded"
    );
    Ok(())
}

/// Run `qemu-io`: (exit success, stdout and stderr).
fn qemu_io(args: &[&str]) -> Result<(bool, String)> {
    let out = std::process::Command::new("qemu-io").args(args).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn allocated_chunks(path: &Path, fmt: &str) -> Result<Vec<u64>> {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", fmt, path.to_str().unwrap()],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut chunks: Vec<u64> = v
        .as_array()
        .context("qemu-img map output")?
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .flat_map(|e| {
            let (s, l) = (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            );
            (s / CS)..(s + l).div_ceil(CS)
        })
        .collect();
    chunks.dedup();
    Ok(chunks)
}

#[test]
fn restore_to_raw_and_qcow2_equals_the_original_with_holes_unallocated() -> Result<()> {
    let f = start()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let expected = f.file("expected.raw", &f.data)?;
    for (fmt, format) in [("raw", ImageFormat::Raw), ("qcow2", ImageFormat::Qcow2)] {
        let out = f.repo.dir().join(format!("restored.{fmt}"));
        let rep = rt.block_on(restore_disk(&f.repo, &f.name(&f.full), out.clone(), format))?;
        ensure!(
            rep.size == SIZE && rep.data_bytes == data_chunks(&f.data, CS).len() as u64 * CS,
            "{rep:?}"
        );
        compare_images(
            out.to_str().unwrap(),
            fmt,
            expected.to_str().unwrap(),
            "raw",
        )?;
        let alloc = allocated_chunks(&out, fmt)?;
        ensure!(
            alloc == data_chunks(&f.data, CS),
            "{fmt}: allocated chunks {alloc:?}"
        );
        // Never clobbers.
        let again = rt.block_on(restore_disk(&f.repo, &f.name(&f.full), out.clone(), format));
        ensure!(again.is_err(), "{fmt}: restore overwrote an existing file");
    }
    Ok(())
}

#[test]
fn bad_names_and_foreign_backups_are_refused() -> Result<()> {
    let f = start()?;
    let wrong_vm = ExportName::new("other-vm", "vda", &f.full.id)?;
    ensure!(RepoExport::open_blocking(&f.repo, &wrong_vm, &ExportOptions::default()).is_err());
    let wrong_disk = ExportName::new(VM, "vdz", &f.full.id)?;
    ensure!(RepoExport::open_blocking(&f.repo, &wrong_disk, &ExportOptions::default()).is_err());
    ensure!(ExportName::parse("vm/../vda@x").is_err());
    Ok(())
}
