//! TLS for NBD (`NBD_OPT_STARTTLS`, X.509) with rustls: building client and server
//! configurations from PEM files, and upgrading a stream in the middle of the handshake.
//!
//! Owns certificate and key loading; it does not own when STARTTLS is sent or required
//! (`client::handshake`, `server::handshake`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::error::{Error, ErrorKind, Result};
use super::BoxStream;

/// Client-side TLS settings: the CA to trust, the name to check in the server certificate, and
/// optionally a client certificate (QEMU's `tls-creds-x509` asks for one by default).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Files of a certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tls, message)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).map_err(|e| {
        tls_error(format!("cannot read certificate file {}", path.display())).with_source(e)
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            tls_error(format!("bad certificate file {}", path.display())).with_source(e)
        })?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "certificate file {} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).map_err(|e| {
        tls_error(format!("cannot read key file {}", path.display())).with_source(e)
    })?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| tls_error(format!("bad key file {}", path.display())).with_source(e))?
        .ok_or_else(|| tls_error(format!("key file {} holds no private key", path.display())))
}

fn root_store(ca_file: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert).map_err(|e| {
            tls_error(format!("bad ca certificate in {}", ca_file.display())).with_source(e)
        })?;
    }
    Ok(roots)
}

impl ClientTls {
    /// Trust the CA certificates in `ca_file`; check that the server certificate is valid for
    /// `server_name` (a DNS name or an IP address); present `identity` if given.
    pub fn new(ca_file: &Path, server_name: &str, identity: Option<&Identity>) -> Result<Self> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| tls_error(format!("invalid tls server name {server_name:?}")))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("tls client configuration").with_source(e))?
            .with_root_certificates(root_store(ca_file)?);
        let config = match identity {
            Some(id) => builder
                .with_client_auth_cert(read_certs(&id.cert_file)?, read_key(&id.key_file)?)
                .map_err(|e| {
                    tls_error(format!("client certificate {}", id.cert_file.display()))
                        .with_source(e)
                })?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// Run the TLS handshake over `stream` (after the server acknowledged STARTTLS).
    pub(crate) async fn upgrade(&self, stream: BoxStream) -> Result<BoxStream> {
        let connector = TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(self.server_name.clone(), stream)
            .await
            .map_err(|e| tls_error("tls handshake with nbd server failed").with_source(e))?;
        Ok(Box::new(tls))
    }
}

/// Server-side TLS settings.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Serve with `identity`; when `client_ca_file` is given, require client certificates
    /// signed by it.
    pub fn new(identity: &Identity, client_ca_file: Option<&Path>) -> Result<Self> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("tls server configuration").with_source(e))?;
        let builder = match client_ca_file {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(root_store(ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| tls_error("client certificate verifier").with_source(e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(
                read_certs(&identity.cert_file)?,
                read_key(&identity.key_file)?,
            )
            .map_err(|e| {
                tls_error(format!(
                    "server certificate {}",
                    identity.cert_file.display()
                ))
                .with_source(e)
            })?;
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// Run the TLS handshake over `stream` (after this server acknowledged STARTTLS).
    pub(crate) async fn upgrade(&self, stream: BoxStream) -> Result<BoxStream> {
        let acceptor = TlsAcceptor::from(self.config.clone());
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| tls_error("tls handshake with nbd client failed").with_source(e))?;
        Ok(Box::new(tls))
    }
}
