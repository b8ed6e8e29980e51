//! A real process writing backups (with prune and GC) is killed with SIGKILL at random
//! moments, many rounds; after each, the repository reopens, verifies clean, and every
//! committed backup reads back the exact contents it recorded.

use catalog::{FsBackend, RepoOptions, Repository, VerifyMode};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn check(dir: &std::path::Path, round: u32) -> usize {
    let backend = Arc::new(FsBackend::open(dir.join("repo")).unwrap());
    let repo = match Repository::open(backend, RepoOptions::new(dir.join("catalog.sqlite"))) {
        Err(e) if e.kind() == catalog::ErrorKind::NotFound => return 0, // killed before create
        r => r.unwrap(),
    };
    let rep = repo.verify(VerifyMode::Full, None).unwrap();
    assert!(rep.is_ok(), "round {round}: {rep:?}");
    let rows = repo.backups(None).unwrap();
    for row in &rows {
        let r = repo.open_disk(&row.id, "vda").unwrap();
        let mut buf = vec![0u8; r.size() as usize];
        r.read_at(0, &mut buf).unwrap();
        let want = repo.manifest(&row.id).unwrap().domain_xml;
        assert_eq!(
            blake3::hash(&buf).to_hex().as_str(),
            want,
            "round {round}: backup {}",
            row.id
        );
    }
    rows.len()
}

#[test]
fn kill_9_at_random_moments_never_damages_committed_backups() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_catalog-crash-writer");
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut committed = 0;
    for round in 0..16u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let child = Command::new(exe)
            .arg(dir.path().join("repo"))
            .arg(dir.path().join("catalog.sqlite"))
            .arg(round.to_string())
            .spawn()
            .expect("spawn catalog-crash-writer");
        let mut guard = KillOnDrop(child);
        std::thread::sleep(Duration::from_millis(40 + rng % 400));
        if let Some(status) = guard.0.try_wait().unwrap() {
            panic!("round {round}: writer exited early with {status}");
        }
        guard.0.kill().unwrap();
        guard.0.wait().unwrap();
        committed = check(dir.path(), round);
    }
    eprintln!("backups present after the last kill: {committed}");
    assert!(committed > 0, "no backup ever committed");
}
