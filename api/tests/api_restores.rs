//! Restores through the API, on a real repository and libvirt's `test:///default` driver: a
//! backup disk to raw and qcow2 files (bytes equal, `qemu-img compare`), never overwriting
//! unless asked; hostile targets refused with nothing written; a backup restored as a new
//! domain that the hypervisor then lists; an existing name refused with 409.

mod common;

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use catalog::Manifest;
use common::{api, call, seed_backup, Api};

const SIZE: usize = 1 << 20;

/// A saved definition the test driver accepts back, with one disk `vda`.
const DOMAIN_XML: &str = "<domain type='test'><name>src</name>\
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory>\
    <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
    <driver name='qemu' type='qcow2'/><source file='/var/lib/x/src.qcow2'/>\
    <target dev='vda' bus='virtio'/></disk></devices></domain>";

fn data() -> Vec<u8> {
    let mut d: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    d[SIZE / 2..SIZE / 2 + 65536].fill(0);
    d
}

/// Commits a one-disk backup of VM `src` holding `data()`.
async fn seed(a: &Api) -> Manifest {
    seed_vm(a, "src").await
}

/// The same, as a backup of VM `vm` (the test driver's `test` has the same UUID).
async fn seed_vm(a: &Api, vm: &str) -> Manifest {
    seed_backup(a, vm, data(), DOMAIN_XML).await
}

async fn restore(a: &Api, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    let body = Some(body.to_string().into_bytes());
    call(&a.app, "POST", "/api/v1/restores", Some(&a.operator), body).await
}

/// Starts a restore, waits for its job; returns the final job.
async fn restore_done(a: &Api, body: serde_json::Value) -> serde_json::Value {
    let (s, j) = restore(a, body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    assert_eq!(j["kind"], "restore");
    let id = j["id"].as_u64().unwrap();
    for _ in 0..600 {
        let job = a.state.jobs.get(id).unwrap();
        if job.state.is_final() {
            return serde_json::to_value(job).unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("restore job {id} did not end");
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn restores(a: &Api) -> PathBuf {
    a.dir.path().join("restores")
}

/// Names in the restore directory (staging directories included).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_restores_to_raw_and_qcow2_and_is_never_overwritten_unless_asked() {
    let a = api().await;
    let m = seed(&a).await;
    // What a daemon killed mid-restore leaves: swept by the next restore into that directory.
    let stale = restores(&a).join(format!(".sluice-restore-{}-1", dead_pid()));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("half.raw"), b"partial").unwrap();
    let raw = restores(&a).join("src.raw");
    let body = serde_json::json!({"backup": m.id.to_string(), "to": raw, "format": "raw"});
    let job = restore_done(&a, body.clone()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["progress"]["bytes_done"], SIZE as u64, "{job}");
    assert!(
        std::fs::read(&raw).unwrap() == data(),
        "raw restore differs"
    );

    let (s, j) = restore(&a, body.clone()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");
    assert!(j["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already exists"));
    std::fs::write(&raw, b"old").unwrap();
    let mut again = body;
    again["overwrite"] = true.into();
    let job = restore_done(&a, again).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        std::fs::read(&raw).unwrap() == data(),
        "overwrite did not replace"
    );

    let q = restores(&a).join("src.qcow2");
    let body = serde_json::json!({"backup": m.id.to_string(), "to": q, "disk": "vda"});
    let job = restore_done(&a, body).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&q)
        .arg(&raw)
        .output()
        .expect("qemu-img (install qemu-utils: make deps)");
    assert!(cmp.status.success(), "{cmp:?}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&q)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(listing(&restores(&a)), ["src.qcow2", "src.raw"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_restore_targets_are_refused_and_nothing_is_written() {
    let a = api().await;
    let m = seed(&a).await;
    let id = m.id.to_string();
    let running = seed_vm(&a, "test").await.id.to_string();
    let dir = restores(&a);
    std::os::unix::fs::symlink("/tmp", dir.join("escape")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let inside = dir.join("x.raw").to_string_lossy().into_owned();
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (
            serde_json::json!({"backup": id, "to": "x.raw"}),
            400,
            "absolute",
        ),
        (
            serde_json::json!({"backup": id, "to": format!("{}/../x.raw", dir.display())}),
            400,
            "`..`",
        ),
        (
            serde_json::json!({"backup": id, "to": format!("{inside}\u{0}.raw")}),
            400,
            "NUL",
        ),
        (
            serde_json::json!({"backup": id, "to": "/tmp/x.raw"}),
            400,
            "restore_dirs",
        ),
        (
            serde_json::json!({"backup": id, "to": dir.join("escape/x.raw")}),
            400,
            "restore_dirs",
        ),
        (
            serde_json::json!({"backup": id, "to": dir.join("nodir/x.raw")}),
            400,
            "directory",
        ),
        (
            serde_json::json!({"backup": id, "to": dir.join("sub")}),
            409,
            "not a regular file",
        ),
        (
            serde_json::json!({"backup": id, "to": dir.join("escape")}),
            409,
            "not a regular file",
        ),
        (
            serde_json::json!({"backup": id, "to": inside, "as_domain": "n"}),
            400,
            "exactly one",
        ),
        (serde_json::json!({"backup": id}), 400, "exactly one"),
        (
            serde_json::json!({"backup": id, "to": inside, "disk": "vdz"}),
            404,
            "vdz",
        ),
        (
            serde_json::json!({"backup": id, "to": inside, "disk": "../vda"}),
            400,
            "`..`",
        ),
        (
            serde_json::json!({"backup": id, "to": inside, "format": "vmdk"}),
            400,
            "vmdk",
        ),
        (
            serde_json::json!({"backup": "20200101-missing", "to": inside}),
            404,
            "20200101",
        ),
        (
            serde_json::json!({"backup": id, "as_domain": "a/b"}),
            400,
            "path separator",
        ),
        (
            serde_json::json!({"backup": id, "onto_vm": true, "confirm": true}),
            404,
            "src",
        ),
        (
            serde_json::json!({"backup": running, "onto_vm": true}),
            409,
            "shut it off",
        ),
        (
            serde_json::json!({"backup": id, "to": inside, "onto_vm": true}),
            400,
            "exactly one",
        ),
    ];
    for (body, status, needle) in cases {
        let (s, j) = restore(&a, body.clone()).await;
        let msg = j["error"]["message"].as_str().unwrap_or("").to_string();
        assert_eq!(s.as_u16(), status, "{body}: {j}");
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    assert_eq!(listing(&dir), ["escape", "sub"]);
    assert!(
        a.state.jobs.list().is_empty(),
        "a refused restore queued a job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_as_a_new_domain_and_an_existing_name_is_refused() {
    let a = api().await;
    let m = seed(&a).await;
    let id = m.id.to_string();
    let (s, j) = restore(&a, serde_json::json!({"backup": id, "as_domain": "test"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");

    let job = restore_done(
        &a,
        serde_json::json!({"backup": id, "as_domain": "restored1"}),
    )
    .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["mode"], "as-domain");
    let disk = restores(&a).join("restored1-vda.qcow2");
    assert!(disk.exists(), "{job}");
    let (s, vm) = call(&a.app, "GET", "/api/v1/vms/restored1", Some(&a.admin), None).await;
    assert_eq!(s, StatusCode::OK, "{vm}");
    assert_eq!(vm["state"], "shutoff");
    let (s, j) = restore(
        &a,
        serde_json::json!({"backup": id, "as_domain": "restored1"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");
    assert_eq!(
        listing(&restores(&a)),
        ["restored1-run", "restored1-vda.qcow2"]
    );
}
