//! `image_ops` and `image_files`: a structured fuzzer. The input picks a geometry, an optional
//! raw base, zero to two frozen cowdisk layers (each written through a chain over the ones
//! below it, so they hold data and whiteouts; each with its own chunk size, virtual size and
//! data checksums or not), and then a sequence of operations on a writable top. `image_ops`
//! keeps every layer in memory; `image_files` runs the same inputs on real files in a tmpfs
//! directory (`FileStorage`: pread/pwrite, hole punching and fallocate, copy_file_range), with
//! three more operations there: writes sent over an NBD socket (those of 128 KiB and more are
//! spliced from the socket into the file), flatten of the open chain (lower layers copied
//! into the top file by copy_file_range) and a copy of a device range into another file.
//!
//! After every step the device is checked against a byte model, like tests/model.rs: reads
//! return the model, extents that say "zero" are zeros in the model, a clean close and reopen
//! keeps everything, and a simulated crash (reopening a copy of the top taken between two
//! operations, without close) leaves every 4 KiB block holding either what it held at the
//! last flush or one of the versions it was given since. Any difference panics.

use super::client::{be, req, write as nbd_write};
use super::{check_extents, pattern, read_all, span, trace, Bytes, History, Model, ScratchDir};
use cowdisk::device::{Disk, DiskExtents, DiskFlush, DiskRead, DiskWrite, DiskZero};
use cowdisk::format::Geometry;
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::nbd::budget::Budget;
use cowdisk::nbd::handshake::Negotiated;
use cowdisk::nbd::proto::*;
use cowdisk::nbd::{transmission, Export};
use cowdisk::ops::flatten::flatten_chain;
use cowdisk::storage::{FileStorage, LockMode, MemStorage, Storage};
use cowdisk::Chain;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const SIZES: [u64; 5] = [3 * 4096 + 512, 65536, 196_608, 512 * 1024 + 4096 + 512, (1 << 20) + 512];
const SHIFTS: [u32; 7] = [12, 13, 14, 15, 16, 17, 21];
const BASE_LENS: [u64; 4] = [1000, 65536, 300_000, 1536 * 1024];
const MAX_OPS: usize = 48;
const MAX_LOWER_OPS: usize = 8;
const MAX_IO: u64 = 160 * 1024;
/// Longest write sent over NBD (image_files): past 128 KiB it is spliced.
const MAX_NBD_WRITE: u64 = 512 * 1024;

/// The layers under the top, kept across reopen and crash.
struct Below {
    lowers: Vec<Arc<Image>>,
    base: Option<(Arc<dyn Storage>, u64)>,
}

/// Where the layers live: in memory, or files in a scratch directory.
enum Store {
    Mem,
    Files { dir: ScratchDir, n: usize },
}

impl Store {
    /// A new empty store for a layer.
    fn create(&mut self, name: &str) -> Arc<dyn Storage> {
        match self {
            Store::Mem => Arc::new(MemStorage::new()),
            Store::Files { dir, n } => {
                *n += 1;
                Arc::new(FileStorage::create(&dir.join(&format!("{name}-{n}"))).expect("create layer file"))
            }
        }
    }

    /// A store holding `bytes` (a raw base: shared lock, like a parent).
    fn with_bytes(&mut self, bytes: &[u8]) -> Arc<dyn Storage> {
        match self {
            Store::Mem => Arc::new(MemStorage::from_bytes(bytes.to_vec())),
            Store::Files { dir, n } => {
                *n += 1;
                let p = dir.join(&format!("base-{n}.raw"));
                std::fs::write(&p, bytes).expect("write base");
                Arc::new(FileStorage::open(&p, false, LockMode::Shared).expect("open base"))
            }
        }
    }

    /// A copy of `s` as it is now (what a crash would leave), as a new store.
    fn crash_copy(&mut self, s: &Arc<dyn Storage>) -> Arc<dyn Storage> {
        let len = s.len().expect("len");
        let mut bytes = vec![0u8; len as usize];
        s.read_at(&mut bytes, 0).expect("read for the crash copy");
        match self {
            Store::Mem => Arc::new(MemStorage::from_bytes(bytes)),
            Store::Files { dir, n } => {
                *n += 1;
                let p = dir.join(&format!("crash-{n}.cow"));
                std::fs::write(&p, &bytes).expect("write crash copy");
                Arc::new(FileStorage::open(&p, true, LockMode::Exclusive).expect("open crash copy"))
            }
        }
    }

    fn dir(&self) -> Option<&ScratchDir> {
        match self {
            Store::Mem => None,
            Store::Files { dir, .. } => Some(dir),
        }
    }
}

impl Below {
    fn raw(&self) -> Option<RawImage> {
        self.base.as_ref().map(|(s, len)| RawImage::on(s.clone(), Path::new("base.raw"), *len))
    }
}

struct World {
    chain: Option<Chain>,
    top: Arc<dyn Storage>,
    store: Store,
    model: Model,
    /// Blocks changed since the last flush: every version each has had, oldest (flushed) first.
    history: History,
    size: u64,
}

/// A geometry with data checksums where asked for and allowed (chunks of at most 256 KiB).
fn geometry(size: u64, shift: u32, checksums: bool) -> Geometry {
    let g = Geometry::new(size, shift).expect("geometry");
    g.with_data_checksums(checksums && shift <= 18).expect("checksummed geometry")
}

/// The raw base contents, made once per length (the patterns are costly under ASan).
fn base_bytes(i: usize) -> &'static [u8] {
    static BASES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    &BASES.get_or_init(|| BASE_LENS.iter().map(|&l| pattern(l + 7, l as usize)).collect())[i]
}

fn uuid(n: u8) -> [u8; 16] {
    let mut u = [0x5a; 16];
    u[0] = n;
    u
}

/// Opens the image in `s` as the writable top over `lowers` (moved in and out of the chain).
fn assemble(s: &Arc<dyn Storage>, lowers: Vec<Arc<Image>>, base: Option<Arc<RawImage>>, what: &str) -> Chain {
    let img = Image::open_on(s.clone(), Path::new("top.cow"), OpenOptions::writable())
        .unwrap_or_else(|e| panic!("{what}: top does not open: {e}"));
    Chain::assemble_shared(img, lowers, base)
}

/// What the `image_ops` fuzz target runs: everything in memory.
pub fn run(data: &[u8]) {
    run_on(data, Store::Mem);
}

/// What the `image_files` fuzz target runs: the same on files in a tmpfs directory.
pub fn run_files(data: &[u8]) {
    run_on(data, Store::Files { dir: ScratchDir::new("files"), n: 0 });
}

fn run_on(data: &[u8], mut store: Store) {
    let mut b = Bytes::new(data);
    let setup = b.u8();
    let size = SIZES[usize::from(setup) % SIZES.len()];
    let top_sel = b.u8();
    let top_shift = SHIFTS[usize::from(top_sel & 7) % SHIFTS.len()];
    let base_sel = b.u8();
    let base = if base_sel & 1 == 1 {
        let i = usize::from(base_sel >> 1) % BASE_LENS.len();
        Some((store.with_bytes(base_bytes(i)), BASE_LENS[i]))
    } else {
        None
    };
    let mut below = Below { lowers: Vec::new(), base };
    // The model of the device so far: the raw base (its whole length), then each layer's view,
    // which is its own size: a shorter layer cuts what is below it off, a longer one reads
    // zeros past the end of what is below it (format-spec.md §6, reads rule 1 and 3).
    let mut model = Model {
        bytes: if base_sel & 1 == 1 {
            base_bytes(usize::from(base_sel >> 1) % BASE_LENS.len()).to_vec()
        } else {
            Vec::new()
        },
    };

    // Frozen layers, bottom first; `lowers[0]` is always the one directly under the next layer.
    // Each picks its chunk size, its virtual size (the top's or another) and data checksums.
    let n_lowers = (setup >> 4) % 3;
    for i in 0..n_lowers {
        let sel = b.u8();
        let shift = SHIFTS[usize::from(sel & 7) % SHIFTS.len()];
        let lsize = SIZES.get(usize::from((sel >> 3) & 7)).copied().unwrap_or(size);
        let s = store.create("lower");
        let g = geometry(lsize, shift, sel & 0x80 != 0);
        model.bytes.resize(lsize as usize, 0);
        let img = Image::create_on(s.clone(), Path::new("lower.cow"), g, None, uuid(i + 1)).expect("create lower");
        let chain = Chain::assemble_shared(img, std::mem::take(&mut below.lowers), below.raw().map(Arc::new));
        let got = read_all(&chain).expect("read new lower chain");
        model.assert_range(&got, 0, "new lower layer over the layers below");
        let n_ops = usize::from(b.u8()) % (MAX_LOWER_OPS + 1);
        for _ in 0..n_ops {
            let op = b.u8();
            let cs = 1u64 << shift;
            let (off, len) = span(&mut b, lsize, cs, MAX_IO);
            match op % 3 {
                0 => {
                    let d = pattern(u64::from(b.u32()), len as usize);
                    chain.write_at(&d, off).expect("lower write");
                    model.bytes[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                1 => {
                    chain.write_zeroes(off, len, op & 0x80 != 0).expect("lower zero");
                    model.bytes[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    chain.discard(off, len).expect("lower discard");
                    model.bytes[off as usize..(off + len) as usize].fill(0);
                }
            }
        }
        let got = read_all(&chain).expect("read lower chain");
        model.assert_range(&got, 0, "building a lower layer");
        chain.close().expect("close lower");
        let (top, mut lowers, _) = chain.into_layers();
        drop(top);
        let frozen =
            Image::open_on(s, Path::new("lower.cow"), OpenOptions::read_only()).expect("reopen lower read-only");
        lowers.insert(0, Arc::new(frozen));
        below.lowers = lowers;
    }

    trace(|| {
        format!(
            "setup: size {size}, top chunk {}, base {:?}, {} lower(s)",
            1u64 << top_shift,
            below.base.as_ref().map(|b| b.1),
            below.lowers.len()
        )
    });
    let top = store.create("top");
    let g = geometry(size, top_shift, top_sel & 0x80 != 0);
    model.bytes.resize(size as usize, 0);
    let img = Image::create_on(top.clone(), Path::new("top.cow"), g, None, uuid(0xff)).expect("create top");
    let raw = below.raw();
    let chain = Chain::assemble_shared(img, std::mem::take(&mut below.lowers), raw.map(Arc::new));
    let got = read_all(&chain).expect("read new top");
    model.assert_range(&got, 0, "new top over the lower layers");
    let mut w = World { chain: Some(chain), top, store, model, history: History::default(), size };

    for step in 0..MAX_OPS {
        if b.is_empty() {
            break;
        }
        w.step(&mut b, step);
    }
    w.check_all("end");
    let chain = w.chain.take().expect("chain");
    chain.close().expect("close at end");
    let (top, lowers, base) = chain.into_layers();
    drop(top);
    let chain = assemble(&w.top, lowers, base, "reopen at end");
    let got = read_all(&chain).expect("read after final reopen");
    w.model.assert_range(&got, 0, "after the final close and reopen");
}

impl World {
    fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("chain open")
    }

    fn check_all(&self, what: &str) {
        let got = read_all(self.chain()).unwrap_or_else(|| panic!("{what}: read of the device failed"));
        self.model.assert_range(&got, 0, what);
    }

    /// Records the versions of the blocks of [off, off+len) around a change made by `f`.
    fn change(&mut self, off: u64, len: u64, f: impl FnOnce(&mut Vec<u8>)) {
        self.history.change(&mut self.model.bytes, off, len, f);
    }

    fn step(&mut self, b: &mut Bytes, step: usize) {
        let size = self.size;
        let cs = self.chain().top().geometry().chunk_size();
        trace(|| format!("step {step}: op at input byte {}", b.pos()));
        let op = b.u8();
        if self.store.dir().is_some() && op % 16 >= 13 {
            return self.file_step(b, step, op);
        }
        match op % 10 {
            0 | 1 => {
                let (off, len) = span(b, size, cs, MAX_IO);
                let d = pattern(u64::from(b.u32()), len as usize);
                trace(|| format!("step {step}: write {off}+{len}"));
                self.chain().write_at(&d, off).unwrap_or_else(|e| panic!("step {step}: write {off}+{len}: {e}"));
                self.change(off, len, |m| m[off as usize..(off + len) as usize].copy_from_slice(&d));
            }
            2..=4 => {
                let (off, len) = span(b, size, cs, size);
                let allocate = op % 10 == 3;
                let len = if allocate { len.min(MAX_IO) } else { len };
                trace(|| {
                    format!(
                        "step {step}: {} {off}+{len}",
                        ["zero", "zero+allocate", "discard"][usize::from(op % 10 - 2)]
                    )
                });
                let r = if op % 10 == 4 {
                    self.chain().discard(off, len)
                } else {
                    self.chain().write_zeroes(off, len, allocate)
                };
                r.unwrap_or_else(|e| panic!("step {step}: zero {off}+{len} ({op}): {e}"));
                self.change(off, len, |m| m[off as usize..(off + len) as usize].fill(0));
            }
            5 => {
                let (off, len) = span(b, size, cs, MAX_IO);
                let mut buf = vec![0u8; len as usize];
                self.chain().read_at(&mut buf, off).unwrap_or_else(|e| panic!("step {step}: read {off}+{len}: {e}"));
                self.model.assert_range(&buf, off, &format!("step {step}: read"));
            }
            6 => {
                trace(|| format!("step {step}: flush"));
                self.chain().flush().unwrap_or_else(|e| panic!("step {step}: flush: {e}"));
                self.history.flushed();
            }
            7 => {
                let whole = op & 0x80 != 0;
                let (off, len) = span(b, size, cs, size);
                let len = if whole { size - off } else { len.max(1) };
                let max = if op & 0x40 != 0 { 1 } else { 1 + usize::from(b.u8()) };
                let ext = self
                    .chain()
                    .extents(off, len, max)
                    .unwrap_or_else(|e| panic!("step {step}: extents {off}+{len}: {e}"));
                check_extents(&ext, off, len, max);
                self.model.assert_extents(&ext, &format!("step {step}: extents"));
            }
            8 => {
                // Clean close and reopen.
                trace(|| format!("step {step}: close and reopen"));
                let chain = self.chain.take().expect("chain");
                chain.close().unwrap_or_else(|e| panic!("step {step}: close: {e}"));
                let (top, lowers, base) = chain.into_layers();
                drop(top);
                self.chain = Some(assemble(&self.top, lowers, base, "reopen"));
                self.history.flushed();
                self.check_all(&format!("step {step}: after close and reopen"));
            }
            _ => self.crash(step),
        }
    }

    /// Reopens a copy of the top's storage as it is now (no close, no flush), as after a power
    /// cut between two operations, and checks every block against its versions since the last
    /// flush. The recovered image then becomes the top.
    fn crash(&mut self, step: usize) {
        trace(|| format!("step {step}: crash"));
        let copy = self.store.crash_copy(&self.top);
        let chain = self.chain.take().expect("chain");
        let (top, lowers, base) = chain.into_layers();
        // The old top must not write anything more to the copy: it has its own storage. It is
        // dropped (closing it on the old storage), which the recovered image never sees.
        drop(top);
        let recovered = assemble(&copy, lowers, base, &format!("step {step}: crash recovery"));
        let got = read_all(&recovered).expect("read after crash");
        self.history.check_crash(&self.model.bytes, &got, &format!("step {step}: after a crash"));
        self.model.bytes = got;
        self.history.flushed();
        self.top = copy;
        self.chain = Some(recovered);
    }

    /// The operations only `image_files` has.
    fn file_step(&mut self, b: &mut Bytes, step: usize, op: u8) {
        let size = self.size;
        let cs = self.chain().top().geometry().chunk_size();
        match op % 16 {
            13 => self.nbd_writes(b, step),
            14 => {
                // Flatten the open chain: what the top reads from below is copied into it
                // (copy_file_range from the lower files), then its parent reference goes. The
                // device does not change; a chain with anything below is flushed (one without
                // is left alone).
                trace(|| format!("step {step}: flatten the open chain"));
                flatten_chain(self.chain(), &|_, _| {}).unwrap_or_else(|e| panic!("step {step}: flatten: {e}"));
                if self.chain().depth() > 1 {
                    self.history.flushed();
                }
                self.check_all(&format!("step {step}: after flatten"));
            }
            _ => {
                // A device range copied into another file (as flatten --output raw does).
                let (off, len) = span(b, size, cs, 1 << 20);
                let dst_off = u64::from(b.u16()) * 512;
                trace(|| format!("step {step}: copy {off}+{len} to a file at {dst_off}"));
                let dir = self.store.dir().expect("files");
                let p = dir.join(&format!("copy-{step}.raw"));
                let dst = FileStorage::create(&p).expect("create copy");
                let mut buf = Vec::new();
                self.chain()
                    .copy_to(off, len, &dst, dst_off, &mut buf, |_| {})
                    .unwrap_or_else(|e| panic!("step {step}: copy {off}+{len}: {e}"));
                let mut got = vec![0u8; len as usize];
                dst.read_at(&mut got, dst_off).expect("read copy");
                self.model.assert_range(&got, off, &format!("step {step}: copy of {off}+{len} into a file"));
                drop(dst);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// One to three writes (and a read back) sent over an NBD connection to the chain.
    fn nbd_writes(&mut self, b: &mut Bytes, step: usize) {
        super::watch_server_panics();
        let size = self.size;
        let cs = self.chain().top().geometry().chunk_size();
        let n = 1 + usize::from(b.u8() % 3);
        let mut msg = Vec::new();
        let mut writes = Vec::new();
        for i in 0..n {
            let (off, len) = span(b, size, cs, MAX_NBD_WRITE);
            let seed = u64::from(b.u32());
            // Most are long enough to be spliced from the socket.
            let len = if seed & 3 != 0 { len.max(128 * 1024).min(size - off) } else { len };
            let d = pattern(seed, len as usize);
            trace(|| format!("step {step}: NBD write {off}+{len}"));
            msg.extend(nbd_write(u16::from(seed & 4 != 0), i as u64, off, &d));
            writes.push((off, d));
        }
        let (roff, rlen) = span(b, size, cs, MAX_NBD_WRITE);
        msg.extend(req(0, CMD_READ, 99, roff, rlen as u32));
        msg.extend(req(0, CMD_DISC, 100, 0, 0));
        let chain = Arc::new(self.chain.take().expect("chain"));
        let export = Arc::new(Export::new("disk", "", chain.clone() as Arc<dyn Disk>));
        let neg = Negotiated {
            export: export.clone(),
            structured: false,
            extended: false,
            contexts: Vec::new(),
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES,
        };
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        client.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let out = std::thread::scope(|sc| {
            let t = std::thread::Builder::new()
                .name("nbd-fuzz-files".into())
                .spawn_scoped(sc, || {
                    let r = server.try_clone().expect("clone");
                    let c = server.try_clone().expect("clone");
                    let budget = Budget::new(usize::MAX, 64 << 20);
                    transmission::serve(
                        Box::new(r),
                        Box::new(server),
                        neg,
                        1,
                        &budget,
                        Box::new(move || {
                            let _ = c.shutdown(Shutdown::Both);
                        }),
                        Default::default(),
                    );
                })
                .expect("server thread");
            let mut w = client.try_clone().expect("clone");
            let sender = std::thread::Builder::new()
                .name("fuzz-sender".into())
                .spawn_scoped(sc, move || {
                    let _ = w.write_all(&msg);
                    let _ = w.shutdown(Shutdown::Write);
                })
                .expect("sender");
            let mut out = Vec::new();
            client.read_to_end(&mut out).unwrap_or_else(|e| panic!("step {step}: NBD replies: {e}"));
            sender.join().expect("sender");
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
            out
        });
        drop(export);
        self.chain = Some(Arc::into_inner(chain).expect("the connection let go of the chain"));
        let mut pos = 0;
        for (i, (off, d)) in writes.iter().enumerate() {
            let h = &out[pos..pos + 16];
            assert_eq!(be(&h[0..4]) as u32, SIMPLE_REPLY_MAGIC, "step {step}: reply {i}");
            assert_eq!(be(&h[4..8]), 0, "step {step}: NBD write {i} of {} bytes at {off} failed", d.len());
            assert_eq!(be(&h[8..16]), i as u64, "step {step}: reply out of order");
            pos += 16;
            let (off, len) = (*off, d.len() as u64);
            self.change(off, len, |m| m[off as usize..(off + len) as usize].copy_from_slice(d));
        }
        let h = &out[pos..pos + 16];
        assert_eq!(be(&h[4..8]), 0, "step {step}: NBD read failed");
        assert_eq!(be(&h[8..16]), 99, "step {step}: read reply");
        let got = &out[pos + 16..];
        assert_eq!(got.len() as u64, rlen, "step {step}: read reply length");
        self.model.assert_range(got, roff, &format!("step {step}: NBD read after NBD writes"));
    }
}
