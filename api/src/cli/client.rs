//! The CLI's HTTP client of the API: one HTTP/1 connection per request, over TLS pinned to
//! the server certificate's SHA-256 fingerprint (or plain HTTP for `http://` URLs), and a
//! reader of Server-Sent Events streams (a job's progress).
//!
//! Answers are read into the shared wire types ([`crate::wire`]) and kept as the JSON the
//! server sent ([`Reply`]): tables are printed from the first, `--json` from the second, so
//! `--json` shows every field as sent (bytes as numbers, fields this CLI does not know).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use crate::wire::error::ErrorBody;

/// An API failure as the CLI reports it.
#[derive(Debug, thiserror::Error)]
#[error("{message} (http {status}, {code})")]
pub struct ClientError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// An answer: the JSON the server sent, and the same read into its wire type.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    /// As sent (what `--json` prints).
    pub json: Value,
    /// Read into the wire type (what tables are printed from).
    pub body: T,
}

impl<T: DeserializeOwned> Reply<T> {
    /// Reads `json` into `T`; `what` names the answer in the error (`GET /jobs/7`).
    pub fn read(json: Value, what: &str) -> anyhow::Result<Reply<T>> {
        let body = T::deserialize(&json).with_context(|| {
            format!(
                "the answer to {what} is not a {}",
                std::any::type_name::<T>()
            )
        })?;
        Ok(Reply { json, body })
    }
}

impl<T> Reply<Vec<T>> {
    /// Keeps the entries `keep` accepts, in the JSON as in the body.
    pub fn retain(self, keep: impl Fn(&T) -> bool) -> Reply<Vec<T>> {
        let sent = match self.json {
            Value::Array(a) => a,
            _ => Vec::new(),
        };
        let (json, body) = sent
            .into_iter()
            .zip(self.body)
            .filter(|(_, t)| keep(t))
            .unzip();
        Reply {
            json: Value::Array(json),
            body,
        }
    }
}

/// Where and how to reach the daemon.
#[derive(Debug, Clone)]
pub struct Client {
    pub url: String,
    pub token: Option<String>,
    pub fingerprint: Option<String>,
}

impl Client {
    /// `GET path`, read into `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Reply<T>> {
        self.ask("GET", path, None).await
    }

    /// `POST path` with the JSON of `body`, the answer read into `T`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<Reply<T>> {
        let body = serde_json::to_value(body).context("encoding the request")?;
        self.ask("POST", path, Some(body)).await
    }

    /// `DELETE path`; the answer has no body.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.call("DELETE", path, None).await.map(drop)
    }

    /// Sends `method path` with an optional JSON body; the answer read into `T`.
    pub async fn ask<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Reply<T>> {
        let json = self.call(method, path, body).await?;
        Reply::read(json, &format!("{method} {path}"))
    }

    /// Sends `method path` with an optional JSON body; returns the JSON answer (`null` for
    /// an empty one).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.request(method, path, body).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .context("the server answered with something other than JSON")?
        };
        if status >= 400 {
            return Err(api_error(status, json).into());
        }
        Ok(json)
    }

    /// Opens the Server-Sent Events stream at `path` (e.g. `/jobs/7/events`).
    pub async fn events(&self, path: &str) -> anyhow::Result<EventStream> {
        let resp = self.request("GET", path, None).await?;
        let status = resp.status().as_u16();
        if status >= 400 {
            let bytes = resp.into_body().collect().await?.to_bytes();
            let json = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(api_error(status, json).into());
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// Sends one request on a new connection; the answer's body is not read yet.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
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
        if tls {
            let stream = self.tls_connect(host, tcp).await?;
            send(TokioIo::new(stream), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
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

/// `s` percent-encoded for one URL path segment or query value: every byte but RFC 3986's
/// unreserved characters (VM names may hold spaces, `?`, `#`, `&` or `%`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error answer (`{"error":{"code":..,"message":..}}`; empty code and message when the
/// body is something else).
fn api_error(status: u16, json: Value) -> ClientError {
    let (code, message) = match serde_json::from_value::<ErrorBody>(json) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (String::new(), String::new()),
    };
    ClientError {
        status,
        code,
        message,
    }
}

async fn send<I>(
    io: I,
    req: hyper::Request<Full<Bytes>>,
) -> anyhow::Result<hyper::Response<Incoming>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

/// Longest event the CLI accepts (a job's JSON is well under 4 KiB).
const MAX_EVENT: usize = 1024 * 1024;
/// Longest silence before a stream counts as broken (the server sends every 500 ms and a
/// keep-alive every 15 s).
const STREAM_SILENCE: Duration = Duration::from_secs(30);

/// One Server-Sent Event: its name (`message` when unnamed) and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

/// A Server-Sent Events stream being read.
#[derive(Debug)]
pub struct EventStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the server closed the stream. A broken connection, a
    /// silence over 30 s or an event over 1 MiB is an error.
    pub async fn next(&mut self) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(ev) = take_event(&mut self.buf) {
                match ev {
                    Some(ev) => return Ok(Some(ev)),
                    None => continue, // comment or keep-alive
                }
            }
            if self.buf.len() > MAX_EVENT {
                bail!("event stream: an event is over {MAX_EVENT} bytes");
            }
            let frame = tokio::time::timeout(STREAM_SILENCE, self.body.frame())
                .await
                .map_err(|_| anyhow!("event stream: nothing received for {STREAM_SILENCE:?}"))?;
            match frame {
                None => return Ok(None),
                Some(f) => {
                    if let Ok(data) = f.context("event stream")?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Takes one complete event block off `buf`: `None` if none is complete yet, `Some(None)`
/// for a block without data (a comment).
fn take_event(buf: &mut Vec<u8>) -> Option<Option<SseEvent>> {
    let end = buf.windows(2).position(|w| w == b"\n\n")?;
    let block: Vec<u8> = buf.drain(..end + 2).collect();
    let block = String::from_utf8_lossy(&block);
    let (mut name, mut data) = (String::from("message"), None::<String>);
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = value.to_string(),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value)
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    Some(data.map(|data| SseEvent { name, data }))
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

/// A restore refused for want of a hypervisor: the API says `"hypervisor"`, the CLI
/// `--hypervisor`.
pub fn hypervisor_hint(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ClientError>() {
        Ok(mut ce) if ce.status == 400 && ce.message.contains("\"hypervisor\"") => {
            ce.message.push_str(
                " (with the CLI: --hypervisor NAME; `sluice hypervisor list` names them)",
            );
            ce.into()
        }
        Ok(ce) => ce.into(),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::{encode, take_event, SseEvent};

    #[test]
    fn names_are_percent_encoded_for_paths_and_queries() {
        assert_eq!(encode("web-1.prod_x~"), "web-1.prod_x~");
        assert_eq!(encode("a b?c#d&e%f/"), "a%20b%3Fc%23d%26e%25f%2F");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn event_blocks_are_split_and_comments_skipped() {
        let mut buf = b":\n\nevent: end\ndata: {\"a\":1}\n\nevent: progress\nda".to_vec();
        assert_eq!(take_event(&mut buf), Some(None));
        let ev = take_event(&mut buf).unwrap().unwrap();
        assert_eq!(
            ev,
            SseEvent {
                name: "end".into(),
                data: "{\"a\":1}".into()
            }
        );
        assert_eq!(take_event(&mut buf), None, "incomplete block waits");
        buf.extend_from_slice(b"ta: x\ndata: y\n\n");
        let ev = take_event(&mut buf).unwrap().unwrap();
        assert_eq!((ev.name.as_str(), ev.data.as_str()), ("progress", "x\ny"));
    }
}
