//! `sluice serve`: opens the repository, names the hypervisors (connected on first use, so
//! one that is down does not stop the daemon), writes the first admin token,
//! makes or loads the TLS certificate, serves the API, and on SIGTERM/SIGINT cancels running
//! jobs and waits for them to release their resources before exiting.
//!
//! After a crash (`kill -9`, power loss) the start also cleans up, in the background, after
//! the jobs the dead daemon was running (see [`clean_up_after_restart`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::Router;
use catalog::{FsBackend, FsOptions, RepoConfig, RepoOptions, Repository};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::daemon::audit::AuditLog;
use crate::daemon::auth::TokenStore;
use crate::daemon::config::Config;
use crate::daemon::exports::Exports;
use crate::daemon::hypervisors::{Hypervisors, Member};
use crate::daemon::state::AppState;
use crate::wire::jobs::{JobInfo, JobKind, JobMode};
use crate::wire::tokens::Role;
use proxy::job::stale;
use proxy::nbd::{Server, ServerOptions, ServerTls};

/// Everything the daemon (and every tool it runs: `qemu-nbd`, `qemu-img`) creates is its
/// owner's only: the data directory holds every guest's disks, restores and secrets.
fn owner_only_files() {
    // SAFETY: umask only sets this process's (and its children's) default creation mode.
    unsafe { libc::umask(0o077) };
}

/// Sets `dir` to 0711: the owner's, and passable but not listable by others, so a local
/// hypervisor's QEMU reaches its job directory (`work/job-…`, 0700, owned by QEMU's user) or
/// a domain's restored image (`restores/`, whose owner libvirt sets when it starts it) and
/// nothing else; every file below is 0600.
fn traverse_only(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    if cfg.insecure_http && !cfg.listen.ip().is_loopback() {
        bail!(
            "plain HTTP is only allowed on a loopback address, not {}",
            cfg.listen
        );
    }
    owner_only_files();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    // Held until serve returns: one daemon per data directory and per repository.
    let _data_lock = crate::daemon::lock::lock(&cfg.data_dir, "data directory")?;
    let repo_dir = cfg.repo_dir();
    std::fs::create_dir_all(&repo_dir)
        .with_context(|| format!("creating repository dir {}", repo_dir.display()))?;
    let _repo_lock = crate::daemon::lock::lock(&repo_dir, "repository")?;
    let work = cfg.data_dir.join("work");
    std::fs::create_dir_all(&work)?;
    for dir in [&cfg.data_dir, &work] {
        traverse_only(dir)?;
    }
    let left = Leftovers::list(&work);
    let state = Arc::new(build_state(&cfg, work).await?);
    announce_hypervisors(&state);
    tokio::spawn(clean_up_after_restart(state.clone(), left));
    let stop_scheduler = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::daemon::schedule::scheduler::run(
        state.clone(),
        stop_scheduler.clone(),
    ));
    let served = listen(&cfg, crate::daemon::http::app(state.clone())).await;
    stop_scheduler.cancel();
    state.jobs.shutdown().await;
    tracing::info!("every job ended; exiting");
    served
}

/// The daemon's state from `cfg`: repository, hypervisors, tokens, audit log, restore
/// directories, NBD exports, policies, and the job registry with its history.
async fn build_state(cfg: &Config, work: PathBuf) -> anyhow::Result<AppState> {
    let repo = open_repo(cfg).await?;
    let hypervisors = Hypervisors::new(cfg.hypervisor_specs());
    let tokens = TokenStore::open(&cfg.data_dir)?;
    first_admin_token(&tokens, &cfg.data_dir)?;
    let audit = AuditLog::open(&cfg.data_dir.join("audit.log")).context("opening audit.log")?;
    let state = AppState::new(repo, hypervisors, tokens, work, cfg.max_jobs).with_audit(audit);
    let state = state.with_restore_dirs(restore_dirs(cfg)?);
    let state = match cfg.nbd_listen {
        Some(addr) => {
            let (exports, advertised) = start_nbd(cfg, addr).await?;
            let state = state.with_exports(exports);
            match advertised {
                Some(at) => state.with_instant_address(at),
                None => state,
            }
        }
        None => state,
    };
    let policies =
        crate::daemon::schedule::policy::PolicyStore::open(&cfg.data_dir.join("policies"))?;
    let limits = crate::daemon::jobs::JobLimits {
        overall: cfg.max_jobs,
        per_host: cfg.max_jobs_per_host,
        hosts: state.hypervisors.host_limits(),
    };
    let history = cfg.data_dir.join("jobs.jsonl");
    let jobs = crate::daemon::jobs::Jobs::open(limits, "localhost", Some(&history))
        .with_context(|| format!("reading the job history {}", history.display()))?;
    Ok(state
        .with_policies(policies)
        .with_jobs(jobs)
        .with_read_limit(cfg.read_limit))
}

/// Serves `app` on the configured address (TLS unless plain HTTP was asked) until SIGTERM
/// or SIGINT.
async fn listen(cfg: &Config, app: axum::Router) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let tls = if cfg.insecure_http {
        None
    } else {
        Some(tls_acceptor(&cfg.data_dir)?)
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("sluice listening on {scheme}://{}", listener.local_addr()?);
    tokio::select! {
        r = accept_loop(listener, tls, app) => r?,
        _ = shutdown_signal() => tracing::info!("shutting down: cancelling running jobs"),
    }
    Ok(())
}

/// Prints the configured hypervisors and asks each for its VMs in the background, so their
/// state is known (and a down one logged) before the first request; nothing waits for it.
fn announce_hypervisors(state: &Arc<AppState>) {
    for m in state.hypervisors.all() {
        let kind = if m.is_libvirt() { "libvirt" } else { "qmp" };
        println!("hypervisor {} ({kind}): {}", m.name(), m.address());
    }
    let probe = state.clone();
    tokio::spawn(async move {
        probe.hypervisors.list_all().await;
    });
}

/// What an earlier run left in the work directory, listed before any job of this run starts
/// (so nothing a new job makes is taken for a leftover).
#[derive(Debug, Default)]
struct Leftovers {
    /// `WORK/job-sluice-…`: backup job directories (NBD socket, scratch images).
    job_dirs: Vec<PathBuf>,
    /// `WORK/restore-ID`: sockets of restores onto a VM, by job id.
    restore_dirs: Vec<(u64, PathBuf)>,
    /// `WORK/overlays/*`: overlays of writable exports (exports do not survive a restart).
    overlays: Vec<PathBuf>,
}

impl Leftovers {
    fn list(work: &Path) -> Leftovers {
        let mut left = Leftovers::default();
        for e in std::fs::read_dir(work).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let restore = name.strip_prefix("restore-").and_then(|n| n.parse().ok());
            if proxy::job::is_job_dir_name(&name) {
                left.job_dirs.push(e.path());
            } else if let Some(id) = restore {
                left.restore_dirs.push((id, e.path()));
            }
        }
        let overlays = std::fs::read_dir(work.join("overlays"))
            .into_iter()
            .flatten();
        left.overlays = overlays.flatten().map(|e| e.path()).collect();
        left
    }
}

/// Cleans up after the jobs the previous daemon was running when it died, in the background
/// (the start never waits for a hypervisor). For each such job, what was done is appended to
/// its message (`…; cleaned up: …`) and logged:
/// - a backup: the backup job it left on its hypervisor (libvirt's pull-mode job and NBD
///   export; QMP's fleecing set-up; for a shut-off VM the `qemu-nbd` serving its images) is
///   ended and its job directory removed. A hypervisor that does not answer is
///   left alone, with its job directory: the next backup of that VM ends the job first.
/// - a restore: its staging directory beside the target (partial files) and its socket
///   directory are removed, and the `qemu-nbd` writing a VM's disk from there ended; an
///   instant recovery's domain (whose exports died with the daemon) is destroyed and
///   undefined on its hypervisor.
///
/// Then job directories no interrupted job claimed (unless a hypervisor did not answer),
/// restore socket directories and export overlays of the earlier run are removed.
async fn clean_up_after_restart(st: Arc<AppState>, left: Leftovers) {
    let mut dirs = left.job_dirs;
    let mut failed = false;
    for job in st.jobs.interrupted() {
        let outcome = match job.kind {
            JobKind::Backup => end_backup(&st, &job, &mut dirs).await,
            JobKind::Restore if job.mode == JobMode::Instant => {
                crate::daemon::ops::restore::instant::clean_after_restart(&st, &job).await
            }
            JobKind::Restore => Ok(clean_restore(&st, &job, &left.restore_dirs).await),
        };
        let note = match outcome {
            Ok(note) => {
                tracing::info!(job = job.id, vm = %job.vm, "after the restart: {note}");
                note
            }
            Err(note) => {
                tracing::warn!(job = job.id, vm = %job.vm, "after the restart: {note}");
                failed = true;
                note
            }
        };
        st.jobs.amend(job.id, &note);
    }
    let mut removed = 0;
    for d in dirs.iter().chain(left.restore_dirs.iter().map(|(_, d)| d)) {
        stale::end_servers(&stale::stale_servers(d)).await;
    }
    if failed {
        for d in &dirs {
            tracing::warn!(dir = %d.display(), "job directory kept: a hypervisor did not answer");
        }
    } else {
        removed += remove_all(dirs.iter());
    }
    removed += remove_all(left.restore_dirs.iter().map(|(_, d)| d));
    removed += remove_all(left.overlays.iter());
    if removed > 0 {
        tracing::info!(
            removed,
            "after the restart: removed what no job claimed (job, restore and overlay files)"
        );
    }
}

/// Removes each path (a directory with its contents, or a file) that still exists; counts them.
fn remove_all<'a>(paths: impl Iterator<Item = &'a PathBuf>) -> usize {
    let mut n = 0;
    for p in paths {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        match r {
            Ok(()) => {
                tracing::info!(path = %p.display(), "removed a leftover of the earlier run");
                n += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %p.display(), "removing a leftover: {e}"),
        }
    }
    n
}

/// Ends the backup job a dead daemon left on `vm` of the remote hypervisor `m` (its exports
/// on a port of `m`'s export range: no job directory of ours names it).
async fn end_remote_backup(m: &Member, vm: &str) -> Result<String, String> {
    match m.end_stale_tcp_backup(vm).await {
        Ok(Some(port)) => Ok(format!(
            "cleaned up: remote libvirt backup job (exports on port {port}) ended on hypervisor {}",
            m.name()
        )),
        Ok(None) => Ok(format!(
            "nothing to clean up: hypervisor {} has no backup job of vm {vm} left",
            m.name()
        )),
        Err(e) => Err(format!(
            "not cleaned up: {e}; the next backup of vm {vm} ends its job"
        )),
    }
}

/// Ends the backup job a dead daemon's backup `job` left on its hypervisor, trying the job
/// directories that daemon left (only a job whose socket is in one of them is ended); the
/// directory it used is removed and taken out of `dirs`. The note for the job's message;
/// `Err`: nothing could be cleaned.
async fn end_backup(
    st: &AppState,
    job: &JobInfo,
    dirs: &mut Vec<PathBuf>,
) -> Result<String, String> {
    let Some(m) = job
        .hypervisor
        .as_deref()
        .and_then(|n| st.hypervisors.get(n))
    else {
        return Err(format!(
            "not cleaned up: hypervisor {} is not configured; the next backup of vm {} ends its job",
            job.hypervisor.as_deref().unwrap_or("(none recorded)"),
            job.vm
        ));
    };
    let what = if m.is_libvirt() {
        "libvirt backup job"
    } else {
        "qemu backup export"
    };
    if m.spec.remote.is_some() {
        return end_remote_backup(m, &job.vm).await;
    }
    for i in 0..dirs.len() {
        match m.end_stale_backup(&job.vm, &dirs[i]).await {
            Ok(Some(_)) => {
                let dir = dirs.remove(i);
                return Ok(format!(
                    "cleaned up: {what} ended on hypervisor {}, job directory {} removed",
                    m.name(),
                    dir.display()
                ));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "not cleaned up: {e}; the next backup of vm {} ends its job",
                    job.vm
                ))
            }
        }
    }
    if let Some(note) = end_offline_backup(m, &job.vm, dirs).await {
        return Ok(note);
    }
    Ok(format!(
        "cleaned up: no {what} of it was left on hypervisor {}",
        m.name()
    ))
}

/// An offline backup (the VM was shut off) leaves a `qemu-nbd` serving the VM's images from
/// its job directory: ends it (found by an image of the VM among its arguments) and removes
/// the directory. The note, if one was found.
async fn end_offline_backup(m: &Member, vm: &str, dirs: &mut Vec<PathBuf>) -> Option<String> {
    let dom = m.domain(vm).await.ok()?;
    let images: Vec<String> = dom
        .disks
        .iter()
        .filter_map(|d| Some(d.source.as_ref()?.display().to_string()))
        .collect();
    for i in 0..dirs.len() {
        let servers: Vec<_> = stale::stale_servers(&dirs[i])
            .into_iter()
            .filter(|s| s.args.iter().any(|a| images.contains(a)))
            .collect();
        if servers.is_empty() {
            continue;
        }
        stale::end_servers(&servers).await;
        let dir = dirs.remove(i);
        let _ = std::fs::remove_dir_all(&dir);
        let pids: Vec<String> = servers.iter().map(|s| s.pid.to_string()).collect();
        return Some(format!(
            "cleaned up: qemu-nbd of the offline backup ended (pid {}), job directory {} removed",
            pids.join(", "),
            dir.display()
        ));
    }
    None
}

/// Prefix of a restore's staging directory beside its target, `.sluice-restore-PID-JOB`
/// (made by `routes::restores`).
const STAGING: &str = ".sluice-restore-";

/// Removes what a dead daemon's restore `job` left: its staging directory (partial files) in
/// the restore directories and its socket directory under the work directory. The note for
/// the job's message.
async fn clean_restore(st: &AppState, job: &JobInfo, work_dirs: &[(u64, PathBuf)]) -> String {
    let mut gone: Vec<PathBuf> = Vec::new();
    let mut ended = Vec::new();
    for (_, d) in work_dirs.iter().filter(|(id, _)| *id == job.id) {
        let servers = stale::stale_servers(d);
        stale::end_servers(&servers).await;
        ended.extend(servers.iter().map(|s| s.pid.to_string()));
    }
    let staging = st
        .restore_dirs
        .iter()
        .flat_map(|d| stale_staging(d, job.id));
    let own = work_dirs.iter().filter(|(id, _)| *id == job.id);
    for d in staging.chain(own.map(|(_, d)| d.clone())) {
        match std::fs::remove_dir_all(&d) {
            Ok(()) => gone.push(d),
            Err(e) => {
                tracing::warn!(dir = %d.display(), "removing a leftover of restore job {}: {e}", job.id)
            }
        }
    }
    let mut note = if gone.is_empty() {
        "cleaned up: no file of it was left".to_string()
    } else {
        let names: Vec<String> = gone.iter().map(|d| d.display().to_string()).collect();
        format!("cleaned up: removed {}", names.join(", "))
    };
    if !ended.is_empty() {
        note.push_str(&format!("; qemu-nbd ended (pid {})", ended.join(", ")));
    }
    if job.mode == JobMode::OntoVm {
        note.push_str(&format!(
            "; the disks of vm {} may be partly restored: restore again before starting it",
            job.vm
        ));
    }
    note
}

/// Staging directories of restore job `job` in `dir` whose daemon is gone (its pid runs no
/// more, or is this daemon's, which has not run that job).
fn stale_staging(dir: &Path, job: u64) -> Vec<PathBuf> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((pid, id)) = name.strip_prefix(STAGING).and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (Ok(pid), Ok(id)) = (pid.parse::<u32>(), id.parse::<u64>()) else {
                return false;
            };
            id == job && (pid == me || !Path::new(&format!("/proc/{pid}")).exists())
        })
        .map(|e| e.path())
        .collect()
}

/// Starts the NBD server on `addr`: its exports, and the address QEMU on a hypervisor dials
/// for an instant recovery (none without `nbd_advertise` when `addr` is unspecified).
async fn start_nbd(
    cfg: &Config,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(Exports, Option<proxy::restore::NbdAddress>)> {
    let private = cfg.nbd_tls && cfg.nbd_client_ca.is_some();
    if !(addr.ip().is_loopback() || private) {
        bail!("nbd_listen {addr}: a non-loopback NBD server needs nbd_tls and nbd_client_ca (client certificates)");
    }
    let advertise = cfg.nbd_advertised(addr);
    let (tls, client_dir) = match (cfg.nbd_tls, &cfg.nbd_cert, &cfg.nbd_key) {
        (false, _, _) => (None, None),
        (true, Some(cert), Some(key)) => {
            let identity = proxy::nbd::Identity {
                cert_file: cert.clone(),
                key_file: key.clone(),
            };
            let tls = ServerTls::new(&identity, cfg.nbd_client_ca.as_deref())
                .with_context(|| format!("nbd_cert {} and nbd_key", cert.display()))?;
            (Some(tls), None)
        }
        (true, _, _) => {
            let (identity, dir) = crate::daemon::exports::nbd_tls_material(
                &cfg.data_dir,
                addr.ip(),
                advertise.as_deref(),
            )?;
            let tls = ServerTls::new(&identity, cfg.nbd_client_ca.as_deref())?;
            (Some(tls), Some(dir))
        }
    };
    let server = Server::new(ServerOptions {
        tls_required: tls.is_some(),
        tls,
        ..ServerOptions::default()
    });
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("nbd listening on {addr}"))?;
    let bound = listener.local_addr()?;
    let srv = server.clone();
    tokio::spawn(async move {
        if let Err(e) = srv.serve_tcp(listener).await {
            tracing::error!("nbd server stopped: {e}");
        }
    });
    let overlays = cfg.data_dir.join("work").join("overlays");
    std::fs::create_dir_all(&overlays)?;
    let scheme = if cfg.nbd_tls { "nbds" } else { "nbd" };
    println!("nbd exports on {scheme}://{bound}");
    let ex = Exports::new(server, format!("{scheme}://{bound}")).with_overlay_dir(overlays);
    let ex = match client_dir {
        Some(dir) => ex.with_tls_certificates(dir),
        None => ex,
    };
    let at = cfg
        .nbd_advertised(bound)
        .map(|host| proxy::restore::NbdAddress {
            host,
            port: bound.port(),
            tls: cfg.nbd_tls,
        });
    Ok((ex, at))
}

/// The configured restore directories; the default one is created.
fn restore_dirs(cfg: &Config) -> anyhow::Result<Vec<std::path::PathBuf>> {
    if cfg.restore_dirs.is_empty() {
        let d = cfg.data_dir.join("restores");
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        // A domain restored here and started: libvirt hands QEMU the image, QEMU must pass.
        traverse_only(&d)?;
    }
    Ok(cfg.restore_dirs())
}

/// `SLUICE_IO_URING=on` (or `1`, `yes`): restore reads through io_uring where the kernel
/// allows it (`catalog::FsOptions::io_uring`; off by default, see docs/benchmarks.md).
fn fs_options() -> FsOptions {
    let v = std::env::var("SLUICE_IO_URING").unwrap_or_default();
    FsOptions {
        io_uring: matches!(v.as_str(), "on" | "1" | "yes"),
    }
}

async fn open_repo(cfg: &Config) -> anyhow::Result<Repository> {
    let dir = cfg.repo_dir();
    let opts = RepoOptions::new(cfg.data_dir.join("catalog.sqlite"));
    let chunk = cfg.chunk_size;
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let backend = Arc::new(FsBackend::open_with(&dir, fs_options())?);
        let exists = dir.join("config").exists();
        let r = if exists {
            Repository::open(backend, opts)
        } else {
            let config = RepoConfig {
                chunk_size: chunk,
                ..RepoConfig::default()
            };
            Repository::create(backend, config, opts)
        };
        r.with_context(|| format!("repository {}", dir.display()))
    })
    .await?
}

fn first_admin_token(tokens: &TokenStore, dir: &Path) -> anyhow::Result<()> {
    if !tokens.is_empty() {
        return Ok(());
    }
    let (_, secret) = tokens
        .create("admin", Role::Admin, vec![])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.join("admin.token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{secret}")?;
    println!(
        "first start: admin token written to {} (mode 0600)",
        path.display()
    );
    Ok(())
}

/// The daemon's certificate and key (`tls-cert.pem`, `tls-key.pem`), made self-signed on the
/// first start.
fn ensure_cert(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert_path, key_path) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
    if !cert_path.exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        std::fs::write(&cert_path, ck.cert.pem())?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)?;
        f.write_all(ck.signing_key.serialize_pem().as_bytes())?;
    }
    Ok((cert_path, key_path))
}

fn tls_acceptor(dir: &Path) -> anyhow::Result<TlsAcceptor> {
    let (cert_path, key_path) = ensure_cert(dir)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(
        &cert_path,
    )?))
    .collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(
        &key_path,
    )?))?
    .context("no private key in tls-key.pem")?;
    let first = certs.first().context("no certificate in tls-cert.pem")?;
    println!(
        "tls certificate sha256 fingerprint: {}",
        hex::encode(Sha256::digest(first))
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// API connections served at once, and from one peer address.
const MAX_CONNECTIONS: usize = 512;
const MAX_CONNECTIONS_PER_PEER: usize = 64;
/// Time a client gets for the TLS handshake, and for each request's headers.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Accepts API connections until the daemon stops: at most [`MAX_CONNECTIONS`] at once and
/// [`MAX_CONNECTIONS_PER_PEER`] from one address (more are closed at once), a TLS handshake
/// within [`HANDSHAKE_TIMEOUT`], headers within [`HEADER_TIMEOUT`]. An accept error (out of
/// file descriptors) is logged and accepting goes on.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
) -> anyhow::Result<()> {
    use proxy::nbd::server::admission::{Admission, ACCEPT_ERROR_PAUSE};
    let admission = Admission::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an api connection failed; accepting again shortly");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let permit = match admission.admit(Some(peer.ip())) {
            Ok(p) => p,
            Err(refusal) => {
                tracing::warn!(%peer, "api connection {refusal}");
                continue;
            }
        };
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = TowerToHyperService::new(app);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let r = match tls {
                Some(acc) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(tcp)).await {
                    Ok(Ok(s)) => builder.serve_connection(TokioIo::new(s), svc).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "tls handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "tls handshake not done within {HANDSHAKE_TIMEOUT:?}: closed");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(tcp), svc).await,
            };
            if let Err(e) = r {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_daemons_staging_of_that_job_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        // Above the largest pid Linux hands out (pid_max is at most 2^22).
        let dead = 4_194_305;
        let live = std::os::unix::process::parent_id();
        for name in [
            format!("{STAGING}{me}-5"),
            format!("{STAGING}{dead}-5"),
            format!("{STAGING}{live}-5"),
            format!("{STAGING}{dead}-6"),
            format!("{STAGING}{dead}-x"),
            "vm.qcow2".to_string(),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let mut stale = stale_staging(dir.path(), 5);
        stale.sort();
        let mut want = vec![
            dir.path().join(format!("{STAGING}{me}-5")),
            dir.path().join(format!("{STAGING}{dead}-5")),
        ];
        want.sort();
        assert_eq!(stale, want);
        assert!(stale_staging(&dir.path().join("missing"), 5).is_empty());
    }

    #[test]
    fn leftovers_are_listed_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        for d in [
            "job-sluice-1-2",
            "job-other",
            "restore-7",
            "restore-x",
            "overlays",
        ] {
            std::fs::create_dir(work.join(d)).unwrap();
        }
        std::fs::write(work.join("overlays").join("e1.qcow2"), b"").unwrap();
        let left = Leftovers::list(work);
        assert_eq!(left.job_dirs, [work.join("job-sluice-1-2")]);
        assert_eq!(left.restore_dirs, [(7, work.join("restore-7"))]);
        assert_eq!(left.overlays, [work.join("overlays").join("e1.qcow2")]);
    }
}
