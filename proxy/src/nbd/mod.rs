//! NBD protocol: client and server, interoperable with QEMU, libnbd and nbdkit.
//!
//! - [`proto`]: the wire format, and the only place that knows NBD bytes.
//! - [`client`]: [`Client`], fixed newstyle handshake, meta contexts, pipelined reads and
//!   writes over one or several connections, block status over whole exports, TLS.
//! - [`server`]: [`Server`], serving anything behind the [`BlockExport`] trait by name over
//!   unix sockets and TCP, with structured replies, meta contexts and TLS.
//! - [`export`]: the [`BlockExport`] trait and [`MemoryExport`], a sparse in-memory export.
//! - [`tls`]: rustls configuration from PEM files.
//!
//! Every length and count from a peer is checked before it sizes an allocation; a malformed
//! message fails that one connection with an [`Error`] naming the message and field.

pub mod client;
mod error;
pub mod export;
pub mod proto;
pub mod server;
pub mod tls;

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

pub use bytes::{Bytes, BytesMut};
pub use client::{list_exports, list_meta_contexts, Client, ClientOptions, ExportInfo, Extent};
pub use error::{Error, ErrorKind, Result};
pub use export::{
    BlockExport, BoxFuture, ExportError, ExportResult, MemoryExport, ReadPart, StatusExtent,
};
pub use proto::BlockSizes;
pub use server::{Server, ServerOptions};
pub use tls::{ClientTls, Identity, ServerTls};

/// The `base:allocation` meta context (bit 0: hole, bit 1: reads as zeroes).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The `qemu:allocation-depth` meta context (0: unallocated, N: allocated in the N-th layer).
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty bitmap contexts (bit 0: dirty).
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// The meta context name of QEMU dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("{QEMU_DIRTY_BITMAP_PREFIX}{bitmap}")
}

/// A byte stream NBD can run over: a socket, or TLS over a socket.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host (name or address) and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port (NBD's registered port is 10809).
        port: u16,
    },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Address {
    /// Open a socket to this address.
    pub async fn connect(&self) -> Result<BoxStream> {
        let what = format!("connect to nbd server {self}");
        match self {
            Address::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| Error::connection(what, e))?;
                Ok(Box::new(s))
            }
            Address::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| Error::connection(what, e))?;
                // Requests are small and latency-bound; never wait to coalesce them.
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
        }
    }
}
