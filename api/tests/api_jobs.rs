//! The job registry: concurrency limits per hypervisor host and overall (waiting jobs show as
//! queued through the API), and the job history across a restart (finished jobs listed, a
//! job that was running when the daemon died shown as failed, "daemon restarted").

mod common;

use std::sync::Arc;
use std::time::Duration;

use api::daemon::jobs::{JobDone, JobLimits, JobSpec, Jobs};
use api::wire::jobs::{JobInfo, JobKind, JobMode, JobState};
use tokio::sync::oneshot;

/// A job on `host` that runs until its sender is used or dropped.
fn blocked(jobs: &Arc<Jobs>, host: &str, vm: &str) -> (JobInfo, oneshot::Sender<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let vm = vm.to_string();
    let spec = JobSpec::new(JobKind::Backup, &vm, JobMode::Auto).on(host, host);
    let info = jobs.start(spec, move |_| async move {
        let _ = rx.await;
        Ok(JobDone::Committed(format!("20261122T000000Z-{vm:0>8}")))
    });
    (info, tx)
}

async fn wait_state(jobs: &Jobs, id: u64, want: JobState) {
    for _ in 0..200 {
        if jobs.get(id).map(|j| j.state) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never reached {want:?}: {:?}", jobs.get(id));
}

/// Running jobs now, with their hosts.
fn running(jobs: &Jobs) -> Vec<(u64, String)> {
    jobs.list()
        .into_iter()
        .filter(|j| j.state == JobState::Running)
        .map(|j| (j.id, j.host))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_and_overall_limits_queue_jobs() {
    let limits = JobLimits {
        overall: 2,
        per_host: Some(1),
        ..JobLimits::default()
    };
    let jobs = Arc::new(Jobs::open(limits, "h1", None).unwrap());
    let mut held = Vec::new();
    for (host, vm) in [("h1", "a1"), ("h1", "a2"), ("h2", "b1"), ("h3", "c1")] {
        held.push(blocked(&jobs, host, vm));
    }
    // Whichever jobs win the race, the limits hold: two running, never two on one host, and
    // the second job of h1 waits for the first (jobs of a host start in queue order).
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = running(&jobs);
        assert!(now.len() <= 2, "{now:?}");
        let mut hosts: Vec<_> = now.iter().map(|(_, h)| h.clone()).collect();
        hosts.sort();
        hosts.dedup();
        assert_eq!(hosts.len(), now.len(), "two jobs on one host: {now:?}");
    }
    assert_eq!(running(&jobs).len(), 2, "{:?}", jobs.list());
    assert_eq!(jobs.get(held[1].0.id).unwrap().state, JobState::Queued);
    assert_eq!(jobs.get(held[3].0.id).unwrap().host, "h3");
    // Ending running jobs lets the queued ones run, one slot at a time.
    let mut senders: Vec<_> = held
        .iter_mut()
        .map(|(i, tx)| (i.id, Some(std::mem::replace(tx, oneshot::channel().0))))
        .collect();
    for _ in 0..4 {
        let (id, _) = running(&jobs)[0].clone();
        let tx = senders.iter_mut().find(|(i, _)| *i == id).unwrap().1.take();
        tx.unwrap().send(()).unwrap();
        wait_state(&jobs, id, JobState::Succeeded).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        jobs.list().iter().all(|j| j.state == JobState::Succeeded),
        "{:?}",
        jobs.list()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_are_visible_through_the_api() {
    let a = common::api().await;
    let jobs = a.state.jobs.clone();
    // The test state allows 2 jobs at once: a third waits.
    let held: Vec<_> = (0..3)
        .map(|i| blocked(&jobs, "local", &format!("v{i}")))
        .collect();
    wait_state(&jobs, held[1].0.id, JobState::Running).await;
    let (_, j) = common::call(&a.app, "GET", "/api/v1/jobs", Some(&a.auditor), None).await;
    let queued: Vec<_> = j
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "queued")
        .map(|j| j["vm"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(queued, ["v2"], "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_survives_a_restart_and_names_interrupted_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("jobs.jsonl");
    let limits = JobLimits {
        overall: 2,
        per_host: None,
        ..JobLimits::default()
    };
    let first = Arc::new(Jobs::open(limits.clone(), "h1", Some(&log)).unwrap());
    let (done, done_go) = blocked(&first, "h1", "done");
    let (running, _never) = blocked(&first, "h1", "running");
    done_go.send(()).unwrap();
    wait_state(&first, done.id, JobState::Succeeded).await;
    wait_state(&first, running.id, JobState::Running).await;
    // A torn line, as a kill -9 in the middle of a write would leave.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"id\":9,\"ki"))
        .unwrap();

    // The daemon dies (its jobs are never ended) and a new one reads the history.
    let second = Arc::new(Jobs::open(limits, "h1", Some(&log)).unwrap());
    let listed = second.list();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let d = second.get(done.id).unwrap();
    assert_eq!(d.state, JobState::Succeeded);
    assert_eq!(d.backup_id.as_deref(), Some("20261122T000000Z-0000done"));
    let r = second.get(running.id).unwrap();
    assert_eq!(r.state, JobState::Failed);
    let msg = r.message.unwrap_or_default();
    assert!(
        msg.contains("daemon restarted") && msg.contains("running"),
        "{msg}"
    );
    assert!(r.finished.is_some());
    let (next, _go) = blocked(&second, "h1", "next");
    assert_eq!(next.id, running.id + 1, "ids continue after the history");
    assert!(
        second.cancel(done.id).is_some(),
        "cancelling an old job is harmless"
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypervisors_of_one_host_share_its_limit_and_two_hosts_run_in_parallel() {
    use api::daemon::hypervisors::{HvSpec, Hypervisors};
    let mut kvm2 = HvSpec::libvirt("kvm2", "qemu+tls://kvm-2.example/system");
    kvm2.max_jobs = Some(2);
    let hvs = Hypervisors::new(vec![
        HvSpec::libvirt("local", "qemu:///system"),
        HvSpec::libvirt("local-ssh", "qemu+ssh://root@localhost/system"),
        kvm2,
        HvSpec::libvirt("kvm2-ssh", "qemu+ssh://kvm-2.example/system"),
    ]);
    let limits = JobLimits {
        overall: 8,
        per_host: Some(1),
        hosts: hvs.host_limits(),
    };
    let jobs = Arc::new(Jobs::open(limits, "localhost", None).unwrap());
    let on = |hv: &str, vm: &str| {
        let m = hvs.get(hv).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let spec = JobSpec::new(JobKind::Backup, vm, JobMode::Auto).on(m.name(), &m.spec.host);
        let info = jobs.start(spec, move |_| async move {
            let _ = rx.await;
            Ok(JobDone::Committed("20261122T000000Z-00000000".to_string()))
        });
        (info, tx)
    };
    let held = [
        on("local", "a"),
        on("local-ssh", "b"),
        on("kvm2", "c"),
        on("kvm2-ssh", "d"),
    ];
    wait_state(&jobs, held[0].0.id, JobState::Running).await;
    wait_state(&jobs, held[2].0.id, JobState::Running).await;
    wait_state(&jobs, held[3].0.id, JobState::Running).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // localhost (limit 1): the second URI of the same host waits; kvm-2.example (its
    // hypervisor's max_jobs = 2) runs both.
    assert_eq!(jobs.get(held[1].0.id).unwrap().state, JobState::Queued);
    assert_eq!(jobs.get(held[1].0.id).unwrap().host, "localhost");
    assert_eq!(
        jobs.get(held[3].0.id).unwrap().hypervisor.as_deref(),
        Some("kvm2-ssh")
    );
    let [(a, a_go), (b, _b_go), _, _] = held;
    a_go.send(()).unwrap();
    wait_state(&jobs, a.id, JobState::Succeeded).await;
    wait_state(&jobs, b.id, JobState::Running).await;
}

/// One job holds a VM at a time: a backup requested while another backup of the VM has not
/// ended is 409 naming that job (two would fight over libvirt's one backup job per domain),
/// a restore onto the VM likewise; a restore to a file does not hold the VM, the same name on
/// another hypervisor is another VM, and once the job ends the VM is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_one_backup_at_a_time() {
    let a = common::api().await;
    let jobs = a.state.jobs.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let held = jobs
        .start_exclusive(
            JobSpec::new(JobKind::Backup, "test", JobMode::Auto).on("local", "localhost"),
            move |_| async move {
                let _ = rx.await;
                Ok(JobDone::Done("held".to_string()))
            },
        )
        .expect("the vm is free");
    wait_state(&jobs, held.id, JobState::Running).await;
    let before = jobs.list().len();
    let (code, body) = common::call(
        &a.app,
        "POST",
        "/api/v1/vms/test/backups",
        Some(&a.operator),
        None,
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("busy") && msg.contains(&format!("job {}", held.id)),
        "{msg}"
    );
    assert_eq!(jobs.list().len(), before, "a refused request queued a job");
    let onto = JobSpec::new(JobKind::Restore, "test", JobMode::OntoVm).on("local", "localhost");
    let refused = jobs.start_exclusive(onto, |_| async { Ok(JobDone::Done(String::new())) });
    assert_eq!(refused.err().map(|j| j.id), Some(held.id));
    let to_file = JobSpec::new(JobKind::Restore, "test", JobMode::ToFile);
    assert!(jobs
        .start_exclusive(to_file, |_| async { Ok(JobDone::Done(String::new())) })
        .is_ok());
    let elsewhere = JobSpec::new(JobKind::Backup, "test", JobMode::Auto).on("other", "otherhost");
    assert!(jobs
        .start_exclusive(elsewhere, |_| async { Ok(JobDone::Done(String::new())) })
        .is_ok());
    tx.send(()).unwrap();
    wait_state(&jobs, held.id, JobState::Succeeded).await;
    let again = JobSpec::new(JobKind::Backup, "test", JobMode::Auto).on("local", "localhost");
    assert!(jobs
        .start_exclusive(again, |_| async { Ok(JobDone::Done(String::new())) })
        .is_ok());
}
