//! NBD wire format: every constant, header and payload of the protocol, encoded and decoded.
//!
//! This is the only place that knows NBD bytes (`NetworkBlockDevice/nbd` `doc/proto.md`, fixed
//! newstyle negotiation, simple and structured replies, no extended headers). Everything here
//! is pure: it works on byte slices whose length the caller already read from the stream. Every
//! length and count inside a payload is checked against the slice before use, so decoding a
//! hostile message gives an [`Error`] of kind `Protocol` naming the message and field, never a
//! panic or an allocation larger than the slice.
//!
//! It does not own I/O, sessions or policy (which options to send, which limits to apply to
//! whole messages): that is `client` and `server`.

use super::error::{Error, Result};

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply when `NO_ZEROES` was not negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest name or description string the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits), sent right after the greeting.
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits), per export.
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// `NBD_REP_ACK`
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// `NBD_REP_ERR_POLICY`
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// `NBD_REP_ERR_INVALID`
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// `NBD_REP_ERR_PLATFORM`
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    /// `NBD_REP_ERR_TLS_REQD`
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// `NBD_REP_ERR_UNKNOWN`
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// `NBD_REP_ERR_SHUTDOWN`
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    /// `NBD_REP_ERR_TOO_BIG`
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
}

/// Information types inside `NBD_REP_INFO` and requested by `NBD_OPT_INFO`/`GO`.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission commands (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// `NBD_REPLY_TYPE_NONE`
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set in every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// `NBD_REPLY_TYPE_ERROR`
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// `NBD_REPLY_FLAG_DONE`: last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// `base:allocation` status bits.
pub mod state {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// NBD error numbers (`NBD_EPERM` ...), as sent in replies.
pub mod errno {
    /// `NBD_EPERM`
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`
    pub const ESHUTDOWN: u32 = 108;

    /// A short lowercase name for an NBD error number.
    pub fn name(errno: u32) -> &'static str {
        match errno {
            EPERM => "operation not permitted (EPERM)",
            EIO => "input/output error (EIO)",
            ENOMEM => "out of memory (ENOMEM)",
            EINVAL => "invalid argument (EINVAL)",
            ENOSPC => "no space left (ENOSPC)",
            EOVERFLOW => "value too large (EOVERFLOW)",
            ENOTSUP => "operation not supported (ENOTSUP)",
            ESHUTDOWN => "server shutting down (ESHUTDOWN)",
            _ => "unknown error",
        }
    }
}

/// A short name for an option number, for messages.
pub fn option_name(option: u32) -> String {
    let name = match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        opt::ABORT => "NBD_OPT_ABORT",
        opt::LIST => "NBD_OPT_LIST",
        opt::STARTTLS => "NBD_OPT_STARTTLS",
        opt::INFO => "NBD_OPT_INFO",
        opt::GO => "NBD_OPT_GO",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        other => return format!("option {other}"),
    };
    name.to_string()
}

/// A short name for a command number, for messages.
pub fn command_name(command: u16) -> String {
    let name = match command {
        cmd::READ => "NBD_CMD_READ",
        cmd::WRITE => "NBD_CMD_WRITE",
        cmd::DISC => "NBD_CMD_DISC",
        cmd::FLUSH => "NBD_CMD_FLUSH",
        cmd::TRIM => "NBD_CMD_TRIM",
        cmd::CACHE => "NBD_CMD_CACHE",
        cmd::WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        cmd::BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        other => return format!("command {other}"),
    };
    name.to_string()
}

// ---------------------------------------------------------------------------------------------
// A bounds-checked reader over a payload.

/// Reads big-endian fields from a payload, failing with the message and field name when the
/// payload is too short.
struct Fields<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Fields { buf, what }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::protocol(format!(
                "{}: truncated at field {field} (need {n} bytes, have {})",
                self.what,
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self, field: &str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes, at most [`MAX_STRING`], valid UTF-8.
    fn string(&mut self, len: usize, field: &str) -> Result<String> {
        if len > MAX_STRING {
            return Err(Error::protocol(format!(
                "{}: field {field} length {len} exceeds {MAX_STRING}",
                self.what
            )));
        }
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::protocol(format!("{}: field {field} is not valid utf-8", self.what))
        })
    }

    /// A string prefixed by a 32-bit length.
    fn string32(&mut self, field: &str) -> Result<String> {
        let len = self.u32(field)? as usize;
        self.string(len, field)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "{}: {} unexpected trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn check_string_len(s: &str, what: &str) -> Result<()> {
    if s.len() > MAX_STRING {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long, the protocol allows {MAX_STRING}",
            s.len()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Greeting and client flags.

/// Encode the server greeting with `flags` (handshake flags).
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Encode the client flags that answer the greeting.
pub fn encode_client_flags(flags: u32) -> [u8; 4] {
    flags.to_be_bytes()
}

/// Decode the client flags that answer the greeting.
pub fn decode_client_flags(buf: [u8; 4]) -> u32 {
    u32::from_be_bytes(buf)
}

/// Encode the answer to `NBD_OPT_EXPORT_NAME`: export size and transmission flags, then the
/// 124 bytes of zero padding unless the client asked for none.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut msg = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    msg.extend_from_slice(&size.to_be_bytes());
    msg.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        msg.resize(msg.len() + EXPORT_NAME_PADDING, 0);
    }
    msg
}

/// Decode the server greeting; returns the handshake flags. Oldstyle servers are refused.
pub fn decode_greeting(buf: &[u8; GREETING_LEN]) -> Result<u16> {
    let mut f = Fields::new(buf, "server greeting");
    if f.u64("NBDMAGIC")? != NBD_MAGIC {
        return Err(Error::protocol(
            "server greeting: bad NBDMAGIC, not an nbd server",
        ));
    }
    if f.u64("IHAVEOPT")? != IHAVEOPT {
        return Err(Error::protocol(
            "server greeting: not a newstyle server (oldstyle negotiation is not supported)",
        ));
    }
    f.u16("handshake flags")
}

// ---------------------------------------------------------------------------------------------
// Option requests (client to server).

/// Header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encode as 16 bytes.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decode 16 bytes, checking the magic.
    pub fn decode(buf: &[u8; OPTION_HEADER_LEN]) -> Result<Self> {
        let mut f = Fields::new(buf, "option request");
        if f.u64("magic")? != IHAVEOPT {
            return Err(Error::protocol(
                "option request: bad magic (expected IHAVEOPT)",
            ));
        }
        Ok(OptionHeader {
            option: f.u32("option")?,
            length: f.u32("length")?,
        })
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// `NBD_INFO_*` types requested.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Encode the option data.
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_string_len(&self.name, "export name")?;
        let count = u16::try_from(self.requests.len())
            .map_err(|_| Error::invalid("too many information requests"))?;
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        put_string32(&mut out, &self.name);
        out.extend_from_slice(&count.to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        Ok(out)
    }

    /// Decode the option data.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "NBD_OPT_GO/INFO request");
        let name = f.string32("export name")?;
        let count = f.u16("number of information requests")? as usize;
        if f.buf.len() != count * 2 {
            return Err(Error::protocol(format!(
                "NBD_OPT_GO/INFO request: field information requests has {} bytes for {count} requests",
                f.buf.len()
            )));
        }
        let requests = (0..count)
            .map(|_| f.u16("information request"))
            .collect::<Result<Vec<_>>>()?;
        Ok(InfoRequest { name, requests })
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries (full context names, or namespace prefixes such as `qemu:dirty-bitmap:`).
    pub queries: Vec<String>,
}

/// Most queries one meta context request may carry.
pub const MAX_META_QUERIES: usize = 256;

impl MetaContextRequest {
    /// Encode the option data.
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_string_len(&self.export, "export name")?;
        if self.queries.len() > MAX_META_QUERIES {
            return Err(Error::invalid(format!(
                "{} meta context queries, at most {MAX_META_QUERIES} allowed",
                self.queries.len()
            )));
        }
        let mut out = Vec::new();
        put_string32(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            check_string_len(q, "meta context query")?;
            put_string32(&mut out, q);
        }
        Ok(out)
    }

    /// Decode the option data.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "meta context request");
        let export = f.string32("export name")?;
        let count = f.u32("number of queries")? as usize;
        if count > MAX_META_QUERIES {
            return Err(Error::protocol(format!(
                "meta context request: field number of queries is {count}, at most {MAX_META_QUERIES} allowed"
            )));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(f.string32("query")?);
        }
        f.end()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// Decode the data of `NBD_OPT_EXPORT_NAME` (the raw name).
pub fn decode_export_name(buf: &[u8]) -> Result<String> {
    Fields::new(buf, "NBD_OPT_EXPORT_NAME request").string(buf.len(), "export name")
}

// ---------------------------------------------------------------------------------------------
// Option replies (server to client).

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encode as 20 bytes.
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut out = [0u8; OPTION_REPLY_HEADER_LEN];
        out[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decode 20 bytes, checking the magic.
    pub fn decode(buf: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self> {
        let mut f = Fields::new(buf, "option reply");
        if f.u64("magic")? != OPTION_REPLY_MAGIC {
            return Err(Error::protocol("option reply: bad magic"));
        }
        Ok(OptionReplyHeader {
            option: f.u32("option")?,
            reply_type: f.u32("reply type")?,
            length: f.u32("length")?,
        })
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply_type & rep::ERROR_BIT != 0
    }
}

/// Data of `NBD_REP_SERVER` (one export in an `NBD_OPT_LIST` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

impl ServerReply {
    /// Encode the reply data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string32(&mut out, &self.name);
        out.extend_from_slice(self.description.as_bytes());
        out
    }

    /// Decode the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "NBD_REP_SERVER");
        let name = f.string32("export name")?;
        let rest = f.rest();
        let description = Fields::new(rest, "NBD_REP_SERVER").string(rest.len(), "description")?;
        Ok(ServerReply { name, description })
    }
}

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum length of one request's payload.
    pub maximum: u32,
}

impl BlockSizes {
    /// Check the constraints the protocol puts on these values.
    pub fn validate(&self) -> Result<()> {
        let ok = self.minimum.is_power_of_two()
            && self.minimum <= 64 * 1024
            && self.preferred.is_power_of_two()
            && self.preferred >= self.minimum.max(512)
            && self.maximum >= self.minimum
            && (self.maximum == u32::MAX || self.maximum.is_multiple_of(self.minimum));
        if ok {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "NBD_INFO_BLOCK_SIZE: invalid constraints minimum {} preferred {} maximum {}",
                self.minimum, self.preferred, self.maximum
            )))
        }
    }
}

/// The data of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`
    Name(String),
    /// `NBD_INFO_DESCRIPTION`
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`
    BlockSize(BlockSizes),
    /// An information type this implementation does not know; ignored by clients.
    Unknown(u16),
}

impl InfoReply {
    /// Encode the reply data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            InfoReply::Export { size, flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            InfoReply::Name(s) | InfoReply::Description(s) => {
                let t = if matches!(self, InfoReply::Name(_)) {
                    info::NAME
                } else {
                    info::DESCRIPTION
                };
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            InfoReply::BlockSize(b) => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                for v in [b.minimum, b.preferred, b.maximum] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            InfoReply::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
        out
    }

    /// Decode the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "NBD_REP_INFO");
        let kind = f.u16("information type")?;
        let reply = match kind {
            info::EXPORT => InfoReply::Export {
                size: f.u64("export size")?,
                flags: f.u16("transmission flags")?,
            },
            info::NAME | info::DESCRIPTION => {
                let rest = f.rest();
                let s = Fields::new(rest, "NBD_REP_INFO").string(rest.len(), "name")?;
                if kind == info::NAME {
                    InfoReply::Name(s)
                } else {
                    InfoReply::Description(s)
                }
            }
            info::BLOCK_SIZE => InfoReply::BlockSize(BlockSizes {
                minimum: f.u32("minimum block size")?,
                preferred: f.u32("preferred block size")?,
                maximum: f.u32("maximum block size")?,
            }),
            other => {
                f.rest();
                InfoReply::Unknown(other)
            }
        };
        f.end()?;
        Ok(reply)
    }
}

/// Data of `NBD_REP_META_CONTEXT`: a context id and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    /// Id the server will use in block status replies.
    pub id: u32,
    /// Full context name.
    pub name: String,
}

impl MetaContextReply {
    /// Encode the reply data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decode the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "NBD_REP_META_CONTEXT");
        let id = f.u32("context id")?;
        let rest = f.rest();
        let name = Fields::new(rest, "NBD_REP_META_CONTEXT").string(rest.len(), "name")?;
        Ok(MetaContextReply { id, name })
    }
}

/// Decode the data of an error option reply: an optional human-readable message.
pub fn decode_error_message(buf: &[u8]) -> String {
    String::from_utf8_lossy(&buf[..buf.len().min(MAX_STRING)]).into_owned()
}

/// A short lowercase description of an error reply type.
pub fn rep_error_name(reply_type: u32) -> String {
    let name = match reply_type {
        rep::ERR_UNSUP => "unsupported",
        rep::ERR_POLICY => "refused by policy",
        rep::ERR_INVALID => "invalid",
        rep::ERR_PLATFORM => "unsupported on this platform",
        rep::ERR_TLS_REQD => "tls required",
        rep::ERR_UNKNOWN => "unknown export",
        rep::ERR_SHUTDOWN => "server shutting down",
        rep::ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        rep::ERR_TOO_BIG => "too big",
        other => return format!("error reply {other:#x}"),
    };
    name.to_string()
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests and replies.

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (of the payload for writes).
    pub length: u32,
}

impl Request {
    /// Encode as 28 bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decode 28 bytes, checking the magic.
    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<Self> {
        let mut f = Fields::new(buf, "transmission request");
        if f.u32("magic")? != REQUEST_MAGIC {
            return Err(Error::protocol("transmission request: bad magic"));
        }
        Ok(Request {
            flags: f.u16("command flags")?,
            command: f.u16("type")?,
            cookie: f.u64("cookie")?,
            offset: f.u64("offset")?,
            length: f.u32("length")?,
        })
    }
}

/// A reply header: simple, or one chunk of a structured reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (for reads, the data follows).
    Simple {
        /// NBD error number, 0 on success.
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured reply chunk; `length` bytes of payload follow.
    Structured(ChunkHeader),
}

/// Header of one structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub reply_type: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// Encode as 20 bytes.
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut out = [0u8; STRUCTURED_REPLY_LEN];
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.reply_type.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Encode a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Decode a reply header. `buf` holds the first [`SIMPLE_REPLY_LEN`] bytes; for a structured
/// chunk (see [`reply_header_len`]) it must hold [`STRUCTURED_REPLY_LEN`] bytes.
pub fn decode_reply_header(buf: &[u8]) -> Result<ReplyHeader> {
    let mut f = Fields::new(buf, "reply header");
    match f.u32("magic")? {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: f.u32("error")?,
            cookie: f.u64("cookie")?,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Structured(ChunkHeader {
            flags: f.u16("flags")?,
            reply_type: f.u16("type")?,
            cookie: f.u64("cookie")?,
            length: f.u32("length")?,
        })),
        other => Err(Error::protocol(format!(
            "reply header: bad magic {other:#010x}"
        ))),
    }
}

/// The full header length for a reply whose first 4 bytes are `magic`.
pub fn reply_header_len(magic: [u8; 4]) -> Result<usize> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        other => Err(Error::protocol(format!(
            "reply header: bad magic {other:#010x}"
        ))),
    }
}

/// Encode the 8-byte offset at the start of an `OFFSET_DATA` chunk.
pub fn encode_offset_data_prefix(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

/// Decode the 8-byte offset at the start of an `OFFSET_DATA` chunk.
pub fn decode_offset_data_prefix(buf: &[u8]) -> Result<u64> {
    Fields::new(buf, "NBD_REPLY_TYPE_OFFSET_DATA").u64("offset")
}

/// Payload of an `OFFSET_HOLE` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetHole {
    /// Offset of the hole.
    pub offset: u64,
    /// Length of the hole.
    pub length: u32,
}

impl OffsetHole {
    /// Encode the chunk payload.
    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decode the chunk payload.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "NBD_REPLY_TYPE_OFFSET_HOLE");
        let hole = OffsetHole {
            offset: f.u64("offset")?,
            length: f.u32("hole size")?,
        };
        f.end()?;
        Ok(hole)
    }
}

/// One block status descriptor: a run of bytes sharing the same status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Length in bytes.
    pub length: u32,
    /// Status flags (meaning per context).
    pub flags: u32,
}

/// Payload of a `BLOCK_STATUS` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusChunk {
    /// Context id.
    pub context_id: u32,
    /// Descriptors, in order from the request offset.
    pub descriptors: Vec<Descriptor>,
}

impl BlockStatusChunk {
    /// Encode the chunk payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.descriptors.len());
        out.extend_from_slice(&self.context_id.to_be_bytes());
        for d in &self.descriptors {
            out.extend_from_slice(&d.length.to_be_bytes());
            out.extend_from_slice(&d.flags.to_be_bytes());
        }
        out
    }

    /// Decode the chunk payload.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let what = "NBD_REPLY_TYPE_BLOCK_STATUS";
        let mut f = Fields::new(buf, what);
        let context_id = f.u32("context id")?;
        if f.buf.is_empty() || !f.buf.len().is_multiple_of(8) {
            return Err(Error::protocol(format!(
                "{what}: field descriptors has {} bytes, not a positive multiple of 8",
                f.buf.len()
            )));
        }
        let mut descriptors = Vec::with_capacity(f.buf.len() / 8);
        while !f.buf.is_empty() {
            descriptors.push(Descriptor {
                length: f.u32("extent length")?,
                flags: f.u32("status flags")?,
            });
        }
        Ok(BlockStatusChunk {
            context_id,
            descriptors,
        })
    }
}

/// Payload of an `ERROR` or `ERROR_OFFSET` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// NBD error number (never 0).
    pub error: u32,
    /// Human-readable message (may be empty).
    pub message: String,
    /// For `ERROR_OFFSET`: the offset that failed.
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// The chunk type to send this as.
    pub fn reply_type(&self) -> u16 {
        if self.offset.is_some() {
            reply_type::ERROR_OFFSET
        } else {
            reply_type::ERROR
        }
    }

    /// Encode the chunk payload.
    pub fn encode(&self) -> Vec<u8> {
        let msg = &self.message.as_bytes()[..self.message.len().min(MAX_STRING)];
        let mut out = Vec::with_capacity(14 + msg.len());
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
        if let Some(offset) = self.offset {
            out.extend_from_slice(&offset.to_be_bytes());
        }
        out
    }

    /// Decode the payload of a chunk of type `chunk_type`.
    pub fn decode(chunk_type: u16, buf: &[u8]) -> Result<Self> {
        let mut f = Fields::new(buf, "NBD_REPLY_TYPE_ERROR");
        let error = f.u32("error")?;
        if error == 0 {
            return Err(Error::protocol("NBD_REPLY_TYPE_ERROR: field error is zero"));
        }
        let len = f.u16("message length")? as usize;
        let raw = f.take(len.min(MAX_STRING), "message")?;
        let message = String::from_utf8_lossy(raw).into_owned();
        if len > MAX_STRING {
            f.take(len - MAX_STRING, "message")?;
        }
        let offset = match chunk_type {
            reply_type::ERROR_OFFSET => Some(f.u64("offset")?),
            _ => None,
        };
        f.end()?;
        Ok(ErrorChunk {
            error,
            message,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn option_header_round_trips(option: u32, length: u32) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(OptionHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn option_reply_header_round_trips(option: u32, reply_type: u32, length: u32) {
            let h = OptionReplyHeader { option, reply_type, length };
            prop_assert_eq!(OptionReplyHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn chunk_header_round_trips(flags: u16, reply_type: u16, cookie: u64, length: u32) {
            let h = ChunkHeader { flags, reply_type, cookie, length };
            let bytes = h.encode();
            prop_assert_eq!(reply_header_len([bytes[0], bytes[1], bytes[2], bytes[3]]).unwrap(), STRUCTURED_REPLY_LEN);
            prop_assert_eq!(decode_reply_header(&bytes).unwrap(), ReplyHeader::Structured(h));
        }

        #[test]
        fn simple_reply_round_trips(error: u32, cookie: u64) {
            let bytes = encode_simple_reply(error, cookie);
            prop_assert_eq!(decode_reply_header(&bytes).unwrap(), ReplyHeader::Simple { error, cookie });
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9:/-]{0,64}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::decode(&r.encode().unwrap()).unwrap(), r);
        }

        #[test]
        fn meta_request_round_trips(export in "[a-z0-9]{0,32}", queries in proptest::collection::vec("[a-z:-]{0,40}", 0..6)) {
            let r = MetaContextRequest { export, queries };
            prop_assert_eq!(MetaContextRequest::decode(&r.encode().unwrap()).unwrap(), r);
        }

        #[test]
        fn info_reply_round_trips(size: u64, flags: u16, name in "[a-z]{0,20}", min_log in 0u32..16) {
            let bs = BlockSizes { minimum: 1 << min_log, preferred: 4096 << 4, maximum: 32 << 20 };
            for r in [InfoReply::Export { size, flags }, InfoReply::Name(name.clone()),
                      InfoReply::Description(name.clone()), InfoReply::BlockSize(bs)] {
                prop_assert_eq!(InfoReply::decode(&r.encode()).unwrap(), r);
            }
        }

        #[test]
        fn server_reply_round_trips(name in "[a-z]{0,20}", description in "[ a-z]{0,20}") {
            let r = ServerReply { name, description };
            prop_assert_eq!(ServerReply::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn meta_reply_round_trips(id: u32, name in "[a-z:-]{1,40}") {
            let r = MetaContextReply { id, name };
            prop_assert_eq!(MetaContextReply::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn block_status_round_trips(context_id: u32, d in proptest::collection::vec((any::<u32>(), any::<u32>()), 1..50)) {
            let c = BlockStatusChunk { context_id, descriptors: d.into_iter().map(|(length, flags)| Descriptor { length, flags }).collect() };
            prop_assert_eq!(BlockStatusChunk::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn error_chunk_round_trips(error in 1u32.., message in "[ a-z]{0,50}", offset: Option<u64>) {
            let c = ErrorChunk { error, message, offset };
            prop_assert_eq!(ErrorChunk::decode(c.reply_type(), &c.encode()).unwrap(), c);
        }

        #[test]
        fn hole_round_trips(offset: u64, length: u32) {
            let h = OffsetHole { offset, length };
            prop_assert_eq!(OffsetHole::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = InfoRequest::decode(&bytes);
            let _ = MetaContextRequest::decode(&bytes);
            let _ = ServerReply::decode(&bytes);
            let _ = InfoReply::decode(&bytes);
            let _ = MetaContextReply::decode(&bytes);
            let _ = BlockStatusChunk::decode(&bytes);
            let _ = ErrorChunk::decode(reply_type::ERROR_OFFSET, &bytes);
            let _ = OffsetHole::decode(&bytes);
            let _ = decode_reply_header(&bytes);
            let _ = decode_export_name(&bytes);
        }
    }

    #[test]
    fn truncated_payload_names_message_and_field() {
        let err = BlockStatusChunk::decode(&[0, 0]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "NBD_REPLY_TYPE_BLOCK_STATUS: truncated at field context id (need 4 bytes, have 2)"
        );
        let err = InfoRequest::decode(&[0, 0, 0, 9, b'a']).unwrap_err();
        assert!(err.to_string().contains("field export name"), "{err}");
    }

    #[test]
    fn oversized_string_is_refused_before_allocation() {
        let mut buf = vec![0xff, 0xff, 0xff, 0xff];
        buf.extend_from_slice(b"abc");
        let err = MetaContextRequest::decode(&buf).unwrap_err();
        assert!(err.to_string().contains("exceeds 4096"), "{err}");
    }
}
