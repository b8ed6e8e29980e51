//! The CLI's HTTP client of the API: one HTTP/1 connection per request, over TLS pinned to
//! the server certificate's SHA-256 fingerprint (or plain HTTP for `http://` URLs).

use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

/// An API failure as the CLI reports it.
#[derive(Debug, thiserror::Error)]
#[error("{message} (http {status}, {code})")]
pub struct ClientError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// Where and how to reach the daemon.
#[derive(Debug, Clone)]
pub struct Client {
    pub url: String,
    pub token: Option<String>,
    pub fingerprint: Option<String>,
}

impl Client {
    /// Sends `method path` with an optional JSON body; returns the JSON answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let (tls, rest) = if let Some(r) = self.url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = self.url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!(
                "server url {} must start with https:// or http://",
                self.url
            );
        };
        let host = rest.trim_end_matches('/');
        let tcp = TcpStream::connect(host)
            .await
            .with_context(|| format!("connecting to {host}; is `sluice serve` running?"))?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header("host", host)
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req.body(Full::new(Bytes::from(data)))?;
        let (status, bytes) = if tls {
            let stream = self.tls_connect(host, tcp).await?;
            send(TokioIo::new(stream), req).await?
        } else {
            send(TokioIo::new(tcp), req).await?
        };
        let json: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .context("the server answered with something other than JSON")?
        };
        if status >= 400 {
            return Err(ClientError {
                status,
                code: json["error"]["code"].as_str().unwrap_or("").into(),
                message: json["error"]["message"].as_str().unwrap_or("").into(),
            }
            .into());
        }
        Ok(json)
    }

    async fn tls_connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let fp = self.fingerprint.clone().ok_or_else(|| {
            anyhow!("https needs the server's certificate fingerprint: pass --fingerprint or set SLUICE_FINGERPRINT (printed by `sluice serve`)")
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Pinned {
            sha256: fp.to_lowercase().replace(':', ""),
            provider: provider.clone(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h).to_string();
        let name = ServerName::try_from(name).context("server name")?;
        let conn = tokio_rustls::TlsConnector::from(Arc::new(config));
        conn.connect(name, tcp)
            .await
            .context("tls handshake (is the fingerprint right?)")
    }
}

async fn send<I>(io: I, req: hyper::Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// Accepts exactly the certificate whose SHA-256 is pinned.
#[derive(Debug)]
struct Pinned {
    sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if hex::encode(Sha256::digest(end_entity)) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "server certificate does not match the pinned fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
