//! Several hypervisors behind one daemon: the config's `[[hypervisors]]` checks (every
//! problem with its line and column), `GET /hypervisors` with an unreachable member, VM
//! listing that names the unreachable ones, the name-collision rule (409 until
//! `?hypervisor=` picks one), and restores refused on a QMP hypervisor.

mod common;

use api::daemon::config::Config;
use api::daemon::hypervisors::{uri_host, HvSpec};
use axum::http::StatusCode;
use common::{api_with, call, seed_backup, seed_backup_of};
use serde_json::Value;

fn err(j: &Value) -> String {
    j["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn restore(a: &common::Api, body: &str) -> (StatusCode, Value) {
    let t = Some(a.admin.as_str());
    call(&a.app, "POST", "/api/v1/restores", t, Some(body.into())).await
}

fn config_errors(text: &str) -> Vec<String> {
    Config::parse(text)
        .unwrap_err()
        .iter()
        .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
        .collect()
}

#[test]
fn config_names_hypervisors_and_refuses_bad_entries_with_line_and_column() {
    let good = r#"
max_jobs_per_host = 2
[[hypervisors]]
name = "local"
libvirt_uri = "qemu:///system"
[[hypervisors]]
name = "kvm-2.example"
libvirt_uri = "qemu+ssh://backup@kvm-2.example/system"
max_jobs = 1
[[hypervisors]]
name = "plain_qemu"
socket = "/run/qemu/vm7.qmp"
vm = "vm7"
"#;
    let specs = Config::parse(good).unwrap().hypervisor_specs();
    let got: Vec<_> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.host.as_str(), s.max_jobs))
        .collect();
    assert_eq!(
        got,
        [
            ("local", "localhost", None),
            ("kvm-2.example", "kvm-2.example", Some(1)),
            ("plain_qemu", "localhost", None)
        ]
    );

    let hostile = "[[hypervisors]]\nname = \"../etc\"\nlibvirt_uri = \"qemu:///system\"\n";
    let e = config_errors(hostile);
    assert!(e[0].starts_with("2:8: hypervisor name \"../etc\""), "{e:?}");
    let nul = "[[hypervisors]]\nname = \"a\\u0000b\"\nlibvirt_uri = \"qemu:///system\"\n";
    assert!(
        config_errors(nul)[0].starts_with("2:8: "),
        "{:?}",
        config_errors(nul)
    );

    let twice = "[[hypervisors]]\nname = \"a\"\nlibvirt_uri = \"qemu:///system\"\n\
                 [[hypervisors]]\nname = \"a\"\nsocket = \"/q.sock\"\nvm = \"q\"\n";
    assert_eq!(
        config_errors(twice),
        ["5:8: hypervisor name \"a\" is used twice"]
    );

    let both = "[[hypervisors]]\nname = \"x\"\nlibvirt_uri = \"qemu:///system\"\nsocket = \"/q\"\n";
    assert!(
        config_errors(both)[0].contains("not both"),
        "{:?}",
        config_errors(both)
    );
    let no_vm = "\n[[hypervisors]]\nname = \"x\"\nsocket = \"/q.sock\"\n";
    let e = config_errors(no_vm);
    assert!(
        e[0].starts_with("2:1: hypervisor \"x\": a QMP socket needs vm"),
        "{e:?}"
    );
    let relative = "[[hypervisors]]\nname = \"x\"\nsocket = \"q.sock\"\nvm = \"q\"\n";
    assert!(config_errors(relative)[0].contains("absolute"));
    let zero = "[[hypervisors]]\nname = \"x\"\nlibvirt_uri = \"qemu:///system\"\nmax_jobs = 0\n";
    assert!(config_errors(zero)[0].contains("at least 1"));
    let unknown = "[[hypervisors]]\nname = \"x\"\nlibvirt_url = \"qemu:///system\"\n";
    let e = config_errors(unknown);
    assert!(
        e[0].starts_with("3:1: ") && e[0].contains("libvirt_url"),
        "{e:?}"
    );
    let mixed = "libvirt_uri = \"qemu:///system\"\n[[hypervisors]]\nname = \"q\"\nsocket = \"/q.sock\"\nvm = \"q\"\n";
    let names: Vec<_> = Config::parse(mixed)
        .unwrap()
        .hypervisor_specs()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        ["default", "q"],
        "libvirt_uri is one more hypervisor"
    );
    let clash = mixed.replace("\"q\"\nsocket", "\"default\"\nsocket");
    let e = config_errors(&clash);
    assert!(
        e[0].starts_with("3:8: ") && e[0].contains("libvirt_uri"),
        "{e:?}"
    );
}

#[test]
fn two_uris_of_one_host_share_its_host_key() {
    assert_eq!(uri_host("qemu:///system"), "localhost");
    assert_eq!(uri_host("qemu+ssh://root@localhost/system"), "localhost");
    assert_eq!(uri_host("qemu+tls://h2:16514/system"), "h2");
    assert_eq!(uri_host("qemu+ssh://h2/session"), "h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_hypervisor_is_named_and_hides_no_other_vm() {
    let missing = std::env::temp_dir().join(format!("sluice-no-such-{}.qmp", std::process::id()));
    let a = api_with(vec![
        HvSpec::libvirt("local", "test:///default"),
        HvSpec::libvirt("gone", "qemu+ssh://nonexistent.invalid/system"),
        HvSpec::qmp("noqemu", missing.clone(), "q"),
    ])
    .await;
    let t = Some(a.auditor.as_str());
    let (s, j) = call(&a.app, "GET", "/api/v1/hypervisors", t, None).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let hv = |name: &str| {
        j.as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap()
    };
    let local = hv("local");
    assert_eq!(
        (local["state"].as_str(), local["kind"].as_str()),
        (Some("up"), Some("libvirt"))
    );
    assert_eq!(local["vms"], 1, "{local}");
    assert_eq!(local["error"], Value::Null);
    let gone = hv("gone");
    assert_eq!(gone["state"], "unreachable", "{gone}");
    assert_eq!(gone["host"], "nonexistent.invalid");
    assert!(
        gone["error"]
            .as_str()
            .unwrap()
            .contains("nonexistent.invalid"),
        "{gone}"
    );
    let noqemu = hv("noqemu");
    assert_eq!(
        (noqemu["kind"].as_str(), noqemu["state"].as_str()),
        (Some("qmp"), Some("unreachable"))
    );
    assert_eq!(noqemu["socket"], missing.display().to_string());
    assert!(
        noqemu["error"].as_str().unwrap().contains("qmp socket"),
        "{noqemu}"
    );

    let (s, j) = call(&a.app, "GET", "/api/v1/vms", t, None).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(j["vms"][0]["name"], "test", "{j}");
    assert_eq!(j["vms"][0]["hypervisor"], "local", "{j}");
    let down: Vec<_> = j["unreachable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["hypervisor"].as_str().unwrap())
        .collect();
    assert_eq!(down, ["gone", "noqemu"], "{j}");

    // The VM is found on the reachable one; an unknown name might be on a down one: 503.
    let (s, j) = call(&a.app, "GET", "/api/v1/vms/test", t, None).await;
    assert_eq!(
        (s, j["hypervisor"].as_str()),
        (StatusCode::OK, Some("local")),
        "{j}"
    );
    let (s, j) = call(&a.app, "GET", "/api/v1/vms/elsewhere", t, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{j}");
    assert!(err(&j).contains("unreachable: gone"), "{j}");
    let (s, j) = call(
        &a.app,
        "GET",
        "/api/v1/vms/elsewhere?hypervisor=local",
        t,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    assert_eq!(err(&j), "vm elsewhere not found on hypervisor local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_name_on_two_hypervisors_needs_the_hypervisor_named() {
    // Each connection to test:///default is its own driver instance with a VM `test`.
    let a = api_with(vec![
        HvSpec::libvirt("a", "test:///default"),
        HvSpec::libvirt("b", "test:///default"),
    ])
    .await;
    let t = Some(a.admin.as_str());
    let (s, j) = call(&a.app, "GET", "/api/v1/vms", t, None).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let on: Vec<_> = j["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{}@{}",
                v["name"].as_str().unwrap(),
                v["hypervisor"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(on, ["test@a", "test@b"]);

    let (s, j) = call(&a.app, "GET", "/api/v1/vms/test", t, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");
    assert_eq!(j["error"]["code"], "ambiguous_vm");
    assert!(
        err(&j).contains("hypervisors a, b") && err(&j).contains("?hypervisor="),
        "{j}"
    );
    let (s, j) = call(&a.app, "POST", "/api/v1/vms/test/backups", t, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");
    assert_eq!(
        a.state.jobs.list().len(),
        0,
        "no job from an ambiguous name"
    );

    let (s, j) = call(&a.app, "GET", "/api/v1/vms/test?hypervisor=b", t, None).await;
    assert_eq!(
        (s, j["hypervisor"].as_str()),
        (StatusCode::OK, Some("b")),
        "{j}"
    );
    let (s, j) = call(
        &a.app,
        "POST",
        "/api/v1/vms/test/backups?hypervisor=a",
        t,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    assert_eq!(
        (j["hypervisor"].as_str(), j["host"].as_str()),
        (Some("a"), Some("localhost"))
    );
    let (s, j) = call(&a.app, "GET", "/api/v1/vms/test?hypervisor=zz", t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    assert!(err(&j).contains("configured: a, b"), "{j}");
    for bad in [
        "/api/v1/vms/test?hypervisor=..%2Fx",
        "/api/v1/vms/test?hypervisr=a",
    ] {
        let (s, j) = call(&a.app, "GET", bad, t, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {j}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_as_a_domain_refuse_a_qmp_hypervisor() {
    let a = api_with(vec![
        HvSpec::libvirt("local", "test:///default"),
        HvSpec::qmp("plain", "/nonexistent/plain.qmp".into(), "vm"),
    ])
    .await;
    let m = seed_backup(&a, "test", vec![7u8; 65536], "<domain/>").await;
    for body in [
        format!(
            r#"{{"backup":"{}","as_domain":"copy1","hypervisor":"plain"}}"#,
            m.id
        ),
        format!(
            r#"{{"backup":"{}","onto_vm":true,"confirm":true,"hypervisor":"plain"}}"#,
            m.id
        ),
    ] {
        let (s, j) = restore(&a, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{j}");
        assert!(err(&j).contains("needs a libvirt hypervisor"), "{j}");
    }
    let body = format!(
        r#"{{"backup":"{}","as_domain":"copy1","hypervisor":"nope"}}"#,
        m.id
    );
    let (s, j) = restore(&a, &body).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{j}");
    assert_eq!(a.state.jobs.list().len(), 0, "nothing started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hypervisor_down_at_start_is_reached_once_it_is_up_and_marked_when_it_dies() {
    use api::daemon::hypervisors::RETRY_AFTER;
    use testbed::qmp::PlainQemu;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("later.qmp");
    let a = api_with(vec![
        HvSpec::libvirt("local", "test:///default"),
        HvSpec::qmp("later", link.clone(), "vm"),
    ])
    .await;
    let t = Some(a.auditor.as_str());
    let state = |j: &Value| j[1]["state"].as_str().unwrap_or("").to_string();
    let (_, j) = call(&a.app, "GET", "/api/v1/hypervisors", t, None).await;
    assert_eq!(state(&j), "unreachable", "{j}");

    // QEMU comes up: after RETRY_AFTER the next use connects.
    let qemu = PlainQemu::start("api-hv-later", 16 << 20, &[]).unwrap();
    std::os::unix::fs::symlink(qemu.dir().join("qmp.sock"), &link).unwrap();
    tokio::time::sleep(RETRY_AFTER).await;
    let (_, j) = call(&a.app, "GET", "/api/v1/hypervisors", t, None).await;
    assert_eq!(
        (state(&j).as_str(), &j[1]["vms"]),
        ("up", &Value::from(1)),
        "{j}"
    );
    let (_, j) = call(&a.app, "GET", "/api/v1/vms", t, None).await;
    assert_eq!(j["vms"].as_array().unwrap().len(), 2, "{j}");

    // QEMU dies: the next listing marks it unreachable, the other still lists.
    drop(qemu);
    let (_, j) = call(&a.app, "GET", "/api/v1/vms", t, None).await;
    assert_eq!(j["vms"][0]["hypervisor"], "local", "{j}");
    assert_eq!(j["unreachable"][0]["hypervisor"], "later", "{j}");
    let (_, j) = call(&a.app, "GET", "/api/v1/hypervisors", t, None).await;
    assert_eq!(state(&j), "unreachable", "{j}");
    assert!(j[1]["error"].as_str().unwrap().contains("later"), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_backs_up_its_vms_on_every_reachable_hypervisor() {
    let a = api_with(vec![
        HvSpec::libvirt("a", "test:///default"),
        HvSpec::libvirt("gone", "qemu+ssh://nonexistent.invalid/system"),
        HvSpec::libvirt("b", "test:///default"),
    ])
    .await;
    let source = "name = \"all\"\nvms = [\"te*\"]\nschedule = \"* * * * *\"\n";
    let body = serde_json::json!({ "source": source }).to_string();
    let t = Some(a.admin.as_str());
    let (s, j) = call(&a.app, "POST", "/api/v1/policies", t, Some(body.into())).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let now = api::daemon::clock::now();
    let jobs = api::daemon::schedule::scheduler::tick(&a.state, now + 120).await;
    let on: Vec<_> = jobs
        .iter()
        .map(|j| (j.vm.as_str(), j.hypervisor.as_deref(), j.policy.as_deref()))
        .collect();
    // A name on two hypervisors is two VMs; the down hypervisor is skipped, not fatal.
    assert_eq!(
        on,
        [
            ("test", Some("a"), Some("all")),
            ("test", Some("b"), Some("all"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_of_two_vms_of_one_name_are_both_listed_and_prune_asks_for_the_uuid() {
    let a = api_with(vec![HvSpec::libvirt("local", "test:///default")]).await;
    let other = "0d7c5a9e-1111-4222-8333-944455556666";
    seed_backup(&a, "web", vec![1u8; 65536], "<domain/>").await;
    seed_backup_of(&a, "web", other, vec![2u8; 65536], "<domain/>").await;
    let t = Some(a.admin.as_str());
    let (s, j) = call(&a.app, "GET", "/api/v1/backups?vm=web", t, None).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let mut uuids: Vec<_> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["vm_uuid"].as_str().unwrap())
        .collect();
    uuids.sort();
    assert_eq!(uuids, [other, "6695eb01-f6a4-8304-79aa-97f2502e193f"]);
    let (s, j) = call(
        &a.app,
        "GET",
        &format!("/api/v1/backups?vm={other}"),
        t,
        None,
    )
    .await;
    assert_eq!(
        (s, j.as_array().map(Vec::len)),
        (StatusCode::OK, Some(1)),
        "{j}"
    );

    let prune = |vm: &str| {
        serde_json::json!({ "vm": vm, "keep_last": 1, "dry_run": true })
            .to_string()
            .into_bytes()
    };
    let (s, j) = call(&a.app, "POST", "/api/v1/prune", t, Some(prune("web"))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{j}");
    assert!(err(&j).contains(other), "{j}");
    let (s, j) = call(&a.app, "POST", "/api/v1/prune", t, Some(prune(other))).await;
    assert_eq!(s, StatusCode::OK, "{j}");
}
