//! Client transmission phase on one connection: a writer task that sends requests in batches,
//! and a reader task that demultiplexes simple and structured replies by cookie to the waiting
//! requests.
//!
//! Owns the per-request validation of reply chunks (types allowed per command, offsets inside
//! the request, every byte of a read covered exactly once, context ids known); it does not own
//! splitting, limits on requests in flight, or choosing a connection (`client`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::task::JoinHandle;

use crate::nbd::error::{io_error, Error, ErrorKind, Result};
use crate::nbd::proto::{self, cmd, reply_type, ChunkHeader, ReplyHeader, Request};
use crate::nbd::BoxStream;

/// Largest block status chunk accepted (about a million descriptors).
const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * 1024 * 1024;
/// Largest error chunk: error, message length, a 64 KiB message, an offset.
const MAX_ERROR_PAYLOAD: u32 = 4 + 2 + 65535 + 8;
/// Socket read buffer: headers and small payloads are read through it, large data bypasses it.
const READ_BUFFER: usize = 64 * 1024;

/// What a completed request yields.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Data of a read.
    Data(BytesMut),
    /// Block status chunks, one or more per context.
    Status(Vec<proto::BlockStatusChunk>),
    /// Success of a command without data.
    Ack,
}

/// A request waiting for its reply.
struct Pending {
    request: Request,
    body: Body,
    error: Option<Error>,
    tx: oneshot::Sender<Result<Reply>>,
    _permits: Vec<OwnedSemaphorePermit>,
}

enum Body {
    Read(ReadBuf),
    Status(Vec<proto::BlockStatusChunk>),
    None,
}

struct State {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    closed: Option<Error>,
}

struct Shared {
    state: Mutex<State>,
    contexts: Vec<u32>,
    label: String,
}

struct Outgoing {
    header: [u8; proto::REQUEST_LEN],
    payload: Option<Bytes>,
}

/// One connection in transmission phase.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::UnboundedSender<Outgoing>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    writer: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.abort();
        if let Some(r) = lock(&self.reader).take() {
            r.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn take(&self, cookie: u64) -> Result<Pending> {
        lock(&self.state).pending.remove(&cookie).ok_or_else(|| {
            Error::protocol(format!(
                "reply from {}: field cookie {cookie:#x} matches no request in flight",
                self.label
            ))
        })
    }

    fn put_back(&self, cookie: u64, p: Pending) {
        lock(&self.state).pending.insert(cookie, p);
    }

    /// Close the connection: every waiting request and every later one gets `err`.
    fn fail_all(&self, err: Error) {
        let pending: Vec<Pending> = {
            let mut st = lock(&self.state);
            st.closed.get_or_insert(err.clone());
            st.pending.drain().map(|(_, p)| p).collect()
        };
        for p in pending {
            let _ = p.tx.send(Err(err.clone()));
        }
    }
}

impl Conn {
    /// Start the reader and writer tasks on a negotiated stream.
    pub(crate) fn start(stream: BoxStream, contexts: Vec<u32>, label: String) -> Conn {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                next_cookie: 1,
                closed: None,
            }),
            contexts,
            label,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_loop(wr, rx, shared.clone()));
        let reader = tokio::spawn(reader_loop(
            BufReader::with_capacity(READ_BUFFER, rd),
            shared.clone(),
        ));
        Conn {
            shared,
            tx: Mutex::new(Some(tx)),
            reader: Mutex::new(Some(reader)),
            writer,
        }
    }

    /// Queue `request` (its cookie is assigned here); the receiver yields the reply. A read
    /// lands in `buffer` (cleared first; reusing buffers avoids page faults on fresh memory).
    pub(crate) fn submit(
        &self,
        mut request: Request,
        payload: Option<Bytes>,
        buffer: BytesMut,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> Result<oneshot::Receiver<Result<Reply>>> {
        let (tx, rx) = oneshot::channel();
        let body = match request.command {
            cmd::READ => Body::Read(ReadBuf::new(buffer, request.length as usize)),
            cmd::BLOCK_STATUS => Body::Status(Vec::new()),
            _ => Body::None,
        };
        let sender = lock(&self.tx).clone();
        let mut st = lock(&self.shared.state);
        if let Some(err) = &st.closed {
            return Err(err.clone());
        }
        let Some(sender) = sender else {
            return Err(self.closed_error());
        };
        request.cookie = st.next_cookie;
        st.next_cookie += 1;
        let pending = Pending {
            request,
            body,
            error: None,
            tx,
            _permits: permits,
        };
        st.pending.insert(request.cookie, pending);
        let out = Outgoing {
            header: request.encode(),
            payload,
        };
        // The writer task owns the socket: a caller dropping its future cannot leave half a
        // request on the wire.
        if sender.send(out).is_err() {
            st.pending.remove(&request.cookie);
            return Err(self.closed_error());
        }
        Ok(rx)
    }

    fn closed_error(&self) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!("connection to {} is closed", self.shared.label),
        )
    }

    /// Send `NBD_CMD_DISC`, stop accepting requests, and wait (briefly) for the server to
    /// close. The caller has waited for requests in flight to finish.
    pub(crate) async fn disconnect(&self) {
        let disc = Request {
            flags: 0,
            command: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(Outgoing {
                header: disc.encode(),
                payload: None,
            });
        }
        let reader = lock(&self.reader).take();
        if let Some(reader) = reader {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        self.shared.fail_all(self.closed_error());
    }
}

async fn writer_loop(
    mut wr: WriteHalf<BoxStream>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::with_capacity(64 * proto::REQUEST_LEN);
    while let Some(first) = rx.recv().await {
        batch.clear();
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(out) = next.take() {
            batch.extend_from_slice(&out.header);
            if let Some(payload) = out.payload {
                result = write_parts(&mut wr, &mut batch, &payload).await;
            }
            if result.is_err() || batch.len() >= 64 * proto::REQUEST_LEN {
                break;
            }
            next = rx.try_recv().ok();
        }
        if result.is_ok() {
            result = write_parts(&mut wr, &mut batch, &[]).await;
        }
        if let Err(e) = result {
            shared.fail_all(io_error(&format!("sending request to {}", shared.label), e));
            return;
        }
    }
    // The sender was dropped (disconnect): the last request was NBD_CMD_DISC.
    let _ = wr.shutdown().await;
}

async fn write_parts(
    wr: &mut WriteHalf<BoxStream>,
    batch: &mut Vec<u8>,
    payload: &[u8],
) -> std::io::Result<()> {
    if !batch.is_empty() {
        wr.write_all(batch).await?;
        batch.clear();
    }
    if !payload.is_empty() {
        wr.write_all(payload).await?;
    }
    wr.flush().await
}

type Reader = BufReader<ReadHalf<BoxStream>>;

async fn reader_loop(mut rd: Reader, shared: Arc<Shared>) {
    let err = loop {
        if let Err(e) = read_reply(&mut rd, &shared).await {
            break e;
        }
    };
    tracing::debug!(peer = %shared.label, error = %catalog::Chain(&err), "nbd client connection ended");
    shared.fail_all(err);
}

async fn read_reply(rd: &mut Reader, shared: &Shared) -> Result<()> {
    let what = || format!("reading reply from {}", shared.label);
    let mut head = [0u8; proto::STRUCTURED_REPLY_LEN];
    rd.read_exact(&mut head[..proto::SIMPLE_REPLY_LEN])
        .await
        .map_err(|e| io_error(&what(), e))?;
    let len = proto::reply_header_len([head[0], head[1], head[2], head[3]])?;
    rd.read_exact(&mut head[proto::SIMPLE_REPLY_LEN..len])
        .await
        .map_err(|e| io_error(&what(), e))?;
    match proto::decode_reply_header(&head[..len])? {
        ReplyHeader::Simple { error, cookie } => {
            let mut p = shared.take(cookie)?;
            let result = simple_reply(rd, &mut p, error).await;
            finish_chunk(shared, cookie, p, result, true)
        }
        ReplyHeader::Structured(chunk) => {
            let mut p = shared.take(chunk.cookie)?;
            let result = structured_chunk(rd, shared, &mut p, &chunk).await;
            finish_chunk(shared, chunk.cookie, p, result, chunk.is_done())
        }
    }
}

/// After one chunk: on a stream-level error fail the request and the connection; on the last
/// chunk answer the request; otherwise keep waiting.
fn finish_chunk(
    shared: &Shared,
    cookie: u64,
    p: Pending,
    result: Result<()>,
    done: bool,
) -> Result<()> {
    if let Err(e) = result {
        let _ = p.tx.send(Err(e.clone()));
        return Err(e);
    }
    if done {
        complete(p);
    } else {
        shared.put_back(cookie, p);
    }
    Ok(())
}

fn complete(p: Pending) {
    let result = match (p.error, p.body) {
        (Some(e), _) => Err(e),
        (None, Body::Read(buf)) => buf.finish(&p.request).map(Reply::Data),
        (None, Body::Status(chunks)) if chunks.is_empty() => Err(Error::protocol(
            "reply to NBD_CMD_BLOCK_STATUS: no NBD_REPLY_TYPE_BLOCK_STATUS chunk",
        )),
        (None, Body::Status(chunks)) => Ok(Reply::Status(chunks)),
        (None, Body::None) => Ok(Reply::Ack),
    };
    let _ = p.tx.send(result);
}

fn remote_error(p: &Pending, errno: u32, message: &str) -> Error {
    let detail = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    Error::remote(
        errno,
        format!(
            "{} at offset {} length {} failed: {}{detail}",
            proto::command_name(p.request.command),
            p.request.offset,
            p.request.length,
            proto::errno::name(errno)
        ),
    )
}

async fn simple_reply(rd: &mut Reader, p: &mut Pending, error: u32) -> Result<()> {
    if error != 0 {
        p.error = Some(remote_error(p, error, ""));
        return Ok(());
    }
    if let Body::Read(buf) = &mut p.body {
        let len = p.request.length as usize;
        buf.fill_data(rd, 0, len).await?;
    }
    Ok(())
}

fn chunk_error(chunk: &ChunkHeader, p: &Pending, message: &str) -> Error {
    Error::protocol(format!(
        "structured reply chunk type {} to {} at offset {}: {message}",
        chunk.reply_type,
        proto::command_name(p.request.command),
        p.request.offset
    ))
}

async fn read_payload(rd: &mut Reader, len: u32, what: &str) -> Result<Vec<u8>> {
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(|e| io_error(&format!("reading {what} payload"), e))?;
    Ok(data)
}

async fn structured_chunk(
    rd: &mut Reader,
    shared: &Shared,
    p: &mut Pending,
    chunk: &ChunkHeader,
) -> Result<()> {
    let req = p.request;
    match chunk.reply_type {
        reply_type::NONE if chunk.length == 0 && chunk.is_done() => Ok(()),
        reply_type::NONE => Err(chunk_error(
            chunk,
            p,
            "NBD_REPLY_TYPE_NONE must be empty and final",
        )),
        reply_type::OFFSET_DATA => offset_data(rd, p, chunk).await,
        reply_type::OFFSET_HOLE => {
            if chunk.length != 12 || !matches!(p.body, Body::Read(_)) {
                return Err(chunk_error(
                    chunk,
                    p,
                    "unexpected NBD_REPLY_TYPE_OFFSET_HOLE",
                ));
            }
            let hole = proto::OffsetHole::decode(&read_payload(rd, 12, "hole chunk").await?)?;
            let rel = relative(&req, hole.offset, hole.length as u64)
                .ok_or_else(|| chunk_error(chunk, p, "hole outside the requested range"))?;
            match &mut p.body {
                Body::Read(buf) => buf.fill_hole(rel, hole.length as usize),
                _ => Ok(()),
            }
        }
        reply_type::BLOCK_STATUS => block_status_chunk(rd, shared, p, chunk).await,
        t if t & reply_type::ERROR_BIT != 0 => {
            if chunk.length > MAX_ERROR_PAYLOAD {
                return Err(chunk_error(chunk, p, "error chunk too long"));
            }
            let data = read_payload(rd, chunk.length, "error chunk").await?;
            let err = proto::ErrorChunk::decode(t, &data)?;
            if p.error.is_none() {
                p.error = Some(remote_error(p, err.error, &err.message));
            }
            Ok(())
        }
        _ => Err(chunk_error(chunk, p, "unknown chunk type")),
    }
}

/// Offset of `[offset, offset+len)` relative to the request, if it lies inside it.
fn relative(req: &Request, offset: u64, len: u64) -> Option<usize> {
    let rel = offset.checked_sub(req.offset)?;
    (rel.checked_add(len)? <= req.length as u64).then_some(rel as usize)
}

async fn offset_data(rd: &mut Reader, p: &mut Pending, chunk: &ChunkHeader) -> Result<()> {
    let req = p.request;
    if !matches!(p.body, Body::Read(_)) || chunk.length <= 8 {
        return Err(chunk_error(
            chunk,
            p,
            "unexpected NBD_REPLY_TYPE_OFFSET_DATA",
        ));
    }
    let mut prefix = [0u8; 8];
    rd.read_exact(&mut prefix)
        .await
        .map_err(|e| io_error("reading data chunk", e))?;
    let offset = proto::decode_offset_data_prefix(&prefix)?;
    let len = chunk.length as u64 - 8;
    let rel = relative(&req, offset, len)
        .ok_or_else(|| chunk_error(chunk, p, "data outside the requested range"))?;
    match &mut p.body {
        Body::Read(buf) => buf.fill_data(rd, rel, len as usize).await,
        _ => Ok(()),
    }
}

async fn block_status_chunk(
    rd: &mut Reader,
    shared: &Shared,
    p: &mut Pending,
    chunk: &ChunkHeader,
) -> Result<()> {
    if !matches!(p.body, Body::Status(_)) || chunk.length > MAX_BLOCK_STATUS_PAYLOAD {
        return Err(chunk_error(
            chunk,
            p,
            "unexpected or oversized block status",
        ));
    }
    let data = read_payload(rd, chunk.length, "block status chunk").await?;
    let status = proto::BlockStatusChunk::decode(&data)?;
    if !shared.contexts.contains(&status.context_id) {
        return Err(chunk_error(
            chunk,
            p,
            &format!("context id {} was not negotiated", status.context_id),
        ));
    }
    if status.descriptors.iter().any(|d| d.length == 0) {
        return Err(chunk_error(chunk, p, "extent of length zero"));
    }
    if let Body::Status(chunks) = &mut p.body {
        if chunks.iter().any(|c| c.context_id == status.context_id) {
            return Err(chunk_error(chunk, p, "two chunks for one context"));
        }
        chunks.push(status);
    }
    Ok(())
}

/// The buffer a read reply is assembled in. Data chunks usually arrive in order and are read
/// straight from the socket into the buffer's spare capacity; gaps (holes, or chunks out of
/// order) are zero-filled. Every byte must be covered exactly once.
struct ReadBuf {
    buf: BytesMut,
    len: usize,
    covered: Vec<(usize, usize)>,
    covered_bytes: usize,
}

impl ReadBuf {
    fn new(mut buf: BytesMut, len: usize) -> Self {
        buf.clear();
        buf.reserve(len);
        ReadBuf {
            buf,
            len,
            covered: Vec::new(),
            covered_bytes: 0,
        }
    }

    fn claim(&mut self, rel: usize, n: usize) -> Result<()> {
        let end = rel + n;
        if end > self.len || self.covered.iter().any(|&(s, e)| rel < e && s < end) {
            return Err(Error::protocol(format!(
                "read reply: chunk at relative offset {rel} length {n} overlaps another or exceeds the request"
            )));
        }
        self.covered.push((rel, end));
        self.covered_bytes += n;
        Ok(())
    }

    async fn fill_data<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        rel: usize,
        n: usize,
    ) -> Result<()> {
        self.claim(rel, n)?;
        let eof = || {
            io_error(
                "reading read reply data",
                std::io::ErrorKind::UnexpectedEof.into(),
            )
        };
        if rel >= self.buf.len() {
            self.buf.resize(rel, 0);
            let mut limited = (&mut self.buf).limit(n);
            while limited.remaining_mut() > 0 {
                let got = rd
                    .read_buf(&mut limited)
                    .await
                    .map_err(|e| io_error("reading read reply data", e))?;
                if got == 0 {
                    return Err(eof());
                }
            }
        } else {
            if rel + n > self.buf.len() {
                self.buf.resize(rel + n, 0);
            }
            rd.read_exact(&mut self.buf[rel..rel + n])
                .await
                .map_err(|e| io_error("reading read reply data", e))?;
        }
        Ok(())
    }

    fn fill_hole(&mut self, rel: usize, n: usize) -> Result<()> {
        self.claim(rel, n)?;
        let end = rel + n;
        let initialised = self.buf.len().min(end);
        if rel < initialised {
            self.buf[rel..initialised].fill(0);
        }
        if end > self.buf.len() {
            self.buf.resize(end, 0);
        }
        Ok(())
    }

    fn finish(self, req: &Request) -> Result<BytesMut> {
        if self.covered_bytes != self.len {
            return Err(Error::protocol(format!(
                "reply to NBD_CMD_READ at offset {} length {}: chunks cover only {} bytes",
                req.offset, req.length, self.covered_bytes
            )));
        }
        Ok(self.buf)
    }
}
