//! Client side of the fixed newstyle handshake: greeting, STARTTLS, structured replies, meta
//! contexts, `NBD_OPT_GO`, `NBD_OPT_LIST` and `NBD_OPT_LIST_META_CONTEXT`.
//!
//! Owns the order of options and the checks on every option reply; it does not own bytes
//! (`proto`) or transmission (`transmission`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ExportInfo;
use crate::nbd::error::{io_error, Error, ErrorKind, Result};
use crate::nbd::proto::{self, rep, BlockSizes, InfoReply, OptionHeader, OptionReplyHeader};
use crate::nbd::tls::ClientTls;
use crate::nbd::BoxStream;

/// Longest option reply payload accepted (names and descriptions are at most 4 KiB).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies accepted for one option (exports listed, contexts returned).
const MAX_REPLIES_PER_OPTION: usize = 100_000;

/// Block sizes assumed when the server sends none: QEMU's 32 MiB request limit.
pub(crate) const DEFAULT_BLOCK_SIZES: BlockSizes = BlockSizes {
    minimum: 1,
    preferred: 4096,
    maximum: 32 * 1024 * 1024,
};

/// A stream in the middle of option haggling.
pub(crate) struct Haggle {
    pub(crate) stream: BoxStream,
}

/// Read the greeting, send client flags, and run STARTTLS if `tls` is given.
pub(crate) async fn start(mut stream: BoxStream, tls: Option<&ClientTls>) -> Result<Haggle> {
    let mut greeting = [0u8; proto::GREETING_LEN];
    stream
        .read_exact(&mut greeting)
        .await
        .map_err(|e| io_error("reading nbd server greeting", e))?;
    let flags = proto::decode_greeting(&greeting)?;
    if flags & proto::handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(Error::protocol(
            "server greeting: server does not support fixed newstyle negotiation",
        ));
    }
    // This client never sends NBD_OPT_EXPORT_NAME, so the padding never matters; still say we
    // do not want it when the server offers that.
    let mut client_flags = proto::client_flags::FIXED_NEWSTYLE;
    if flags & proto::handshake_flags::NO_ZEROES != 0 {
        client_flags |= proto::client_flags::NO_ZEROES;
    }
    write(
        &mut stream,
        &proto::encode_client_flags(client_flags),
        "client flags",
    )
    .await?;
    let mut h = Haggle { stream };
    if let Some(tls) = tls {
        h.simple_option(proto::opt::STARTTLS, &[]).await?;
        h.stream = tls.upgrade(h.stream).await?;
    }
    Ok(h)
}

async fn write(stream: &mut BoxStream, bytes: &[u8], what: &str) -> Result<()> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| io_error(&format!("sending {what}"), e))
}

impl Haggle {
    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let header = OptionHeader {
            option,
            length: data.len() as u32,
        };
        let name = proto::option_name(option);
        let mut msg = Vec::with_capacity(proto::OPTION_HEADER_LEN + data.len());
        msg.extend_from_slice(&header.encode());
        msg.extend_from_slice(data);
        write(&mut self.stream, &msg, &name).await?;
        self.stream
            .flush()
            .await
            .map_err(|e| io_error(&format!("sending {name}"), e))
    }

    /// Read one reply to `option`; error replies become [`ErrorKind::Refused`] errors.
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let name = proto::option_name(option);
        let mut head = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.stream
            .read_exact(&mut head)
            .await
            .map_err(|e| io_error(&format!("reading reply to {name}"), e))?;
        let header = OptionReplyHeader::decode(&head)?;
        if header.option != option {
            return Err(Error::protocol(format!(
                "option reply: answers {} but {name} was sent",
                proto::option_name(header.option)
            )));
        }
        if header.length > MAX_OPTION_REPLY {
            return Err(Error::protocol(format!(
                "reply to {name}: field length {} exceeds {MAX_OPTION_REPLY}",
                header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        self.stream
            .read_exact(&mut data)
            .await
            .map_err(|e| io_error(&format!("reading reply to {name}"), e))?;
        if header.is_error() {
            let msg = proto::decode_error_message(&data);
            let what = proto::rep_error_name(header.reply_type);
            let detail = if msg.is_empty() {
                String::new()
            } else {
                format!(" ({msg})")
            };
            return Err(Error::new(
                ErrorKind::Refused,
                format!("server refused {name}: {what}{detail}"),
            ));
        }
        Ok((header.reply_type, data))
    }

    /// Send an option that must be answered by a single `NBD_REP_ACK`.
    pub(crate) async fn simple_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.send_option(option, data).await?;
        let (kind, _) = self.reply(option).await?;
        if kind != rep::ACK {
            return Err(Error::protocol(format!(
                "reply to {}: expected NBD_REP_ACK, got reply type {kind}",
                proto::option_name(option)
            )));
        }
        Ok(())
    }

    /// Send `option` and collect the data of every reply of type `item` until `NBD_REP_ACK`.
    async fn collect(&mut self, option: u32, data: &[u8], item: u32) -> Result<Vec<Vec<u8>>> {
        self.send_option(option, data).await?;
        let mut items = Vec::new();
        loop {
            let (kind, data) = self.reply(option).await?;
            match kind {
                rep::ACK => return Ok(items),
                k if k == item && items.len() < MAX_REPLIES_PER_OPTION => items.push(data),
                k => {
                    return Err(Error::protocol(format!(
                        "reply to {}: unexpected reply type {k}",
                        proto::option_name(option)
                    )))
                }
            }
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`. Returns false when the server does not support it.
    pub(crate) async fn structured_replies(&mut self) -> Result<bool> {
        match self.simple_option(proto::opt::STRUCTURED_REPLY, &[]).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::Refused => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` or `SET_META_CONTEXT`: the (id, name) pairs returned.
    pub(crate) async fn meta_contexts(
        &mut self,
        set: bool,
        export: &str,
        queries: &[String],
    ) -> Result<Vec<proto::MetaContextReply>> {
        let option = if set {
            proto::opt::SET_META_CONTEXT
        } else {
            proto::opt::LIST_META_CONTEXT
        };
        let req = proto::MetaContextRequest {
            export: export.to_string(),
            queries: queries.to_vec(),
        };
        let items = self
            .collect(option, &req.encode()?, rep::META_CONTEXT)
            .await?;
        items
            .iter()
            .map(|d| proto::MetaContextReply::decode(d))
            .collect()
    }

    /// `NBD_OPT_LIST`: every export the server offers.
    pub(crate) async fn list(&mut self) -> Result<Vec<proto::ServerReply>> {
        let items = self.collect(proto::opt::LIST, &[], rep::SERVER).await?;
        items
            .iter()
            .map(|d| proto::ServerReply::decode(d))
            .collect()
    }

    /// `NBD_OPT_GO` for `export`: size, flags and block sizes. Transmission starts after it.
    pub(crate) async fn go(&mut self, export: &str) -> Result<ExportInfo> {
        let req = proto::InfoRequest {
            name: export.to_string(),
            requests: vec![proto::info::BLOCK_SIZE, proto::info::DESCRIPTION],
        };
        let items = self
            .collect(proto::opt::GO, &req.encode()?, rep::INFO)
            .await
            .map_err(|e| e.context(format!("opening export {export:?}")))?;
        export_info(export, &items)
    }

    /// `NBD_OPT_ABORT`, then close. Errors are ignored: the session is over either way.
    pub(crate) async fn abort(mut self) {
        if self.send_option(proto::opt::ABORT, &[]).await.is_ok() {
            let _ = self.reply(proto::opt::ABORT).await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// Build the [`ExportInfo`] from the `NBD_REP_INFO` replies to `NBD_OPT_GO`.
fn export_info(export: &str, items: &[Vec<u8>]) -> Result<ExportInfo> {
    let mut size_flags = None;
    let mut block_sizes = None;
    let mut description = String::new();
    for data in items {
        match InfoReply::decode(data)? {
            InfoReply::Export { size, flags } => size_flags = Some((size, flags)),
            InfoReply::BlockSize(b) => {
                b.validate()?;
                block_sizes = Some(b);
            }
            InfoReply::Description(d) => description = d,
            InfoReply::Name(_) | InfoReply::Unknown(_) => {}
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| {
        Error::protocol(format!(
            "reply to NBD_OPT_GO for export {export:?}: no NBD_INFO_EXPORT"
        ))
    })?;
    if size > i64::MAX as u64 {
        return Err(Error::protocol(format!(
            "NBD_INFO_EXPORT for export {export:?}: field size {size} is too large"
        )));
    }
    Ok(ExportInfo {
        name: export.to_string(),
        description,
        size,
        flags,
        block_sizes: block_sizes.unwrap_or(DEFAULT_BLOCK_SIZES),
        meta_contexts: Vec::new(),
        structured_replies: false,
    })
}
