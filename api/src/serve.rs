//! `sluice serve`: opens the repository, names the hypervisors (connected on first use, so
//! one that is down does not stop the daemon), writes the first admin token,
//! makes or loads the TLS certificate, serves the API, and on SIGTERM/SIGINT cancels running
//! jobs and waits for them to release their resources before exiting.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::Router;
use catalog::{FsBackend, RepoConfig, RepoOptions, Repository};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::auth::{Role, TokenStore};
use crate::config::Config;
use crate::hv::Hypervisors;
use crate::routes::exports::Exports;
use crate::state::AppState;
use proxy::nbd::{Server, ServerOptions, ServerTls};

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    if cfg.insecure_http && !cfg.listen.ip().is_loopback() {
        bail!(
            "plain HTTP is only allowed on a loopback address, not {}",
            cfg.listen
        );
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let repo = open_repo(&cfg).await?;
    let hypervisors = Hypervisors::new(cfg.hypervisor_specs());
    let tokens = TokenStore::open(&cfg.data_dir)?;
    first_admin_token(&tokens, &cfg.data_dir)?;
    let work = cfg.data_dir.join("work");
    std::fs::create_dir_all(&work)?;
    let audit = AuditLog::open(&cfg.data_dir.join("audit.log")).context("opening audit.log")?;
    let state = AppState::new(repo, hypervisors, tokens, work, cfg.max_jobs).with_audit(audit);
    let state = state.with_restore_dirs(restore_dirs(&cfg)?);
    let state = match cfg.nbd_listen {
        Some(addr) => state.with_exports(start_nbd(&cfg, addr).await?),
        None => state,
    };
    let policies = crate::policy::PolicyStore::open(&cfg.data_dir.join("policies"))?;
    let limits = crate::jobs::JobLimits {
        overall: cfg.max_jobs,
        per_host: cfg.max_jobs_per_host,
        hosts: state.hypervisors.host_limits(),
    };
    let history = cfg.data_dir.join("jobs.jsonl");
    let jobs = crate::jobs::Jobs::open(limits, "localhost", Some(&history))
        .with_context(|| format!("reading the job history {}", history.display()))?;
    let state = state
        .with_policies(policies)
        .with_jobs(jobs)
        .with_read_limit(cfg.read_limit);
    let state = Arc::new(state);
    announce_hypervisors(&state);
    let stop_scheduler = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::scheduler::run(state.clone(), stop_scheduler.clone()));
    let app = crate::routes::app(state.clone());
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
    stop_scheduler.cancel();
    state.jobs.shutdown().await;
    tracing::info!("every job ended; exiting");
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

async fn start_nbd(cfg: &Config, addr: std::net::SocketAddr) -> anyhow::Result<Exports> {
    let private = cfg.nbd_tls && cfg.nbd_client_ca.is_some();
    if !(addr.ip().is_loopback() || private) {
        bail!("nbd_listen {addr}: a non-loopback NBD server needs nbd_tls and nbd_client_ca (client certificates)");
    }
    let (tls, client_dir) = if cfg.nbd_tls {
        let (identity, dir) = crate::routes::exports::nbd_tls_material(&cfg.data_dir, addr.ip())?;
        let tls = ServerTls::new(&identity, cfg.nbd_client_ca.as_deref())?;
        (Some(tls), Some(dir))
    } else {
        (None, None)
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
    Ok(match client_dir {
        Some(dir) => ex.with_tls_certificates(dir),
        None => ex,
    })
}

/// The configured restore directories; the default one is created.
fn restore_dirs(cfg: &Config) -> anyhow::Result<Vec<std::path::PathBuf>> {
    if cfg.restore_dirs.is_empty() {
        let d = cfg.data_dir.join("restores");
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(cfg.restore_dirs())
}

async fn open_repo(cfg: &Config) -> anyhow::Result<Repository> {
    let dir = cfg.repo_dir();
    let opts = RepoOptions::new(cfg.data_dir.join("catalog.sqlite"));
    let chunk = cfg.chunk_size;
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let backend = Arc::new(FsBackend::open(&dir)?);
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

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
) -> anyhow::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let svc = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let r = match tls {
                Some(acc) => match acc.accept(tcp).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                    Err(e) => {
                        tracing::debug!(%peer, "tls handshake failed: {e}");
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
