//! The restore-point diff through the daemon and the CLI: a booted guest writes known regions
//! (4 KiB inside a chunk, a whole 64 KiB chunk, 64 KiB across two chunks, the last 4 KiB of
//! the disk, and a rewrite of bytes it already held) between a full and an incremental backup
//! taken with `sluice backup --wait`; `sluice export INC --changed-since FULL` answers with
//! the `sluice:changed-since:FULL` context, and `nbdinfo --map=` of it on the export's
//! `nbds://` URI lists exactly the chunks whose bytes changed, chunk-aligned, nothing else
//! (the rewrite is not a change). Read-only opens sharing the name keep the context. The
//! other direction (`export FULL --changed-since INC`) lists the same chunks, and the
//! documented client (`docs/examples/copy-changed.sh`) turns a copy of FULL into INC by
//! copying those chunks alone. An unknown, malformed or another VM's backup is refused
//! naming it.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use testbed::daemon::Daemon;
use testbed::inspect::{chunks_with, nbd_map};
use testbed::peers::{require, run as tool};
use testbed::{Model, TestVm, VmSpec};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// The guest's writes between the backups: (offset, length, pattern seed). Seed 1 at
/// `MIB` rewrites bytes the full backup already holds.
const WRITES: [(u64, u64, u64); 5] = [
    (5 * MIB + 12 * KIB, 4 * KIB, 2),
    (10 * MIB, 64 * KIB, 3),
    (20 * MIB + 32 * KIB, 64 * KIB, 4),
    (SIZE - 4 * KIB, 4 * KIB, 5),
    (MIB, 64 * KIB, 1),
];

/// The chunks whose bytes differ between two images of one disk.
fn differing_chunks(a: &[u8], b: &[u8], chunk: u64) -> Vec<u64> {
    a.chunks(chunk as usize)
        .zip(b.chunks(chunk as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

fn backup(d: &Daemon, vm: &str, full: bool) -> Result<String> {
    let mut args = vec!["backup", vm, "--wait"];
    if full {
        args.push("--full");
    }
    let job = d.ok(&args)?;
    ensure!(job["state"] == "succeeded", "backup: {job}");
    Ok(job["backup_id"].as_str().context("backup id")?.to_string())
}

/// `sluice ARGS` (tables, not JSON): exit code, stdout, stderr.
fn cli_text(d: &Daemon, args: &[&str]) -> Result<(i32, String, String)> {
    let out = d.command(args)?.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The chunks `nbdinfo --map=CONTEXT` marks changed on `uri`, after checking the map covers
/// the disk in chunk-aligned extents.
fn changed_chunks(uri: &str, context: &str, chunk: u64) -> Result<Vec<u64>> {
    let map = nbd_map(uri, Some(context))?;
    ensure!(
        map.iter().map(|e| e.1).sum::<u64>() == SIZE,
        "the map of {context} does not cover the disk: {map:?}"
    );
    ensure!(
        map.iter()
            .all(|&(o, l, _)| o % chunk == 0 && l % chunk == 0),
        "extents of {context} not aligned to {chunk}-byte chunks: {map:?}"
    );
    ensure!(
        map.iter().all(|e| e.2 <= 1),
        "flags other than bit 0 in {context}: {map:?}"
    );
    Ok(chunks_with(&map, 1, chunk))
}

fn open_export(d: &Daemon, args: &[&str]) -> Result<Value> {
    let mut all = vec!["export"];
    all.extend_from_slice(args);
    d.ok(&all)
}

fn close_export(d: &Daemon, e: &Value) -> Result<()> {
    d.ok(&["export", "close", &e["id"].to_string()]).map(drop)
}

#[test]
fn export_changed_since_lists_exactly_the_chunks_the_guest_changed() -> Result<()> {
    for t in ["nbdinfo", "nbdcopy", "nbdkit"] {
        require(t)?;
    }
    let vm = TestVm::boot(VmSpec::new("api-changed").disk(SIZE))?;
    let disk = vm.disks()[0].target.clone();
    let dir = tempfile::tempdir()?;
    let d = Daemon::start(dir.path(), "")?;
    let mut model = Model::new(&vm);
    model.write(&vm, &disk, 0, 4 * MIB, 1)?;
    vm.sync()?;
    let full = backup(&d, vm.name(), true)?;
    let at_full = model.clone();
    // Retention orders backups by their start second, so the incremental starts later.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for (offset, len, seed) in WRITES {
        model.write(&vm, &disk, offset, len, seed)?;
    }
    vm.sync()?;
    let inc = backup(&d, vm.name(), false)?;
    let shown = d.ok(&["backup", "show", &inc])?;
    ensure!(shown["mode"] == "incremental", "second backup: {shown}");
    let chunk = shown["disks"][0]["chunk_size"]
        .as_u64()
        .context("chunk size")?;
    let expected = differing_chunks(at_full.disk(&disk)?, model.disk(&disk)?, chunk);
    let c = |o: u64| o / chunk;
    ensure!(
        expected
            == vec![
                c(5 * MIB),
                c(10 * MIB),
                c(20 * MIB),
                c(20 * MIB) + 1,
                c(SIZE) - 1
            ],
        "the writes change other chunks than planned ({chunk}-byte chunks): {expected:?}"
    );

    let context = format!("sluice:changed-since:{full}");
    let export = changed_since_export(&d, &inc, &full, &context, chunk, &expected)?;
    let uri = export["uri"].as_str().context("uri")?;
    let back = open_export(&d, &[&full, "--changed-since", &inc])?;
    let back_uri = back["uri"].as_str().context("uri")?;
    let back_ctx = format!("sluice:changed-since:{inc}");
    ensure!(back["meta_context"] == back_ctx.as_str(), "{back}");
    let got = changed_chunks(back_uri, &back_ctx, chunk)?;
    ensure!(
        got == expected,
        "FULL against INC lists {got:?}, not {expected:?}"
    );
    copy_back_only_what_changed(dir.path(), (back_uri, uri, &context), &model, &disk)?;
    close_export(&d, &back)?;
    close_export(&d, &export)?;
    bad_other_backups_are_refused(&d, &inc, &disk)?;
    ensure!(d.ok(&["export", "list"])? == json!([]), "exports left open");
    Ok(())
}

/// `export INC --changed-since FULL` (JSON and table output), a plain open sharing its name,
/// and the map of the context: exactly `expected`. Leaves the first open; returns it.
fn changed_since_export(
    d: &Daemon,
    inc: &str,
    full: &str,
    context: &str,
    chunk: u64,
    expected: &[u64],
) -> Result<Value> {
    let e = open_export(d, &[inc, "--changed-since", full])?;
    ensure!(e["meta_context"] == context, "export answer: {e}");
    ensure!(e["changed_since"] == full, "export answer: {e}");
    let uri = e["uri"].as_str().context("uri")?.to_string();
    ensure!(uri.starts_with("nbds://"), "export over plain NBD: {uri}");
    let (code, text, err) = cli_text(d, &["export", inc, "--changed-since", full])?;
    ensure!(code == 0, "sluice export (table): {code} {err}");
    ensure!(
        text.contains(&format!("nbdinfo --map={context} '{uri}'")),
        "the CLI does not print the context and URI: {text}"
    );
    let second = text
        .split_whitespace()
        .nth(1)
        .context("export number")?
        .to_string();
    let plain = open_export(d, &[inc])?;
    ensure!(plain.get("meta_context").is_none(), "plain open: {plain}");
    let got = changed_chunks(&uri, context, chunk)?;
    ensure!(
        got == expected,
        "{context} lists chunks {got:?}; the guest changed {expected:?}"
    );
    d.ok(&["export", "close", &second])?;
    close_export(d, &plain)?;
    let got = changed_chunks(&uri, context, chunk)?;
    ensure!(got == expected, "after closing the other opens: {got:?}");
    let list = d.ok(&["export", "list"])?;
    ensure!(
        list.as_array().map(Vec::len) == Some(1) && list[0]["meta_context"] == context,
        "export list: {list}"
    );
    Ok(e)
}

/// A copy of FULL (nbdcopy of its export, read from `back_uri`) becomes INC by the documented
/// client copying the changed chunks alone (`docs/examples/copy-changed.sh`).
fn copy_back_only_what_changed(
    dir: &Path,
    (back_uri, inc_uri, context): (&str, &str, &str),
    model: &Model,
    disk: &str,
) -> Result<()> {
    let target = dir.join("disk.raw");
    let target_s = target.to_str().context("path")?;
    tool("nbdcopy", &[back_uri, target_s])?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/copy-changed.sh");
    let out = tool(
        "bash",
        &[script.to_str().context("path")?, inc_uri, context, target_s],
    )?;
    ensure!(
        std::fs::read(&target)? == model.disk(disk)?,
        "the copy with the changed chunks applied differs from the incremental: {out}"
    );
    ensure!(
        out.trim()
            .starts_with(&format!("copied {} bytes in ", 5 * 64 * KIB)),
        "copy-changed.sh copied more or less than the 5 changed chunks: {out}"
    );
    Ok(())
}

/// Another VM's backup, an unknown id and a malformed one are refused, each named.
fn bad_other_backups_are_refused(d: &Daemon, inc: &str, disk: &str) -> Result<()> {
    let other_vm = TestVm::boot(VmSpec::new("api-changed-b").disk(SIZE))?;
    let other = backup(d, other_vm.name(), true)?;
    let unknown = "20200101T000000Z-00000000";
    let cases = [
        (
            other.as_str(),
            1,
            format!("changed_since: backup {other} is of vm {}", other_vm.name()),
        ),
        (unknown, 4, "changed_since: ".to_string()),
        (
            "no/such",
            1,
            "changed_since: backup id \"no/such\" is malformed".to_string(),
        ),
    ];
    for (since, want_code, want) in cases {
        let (code, out, err) = cli_text(
            d,
            &["export", inc, "--disk", disk, "--changed-since", since],
        )?;
        ensure!(
            code == want_code && err.contains(&want) && err.contains(since),
            "export {inc} --changed-since {since}: exit {code}, stderr {err:?}, stdout {out:?}"
        );
    }
    Ok(())
}
