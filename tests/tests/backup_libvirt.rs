//! Changed-block backup of a real libvirt guest: a full and incrementals in a row, each
//! restored (read back through the repository) and compared byte for byte with what the
//! guest wrote up to that backup's point in time; writes made during a backup land in the
//! next one; reads stay within 1.1 × the dirty bytes; a cancelled backup never advances the
//! chain; broken change tracking falls back to a full read with the reason recorded.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use catalog::{BackupMode, RepoConfig};
use testbed::{pattern, Bed, Model, TestVm, VmSpec};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn rounded_to(granularity: u64, writes: &[(u64, u64)]) -> u64 {
    let mut chunks: Vec<u64> = writes
        .iter()
        .flat_map(|&(o, l)| (o / granularity)..(o + l).div_ceil(granularity))
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks.len() as u64 * granularity
}

#[test]
fn full_and_three_incrementals_restore_exactly() -> Result<()> {
    let bed = Bed::boot("bk-chain", &[48 * MIB, 24 * MIB])?;
    let vm = &bed.vm;
    let mut model = Model::new(vm);
    model.write(vm, "vda", 0, 4 * MIB, 1)?;
    model.write(vm, "vda", 20 * MIB, 3 * MIB + 512, 2)?;
    model.write(vm, "vdb", 5 * MIB, MIB, 3)?;

    let full = bed.backup()?;
    assert_eq!(full.manifest.mode, BackupMode::Full);
    bed.check(&full.manifest, &model)?;
    // A full reads only what base:allocation calls data (the rest of 72 MiB is holes).
    assert!(
        full.bytes_read <= 10 * MIB,
        "full read {} bytes",
        full.bytes_read
    );
    let mut history = vec![(full.manifest.clone(), model.clone())];

    for round in 1..=3u64 {
        let writes: Vec<(&str, u64, u64)> = vec![
            ("vda", round * 3 * MIB + 4 * KIB, 4 * KIB),
            ("vda", 30 * MIB + round * 128 * KIB, 200 * KIB),
            ("vdb", round * MIB + 512, 1024),
        ];
        for (i, &(d, o, l)) in writes.iter().enumerate() {
            model.write(vm, d, o, l, 100 * round + i as u64)?;
        }
        let r = bed.backup()?;
        assert_eq!(r.manifest.mode, BackupMode::Incremental, "round {round}");
        bed.check(&r.manifest, &model)?;
        let per_disk = |disk: &str| -> Vec<(u64, u64)> {
            writes
                .iter()
                .filter(|w| w.0 == disk)
                .map(|w| (w.1, w.2))
                .collect()
        };
        let dirty = rounded_to(64 * KIB, &per_disk("vda")) + rounded_to(64 * KIB, &per_disk("vdb"));
        assert_eq!(
            r.bytes_dirty, dirty,
            "round {round}: dirty bytes the bitmaps reported"
        );
        assert!(
            r.bytes_read as f64 <= 1.1 * r.bytes_dirty as f64,
            "round {round}: read {} for {} dirty",
            r.bytes_read,
            r.bytes_dirty
        );
        history.push((r.manifest.clone(), model.clone()));
    }
    // Every backup still restores on its own to its own point in time.
    for (m, snapshot) in &history {
        bed.check(m, snapshot)?;
    }
    // Only the newest checkpoint is kept on the hypervisor.
    let cps = bed.checkpoints()?;
    assert_eq!(cps.len(), 1, "checkpoints left: {cps:?}");
    assert_eq!(
        Some(&cps[0]),
        history.last().unwrap().0.disks[0].checkpoint.as_ref()
    );
    Ok(())
}

#[test]
fn writes_during_a_backup_land_in_the_next_one() -> Result<()> {
    let bed = Bed::boot("bk-during", &[16 * MIB])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, MIB, 7)?;
    let before = model.clone();
    let mut opts = bed.options();
    let hook_vm = vm.clone();
    opts.after_point_in_time = Some(Arc::new(move || {
        let vm = hook_vm.clone();
        Box::pin(async move {
            let w = tokio::task::spawn_blocking(move || {
                vm.write_pattern("vda", 8 * MIB, 256 * KIB, 8)?;
                vm.sync()
            });
            w.await
                .expect("write task")
                .expect("guest write during backup");
        })
    }));
    let first = bed.backup_with(&opts, CancellationToken::new())?;
    bed.check(&first.manifest, &before)?;
    model.put("vda", 8 * MIB, 256 * KIB, 8)?;
    let second = bed.backup()?;
    assert_eq!(second.manifest.mode, BackupMode::Incremental);
    assert_eq!(second.bytes_dirty, 256 * KIB);
    bed.check(&second.manifest, &model)?;
    Ok(())
}

#[test]
fn cancelled_backup_leaves_no_trace_and_the_next_covers_everything() -> Result<()> {
    let bed = Bed::boot("bk-cancel", &[16 * MIB])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, 2 * MIB, 1)?;
    let full = bed.backup()?;
    bed.check(&full.manifest, &model)?;

    model.write(&vm, "vda", 4 * MIB, 128 * KIB, 2)?;
    let cancel = CancellationToken::new();
    let mut opts = bed.options();
    let c = cancel.clone();
    opts.after_point_in_time = Some(Arc::new(move || {
        c.cancel();
        Box::pin(async {})
    }));
    let err = bed.backup_with(&opts, cancel).unwrap_err();
    let job_err = err
        .downcast_ref::<proxy::job::Error>()
        .context("a job error")?;
    assert_eq!(job_err.kind(), proxy::job::ErrorKind::Cancelled, "{err:#}");
    assert_eq!(bed.repo.backups(None)?.len(), 1, "nothing committed");
    let jobs = vm.virsh(&["domjobinfo", vm.name()])?;
    assert!(jobs.contains("None"), "a libvirt job is left: {jobs}");
    assert_eq!(
        bed.checkpoints()?,
        vec![full.manifest.disks[0].checkpoint.clone().unwrap()]
    );
    let leftovers: Vec<_> = std::fs::read_dir(vm.scratch().join("work"))?.collect();
    assert!(leftovers.is_empty(), "job files left: {leftovers:?}");

    model.write(&vm, "vda", 9 * MIB, 64 * KIB, 3)?;
    let next = bed.backup()?;
    assert_eq!(next.manifest.mode, BackupMode::Incremental);
    assert_eq!(
        next.bytes_dirty,
        192 * KIB,
        "changes of the cancelled backup are covered"
    );
    bed.check(&next.manifest, &model)?;
    Ok(())
}

#[test]
fn broken_change_tracking_falls_back_to_a_full_read_with_the_reason() -> Result<()> {
    let bed = Bed::boot("bk-heal", &[16 * MIB])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, MIB, 1)?;
    let full = bed.backup()?;
    bed.check(&full.manifest, &model)?;

    // The checkpoint disappears (e.g. deleted by an operator).
    let cp = full.manifest.disks[0].checkpoint.clone().unwrap();
    vm.virsh(&["checkpoint-delete", vm.name(), &cp])?;
    model.write(&vm, "vda", 2 * MIB, 64 * KIB, 2)?;
    let r = bed.backup()?;
    match &r.manifest.mode {
        BackupMode::FullBecause(reason) => assert!(reason.contains(&cp), "{reason}"),
        m => panic!("expected a full read after a deleted checkpoint, got {m:?}"),
    }
    bed.check(&r.manifest, &model)?;
    // Only new data was stored: the full read deduplicated against the first backup.
    assert!(
        r.manifest.stats.bytes_new_raw <= 128 * KIB,
        "{:?}",
        r.manifest.stats
    );

    // And the chain continues incrementally from the healed full.
    model.write(&vm, "vda", 3 * MIB, 64 * KIB, 3)?;
    let next = bed.backup()?;
    assert_eq!(next.manifest.mode, BackupMode::Incremental);
    bed.check(&next.manifest, &model)?;
    Ok(())
}

#[test]
fn unclean_guest_kill_leaves_an_inconsistent_bitmap_and_forces_a_full_read() -> Result<()> {
    let bed = Bed::boot("bk-kill", &[16 * MIB])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, MIB, 1)?;
    let full = bed.backup()?;
    assert_eq!(full.manifest.consistency, catalog::Consistency::Crash);
    model.write(&vm, "vda", 4 * MIB, 64 * KIB, 2)?;
    vm.sync()?;
    vm.kill_unclean()?;
    vm.start()?;
    model.write(&vm, "vda", 6 * MIB, 64 * KIB, 3)?;
    let r = bed.backup()?;
    match &r.manifest.mode {
        BackupMode::FullBecause(reason) => {
            assert!(reason.to_lowercase().contains("inconsistent"), "{reason}")
        }
        m => panic!("expected a full read after an unclean kill, got {m:?}"),
    }
    bed.check(&r.manifest, &model)?;
    model.write(&vm, "vda", 8 * MIB, 64 * KIB, 4)?;
    let next = bed.backup()?;
    assert_eq!(next.manifest.mode, BackupMode::Incremental);
    bed.check(&next.manifest, &model)?;
    Ok(())
}

#[test]
fn resized_disk_forces_a_full_read() -> Result<()> {
    let bed = Bed::boot("bk-resize", &[16 * MIB])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", MIB, MIB, 1)?;
    bed.backup()?;
    vm.virsh(&["blockresize", vm.name(), "vda", "24M"])?;
    model.disk_mut("vda")?.resize(24 * MIB as usize, 0);
    model.write(&vm, "vda", 3 * MIB, 64 * KIB, 2)?;
    let r = bed.backup()?;
    match &r.manifest.mode {
        BackupMode::FullBecause(reason) => assert!(reason.contains("SizeChanged"), "{reason}"),
        m => panic!("expected a full read after a resize, got {m:?}"),
    }
    assert_eq!(r.manifest.disks[0].size, 24 * MIB);
    bed.check(&r.manifest, &model)?;
    Ok(())
}

#[test]
fn guest_agent_makes_the_backup_application_consistent() -> Result<()> {
    let vm = TestVm::boot(
        VmSpec::new("bk-agent")
            .disk(8 * MIB)
            .disk(16 * MIB)
            .guest_agent(true),
    )?;
    // A mounted filesystem for the agent to freeze (vdb; the model only follows vda).
    vm.mkfs("vdb")?;
    vm.mount("vdb")?;
    let bed = Bed::with_vm(Arc::new(vm))?;
    let mut model = Model::new(&bed.vm);
    model.disks.remove("vdb");
    model.write(&bed.vm, "vda", 0, MIB, 1)?;
    let r = bed.backup()?;
    assert_eq!(r.manifest.consistency, catalog::Consistency::Application);
    bed.check(&r.manifest, &model)?;
    // The guest was thawed: it still writes.
    model.write(&bed.vm, "vda", 2 * MIB, 64 * KIB, 2)?;
    let r = bed.backup()?;
    bed.check(&r.manifest, &model)?;
    Ok(())
}

#[test]
fn a_large_sparse_disk_reads_only_its_data() -> Result<()> {
    let bed = Bed::boot("bk-sparse", &[10 << 30])?;
    let vm = &bed.vm;
    let mut written = Vec::new();
    for i in 0..10u64 {
        let off = i * (1 << 30) + 7 * MIB;
        vm.write_pattern("vda", off, 10 * MIB, 50 + i)?;
        written.push((off, 50 + i));
    }
    let r = bed.backup()?;
    assert!(
        r.bytes_read <= 110 * MIB,
        "read {} MiB for 100 MiB of data on a 10 GiB disk",
        r.bytes_read / MIB
    );
    let reader = bed.repo.open_disk(&r.manifest.id, "vda")?;
    let data_chunks = reader.digests()?.iter().filter(|d| !d.is_zero()).count();
    assert_eq!(data_chunks as u64, 100 * MIB / (64 * KIB));
    let mut buf = vec![0u8; 10 * MIB as usize];
    for (off, seed) in written {
        reader.read_at(off, &mut buf)?;
        ensure!(buf == pattern(seed, off, buf.len()), "data at {off}");
        reader.read_at(off + 100 * MIB, &mut buf)?;
        ensure!(buf.iter().all(|&b| b == 0), "hole at {}", off + 100 * MIB);
    }
    Ok(())
}

#[test]
fn partly_dirty_large_chunks_read_only_the_dirty_bytes() -> Result<()> {
    // 1 MiB repository chunks over the bitmap's 64 KiB granularity: the clean rest of each
    // dirty chunk comes from the parent backup, never from the hypervisor.
    let vm = Arc::new(TestVm::boot(VmSpec::new("bk-partial").disk(16 * MIB))?);
    let config = RepoConfig {
        chunk_size: MIB as u32,
        ..RepoConfig::default()
    };
    let bed = Bed::with_config(vm.clone(), config)?;
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, 8 * MIB, 1)?;
    let full = bed.backup()?;
    bed.check(&full.manifest, &model)?;
    model.write(&vm, "vda", 2 * MIB + 128 * KIB, 4 * KIB, 2)?;
    model.write(&vm, "vda", 5 * MIB + 512 * KIB, 64 * KIB, 3)?;
    model.write(&vm, "vda", 12 * MIB, 4 * KIB, 4)?; // a chunk that was all zero before
    let r = bed.backup()?;
    assert_eq!(r.manifest.mode, BackupMode::Incremental);
    assert_eq!(r.bytes_dirty, 3 * 64 * KIB);
    assert!(
        r.bytes_read as f64 <= 1.1 * r.bytes_dirty as f64,
        "read {} for {} dirty",
        r.bytes_read,
        r.bytes_dirty
    );
    bed.check(&r.manifest, &model)?;
    bed.check(
        &full.manifest,
        &Model {
            disks: [("vda".to_string(), {
                let mut v = vec![0u8; 16 * MIB as usize];
                v[..8 * MIB as usize].copy_from_slice(&pattern(1, 0, 8 * MIB as usize));
                v
            })]
            .into(),
        },
    )?;
    Ok(())
}

#[test]
fn proxy_killed_mid_backup_then_the_next_backup_is_correct() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let bed = Bed::boot("bk-kill9", &[16 * MIB])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, MIB, 1)?;
    let full = bed.backup()?;
    bed.check(&full.manifest, &model)?;
    model.write(&vm, "vda", 2 * MIB, 64 * KIB, 2)?;
    vm.sync()?;

    let work = vm.scratch().join("work");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backup-child"))
        .args([
            vm.name(),
            &bed.repo.dir().to_string_lossy(),
            &work.to_string_lossy(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    ensure!(line.trim() == "point-in-time", "child said {line:?}");
    child.kill()?; // SIGKILL: no destructor, no abort of the libvirt job
    child.wait()?;
    let jobs = vm.virsh(&["domjobinfo", vm.name()])?;
    ensure!(
        !jobs.contains("None"),
        "the killed proxy's job should still be there: {jobs}"
    );

    model.write(&vm, "vda", 5 * MIB, 64 * KIB, 3)?;
    let next = bed.backup()?;
    assert_eq!(next.manifest.mode, BackupMode::Incremental);
    assert_eq!(
        next.bytes_dirty,
        128 * KIB,
        "the killed backup's changes are covered"
    );
    bed.check(&next.manifest, &model)?;
    assert_eq!(
        bed.repo.backups(None)?.len(),
        2,
        "the killed backup committed nothing"
    );
    let jobs = vm.virsh(&["domjobinfo", vm.name()])?;
    assert!(jobs.contains("None"), "a libvirt job is left: {jobs}");
    assert_eq!(bed.checkpoints()?.len(), 1, "stale checkpoints are dropped");
    let left: Vec<_> = std::fs::read_dir(&work)?.collect();
    assert!(left.is_empty(), "job directories left: {left:?}");
    Ok(())
}

/// A VM with a qcow2 and a raw disk on the local hypervisor: the qcow2 disk stays
/// incremental, the raw one is read in full with the reason in the manifest; the same when
/// the VM is shut off (its images read through `qemu-nbd` with the format the definition
/// names). Every point restores exactly on both disks.
#[test]
fn a_raw_disk_is_read_in_full_and_the_qcow2_disk_stays_incremental() -> Result<()> {
    let vm = Arc::new(TestVm::boot(
        VmSpec::new("bk-mixed").disk(16 * MIB).raw_image(8 * MIB),
    )?);
    let bed = Bed::with_vm(vm.clone())?;
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, MIB, 1)?;
    model.write(&vm, "vdb", 0, MIB, 2)?;
    let full = bed.backup()?;
    bed.check(&full.manifest, &model)?;
    let raw = |m: &catalog::Manifest| m.disks.iter().find(|d| d.target == "vdb").cloned();
    let vdb = raw(&full.manifest).context("vdb in the manifest")?;
    ensure!(
        vdb.checkpoint.is_none() && vdb.full_read.as_deref().is_some_and(|r| r.contains("raw")),
        "the raw disk carries no checkpoint and says why it is read in full: {vdb:?}"
    );
    let mut history = vec![(full.manifest.clone(), model.clone())];
    model.write(&vm, "vda", 4 * MIB, 64 * KIB, 3)?;
    model.write(&vm, "vdb", 4 * MIB, 64 * KIB, 4)?;
    let inc = bed.backup()?;
    ensure!(
        inc.manifest.mode == BackupMode::Incremental,
        "a raw disk does not make the backup full: {:?}",
        inc.manifest.mode
    );
    ensure!(
        inc.bytes_read >= MIB && inc.bytes_read <= MIB + 256 * KIB,
        "read {} bytes: vdb's data in full, vda's 64 KiB",
        inc.bytes_read
    );
    bed.check(&inc.manifest, &model)?;
    history.push((inc.manifest.clone(), model.clone()));
    vm.shutdown()?;
    let off = bed.backup()?;
    ensure!(
        off.manifest.mode == BackupMode::Incremental
            && off.manifest.vm_state == Some(catalog::VmStateAtBackup::ShutOff),
        "offline: {:?} {:?}",
        off.manifest.mode,
        off.manifest.vm_state
    );
    history.push((off.manifest.clone(), model.clone()));
    for (m, snapshot) in &history {
        bed.check(m, snapshot)?;
    }
    Ok(())
}

/// A raw disk whose content is a forged qcow2 header naming a host file as its backing file
/// (what a guest can write into its raw disk): the offline backup reads the disk as the raw
/// image its definition names, byte for byte, and never the host file.
#[test]
fn an_offline_backup_of_a_raw_disk_with_a_forged_qcow2_header_stores_the_raw_bytes() -> Result<()> {
    let vm = Arc::new(TestVm::boot(VmSpec::new("bk-forged").raw_image(8 * MIB))?);
    vm.shutdown()?;
    let image = vm.disk_path("vda")?.to_path_buf();
    let secret = vm.scratch().join("host-secret");
    std::fs::write(
        &secret,
        b"HOST SECRET that must never reach a backup\n".repeat(1000),
    )?;
    let header = vm.scratch().join("forged.qcow2");
    let secret_s = secret.to_str().context("utf-8 path")?;
    testbed::peers::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret_s,
            "-F",
            "raw",
            header.to_str().context("utf-8")?,
            "8M",
        ],
    )?;
    let forged = std::fs::read(&header)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&image)?;
        f.write_all_at(&forged, 0)?;
    }
    let raw = std::fs::read(&image)?;
    ensure!(raw.len() as u64 == 8 * MIB, "the raw image keeps its size");
    let bed = Bed::with_vm(vm.clone())?;
    let r = bed.backup()?;
    let mut model = Model::new(&vm);
    model.disk_mut("vda")?.copy_from_slice(&raw);
    bed.check(&r.manifest, &model)?;
    ensure!(
        r.manifest.disks[0].size == 8 * MIB,
        "the backup has the raw image's size, not the forged header's: {}",
        r.manifest.disks[0].size
    );
    Ok(())
}
