//! The hypervisors of the cluster as the daemon sees them: a dyn-compatible face of
//! `proxy::hypervisor::Hypervisor` (whose methods return `impl Future`), and the registry
//! ([`Hypervisors`]) of named hypervisors, each connected on first use and again after it
//! failed, with its state and last error kept for `GET /hypervisors`.
//!
//! A hypervisor that is down never stops the daemon nor hides the others: every call goes to
//! one member, and a failed connection is retried at most every [`RETRY_AFTER`]. A libvirt
//! adapter also reopens its own connection when libvirt finds it dead (`proxy`'s libvirt
//! worker: libvirtd restarted, or keepalive unanswered for about 20 s), before the next call
//! on it: a libvirtd restart between two calls costs neither of them.
//! Which hypervisor a VM name means is decided here ([`Hypervisors::locate`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catalog::Repository;
use futures_util::future::BoxFuture;
use proxy::hypervisor::libvirt::LibvirtHypervisor;
use proxy::hypervisor::qmp::QmpHypervisor;
use proxy::hypervisor::{DomainInfo, Error as HvError, ErrorKind as HvErrorKind, Hypervisor};
use proxy::job::{BackupOptions, BackupReport, Progress};
use tokio_util::sync::CancellationToken;

use crate::daemon::error::{chain, ApiError, ApiResult};
use crate::wire::hypervisors::HvState;
use crate::wire::hypervisors::HypervisorInfo;

mod ssh;
pub use ssh::{libssh_uri, ssh_driver, SshLogin, SSH_PARAMS};

/// Longest wait for a connection to a hypervisor.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a listing or lookup on a connected hypervisor.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A failed connection is not retried sooner than this; calls in between get its error.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the API needs from a hypervisor.
pub trait Hv: Send + Sync {
    /// The concrete adapter, for calls only one adapter offers (defining a domain: libvirt).
    fn as_any(&self) -> &dyn std::any::Any;
    /// Every VM.
    fn list(&self) -> BoxFuture<'_, proxy::hypervisor::Result<Vec<DomainInfo>>>;
    /// One VM.
    fn domain<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, proxy::hypervisor::Result<DomainInfo>>;
    /// Ends the backup job an earlier daemon left on `vm` whose socket lies in `job_dir`, and
    /// removes that directory (`proxy::job::end_stale_backup_in`); the socket, if one ended.
    fn end_stale_backup<'a>(
        &'a self,
        vm: &'a str,
        job_dir: &'a Path,
    ) -> BoxFuture<'a, proxy::job::Result<Option<PathBuf>>>;
    /// Ends the remote backup job an earlier daemon left on `vm`, served on a port of
    /// `ports`; the port, if one ended.
    fn end_stale_tcp_backup<'a>(
        &'a self,
        vm: &'a str,
        ports: std::ops::RangeInclusive<u16>,
    ) -> BoxFuture<'a, proxy::hypervisor::Result<Option<u16>>>;
    /// Runs one backup job.
    fn backup(
        self: Arc<Self>,
        repo: Repository,
        vm: String,
        opts: BackupOptions,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, proxy::job::Result<BackupReport>>;
}

impl<H: Hypervisor + 'static> Hv for H {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn list(&self) -> BoxFuture<'_, proxy::hypervisor::Result<Vec<DomainInfo>>> {
        Box::pin(self.list_domains())
    }

    fn domain<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, proxy::hypervisor::Result<DomainInfo>> {
        Box::pin(Hypervisor::domain(self, vm))
    }

    fn end_stale_backup<'a>(
        &'a self,
        vm: &'a str,
        job_dir: &'a Path,
    ) -> BoxFuture<'a, proxy::job::Result<Option<PathBuf>>> {
        Box::pin(proxy::job::end_stale_backup_in(self, vm, job_dir))
    }

    fn end_stale_tcp_backup<'a>(
        &'a self,
        vm: &'a str,
        ports: std::ops::RangeInclusive<u16>,
    ) -> BoxFuture<'a, proxy::hypervisor::Result<Option<u16>>> {
        Box::pin(Hypervisor::abort_stale_tcp_backup(self, vm, ports))
    }

    fn backup(
        self: Arc<Self>,
        repo: Repository,
        vm: String,
        opts: BackupOptions,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, proxy::job::Result<BackupReport>> {
        Box::pin(async move {
            proxy::job::run_backup(&*self, &repo, &vm, &opts, progress, cancel).await
        })
    }
}

/// How a hypervisor is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A libvirt connection URI.
    Libvirt { uri: String },
    /// The QMP socket of one QEMU process, whose VM goes by `vm`.
    Qmp { socket: PathBuf, vm: String },
}

/// One hypervisor of the cluster, as configured.
#[derive(Debug, Clone)]
pub struct HvSpec {
    pub name: String,
    pub target: Target,
    /// Key of the per-host job limit.
    pub host: String,
    /// Jobs at once on its host (overrides the daemon's `max_jobs_per_host` there).
    pub max_jobs: Option<usize>,
    /// A remote libvirt hypervisor: how backup data reaches the proxy (none: a local one,
    /// exports on a unix socket of the proxy's).
    pub remote: Option<RemoteSpec>,
    /// A `qemu+ssh://` hypervisor logged in to with a key and a known-hosts file (none: the
    /// URI is opened as it is).
    pub ssh: Option<SshLogin>,
}

/// The backup data path of a remote hypervisor, as configured (`[hypervisors.backup_data]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    /// What QEMU binds on the hypervisor (libvirt's `<server name=…>`).
    pub listen: String,
    /// What the proxy dials.
    pub connect: String,
    /// The name the hypervisor's certificate must carry.
    pub tls_name: String,
    /// Ports QEMU may serve backup exports on.
    pub ports: std::ops::RangeInclusive<u16>,
    /// CA certificate (PEM) the hypervisor's certificate chains to.
    pub ca: PathBuf,
    /// The proxy's client certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Whether a shut-off VM may be started paused for its backup.
    pub start_offline: bool,
    /// The scratch directory on the hypervisor (none: beside each image).
    pub scratch_dir: Option<PathBuf>,
    /// NBD connections per disk (used when QEMU's export allows several).
    pub connections: usize,
}

impl RemoteSpec {
    /// The data path a backup job takes (reads the certificate files now).
    pub fn data(&self) -> Result<proxy::job::RemoteData, proxy::nbd::Error> {
        let identity = proxy::nbd::Identity {
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
        };
        let tls = proxy::nbd::ClientTls::new(&self.ca, &self.tls_name, Some(&identity))?;
        Ok(proxy::job::RemoteData {
            listen: self.listen.clone(),
            connect: self.connect.clone(),
            ports: self.ports.clone(),
            tls,
            start_offline: self.start_offline,
            scratch_dir: self.scratch_dir.clone(),
        })
    }
}

impl HvSpec {
    /// A libvirt hypervisor; its host comes from the URI.
    pub fn libvirt(name: &str, uri: &str) -> Self {
        HvSpec {
            name: name.into(),
            target: Target::Libvirt { uri: uri.into() },
            host: uri_host(uri),
            max_jobs: None,
            remote: None,
            ssh: None,
        }
    }

    /// A plain QEMU process reached by its QMP socket, on this host.
    pub fn qmp(name: &str, socket: PathBuf, vm: &str) -> Self {
        HvSpec {
            name: name.into(),
            target: Target::Qmp {
                socket,
                vm: vm.into(),
            },
            host: "localhost".into(),
            max_jobs: None,
            remote: None,
            ssh: None,
        }
    }
}

/// A libvirt URI as logs and the API show it: without its query (`?pkipath=DIR`,
/// `?keyfile=…`).
pub fn shown_uri(uri: &str) -> &str {
    uri.split_once('?').map_or(uri, |(u, _)| u)
}

/// The host of a libvirt URI (`qemu+ssh://root@h1:22/system` -> `h1`; `localhost` for local
/// URIs), the key of the per-host job limit.
pub fn uri_host(uri: &str) -> String {
    let rest = uri.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = host.split(':').next().unwrap_or("");
    if host.is_empty() {
        "localhost".into()
    } else {
        host.to_string()
    }
}

#[derive(Debug, Clone)]
struct Status {
    state: HvState,
    error: Option<String>,
    vms: Option<usize>,
    failed_at: Option<Instant>,
}

/// One hypervisor of the registry: its spec, its connection (opened on use) and status.
pub struct Member {
    pub spec: HvSpec,
    conn: Mutex<Option<Arc<dyn Hv>>>,
    /// Held while connecting, so one caller connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Member {
    fn new(spec: HvSpec) -> Self {
        Member {
            spec,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                state: HvState::Unknown,
                error: None,
                vms: None,
                failed_at: None,
            }),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether it is reached through libvirt (restores as a domain or onto a VM need it).
    pub fn is_libvirt(&self) -> bool {
        matches!(self.spec.target, Target::Libvirt { .. })
    }

    fn cached(&self) -> Option<Arc<dyn Hv>> {
        self.conn.lock().expect("hv lock").clone()
    }

    /// The connected adapter: opened now if it is not, unless the last try failed less than
    /// [`RETRY_AFTER`] ago (then that failure).
    pub async fn hv(&self) -> proxy::hypervisor::Result<Arc<dyn Hv>> {
        if let Some(h) = self.cached() {
            return Ok(h);
        }
        let _gate = self.connecting.lock().await;
        if let Some(h) = self.cached() {
            return Ok(h);
        }
        if let Some(err) = self.recent_failure() {
            return Err(HvError::new(HvErrorKind::Failed, err));
        }
        match within(CONNECT_TIMEOUT, connect(&self.spec)).await {
            Ok(h) => {
                *self.conn.lock().expect("hv lock") = Some(h.clone());
                self.set(HvState::Up, None, None);
                tracing::info!(hypervisor = %self.spec.name, "hypervisor connected");
                Ok(h)
            }
            Err(e) => Err(self.lost(&e)),
        }
    }

    fn recent_failure(&self) -> Option<String> {
        let s = self.status.lock().expect("hv lock");
        let recent = s.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER);
        recent.then(|| s.error.clone().unwrap_or_default())
    }

    fn set(&self, state: HvState, error: Option<String>, vms: Option<usize>) {
        let mut s = self.status.lock().expect("hv lock");
        s.state = state;
        s.failed_at = error.as_ref().map(|_| Instant::now());
        s.error = error;
        if vms.is_some() {
            s.vms = vms;
        }
    }

    /// Records that it failed with `e` (its connection is dropped: the next use reconnects);
    /// returns the error as callers see it, naming the hypervisor.
    fn lost(&self, e: &HvError) -> HvError {
        let msg = format!(
            "hypervisor {} ({}) is unreachable: {}",
            self.spec.name,
            self.address(),
            chain(e)
        );
        tracing::warn!("{msg}");
        *self.conn.lock().expect("hv lock") = None;
        self.set(HvState::Unreachable, Some(msg.clone()), None);
        HvError::new(HvErrorKind::Failed, msg)
    }

    /// Runs `f` on the adapter with [`CALL_TIMEOUT`]; a failure other than "not found" or a
    /// refused argument marks it unreachable.
    async fn call<'a, T>(
        &'a self,
        f: impl FnOnce(Arc<dyn Hv>) -> BoxFuture<'a, proxy::hypervisor::Result<T>>,
    ) -> proxy::hypervisor::Result<T> {
        let hv = self.hv().await?;
        match within(CALL_TIMEOUT, f(hv)).await {
            Err(e) if e.kind() == HvErrorKind::Failed => Err(self.lost(&e)),
            r => r,
        }
    }

    /// Every VM it has.
    pub async fn list(&self) -> proxy::hypervisor::Result<Vec<DomainInfo>> {
        let doms = self
            .call(|hv| Box::pin(async move { hv.list().await }))
            .await?;
        self.set(HvState::Up, None, Some(doms.len()));
        Ok(doms)
    }

    /// One of its VMs.
    pub async fn domain(&self, vm: &str) -> proxy::hypervisor::Result<DomainInfo> {
        let vm = vm.to_string();
        self.call(|hv| Box::pin(async move { hv.domain(&vm).await }))
            .await
    }

    /// Ends the backup job an earlier daemon left on `vm` in `job_dir` (see
    /// [`Hv::end_stale_backup`]), within [`CALL_TIMEOUT`]; the error names the hypervisor.
    pub async fn end_stale_backup(
        &self,
        vm: &str,
        job_dir: &Path,
    ) -> Result<Option<PathBuf>, String> {
        let hv = self.hv().await.map_err(|e| chain(&e))?;
        self.clean_up(hv.end_stale_backup(vm, job_dir)).await
    }

    /// Ends the remote backup job an earlier daemon left on `vm` (its exports on a port of
    /// this hypervisor's export range), within [`CALL_TIMEOUT`]; the port, if one ended.
    /// `Ok(None)` also for a hypervisor that is not remote.
    pub async fn end_stale_tcp_backup(&self, vm: &str) -> Result<Option<u16>, String> {
        let Some(remote) = &self.spec.remote else {
            return Ok(None);
        };
        let hv = self.hv().await.map_err(|e| chain(&e))?;
        self.clean_up(hv.end_stale_tcp_backup(vm, remote.ports.clone()))
            .await
    }

    /// A clean-up call on the adapter within [`CALL_TIMEOUT`]; the error names the hypervisor.
    async fn clean_up<T, E: std::error::Error + 'static>(
        &self,
        call: BoxFuture<'_, Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map_err(|e| format!("hypervisor {}: {}", self.name(), chain(&e))),
            Err(_) => Err(format!(
                "hypervisor {}: no answer within {} s",
                self.name(),
                CALL_TIMEOUT.as_secs()
            )),
        }
    }

    /// Its libvirt URI (without the query, see [`shown_uri`]) or QMP socket.
    pub fn address(&self) -> String {
        match &self.spec.target {
            Target::Libvirt { uri } => shown_uri(uri).to_string(),
            Target::Qmp { socket, .. } => socket.display().to_string(),
        }
    }

    /// Its spec and status, for the API.
    pub fn info(&self, host_limit: Option<usize>) -> HypervisorInfo {
        let s = self.status.lock().expect("hv lock").clone();
        let (kind, uri, socket) = match &self.spec.target {
            Target::Libvirt { uri } => ("libvirt", Some(shown_uri(uri).to_string()), None),
            Target::Qmp { socket, .. } => ("qmp", None, Some(socket.display().to_string())),
        };
        HypervisorInfo {
            name: self.spec.name.clone(),
            kind: kind.into(),
            uri,
            socket,
            host: self.spec.host.clone(),
            state: s.state,
            error: s.error,
            vms: s.vms,
            max_jobs: host_limit,
        }
    }
}

/// `fut`'s answer, or a failure once `limit` has passed without one.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = proxy::hypervisor::Result<T>>,
) -> proxy::hypervisor::Result<T> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(HvError::new(
            HvErrorKind::Failed,
            format!("no answer within {} s", limit.as_secs()),
        ))
    })
}

async fn connect(spec: &HvSpec) -> proxy::hypervisor::Result<Arc<dyn Hv>> {
    Ok(match &spec.target {
        Target::Libvirt { uri } => {
            // It names the key file: never log or show it.
            let open = spec
                .ssh
                .as_ref()
                .map_or_else(|| uri.clone(), |login| libssh_uri(uri, login));
            match LibvirtHypervisor::connect(&open).await {
                Ok(hv) => Arc::new(hv),
                Err(e) => {
                    let (login, shown) = (spec.ssh.as_ref(), shown_uri(uri));
                    let e = ssh::redacted(&e, &open, shown, login);
                    return Err(ssh::ssh_refusal(&spec.name, shown, login, &e));
                }
            }
        }
        Target::Qmp { socket, vm } => Arc::new(QmpHypervisor::connect(socket, vm).await?),
    })
}

/// The VMs of one hypervisor, or why they could not be listed.
pub type Listing = (Arc<Member>, proxy::hypervisor::Result<Vec<DomainInfo>>);

/// The named hypervisors of the cluster.
#[derive(Debug, Default)]
pub struct Hypervisors {
    members: Vec<Arc<Member>>,
}

impl Hypervisors {
    /// A registry of `specs` (nothing is connected yet).
    pub fn new(specs: Vec<HvSpec>) -> Self {
        Hypervisors {
            members: specs
                .into_iter()
                .map(|s| Arc::new(Member::new(s)))
                .collect(),
        }
    }

    /// Adds `spec` with an adapter already connected (reconnected through `spec` if it fails).
    pub fn with_connected(mut self, spec: HvSpec, hv: Arc<dyn Hv>) -> Self {
        let m = Member::new(spec);
        *m.conn.lock().expect("hv lock") = Some(hv);
        m.set(HvState::Up, None, None);
        self.members.push(Arc::new(m));
        self
    }

    /// Every member, in configuration order.
    pub fn all(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// The member named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Member>> {
        self.members.iter().find(|m| m.spec.name == name)
    }

    /// The member named `name`, or 404 naming the configured ones.
    pub fn named(&self, name: &str) -> ApiResult<&Arc<Member>> {
        self.get(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "no hypervisor {name:?}; configured: {}",
                self.names().join(", ")
            ))
        })
    }

    fn names(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.name()).collect()
    }

    /// Lists every member at once; a down one does not hold up the others past its timeouts.
    pub async fn list_all(&self) -> Vec<Listing> {
        let calls = self.members.iter().map(|m| async move {
            let r = m.list().await;
            (m.clone(), r)
        });
        futures_util::future::join_all(calls).await
    }

    /// Job limits by host from the members' `max_jobs` (the smallest where several share one).
    pub fn host_limits(&self) -> std::collections::HashMap<String, usize> {
        let mut out = std::collections::HashMap::new();
        for m in &self.members {
            if let Some(n) = m.spec.max_jobs {
                let e = out.entry(m.spec.host.clone()).or_insert(n);
                *e = (*e).min(n);
            }
        }
        out
    }

    /// The hypervisor VM `vm` is on, and the VM: on `on` if named; else the one reachable
    /// member that has it. A name on several is refused (409, asking for `hypervisor`), a
    /// name on none is 404, or 503 naming the unreachable members that might have it.
    pub async fn locate(&self, vm: &str, on: Option<&str>) -> ApiResult<(Arc<Member>, DomainInfo)> {
        if let Some(name) = on {
            let m = self.named(name)?.clone();
            let d = m.domain(vm).await.map_err(|e| on_member(&m, vm, e))?;
            return Ok((m, d));
        }
        let calls = self.members.iter().map(|m| async move {
            let r = m.domain(vm).await;
            (m.clone(), r)
        });
        let found = futures_util::future::join_all(calls).await;
        pick(vm, found)
    }
}

fn on_member(m: &Member, vm: &str, e: HvError) -> ApiError {
    if e.kind() == HvErrorKind::NotFound {
        ApiError::not_found(format!("vm {vm} not found on hypervisor {}", m.name()))
    } else {
        e.into()
    }
}

/// Decides [`Hypervisors::locate`] from every member's answer.
fn pick(
    vm: &str,
    found: Vec<(Arc<Member>, proxy::hypervisor::Result<DomainInfo>)>,
) -> ApiResult<(Arc<Member>, DomainInfo)> {
    let (mut hits, mut down) = (Vec::new(), Vec::new());
    for (m, r) in found {
        match r {
            Ok(d) => hits.push((m, d)),
            Err(e) if e.kind() == HvErrorKind::NotFound => {}
            Err(e) => down.push(format!("{} ({e})", m.name())),
        }
    }
    match hits.len() {
        1 => Ok(hits.remove(0)),
        0 if down.is_empty() => Err(ApiError::not_found(format!(
            "vm {vm} not found on any hypervisor"
        ))),
        0 => Err(ApiError::unavailable(format!(
            "vm {vm} not found on the reachable hypervisors; unreachable: {}",
            down.join("; ")
        ))),
        _ => {
            let on: Vec<&str> = hits.iter().map(|(m, _)| m.name()).collect();
            let mut e = ApiError::conflict(format!(
                "vm {vm} exists on hypervisors {}: name one with ?hypervisor=NAME (or \"hypervisor\" in a restore request)",
                on.join(", ")
            ));
            e.code = "ambiguous_vm";
            Err(e)
        }
    }
}
