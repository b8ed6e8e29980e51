//! A small QMP client over a unix socket: greeting, capability negotiation, and commands whose
//! replies are matched by id while asynchronous events are skipped.
//!
//! Why not the `qapi` crate: it generates types for the whole QAPI schema (a long compile on
//! two cores) and we use about fifteen commands whose few fields we type ourselves below; a
//! line-delimited JSON exchange is thirty lines and keeps the replies bounded in size.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::hypervisor::{failed, io_failed, Error, ErrorKind, Result};

/// Largest QMP message we accept (query replies of big VMs are a few hundred KiB).
const MAX_LINE: u64 = 16 << 20;
/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One QMP connection.
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    socket: String,
}

impl QmpClient {
    /// Connects, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self> {
        let socket = path.display().to_string();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| io_failed(format!("cannot connect to qmp socket {socket}"), e))?;
        let (r, w) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(r),
            writer: w,
            next_id: 0,
            socket,
        };
        let greeting = client.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(failed(format!(
                "qmp socket {} sent no greeting",
                client.socket
            )));
        }
        client.execute_value("qmp_capabilities", json!({})).await?;
        Ok(client)
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| io_failed(format!("reading qmp socket {}", self.socket), e))?;
        if n == 0 {
            return Err(failed(format!("qmp socket {} closed", self.socket)));
        }
        if line.last() != Some(&b'\n') {
            return Err(failed(format!(
                "qmp message on {} exceeds {MAX_LINE} bytes",
                self.socket
            )));
        }
        serde_json::from_slice(&line)
            .map_err(|e| failed(format!("malformed qmp message on {}", self.socket)).with_source(e))
    }

    /// Runs `command` and returns its raw `return` value.
    pub async fn execute_value(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg =
            serde_json::to_vec(&json!({"execute": command, "arguments": arguments, "id": id}))
                .map_err(|e| failed("cannot encode a qmp command").with_source(e))?;
        msg.push(b'\n');
        let exchange = async {
            self.writer
                .write_all(&msg)
                .await
                .map_err(|e| io_failed(format!("writing qmp socket {}", self.socket), e))?;
            self.reply(id, command).await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::new(ErrorKind::Busy, format!("qmp command {command} timed out")))?
    }

    async fn reply(&mut self, id: u64, command: &str) -> Result<Value> {
        loop {
            let mut msg = self.read_message().await?;
            if msg.get("event").is_some() || msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = msg.get_mut("return") {
                return Ok(ret.take());
            }
            let class = msg["error"]["class"]
                .as_str()
                .unwrap_or("GenericError")
                .to_string();
            let desc = msg["error"]["desc"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string();
            let kind = if class == "DeviceNotFound" {
                ErrorKind::NotFound
            } else {
                ErrorKind::Failed
            };
            return Err(Error::new(kind, format!("qmp {command}: {desc}")));
        }
    }

    /// Runs `command` and decodes its `return` value into `T`.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T> {
        let value = self.execute_value(command, arguments).await?;
        serde_json::from_value(value)
            .map_err(|e| failed(format!("unexpected reply to qmp {command}")).with_source(e))
    }
}
