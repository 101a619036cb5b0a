//! `image_ops`: a structured fuzzer. The input picks a geometry, an optional raw base, zero to
//! two frozen cowdisk layers (each written through a chain over the ones below it, so they hold
//! data and whiteouts; each with its own chunk size, virtual size and data checksums or not),
//! and then a sequence of operations on a writable top, all on in-memory storage. After every step the device is checked against a byte model, like tests/model.rs:
//! reads return the model, extents that say "zero" are zeros in the model, a clean close and
//! reopen keeps everything, and a simulated crash (reopening a copy of the storage taken
//! between two operations, without close) leaves every 4 KiB block holding either what it held
//! at the last flush or one of the versions it was given since. Any difference panics.

use super::{check_extents, pattern, read_all, span, Bytes, Model};
use cowdisk::device::{DiskExtents, DiskFlush, DiskRead, DiskWrite, DiskZero};
use cowdisk::format::Geometry;
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::MemStorage;
use cowdisk::Chain;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const SIZES: [u64; 5] = [3 * 4096 + 512, 65536, 196_608, 512 * 1024 + 4096 + 512, (1 << 20) + 512];
const SHIFTS: [u32; 7] = [12, 13, 14, 15, 16, 17, 21];
const BASE_LENS: [u64; 4] = [1000, 65536, 300_000, 1536 * 1024];
const MAX_OPS: usize = 48;
const MAX_LOWER_OPS: usize = 8;
const MAX_IO: u64 = 160 * 1024;
const BLOCK: u64 = 4096;

/// The layers under the top, kept across reopen and crash.
struct Below {
    lowers: Vec<Arc<Image>>,
    base: Option<(Arc<MemStorage>, u64)>,
}

impl Below {
    fn raw(&self) -> Option<RawImage> {
        self.base.as_ref().map(|(s, len)| RawImage::on(s.clone(), Path::new("base.raw"), *len))
    }
}

struct World {
    chain: Option<Chain>,
    top: Arc<MemStorage>,
    model: Model,
    /// Blocks changed since the last flush: every version each has had, oldest (flushed) first.
    history: HashMap<u64, Vec<Vec<u8>>>,
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
fn assemble(s: &Arc<MemStorage>, lowers: Vec<Arc<Image>>, base: Option<Arc<RawImage>>, what: &str) -> Chain {
    let img = Image::open_on(s.clone(), Path::new("top.cow"), OpenOptions::writable())
        .unwrap_or_else(|e| panic!("{what}: top does not open: {e}"));
    Chain::assemble_shared(img, lowers, base)
}

/// What the fuzz target runs.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let setup = b.u8();
    let size = SIZES[usize::from(setup) % SIZES.len()];
    let top_sel = b.u8();
    let top_shift = SHIFTS[usize::from(top_sel & 7) % SHIFTS.len()];
    let base_sel = b.u8();
    let base = if base_sel & 1 == 1 {
        let i = usize::from(base_sel >> 1) % BASE_LENS.len();
        Some((Arc::new(MemStorage::from_bytes(base_bytes(i).to_vec())), BASE_LENS[i]))
    } else {
        None
    };
    let mut below = Below { lowers: Vec::new(), base };
    // The model of the device so far: the raw base (its whole length), then each layer's view,
    // which is its own size: a shorter layer cuts what is below it off, a longer one reads
    // zeros past the end of what is below it (format-spec.md §6, reads rule 1 and 3).
    let mut model = Model { bytes: below.base.as_ref().map(|(s, _)| s.snapshot()).unwrap_or_default() };

    // Frozen layers, bottom first; `lowers[0]` is always the one directly under the next layer.
    // Each picks its chunk size, its virtual size (the top's or another) and data checksums.
    let n_lowers = (setup >> 4) % 3;
    for i in 0..n_lowers {
        let sel = b.u8();
        let shift = SHIFTS[usize::from(sel & 7) % SHIFTS.len()];
        let lsize = SIZES.get(usize::from((sel >> 3) & 7)).copied().unwrap_or(size);
        let s = Arc::new(MemStorage::new());
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

    let top = Arc::new(MemStorage::new());
    let g = geometry(size, top_shift, top_sel & 0x80 != 0);
    model.bytes.resize(size as usize, 0);
    let img = Image::create_on(top.clone(), Path::new("top.cow"), g, None, uuid(0xff)).expect("create top");
    let raw = below.raw();
    let chain = Chain::assemble_shared(img, std::mem::take(&mut below.lowers), raw.map(Arc::new));
    let got = read_all(&chain).expect("read new top");
    model.assert_range(&got, 0, "new top over the lower layers");
    let mut w = World { chain: Some(chain), top, model, history: HashMap::new(), size };

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
        if len == 0 {
            f(&mut self.model.bytes);
            return;
        }
        let first = off / BLOCK;
        let last = (off + len).div_ceil(BLOCK);
        let block = |m: &Vec<u8>, i: u64| {
            let s = (i * BLOCK) as usize;
            m[s..(s + BLOCK as usize).min(m.len())].to_vec()
        };
        for i in first..last {
            let v = block(&self.model.bytes, i);
            self.history.entry(i).or_insert_with(|| vec![v]);
        }
        f(&mut self.model.bytes);
        for i in first..last {
            let v = block(&self.model.bytes, i);
            self.history.get_mut(&i).expect("history").push(v);
        }
    }

    fn step(&mut self, b: &mut Bytes, step: usize) {
        let size = self.size;
        let cs = self.chain().top().geometry().chunk_size();
        let op = b.u8();
        match op % 10 {
            0 | 1 => {
                let (off, len) = span(b, size, cs, MAX_IO);
                let d = pattern(u64::from(b.u32()), len as usize);
                self.chain().write_at(&d, off).unwrap_or_else(|e| panic!("step {step}: write {off}+{len}: {e}"));
                self.change(off, len, |m| m[off as usize..(off + len) as usize].copy_from_slice(&d));
            }
            2..=4 => {
                let (off, len) = span(b, size, cs, size);
                let allocate = op % 10 == 3;
                let len = if allocate { len.min(MAX_IO) } else { len };
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
                self.chain().flush().unwrap_or_else(|e| panic!("step {step}: flush: {e}"));
                self.history.clear();
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
                let chain = self.chain.take().expect("chain");
                chain.close().unwrap_or_else(|e| panic!("step {step}: close: {e}"));
                let (top, lowers, base) = chain.into_layers();
                drop(top);
                self.chain = Some(assemble(&self.top, lowers, base, "reopen"));
                self.history.clear();
                self.check_all(&format!("step {step}: after close and reopen"));
            }
            _ => self.crash(step),
        }
    }

    /// Reopens a copy of the top's storage as it is now (no close, no flush), as after a power
    /// cut between two operations, and checks every block against its versions since the last
    /// flush. The recovered image then becomes the top.
    fn crash(&mut self, step: usize) {
        let copy = Arc::new(MemStorage::from_bytes(self.top.snapshot()));
        let chain = self.chain.take().expect("chain");
        let (top, lowers, base) = chain.into_layers();
        // The old top must not write anything more to the copy: it has its own storage. It is
        // dropped (closing it on the old storage), which the recovered image never sees.
        drop(top);
        let recovered = assemble(&copy, lowers, base, &format!("step {step}: crash recovery"));
        let got = read_all(&recovered).expect("read after crash");
        for (i, bytes) in got.chunks(BLOCK as usize).enumerate() {
            let i = i as u64;
            let ok = match self.history.get(&i) {
                Some(versions) => versions.iter().any(|v| v == bytes),
                None => {
                    let s = (i * BLOCK) as usize;
                    bytes == &self.model.bytes[s..s + bytes.len()]
                }
            };
            if !ok {
                let known = self.history.get(&i).map_or(1, Vec::len);
                panic!(
                    "step {step}: after a crash, block {i} (offset {}) holds none of its {known} version(s) since the last flush",
                    i * BLOCK
                );
            }
        }
        self.model.bytes = got;
        self.history.clear();
        self.top = copy;
        self.chain = Some(recovered);
    }
}
