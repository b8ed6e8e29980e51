//! Server side of the fixed newstyle handshake: greeting, client flags, and the option loop
//! (`EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT`, `SET_META_CONTEXT`). Unknown options get `NBD_REP_ERR_UNSUP`.
//!
//! Owns option policy (TLS required, which export, which contexts); it does not own bytes
//! (`proto`) or the transmission phase.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Server;
use crate::nbd::error::{io_error, Error, Result};
use crate::nbd::export::BlockExport;
use crate::nbd::proto::{self, opt, rep, transmission_flags as tf, InfoReply};
use crate::nbd::BoxStream;

/// Longest option payload accepted; longer ones close the connection.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Most options accepted on one connection before giving up on the client.
const MAX_OPTIONS: usize = 1024;

/// A negotiated session, ready for transmission.
pub(crate) struct Session {
    pub(crate) stream: BoxStream,
    pub(crate) name: String,
    pub(crate) export: Arc<dyn BlockExport>,
    pub(crate) structured: bool,
    /// Selected contexts: (id sent to the client, index in the export's context list).
    pub(crate) contexts: Vec<(u32, usize)>,
}

struct State<'a> {
    server: &'a Server,
    stream: BoxStream,
    no_zeroes: bool,
    tls_done: bool,
    structured: bool,
    /// Export name and the contexts selected for it by the last `SET_META_CONTEXT`.
    selected: Option<(String, Vec<(u32, usize)>)>,
}

/// What to do after one option.
enum Next {
    Continue,
    Abort,
    Transmit(String, Arc<dyn BlockExport>),
}

/// Run the handshake. `Ok(None)` when the client ended it with `NBD_OPT_ABORT`.
pub(crate) async fn negotiate(server: &Server, mut stream: BoxStream) -> Result<Option<Session>> {
    let flags = proto::handshake_flags::FIXED_NEWSTYLE | proto::handshake_flags::NO_ZEROES;
    stream
        .write_all(&proto::encode_greeting(flags))
        .await
        .map_err(|e| io_error("sending greeting", e))?;
    let mut cf = [0u8; 4];
    stream
        .read_exact(&mut cf)
        .await
        .map_err(|e| io_error("reading client flags", e))?;
    let client_flags = proto::decode_client_flags(cf);
    let known = proto::client_flags::FIXED_NEWSTYLE | proto::client_flags::NO_ZEROES;
    if client_flags & proto::client_flags::FIXED_NEWSTYLE == 0 || client_flags & !known != 0 {
        return Err(Error::protocol(format!(
            "client flags: unsupported value {client_flags:#x} (fixed newstyle required)"
        )));
    }
    let mut st = State {
        server,
        stream,
        no_zeroes: client_flags & proto::client_flags::NO_ZEROES != 0,
        tls_done: false,
        structured: false,
        selected: None,
    };
    for _ in 0..MAX_OPTIONS {
        let (option, data) = st.read_option().await?;
        match st.option(option, &data).await? {
            Next::Continue => {}
            Next::Abort => return Ok(None),
            Next::Transmit(name, export) => return Ok(Some(st.into_session(name, export))),
        }
    }
    Err(Error::protocol(format!(
        "handshake: client sent more than {MAX_OPTIONS} options"
    )))
}

/// Transmission flags for `export`.
pub(crate) fn export_flags(export: &dyn BlockExport) -> u16 {
    let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA;
    if export.is_writable() {
        flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES;
    } else {
        flags |= tf::READ_ONLY;
    }
    if export.multi_conn_safe() {
        flags |= tf::CAN_MULTI_CONN;
    }
    flags
}

impl State<'_> {
    fn into_session(self, name: String, export: Arc<dyn BlockExport>) -> Session {
        let contexts = match self.selected {
            Some((n, c)) if n == name => c,
            _ => Vec::new(),
        };
        Session {
            stream: self.stream,
            name,
            export,
            structured: self.structured,
            contexts,
        }
    }

    async fn read_option(&mut self) -> Result<(u32, Vec<u8>)> {
        let mut head = [0u8; proto::OPTION_HEADER_LEN];
        self.stream
            .read_exact(&mut head)
            .await
            .map_err(|e| io_error("reading option request", e))?;
        let header = proto::OptionHeader::decode(&head)?;
        if header.length > MAX_OPTION_DATA {
            return Err(Error::protocol(format!(
                "{}: field length {} exceeds {MAX_OPTION_DATA}",
                proto::option_name(header.option),
                header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        self.stream
            .read_exact(&mut data)
            .await
            .map_err(|e| io_error("reading option data", e))?;
        Ok((header.option, data))
    }

    async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> Result<()> {
        let header = proto::OptionReplyHeader {
            option,
            reply_type,
            length: data.len() as u32,
        };
        let mut msg = header.encode().to_vec();
        msg.extend_from_slice(data);
        self.stream
            .write_all(&msg)
            .await
            .map_err(|e| io_error("sending option reply", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| io_error("sending option reply", e))
    }

    async fn error(&mut self, option: u32, reply_type: u32, message: &str) -> Result<Next> {
        self.reply(option, reply_type, message.as_bytes()).await?;
        Ok(Next::Continue)
    }

    fn tls_required(&self) -> bool {
        self.server.options.tls.is_some() && self.server.options.tls_required && !self.tls_done
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        if self.tls_required() && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                return Err(Error::protocol(
                    "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires tls",
                ));
            }
            return self.error(option, rep::ERR_TLS_REQD, "tls required").await;
        }
        match option {
            opt::EXPORT_NAME => self.export_name(data).await,
            opt::ABORT => {
                let _ = self.reply(option, rep::ACK, &[]).await;
                Ok(Next::Abort)
            }
            opt::LIST => self.list(data).await,
            opt::STARTTLS => self.starttls(data).await,
            opt::INFO | opt::GO => self.info_go(option, data).await,
            opt::STRUCTURED_REPLY => self.structured_reply(data).await,
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta(option, data).await,
            _ => {
                self.error(option, rep::ERR_UNSUP, "option not supported")
                    .await
            }
        }
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Next> {
        let name = proto::decode_export_name(data)?;
        let Some(export) = self.server.export(&name) else {
            // This option has no error reply: the protocol says to close the connection.
            return Err(Error::new(
                crate::nbd::ErrorKind::Refused,
                format!("NBD_OPT_EXPORT_NAME: no export named {name:?}"),
            ));
        };
        let msg = proto::encode_export_name_reply(
            export.size(),
            export_flags(export.as_ref()),
            self.no_zeroes,
        );
        self.stream
            .write_all(&msg)
            .await
            .map_err(|e| io_error("sending export details", e))?;
        Ok(Next::Transmit(name, export))
    }

    async fn list(&mut self, data: &[u8]) -> Result<Next> {
        if !data.is_empty() {
            return self
                .error(opt::LIST, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")
                .await;
        }
        for (name, export) in self.server.exports() {
            let item = proto::ServerReply {
                name,
                description: export.description(),
            };
            self.reply(opt::LIST, rep::SERVER, &item.encode()).await?;
        }
        self.reply(opt::LIST, rep::ACK, &[]).await?;
        Ok(Next::Continue)
    }

    async fn starttls(&mut self, data: &[u8]) -> Result<Next> {
        let Some(tls) = self.server.options.tls.clone() else {
            return self
                .error(opt::STARTTLS, rep::ERR_POLICY, "tls not configured")
                .await;
        };
        if self.tls_done || !data.is_empty() {
            return self
                .error(
                    opt::STARTTLS,
                    rep::ERR_INVALID,
                    "tls already active or data given",
                )
                .await;
        }
        self.reply(opt::STARTTLS, rep::ACK, &[]).await?;
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::empty()));
        self.stream = tls.upgrade(plain).await?;
        self.tls_done = true;
        // Everything negotiated in clear text is forgotten (protocol requirement).
        self.structured = false;
        self.selected = None;
        Ok(Next::Continue)
    }

    async fn structured_reply(&mut self, data: &[u8]) -> Result<Next> {
        if !data.is_empty() || self.structured {
            return self
                .error(
                    opt::STRUCTURED_REPLY,
                    rep::ERR_INVALID,
                    "data given or already negotiated",
                )
                .await;
        }
        self.structured = true;
        self.reply(opt::STRUCTURED_REPLY, rep::ACK, &[]).await?;
        Ok(Next::Continue)
    }

    async fn info_go(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        let req = match proto::InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return self.error(option, rep::ERR_INVALID, e.message()).await,
        };
        let Some(export) = self.server.export(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            return self.error(option, rep::ERR_UNKNOWN, &msg).await;
        };
        let mut infos = vec![
            InfoReply::Export {
                size: export.size(),
                flags: export_flags(export.as_ref()),
            },
            InfoReply::BlockSize(export.block_sizes()),
        ];
        if req.requests.contains(&proto::info::NAME) {
            infos.push(InfoReply::Name(req.name.clone()));
        }
        let description = export.description();
        if req.requests.contains(&proto::info::DESCRIPTION) && !description.is_empty() {
            infos.push(InfoReply::Description(description));
        }
        for info in infos {
            self.reply(option, rep::INFO, &info.encode()).await?;
        }
        self.reply(option, rep::ACK, &[]).await?;
        if option == opt::GO {
            return Ok(Next::Transmit(req.name, export));
        }
        Ok(Next::Continue)
    }

    async fn meta(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        if !self.structured {
            return self
                .error(
                    option,
                    rep::ERR_INVALID,
                    "structured replies not negotiated",
                )
                .await;
        }
        let req = match proto::MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return self.error(option, rep::ERR_INVALID, e.message()).await,
        };
        let Some(export) = self.server.export(&req.export) else {
            let msg = format!("no export named {:?}", req.export);
            return self.error(option, rep::ERR_UNKNOWN, &msg).await;
        };
        let set = option == opt::SET_META_CONTEXT;
        let matches = match_contexts(&export.meta_contexts(), &req.queries, set);
        for &(id, ref name) in &matches {
            let item = proto::MetaContextReply {
                id,
                name: name.clone(),
            };
            self.reply(option, rep::META_CONTEXT, &item.encode())
                .await?;
        }
        if set {
            let ids = matches.iter().map(|(id, _)| (*id, *id as usize)).collect();
            self.selected = Some((req.export, ids));
        }
        self.reply(option, rep::ACK, &[]).await?;
        Ok(Next::Continue)
    }
}

/// The contexts of `available` matching `queries`, as (id = index, name). For a list, an
/// empty query list matches everything and a query ending in `:` matches its namespace; a set
/// matches exact names only.
fn match_contexts(available: &[String], queries: &[String], set: bool) -> Vec<(u32, String)> {
    available
        .iter()
        .enumerate()
        .filter(|(_, name)| {
            (!set && queries.is_empty())
                || queries.iter().any(|q| {
                    q == *name || (!set && q.ends_with(':') && name.starts_with(q.as_str()))
                })
        })
        .map(|(i, name)| (i as u32, name.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_queries_match_names_and_namespaces() {
        let available = vec![
            "base:allocation".to_string(),
            "qemu:dirty-bitmap:a".to_string(),
        ];
        let q = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(match_contexts(&available, &[], false).len(), 2);
        assert_eq!(match_contexts(&available, &[], true).len(), 0);
        assert_eq!(
            match_contexts(&available, &q(&["qemu:dirty-bitmap:"]), false),
            vec![(1, "qemu:dirty-bitmap:a".to_string())]
        );
        assert!(match_contexts(&available, &q(&["qemu:dirty-bitmap:"]), true).is_empty());
        assert_eq!(
            match_contexts(&available, &q(&["base:allocation", "nope"]), true),
            vec![(0, "base:allocation".to_string())]
        );
    }
}
