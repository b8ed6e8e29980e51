//! Shared harness for the fuzz targets: an in-memory stream that yields the fuzz input as what
//! the peer sends and swallows what we write, a reusable single-threaded runtime, and the
//! encoders that build a valid prefix so the fuzzer starts deep inside a session.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use proxy::nbd::proto::{self, rep, InfoReply, OptionReplyHeader};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Yields `data`, then EOF; accepts and discards every write.
pub struct FuzzStream {
    data: Vec<u8>,
    pos: usize,
}

impl FuzzStream {
    /// A stream whose peer sends `data`.
    pub fn new(data: Vec<u8>) -> Self {
        FuzzStream { data, pos: 0 }
    }
}

impl AsyncRead for FuzzStream {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for FuzzStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("fuzz runtime");
}

/// Run `fut` to completion on the thread's runtime.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(fut))
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    let h = OptionReplyHeader { option, reply_type, length: data.len() as u32 };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(data);
}

/// What a server sends for a client that negotiates structured replies, `base:allocation`
/// (id 1) and `NBD_OPT_GO` on a read-only 1 MiB export.
pub fn server_handshake() -> Vec<u8> {
    let mut out = proto::encode_greeting(proto::handshake_flags::FIXED_NEWSTYLE | proto::handshake_flags::NO_ZEROES).to_vec();
    option_reply(&mut out, proto::opt::STRUCTURED_REPLY, rep::ACK, &[]);
    let ctx = proto::MetaContextReply { id: 1, name: "base:allocation".into() };
    option_reply(&mut out, proto::opt::SET_META_CONTEXT, rep::META_CONTEXT, &ctx.encode());
    option_reply(&mut out, proto::opt::SET_META_CONTEXT, rep::ACK, &[]);
    let flags = proto::transmission_flags::HAS_FLAGS | proto::transmission_flags::READ_ONLY;
    let export = InfoReply::Export { size: 1 << 20, flags };
    option_reply(&mut out, proto::opt::GO, rep::INFO, &export.encode());
    option_reply(&mut out, proto::opt::GO, rep::ACK, &[]);
    out
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    let h = proto::OptionHeader { option, length: data.len() as u32 };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(data);
}

/// What a client sends to negotiate structured replies, `base:allocation` and `NBD_OPT_GO`
/// on export `disk`.
pub fn client_handshake() -> Vec<u8> {
    let mut out = (proto::client_flags::FIXED_NEWSTYLE | proto::client_flags::NO_ZEROES).to_be_bytes().to_vec();
    option(&mut out, proto::opt::STRUCTURED_REPLY, &[]);
    let meta = proto::MetaContextRequest { export: "disk".into(), queries: vec!["base:allocation".into()] };
    option(&mut out, proto::opt::SET_META_CONTEXT, &meta.encode().expect("meta request"));
    let go = proto::InfoRequest { name: "disk".into(), requests: vec![proto::info::BLOCK_SIZE] };
    option(&mut out, proto::opt::GO, &go.encode().expect("go request"));
    out
}

/// Turn fuzz bytes into reply chunks with plausible framing: each record picks a cookie among
/// the first few (so replies match requests in flight) and takes type, flags, length and
/// payload from the input.
pub fn framed_replies(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = input;
    while rest.len() >= 6 {
        let (head, tail) = rest.split_at(6);
        let cookie = 1 + (head[0] % 4) as u64;
        let flags = (head[1] & 1) as u16;
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let len = (u16::from_be_bytes([head[4], head[5]]) as usize).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        if head[1] & 0x80 != 0 {
            out.extend_from_slice(&proto::encode_simple_reply(kind as u32 & 0x7f, cookie));
        } else {
            let chunk = proto::ChunkHeader { flags, reply_type: kind, cookie, length: payload.len() as u32 };
            out.extend_from_slice(&chunk.encode());
        }
        out.extend_from_slice(payload);
        rest = tail;
    }
    out
}
