//! NBD server: serves named [`BlockExport`]s over unix sockets and TCP, optionally with TLS.
//!
//! Owns the export table (exports can be added and removed while serving), the accept loops
//! and per-connection lifecycle. The handshake is in `handshake`, requests and replies in
//! `transmission`. A failing connection is logged and closed; the others go on.

pub mod admission;
mod handshake;
mod transmission;

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::net::{TcpListener, UnixListener};

use super::error::{Error, ErrorKind, Result};
use super::export::BlockExport;
use super::tls::ServerTls;
use super::BoxStream;
use admission::{Admission, ACCEPT_ERROR_PAUSE};

/// Logs an accept error and pauses briefly (the listener keeps serving).
async fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "accepting an nbd connection failed; accepting again shortly");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// How the server negotiates.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// TLS identity; `None` serves in clear text only.
    pub tls: Option<ServerTls>,
    /// With `tls` set: refuse every option but `STARTTLS` until TLS is up.
    pub tls_required: bool,
    /// Requests of one connection processed concurrently (this also bounds the write
    /// payloads held per connection).
    pub max_in_flight_requests: usize,
    /// Time a client gets to finish the handshake before it is disconnected.
    pub handshake_timeout: std::time::Duration,
    /// Connections served at once, over every listener of the server.
    pub max_connections: usize,
    /// Of those, from one peer address.
    pub max_connections_per_peer: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            tls: None,
            tls_required: true,
            max_in_flight_requests: 16,
            handshake_timeout: std::time::Duration::from_secs(30),
            max_connections: 256,
            max_connections_per_peer: 32,
        }
    }
}

/// An NBD server holding exports by name. Share it in an [`Arc`] between accept loops.
pub struct Server {
    exports: RwLock<BTreeMap<String, Arc<dyn BlockExport>>>,
    options: ServerOptions,
    admission: Arc<Admission>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.export_names())
            .field("options", &self.options)
            .finish()
    }
}

impl Server {
    /// A server with no exports yet.
    pub fn new(options: ServerOptions) -> Arc<Server> {
        Arc::new(Server {
            exports: RwLock::new(BTreeMap::new()),
            admission: Admission::new(options.max_connections, options.max_connections_per_peer),
            options,
        })
    }

    /// Serve `export` as `name` (replacing any export of that name) to new connections.
    pub fn add_export(&self, name: impl Into<String>, export: Arc<dyn BlockExport>) {
        let name = name.into();
        tracing::info!(export = %name, size = export.size(), writable = export.is_writable(), "nbd export opened");
        self.exports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, export);
    }

    /// Stop offering `name` to new connections (open connections keep it). Returns whether
    /// it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        let removed = self
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .is_some();
        if removed {
            tracing::info!(export = %name, "nbd export closed");
        }
        removed
    }

    /// Names of the exports offered.
    pub fn export_names(&self) -> Vec<String> {
        self.exports().into_iter().map(|(n, _)| n).collect()
    }

    fn exports(&self) -> Vec<(String, Arc<dyn BlockExport>)> {
        let map = self.exports.read().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(n, e)| (n.clone(), e.clone())).collect()
    }

    fn export(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        let map = self.exports.read().unwrap_or_else(PoisonError::into_inner);
        map.get(name).cloned()
    }

    /// Accept connections on a unix socket forever, each served in its own task. An accept
    /// error (e.g. out of file descriptors) is logged and accepting goes on.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) -> Result<()> {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            };
            self.clone()
                .spawn(Box::new(stream), None, "unix".to_string());
        }
    }

    /// Accept TCP connections forever, each served in its own task. An accept error is logged
    /// and accepting goes on.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> Result<()> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(ok) => ok,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            self.clone()
                .spawn(Box::new(stream), Some(peer.ip()), peer.to_string());
        }
    }

    fn spawn(self: Arc<Self>, stream: BoxStream, ip: Option<std::net::IpAddr>, peer: String) {
        let permit = match self.admission.admit(ip) {
            Ok(p) => p,
            Err(refusal) => {
                tracing::warn!(peer = %peer, "nbd connection {refusal}");
                return;
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = self.serve_stream(stream).await {
                tracing::warn!(peer = %peer, error = %catalog::Chain(&e), "nbd connection failed");
            }
        });
    }

    /// Serve one connection: handshake, then requests until the client disconnects. Returns
    /// the error that closed the connection, if any.
    pub async fn serve_stream(&self, stream: BoxStream) -> Result<()> {
        let limit = self.options.handshake_timeout;
        let negotiated = tokio::time::timeout(limit, handshake::negotiate(self, stream)).await;
        let Ok(negotiated) = negotiated else {
            return Err(Error::new(
                ErrorKind::Connection,
                format!("nbd client did not finish the handshake within {limit:?}"),
            ));
        };
        let Some(session) = negotiated? else {
            return Ok(());
        };
        let name = session.name.clone();
        tracing::debug!(export = %name, "nbd client connected");
        transmission::run(session, self.options.max_in_flight_requests)
            .await
            .map_err(|e| e.context(format!("export {name:?}")))
    }
}
