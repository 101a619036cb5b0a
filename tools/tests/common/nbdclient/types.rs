//! What the protocol carries back to the client: errors it reports (option and command), option replies, export facts, reply chunks and assembled responses.

use std::fmt;
use std::io;

use super::consts::*;

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

pub(super) fn invalid(msg: impl Into<String>) -> io::Error {
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

    pub(super) fn to_rep_error(&self) -> RepError {
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
