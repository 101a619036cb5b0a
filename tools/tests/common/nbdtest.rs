//! Helpers for the NBD protocol tests (nbd_*.rs): images served by `cowdisk serve`, clients
//! negotiated the usual ways, assertions on NBD errors and on the connection staying usable,
//! block status maps, and batches of pipelined requests.

use super::nbdclient::*;
use super::*;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Size of the images most tests serve.
pub const DISK: u64 = 16 * MIB;
/// The largest payload the server advertises (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_PAYLOAD_ADVERTISED: u32 = 32 << 20;

/// Every transmission flag a writable export must advertise (SEND_DF only comes with
/// structured replies).
pub const RW_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_SEND_FAST_ZERO
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_CAN_MULTI_CONN;
/// A read-only export: no FUA, TRIM, WRITE_ZEROES or FAST_ZERO.
pub const RO_FLAGS: u16 =
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;

/// Header flag DIRTY (format-spec §2.2), in the u64 at byte 72 of a header slot (§2.1).
pub const HEADER_FLAG_DIRTY: u64 = 1 << 1;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `cowdisk create DIR/FILE --size SIZE`.
pub fn create_image(dir: &TempDir, file: &str, size: &str) -> PathBuf {
    let p = dir.join(file);
    run(Command::new(cowdisk_bin()).arg("create").arg(&p).args(["--size", size]));
    p
}

/// `cowdisk create DIR/FILE --backing BASE --backing-format raw`.
pub fn create_overlay_on_raw(dir: &TempDir, file: &str, base: &Path) -> PathBuf {
    let p = dir.join(file);
    run(Command::new(cowdisk_bin()).arg("create").arg(&p).arg("--backing").arg(base).args(["--backing-format", "raw"]));
    p
}

/// `cowdisk serve IMAGES... --socket SOCK EXTRA...`, ready when the socket accepts.
pub fn serve(images: &[&Path], sock: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<&str> = images.iter().map(|p| path_str(p)).collect();
    args.extend(["--socket", path_str(sock)]);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A fresh image of `size` served alone as export "disk".
pub struct Fixture {
    // Declared first so the server stops before the directory is removed.
    pub server: Server,
    pub image: PathBuf,
    pub sock: PathBuf,
    pub dir: TempDir,
}

pub fn fixture_with(size: &str, extra: &[&str]) -> Fixture {
    let dir = TempDir::for_test();
    let image = create_image(&dir, "disk.cow", size);
    let sock = dir.join("nbd.sock");
    let server = serve(&[&image], &sock, extra);
    Fixture { server, image, sock, dir }
}

pub fn fixture() -> Fixture {
    fixture_with("16M", &[])
}

/// Greeting + GO on `name`, simple replies.
pub fn simple_client(server: &Server, name: &str) -> NbdClient<UnixStream> {
    let mut c = server.connect();
    c.opt_go(name, &[]).expect("NBD_OPT_GO");
    c
}

/// Greeting + structured replies + base:allocation + GO on `name`.
pub fn structured_client(server: &Server, name: &str) -> NbdClient<UnixStream> {
    let mut c = server.connect();
    c.opt_structured_reply().expect("NBD_OPT_STRUCTURED_REPLY");
    let ctx = c.opt_set_meta_context(name, &[BASE_ALLOCATION]).expect("NBD_OPT_SET_META_CONTEXT");
    assert_eq!(ctx.len(), 1, "one context selected: {ctx:?}");
    c.opt_go(name, &[]).expect("NBD_OPT_GO");
    c
}

pub fn client(server: &Server, name: &str, structured: bool) -> NbdClient<UnixStream> {
    if structured {
        structured_client(server, name)
    } else {
        simple_client(server, name)
    }
}

/// The request failed with exactly NBD error `expected` (not a transport error).
#[track_caller]
pub fn assert_nbd_error<T>(result: io::Result<T>, expected: u32, what: &str) {
    match result {
        Ok(_) => panic!("{what}: succeeded, expected {} ({expected})", errno_name(expected)),
        Err(e) => match cmd_error(&e) {
            Some(ce) => assert_eq!(ce.error, expected, "{what}: expected {}, got {ce}", errno_name(expected)),
            None => panic!("{what}: expected an {} reply, got a transport error: {e}", errno_name(expected)),
        },
    }
}

/// The option failed with exactly `expected` (an NBD_REP_ERR_*).
#[track_caller]
pub fn assert_rep_error<T: std::fmt::Debug>(result: io::Result<T>, expected: u32, what: &str) {
    match result {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {}", rep_name(expected)),
        Err(e) => match rep_error(&e) {
            Some(r) => assert_eq!(r.reply_type, expected, "{what}: expected {}, got {r}", rep_name(expected)),
            None => panic!("{what}: expected {}, got a transport error: {e}", rep_name(expected)),
        },
    }
}

/// A successful read after an error proves the connection is still in sync.
#[track_caller]
pub fn assert_usable<S: NbdStream>(c: &mut NbdClient<S>, what: &str) -> Vec<u8> {
    let data = c.read(0, 4096).unwrap_or_else(|e| panic!("connection unusable after {what}: {e}"));
    assert_eq!(data.len(), 4096, "read after {what}");
    data
}

/// The server hangs up within `within`.
#[track_caller]
pub fn assert_closed_within<S: NbdStream>(c: &mut NbdClient<S>, within: Duration, what: &str) {
    let state = c.peer_state(within).unwrap_or_else(|e| panic!("{what}: checking the connection: {e}"));
    assert_eq!(state, PeerState::Closed, "{what}: the server must close the connection within {within:?}");
}

pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The flags of the header slot with the highest generation (format-spec §2).
pub fn header_flags(image: &Path) -> u64 {
    header_u64(image, 72)
}

/// The little-endian u64 at byte `at` of `image`'s current header (the valid slot with the
/// higher generation, format-spec §2).
pub fn header_u64(image: &Path, at: usize) -> u64 {
    let mut b = vec![0u8; 8192];
    File::open(image)
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap_or_else(|e| panic!("cannot read the header of {}: {e}", image.display()));
    let le64 = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let mut best: Option<(u64, u64)> = None;
    for slot in b.chunks(4096).filter(|s| is_valid_slot(s)) {
        let (generation, value) = (le64(slot, 16), le64(slot, at));
        if !matches!(best, Some((g, _)) if g >= generation) {
            best = Some((generation, value));
        }
    }
    best.unwrap_or_else(|| panic!("{}: no valid header slot", image.display())).1
}

/// Whether a 4096-byte header slot holds a header: its magic, and its checksum matches.
fn is_valid_slot(slot: &[u8]) -> bool {
    &slot[..8] == b"COWDISK\0" && crc32(&slot[..4092]).to_le_bytes() == slot[4092..4096]
}

/// Changes every valid header slot of `image` through `f` (offsets of format-spec §2.1) and
/// reseals its checksum: a header as a hostile or newer writer could have left it.
pub fn patch_header(image: &Path, f: impl Fn(&mut [u8])) {
    let mut b = std::fs::read(image).unwrap_or_else(|e| panic!("read {}: {e}", image.display()));
    for slot in b[..8192].chunks_mut(4096).filter(|s| is_valid_slot(s)) {
        f(slot);
        let crc = crc32(&slot[..4092]);
        slot[4092..].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(image, &b).unwrap_or_else(|e| panic!("write {}: {e}", image.display()));
}

/// Block status of [offset, offset+len) as (start, end, flags) runs, asking again from the
/// first byte a reply left out (the server may describe only a prefix).
pub fn status_map<S: NbdStream>(c: &mut NbdClient<S>, offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let ctx = c.meta_contexts()[0].id;
    status_maps(c, &[ctx], offset, len).remove(0)
}

/// Block status of [offset, offset+len) in each of the contexts `ids` (all selected on `c`, in
/// the order selected), as (start, end, value) runs per context. Every reply must carry one
/// chunk per context, in that order, each describing a prefix of the request; the next request
/// starts where the shortest of them ends.
pub fn status_maps<S: NbdStream>(
    c: &mut NbdClient<S>,
    ids: &[u32],
    offset: u64,
    len: u64,
) -> Vec<Vec<(u64, u64, u32)>> {
    let end = offset + len;
    let mut out = vec![Vec::new(); ids.len()];
    let mut pos = offset;
    while pos < end {
        let want = (end - pos).min(u64::from(u32::MAX)) as u32;
        let reply = c.block_status(pos, want, 0).expect("NBD_CMD_BLOCK_STATUS");
        let got: Vec<u32> = reply.iter().map(|r| r.0).collect();
        assert_eq!(got, ids, "one chunk per context, carrying the negotiated ids in order: {reply:?}");
        let total = |r: &(u32, Vec<Extent>)| r.1.iter().map(|e| u64::from(e.length)).sum::<u64>();
        let upto = pos + reply.iter().map(total).min().unwrap_or(0);
        assert!(upto > pos, "a block status chunk describes nothing at {pos}: {reply:?}");
        for (runs, (_, extents)) in out.iter_mut().zip(&reply) {
            let mut at = pos;
            for e in extents {
                let e_end = at + u64::from(e.length);
                assert!(
                    e_end <= pos + u64::from(want),
                    "descriptors exceed the {want}-byte request at {pos}: {reply:?}"
                );
                if at < upto {
                    runs.push((at, e_end.min(upto), e.flags));
                }
                at = e_end;
            }
        }
        pos = upto;
    }
    out
}

pub fn flags_at(map: &[(u64, u64, u32)], pos: u64) -> u32 {
    map.iter()
        .find(|(s, e, _)| (*s..*e).contains(&pos))
        .unwrap_or_else(|| panic!("offset {pos} not described by {map:?}"))
        .2
}

/// One request of a batch for [`send_batch`].
pub struct Req {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    pub payload: Vec<u8>,
}

impl Req {
    pub fn new(typ: u16, cookie: u64, offset: u64, length: u32, payload: Vec<u8>) -> Req {
        Req { flags: 0, typ, cookie, offset, length, payload }
    }
}

/// Sends a whole batch of requests from a second thread, leaving this one free to read
/// replies: the server stops reading requests while it cannot send replies, so a client
/// that writes a big batch before reading anything can deadlock on full socket buffers.
pub fn send_batch<S: NbdStream + Send + 'static>(
    c: &mut NbdClient<S>,
    reqs: Vec<Req>,
) -> thread::JoinHandle<io::Result<()>> {
    let mut wire = Vec::new();
    for r in reqs {
        if r.typ != NBD_CMD_DISC {
            c.expect_reply_for(r.cookie, r.typ, r.offset, r.length);
        }
        wire.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        wire.extend_from_slice(&r.flags.to_be_bytes());
        wire.extend_from_slice(&r.typ.to_be_bytes());
        wire.extend_from_slice(&r.cookie.to_be_bytes());
        wire.extend_from_slice(&r.offset.to_be_bytes());
        wire.extend_from_slice(&r.length.to_be_bytes());
        wire.extend_from_slice(&r.payload);
    }
    let mut tx = c.stream().try_clone_stream().expect("clone the client socket");
    thread::spawn(move || tx.write_all(&wire))
}

/// Runs a command that is expected to exit by itself; kills it after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!(
                "{cmd:?} still running after {timeout:?}; killed it\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// One line of `nbdinfo --map`: offset, length, type bits (the context's 32-bit value),
/// description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRun {
    pub offset: u64,
    pub length: u64,
    pub kind: u32,
    pub desc: String,
}

/// `nbdinfo --map[=CONTEXT] URI` (base:allocation without a context), parsed, with adjacent
/// runs of the same type merged (the split between block-status replies is not part of the
/// answer).
pub fn nbdinfo_map(context: Option<&str>, uri: &str) -> Vec<MapRun> {
    let flag = context.map_or("--map".to_string(), |c| format!("--map={c}"));
    let text = stdout_of(&run(tool("nbdinfo").arg(flag).arg(uri)));
    let mut runs: Vec<MapRun> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let mut num = || -> u64 {
            f.next()
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("bad nbdinfo --map line {line:?} in:\n{text}"))
        };
        let (offset, length, kind) = (num(), num(), num() as u32);
        let desc = line.split_whitespace().skip(3).collect::<Vec<_>>().join(" ");
        match runs.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.length == offset => last.length += length,
            _ => runs.push(MapRun { offset, length, kind, desc }),
        }
    }
    runs
}
