//! NBD client: connect, negotiate, and read, write and query block status with many requests
//! in flight over one or several connections.
//!
//! Owns the public client API ([`Client`], [`ClientOptions`], [`ExportInfo`], [`Extent`]),
//! limits on requests and bytes in flight, splitting of requests larger than the server's
//! maximum, and walking block status across a whole range. The handshake is in `handshake`,
//! the per-connection reply demultiplexing in `transmission`.

mod handshake;
mod transmission;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::transmission::{Conn, Reply};
use super::error::{Error, ErrorKind, Result};
use super::proto::{self, cmd, cmd_flags, transmission_flags as tf, BlockSizes, Request};
use super::{Address, BoxStream, ClientTls};

/// How to connect and what to negotiate.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Export name (empty: the server's default export).
    pub export: String,
    /// Meta contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:backup-vda`. Each
    /// must be granted by the server, or connecting fails with [`ErrorKind::Refused`].
    pub meta_contexts: Vec<String>,
    /// TLS (`NBD_OPT_STARTTLS`); `None` for a plain connection.
    pub tls: Option<ClientTls>,
    /// Connections to open when the server allows several (`NBD_FLAG_CAN_MULTI_CONN`); one
    /// otherwise.
    pub connections: usize,
    /// Bound on bytes of read and write payloads in flight over all connections.
    pub max_in_flight_bytes: usize,
    /// Bound on requests in flight over all connections.
    pub max_in_flight_requests: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            export: String::new(),
            meta_contexts: Vec::new(),
            tls: None,
            connections: 1,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_in_flight_requests: 64,
        }
    }
}

/// A meta context the server granted, with the id it uses in block status replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Server-chosen id.
    pub id: u32,
    /// Full name.
    pub name: String,
}

/// What the handshake learnt about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name as requested.
    pub name: String,
    /// Description, if the server sent one.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::transmission_flags`).
    pub flags: u16,
    /// Block size constraints (QEMU's defaults when the server sent none).
    pub block_sizes: BlockSizes,
    /// Meta contexts granted.
    pub meta_contexts: Vec<MetaContext>,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.has(tf::READ_ONLY)
    }
    /// Whether several connections see each other's writes and flushes.
    pub fn can_multi_conn(&self) -> bool {
        self.has(tf::CAN_MULTI_CONN)
    }
    /// Whether `NBD_CMD_FLUSH` is supported.
    pub fn can_flush(&self) -> bool {
        self.has(tf::SEND_FLUSH)
    }
    /// Whether `NBD_CMD_WRITE_ZEROES` is supported.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(tf::SEND_WRITE_ZEROES)
    }
    /// Whether forced unit access is supported.
    pub fn can_fua(&self) -> bool {
        self.has(tf::SEND_FUA)
    }
    /// The id of granted context `name`.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.meta_contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }
}

/// A run of bytes with one status in one meta context. For `base:allocation`, flags bit 0 is
/// "hole" and bit 1 "reads as zeroes"; for `qemu:dirty-bitmap:*` bit 0 is "dirty"; for
/// `qemu:allocation-depth` the flags are the depth (0: unallocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Absolute offset in the export.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// Status flags.
    pub flags: u32,
}

impl Extent {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A connected NBD client. Cheap to clone; every method takes `&self` and may be called from
/// many tasks at once: requests are pipelined. Dropping the last clone closes the connections
/// (call [`Client::disconnect`] first for a clean `NBD_CMD_DISC`).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.info)
            .field("connections", &self.inner.conns.len())
            .finish()
    }
}

struct Inner {
    info: ExportInfo,
    conns: Vec<Conn>,
    next: AtomicUsize,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_requests: u32,
    max_bytes: usize,
}

/// `NBD_OPT_LIST`: the exports (name, description) the server at `address` offers.
pub async fn list_exports(
    address: &Address,
    tls: Option<&ClientTls>,
) -> Result<Vec<(String, String)>> {
    let mut h = handshake::start(address.connect().await?, tls).await?;
    let list = h.list().await?;
    h.abort().await;
    Ok(list.into_iter().map(|s| (s.name, s.description)).collect())
}

/// `NBD_OPT_LIST_META_CONTEXT`: the contexts of `export` matching `queries` (all contexts
/// when `queries` is empty; a query such as `qemu:dirty-bitmap:` lists a namespace).
pub async fn list_meta_contexts(
    address: &Address,
    tls: Option<&ClientTls>,
    export: &str,
    queries: &[String],
) -> Result<Vec<String>> {
    let mut h = handshake::start(address.connect().await?, tls).await?;
    if !h.structured_replies().await? {
        return Err(Error::new(
            ErrorKind::Refused,
            format!("nbd server {address} does not support structured replies"),
        ));
    }
    let list = h.meta_contexts(false, export, queries).await?;
    h.abort().await;
    Ok(list.into_iter().map(|c| c.name).collect())
}

/// Run the whole handshake on `stream` up to transmission. When the server refuses
/// something, end the session politely with `NBD_OPT_ABORT`.
async fn negotiate(stream: BoxStream, options: &ClientOptions) -> Result<(BoxStream, ExportInfo)> {
    let mut h = handshake::start(stream, options.tls.as_ref()).await?;
    match haggle(&mut h, options).await {
        Ok(info) => Ok((h.stream, info)),
        Err(e) => {
            if e.kind() == ErrorKind::Refused {
                h.abort().await;
            }
            Err(e)
        }
    }
}

async fn haggle(h: &mut handshake::Haggle, options: &ClientOptions) -> Result<ExportInfo> {
    let structured = h.structured_replies().await?;
    let mut contexts = Vec::new();
    if !options.meta_contexts.is_empty() {
        if !structured {
            return Err(Error::new(
                ErrorKind::Refused,
                "server does not support structured replies, so no meta contexts",
            ));
        }
        let granted = h
            .meta_contexts(true, &options.export, &options.meta_contexts)
            .await?;
        contexts = check_contexts(&options.export, &options.meta_contexts, granted)?;
    }
    let mut info = h.go(&options.export).await?;
    info.structured_replies = structured;
    info.meta_contexts = contexts;
    Ok(info)
}

fn check_contexts(
    export: &str,
    wanted: &[String],
    granted: Vec<proto::MetaContextReply>,
) -> Result<Vec<MetaContext>> {
    for name in wanted {
        if !granted.iter().any(|g| &g.name == name) {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("export {export:?} does not offer meta context {name:?}"),
            ));
        }
    }
    Ok(granted
        .into_iter()
        .map(|g| MetaContext {
            id: g.id,
            name: g.name,
        })
        .collect())
}

impl Client {
    /// Connect to `address` and negotiate `options`; opens several connections when the
    /// server allows it and `options.connections` asks for it.
    pub async fn connect(address: &Address, options: &ClientOptions) -> Result<Client> {
        let label = format!("nbd server {address} export {:?}", options.export);
        let (stream, info) = negotiate(address.connect().await?, options)
            .await
            .map_err(|e| e.context(&label))?;
        let mut streams = vec![stream];
        if info.can_multi_conn() {
            for _ in 1..options.connections.max(1) {
                let (s, other) = negotiate(address.connect().await?, options)
                    .await
                    .map_err(|e| e.context(&label))?;
                if other.size != info.size {
                    return Err(Error::protocol(format!(
                        "{label}: connections disagree on the export size"
                    )));
                }
                streams.push(s);
            }
        }
        tracing::debug!(
            connections = streams.len(),
            multi_conn = info.can_multi_conn(),
            "{label}: connected"
        );
        Ok(Self::start(streams, info, options, label))
    }

    /// Negotiate `options` on an already connected stream (one connection).
    pub async fn from_stream(stream: BoxStream, options: &ClientOptions) -> Result<Client> {
        let label = format!("nbd export {:?}", options.export);
        let (stream, info) = negotiate(stream, options)
            .await
            .map_err(|e| e.context(&label))?;
        Ok(Self::start(vec![stream], info, options, label))
    }

    fn start(
        streams: Vec<BoxStream>,
        info: ExportInfo,
        options: &ClientOptions,
        label: String,
    ) -> Client {
        let ids: Vec<u32> = info.meta_contexts.iter().map(|c| c.id).collect();
        let conns = streams
            .into_iter()
            .map(|s| Conn::start(s, ids.clone(), label.clone()))
            .collect();
        let max_requests = options.max_in_flight_requests.clamp(1, 1 << 16) as u32;
        let max_bytes = options
            .max_in_flight_bytes
            .clamp(info.block_sizes.maximum.min(32 << 20) as usize, 1 << 40);
        Client {
            inner: Arc::new(Inner {
                info,
                conns,
                next: AtomicUsize::new(0),
                requests: Arc::new(Semaphore::new(max_requests as usize)),
                bytes: Arc::new(Semaphore::new(max_bytes)),
                max_requests,
                max_bytes,
            }),
        }
    }

    /// What the handshake learnt about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Number of connections in use.
    pub fn connections(&self) -> usize {
        self.inner.conns.len()
    }

    /// Largest payload of one request: the server's maximum, at most 32 MiB.
    pub fn max_request(&self) -> u32 {
        let b = self.inner.info.block_sizes;
        (b.maximum.min(32 << 20) / b.minimum) * b.minimum
    }

    /// Check that `[offset, offset+length)` lies inside the export and respects the minimum
    /// block size.
    fn check_range(&self, what: &str, offset: u64, length: u64) -> Result<()> {
        let info = &self.inner.info;
        let end = offset.checked_add(length).filter(|&e| e <= info.size);
        if end.is_none() {
            return Err(Error::invalid(format!(
                "{what} at offset {offset} length {length} exceeds export {:?} of size {}",
                info.name, info.size
            )));
        }
        let min = info.block_sizes.minimum as u64;
        if !offset.is_multiple_of(min)
            || (!length.is_multiple_of(min) && offset + length != info.size)
        {
            return Err(Error::invalid(format!(
                "{what} at offset {offset} length {length} is not aligned to the minimum block size {min} of export {:?}",
                info.name
            )));
        }
        Ok(())
    }

    async fn permits(&self, bytes: u64) -> Result<Vec<OwnedSemaphorePermit>> {
        let closed = |_| Error::new(ErrorKind::Connection, "nbd client is disconnected");
        let req = self
            .inner
            .requests
            .clone()
            .acquire_owned()
            .await
            .map_err(closed)?;
        let mut permits = vec![req];
        if bytes > 0 {
            let n = (bytes as usize).min(self.inner.max_bytes) as u32;
            let b = self.inner.bytes.clone().acquire_many_owned(n);
            permits.push(b.await.map_err(closed)?);
        }
        Ok(permits)
    }

    /// Send one request (length already within limits) and return the reply receiver.
    async fn send(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        buffer: BytesMut,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Reply>>> {
        let payload_len = match command {
            cmd::READ | cmd::WRITE => length as u64,
            _ => 0,
        };
        let permits = self.permits(payload_len).await?;
        let conns = &self.inner.conns;
        let conn = &conns[self.inner.next.fetch_add(1, Ordering::Relaxed) % conns.len()];
        let request = Request {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        };
        conn.submit(request, payload, buffer, permits)
    }

    async fn wait(rx: tokio::sync::oneshot::Receiver<Result<Reply>>) -> Result<Reply> {
        rx.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Connection,
                "nbd connection closed before the reply arrived",
            ))
        })
    }

    /// Split `[offset, offset+length)` into requests of at most [`Client::max_request`].
    fn pieces(&self, offset: u64, length: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = self.max_request() as u64;
        let end = offset + length;
        (offset..end)
            .step_by(max as usize)
            .map(move |o| (o, (end - o).min(max) as u32))
    }

    /// Read `length` bytes at `offset`. Ranges longer than the server's maximum request are
    /// split into several requests sent back to back.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        Ok(self
            .read_into(offset, length, BytesMut::new())
            .await?
            .freeze())
    }

    /// Like [`Client::read`], into `buffer` (cleared first, grown as needed) which is returned
    /// filled. Passing the same buffers again avoids page faults on fresh memory: with large
    /// requests that is the difference between about 0.5 and 2+ GB/s.
    pub async fn read_into(&self, offset: u64, length: u64, buffer: BytesMut) -> Result<BytesMut> {
        self.check_range("read", offset, length)?;
        let mut buffer = buffer;
        buffer.clear();
        if length == 0 {
            return Ok(buffer);
        }
        if length <= self.max_request() as u64 {
            let rx = self
                .send(cmd::READ, 0, offset, length as u32, None, buffer)
                .await?;
            return Self::data(offset, Self::wait(rx).await?);
        }
        let mut receivers = Vec::new();
        for (o, l) in self.pieces(offset, length) {
            receivers.push(self.send(cmd::READ, 0, o, l, None, BytesMut::new()).await?);
        }
        buffer.reserve(length as usize);
        for rx in receivers {
            buffer.extend_from_slice(&Self::data(offset, Self::wait(rx).await?)?);
        }
        Ok(buffer)
    }

    fn data(offset: u64, reply: Reply) -> Result<BytesMut> {
        match reply {
            Reply::Data(d) => Ok(d),
            other => Err(Error::protocol(format!(
                "reply to NBD_CMD_READ at offset {offset}: unexpected {other:?}"
            ))),
        }
    }

    fn check_writable(&self, what: &str, flag: u16) -> Result<()> {
        let info = &self.inner.info;
        if info.is_read_only() {
            return Err(Error::invalid(format!(
                "{what}: export {:?} is read-only",
                info.name
            )));
        }
        if flag != 0 && !info.has(flag) {
            return Err(Error::invalid(format!(
                "{what}: export {:?} does not support it",
                info.name
            )));
        }
        Ok(())
    }

    async fn acked(&self, command: u16, flags: u16, offset: u64, length: u32) -> Result<()> {
        let rx = self
            .send(command, flags, offset, length, None, BytesMut::new())
            .await?;
        Self::wait(rx).await.map(|_| ())
    }

    /// Write `data` at `offset`, split as needed; with `fua`, durable when this returns.
    pub async fn write(&self, offset: u64, data: impl Into<Bytes>, fua: bool) -> Result<()> {
        let data: Bytes = data.into();
        self.check_writable("write", 0)?;
        self.check_range("write", offset, data.len() as u64)?;
        let flags = self.fua_flag(fua);
        let mut receivers = Vec::new();
        for (o, l) in self.pieces(offset, data.len() as u64) {
            let start = (o - offset) as usize;
            let part = data.slice(start..start + l as usize);
            receivers.push(
                self.send(cmd::WRITE, flags, o, l, Some(part), BytesMut::new())
                    .await?,
            );
        }
        for rx in receivers {
            Self::wait(rx).await?;
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> u16 {
        if fua && self.inner.info.can_fua() {
            cmd_flags::FUA
        } else {
            0
        }
    }

    /// Write zeroes over `[offset, offset+length)`; the server may punch holes.
    pub async fn write_zeroes(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        self.check_writable("write zeroes", tf::SEND_WRITE_ZEROES)?;
        self.check_range("write zeroes", offset, length)?;
        self.ranged(cmd::WRITE_ZEROES, self.fua_flag(fua), offset, length)
            .await
    }

    /// Discard `[offset, offset+length)` (contents become unspecified).
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable("trim", tf::SEND_TRIM)?;
        self.check_range("trim", offset, length)?;
        self.ranged(cmd::TRIM, 0, offset, length).await
    }

    /// Send a payload-less command over a range, in pieces of at most 1 GiB.
    async fn ranged(&self, command: u16, flags: u16, offset: u64, length: u64) -> Result<()> {
        let end = offset + length;
        let step = self.status_step();
        let mut receivers = Vec::new();
        let mut o = offset;
        while o < end {
            let l = (end - o).min(step) as u32;
            receivers.push(
                self.send(command, flags, o, l, None, BytesMut::new())
                    .await?,
            );
            o += l as u64;
        }
        for rx in receivers {
            Self::wait(rx).await?;
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<()> {
        if !self.inner.info.can_flush() {
            return Ok(());
        }
        self.acked(cmd::FLUSH, 0, 0, 0).await
    }

    /// The longest length of one block status, trim or write zeroes request: 1 GiB, rounded
    /// to the minimum block size.
    fn status_step(&self) -> u64 {
        let min = self.inner.info.block_sizes.minimum as u64;
        ((1u64 << 30) / min) * min
    }

    /// One `NBD_CMD_BLOCK_STATUS` request at `offset` for at most `length` bytes: the extents
    /// of every negotiated context, each clipped to the request (the server may describe less
    /// than asked, never more after clipping).
    pub async fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<BTreeMap<String, Vec<Extent>>> {
        self.check_range("block status", offset, length)?;
        let length = length.min(self.status_step()) as u32;
        if self.inner.info.meta_contexts.is_empty() {
            return Err(Error::invalid(
                "block status: no meta context was negotiated",
            ));
        }
        let rx = self
            .send(cmd::BLOCK_STATUS, 0, offset, length, None, BytesMut::new())
            .await?;
        let chunks = match Self::wait(rx).await? {
            Reply::Status(chunks) => chunks,
            other => {
                return Err(Error::protocol(format!(
                    "reply to NBD_CMD_BLOCK_STATUS at offset {offset}: unexpected {other:?}"
                )))
            }
        };
        let mut out = BTreeMap::new();
        for chunk in chunks {
            let name = self.context_name(chunk.context_id);
            out.insert(name, clip(offset, length as u64, &chunk.descriptors));
        }
        Ok(out)
    }

    fn context_name(&self, id: u32) -> String {
        let contexts = &self.inner.info.meta_contexts;
        contexts
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }

    /// The extents of every negotiated context covering exactly `[offset, offset+length)`,
    /// with adjacent extents of equal status merged. Issues as many block status requests as
    /// the server needs (it may answer with more or less than asked).
    pub async fn extents_all(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<BTreeMap<String, Vec<Extent>>> {
        self.check_range("block status", offset, length)?;
        let end = offset + length;
        let mut out: BTreeMap<String, Vec<Extent>> = self
            .inner
            .info
            .meta_contexts
            .iter()
            .map(|c| (c.name.clone(), Vec::new()))
            .collect();
        loop {
            let pos = out
                .values()
                .map(|v| v.last().map_or(offset, Extent::end))
                .min();
            let Some(pos) = pos.filter(|&p| p < end) else {
                return Ok(out);
            };
            let reply = self.block_status(pos, end - pos).await?;
            let mut progressed = false;
            for (name, extents) in reply {
                let list = out.entry(name).or_default();
                let have = list.last().map_or(offset, Extent::end);
                for e in extents.into_iter().filter_map(|e| clip_from(e, have)) {
                    push_merged(list, e);
                    progressed = true;
                }
            }
            if !progressed {
                return Err(Error::protocol(format!(
                    "block status at offset {pos}: server made no progress"
                )));
            }
        }
    }

    /// The extents of context `context` covering exactly `[offset, offset+length)`.
    pub async fn extents(&self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        if self.inner.info.context_id(context).is_none() {
            return Err(Error::invalid(format!(
                "block status: meta context {context:?} was not negotiated for export {:?}",
                self.inner.info.name
            )));
        }
        let mut all = self.extents_all(offset, length).await?;
        Ok(all.remove(context).unwrap_or_default())
    }

    /// Wait for requests in flight, send `NBD_CMD_DISC` on every connection and close them.
    /// Later requests fail with [`ErrorKind::Connection`].
    pub async fn disconnect(&self) -> Result<()> {
        let all = self
            .inner
            .requests
            .acquire_many(self.inner.max_requests)
            .await;
        self.inner.requests.close();
        drop(all);
        for conn in &self.inner.conns {
            conn.disconnect().await;
        }
        Ok(())
    }
}

/// Turn descriptors starting at `offset` into extents clipped to `[offset, offset+length)`.
fn clip(offset: u64, length: u64, descriptors: &[proto::Descriptor]) -> Vec<Extent> {
    let end = offset + length;
    let mut pos = offset;
    let mut out = Vec::new();
    for d in descriptors {
        if pos >= end {
            break;
        }
        let len = (d.length as u64).min(end - pos);
        push_merged(
            &mut out,
            Extent {
                offset: pos,
                length: len,
                flags: d.flags,
            },
        );
        pos += len;
    }
    out
}

/// The part of `e` at or after `from`, if any.
fn clip_from(e: Extent, from: u64) -> Option<Extent> {
    if e.end() <= from {
        return None;
    }
    let start = e.offset.max(from);
    Some(Extent {
        offset: start,
        length: e.end() - start,
        flags: e.flags,
    })
}

fn push_merged(list: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = list.last_mut() {
        if last.flags == e.flags && last.end() == e.offset {
            last.length += e.length;
            return;
        }
    }
    list.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_extents_longer_than_asked_and_merges() {
        let d = |length, flags| proto::Descriptor { length, flags };
        let e = clip(100, 50, &[d(10, 1), d(10, 1), d(100, 0)]);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 100,
                    length: 20,
                    flags: 1
                },
                Extent {
                    offset: 120,
                    length: 30,
                    flags: 0
                }
            ]
        );
    }

    #[test]
    fn clip_from_drops_what_is_already_known() {
        let e = Extent {
            offset: 0,
            length: 10,
            flags: 3,
        };
        assert_eq!(clip_from(e, 10), None);
        assert_eq!(
            clip_from(e, 4),
            Some(Extent {
                offset: 4,
                length: 6,
                flags: 3
            })
        );
    }
}
