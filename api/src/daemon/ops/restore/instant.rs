//! Instant recovery (`restore ID --instant [--hypervisor H] [--as-domain NAME]`): a new domain
//! on a libvirt hypervisor whose every disk is a writable NBD export of the backup on the
//! daemon's NBD server (over TLS when `nbd_tls`), started at once; the job stays `running`
//! for as long as the domain runs from the repository, and shows the domain, its exports and
//! the bytes the guest wrote (`JobInfo.instant`).
//!
//! Writes are kept in each export's copy-on-write overlay on the proxy (the daemon's
//! `work/overlays`), not on the hypervisor: nothing has to be created there (no pool, no
//! file, no path of the hypervisor's), cancel leaves nothing behind on it, and a later copy
//! into a pool (`virsh blockcopy`-style) reads the guest's disk through the export, writes
//! included. The cost: guest writes cross the network, and the domain cannot outlive the
//! daemon (its overlays' block maps are in memory).
//!
//! Life of the job: hold the backup (prune keeps it, GC keeps its chunks), open the exports,
//! record the domain and exports in the job (and the job history) before defining it, define
//! and start it (undefined again if the start fails), give back the job's concurrency slots,
//! then watch the domain every few seconds until the job is cancelled (`job cancel`, or the
//! daemon stopping) or the domain disappears. Ending destroys and undefines the domain (only
//! one whose NBD disks are this job's exports), closes the exports (their overlays, with the
//! guest's writes, are deleted) and releases the hold. After a daemon crash the restart's
//! clean-up ends the domain from what the job history recorded ([`clean_after_restart`]).

use std::sync::Arc;
use std::time::Duration;

use catalog::{BackupHold, Manifest};
use proxy::hypervisor::libvirt::{Ended, LibvirtHypervisor};
use proxy::hypervisor::VmState;
use proxy::restore::{instant_domain, ExportName, InstantDisk, NbdAddress, RepoExport};

use crate::daemon::error::{ApiError, ApiResult};
use crate::daemon::exports::Exports;
use crate::daemon::hypervisors::{Hv, Member};
use crate::daemon::instant::{InstantRun, RunDisk};
use crate::daemon::jobs::{JobDone, JobHandle, JobOutcome, JobSpec};
use crate::daemon::names::validate_name;
use crate::daemon::ops::failure;
use crate::daemon::state::{AppState, SharedState};
use crate::wire::instant::{InstantDiskInfo, InstantInfo, InstantState};
use crate::wire::jobs::{JobError, JobInfo, JobKind, JobMode};
use crate::wire::restores::RestoreRequest;

/// How often a running instant recovery looks at its domain.
const WATCH_EVERY: Duration = Duration::from_secs(3);
/// How long ending waits for the exports' last connections (the destroyed QEMU's) to close.
const CLOSE_WAIT: Duration = Duration::from_secs(15);

/// An instant recovery as its job will run it, once `start` has checked the request.
struct Plan {
    hv: Arc<Member>,
    domain: String,
    manifest: Manifest,
    at: NbdAddress,
    hold: BackupHold,
}

/// Starts an instant recovery of `manifest` on `hv` (the restore's hypervisor, as
/// `ops::restore` chose it): the queued job, or a refusal naming what is wrong.
pub(super) async fn start(
    st: &SharedState,
    req: RestoreRequest,
    manifest: Manifest,
    hv: Arc<Member>,
) -> ApiResult<JobInfo> {
    if req.to.is_some() || req.onto_vm || req.disk.is_some() {
        return Err(ApiError::bad_request(
            "an instant recovery runs every disk of the backup as a new domain: it takes no `to`, `onto_vm` or `disk`",
        ));
    }
    let id = manifest.id.clone();
    if st.exports.is_none() {
        return Err(ApiError::unavailable(
            "instant recovery needs the NBD server (nbd_listen)",
        ));
    }
    let at = st.instant.at.clone().ok_or_else(|| {
        ApiError::unavailable(
            "instant recovery needs the address hypervisors reach the NBD server at: set nbd_advertise (nbd_listen is unspecified)",
        )
    })?;
    let domain = req
        .as_domain
        .clone()
        .unwrap_or_else(|| format!("{}-instant", manifest.vm.name));
    validate_name("domain name", &domain)?;
    if hv.list().await?.iter().any(|d| d.name == domain) {
        return Err(ApiError::conflict(format!(
            "domain {domain} already exists on hypervisor {}; choose another name (as_domain, --as-domain)",
            hv.name()
        )));
    }
    let why = format!("instant recovery as domain {domain}");
    let hold = st.repo(move |r| r.hold(&id, &why)).await?;
    let spec = JobSpec::new(JobKind::Restore, &manifest.vm.name, JobMode::Instant)
        .on(hv.name(), &hv.spec.host);
    let plan = Plan {
        hv,
        domain,
        manifest,
        at,
        hold,
    };
    let state = st.clone();
    Ok(st.jobs.start(spec, move |h| run(state, plan, h)))
}

/// Why a running instant recovery ends.
enum End {
    /// The job was cancelled (or the daemon is stopping).
    Cancelled,
    /// The domain no longer exists on the hypervisor.
    Gone,
}

async fn run(st: SharedState, plan: Plan, h: JobHandle) -> JobOutcome {
    let ex = st
        .exports
        .as_ref()
        .ok_or_else(|| failure::refused("the NBD server is gone"))?;
    let served = Served::open(&st, ex, &plan, h.id).await?;
    let mut info = served.info(&plan);
    st.jobs.set_instant(h.id, info.clone(), true);
    let lv_conn = plan.hv.hv().await.map_err(|e| failure::hypervisor(&e))?;
    let lv = libvirt(&*lv_conn, &plan.hv)?;
    boot(&plan, &served, lv).await?;
    info.state = InstantState::Running;
    st.jobs.set_instant(h.id, info.clone(), true);
    st.instant.insert(Arc::new(served.run(&plan, h.id)));
    h.release_slots();
    tracing::info!(job = h.id, domain = %plan.domain, backup = %plan.manifest.id, "instant recovery running");
    let end = watch(&st, lv, &served, &h, &mut info).await;
    info.state = InstantState::Ending;
    st.jobs.set_instant(h.id, info.clone(), true);
    st.instant.remove(h.id);
    let written = served.written();
    let ended = match end {
        End::Gone => Ok(Ended::Gone),
        End::Cancelled => lv.end_instant_domain(&plan.domain, &served.names()).await,
    };
    let left = served.close().await;
    info.state = InstantState::Ended;
    st.jobs.set_instant(h.id, info, false);
    drop(plan.hold);
    outcome(&plan.domain, plan.hv.name(), end, ended, written, left)
}

/// Defines and starts the domain on the exports; a refusal says where TLS is set up.
async fn boot(plan: &Plan, served: &Served, lv: &LibvirtHypervisor) -> Result<(), JobError> {
    let names: Vec<String> = match plan.hv.list().await {
        Ok(d) => d.into_iter().map(|d| d.name).collect(),
        Err(e) => return Err(failure::hypervisor(&e)),
    };
    let xml = instant_domain(
        &plan.manifest.domain_xml,
        &plan.domain,
        &served.instant_disks(),
        &plan.at,
        None,
        &names,
    )
    .map_err(|e| failure::restore(&e))?;
    lv.define_and_start(&xml).await.map(drop).map_err(|e| {
        let mut j = failure::hypervisor(&e);
        if plan.at.tls {
            j.message.push_str(&format!(
                " (QEMU on hypervisor {} reads the disks from nbds://{}:{}: its qemu.conf needs nbd_tls_x509_cert_dir with a ca-cert.pem that signed Sluice's NBD certificate and a client certificate; see docs/remote.md, \"Instant recovery\")",
                plan.hv.name(),
                plan.at.host,
                plan.at.port
            ));
        }
        j
    })
}

/// Waits until the job is cancelled or the domain is gone, keeping the job's view of the
/// domain's state and the bytes written up to date.
async fn watch(
    st: &AppState,
    lv: &LibvirtHypervisor,
    served: &Served,
    h: &JobHandle,
    info: &mut InstantInfo,
) -> End {
    loop {
        tokio::select! {
            _ = h.cancel.cancelled() => return End::Cancelled,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        match lv.domain_state(&info.domain).await {
            Ok(None) => return End::Gone,
            Ok(Some(s)) => info.domain_state = Some(state_name(s).into()),
            Err(e) => {
                tracing::warn!(job = h.id, domain = %info.domain, "instant recovery: the domain's state: {}", crate::daemon::error::chain(&e));
            }
        }
        for (d, w) in info.disks.iter_mut().zip(served.written_each()) {
            d.written = w;
        }
        st.jobs.set_instant(h.id, info.clone(), false);
    }
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::ShutOff => "shut_off",
        VmState::Other => "other",
    }
}

/// The job's end, said once: what happened to the domain, the exports and the writes.
fn outcome(
    domain: &str,
    hv: &str,
    end: End,
    ended: proxy::hypervisor::Result<Ended>,
    written: u64,
    left: Vec<String>,
) -> JobOutcome {
    let lost = format!("the guest's writes since it booted ({written} bytes) are discarded");
    let mut closed = "exports closed".to_string();
    if !left.is_empty() {
        closed.push_str(&format!(
            " (overlays {} still open by a client: removed when it disconnects)",
            left.join(", ")
        ));
    }
    let what = match ended {
        Err(e) => {
            return Err(failure::failed(format!(
                "instant recovery ended with its {closed}, but domain {domain} could not be ended on hypervisor {hv}: {}; destroy and undefine it by hand (virsh destroy {domain}; virsh undefine {domain}); {lost}",
                crate::daemon::error::chain(&e)
            )))
        }
        Ok(Ended::Destroyed) => format!("domain {domain} destroyed and undefined on hypervisor {hv}"),
        Ok(Ended::Undefined) => format!("domain {domain} (shut off) undefined on hypervisor {hv}"),
        Ok(Ended::Gone) => format!("domain {domain} was no longer on hypervisor {hv}"),
    };
    let text = format!("instant recovery ended: {what}, {closed}; {lost}");
    match end {
        End::Cancelled => Err(JobError::cancelled(text)),
        End::Gone => Ok(JobDone::Done(text)),
    }
}

fn libvirt<'a>(conn: &'a dyn Hv, hv: &Member) -> Result<&'a LibvirtHypervisor, JobError> {
    conn.as_any()
        .downcast_ref::<LibvirtHypervisor>()
        .ok_or_else(|| {
            failure::refused(format!(
                "hypervisor {} is not a libvirt hypervisor",
                hv.name()
            ))
        })
}

/// The job's exports on the NBD server; closed (removed from the server) on every path.
struct Served {
    server: Arc<proxy::nbd::Server>,
    disks: Vec<RunDisk>,
    nbd: String,
}

impl Served {
    /// Opens a writable export of every disk of the backup, named `sluice-instant-JOB/DISK`.
    async fn open(st: &AppState, ex: &Exports, plan: &Plan, job: u64) -> Result<Served, JobError> {
        let m = &plan.manifest;
        let scheme = if plan.at.tls { "nbds" } else { "nbd" };
        let mut served = Served {
            server: ex.server.clone(),
            disks: Vec::new(),
            nbd: format!("{scheme}://{}:{}", plan.at.host, plan.at.port),
        };
        for d in &m.disks {
            let name =
                ExportName::new(&m.vm.name, &d.target, &m.id).map_err(|e| failure::restore(&e))?;
            let served_name = format!("sluice-instant-{job}/{}", d.target);
            let opts = ex
                .options(&served_name, true, None)
                .map_err(|e| failure::refused(e.message))?;
            let export = RepoExport::open(&st.repo, &name, opts)
                .await
                .map_err(|e| failure::restore(&e))?;
            served
                .server
                .add_export(served_name.clone(), export.clone());
            served.disks.push(RunDisk {
                target: d.target.clone(),
                export: served_name,
                served: export,
                size: d.size,
            });
        }
        Ok(served)
    }

    fn names(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.export.clone()).collect()
    }

    fn instant_disks(&self) -> Vec<InstantDisk> {
        self.disks
            .iter()
            .map(|d| InstantDisk {
                target: d.target.clone(),
                export: d.export.clone(),
            })
            .collect()
    }

    fn written_each(&self) -> Vec<u64> {
        self.disks
            .iter()
            .map(|d| d.served.overlay_bytes())
            .collect()
    }

    fn written(&self) -> u64 {
        self.written_each().iter().sum()
    }

    fn info(&self, plan: &Plan) -> InstantInfo {
        InstantInfo {
            state: InstantState::Starting,
            backup: plan.manifest.id.to_string(),
            domain: plan.domain.clone(),
            hypervisor: plan.hv.name().to_string(),
            domain_state: None,
            nbd: self.nbd.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| InstantDiskInfo {
                    target: d.target.clone(),
                    export: d.export.clone(),
                    size: d.size,
                    written: 0,
                })
                .collect(),
        }
    }

    fn run(&self, plan: &Plan, job: u64) -> InstantRun {
        InstantRun {
            job,
            hypervisor: plan.hv.name().to_string(),
            domain: plan.domain.clone(),
            backup: plan.manifest.id.clone(),
            disks: self.disks.clone(),
        }
    }

    /// Removes the exports from the server and waits (up to [`CLOSE_WAIT`]) for their last
    /// connections to close, which deletes their overlays; the overlays still there then.
    async fn close(mut self) -> Vec<String> {
        let paths: Vec<_> = self
            .disks
            .iter()
            .filter_map(|d| d.served.overlay_path().map(|p| p.to_path_buf()))
            .collect();
        self.remove();
        let start = std::time::Instant::now();
        while paths.iter().any(|p| p.exists()) && start.elapsed() < CLOSE_WAIT {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        paths
            .iter()
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect()
    }

    fn remove(&mut self) {
        for d in self.disks.drain(..) {
            self.server.remove_export(&d.export);
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.remove();
    }
}

/// After a crash: ends the domain a dead daemon's instant recovery `job` left running from
/// exports that died with it (the guest sees I/O errors; its writes died with the overlays'
/// block maps). The note for the job's message; `Err` when the domain could not be ended.
pub async fn clean_after_restart(st: &AppState, job: &JobInfo) -> Result<String, String> {
    let Some(info) = &job.instant else {
        return Ok("cleaned up: it had defined no domain yet".into());
    };
    let (domain, hv_name) = (&info.domain, &info.hypervisor);
    let by_hand = format!("destroy and undefine domain {domain} on hypervisor {hv_name} by hand");
    let Some(hv) = st.hypervisors.get(hv_name) else {
        return Err(format!(
            "not cleaned up: hypervisor {hv_name} is not configured; {by_hand}"
        ));
    };
    let exports: Vec<String> = info.disks.iter().map(|d| d.export.clone()).collect();
    let conn = hv.hv().await.map_err(|e| {
        format!(
            "not cleaned up: {}; {by_hand}",
            crate::daemon::error::chain(&e)
        )
    })?;
    let lv = libvirt(&*conn, hv).map_err(|e| format!("not cleaned up: {}", e.message))?;
    match lv.end_instant_domain(domain, &exports).await {
        Ok(Ended::Destroyed) => Ok(format!(
            "cleaned up: instant-recovery domain {domain} destroyed and undefined on hypervisor {hv_name} (its exports, and the guest's writes, died with the daemon)"
        )),
        Ok(Ended::Undefined) => Ok(format!(
            "cleaned up: instant-recovery domain {domain} (shut off) undefined on hypervisor {hv_name}"
        )),
        Ok(Ended::Gone) => Ok(format!(
            "cleaned up: domain {domain} was no longer on hypervisor {hv_name}"
        )),
        Err(e) => Err(format!(
            "not cleaned up: {}; {by_hand}",
            crate::daemon::error::chain(&e)
        )),
    }
}
