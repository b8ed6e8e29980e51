//! The `sluice` binary's `backup` verbs against a real axum server on loopback (plain HTTP):
//! `backup list` and `backup show ID` are subcommands whose tables show sizes for people
//! (`3.5 MiB`) while `--json` keeps the API's bytes; `backup VM` stays the default, and a VM
//! named `list` (plain QEMU over QMP, `testbed::qmp::PlainQemu`) is backed up with
//! `backup start list` and `backup -- list`, while `backup list` still lists.

mod common;

use std::sync::Arc;

use api::daemon::auth::TokenStore;
use api::daemon::http::app;
use api::daemon::hypervisors::{HvSpec, Hypervisors};
use api::daemon::state::AppState;
use common::cli::{serve, Cli};
use common::{api, seed_backup};
use serde_json::Value;
use testbed::qmp::PlainQemu;

const MIB: u64 = 1 << 20;
/// The test driver's VM `test` (what `seed_backup` backs up).
const TEST_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";

/// `n` bytes that do not compress (xorshift), so what is stored is about `n`.
fn noise(n: u64, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// `bytes` in MiB with one decimal, as a person reads it.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_list_and_show_print_sizes_for_people_and_json_keeps_bytes() {
    let a = api().await;
    let first = seed_backup(&a, "test", noise(7 * MIB / 2, 1), "<domain/>").await;
    let second = seed_backup(&a, "test", noise(MIB, 2), "<domain/>").await;
    let cli = serve(a.app.clone(), &a.admin).await;

    // --json: the API's list as sent, bytes as numbers.
    let j = cli.ok(&["backup", "list", "--json"]).await.json();
    let listed = j.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{j}");
    let stored = |id: &str| -> u64 {
        let b = listed.iter().find(|b| b["id"] == id).unwrap();
        b["bytes_stored"]
            .as_u64()
            .expect("bytes_stored is a number")
    };
    let (s1, s2) = (
        stored(&first.id.to_string()),
        stored(&second.id.to_string()),
    );
    assert!(s1 > 3 * MIB && s2 > MIB / 2, "incompressible data: {j}");

    // The table: ID VM MODE FINISHED STORED (number and unit) PROTECTED.
    let r = cli.ok(&["backup", "list"]).await;
    let header = r.stdout.lines().next().unwrap();
    for col in ["ID", "VM", "MODE", "FINISHED", "STORED", "PROTECTED"] {
        assert!(header.contains(col), "{header}");
    }
    let rows = r.rows();
    assert_eq!(rows.len(), 2, "{r:?}");
    for (id, bytes) in [(first.id.to_string(), s1), (second.id.to_string(), s2)] {
        let row = rows
            .iter()
            .find(|row| row[0] == id)
            .expect("a row per backup");
        assert_eq!(row[1..3], ["test", "full"], "{r:?}");
        assert_eq!(row[3], "2023-11-14T22:13:21Z", "finished, in UTC: {r:?}");
        assert_eq!(row[4..6].join(" "), mib(bytes), "{r:?}");
        assert_eq!(row[6], "no", "{r:?}");
        assert!(
            !r.stdout.contains(&bytes.to_string()),
            "no raw bytes: {r:?}"
        );
    }
    // Of a VM: the same two; a name without backups is not found.
    assert_eq!(cli.ok(&["backup", "list", "test"]).await.rows().len(), 2);
    let r = cli.run(&["backup", "list", "web"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("vm web has no backups"), "{r:?}");

    // show: the backup for people, and its JSON with bytes.
    let id = first.id.to_string();
    let r = cli.ok(&["backup", "show", &id]).await;
    assert_eq!(r.field("backup "), id, "{r:?}");
    assert_eq!(r.field("vm "), format!("test ({TEST_UUID})"), "{r:?}");
    assert_eq!(r.field("finished "), "2023-11-14T22:13:21Z", "{r:?}");
    assert!(r.field("stored ").starts_with(&mib(s1)), "{r:?}");
    let disk = r.stdout.lines().find(|l| l.starts_with("vda ")).unwrap();
    let disk: Vec<&str> = disk.split_whitespace().collect();
    assert_eq!(disk[1..3], ["3.5", "MiB"], "the disk's size: {r:?}");
    let j = cli.ok(&["backup", "show", &id, "--json"]).await.json();
    assert_eq!(j["disks"][0]["size"], 7 * MIB / 2, "{j}");
    assert_eq!(j["bytes_stored"], s1, "{j}");
    assert_eq!(j["consistency"], "crash", "{j}");
    let r = cli
        .run(&["backup", "show", "20200101T000000Z-00000000"])
        .await;
    assert_eq!(r.code, 4, "an unknown backup is not found: {r:?}");
    assert_eq!(
        a.state.jobs.list().len(),
        0,
        "listing and showing start no job"
    );
}

/// A daemon whose only hypervisor, `plain`, is a plain QEMU whose VM is named `list`.
async fn daemon_with_a_vm_named_list() -> (common::Api, PlainQemu, Cli) {
    let a = api().await;
    let qemu = PlainQemu::start("cli-backup-list", 16 * MIB, &["write -P 0xaa 0 1M"]).unwrap();
    let (hv, _writer) = qemu.connect("list").await.unwrap();
    let st = Arc::new(AppState::new(
        a.state.repo.clone(),
        Hypervisors::default().with_connected(
            HvSpec::qmp("plain", qemu.dir().join("qmp.sock"), "list"),
            Arc::new(hv),
        ),
        TokenStore::open(a.dir.path()).unwrap(),
        qemu.dir().join("work"),
        2,
    ));
    let cli = serve(app(st), &a.admin).await;
    (a, qemu, cli)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_named_list_is_backed_up_while_backup_list_lists() {
    let (_a, _qemu, cli) = daemon_with_a_vm_named_list().await;
    let r = cli.ok(&["vm", "list"]).await;
    assert_eq!(r.rows()[0][..2], ["list", "plain"], "{r:?}");
    assert_eq!(cli.ok(&["backup", "list"]).await.rows().len(), 0, "lists");

    // `backup start list`: the explicit form.
    let j = cli
        .ok(&["backup", "start", "list", "--full", "--wait", "--json"])
        .await
        .json();
    let seen = |j: &Value| (j["kind"].clone(), j["vm"].clone(), j["hypervisor"].clone());
    let backup_of_list = (
        Value::from("backup"),
        Value::from("list"),
        Value::from("plain"),
    );
    assert_eq!(seen(&j), backup_of_list, "{j}");
    assert_eq!(j["state"], "succeeded", "{j}");
    let full = j["backup_id"].as_str().unwrap().to_string();

    // `backup -- list`: the default form, the name after `--`.
    let r = cli.ok(&["backup", "--wait", "--", "list"]).await;
    let (id, end) = r
        .stdout
        .trim()
        .split_once(' ')
        .unwrap()
        .1
        .split_once(' ')
        .unwrap();
    assert!(end.starts_with("succeeded: "), "{r:?}");
    let j = cli.ok(&["job", "show", id, "--json"]).await.json();
    assert_eq!(seen(&j), backup_of_list, "{j}");

    // `backup list` lists, and starts nothing; `backup list list` lists the VM's.
    let jobs = cli.ok(&["job", "list", "--json"]).await.json();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(jobs.iter().all(|j| seen(j) == backup_of_list), "{jobs:?}");
    let r = cli.ok(&["backup", "list"]).await;
    assert_eq!(r.rows().len(), 2, "{r:?}");
    assert!(r.rows().iter().all(|row| row[1] == "list"), "{r:?}");
    assert!(r.rows().iter().any(|row| row[0] == full), "{r:?}");
    let j = cli.ok(&["backup", "list", "list", "--json"]).await.json();
    assert_eq!(j.as_array().unwrap().len(), 2, "{j}");
    let j = cli.ok(&["job", "list", "--json"]).await.json();
    assert_eq!(
        j.as_array().unwrap().len(),
        2,
        "listing started no job: {j}"
    );

    // show: the VM and its 16 MiB disk, for people.
    let r = cli.ok(&["backup", "show", &full]).await;
    assert!(r.field("vm ").starts_with("list ("), "{r:?}");
    let mut disks = r.stdout.lines().skip_while(|l| !l.starts_with("DISK"));
    let disk: Vec<&str> = disks
        .nth(1)
        .expect("a disk row")
        .split_whitespace()
        .collect();
    assert_eq!(disk[1..3], ["16.0", "MiB"], "{r:?}");
}
