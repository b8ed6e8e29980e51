//! Server transmission phase on one connection: read requests, check them against the export,
//! run them concurrently (bounded), and send simple or structured replies.
//!
//! Owns request validation (ranges, permissions, lengths) and reply framing; the export only
//! sees valid requests. A request the export fails gets an NBD error; a malformed request
//! (bad magic, oversized write payload) closes this connection only.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, WriteHalf};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::handshake::Session;
use crate::nbd::error::{io_error, Error, Result};
use crate::nbd::export::{BlockExport, ExportError, ReadPart};
use crate::nbd::proto::{self, cmd, cmd_flags, errno, reply_type, ChunkHeader, Request};
use crate::nbd::BoxStream;

/// Most descriptors sent in one block status chunk.
const MAX_DESCRIPTORS: usize = 64 * 1024;

type Writer = Arc<Mutex<BufWriter<WriteHalf<BoxStream>>>>;

/// What every request task of one connection shares.
struct Ctx {
    name: String,
    export: Arc<dyn BlockExport>,
    structured: bool,
    contexts: Vec<(u32, usize)>,
    writer: Writer,
}

/// Serve requests until `NBD_CMD_DISC`, EOF or a malformed request.
pub(crate) async fn run(session: Session, max_in_flight: usize) -> Result<()> {
    let Session {
        stream,
        name,
        export,
        structured,
        contexts,
    } = session;
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let ctx = Arc::new(Ctx {
        name,
        export,
        structured,
        contexts,
        writer: Arc::new(Mutex::new(BufWriter::with_capacity(64 * 1024, wr))),
    });
    let limit = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    let result = loop {
        // Take the permit before reading: at most `max_in_flight` write payloads are held.
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break Ok(());
        };
        let (request, payload) = match read_request(&mut rd, &ctx).await {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let r = handle(&ctx, request, payload).await;
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Err(e)) = done {
                tasks.abort_all();
                return Err(e);
            }
        }
    };
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            return Err(e);
        }
    }
    let mut w = ctx.writer.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

/// Read one request and, for writes, its payload. `None` on `NBD_CMD_DISC` or a clean EOF.
async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    ctx: &Ctx,
) -> Result<Option<(Request, Bytes)>> {
    let mut head = [0u8; proto::REQUEST_LEN];
    match rd.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io_error("reading request", e)),
    }
    let request = Request::decode(&head)?;
    if request.command == cmd::DISC {
        return Ok(None);
    }
    if request.command != cmd::WRITE {
        return Ok(Some((request, Bytes::new())));
    }
    let max = ctx.export.block_sizes().maximum;
    if request.length > max {
        return Err(Error::protocol(format!(
            "NBD_CMD_WRITE at offset {}: field length {} exceeds the maximum block size {max} of export {:?}",
            request.offset, request.length, ctx.name
        )));
    }
    let mut payload = BytesMut::zeroed(request.length as usize);
    rd.read_exact(&mut payload)
        .await
        .map_err(|e| io_error("reading write payload", e))?;
    Ok(Some((request, payload.freeze())))
}

fn err(errno: u32, message: String) -> ExportError {
    ExportError { errno, message }
}

/// Check a request against the export; the error is what the client gets.
fn validate(ctx: &Ctx, r: &Request) -> std::result::Result<(), ExportError> {
    let export = &ctx.export;
    let name = &ctx.name;
    let what = proto::command_name(r.command);
    let writes = matches!(r.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
    if writes && !export.is_writable() {
        return Err(err(
            errno::EPERM,
            format!("{what}: export {name:?} is read-only"),
        ));
    }
    let known = cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::DF | cmd_flags::REQ_ONE;
    if r.flags & !known != 0 {
        return Err(err(
            errno::EINVAL,
            format!("{what}: unsupported flags {:#x}", r.flags),
        ));
    }
    if r.command == cmd::FLUSH {
        return Ok(());
    }
    let end = r.offset.checked_add(r.length as u64);
    if end.is_none_or(|e| e > export.size()) {
        let code = if writes { errno::ENOSPC } else { errno::EINVAL };
        return Err(err(
            code,
            format!(
                "{what} at offset {} length {} is past the end of export {name:?} (size {})",
                r.offset,
                r.length,
                export.size()
            ),
        ));
    }
    if r.command == cmd::READ && r.length > export.block_sizes().maximum {
        return Err(err(
            errno::EINVAL,
            format!("{what}: length {} too large", r.length),
        ));
    }
    if r.command == cmd::BLOCK_STATUS && ctx.contexts.is_empty() {
        return Err(err(
            errno::EINVAL,
            format!("{what}: no meta context negotiated"),
        ));
    }
    Ok(())
}

/// Run one request and send its reply. Errors are write errors (the connection is dead).
async fn handle(ctx: &Ctx, r: Request, payload: Bytes) -> Result<()> {
    let export = &ctx.export;
    if let Err(e) = validate(ctx, &r) {
        return send_error(ctx, &r, e).await;
    }
    let fua = r.flags & cmd_flags::FUA != 0;
    let outcome = match r.command {
        cmd::READ => match export.read(r.offset, r.length).await {
            Ok(parts) => return send_read(ctx, &r, parts).await,
            Err(e) => Err(e),
        },
        cmd::BLOCK_STATUS => return block_status(ctx, &r).await,
        cmd::WRITE => export.write(r.offset, payload, fua).await,
        cmd::WRITE_ZEROES => {
            let may_trim = r.flags & cmd_flags::NO_HOLE == 0;
            export.write_zeroes(r.offset, r.length, may_trim, fua).await
        }
        cmd::TRIM => export.trim(r.offset, r.length).await,
        cmd::FLUSH => export.flush().await,
        other => Err(err(
            errno::EINVAL,
            format!("{} is not supported", proto::command_name(other)),
        )),
    };
    match outcome {
        Ok(()) => {
            send(ctx, |buf| {
                buf.extend_from_slice(&proto::encode_simple_reply(0, r.cookie))
            })
            .await
        }
        Err(e) => send_error(ctx, &r, e).await,
    }
}

/// Write one whole reply under the writer lock.
async fn send(ctx: &Ctx, build: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
    let mut buf = Vec::new();
    build(&mut buf);
    let mut w = ctx.writer.lock().await;
    write_flush(&mut *w, &[&buf]).await
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> Result<()> {
    for p in parts {
        w.write_all(p)
            .await
            .map_err(|e| io_error("sending reply", e))?;
    }
    w.flush().await.map_err(|e| io_error("sending reply", e))
}

fn chunk(flags: u16, kind: u16, cookie: u64, length: usize) -> [u8; proto::STRUCTURED_REPLY_LEN] {
    ChunkHeader {
        flags,
        reply_type: kind,
        cookie,
        length: length as u32,
    }
    .encode()
}

async fn send_error(ctx: &Ctx, r: &Request, e: ExportError) -> Result<()> {
    tracing::debug!(export = %ctx.name, error = %catalog::Chain(&e), "nbd request failed");
    let code = if e.errno == 0 { errno::EIO } else { e.errno };
    let structured = ctx.structured && matches!(r.command, cmd::READ | cmd::BLOCK_STATUS);
    send(ctx, |buf| {
        if structured {
            let body = proto::ErrorChunk {
                error: code,
                message: e.message.clone(),
                offset: None,
            }
            .encode();
            buf.extend_from_slice(&chunk(
                proto::REPLY_FLAG_DONE,
                reply_type::ERROR,
                r.cookie,
                body.len(),
            ));
            buf.extend_from_slice(&body);
        } else {
            buf.extend_from_slice(&proto::encode_simple_reply(code, r.cookie));
        }
    })
    .await
}

async fn send_read(ctx: &Ctx, r: &Request, parts: Vec<ReadPart>) -> Result<()> {
    let total: u64 = parts.iter().map(ReadPart::len).sum();
    if total != r.length as u64 {
        let msg = format!(
            "export {:?} returned {total} bytes for a read of {} at offset {}",
            ctx.name, r.length, r.offset
        );
        return send_error(ctx, r, ExportError::io(msg)).await;
    }
    let parts: Vec<ReadPart> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    let mut w = ctx.writer.lock().await;
    if !ctx.structured {
        w.write_all(&proto::encode_simple_reply(0, r.cookie))
            .await
            .map_err(|e| io_error("sending reply", e))?;
        for p in &parts {
            match p {
                ReadPart::Data(d) => write_flush(&mut *w, &[d]).await?,
                ReadPart::Zero(n) => write_flush(&mut *w, &[&vec![0u8; *n as usize]]).await?,
            }
        }
        return write_flush(&mut *w, &[]).await;
    }
    if parts.is_empty() {
        let h = chunk(proto::REPLY_FLAG_DONE, reply_type::NONE, r.cookie, 0);
        return write_flush(&mut *w, &[&h]).await;
    }
    let mut offset = r.offset;
    let last = parts.len() - 1;
    for (i, p) in parts.iter().enumerate() {
        let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
        match p {
            ReadPart::Data(d) => {
                let h = chunk(flags, reply_type::OFFSET_DATA, r.cookie, 8 + d.len());
                let o = proto::encode_offset_data_prefix(offset);
                for part in [&h[..], &o[..], &d[..]] {
                    w.write_all(part)
                        .await
                        .map_err(|e| io_error("sending reply", e))?;
                }
            }
            ReadPart::Zero(n) => {
                let h = chunk(flags, reply_type::OFFSET_HOLE, r.cookie, 12);
                let hole = proto::OffsetHole { offset, length: *n }.encode();
                w.write_all(&h)
                    .await
                    .map_err(|e| io_error("sending reply", e))?;
                w.write_all(&hole)
                    .await
                    .map_err(|e| io_error("sending reply", e))?;
            }
        }
        offset += p.len();
    }
    write_flush(&mut *w, &[]).await
}

/// Descriptors for one context: clipped to the request, at most one with `REQ_ONE`.
fn descriptors(
    extents: &[crate::nbd::export::StatusExtent],
    length: u32,
    req_one: bool,
) -> Vec<proto::Descriptor> {
    let mut left = length as u64;
    let mut out = Vec::new();
    for e in extents {
        if left == 0 || out.len() >= MAX_DESCRIPTORS || (req_one && !out.is_empty()) {
            break;
        }
        let len = e.length.min(left);
        if len == 0 {
            continue;
        }
        out.push(proto::Descriptor {
            length: len as u32,
            flags: e.flags,
        });
        left -= len;
    }
    out
}

async fn block_status(ctx: &Ctx, r: &Request) -> Result<()> {
    let req_one = r.flags & cmd_flags::REQ_ONE != 0;
    let mut body = Vec::new();
    let contexts = &ctx.contexts;
    for (i, &(id, index)) in contexts.iter().enumerate() {
        let extents = match ctx.export.block_status(index, r.offset, r.length).await {
            Ok(e) => e,
            Err(e) => return send_error(ctx, r, e).await,
        };
        let descriptors = descriptors(&extents, r.length, req_one);
        if descriptors.is_empty() {
            let msg = format!("export {:?} returned no block status", ctx.name);
            return send_error(ctx, r, ExportError::io(msg)).await;
        }
        let payload = proto::BlockStatusChunk {
            context_id: id,
            descriptors,
        }
        .encode();
        let flags = if i + 1 == contexts.len() {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        body.extend_from_slice(&chunk(
            flags,
            reply_type::BLOCK_STATUS,
            r.cookie,
            payload.len(),
        ));
        body.extend_from_slice(&payload);
    }
    send(ctx, |buf| *buf = body).await
}
