//! `nbd_multi`: two or three NBD connections at once on one export, one chain. The chain is
//! `nbd_server`'s (a 4 KiB-chunk top over a 64 KiB-chunk layer over a raw base, 1 MiB, with
//! data, holes and whiteouts), in memory or on real files in a tmpfs directory (input bit), so
//! that writes of 128 KiB and more are spliced from the socket into the file. Each connection
//! is a Unix socket pair: the server side runs the real handshake (`Session`) and
//! `transmission::serve` with one or two threads on its own thread; the client side is the
//! harness, which sends the requests the input describes, in input order, to the connection
//! the input picks, while a reader thread per connection parses every reply.
//!
//! Requests: writes (some of 128 KiB and more, some FUA), reads (DF or not), trims, write
//! zeroes (NO_HOLE, FAST_ZERO), flushes, block status, on ranges inside a window of 64 KiB,
//! 256 KiB or the whole export so that they overlap; barriers (wait until every connection has
//! answered all it was sent); a connection closed (NBD_CMD_DISC) and opened again meanwhile.
//!
//! Checks: no panic, no hang (every wait has a deadline), every request answered exactly once
//! with a well-formed reply (simple or structured chunks ending in DONE, read chunks inside the
//! request covering it exactly once), and the contents against a sound oracle of epochs (the
//! stretches between barriers): a byte read in epoch E holds its initial value or a value some
//! write (write, trim, zeroes) gave it in epoch E or in an earlier epoch not followed by an
//! epoch in which a successful write covered it. Block status that says "zero" must be one of
//! those values too. After all connections closed, the device reads as that oracle allows, and
//! after close and reopen exactly as it read before the close.

use super::client::{be, go, meta, opt, read_option_reply, req};
use super::{nbd_server, server_panics, span, watch_server_panics, Bytes, ScratchDir};
use cowdisk::device::{Disk, DiskRead};
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::nbd::budget::Budget;
use cowdisk::nbd::handshake::{Outcome, Session, TlsMode};
use cowdisk::nbd::proto::*;
use cowdisk::nbd::{transmission, Export};
use cowdisk::storage::{FileStorage, LockMode, MemStorage, Storage};
use cowdisk::Chain;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAX_OPS: usize = 64;
/// Longest write: past 128 KiB a write is spliced from the socket.
const MAX_WRITE: u64 = 320 * 1024;
const MAX_READ: u64 = 256 * 1024;
/// How long anything may take before the harness calls it a hang.
const DEADLINE: Duration = Duration::from_secs(20);
const WINDOWS: [u64; 3] = [64 * 1024, 256 * 1024, nbd_server::DISK_SIZE];

/// Where the chain's layers live.
pub enum Backend {
    Mem(Vec<Arc<MemStorage>>),
    Files(ScratchDir),
}

/// The writable template chain of `nbd_server` on `files` or in memory, and how to reopen it.
pub fn template_chain(files: bool) -> (Chain, Backend) {
    let (base, lower, top) = nbd_server::templates();
    let base_len = base.len() as u64;
    let names = ["base.raw", "lower.cow", "top.cow"];
    let (stores, backend): (Vec<Arc<dyn Storage>>, Backend) = if files {
        let dir = ScratchDir::new("multi");
        let mut v: Vec<Arc<dyn Storage>> = Vec::new();
        for (name, bytes) in names.iter().zip([base, lower, top]) {
            std::fs::write(dir.join(name), bytes).expect("write template");
            let writable = *name == "top.cow";
            let lock = if writable { LockMode::Exclusive } else { LockMode::Shared };
            v.push(Arc::new(FileStorage::open(&dir.join(name), writable, lock).expect("open template")));
        }
        (v, Backend::Files(dir))
    } else {
        let m: Vec<Arc<MemStorage>> =
            [base, lower, top].iter().map(|b| Arc::new(MemStorage::from_bytes(b.to_vec()))).collect();
        (m.iter().map(|s| s.clone() as Arc<dyn Storage>).collect(), Backend::Mem(m))
    };
    let raw = RawImage::on(stores[0].clone(), Path::new(names[0]), base_len);
    let lower = Image::open_on(stores[1].clone(), Path::new(names[1]), OpenOptions::read_only()).expect("lower");
    let top = Image::open_on(stores[2].clone(), Path::new(names[2]), OpenOptions::writable()).expect("top");
    (Chain::assemble(top, vec![lower], Some(raw)), backend)
}

impl Backend {
    /// Reopens the top (closed or not) over the same lower layers.
    pub fn reopen(&self, lowers: Vec<Arc<Image>>, base: Option<Arc<RawImage>>) -> Chain {
        let s: Arc<dyn Storage> = match self {
            Backend::Mem(m) => m[2].clone(),
            Backend::Files(d) => {
                Arc::new(FileStorage::open(&d.join("top.cow"), true, LockMode::Exclusive).expect("reopen top file"))
            }
        };
        let top = Image::open_on(s, Path::new("top.cow"), OpenOptions::writable()).expect("reopen top");
        Chain::assemble_shared(top, lowers, base)
    }

    pub fn dir(&self) -> Option<PathBuf> {
        match self {
            Backend::Mem(_) => None,
            Backend::Files(d) => Some(d.path().to_path_buf()),
        }
    }
}

/// A request as sent, for parsing its reply.
#[derive(Clone, Copy, Debug)]
struct Sent {
    typ: u16,
    flags: u16,
    offset: u64,
    length: u32,
    epoch: u32,
}

/// What the replies said.
#[derive(Default)]
struct Replies {
    outstanding: HashMap<u64, Sent>,
    /// Error of each answered request (0: success).
    errors: HashMap<u64, u32>,
    /// Successful reads: (epoch, offset, bytes).
    reads: Vec<(u32, u64, Vec<u8>)>,
    /// Ranges block status called zero: (epoch, offset, length).
    zeros: Vec<(u32, u64, u64)>,
    answered: usize,
}

struct Shared {
    r: Mutex<Replies>,
    cv: Condvar,
}

struct Conn {
    sock: UnixStream,
    server: JoinHandle<()>,
    reader: JoinHandle<()>,
    sent: usize,
    structured: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_full(s: &mut UnixStream, buf: &mut [u8]) -> io::Result<()> {
    s.read_exact(buf)
}

/// A structured reply in progress: ranges covered (read chunks; block status: those said to
/// be zero), the read's data, its error.
type Partial = (Vec<(u64, u64)>, Vec<u8>, u32);

/// The reply parser of one connection, on its own thread until the server closes.
fn read_replies(mut s: UnixStream, structured: bool, shared: Arc<Shared>, conn: usize) {
    // Chunks of a structured reply in progress: cookie -> (bytes covered, read data, error).
    let mut partial: HashMap<u64, Partial> = HashMap::new();
    loop {
        let mut m = [0u8; 4];
        match s.read_exact(&mut m) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("connection {conn}: reading replies: {e}"),
        }
        let magic = u32::from_be_bytes(m);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            read_full(&mut s, &mut h).unwrap_or_else(|e| panic!("connection {conn}: simple reply cut: {e}"));
            let (error, cookie) = (be(&h[0..4]) as u32, be(&h[4..12]));
            let r = lock(&shared.r).outstanding.get(&cookie).copied();
            let r = r.unwrap_or_else(|| panic!("connection {conn}: simple reply for cookie {cookie}, not outstanding"));
            assert!(
                !(structured && r.typ == CMD_READ),
                "connection {conn}: simple reply to a read with structured replies negotiated"
            );
            let mut data = Vec::new();
            if r.typ == CMD_READ && error == 0 {
                data = vec![0u8; r.length as usize];
                read_full(&mut s, &mut data).unwrap_or_else(|e| panic!("connection {conn}: read data cut: {e}"));
            }
            finish(&shared, cookie, r, error, data, conn);
        } else if magic == STRUCTURED_REPLY_MAGIC {
            assert!(structured, "connection {conn}: structured reply without structured replies negotiated");
            let mut h = [0u8; 16];
            read_full(&mut s, &mut h).unwrap_or_else(|e| panic!("connection {conn}: chunk header cut: {e}"));
            let (flags, typ, cookie, len) =
                (be(&h[0..2]) as u16, be(&h[2..4]) as u16, be(&h[4..12]), be(&h[12..16]) as usize);
            assert!(len <= MAX_READ as usize + 64, "connection {conn}: chunk of {len} bytes");
            let mut p = vec![0u8; len];
            read_full(&mut s, &mut p).unwrap_or_else(|e| panic!("connection {conn}: chunk payload cut: {e}"));
            let r = lock(&shared.r).outstanding.get(&cookie).copied();
            let r = r.unwrap_or_else(|| panic!("connection {conn}: chunk for cookie {cookie}, not outstanding"));
            let st = partial.entry(cookie).or_insert_with(|| (Vec::new(), vec![0u8; r.length as usize], 0));
            match typ {
                REPLY_TYPE_NONE => assert_eq!(len, 0, "connection {conn}: NONE chunk with a payload"),
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(r.typ, CMD_READ, "connection {conn}: data chunk for {r:?}");
                    let hole = typ == REPLY_TYPE_OFFSET_HOLE;
                    assert!(len >= if hole { 12 } else { 8 }, "connection {conn}: short read chunk");
                    let off = be(&p[0..8]);
                    let n = if hole { be(&p[8..12]) } else { (len - 8) as u64 };
                    assert!(hole || len == 8 + n as usize);
                    assert!(
                        n > 0 && off >= r.offset && off + n <= r.offset + u64::from(r.length),
                        "connection {conn}: chunk {off}+{n} outside {r:?}"
                    );
                    let at = (off - r.offset) as usize;
                    if !hole {
                        st.1[at..at + n as usize].copy_from_slice(&p[8..]);
                    }
                    st.0.push((off, n));
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    assert_eq!(r.typ, CMD_BLOCK_STATUS, "connection {conn}: block status for {r:?}");
                    assert!(len >= 12 && (len - 4) % 8 == 0, "connection {conn}: block status of {len} bytes");
                    assert_eq!(be(&p[0..4]) as u32, 1, "connection {conn}: block status for another context");
                    let mut pos = r.offset;
                    for d in p[4..].chunks(8) {
                        let (n, state) = (be(&d[0..4]), be(&d[4..8]) as u32);
                        assert!(n > 0, "connection {conn}: empty block status extent");
                        if state & STATE_ZERO != 0 {
                            st.0.push((pos, n));
                        }
                        pos += n;
                    }
                    assert!(pos <= nbd_server::DISK_SIZE, "connection {conn}: block status past the export");
                    if r.flags & CMD_FLAG_REQ_ONE != 0 {
                        assert_eq!(len, 12, "connection {conn}: REQ_ONE answered with several extents");
                    }
                }
                t if t & 0x8000 != 0 => {
                    assert!(len >= 6, "connection {conn}: short error chunk");
                    let e = be(&p[0..4]) as u32;
                    assert_ne!(e, 0, "connection {conn}: error chunk with error 0");
                    assert!(6 + be(&p[4..6]) as usize <= len, "connection {conn}: error message overruns its chunk");
                    st.2 = e;
                }
                t => panic!("connection {conn}: unknown chunk type {t}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                let (covered, data, error) = partial.remove(&cookie).expect("partial");
                let mut shared_r = lock(&shared.r);
                if r.typ == CMD_READ && error == 0 {
                    let mut c = covered.clone();
                    c.sort_unstable();
                    let mut pos = r.offset;
                    for (o, n) in c {
                        assert_eq!(o, pos, "connection {conn}: read chunks overlap or leave a gap: {r:?}");
                        pos += n;
                    }
                    assert_eq!(pos, r.offset + u64::from(r.length), "connection {conn}: read reply short: {r:?}");
                }
                if r.typ == CMD_BLOCK_STATUS && error == 0 {
                    for (o, n) in covered {
                        shared_r.zeros.push((r.epoch, o, n.min(nbd_server::DISK_SIZE - o)));
                    }
                }
                drop(shared_r);
                finish(&shared, cookie, r, error, data, conn);
            }
        } else {
            panic!("connection {conn}: bad reply magic {magic:#x}");
        }
    }
}

fn finish(shared: &Shared, cookie: u64, r: Sent, error: u32, data: Vec<u8>, conn: usize) {
    let mut g = lock(&shared.r);
    g.outstanding.remove(&cookie).unwrap_or_else(|| panic!("connection {conn}: two replies for cookie {cookie}"));
    g.errors.insert(cookie, error);
    if r.typ == CMD_READ && error == 0 {
        g.reads.push((r.epoch, r.offset, data));
    }
    g.answered += 1;
    shared.cv.notify_all();
}

/// Opens connection `i`: the handshake in full, then a reader thread.
fn open_conn(
    i: usize,
    export: &Arc<Export>,
    structured: bool,
    threads: usize,
    shared: &Arc<Shared>,
    budget: &Arc<Budget>,
) -> Conn {
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    client.set_write_timeout(Some(DEADLINE)).expect("timeout");
    client.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let exports = vec![export.clone()];
    let budget = budget.clone();
    let server = std::thread::Builder::new()
        .name(format!("nbd-fuzz-conn-{i}"))
        .spawn(move || {
            let mut s = server;
            let Ok(mut session) = Session::start(&mut s, &exports, TlsMode::Off, Default::default()) else { return };
            let neg = match session.options(&mut s) {
                Ok(Outcome::Transmit(n)) => n,
                _ => return,
            };
            let r = s.try_clone().expect("clone");
            let c = s.try_clone().expect("clone");
            transmission::serve(
                Box::new(r),
                Box::new(s),
                neg,
                threads,
                &budget,
                Box::new(move || {
                    let _ = c.shutdown(Shutdown::Both);
                }),
                Default::default(),
            );
        })
        .expect("server thread");
    let mut hello = 3u32.to_be_bytes().to_vec();
    if structured {
        hello.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        hello.extend(meta(OPT_SET_META_CONTEXT, "disk", &[BASE_ALLOCATION]));
    }
    hello.extend(go(OPT_GO, "disk", &[]));
    client.write_all(&hello).expect("handshake");
    let mut g = [0u8; 18];
    client.read_exact(&mut g).expect("greeting");
    loop {
        let (o, typ, _) = read_option_reply(&mut client, 4096).expect("option reply");
        assert!(typ & (1 << 31) == 0, "connection {i}: option {o} refused ({typ:#x})");
        if o == OPT_GO && typ == REP_ACK {
            break;
        }
    }
    client.set_read_timeout(None).expect("timeout");
    let r = client.try_clone().expect("clone");
    let sh = shared.clone();
    let reader = std::thread::Builder::new()
        .name(format!("fuzz-reader-{i}"))
        .spawn(move || read_replies(r, structured, sh, i))
        .expect("reader thread");
    Conn { sock: client, server, reader, sent: 0, structured }
}

/// Waits (with a deadline) until `n` requests have been answered in all.
fn wait_answered(shared: &Shared, n: usize, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    let mut g = lock(&shared.r);
    while g.answered < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: {} of {n} requests answered after {DEADLINE:?}", g.answered);
        g = shared.cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
    }
}

/// Ends a connection: NBD_CMD_DISC, then waits for its server and reader threads.
fn close_conn(c: Conn, cookie: u64, what: &str) {
    let _ = c.sock.try_clone().and_then(|mut s| s.write_all(&req(0, CMD_DISC, cookie, 0, 0)));
    let _ = c.sock.shutdown(Shutdown::Write);
    let deadline = Instant::now() + DEADLINE;
    while !(c.server.is_finished() && c.reader.is_finished()) {
        assert!(Instant::now() < deadline, "{what}: the connection did not end {DEADLINE:?} after NBD_CMD_DISC");
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Err(p) = c.server.join() {
        std::panic::resume_unwind(p);
    }
    if let Err(p) = c.reader.join() {
        std::panic::resume_unwind(p);
    }
}

/// A write as the oracle knows it.
struct W {
    epoch: u32,
    cookie: u64,
    off: u64,
    /// `None`: zeros (trim, write zeroes).
    data: Option<Vec<u8>>,
    len: u64,
}

/// The oracle: checks `got`, read at `off` in epoch `epoch`, byte by byte. Epochs are walked
/// from `epoch` down: each write of an epoch adds its value as a candidate for the bytes it
/// covers; the successful writes of an epoch before `epoch` close their bytes to older
/// candidates. Bytes that stay open may hold their initial value.
fn check_range(writes: &[W], errors: &HashMap<u64, u32>, initial: &[u8], epoch: u32, off: u64, got: &[u8], what: &str) {
    const OPEN: u8 = 0;
    const OK: u8 = 1;
    const CLOSED: u8 = 2;
    let n = got.len();
    let mut state = vec![OPEN; n];
    let mut open = n;
    let end = off + n as u64;
    let overlap = |w: &W| (w.off.max(off), (w.off + w.len).min(end));
    for e in (0..=epoch).rev() {
        if open == 0 {
            break;
        }
        let in_epoch = writes.iter().filter(|w| w.epoch == e && w.off < end && w.off + w.len > off);
        for w in in_epoch.clone() {
            let (s, t) = overlap(w);
            let (g, st) =
                (&got[(s - off) as usize..(t - off) as usize], &mut state[(s - off) as usize..(t - off) as usize]);
            match &w.data {
                Some(d) => {
                    for ((x, v), st) in g.iter().zip(&d[(s - w.off) as usize..(t - w.off) as usize]).zip(st) {
                        if *st == OPEN && x == v {
                            *st = OK;
                            open -= 1;
                        }
                    }
                }
                None => {
                    for (x, st) in g.iter().zip(st) {
                        if *st == OPEN && *x == 0 {
                            *st = OK;
                            open -= 1;
                        }
                    }
                }
            }
        }
        if e < epoch {
            for w in in_epoch.filter(|w| errors.get(&w.cookie) == Some(&0)) {
                let (s, t) = overlap(w);
                for st in &mut state[(s - off) as usize..(t - off) as usize] {
                    if *st == OPEN {
                        *st = CLOSED;
                        open -= 1;
                    }
                }
            }
        }
    }
    for (i, st) in state.iter_mut().enumerate() {
        if *st == OPEN && got[i] == initial[off as usize + i] {
            *st = OK;
        }
    }
    if let Some(i) = state.iter().position(|&st| st != OK) {
        let b = off + i as u64;
        let writers: Vec<_> =
            writes.iter().filter(|w| w.off <= b && b < w.off + w.len).map(|w| (w.epoch, w.cookie)).collect();
        panic!(
            "{what}: byte {b} (epoch {epoch}) is {:#04x}: neither its initial {:#04x} nor what any write that could be its last gave it (writes over it, (epoch, cookie): {writers:?})",
            got[i],
            initial[b as usize]
        );
    }
}

/// What the fuzz target runs.
pub fn run(data: &[u8]) {
    watch_server_panics();
    let panics = server_panics();
    let mut b = Bytes::new(data);
    let setup = b.u8();
    let files = setup & 1 != 0;
    let n_conns = 2 + usize::from((setup >> 1) & 1);
    let window = WINDOWS[usize::from((setup >> 2) & 3) % 3];
    let chunk = if setup & 0x10 != 0 { 65536 } else { 4096 };
    let (chain, backend) = template_chain(files);
    let size = chain.size();
    let initial = super::read_all(&chain).expect("initial read");
    let chain = Arc::new(chain);
    let export = Arc::new(Export::new("disk", "", chain.clone() as Arc<dyn Disk>));
    let shared = Arc::new(Shared { r: Mutex::new(Replies::default()), cv: Condvar::new() });
    let budget = Arc::new(Budget::new(usize::MAX, 64 << 20));
    let conn_sel = b.u8();
    let mut conns: Vec<Conn> = (0..n_conns)
        .map(|i| {
            open_conn(i, &export, conn_sel >> i & 1 != 0, 1 + usize::from(conn_sel >> (i + 4) & 1), &shared, &budget)
        })
        .collect();
    let mut writes: Vec<W> = Vec::new();
    let mut epoch = 0u32;
    let mut cookie = 0u64;
    let mut total_sent = 0usize;
    for step in 0..MAX_OPS {
        if b.is_empty() {
            break;
        }
        let sel = b.u8();
        let k = usize::from(sel) % n_conns;
        let kind = (sel >> 2) % 8;
        if kind == 7 {
            if sel & 0x80 == 0 {
                // Barrier: everything sent so far is answered; a new epoch begins.
                wait_answered(&shared, total_sent, &format!("step {step}: barrier"));
                epoch += 1;
            } else {
                // Connection k goes and comes back (in the same epoch: its requests were
                // answered, the others' may still run).
                cookie += 1;
                let structured = conns[k].structured;
                let old = std::mem::replace(
                    &mut conns[k],
                    open_conn(k, &export, structured, 1 + usize::from(sel & 0x40 != 0), &shared, &budget),
                );
                close_conn(old, cookie, &format!("step {step}: reconnect"));
            }
            continue;
        }
        let flag_sel = b.u8();
        let (off, len) = span(&mut b, window.min(size), chunk, if kind <= 1 { MAX_WRITE } else { MAX_READ });
        cookie += 1;
        let structured = conns[k].structured;
        let (typ, flags, payload) = match kind {
            0 | 1 => {
                let seed = u64::from(b.u32());
                // Every other big write is long enough to be spliced.
                let len = if flag_sel & 2 != 0 { len.max(128 * 1024).min(window.min(size) - off) } else { len };
                let d = super::pattern(seed, len as usize);
                writes.push(W { epoch, cookie, off, data: Some(d.clone()), len });
                (CMD_WRITE, u16::from(flag_sel & 1), d)
            }
            2 => (CMD_READ, if structured { u16::from(flag_sel & 1) * CMD_FLAG_DF } else { 0 }, Vec::new()),
            3 => {
                writes.push(W { epoch, cookie, off, data: None, len });
                (CMD_TRIM, u16::from(flag_sel & 1), Vec::new())
            }
            4 => {
                writes.push(W { epoch, cookie, off, data: None, len });
                let f = u16::from(flag_sel & 1)
                    | (u16::from(flag_sel & 2) * CMD_FLAG_NO_HOLE / 2)
                    | (u16::from(flag_sel & 4) * CMD_FLAG_FAST_ZERO / 4);
                (CMD_WRITE_ZEROES, f, Vec::new())
            }
            5 => (CMD_FLUSH, 0, Vec::new()),
            _ if structured => (CMD_BLOCK_STATUS, u16::from(flag_sel & 1) * CMD_FLAG_REQ_ONE, Vec::new()),
            _ => (CMD_CACHE, 0, Vec::new()),
        };
        let length = if typ == CMD_WRITE {
            payload.len() as u32
        } else if typ == CMD_FLUSH {
            0
        } else {
            len as u32
        };
        let offset = if typ == CMD_FLUSH { 0 } else { off };
        lock(&shared.r).outstanding.insert(cookie, Sent { typ, flags, offset, length, epoch });
        let mut msg = req(flags, typ, cookie, offset, length);
        msg.extend_from_slice(&payload);
        conns[k].sock.write_all(&msg).unwrap_or_else(|e| panic!("step {step}: send to connection {k}: {e}"));
        conns[k].sent += 1;
        total_sent += 1;
    }
    wait_answered(&shared, total_sent, "end");
    for (i, c) in conns.into_iter().enumerate() {
        cookie += 1;
        close_conn(c, cookie, &format!("closing connection {i}"));
    }
    assert_eq!(server_panics(), panics, "a server thread panicked");
    let replies = std::mem::take(&mut *lock(&shared.r));
    assert!(replies.outstanding.is_empty(), "requests never answered: {:?}", replies.outstanding);
    for (e, off, got) in &replies.reads {
        check_range(&writes, &replies.errors, &initial, *e, *off, got, "a read during the run");
    }
    for &(e, off, len) in &replies.zeros {
        let zeros = vec![0u8; len as usize];
        check_range(&writes, &replies.errors, &initial, e, off, &zeros, "block status said zero");
    }
    let before = super::read_all(chain.as_ref()).expect("read after the connections");
    check_range(&writes, &replies.errors, &initial, epoch + 1, 0, &before, "after all connections closed");
    drop(export);
    let chain = Arc::into_inner(chain).expect("the connections let go of the chain");
    chain.close().expect("close");
    let (top, lowers, base) = chain.into_layers();
    drop(top);
    let chain = backend.reopen(lowers, base);
    let after = super::read_all(&chain).expect("read after reopen");
    if after != before {
        let i = after.iter().zip(&before).position(|(a, b)| a != b).unwrap_or(0);
        panic!("after close and reopen, byte {i} is {:#04x}, was {:#04x} before the close", after[i], before[i]);
    }
    chain.close().expect("close after reopen");
}
