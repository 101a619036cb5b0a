//! The transmission phase of one connection: requests read in order, run concurrently on the
//! worker pool, replies sent in whatever order they finish (matched by cookie).
//!
//! Every client error (bad flag, out of range, oversized payload) gets an error reply and
//! leaves the connection usable; only a bad request magic or a broken socket ends it.

use super::budget::{Budget, RESERVED_BYTES};
use super::buffers::Buffers;
use super::handshake::{Negotiated, MAX_PAYLOAD};
use super::meta;
use super::payload::{Incoming, SocketPayload};
use super::proto::*;
use super::spin::Spin;
use super::winding::Winding;
use crate::device::{Disk, Extent, Payload};
use crate::error::{Error, ErrorKind};
use crate::storage::{poll_one, Pipe};
use crate::sync::lock;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};

/// Payload bytes (read lengths and write payloads) one connection may have in flight.
const MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;
/// Request bytes read from the socket at a time. Enough for a whole queue of small requests
/// per read; small, because a large write's payload first lands in this buffer as far as it
/// reaches and is then copied out (the rest is read straight into the payload buffer, or
/// spliced).
const READ_BUFFER: usize = 64 * 1024;
/// Writes at least this long are written while their payload arrives, spliced from the socket
/// into the image (see [`SocketPayload`]), by the thread that reads them. Shorter ones are read
/// whole first: their payload mostly comes with the header in one read anyway.
const SPLICE_MIN: u32 = 128 * 1024;

/// Requests without overlap after which a connection stops waking a thread to read on while
/// it runs one (see [`next_request`]): about an eighth of a second at queue depth 1 with a
/// FLUSH after each write (some 4,000 pairs, 8,000 requests, a second here), long enough that
/// a client which keeps requests in flight shows it.
const EAGER_REQUESTS: u32 = 1024;

/// The largest read that may be quiet (see [`next_request`]). A quiet request's reply is sent
/// while nobody reads the stream; a reply larger than the socket can take at once waits for
/// the client to read it, and a client that sends a write before reading that reply (the
/// spec lets it keep requests in flight) waits for the server to read its payload: neither
/// would ever go on. A reply this size fits in a socket's buffer (a Unix socket's is 208 KiB,
/// a TCP peer's receive buffer 128 KiB by default), and a larger read wakes a thread to read
/// on, which costs little beside its copy. So does block status with more than three
/// contexts selected (see [`reply_bound`]).
const QUIET_REPLY_MAX: u64 = 64 * 1024;

/// Reads shorter than this are answered with one data chunk: looking for holes costs more
/// than the bytes it saves.
const HOLE_SCAN_MIN: u32 = 64 * 1024;

struct Conn {
    neg: Negotiated,
    out: Mutex<Box<dyn Write + Send>>,
    budget: Budget,
    /// Write payloads and read replies; see [`Buffers`] for why they are reused.
    bufs: Buffers,
    broken: AtomicBool,
    /// Ends the reader when a reply cannot be sent.
    on_broken: Box<dyn Fn() + Send + Sync>,
    /// The request stream's socket, polled (never read) to see whether the client sent more
    /// before a reply; `None` if the stream is not a socket.
    in_fd: Option<RawFd>,
    /// The request being answered was read without waking a thread (see [`next_request`]):
    /// nobody reads the stream until it is answered.
    quiet: AtomicBool,
    /// A reply to a quiet request found more requests sent before it: the client keeps
    /// requests in flight.
    overlap: AtomicBool,
    /// Set when the server winds the connection down: requests read from then on are
    /// refused with NBD_ESHUTDOWN.
    winding: Arc<Winding>,
}

/// The request stream, read by one thread at a time.
struct Input {
    r: BufReader<Box<dyn Incoming>>,
    done: bool,
    /// For spliced writes; made at the first one. `Err` if it could not be made.
    pipe: Option<io::Result<Pipe>>,
    /// Requests still to be read waking a thread for the next one (see [`next_request`]).
    eager: u32,
    /// How long a quiet connection's reader looks for the next request before sleeping.
    spin: Spin,
}

impl Input {
    /// The connection showed overlap: wake a thread to read on for the next
    /// [`EAGER_REQUESTS`], and look for nothing before sleeping (no connection that wakes
    /// threads is quiet).
    fn overlapped(&mut self) {
        self.eager = EAGER_REQUESTS;
        self.spin.reset();
    }
}

/// Whether the socket `fd` has bytes to read now. No socket, or a poll that fails, counts as
/// readable: callers then wake a thread, as they would without asking.
fn readable(fd: Option<RawFd>) -> bool {
    fd.map_or(true, |fd| poll_one(fd, libc::POLLIN, 0).unwrap_or(true))
}

/// Maps a library error to the NBD error a client should see.
fn errno(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => EINVAL,
        _ => EIO,
    }
}

/// Serves requests until the client disconnects, the socket breaks, or `reader` hits EOF
/// (which is how the server ends a connection it winds down). Returns once every request
/// already read has been answered. Once `winding` is set, requests read are answered
/// NBD_ESHUTDOWN instead of run.
///
/// `threads` threads share the connection, leader/follower style: whoever holds the reader
/// reads one request (and its payload), lets go of the reader, runs the request and sends its
/// reply. There is no hand-off between a reading thread and a working thread, and at most
/// `threads` requests are in flight. A connection at queue depth 1 does not even wake a
/// thread to read on: one thread reads, runs and answers in turn (see [`next_request`]). A
/// write of [`SPLICE_MIN`] bytes or more is the exception to letting go of the reader:
/// it runs before the reader is let go, as its payload arrives. Its bytes then reach the page
/// cache in one copy, and large writes to one file do not contend for its inode lock.
pub fn serve(
    reader: Box<dyn Incoming>,
    writer: Box<dyn Write + Send>,
    neg: Negotiated,
    threads: usize,
    global: &Budget,
    on_broken: Box<dyn Fn() + Send + Sync>,
    winding: Arc<Winding>,
) {
    let conn = Conn {
        neg,
        out: Mutex::new(writer),
        budget: Budget::new(usize::MAX, MAX_IN_FLIGHT_BYTES),
        bufs: Buffers::default(),
        broken: AtomicBool::new(false),
        on_broken,
        in_fd: reader.socket_fd(),
        quiet: AtomicBool::new(false),
        overlap: AtomicBool::new(false),
        winding,
    };
    let input = Reader::new(Input {
        r: BufReader::with_capacity(READ_BUFFER, reader),
        done: false,
        pipe: None,
        eager: EAGER_REQUESTS,
        spin: Spin::default(),
    });
    let pool = Pool { conn: &conn, input: &input, global, max: threads.max(1), started: AtomicUsize::new(1) };
    std::thread::scope(|s| {
        s.spawn(|| pool.work(s));
    });
}

/// The threads of one connection. A connection starts with one and grows, up to `max`, only
/// when a thread takes a request while every thread has one: so there is about one thread per
/// request the client keeps in flight, plus the one waiting for the next. A client with 4
/// requests in flight gets 5 threads, not 16 taking turns at the reader: on the 2-core test
/// machine those extra wake-ups doubled the p99 of reads while other connections wrote and
/// flushed (PROFILING.md).
struct Pool<'a> {
    conn: &'a Conn,
    input: &'a Reader,
    global: &'a Budget,
    max: usize,
    started: AtomicUsize,
}

impl<'a> Pool<'a> {
    fn work<'s>(&'s self, s: &'s std::thread::Scope<'s, '_>)
    where
        'a: 's,
    {
        // Threads between taking a request and having answered it (kept in the connection's
        // wind-down notice, which must not cut a connection that owes replies).
        let busy_count = &self.conn.winding.busy;
        // The steps of long requests this thread runs are the connection's (stall.rs).
        let _steps = crate::progress::attach(self.conn.winding.steps());
        while let Some((req, payload, cost)) = next_request(self.conn, self.input, self.global, busy_count) {
            let running = self.conn.winding.begin();
            let busy = running.now;
            let grow = |n: usize| (busy >= n && n < self.max).then_some(n + 1);
            if self.started.fetch_update(Ordering::AcqRel, Ordering::Acquire, grow).is_ok() {
                s.spawn(move || self.work(s));
            }
            let n = req.payload_len(self.conn.neg.extended) as usize;
            self.conn.handle(&req, &mut &payload[..payload.len().min(n)]);
            drop(running);
            self.conn.bufs.give(payload);
            self.conn.budget.release(cost);
            self.global.release(cost);
        }
    }
}

/// Reads the next request to run (answering the ones that need no work on the spot), or
/// `None` when the connection is over. The payload's bytes are charged to both budgets. A
/// write's payload is the first [`Request::payload_len`] bytes of the returned buffer, which
/// may be longer.
///
/// Waking a thread to read on while this one runs is what lets a client that keeps several
/// requests in flight be read from; for a client at queue depth 1, which sends nothing more
/// before this request's reply, it only moves the stream between threads: a futex wake, two
/// context switches and a thread entering a read that waits, per request, on cores the client
/// needs too (PROFILING.md). So once a connection has shown no overlap for
/// [`EAGER_REQUESTS`] requests in a row, a request read while no other is counted busy and
/// nothing more waits in the stream is "quiet": no thread is woken, and this one reads the
/// next request itself once it has answered. Overlap is more in the stream after a request,
/// or more sent before a quiet request's reply (see [`Conn::send`]); either puts the
/// connection back to waking for the next [`EAGER_REQUESTS`]. So the cost of being wrong is
/// bounded: a request sent while a quiet one runs waits until that one is answered, once. A
/// new connection starts out waking.
///
/// A quiet connection's thread looks for the next request for a while before it sleeps in
/// the read (see [`Spin`]): at queue depth 1 that request comes soon. It does not look while
/// other connections have requests in flight: their threads need the CPUs more.
fn next_request(conn: &Conn, input: &Reader, global: &Budget, busy: &AtomicUsize) -> Option<(Request, Vec<u8>, u64)> {
    let mut guard = input.take();
    if conn.overlap.swap(false, Ordering::AcqRel) {
        guard.overlapped();
    }
    // This connection's requests are all answered here (it is quiet), so any request in
    // flight is another connection's.
    let spun = match conn.in_fd {
        Some(fd) if guard.eager == 0 && guard.r.buffer().is_empty() && !guard.done => {
            guard.spin.wait(fd, || global.in_flight() > 0)
        }
        _ => None,
    };
    let r = next_request_locked(conn, &mut guard, global);
    if let Some((start, caught)) = spun {
        guard.spin.adapt(start.elapsed(), caught);
    }
    // Another request still counted busy is no sign of overlap by itself: at queue depth 1
    // its thread may have sent the reply and not yet counted itself done.
    let quiet = r.as_ref().is_some_and(|(req, _, _)| reply_bound(conn, req) <= QUIET_REPLY_MAX)
        && busy.load(Ordering::Acquire) == 0
        // More waiting: bytes already buffered, or the socket readable now.
        && if !guard.r.buffer().is_empty() || guard.done || readable(conn.in_fd) {
            guard.overlapped();
            false
        } else {
            guard.eager == 0
        };
    conn.quiet.store(quiet, Ordering::Release);
    if quiet {
        drop(guard);
    } else {
        guard.eager = guard.eager.saturating_sub(1);
        input.give(guard);
    }
    r
}

/// The most bytes `req`'s reply can take: a read's data, or for block status 1024
/// descriptors of at most 16 bytes (and a chunk header) per selected context; a few dozen for
/// anything else.
fn reply_bound(conn: &Conn, req: &Request) -> u64 {
    match req.typ {
        CMD_READ => req.length,
        CMD_BLOCK_STATUS => conn.neg.contexts.len() as u64 * (1024 * 16 + 64),
        _ => 64,
    }
}

fn next_request_locked(conn: &Conn, guard: &mut Input, global: &Budget) -> Option<(Request, Vec<u8>, u64)> {
    let Input { r, done, pipe, .. } = guard;
    let extended = conn.neg.extended;
    let max = u64::from(MAX_PAYLOAD);
    loop {
        if *done || conn.broken.load(Ordering::Acquire) {
            *done = true;
            return None;
        }
        let mut h = [0u8; EXTENDED_REQUEST_SIZE];
        let h = &mut h[..request_size(extended)];
        let Some(req) = r.read_exact(h).ok().and_then(|_| parse_request(h, extended)) else {
            *done = true;
            return None;
        };
        if req.typ == CMD_DISC {
            *done = true;
            return None;
        }
        let payload_len = req.payload_len(extended);
        // Extended headers: "A server SHOULD initiate hard disconnect if a client sets the
        // NBD_CMD_FLAG_PAYLOAD_LEN flag and uses a length larger than a server's advertised
        // maximum payload length". (A compact write's payload is at most 4 GiB: it is read and
        // dropped, below, as before extended headers existed.)
        if extended && payload_len > max {
            *done = true;
            return None;
        }
        if let Some(why) = conn.winding.refusal() {
            if drain(r, payload_len).is_err() {
                *done = true;
                return None;
            }
            conn.refuse(&req, ESHUTDOWN, why);
            continue;
        }
        // A payload on a command that takes none (extended headers only; no command of ours
        // documents a payload form) is read and dropped, and the command refused.
        if payload_len > 0 && req.typ != CMD_WRITE {
            if drain(r, payload_len).is_err() {
                *done = true;
                return None;
            }
            conn.refuse(&req, EINVAL, "this command takes no payload");
            continue;
        }
        // A read over the maximum is refused without a buffer, so it is not charged: its cost
        // would exceed the global budget and hold it (and this connection) until every other
        // connection is idle.
        let cost = match req.typ {
            CMD_WRITE => payload_len,
            CMD_READ if req.length <= max => req.length,
            _ => 0,
        };
        if req.typ == CMD_WRITE && payload_len > max {
            if drain(r, cost).is_err() {
                *done = true;
                return None;
            }
            conn.refuse(&req, EINVAL, "payload larger than the advertised maximum");
            continue;
        }
        // Run here, holding the reader: its payload is still in the socket. No buffer is
        // taken for it, so nothing is charged.
        if req.typ == CMD_WRITE && payload_len >= u64::from(SPLICE_MIN) {
            let pipe = pipe.get_or_insert_with(Pipe::new).as_ref().ok();
            let mut payload = SocketPayload::new(r, pipe, payload_len as usize, &conn.winding);
            let running = conn.winding.begin();
            conn.handle(&req, &mut payload);
            drop(running);
            if payload.finish().is_err() {
                *done = true;
                return None;
            }
            continue;
        }
        let alone = conn.budget.acquire(cost);
        global.acquire_beside(cost, alone && cost <= RESERVED_BYTES);
        let mut payload = Vec::new();
        if req.typ == CMD_WRITE {
            payload = conn.bufs.take(payload_len as usize);
            if r.read_exact(&mut payload[..payload_len as usize]).is_err() {
                conn.budget.release(cost);
                global.release(cost);
                *done = true;
                return None;
            }
        }
        return Some((req, payload, cost));
    }
}

/// The request stream and the threads waiting for their turn at it. A thread that finds
/// another reading parks on a condition variable instead of contending for the stream's lock:
/// the reader holds that lock across a blocking read, and std's mutex spins before it sleeps
/// (a tenth of the server's user time in a write-and-flush loop at queue depth 1,
/// PROFILING.md).
struct Reader {
    input: Mutex<Input>,
    /// Threads parked waiting for the stream.
    idle: Mutex<usize>,
    turn: Condvar,
}

impl Reader {
    fn new(input: Input) -> Reader {
        Reader { input: Mutex::new(input), idle: Mutex::new(0), turn: Condvar::new() }
    }

    fn try_take(&self) -> Option<MutexGuard<'_, Input>> {
        match self.input.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The stream, once no other thread reads it.
    fn take(&self) -> MutexGuard<'_, Input> {
        loop {
            if let Some(g) = self.try_take() {
                return g;
            }
            let mut idle = lock(&self.idle);
            // Tried again under `idle`: a reader letting go after this takes `idle` before it
            // looks for threads to wake, so it cannot miss this one.
            if let Some(g) = self.try_take() {
                return g;
            }
            *idle += 1;
            idle = self.turn.wait(idle).unwrap_or_else(|p| p.into_inner());
            *idle -= 1;
        }
    }

    /// Lets go of the stream and wakes one parked thread to take it.
    fn give(&self, g: MutexGuard<'_, Input>) {
        drop(g);
        if *lock(&self.idle) > 0 {
            self.turn.notify_one();
        }
    }
}

fn drain(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut sink = [0u8; 64 * 1024];
    while n > 0 {
        let k = (n as usize).min(sink.len());
        r.read_exact(&mut sink[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl Conn {
    fn disk(&self) -> &dyn Disk {
        self.neg.export.disk.as_ref()
    }

    /// Sends (part of) a reply. Before a quiet request's reply, looks whether the client has
    /// sent more already: at queue depth 1 it cannot have, so if it did, it keeps requests in
    /// flight, and the next read wakes threads again (see [`next_request`]).
    fn send(&self, bytes: &[u8]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        if self.quiet.load(Ordering::Acquire) && readable(self.in_fd) {
            self.overlap.store(true, Ordering::Release);
        }
        // Waiting for the writer and writing are waits on the client (one that does not read
        // its replies fills the socket): never a stall (stall.rs).
        let sent = self.winding.on_client(|| {
            let mut w = lock(&self.out);
            w.write_all(bytes).and_then(|_| w.flush())
        });
        self.winding.replied();
        if sent.is_err() {
            self.broken.store(true, Ordering::Release);
            (self.on_broken)();
        }
    }

    /// How this connection frames the chunks of `req`'s reply.
    fn framing(&self, req: &Request) -> Framing {
        Framing::new(self.neg.extended, req)
    }

    /// Refuses a request where it is read, counted busy while its reply is sent (a reply sent
    /// to a client that does not read it is a wait on the client only within a request).
    fn refuse(&self, req: &Request, errno: u32, msg: &str) {
        let _running = self.winding.begin();
        self.send_error(req, errno, msg);
    }

    /// A reply without data. Extended headers allow no simple reply: it is one NONE chunk.
    fn send_ok(&self, req: &Request) {
        if self.neg.extended {
            let mut out = Vec::with_capacity(32);
            self.framing(req).push(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
            self.send(&out);
            return;
        }
        let mut b = [0u8; SIMPLE_REPLY_SIZE];
        simple_reply(&mut b, 0, req.cookie);
        self.send(&b);
    }

    fn send_error(&self, req: &Request, errno: u32, msg: &str) {
        if self.neg.structured {
            let mut out = Vec::with_capacity(64);
            self.framing(req).push(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &error_payload(errno, msg));
            self.send(&out);
        } else {
            let mut b = [0u8; SIMPLE_REPLY_SIZE];
            simple_reply(&mut b, errno, req.cookie);
            self.send(&b);
        }
    }

    fn allowed_flags(&self, typ: u16) -> u16 {
        let fua = if self.neg.flags & FLAG_SEND_FUA != 0 { CMD_FLAG_FUA } else { 0 };
        match typ {
            CMD_READ => fua | if self.neg.structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE if self.neg.extended => fua | CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => fua | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => fua | CMD_FLAG_REQ_ONE,
            _ => fua,
        }
    }

    /// Runs `req`; a write takes its bytes from `payload`, which may hold fewer than asked
    /// for only where the request is refused anyway.
    fn handle(&self, req: &Request, payload: &mut dyn Payload) {
        let r = self.run(req, payload);
        self.neg.export.stats.count(req.typ, req.length, r.is_ok());
        if let Err((e, msg)) = r {
            self.send_error(req, e, &msg);
        }
    }

    /// Runs one request; Ok means the reply has been sent.
    fn run(&self, req: &Request, payload: &mut dyn Payload) -> Result<(), (u32, String)> {
        let known = matches!(
            req.typ,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
        );
        if !known {
            return Err((EINVAL, format!("unknown command {}", req.typ)));
        }
        if req.flags & !self.allowed_flags(req.typ) != 0 {
            return Err((EINVAL, format!("flags {:#x} not valid for this command", req.flags)));
        }
        let disk = self.disk();
        let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && disk.is_read_only() {
            return Err((EPERM, "export is read-only".into()));
        }
        let len = req.length;
        let in_range = req.offset.checked_add(len).is_some_and(|end| end <= disk.size());
        if !in_range && req.typ != CMD_FLUSH {
            let code = if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
            return Err((code, format!("{len} bytes at {} are outside the {}-byte export", req.offset, disk.size())));
        }
        let lib = |e: Error| (errno(&e), e.for_client());
        let fua = req.flags & CMD_FLAG_FUA != 0;
        match req.typ {
            CMD_READ => return self.read(req),
            CMD_WRITE => {
                if fua && len > 0 {
                    // Durable on return, in one step where the disk can (spec §5.10).
                    disk.write_fua_from(payload, req.offset, len).map_err(lib)?;
                } else if fua {
                    disk.flush().map_err(lib)?;
                } else if len > 0 {
                    disk.write_from(payload, req.offset, len).map_err(lib)?;
                }
            }
            CMD_FLUSH => disk.flush().map_err(lib)?,
            CMD_TRIM => {
                if len > 0 {
                    disk.discard(req.offset, len).map_err(lib)?;
                }
            }
            CMD_WRITE_ZEROES => {
                let allocate = req.flags & CMD_FLAG_NO_HOLE != 0;
                if req.flags & CMD_FLAG_FAST_ZERO != 0 && !disk.zeroing_is_fast(req.offset, len, allocate) {
                    return Err((
                        ENOTSUP,
                        "this zeroing writes data (NO_HOLE, or a block only partly covered), which is not fast".into(),
                    ));
                }
                if len > 0 {
                    disk.write_zeroes(req.offset, len, allocate).map_err(lib)?;
                }
            }
            CMD_CACHE => {}
            CMD_BLOCK_STATUS => return self.block_status(req),
            _ => unreachable!("checked above"),
        }
        if fua && writes && req.typ != CMD_WRITE {
            disk.flush().map_err(lib)?;
        }
        self.send_ok(req);
        Ok(())
    }

    fn read(&self, req: &Request) -> Result<(), (u32, String)> {
        if req.length > u64::from(MAX_PAYLOAD) {
            // With structured replies (and so NBD_CMD_FLAG_DF) a read this long is one the
            // spec lets a server refuse "up front with NBD_EOVERFLOW, so a client should be
            // prepared to retry with smaller requests"; without them EOVERFLOW is not allowed.
            let code = if self.neg.structured { EOVERFLOW } else { EINVAL };
            return Err((code, format!("read of {} bytes exceeds the maximum {MAX_PAYLOAD}", req.length)));
        }
        let lib = |e: Error| (errno(&e), e.for_client());
        if !self.neg.structured {
            let n = SIMPLE_REPLY_SIZE + req.length as usize;
            return self
                .send_built(n, |out| {
                    simple_reply(out, 0, req.cookie);
                    self.disk().read_at(&mut out[SIMPLE_REPLY_SIZE..], req.offset)
                })
                .map_err(lib);
        }
        let f = self.framing(req);
        if req.length == 0 {
            let mut out = Vec::new();
            f.push(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
            self.send(&out);
            return Ok(());
        }
        let runs = if req.flags & CMD_FLAG_DF != 0 || req.length < u64::from(HOLE_SCAN_MIN) {
            vec![(req.offset, req.length, false)]
        } else {
            zero_runs(&self.all_extents(req.offset, req.length).map_err(lib)?)
        };
        let size = |&(_, len, zero): &(u64, u64, bool)| {
            if zero {
                f.hole_chunk_size()
            } else {
                f.data_header_size() + len as usize
            }
        };
        // The whole reply is built before anything is sent, so no error can follow the last
        // content chunk: it carries the DONE flag itself, no NBD_REPLY_TYPE_NONE is needed.
        let total = runs.iter().map(size).sum();
        self.send_built(total, |out| {
            let mut at = 0;
            for (i, run) in runs.iter().enumerate() {
                let &(start, len, zero) = run;
                let flags = if i + 1 == runs.len() { REPLY_FLAG_DONE } else { 0 };
                let chunk = &mut out[at..at + size(run)];
                if zero {
                    f.hole(chunk, flags, start, len as u32);
                } else {
                    f.data_header(chunk, flags, start, len as u32);
                    self.disk().read_at(&mut chunk[f.data_header_size()..], start)?;
                }
                at += chunk.len();
            }
            Ok(())
        })
        .map_err(lib)
    }

    /// Builds an `n`-byte reply in a reused buffer with `fill`, which must write every byte,
    /// and sends it if `fill` succeeds.
    fn send_built(&self, n: usize, fill: impl FnOnce(&mut [u8]) -> crate::Result<()>) -> crate::Result<()> {
        let mut out = self.bufs.take(n);
        let result = fill(&mut out[..n]);
        if result.is_ok() {
            self.send(&out[..n]);
        }
        self.bufs.give(out);
        result
    }

    /// Extents covering the whole range (the device may describe it in several calls).
    fn all_extents(&self, offset: u64, len: u64) -> crate::Result<Vec<Extent>> {
        let mut all: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let part = self.disk().extents(pos, end - pos, 1024)?;
            let Some(last) = part.last() else { break };
            pos = last.offset + last.length;
            all.extend(part);
        }
        Ok(all)
    }

    /// One chunk per selected context (the spec requires one for each), all built before any
    /// is sent: an error in one context fails the request as a whole.
    fn block_status(&self, req: &Request) -> Result<(), (u32, String)> {
        if self.neg.contexts.is_empty() {
            return Err((EINVAL, "no metadata context was negotiated".into()));
        }
        if req.length == 0 {
            return Err((EINVAL, "block status of zero bytes".into()));
        }
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { 1024 };
        let chunks = meta::block_status(self.disk(), &self.neg.contexts, req.offset, req.length, max)
            .map_err(|e| (errno(&e), e.for_client()))?;
        let f = self.framing(req);
        let mut out = Vec::new();
        for (i, (id, desc)) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() { REPLY_FLAG_DONE } else { 0 };
            f.push_block_status(&mut out, flags, *id, desc);
        }
        self.send(&out);
        Ok(())
    }
}

/// Merges extents into maximal runs that read as zeros or not: (offset, length, zero).
fn zero_runs(extents: &[Extent]) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in extents {
        let zero = e.kind.reads_zero();
        match runs.last_mut() {
            Some(last) if last.2 == zero && last.0 + last.1 == e.offset => last.1 += e.length,
            _ => runs.push((e.offset, e.length, zero)),
        }
    }
    runs
}
