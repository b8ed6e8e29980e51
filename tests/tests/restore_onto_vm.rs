//! Restore back onto an existing VM's disk: a real guest gets a full backup, writes, an
//! incremental, more writes; the restore is refused while it runs and without the
//! confirmation flag (the disk is untouched); shut off and confirmed, the first backup is
//! restored writing only the chunks that can differ (the bitmap of the incremental's
//! checkpoint ∪ the diff between the two backups), and the disk equals the first backup's
//! image. The guest boots from it, and the next backup is an incremental that is exact byte
//! for byte. With the bitmap gone, the restore falls back to writing the whole disk and says
//! why.

use anyhow::{ensure, Context, Result};
use catalog::BackupMode;
use proxy::restore::{restore_onto_vm, ErrorKind, OntoPath, OntoVmOptions, OntoVmReport};
use testbed::bed::{check_disk, Bed, Model};
use testbed::inspect::data_chunks;
use testbed::{peers::run, sha256_hex};

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;
const DISK: u64 = 64 * MIB;

fn options(bed: &Bed, backup: &catalog::BackupId, confirm: bool) -> OntoVmOptions {
    let work = bed.vm.scratch().join("restore");
    let mut opts = OntoVmOptions::new(bed.vm.name(), backup.clone(), work);
    opts.confirm = confirm;
    opts
}

/// Restores with confirmation; the progress counters agree with the report.
fn restore(bed: &Bed, backup: &catalog::BackupId) -> Result<OntoVmReport> {
    let opts = options(bed, backup, true);
    let report = bed
        .rt
        .block_on(restore_onto_vm(&bed.hv, &bed.repo, &opts))?;
    let p = opts.progress.snapshot();
    let d = &report.disks[0];
    ensure!(
        p.bytes_planned == p.bytes_done
            && p.bytes_done == d.data_bytes + d.zero_bytes
            && p.bytes_zero == d.zero_bytes,
        "progress {p:?} vs {d:?}"
    );
    Ok(report)
}

/// The restore with `opts` fails with an error of `kind` whose message contains `says`.
fn fails(bed: &Bed, opts: &OntoVmOptions, kind: ErrorKind, says: &str) -> Result<()> {
    let err = bed
        .rt
        .block_on(restore_onto_vm(&bed.hv, &bed.repo, opts))
        .err()
        .context("restore succeeded")?;
    ensure!(err.kind() == kind, "kind of {err}");
    ensure!(
        err.to_string().contains(says),
        "message {err:?} lacks {says:?}"
    );
    Ok(())
}

fn refused(bed: &Bed, backup: &catalog::BackupId, confirm: bool, says: &str) -> Result<()> {
    fails(
        bed,
        &options(bed, backup, confirm),
        ErrorKind::Refused,
        says,
    )
}

/// The VM's vda image, read from outside, equals `want`.
fn disk_equals(bed: &Bed, want: &[u8]) -> Result<()> {
    let got = bed.vm.read_disk("vda", 0, DISK)?;
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        anyhow::bail!("vda differs from the expected image at byte {at}");
    }
    Ok(())
}

#[test]
fn restore_onto_a_shut_off_vm_writes_only_changed_chunks() -> Result<()> {
    let bed = Bed::boot("onto", &[DISK])?;
    let vm = bed.vm.clone();
    let mut model = Model::new(&vm);
    model.write(&vm, "vda", 0, 8 * MIB, 1)?;
    model.write(&vm, "vda", 40 * MIB, MIB, 2)?;
    let full = bed.backup()?.manifest;
    let first = model.clone();

    // Between the backups: chunks 5, 200, 201. After the incremental: chunks 5, 7, 500.
    model.write(&vm, "vda", 5 * CS + 512, 4096, 3)?;
    model.write(&vm, "vda", 200 * CS, 2 * CS, 4)?;
    let inc = bed.backup()?.manifest;
    model.write(&vm, "vda", 7 * CS, 4096, 5)?;
    model.write(&vm, "vda", 500 * CS + 4096, 8192, 6)?;
    model.write(&vm, "vda", 5 * CS, 512, 7)?;
    vm.sync()?;

    refused(&bed, &full.id, true, "shut it off")?;
    vm.shutdown()?;
    refused(&bed, &full.id, false, "--confirm")?;
    disk_equals(&bed, model.disk("vda")?)?;

    let report = restore(&bed, &full.id)?;
    eprintln!("changed-path restore: {report:?}");
    let d = &report.disks[0];
    let cp = inc.disks[0].checkpoint.clone().context("checkpoint")?;
    let want = OntoPath::Changed {
        base: inc.id.clone(),
        bitmap: cp,
        dirty_chunks: 3,
        diff_chunks: 3,
    };
    ensure!(d.path == want, "path {:?}", d.path);
    // Chunks 5, 7, 200, 201, 500: 5 and 7 hold data in the full backup, the rest are zero.
    ensure!(d.chunks_written == 5, "chunks written {}", d.chunks_written);
    ensure!(
        d.data_bytes == 2 * CS && d.zero_bytes == 3 * CS,
        "wrote {} data and {} zero bytes",
        d.data_bytes,
        d.zero_bytes
    );
    disk_equals(&bed, first.disk("vda")?)?;

    // The guest runs on the restored disk; the next backup reads back what the restore wrote
    // (the checkpoint's bitmap recorded it) and is exact.
    vm.start()?;
    let sum = vm.checksum("vda", 0, 8 * MIB)?;
    ensure!(sum == sha256_hex(&first.disk("vda")?[..8 * MIB as usize]));
    let mut after = first.clone();
    after.write(&vm, "vda", 300 * CS, CS, 8)?;
    let next = bed.backup()?;
    eprintln!(
        "next backup: {} bytes dirty, {} read",
        next.bytes_dirty, next.bytes_read
    );
    ensure!(
        next.manifest.mode == BackupMode::Incremental,
        "mode {:?}",
        next.manifest.mode
    );
    // Dirty: the 5 restored chunks and the guest's one; read: those holding data (5, 7, 300).
    ensure!(
        next.bytes_dirty == 6 * CS && next.bytes_read == 3 * CS,
        "next backup: {} bytes dirty, {} read",
        next.bytes_dirty,
        next.bytes_read
    );
    check_disk(&bed.repo, &next.manifest, "vda", after.disk("vda")?)?;

    // Without the bitmap only a full write is safe: every data chunk is written.
    vm.shutdown()?;
    let cp = next.manifest.disks[0].checkpoint.clone().context("cp")?;
    let image = vm.disk_path("vda")?.to_str().context("path")?.to_string();
    run("qemu-img", &["bitmap", "--remove", &image, &cp])?;
    let report = restore(&bed, &full.id)?;
    eprintln!("full-path restore: {report:?}");
    let d = &report.disks[0];
    ensure!(
        matches!(&d.path, OntoPath::Full { reason } if reason.contains("BitmapMissing")),
        "path {:?}",
        d.path
    );
    let data = data_chunks(first.disk("vda")?, CS).len() as u64;
    ensure!(
        d.data_bytes == data * CS,
        "full restore wrote {}",
        d.data_bytes
    );
    ensure!(d.chunks_written == DISK / CS, "chunks {}", d.chunks_written);
    disk_equals(&bed, first.disk("vda")?)?;

    // Cancelled: stops before writing, closes the image cleanly and says so.
    let opts = options(&bed, &inc.id, true);
    opts.cancel.cancel();
    fails(&bed, &opts, ErrorKind::Cancelled, "partly restored")?;
    run("qemu-img", &["check", &image])?;
    disk_equals(&bed, first.disk("vda")?)?;
    Ok(())
}
