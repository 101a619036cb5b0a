//! `nbd_server`: the input is the raw byte stream a client sends. The handshake
//! (`Session::start` + `options`) runs over an in-memory duplex against two exports backed by
//! in-memory chains ("disk": writable, a cowdisk top over a cowdisk layer over a raw base;
//! "ro": a read-only chain). If the client reaches transmission, `transmission::serve` runs the
//! rest of the stream with one thread (even input length) or two (odd).
//!
//! Besides "no panic, no unbounded allocation", with one thread the replies are checked against
//! the requests in the stream: every request that was read in full is answered exactly once, in
//! order, with a well-formed reply, and a successful structured read describes exactly the
//! bytes asked for.

use super::pattern;
use cowdisk::device::{DiskWrite, DiskZero};
use cowdisk::format::Geometry;
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::nbd::budget::Budget;
use cowdisk::nbd::handshake::{Outcome, Session, TlsMode};
use cowdisk::nbd::transmission;
use cowdisk::nbd::Export;
use cowdisk::storage::MemStorage;
use cowdisk::Chain;
use std::io::{self, Cursor, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

pub const DISK_SIZE: u64 = 1 << 20;
const BASE_LEN: u64 = 300_000;
/// Output kept for checking; past this the replies are only counted (not checked).
const OUTPUT_CAP: usize = 64 << 20;

/// Image bytes built once: (lower layer, top layer), both closed cleanly.
pub fn templates() -> &'static (Vec<u8>, Vec<u8>, Vec<u8>) {
    static T: OnceLock<(Vec<u8>, Vec<u8>, Vec<u8>)> = OnceLock::new();
    T.get_or_init(|| {
        let base = pattern(99, BASE_LEN as usize);
        let base_s = Arc::new(MemStorage::from_bytes(base.clone()));
        let raw = || RawImage::on(base_s.clone(), Path::new("base.raw"), BASE_LEN);
        let lower_s = Arc::new(MemStorage::new());
        let g = Geometry::new(DISK_SIZE, 16).expect("geometry");
        let img = Image::create_on(lower_s.clone(), Path::new("lower.cow"), g, None, [1; 16]).expect("create lower");
        let c = Chain::assemble(img, Vec::new(), Some(raw()));
        c.write_at(&pattern(1, 70_000), 200_000).expect("write");
        c.discard(65536, 65536).expect("discard");
        c.write_at(&pattern(2, 4096), 900_000).expect("write");
        c.close().expect("close");
        drop(c);
        let top_s = Arc::new(MemStorage::new());
        let g = Geometry::new(DISK_SIZE, 12).expect("geometry");
        let img = Image::create_on(top_s.clone(), Path::new("top.cow"), g, None, [2; 16]).expect("create top");
        let lower =
            Image::open_on(lower_s.clone(), Path::new("lower.cow"), OpenOptions::read_only()).expect("open lower");
        let c = Chain::assemble(img, vec![lower], Some(raw()));
        c.write_at(&pattern(3, 10_000), 4000).expect("write");
        c.write_zeroes(204_800, 8192, false).expect("zero");
        c.write_at(&pattern(4, 5000), DISK_SIZE - 5000).expect("write");
        c.close().expect("close");
        drop(c);
        (base, lower_s.snapshot(), top_s.snapshot())
    })
}

/// A fresh pair of exports on copies of the templates.
pub fn exports() -> Vec<Arc<Export>> {
    let (base, lower, top) = templates();
    let base_s = Arc::new(MemStorage::from_bytes(base.clone()));
    let raw = || RawImage::on(base_s.clone(), Path::new("base.raw"), BASE_LEN);
    let lower_img = |opts| {
        Image::open_on(Arc::new(MemStorage::from_bytes(lower.clone())), Path::new("lower.cow"), opts)
            .expect("open lower")
    };
    let open_top = |opts| {
        Image::open_on(Arc::new(MemStorage::from_bytes(top.clone())), Path::new("top.cow"), opts).expect("open top")
    };
    let rw = Chain::assemble(open_top(OpenOptions::writable()), vec![lower_img(OpenOptions::read_only())], Some(raw()));
    let ro =
        Chain::assemble(open_top(OpenOptions::read_only()), vec![lower_img(OpenOptions::read_only())], Some(raw()));
    vec![
        Arc::new(Export::new("disk", "fuzzed writable export", Arc::new(rw))),
        Arc::new(Export::new("ro", "fuzzed read-only export", Arc::new(ro))),
    ]
}

/// The handshake's stream: reads come from the input, writes are counted and dropped.
struct Duplex<'a> {
    input: Cursor<&'a [u8]>,
    written: u64,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Collects the replies of the transmission phase (up to [`OUTPUT_CAP`]).
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<(Vec<u8>, bool)>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.0.len() + buf.len() > OUTPUT_CAP {
            g.1 = true;
        } else {
            g.0.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the fuzz target runs.
pub fn run(data: &[u8]) {
    let _ = session(data);
}

/// What one session did: `None` if it never reached transmission, else the number of
/// requests in the stream that had to be answered and the bytes of replies sent.
pub fn session(data: &[u8]) -> Option<(usize, usize)> {
    let exports = exports();
    let mut d = Duplex { input: Cursor::new(data), written: 0 };
    let Ok(mut session) = Session::start(&mut d, &exports, TlsMode::Off, Default::default()) else {
        return None;
    };
    let neg = match session.options(&mut d) {
        Ok(Outcome::Transmit(n)) => n,
        Ok(Outcome::StartTls) => panic!("STARTTLS accepted with TLS off"),
        Ok(Outcome::Closed) | Err(_) => return None,
    };
    assert!(d.written > 0, "handshake reached transmission without replying");
    let rest = data[d.input.position() as usize..].to_vec();
    let threads = 1 + data.len() % 2;
    let (structured, extended) = (neg.structured, neg.extended);
    let read_only = neg.export.disk.is_read_only();
    let size = neg.export.disk.size();
    let sink = Sink::default();
    let budget = Budget::new(usize::MAX, 256 << 20);
    transmission::serve(
        Box::new(Cursor::new(rest.clone())),
        Box::new(sink.clone()),
        neg,
        threads,
        &budget,
        Box::new(|| {}),
        Default::default(),
    );
    budget.wait_idle();
    let (out, overflow) = std::mem::take(&mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()));
    if threads == 1 && !overflow {
        check_replies(&rest, &out, Mode { structured, extended }, read_only, size);
    }
    Some((requests(&rest, extended).0.len(), out.len()))
}

#[derive(Debug, Clone, Copy)]
struct Req {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    /// The header's length: 32 bits widened, or 64 with extended headers.
    length: u64,
}

/// What the handshake agreed: chunked replies (structured or extended), and extended headers
/// (32-byte requests and replies, 64-bit lengths).
#[derive(Debug, Clone, Copy)]
struct Mode {
    structured: bool,
    extended: bool,
}

const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_MAGIC: u32 = 0x6e8a_278c;
/// The largest payload the server advertises; an extended request announcing a longer one ends
/// the connection.
const MAX_PAYLOAD: u64 = 32 << 20;
const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_DONE: u16 = 1;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_BLOCK_STATUS_EXT: u16 = 6;

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |a, &x| (a << 8) | u64::from(x))
}

/// The requests the server must answer, parsed independently from the client's stream
/// (written from the NBD protocol, not from the server's code), and a last write whose header
/// arrived but whose payload was cut off (see [`SPLICE_MIN`]).
fn requests(mut s: &[u8], extended: bool) -> (Vec<Req>, Option<Req>) {
    let (size, magic) = if extended { (32, EXTENDED_REQUEST_MAGIC) } else { (28, REQUEST_MAGIC) };
    let mut out = Vec::new();
    while s.len() >= size {
        if be(&s[0..4]) as u32 != magic {
            break;
        }
        let r = Req {
            flags: be(&s[4..6]) as u16,
            typ: be(&s[6..8]) as u16,
            cookie: be(&s[8..16]),
            offset: be(&s[16..24]),
            length: be(&s[24..size]),
        };
        s = &s[size..];
        if r.typ == CMD_DISC {
            break;
        }
        // A write's payload follows its header (also when it is refused as too large); with
        // extended headers, so does one any request flags with PAYLOAD_LEN, up to the maximum.
        let payload =
            if r.typ == CMD_WRITE || (extended && r.flags & CMD_FLAG_PAYLOAD_LEN != 0) { r.length } else { 0 };
        if extended && payload > MAX_PAYLOAD {
            break;
        }
        if payload > 0 {
            if (s.len() as u64) < payload {
                return (out, Some(r).filter(|r| r.typ == CMD_WRITE));
            }
            s = &s[payload as usize..];
        }
        out.push(r);
    }
    (out, None)
}

/// Writes at least this long run as their payload arrives (transmission's `SPLICE_MIN`): one
/// that fails its checks (range, flags, read-only) is answered before its payload is read,
/// so a client that goes away in the middle of the payload may still get that error reply.
const SPLICE_MIN: u32 = 128 * 1024;

/// Checks that `out` answers `reqs` in order, each once, with well-formed replies.
fn check_replies(input: &[u8], out: &[u8], mode: Mode, read_only: bool, size: u64) {
    let Mode { structured, extended } = mode;
    let (reqs, cut) = requests(input, extended);
    // A chunk header: its size, magic, and where its length field lies.
    let (chunk_size, chunk_magic, len_at) =
        if extended { (32, EXTENDED_MAGIC, 24..32) } else { (20, STRUCTURED_MAGIC, 16..20) };
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize, what: &str| -> &[u8] {
        assert!(
            *pos + n <= out.len(),
            "reply stream ends inside {what} (at byte {pos}, {} bytes of replies)",
            out.len()
        );
        let s = &out[*pos..*pos + n];
        *pos += n;
        s
    };
    for (i, r) in reqs.iter().enumerate() {
        let in_range = r.offset.checked_add(r.length).is_some_and(|e| e <= size);
        // With structured replies, commands other than READ may still get a simple reply;
        // with extended headers, none may.
        let simple = !extended
            && (!structured
                || (r.typ != CMD_READ && out.len() >= pos + 4 && be(&out[pos..pos + 4]) as u32 == SIMPLE_MAGIC));
        if simple {
            let h = take(&mut pos, 16, "a simple reply");
            assert_eq!(be(&h[0..4]) as u32, SIMPLE_MAGIC, "request {i} {r:?}: bad reply magic");
            let error = be(&h[4..8]) as u32;
            assert_eq!(be(&h[8..16]), r.cookie, "request {i} {r:?}: reply for another cookie");
            if r.typ == CMD_READ && error == 0 {
                assert!(in_range, "request {i} {r:?}: read outside the export succeeded");
                take(&mut pos, r.length as usize, "read data");
            }
            if r.typ == CMD_WRITE && error == 0 {
                assert!(!read_only, "request {i} {r:?}: write to a read-only export succeeded");
                assert!(in_range, "request {i} {r:?}: write outside the export succeeded");
            }
            continue;
        }
        // Structured: chunks until one with DONE.
        let mut covered = 0u64;
        let mut errored = false;
        loop {
            let h = take(&mut pos, chunk_size, "a chunk header");
            assert_eq!(be(&h[0..4]) as u32, chunk_magic, "request {i} {r:?}: bad chunk magic");
            let flags = be(&h[4..6]) as u16;
            let typ = be(&h[6..8]) as u16;
            assert_eq!(be(&h[8..16]), r.cookie, "request {i} {r:?}: chunk for another cookie");
            if extended {
                assert_eq!(be(&h[16..24]), r.offset, "request {i} {r:?}: chunk with another offset");
            }
            let len = be(&h[len_at.clone()]) as usize;
            let p = take(&mut pos, len, "a chunk payload");
            match typ {
                TYPE_NONE => assert_eq!(len, 0, "request {i}: NONE chunk with payload"),
                TYPE_OFFSET_DATA | TYPE_OFFSET_HOLE => {
                    assert_eq!(r.typ, CMD_READ, "request {i} {r:?}: data chunk for a non-read");
                    assert!(len >= if typ == TYPE_OFFSET_DATA { 8 } else { 12 });
                    let off = be(&p[0..8]);
                    let n = if typ == TYPE_OFFSET_DATA { (len - 8) as u64 } else { be(&p[8..12]) };
                    assert!(
                        off >= r.offset && off + n <= r.offset + r.length,
                        "request {i} {r:?}: chunk {off}+{n} outside the read"
                    );
                    assert!(n > 0, "request {i} {r:?}: empty data/hole chunk");
                    covered += n;
                }
                TYPE_BLOCK_STATUS_EXT => {
                    assert!(extended, "request {i} {r:?}: BLOCK_STATUS_EXT without extended headers");
                    assert_eq!(r.typ, CMD_BLOCK_STATUS, "request {i}: block status for {r:?}");
                    assert!(len >= 24 && (len - 8) % 16 == 0, "request {i}: bad block status length {len}");
                    assert_eq!(be(&p[4..8]) as usize, (len - 8) / 16, "request {i}: descriptor count");
                    let total: u64 = p[8..].chunks(16).map(|d| be(&d[0..8])).sum();
                    assert!(p[8..].chunks(16).all(|d| be(&d[8..12]) == 0), "request {i}: base: status over 32 bits");
                    assert!(total > 0, "request {i} {r:?}: block status describes nothing");
                    assert!(
                        r.offset + total <= size,
                        "request {i} {r:?}: block status past the end of the export ({total} bytes)"
                    );
                    if r.flags & (1 << 3) != 0 {
                        assert_eq!(len, 24, "request {i} {r:?}: REQ_ONE answered with several extents");
                    }
                }
                TYPE_BLOCK_STATUS => {
                    assert!(!extended, "request {i} {r:?}: BLOCK_STATUS with extended headers");
                    assert_eq!(r.typ, CMD_BLOCK_STATUS, "request {i}: block status for {r:?}");
                    assert!(len >= 12 && (len - 4) % 8 == 0, "request {i}: bad block status length {len}");
                    let total: u64 = p[4..].chunks(8).map(|d| be(&d[0..4])).sum();
                    assert!(total > 0, "request {i} {r:?}: block status describes nothing");
                    assert!(
                        r.offset + total <= size,
                        "request {i} {r:?}: block status past the end of the export ({total} bytes)"
                    );
                    if r.flags & (1 << 3) != 0 {
                        assert_eq!(len, 12, "request {i} {r:?}: REQ_ONE answered with several extents");
                    }
                }
                t if t & 0x8000 != 0 => {
                    assert!(len >= 6, "request {i}: short error chunk");
                    let msg_len = be(&p[4..6]) as usize;
                    assert!(6 + msg_len <= len, "request {i}: error message overruns its chunk");
                    assert_ne!(be(&p[0..4]), 0, "request {i}: error chunk with error 0");
                    errored = true;
                }
                t => panic!("request {i} {r:?}: unknown chunk type {t}"),
            }
            if flags & FLAG_DONE != 0 {
                break;
            }
        }
        if r.typ == CMD_READ && !errored {
            assert!(in_range, "request {i} {r:?}: read outside the export succeeded");
            assert_eq!(covered, r.length, "request {i} {r:?}: read reply covers {covered} bytes");
        }
    }
    if let Some(r) = cut.filter(|r| r.length >= u64::from(SPLICE_MIN) && pos < out.len()) {
        // At most one reply, and an error, for the write whose payload never arrived in full.
        let magic = be(&out[pos..(pos + 4).min(out.len())]) as u32;
        assert!(magic == SIMPLE_MAGIC || magic == chunk_magic, "bad reply magic {magic:#x}");
        let (error, cookie) = if magic == SIMPLE_MAGIC {
            assert!(!extended, "a simple reply with extended headers");
            let h = take(&mut pos, 16, "a reply to the cut write");
            (be(&h[4..8]) as u32, be(&h[8..16]))
        } else {
            let h = take(&mut pos, chunk_size, "a reply to the cut write");
            let (flags, typ, len) = (be(&h[4..6]) as u16, be(&h[6..8]) as u16, be(&h[len_at.clone()]) as usize);
            assert!(typ & 0x8000 != 0 && flags & FLAG_DONE != 0, "cut write {r:?} answered with chunk type {typ}");
            let p = take(&mut pos, len, "the error of the cut write");
            assert!(len >= 6, "short error chunk");
            (be(&p[0..4]) as u32, be(&h[8..16]))
        };
        assert_eq!(cookie, r.cookie, "reply for another cookie after the cut write {r:?}");
        assert_ne!(error, 0, "the write {r:?} whose payload never arrived succeeded");
    }
    assert!(
        pos == out.len(),
        "{} bytes of replies after the last request ({} requests): {:02x?}",
        out.len() - pos,
        reqs.len(),
        &out[pos..out.len().min(pos + 32)]
    );
}
