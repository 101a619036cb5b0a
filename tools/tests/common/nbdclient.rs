//! Independent, minimal, synchronous NBD client for protocol tests, written from the NBD protocol spec (NetworkBlockDevice/nbd doc/proto.md) and deliberately sharing no code with the server under test.
//!
//! It is kept raw on purpose: every option and request can be sent with arbitrary
//! (also malformed) contents, and replies are parsed strictly so that a server
//! violating the spec shows up as an `io::ErrorKind::InvalidData` error rather
//! than being papered over.
//!
//! Errors the protocol itself carries (an `NBD_REP_ERR_*` option reply, a
//! non-zero error in a transmission reply) come back from the convenience
//! wrappers as `io::Error`s wrapping [`RepError`] / [`CmdError`]; use
//! [`rep_error`] / [`cmd_error`] to look at them.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

// ---------------------------------------------------------------------------
// Protocol constants, named as in the spec.
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, also known as `INIT_PASSWD`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle server magic and the option request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic` of the (unsupported) oldstyle negotiation.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every fixed-newstyle option reply.
pub const NBD_OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Request and reply magics once `NBD_OPT_EXTENDED_HEADERS` was agreed (the spec's
/// extension-ext-header branch).
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply unless `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_ZERO_PAD: usize = 124;

// Handshake flags (server -> client, 16 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (client -> server, 32 bits).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Option types.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31: set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR + 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR + 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR + 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR + 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR + 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR + 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR + 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR + 9;
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR + 10;

// Information types for NBD_OPT_INFO / NBD_OPT_GO.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Request types.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

// Structured reply flags and chunk types.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15: set in every error chunk type (the spec names no constant for it).
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT + 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT + 2;

// Error values in replies.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// `base:allocation` status flags.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Upper bound on a single option reply we are willing to buffer; strings in
/// the protocol are at most 4096 bytes, so anything near this is a broken
/// length field rather than real data.
pub const MAX_OPTION_REPLY: u32 = 4 << 20;
/// Upper bound on one transmission payload we are willing to buffer.
pub const MAX_PAYLOAD: u32 = 128 << 20;
/// Default read timeout, so a hung server fails a test instead of hanging it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------

/// A byte stream the client can run over; implemented for Unix and TCP sockets.
pub trait NbdStream: Read + Write {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn shutdown_write(&self) -> io::Result<()>;
    /// A second handle on the same connection (to send from another thread).
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized,
    {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this stream cannot be cloned"))
    }
}

impl NbdStream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl NbdStream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

// ---------------------------------------------------------------------------
// Errors carried by the protocol
// ---------------------------------------------------------------------------

/// The server answered an option with an `NBD_REP_ERR_*` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepError {
    pub option: u32,
    pub reply_type: u32,
    pub message: String,
}

impl fmt::Display for RepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server rejected option {} with {} ({:#x}): {:?}",
            opt_name(self.option),
            rep_name(self.reply_type),
            self.reply_type,
            self.message
        )
    }
}

impl std::error::Error for RepError {}

/// The server answered a transmission request with a non-zero error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError {
    pub cookie: u64,
    pub error: u32,
    pub message: String,
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request {:#x} failed with NBD error {} ({}): {:?}",
            self.cookie,
            self.error,
            errno_name(self.error),
            self.message
        )
    }
}

impl std::error::Error for CmdError {}

/// The option-level error inside `e`, if that is what it is.
pub fn rep_error(e: &io::Error) -> Option<&RepError> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<RepError>())
}

/// The transmission-level error inside `e`, if that is what it is.
pub fn cmd_error(e: &io::Error) -> Option<&CmdError> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<CmdError>())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn opt_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

pub fn rep_name(reply_type: u32) -> &'static str {
    match reply_type {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "unknown reply type",
    }
}

pub fn errno_name(error: u32) -> &'static str {
    match error {
        0 => "success",
        NBD_EPERM => "NBD_EPERM",
        NBD_EIO => "NBD_EIO",
        NBD_ENOMEM => "NBD_ENOMEM",
        NBD_EINVAL => "NBD_EINVAL",
        NBD_ENOSPC => "NBD_ENOSPC",
        NBD_EOVERFLOW => "NBD_EOVERFLOW",
        NBD_ENOTSUP => "NBD_ENOTSUP",
        NBD_ESHUTDOWN => "NBD_ESHUTDOWN",
        _ => "unknown error",
    }
}

// ---------------------------------------------------------------------------
// Handshake-phase data
// ---------------------------------------------------------------------------

/// One fixed-newstyle option reply, unparsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn is_error(&self) -> bool {
        self.reply_type & NBD_REP_FLAG_ERROR != 0
    }

    /// ACK and errors end a reply sequence; everything else announces more to come.
    pub fn is_final(&self) -> bool {
        self.reply_type == NBD_REP_ACK || self.is_error()
    }

    fn to_rep_error(&self) -> RepError {
        RepError {
            option: self.option,
            reply_type: self.reply_type,
            message: String::from_utf8_lossy(&self.data).into_owned(),
        }
    }
}

/// What `NBD_OPT_INFO`/`NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) told us about an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum) from `NBD_INFO_BLOCK_SIZE`.
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Information types this client does not know, as (type, payload).
    pub unknown: Vec<(u16, Vec<u8>)>,
}

impl ExportInfo {
    pub fn has_flag(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// One entry of an `NBD_OPT_LIST` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedExport {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

// ---------------------------------------------------------------------------
// Transmission-phase data
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkKind {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: (length, flags) descriptors of 64 bits each.
    BlockStatusExt {
        context_id: u32,
        extents: Vec<(u64, u64)>,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<Extent>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// An error chunk of a type this client does not know (bit 15 set).
    UnknownError {
        chunk_type: u16,
        error: u32,
        message: String,
    },
}

/// One `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` chunk: the context id and its (length, flags)
/// descriptors.
pub type ExtStatus = (u32, Vec<(u64, u64)>);

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub cookie: u64,
    pub flags: u16,
    pub chunk_type: u16,
    pub kind: ChunkKind,
}

impl Chunk {
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    pub fn error(&self) -> Option<(u32, &str)> {
        match &self.kind {
            ChunkKind::Error { error, message }
            | ChunkKind::ErrorOffset { error, message, .. }
            | ChunkKind::UnknownError { error, message, .. } => Some((*error, message.as_str())),
            _ => None,
        }
    }
}

/// One message read off the wire during transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { cookie: u64, error: u32, data: Vec<u8> },
    Structured(Chunk),
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } => *cookie,
            Reply::Structured(chunk) => chunk.cookie,
        }
    }
}

/// All messages belonging to one request: a single simple reply, or every
/// structured chunk up to and including the one flagged `NBD_REPLY_FLAG_DONE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub cookie: u64,
    pub request_type: u16,
    pub request_offset: u64,
    pub request_length: u64,
    pub structured: bool,
    /// The simple reply's error, or the first error chunk's error; 0 on success.
    pub error: u32,
    /// Payload of a simple read reply.
    pub data: Vec<u8>,
    /// Structured chunks in arrival order.
    pub chunks: Vec<Chunk>,
}

impl Response {
    pub fn is_ok(&self) -> bool {
        self.error == 0
    }

    /// The response as `Ok(self)`, or its error as a [`CmdError`].
    pub fn check(self) -> io::Result<Response> {
        if self.error == 0 {
            return Ok(self);
        }
        let message = self.chunks.iter().find_map(|c| c.error().map(|(_, m)| m.to_owned())).unwrap_or_default();
        Err(io::Error::other(CmdError { cookie: self.cookie, error: self.error, message }))
    }

    /// The bytes a successful read returned, reassembled from data and hole
    /// chunks; gaps, overlaps or chunks outside the request are spec
    /// violations and reported as `InvalidData`.
    pub fn read_data(&self) -> io::Result<Vec<u8>> {
        if self.error != 0 {
            return Err(self.clone().check().unwrap_err());
        }
        let len = self.request_length as usize;
        if !self.structured {
            if self.data.len() != len {
                return Err(invalid(format!(
                    "simple read reply carried {} bytes for a {len}-byte request",
                    self.data.len()
                )));
            }
            return Ok(self.data.clone());
        }
        let start = self.request_offset;
        let end = start + self.request_length;
        let mut out = vec![0u8; len];
        let mut covered: Vec<(u64, u64)> = Vec::new();
        for chunk in &self.chunks {
            let (off, n) = match &chunk.kind {
                ChunkKind::OffsetData { offset, data } => (*offset, data.len() as u64),
                ChunkKind::OffsetHole { offset, length } => (*offset, u64::from(*length)),
                ChunkKind::None => continue,
                other => return Err(invalid(format!("unexpected chunk in a read reply: {other:?}"))),
            };
            if off < start || off.checked_add(n).filter(|&e| e <= end).is_none() {
                return Err(invalid(format!("read chunk [{off}, +{n}) lies outside the request [{start}, {end})")));
            }
            if let ChunkKind::OffsetData { data, .. } = &chunk.kind {
                let at = (off - start) as usize;
                out[at..at + data.len()].copy_from_slice(data);
            }
            // Holes need no copy: `out` starts zeroed.
            covered.push((off, off + n));
        }
        covered.sort_unstable();
        let mut pos = start;
        for (s, e) in covered {
            if s < pos {
                return Err(invalid(format!("read chunks overlap at offset {s}")));
            }
            if s > pos {
                return Err(invalid(format!("read reply left [{pos}, {s}) uncovered")));
            }
            pos = e;
        }
        if pos != end {
            return Err(invalid(format!("read reply left [{pos}, {end}) uncovered")));
        }
        Ok(out)
    }

    /// The `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` chunks as (context id, (length, flags)
    /// descriptors), in arrival order.
    pub fn block_status_ext(&self) -> io::Result<Vec<ExtStatus>> {
        if self.error != 0 {
            return Err(self.clone().check().unwrap_err());
        }
        let mut out = Vec::new();
        for chunk in &self.chunks {
            match &chunk.kind {
                ChunkKind::BlockStatusExt { context_id, extents } => out.push((*context_id, extents.clone())),
                other => return Err(invalid(format!("unexpected chunk in an extended block status reply: {other:?}"))),
            }
        }
        if out.is_empty() {
            return Err(invalid("block status reply without any NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk"));
        }
        Ok(out)
    }

    /// The block status chunks as (context id, extents), in arrival order.
    pub fn block_status(&self) -> io::Result<Vec<(u32, Vec<Extent>)>> {
        if self.error != 0 {
            return Err(self.clone().check().unwrap_err());
        }
        let mut out = Vec::new();
        for chunk in &self.chunks {
            match &chunk.kind {
                ChunkKind::BlockStatus { context_id, extents } => out.push((*context_id, extents.clone())),
                ChunkKind::None => {}
                other => return Err(invalid(format!("unexpected chunk in block status reply: {other:?}"))),
            }
        }
        if out.is_empty() {
            return Err(invalid("block status reply without any NBD_REPLY_TYPE_BLOCK_STATUS chunk"));
        }
        Ok(out)
    }
}

/// What was observed when checking whether the server hung up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    Closed,
    StillOpen,
    /// The server sent these bytes instead of closing.
    SentData(Vec<u8>),
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    request_type: u16,
    offset: u64,
    length: u64,
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

pub struct NbdClient<S: NbdStream> {
    stream: S,
    /// Handshake flags the server sent in its greeting.
    pub handshake_flags: u16,
    /// Client flags we sent back.
    pub client_flags: u32,
    structured: bool,
    extended: bool,
    meta_contexts: Vec<MetaContext>,
    export: Option<ExportInfo>,
    inflight: HashMap<u64, Inflight>,
    /// Requests whose final reply was read but not yet assembled into a Response.
    finished: HashMap<u64, Inflight>,
    partial: HashMap<u64, Vec<Chunk>>,
    completed: VecDeque<Response>,
    next_cookie: u64,
}

impl NbdClient<UnixStream> {
    /// Connects and performs the fixed newstyle greeting ([`NbdClient::handshake`]).
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        let mut client = Self::from_stream(UnixStream::connect(path)?)?;
        client.handshake()?;
        Ok(client)
    }

    /// Connects without reading anything, for tests of the greeting itself.
    pub fn connect_unix_raw(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_stream(UnixStream::connect(path)?)
    }
}

impl NbdClient<TcpStream> {
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let mut client = Self::connect_tcp_raw(addr)?;
        client.handshake()?;
        Ok(client)
    }

    pub fn connect_tcp_raw(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        // Requests are small and latency-bound; Nagle would only slow tests down.
        stream.set_nodelay(true)?;
        Self::from_stream(stream)
    }
}

impl<S: NbdStream> NbdClient<S> {
    /// Wraps a connected stream without sending or reading anything.
    pub fn from_stream(stream: S) -> io::Result<Self> {
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(NbdClient {
            stream,
            handshake_flags: 0,
            client_flags: 0,
            structured: false,
            extended: false,
            meta_contexts: Vec::new(),
            export: None,
            inflight: HashMap::new(),
            finished: HashMap::new(),
            partial: HashMap::new(),
            completed: VecDeque::new(),
            next_cookie: 0xc0de_0000_0000_0001,
        })
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn into_stream(self) -> S {
        self.stream
    }

    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The export entered with GO / EXPORT_NAME, if any.
    pub fn export(&self) -> Option<&ExportInfo> {
        self.export.as_ref()
    }

    /// Contexts selected by the last successful `NBD_OPT_SET_META_CONTEXT`.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.meta_contexts
    }

    // ---- greeting ----------------------------------------------------------

    /// Reads the greeting and answers with `NBD_FLAG_C_FIXED_NEWSTYLE`, plus
    /// `NBD_FLAG_C_NO_ZEROES` when the server offered it.
    pub fn handshake(&mut self) -> io::Result<u16> {
        let flags = self.read_greeting()?;
        let mut client = 0;
        if flags & NBD_FLAG_FIXED_NEWSTYLE != 0 {
            client |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if flags & NBD_FLAG_NO_ZEROES != 0 {
            client |= NBD_FLAG_C_NO_ZEROES;
        }
        self.send_client_flags(client)?;
        Ok(flags)
    }

    /// Reads `NBDMAGIC`, `IHAVEOPT` and the 16-bit handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let magic = self.read_u64()?;
        if magic != NBDMAGIC {
            return Err(invalid(format!("greeting starts with {magic:#x}, not NBDMAGIC")));
        }
        let second = self.read_u64()?;
        if second == CLISERV_MAGIC {
            return Err(invalid("server speaks oldstyle negotiation"));
        }
        if second != IHAVEOPT {
            return Err(invalid(format!("greeting has {second:#x} where IHAVEOPT belongs")));
        }
        self.handshake_flags = self.read_u16()?;
        Ok(self.handshake_flags)
    }

    /// Sends any 32-bit client flags, including ones the spec forbids.
    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.client_flags = flags;
        self.stream.write_all(&flags.to_be_bytes())?;
        self.stream.flush()
    }

    // ---- raw options -------------------------------------------------------

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.send_option_raw(IHAVEOPT, option, data.len() as u32, data)
    }

    /// Sends an option header with any magic and declared length, followed by
    /// `data` verbatim (which need not match the declared length).
    pub fn send_option_raw(&mut self, magic: u64, option: u32, declared_len: u32, data: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&magic.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&declared_len.to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg)?;
        self.stream.flush()
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let magic = self.read_u64()?;
        if magic != NBD_OPT_REPLY_MAGIC {
            return Err(invalid(format!("option reply magic is {magic:#x}")));
        }
        let option = self.read_u32()?;
        let reply_type = self.read_u32()?;
        let len = self.read_u32()?;
        if len > MAX_OPTION_REPLY {
            return Err(invalid(format!("option reply claims {len} bytes of data")));
        }
        let data = self.read_vec(len as usize)?;
        Ok(OptionReply { option, reply_type, data })
    }

    /// Sends an option and collects its replies up to the final ACK or error,
    /// checking that every reply echoes the option.
    pub fn option_exchange(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptionReply>> {
        self.send_option(option, data)?;
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply()?;
            if reply.option != option {
                return Err(invalid(format!("reply to {} echoes option {}", opt_name(option), reply.option)));
            }
            let last = reply.is_final();
            replies.push(reply);
            if last {
                return Ok(replies);
            }
        }
    }

    /// Like [`Self::option_exchange`] but turns a final error reply into a [`RepError`].
    fn option_expect_ack(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptionReply>> {
        let mut replies = self.option_exchange(option, data)?;
        let last = replies.pop().ok_or_else(|| invalid("no option reply"))?;
        if last.is_error() {
            return Err(io::Error::other(last.to_rep_error()));
        }
        Ok(replies)
    }

    // ---- option wrappers ---------------------------------------------------

    pub fn opt_list(&mut self) -> io::Result<Vec<ListedExport>> {
        let replies = self.option_expect_ack(NBD_OPT_LIST, &[])?;
        let mut out = Vec::new();
        for r in replies {
            if r.reply_type != NBD_REP_SERVER {
                return Err(invalid(format!("NBD_OPT_LIST answered with {}", rep_name(r.reply_type))));
            }
            let mut p = Parser::new(&r.data);
            let n = p.u32()? as usize;
            let name = p.string(n)?;
            let description = p.string(p.remaining())?;
            out.push(ListedExport { name, description });
        }
        Ok(out)
    }

    /// `NBD_OPT_INFO`/`NBD_OPT_GO` option data: name and information requests.
    pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    pub fn opt_info(&mut self, name: &str, requests: &[u16]) -> io::Result<ExportInfo> {
        self.info_or_go(NBD_OPT_INFO, name, requests)
    }

    /// On success the connection is in transmission phase.
    pub fn opt_go(&mut self, name: &str, requests: &[u16]) -> io::Result<ExportInfo> {
        let info = self.info_or_go(NBD_OPT_GO, name, requests)?;
        self.export = Some(info.clone());
        Ok(info)
    }

    fn info_or_go(&mut self, option: u32, name: &str, requests: &[u16]) -> io::Result<ExportInfo> {
        let replies = self.option_expect_ack(option, &Self::info_payload(name, requests))?;
        let mut info = ExportInfo::default();
        let mut saw_export = false;
        for r in replies {
            if r.reply_type != NBD_REP_INFO {
                return Err(invalid(format!("{} answered with {}", opt_name(option), rep_name(r.reply_type))));
            }
            let mut p = Parser::new(&r.data);
            let info_type = p.u16()?;
            match info_type {
                NBD_INFO_EXPORT => {
                    if r.data.len() != 12 {
                        return Err(invalid(format!("NBD_INFO_EXPORT has length {}", r.data.len())));
                    }
                    info.size = p.u64()?;
                    info.transmission_flags = p.u16()?;
                    saw_export = true;
                }
                NBD_INFO_NAME => info.name = Some(p.string(p.remaining())?),
                NBD_INFO_DESCRIPTION => info.description = Some(p.string(p.remaining())?),
                NBD_INFO_BLOCK_SIZE => {
                    if r.data.len() != 14 {
                        return Err(invalid(format!("NBD_INFO_BLOCK_SIZE has length {}", r.data.len())));
                    }
                    info.block_size = Some((p.u32()?, p.u32()?, p.u32()?));
                }
                other => info.unknown.push((other, p.rest().to_vec())),
            }
        }
        if !saw_export {
            return Err(invalid(format!("{} succeeded without NBD_INFO_EXPORT", opt_name(option))));
        }
        Ok(info)
    }

    /// `NBD_OPT_EXTENDED_HEADERS`; on ACK every request and reply from then on uses the
    /// 32-byte headers.
    pub fn opt_extended_headers(&mut self) -> io::Result<()> {
        let replies = self.option_expect_ack(NBD_OPT_EXTENDED_HEADERS, &[])?;
        if !replies.is_empty() {
            return Err(invalid("NBD_OPT_EXTENDED_HEADERS answered with more than an ACK"));
        }
        self.extended = true;
        Ok(())
    }

    pub fn opt_structured_reply(&mut self) -> io::Result<()> {
        let replies = self.option_expect_ack(NBD_OPT_STRUCTURED_REPLY, &[])?;
        if !replies.is_empty() {
            return Err(invalid("NBD_OPT_STRUCTURED_REPLY answered with more than an ACK"));
        }
        self.structured = true;
        Ok(())
    }

    /// Option data shared by LIST_META_CONTEXT and SET_META_CONTEXT.
    pub fn meta_context_payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    pub fn opt_list_meta_context(&mut self, export: &str, queries: &[&str]) -> io::Result<Vec<MetaContext>> {
        self.meta_context(NBD_OPT_LIST_META_CONTEXT, export, queries)
    }

    pub fn opt_set_meta_context(&mut self, export: &str, queries: &[&str]) -> io::Result<Vec<MetaContext>> {
        // The spec says SET replaces the selection even when it fails.
        self.meta_contexts.clear();
        let contexts = self.meta_context(NBD_OPT_SET_META_CONTEXT, export, queries)?;
        self.meta_contexts = contexts.clone();
        Ok(contexts)
    }

    fn meta_context(&mut self, option: u32, export: &str, queries: &[&str]) -> io::Result<Vec<MetaContext>> {
        let replies = self.option_expect_ack(option, &Self::meta_context_payload(export, queries))?;
        let mut out = Vec::new();
        for r in replies {
            if r.reply_type != NBD_REP_META_CONTEXT {
                return Err(invalid(format!("{} answered with {}", opt_name(option), rep_name(r.reply_type))));
            }
            let mut p = Parser::new(&r.data);
            let id = p.u32()?;
            let name = p.string(p.remaining())?;
            out.push(MetaContext { id, name });
        }
        Ok(out)
    }

    /// Old-style way into transmission. A server refusing the name must hang
    /// up, which shows here as an `UnexpectedEof` error.
    pub fn opt_export_name(&mut self, name: &str) -> io::Result<ExportInfo> {
        self.send_option(NBD_OPT_EXPORT_NAME, name.as_bytes())?;
        let size = self.read_u64()?;
        let transmission_flags = self.read_u16()?;
        if self.client_flags & NBD_FLAG_C_NO_ZEROES == 0 {
            self.read_vec(EXPORT_NAME_ZERO_PAD)?;
        }
        let info = ExportInfo { size, transmission_flags, ..Default::default() };
        self.export = Some(info.clone());
        Ok(info)
    }

    /// Sends `NBD_OPT_ABORT` and returns the server's reply, or `None` when it
    /// just closed the connection (which the spec tolerates).
    pub fn opt_abort(&mut self) -> io::Result<Option<OptionReply>> {
        self.send_option(NBD_OPT_ABORT, &[])?;
        match self.read_option_reply() {
            Ok(r) => Ok(Some(r)),
            Err(e) if is_disconnect(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    // ---- transmission: raw -------------------------------------------------

    pub fn next_cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// Sends one request header followed by `payload` verbatim, and remembers
    /// the request so its reply can be decoded (simple read replies carry no
    /// length) and matched by cookie.
    pub fn send_request(
        &mut self,
        flags: u16,
        request_type: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.send_request64(flags, request_type, cookie, offset, u64::from(length), payload)
    }

    /// [`Self::send_request`] with a 64-bit length: in an extended header once extended
    /// headers were agreed, else the low 32 bits in a compact one.
    pub fn send_request64(
        &mut self,
        flags: u16,
        request_type: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut msg = Vec::with_capacity(32 + payload.len());
        let magic = if self.extended { NBD_EXTENDED_REQUEST_MAGIC } else { NBD_REQUEST_MAGIC };
        msg.extend_from_slice(&magic.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&request_type.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            msg.extend_from_slice(&length.to_be_bytes());
        } else {
            msg.extend_from_slice(&(length as u32).to_be_bytes());
        }
        msg.extend_from_slice(payload);
        if request_type != NBD_CMD_DISC {
            self.expect_reply_for(cookie, request_type, offset, length);
        }
        self.stream.write_all(&msg)?;
        self.stream.flush()
    }

    /// Writes arbitrary bytes, e.g. a truncated or corrupted request.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Registers a request sent with [`Self::send_raw`] so its reply can be read.
    pub fn expect_reply_for(&mut self, cookie: u64, request_type: u16, offset: u64, length: impl Into<u64>) {
        self.inflight.insert(cookie, Inflight { request_type, offset, length: length.into() });
    }

    pub fn inflight_count(&self) -> usize {
        self.inflight.len()
    }

    /// Reads exactly one reply message: a simple reply, or one structured chunk.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let magic = self.read_u32()?;
        if self.extended && magic != NBD_EXTENDED_REPLY_MAGIC {
            return Err(invalid(format!("reply magic {magic:#x} although extended headers were negotiated")));
        }
        match magic {
            NBD_EXTENDED_REPLY_MAGIC => {
                if !self.extended {
                    return Err(invalid("extended reply although extended headers were not negotiated"));
                }
                let flags = self.read_u16()?;
                let chunk_type = self.read_u16()?;
                let cookie = self.read_u64()?;
                let offset = self.read_u64()?;
                let len = self.read_u64()?;
                if len > u64::from(MAX_PAYLOAD) + 64 {
                    return Err(invalid(format!("extended chunk claims {len} bytes of payload")));
                }
                let payload = self.read_vec(len as usize)?;
                let Some(req) = self.inflight.get(&cookie).copied() else {
                    return Err(invalid(format!("extended chunk for cookie {cookie:#x}, which is not in flight")));
                };
                if offset != req.offset {
                    return Err(invalid(format!(
                        "extended chunk for cookie {cookie:#x} carries offset {offset}, the request's was {}",
                        req.offset
                    )));
                }
                let kind = parse_chunk(chunk_type, flags, &payload)?;
                let chunk = Chunk { cookie, flags, chunk_type, kind };
                if chunk.is_done() {
                    self.inflight.remove(&cookie);
                    self.finished.insert(cookie, req);
                }
                Ok(Reply::Structured(chunk))
            }
            NBD_SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32()?;
                let cookie = self.read_u64()?;
                let req = self
                    .inflight
                    .remove(&cookie)
                    .ok_or_else(|| invalid(format!("simple reply for cookie {cookie:#x}, which is not in flight")))?;
                self.finished.insert(cookie, req);
                if self.structured && req.request_type == NBD_CMD_READ {
                    return Err(invalid(format!(
                        "simple reply to NBD_CMD_READ {cookie:#x} although structured replies were negotiated"
                    )));
                }
                let data = if req.request_type == NBD_CMD_READ && error == 0 {
                    self.read_vec(usize::try_from(req.length).map_err(|_| invalid("read length"))?)?
                } else {
                    Vec::new()
                };
                Ok(Reply::Simple { cookie, error, data })
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let flags = self.read_u16()?;
                let chunk_type = self.read_u16()?;
                let cookie = self.read_u64()?;
                let len = self.read_u32()?;
                if len > MAX_PAYLOAD {
                    return Err(invalid(format!("structured chunk claims {len} bytes of payload")));
                }
                let payload = self.read_vec(len as usize)?;
                if !self.structured {
                    return Err(invalid("structured reply although structured replies were not negotiated"));
                }
                if !self.inflight.contains_key(&cookie) {
                    return Err(invalid(format!("structured chunk for cookie {cookie:#x}, which is not in flight")));
                }
                let kind = parse_chunk(chunk_type, flags, &payload)?;
                let chunk = Chunk { cookie, flags, chunk_type, kind };
                if chunk.is_done() {
                    if let Some(req) = self.inflight.remove(&cookie) {
                        self.finished.insert(cookie, req);
                    }
                }
                Ok(Reply::Structured(chunk))
            }
            other => Err(invalid(format!("reply magic is {other:#x}"))),
        }
    }

    /// Returns the next complete response (one already assembled while
    /// waiting for another cookie, else the next to finish on the wire).
    pub fn read_response(&mut self) -> io::Result<Response> {
        match self.completed.pop_front() {
            Some(r) => Ok(r),
            None => self.read_next_complete(),
        }
    }

    /// Reads until the request with `cookie` is complete; responses to other
    /// requests are kept for [`Self::read_response`].
    pub fn wait_response(&mut self, cookie: u64) -> io::Result<Response> {
        if let Some(i) = self.completed.iter().position(|r| r.cookie == cookie) {
            if let Some(r) = self.completed.remove(i) {
                return Ok(r);
            }
        }
        loop {
            let r = self.read_next_complete()?;
            if r.cookie == cookie {
                return Ok(r);
            }
            self.completed.push_back(r);
        }
    }

    /// Reads wire messages until some request is complete; chunks of other
    /// requests stay buffered in `partial`.
    fn read_next_complete(&mut self) -> io::Result<Response> {
        loop {
            match self.read_reply()? {
                Reply::Simple { cookie, error, data } => {
                    let req = self.take_finished(cookie);
                    return Ok(Response {
                        cookie,
                        request_type: req.request_type,
                        request_offset: req.offset,
                        request_length: req.length,
                        structured: false,
                        error,
                        data,
                        chunks: Vec::new(),
                    });
                }
                Reply::Structured(chunk) => {
                    let cookie = chunk.cookie;
                    let done = chunk.is_done();
                    self.partial.entry(cookie).or_default().push(chunk);
                    if done {
                        let chunks = self.partial.remove(&cookie).unwrap_or_default();
                        let error = chunks.iter().find_map(|c| c.error().map(|(e, _)| e)).unwrap_or(0);
                        let req = self.take_finished(cookie);
                        return Ok(Response {
                            cookie,
                            request_type: req.request_type,
                            request_offset: req.offset,
                            request_length: req.length,
                            structured: true,
                            error,
                            data: Vec::new(),
                            chunks,
                        });
                    }
                }
            }
        }
    }

    /// The parameters of a request whose final reply has been read.
    fn take_finished(&mut self, cookie: u64) -> Inflight {
        // read_reply always moves the request here before returning a final reply.
        self.finished.remove(&cookie).unwrap_or(Inflight { request_type: u16::MAX, offset: 0, length: 0 })
    }

    // ---- transmission: convenience ----------------------------------------

    /// Sends one request with a fresh cookie and waits for its full response.
    pub fn command(
        &mut self,
        flags: u16,
        request_type: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<Response> {
        self.command64(flags, request_type, offset, u64::from(length), payload)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        self.command(0, NBD_CMD_READ, offset, length, &[])?.read_data()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_flags(offset, data, 0)
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<()> {
        self.command(flags, NBD_CMD_WRITE, offset, data.len() as u32, data)?.check().map(drop)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.command(0, NBD_CMD_FLUSH, 0, 0, &[])?.check().map(drop)
    }

    /// [`Self::command`] with a 64-bit length (see [`Self::send_request64`]).
    pub fn command64(
        &mut self,
        flags: u16,
        request_type: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<Response> {
        let cookie = self.next_cookie();
        self.send_request64(flags, request_type, cookie, offset, length, payload)?;
        self.wait_response(cookie)
    }

    pub fn trim(&mut self, offset: u64, length: u32) -> io::Result<()> {
        self.command(0, NBD_CMD_TRIM, offset, length, &[])?.check().map(drop)
    }

    pub fn write_zeroes(&mut self, offset: u64, length: u32, flags: u16) -> io::Result<()> {
        self.command(flags, NBD_CMD_WRITE_ZEROES, offset, length, &[])?.check().map(drop)
    }

    pub fn cache(&mut self, offset: u64, length: u32) -> io::Result<()> {
        self.command(0, NBD_CMD_CACHE, offset, length, &[])?.check().map(drop)
    }

    pub fn block_status(&mut self, offset: u64, length: u32, flags: u16) -> io::Result<Vec<(u32, Vec<Extent>)>> {
        self.command(flags, NBD_CMD_BLOCK_STATUS, offset, length, &[])?.block_status()
    }

    /// Soft disconnect: `NBD_CMD_DISC` has no reply; the server then closes.
    pub fn disconnect(&mut self) -> io::Result<()> {
        let cookie = self.next_cookie();
        self.send_request(0, NBD_CMD_DISC, cookie, 0, 0, &[])
    }

    /// Waits up to `timeout` for the server to close the connection.
    pub fn peer_state(&mut self, timeout: Duration) -> io::Result<PeerState> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 4096];
        let result = self.stream.read(&mut buf);
        self.stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        match result {
            Ok(0) => Ok(PeerState::Closed),
            Ok(n) => Ok(PeerState::SentData(buf[..n].to_vec())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Ok(PeerState::StillOpen)
            }
            Err(e) if is_disconnect(&e) => Ok(PeerState::Closed),
            Err(e) => Err(e),
        }
    }

    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.shutdown_write()
    }

    // ---- wire helpers ------------------------------------------------------

    fn read_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.stream.read_exact(&mut v)?;
        Ok(v)
    }

    fn read_u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.stream.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

/// Whether `e` means the peer went away rather than something else failing.
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn parse_chunk(chunk_type: u16, flags: u16, payload: &[u8]) -> io::Result<ChunkKind> {
    let len = payload.len();
    let mut p = Parser::new(payload);
    let kind = match chunk_type {
        NBD_REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(invalid(format!("NBD_REPLY_TYPE_NONE with {len} bytes of payload")));
            }
            if flags & NBD_REPLY_FLAG_DONE == 0 {
                return Err(invalid("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE"));
            }
            ChunkKind::None
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            if len < 9 {
                return Err(invalid(format!("NBD_REPLY_TYPE_OFFSET_DATA with length {len}")));
            }
            ChunkKind::OffsetData { offset: p.u64()?, data: p.rest().to_vec() }
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if len != 12 {
                return Err(invalid(format!("NBD_REPLY_TYPE_OFFSET_HOLE with length {len}")));
            }
            let offset = p.u64()?;
            let length = p.u32()?;
            if length == 0 {
                return Err(invalid("NBD_REPLY_TYPE_OFFSET_HOLE of size 0"));
            }
            ChunkKind::OffsetHole { offset, length }
        }
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT => {
            if len < 24 || !(len - 8).is_multiple_of(16) {
                return Err(invalid(format!("NBD_REPLY_TYPE_BLOCK_STATUS_EXT with length {len}")));
            }
            let context_id = p.u32()?;
            let count = p.u32()? as usize;
            if count != (len - 8) / 16 {
                return Err(invalid(format!(
                    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT counts {count} descriptors in {len} bytes"
                )));
            }
            let mut extents = Vec::with_capacity(count);
            while p.remaining() > 0 {
                let length = p.u64()?;
                let flags = p.u64()?;
                if length == 0 {
                    return Err(invalid("block status extent of length 0"));
                }
                extents.push((length, flags));
            }
            ChunkKind::BlockStatusExt { context_id, extents }
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            if len < 12 || (len - 4) & 7 != 0 {
                return Err(invalid(format!("NBD_REPLY_TYPE_BLOCK_STATUS with length {len}")));
            }
            let context_id = p.u32()?;
            let mut extents = Vec::with_capacity((len - 4) / 8);
            while p.remaining() > 0 {
                let length = p.u32()?;
                let flags = p.u32()?;
                if length == 0 {
                    return Err(invalid("block status extent of length 0"));
                }
                extents.push(Extent { length, flags });
            }
            ChunkKind::BlockStatus { context_id, extents }
        }
        t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
            if len < 6 {
                return Err(invalid(format!("error chunk {t:#x} with length {len}")));
            }
            let error = p.u32()?;
            let msg_len = p.u16()? as usize;
            let tail = if t == NBD_REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if msg_len + tail > p.remaining() {
                return Err(invalid(format!(
                    "error chunk {t:#x}: message length {msg_len} does not fit in length {len}"
                )));
            }
            let message = p.string(msg_len)?;
            if error == 0 {
                return Err(invalid(format!("error chunk {t:#x} with error value 0")));
            }
            match t {
                NBD_REPLY_TYPE_ERROR => {
                    if p.remaining() != 0 {
                        return Err(invalid("NBD_REPLY_TYPE_ERROR with trailing bytes"));
                    }
                    ChunkKind::Error { error, message }
                }
                NBD_REPLY_TYPE_ERROR_OFFSET => {
                    let offset = p.u64()?;
                    if p.remaining() != 0 {
                        return Err(invalid("NBD_REPLY_TYPE_ERROR_OFFSET with trailing bytes"));
                    }
                    ChunkKind::ErrorOffset { error, message, offset }
                }
                _ => ChunkKind::UnknownError { chunk_type: t, error, message },
            }
        }
        // The spec requires a hard disconnect on unknown non-error chunks.
        t => return Err(invalid(format!("unknown structured reply type {t:#x}"))),
    };
    Ok(kind)
}

/// Bounds-checked big-endian reader over server-supplied bytes.
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Parser { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(invalid(format!(
                "server data too short: wanted {n} more bytes at offset {}, have {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn u16(&mut self) -> io::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self, n: usize) -> io::Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid("server string is not UTF-8"))
    }
}
