//! Restore points of a real libvirt guest: a full backup of what the guest wrote, served as
//! a `VM/DISK@BACKUP` export, maps (`nbdinfo --map`) and compares (`qemu-img compare`) exactly
//! like the guest's disk at backup time; after more guest writes and an incremental, the
//! `sluice:changed-since:FULL` context lists exactly the chunks the guest changed.

use std::sync::Arc;

use anyhow::{ensure, Result};
use catalog::Manifest;
use proxy::nbd::{Server, ServerOptions};
use proxy::restore::{changed_since_context, ExportName, ExportOptions, RepoExport};
use testbed::inspect::{chunks_with, compare_images, data_chunks, nbd_map};
use testbed::peers::{require, ServerThread};
use testbed::{Bed, Model};

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

/// The guest `rs-vm` with one 32 MiB disk, and the model of what it holds.
fn boot() -> Result<(Bed, Model)> {
    for tool in ["nbdinfo", "qemu-img"] {
        require(tool)?;
    }
    let bed = Bed::boot("rs-vm", &[32 * MIB])?;
    let model = Model::new(&bed.vm);
    Ok((bed, model))
}

/// Serves vda of backup `m` with `opts` on `server`; returns the export's name and URI.
fn serve(
    bed: &Bed,
    (server, thread): (&Server, &ServerThread),
    m: &Manifest,
    opts: &ExportOptions,
) -> Result<(ExportName, String)> {
    let name = ExportName::new(bed.vm.name(), "vda", &m.id)?;
    let export = RepoExport::open_blocking(&bed.repo, &name, opts)?;
    server.add_export(name.to_string(), Arc::new(export));
    let uri = thread.uri(&name.to_string());
    Ok((name, uri))
}

/// The chunks of `uri` whose extents in `context` are data (`base:allocation`, flags 0) or
/// set (any other context, flags 1).
fn map(uri: &str, context: &str) -> Result<Vec<u64>> {
    let want_flags = if context == "base:allocation" { 0 } else { 1 };
    Ok(chunks_with(&nbd_map(uri, Some(context))?, want_flags, CS))
}

/// `qemu-img compare` of the export at `uri` with the model's vda (written beside the
/// repository as `expected.raw`).
fn compare_with_model(bed: &Bed, model: &Model, uri: &str) -> Result<()> {
    let expected = bed.repo.dir().join("expected.raw");
    std::fs::write(&expected, model.disk("vda")?)?;
    compare_images(&expected.to_string_lossy(), "raw", uri, "raw")
}

#[test]
fn guest_backup_exports_exactly_and_diff_lists_the_guest_changes() -> Result<()> {
    let (bed, mut model) = boot()?;
    let vm = &bed.vm;
    model.write(vm, "vda", 0, 2 * MIB, 1)?;
    model.write(vm, "vda", 10 * MIB + 4096, 8192, 2)?;
    model.write(vm, "vda", 31 * MIB, MIB, 3)?;
    let full = bed.backup()?.manifest;

    let server = Server::new(ServerOptions::default());
    let thread = ServerThread::start(server.clone(), &bed.repo.dir().join("nbd.sock"))?;
    let (name, uri) = serve(&bed, (&server, &thread), &full, &ExportOptions::default())?;
    let data = data_chunks(model.disk("vda")?, CS);
    ensure!(
        map(&uri, "base:allocation")? == data,
        "data extents of {name}"
    );
    compare_with_model(&bed, &model, &uri)?;

    // The guest changes chunks 5, 160 (two writes) and 300..302.
    model.write(vm, "vda", 5 * CS + 512, 4096, 4)?;
    model.write(vm, "vda", 160 * CS, 512, 5)?;
    model.write(vm, "vda", 160 * CS + 60 * 1024, 512, 6)?;
    model.write(vm, "vda", 300 * CS + 1024, 2 * CS, 7)?;
    let inc = bed.backup()?.manifest;
    let opts = ExportOptions {
        changed_since: vec![full.id.clone()],
        ..Default::default()
    };
    let (_, uri2) = serve(&bed, (&server, &thread), &inc, &opts)?;
    let changed = map(&uri2, &changed_since_context(&full.id))?;
    ensure!(
        changed == vec![5, 160, 300, 301, 302],
        "changed chunks {changed:?}"
    );
    compare_with_model(&bed, &model, &uri2)?;
    Ok(())
}
