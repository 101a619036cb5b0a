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
//!
//! Files: the protocol constants ([`consts`]), what replies carry and the errors the
//! protocol reports ([`types`]), the handshake phase ([`handshake`]), the strict parser of
//! server bytes ([`parse`]); the client itself and its transmission phase are here.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

mod consts;
mod handshake;
mod parse;
mod types;

pub use consts::*;
pub use types::*;

use parse::parse_chunk;
use types::invalid;

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
}

impl<S: NbdStream> NbdClient<S> {
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
