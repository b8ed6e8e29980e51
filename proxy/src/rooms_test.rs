//! The rooms of `docs/architecture.md` that a scan of the sources can check: `qemu-*`
//! processes are spawned, and libvirt XML (roxmltree) and QMP/qemu-img JSON (serde_json) are
//! parsed, only in `hypervisor/`; blocking work leaves the runtime only through `repo/` (the
//! repository seam) or the adapters (which may block on their own libraries): no
//! `spawn_blocking` elsewhere.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The lines of code (comments aside) under `src/` outside `rooms` that contain any of `what`.
fn outside(rooms: &[&str], what: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let me = file!().rsplit('/').next().unwrap_or_default().to_string();
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if rooms.iter().any(|r| rel.starts_with(r)) || rel == me {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code.filter(|l| what.iter().any(|w| l.contains(w))) {
            found.push(format!("{rel}: {}", line.trim()));
        }
    }
    found
}

#[test]
fn qemu_processes_xml_and_json_live_in_the_hypervisor_adapters() {
    let spawned = outside(&["hypervisor/"], &["Command::new"]);
    assert!(
        spawned.is_empty(),
        "processes spawned outside hypervisor/: {spawned:?}"
    );
    let parsed = outside(&["hypervisor/"], &["roxmltree", "serde_json"]);
    assert!(
        parsed.is_empty(),
        "xml or json outside hypervisor/: {parsed:?}"
    );
}

#[test]
fn the_blocking_pool_is_reached_only_through_the_repository_seam() {
    let blocking = outside(&["repo/", "hypervisor/"], &["spawn_blocking"]);
    assert!(
        blocking.is_empty(),
        "spawn_blocking outside repo/ and hypervisor/: {blocking:?}"
    );
}
