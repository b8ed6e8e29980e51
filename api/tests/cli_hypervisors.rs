//! The `sluice` binary's hypervisor options against a real axum server on loopback (plain
//! HTTP) over several hypervisors: two libvirt `test:///default` drivers that both have a VM
//! `test`, a libvirt host that does not exist and a QMP socket with no QEMU behind it.
//! Checked as a user sees them: exit codes, the tables on stdout, the notes and errors on
//! stderr, and what reached the daemon (jobs started, backups pruned).

mod common;

use std::path::PathBuf;

use api::daemon::hypervisors::HvSpec;
use common::cli::Cli;
use common::{api_with, seed_backup, seed_backup_of};
use serde_json::Value;
use tokio::net::TcpListener;

/// The test driver's VM `test`: its backups belong to the VM both `a` and `b` list.
const TEST_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";
/// Another VM once called `test` (gone from every hypervisor; its backups stay).
const OTHER_UUID: &str = "0d7c5a9e-1111-4222-8333-944455556666";

/// The daemon over hypervisors `a`, `b` (each with VM `test`), `gone` and `plain` (both down),
/// served on loopback; the server task ends with the test's runtime.
async fn start() -> (common::Api, Cli, PathBuf) {
    let socket =
        std::env::temp_dir().join(format!("sluice-cli-no-qemu-{}.qmp", std::process::id()));
    let a = api_with(vec![
        HvSpec::libvirt("a", "test:///default"),
        HvSpec::libvirt("b", "test:///default"),
        HvSpec::libvirt("gone", "qemu+ssh://nonexistent.invalid/system"),
        HvSpec::qmp("plain", socket.clone(), "q"),
    ])
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = a.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let cli = Cli {
        addr,
        token: a.admin.clone(),
    };
    (a, cli, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypervisor_list_and_vm_list_show_every_hypervisor_and_note_the_unreachable() {
    let (_a, cli, socket) = start().await;

    let r = cli.ok(&["hypervisor", "list"]).await;
    let header = r.stdout.lines().next().unwrap();
    for col in [
        "NAME",
        "KIND",
        "URI/SOCKET",
        "HOST",
        "STATE",
        "VMS",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let rows = r.rows();
    let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(names, ["a", "b", "gone", "plain"], "{}", r.stdout);
    assert_eq!(
        rows[0][..7],
        [
            "a",
            "libvirt",
            "test:///default",
            "localhost",
            "up",
            "1",
            "-"
        ],
        "{}",
        r.stdout
    );
    assert_eq!(
        rows[2][1..5],
        [
            "libvirt",
            "qemu+ssh://nonexistent.invalid/system",
            "nonexistent.invalid",
            "unreachable"
        ],
        "{}",
        r.stdout
    );
    assert!(
        rows[2].len() > 7,
        "gone's last error is shown: {}",
        r.stdout
    );
    let sock = socket.display().to_string();
    assert_eq!(
        rows[3][1..5],
        ["qmp", sock.as_str(), "localhost", "unreachable"],
        "{}",
        r.stdout
    );
    let why = rows[3][6..].join(" ");
    assert!(
        why.starts_with("cannot connect to qmp socket ") && why.contains("No such file"),
        "the error names the socket and the OS's reason: {}",
        r.stdout
    );

    let j = cli.ok(&["hypervisor", "list", "--json"]).await.json();
    let names: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "gone", "plain"], "{j}");
    assert_eq!(j[2]["state"], "unreachable", "{j}");

    // vm list: a HYPERVISOR column; the unreachable ones on stderr only, and still exit 0.
    let r = cli.ok(&["vm", "list"]).await;
    assert!(
        r.stdout.lines().next().unwrap().contains("HYPERVISOR"),
        "{r:?}"
    );
    let on: Vec<(&str, &str)> = r.rows().iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(on, [("test", "a"), ("test", "b")], "{r:?}");
    assert!(
        !r.stdout.contains("gone") && !r.stdout.contains("plain"),
        "{r:?}"
    );
    let notes: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(notes.len(), 2, "{r:?}");
    assert!(
        notes[0].starts_with("note: the VMs of hypervisor gone are not listed: ")
            && notes[0].contains("nonexistent.invalid"),
        "{r:?}"
    );
    assert!(
        notes[1].starts_with("note: the VMs of hypervisor plain are not listed: "),
        "{r:?}"
    );
    let r = cli.ok(&["vm", "list", "--json"]).await;
    let j = r.json();
    assert_eq!(j["unreachable"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(
        r.stderr.lines().count(),
        2,
        "the notes stay on stderr: {r:?}"
    );

    // --hypervisor asks only that one.
    let r = cli.ok(&["vm", "list", "--hypervisor", "b"]).await;
    assert_eq!(r.rows(), [vec!["test", "b", "running", "1", "-"]], "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    let r = cli.ok(&["vm", "list", "--hypervisor", "gone"]).await;
    assert_eq!(r.rows().len(), 0, "{r:?}");
    assert!(
        r.stderr
            .starts_with("note: the VMs of hypervisor gone are not listed: "),
        "{r:?}"
    );
    // An unknown name is 404 (exit 4) naming the configured ones; the name travels encoded.
    let r = cli.run(&["vm", "list", "--hypervisor", "a b&c"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("no hypervisor \"a b&c\"; configured: a, b, gone, plain"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_two_hypervisors_is_backed_up_listed_and_pruned_with_hypervisor() {
    let (a, cli, _) = start().await;
    let old = seed_backup(&a, "test", vec![1u8; 65536], "<domain/>").await;
    let new = seed_backup(&a, "test", vec![2u8; 65536], "<domain/>").await;
    let other = seed_backup_of(&a, "test", OTHER_UUID, vec![3u8; 65536], "<domain/>").await;

    // Without --hypervisor: refused (409, exit 1), the message names the candidates.
    let r = cli.run(&["backup", "test", "--full"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains(
            "vm test is on several hypervisors: pass --hypervisor NAME, one of: a, b (http 409, ambiguous_vm)"
        ),
        "{r:?}"
    );
    assert_eq!(
        a.state.jobs.list().len(),
        0,
        "no job from an ambiguous name"
    );

    let j = cli
        .ok(&["backup", "test", "--hypervisor", "b", "--json"])
        .await
        .json();
    assert_eq!(
        (j["hypervisor"].as_str(), j["vm"].as_str()),
        (Some("b"), Some("test")),
        "{j}"
    );
    let r = cli.ok(&["backup", "test", "--hypervisor", "a"]).await;
    assert!(
        r.stdout.contains("queued: backup of test on a (auto)"),
        "{r:?}"
    );
    let on: Vec<_> = a
        .state
        .jobs
        .list()
        .iter()
        .map(|j| j.hypervisor.clone())
        .collect();
    assert_eq!(on.len(), 2);
    assert!(
        on.contains(&Some("a".into())) && on.contains(&Some("b".into())),
        "{on:?}"
    );
    // The name is encoded into the path and the query: a VM `x?y` is looked up on `a`.
    let r = cli.run(&["backup", "x?y", "--hypervisor", "a"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("vm x?y not found on hypervisor a"),
        "{r:?}"
    );

    // backup list: every VM of the name (noted on stderr), or the one on a hypervisor.
    let ids = |j: &Value| -> Vec<String> {
        let mut v: Vec<String> = j
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let mut of_test = vec![old.id.to_string(), new.id.to_string()];
    of_test.sort();
    let r = cli.ok(&["backup", "list", "test", "--json"]).await;
    assert_eq!(ids(&r.json()).len(), 3, "{r:?}");
    assert!(
        r.stderr.contains("note: 2 VMs named test have backups") && r.stderr.contains(OTHER_UUID),
        "{r:?}"
    );
    let j = cli
        .ok(&["backup", "list", "test", "--hypervisor", "a", "--json"])
        .await
        .json();
    assert_eq!(ids(&j), of_test, "{j}");
    let j = cli
        .ok(&["backup", "list", "--hypervisor", "b", "--json"])
        .await
        .json();
    assert_eq!(ids(&j), of_test, "the backups of b's VMs: {j}");
    let r = cli.ok(&["backup", "list", "--hypervisor", "a"]).await;
    assert_eq!(r.rows().len(), 2, "{r:?}");
    assert!(r.rows().iter().all(|row| row[1] == "test"), "{r:?}");
    let r = cli
        .run(&["backup", "list", "web", "--hypervisor", "a"])
        .await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains(
            "vm web not found on hypervisor a (a VM gone from its hypervisor: name it by its uuid"
        ),
        "{r:?}"
    );
    let r = cli
        .run(&["backup", "list", "test", "--hypervisor", "zz"])
        .await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("no hypervisor \"zz\"") && !r.stderr.contains("uuid"),
        "{r:?}"
    );
    let r = cli.run(&["backup", "list", "--hypervisor", "gone"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("hypervisor gone is unreachable"), "{r:?}");
    let r = cli
        .run(&["backup", "show", &new.id.to_string(), "--hypervisor", "a"])
        .await;
    assert_eq!(r.code, 1, "{r:?}");

    // prune --vm NAME: refused with the uuids and hypervisors to pick from; --hypervisor
    // prunes the VM of that name there (by its uuid), leaving the other VM's backup alone.
    let keep1 = ["--keep-last", "1", "--dry-run", "--json"];
    let r = cli
        .run(&[&["prune", "--vm", "test"][..], &keep1].concat())
        .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("vm test names 2 backed-up VMs: pass --vm UUID, one of: ")
            && r.stderr.contains(OTHER_UUID)
            && r.stderr.contains(TEST_UUID)
            && r.stderr
                .contains("or --hypervisor NAME for the VM of that name there now, one of: a, b"),
        "{r:?}"
    );
    let args = [&["prune", "--vm", "test", "--hypervisor", "a"][..], &keep1].concat();
    let j = cli.ok(&args).await.json();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let (kept, removed) = (strings(&j["kept"]), strings(&j["removed"]));
    assert_eq!((kept.len(), removed.len()), (1, 1), "{j}");
    let mut both = [kept, removed].concat();
    both.sort();
    assert_eq!(both, of_test, "only the test driver VM's backups: {j}");
    assert!(!j.to_string().contains(&other.id.to_string()), "{j}");
    let r = cli
        .run(&["prune", "--hypervisor", "a", "--keep-last", "1"])
        .await;
    assert_eq!(r.code, 2, "--hypervisor needs --vm: {r:?}");

    // restore: --hypervisor travels in the body (a QMP one is refused, an unknown one is 404).
    let id = new.id.to_string();
    let r = cli
        .run(&[
            "restore",
            &id,
            "--as-domain",
            "copy1",
            "--hypervisor",
            "plain",
        ])
        .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("needs a libvirt hypervisor")
            && r.stderr.contains("with the CLI: --hypervisor NAME"),
        "{r:?}"
    );
    let r = cli
        .run(&[
            "restore",
            &id,
            "--onto-vm",
            "--confirm",
            "--hypervisor",
            "nope",
        ])
        .await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("no hypervisor \"nope\""), "{r:?}");
    let r = cli
        .run(&["restore", &id, "--to", "/tmp/x.qcow2", "--hypervisor", "a"])
        .await;
    assert_eq!(r.code, 2, "a file restore takes no hypervisor: {r:?}");
    assert_eq!(
        a.state
            .jobs
            .list()
            .iter()
            .filter(|j| j.kind == api::wire::jobs::JobKind::Restore)
            .count(),
        0
    );
}
