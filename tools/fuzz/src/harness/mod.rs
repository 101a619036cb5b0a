//! Fuzzing harnesses: each `run(data)` is what one fuzz target executes for one input. They
//! depend on nothing but `cowdisk`, `std` and `rustls` (a dependency of `cowdisk` itself), so
//! that `tests/fuzz_regressions.rs` at the repository root can include this module by path and
//! replay saved inputs without libFuzzer.
//!
//! Besides "no panic", the harnesses check what the library promises: reads return what was
//! written, extents that say "zero" read as zeros, an image closed cleanly opens again with
//! the same content. Any violation panics, which libFuzzer reports as a crash.
#![allow(dead_code)]

pub mod client;
pub mod image_open;
pub mod image_ops;
pub mod nbd_multi;
pub mod nbd_server;
pub mod nbd_tls;
pub mod ops_chain;

use cowdisk::device::{Disk, Extent};
use cowdisk::storage::{MemStorage, Storage};
use cowdisk::ErrorKind;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// A cursor over the fuzzer's bytes that never fails: past the end everything reads as zero.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), the same generator as tests/common.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Offsets and lengths that land on block and chunk edges often and anywhere otherwise.
/// Returns a range inside a device of `size` bytes (size > 0), at most `max_len` long.
pub fn span(b: &mut Bytes, size: u64, chunk: u64, max_len: u64) -> (u64, u64) {
    let sel = b.u8();
    let raw_off = b.u64();
    let raw_len = b.u32();
    let off = match sel & 3 {
        0 => raw_off % size,
        1 => (raw_off % size.div_ceil(4096)) * 4096,
        2 => ((raw_off % size.div_ceil(chunk)) * chunk).saturating_add((raw_off >> 56) % 3).saturating_sub(1),
        _ => size.saturating_sub(1 + raw_off % 8192),
    }
    .min(size - 1);
    let len = match (sel >> 2) & 3 {
        0 => u64::from(raw_len) % 8193,
        1 => (u64::from(raw_len) % 64 + 1) * 4096,
        2 => (u64::from(raw_len) % 8 + 1) * chunk,
        _ => u64::from(raw_len),
    }
    .min(max_len)
    .min(size - off);
    (off, len)
}

/// Checks the shape of an extent list returned for [offset, offset+len) with `max` allowed:
/// non-empty, contiguous from `offset`, inside the range, at most `max` entries, none empty.
pub fn check_extents(ext: &[Extent], offset: u64, len: u64, max: usize) {
    assert!(!ext.is_empty(), "extents({offset}, {len}) returned nothing");
    assert!(ext.len() <= max.max(1), "extents({offset}, {len}, max {max}) returned {} extents", ext.len());
    let mut pos = offset;
    for e in ext {
        assert_eq!(e.offset, pos, "extents({offset}, {len}) not contiguous: {ext:?}");
        assert!(e.length > 0, "extents({offset}, {len}) has an empty extent: {ext:?}");
        pos = e.offset + e.length;
    }
    assert!(pos <= offset + len, "extents({offset}, {len}) reach past the range: {ext:?}");
}

/// In-memory storage that refuses (with ENOSPC) to grow past `cap` bytes.
///
/// `MemStorage` behaves like a sparse file, so an offset far out in a hostile image (a map
/// extent past the end of the file is legal: it reads as zeros) makes the next write allocate
/// that many bytes of RAM; on a real file it is only a sparse hole. The cap keeps such inputs
/// inside libFuzzer's memory limit without hiding anything but the allocation itself.
#[derive(Debug)]
pub struct CappedStorage {
    pub inner: MemStorage,
    pub cap: u64,
}

impl CappedStorage {
    pub fn new(bytes: Vec<u8>, cap: u64) -> CappedStorage {
        CappedStorage { inner: MemStorage::from_bytes(bytes), cap }
    }

    fn check(&self, end: Option<u64>) -> cowdisk::Result<()> {
        match end {
            Some(e) if e <= self.cap => Ok(()),
            _ => Err(cowdisk::Error::new(ErrorKind::NoSpace, "fuzz storage cap reached")),
        }
    }
}

impl Storage for CappedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowdisk::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> cowdisk::Result<()> {
        self.check(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> cowdisk::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> cowdisk::Result<()> {
        self.check(Some(len))?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> cowdisk::Result<()> {
        self.inner.sync()
    }
    fn punch(&self, offset: u64, len: u64) -> cowdisk::Result<()> {
        self.inner.punch(offset, len)
    }
    fn next_data(&self, offset: u64) -> cowdisk::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> cowdisk::Result<u64> {
        self.inner.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
}

/// Reads the whole device (callers only do this for small devices).
pub fn read_all(d: &dyn Disk) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).ok().map(|_| buf)
}

/// Largest device a harness keeps a full byte model of.
pub const MODEL_LIMIT: u64 = 8 << 20;

/// A byte model of a device, for the harnesses that check contents.
pub struct Model {
    pub bytes: Vec<u8>,
}

impl Model {
    pub fn assert_range(&self, got: &[u8], off: u64, what: &str) {
        let want = &self.bytes[off as usize..off as usize + got.len()];
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{what}: device differs from the model at byte {} (read {} bytes at {off}): got {:#04x}, want {:#04x}",
                off + i as u64,
                got.len(),
                got[i],
                want[i]
            );
        }
    }

    /// Every extent that claims to read as zeros must be zeros in the model.
    pub fn assert_extents(&self, ext: &[Extent], what: &str) {
        for e in ext {
            if e.kind.reads_zero() {
                let s = &self.bytes[e.offset as usize..(e.offset + e.length) as usize];
                if let Some(i) = s.iter().position(|&x| x != 0) {
                    panic!("{what}: extent {e:?} says zeros, but byte {} is {:#04x}", e.offset + i as u64, s[i]);
                }
            }
        }
    }
}

/// Granularity of the crash oracle: after a crash (or a kill) every block holds what it held at
/// the last flush or one of the versions it was given since.
pub const CRASH_BLOCK: u64 = 4096;

/// The versions of each block changed since the last flush, oldest (the flushed one) first: the
/// crash oracle of image_ops and ops_chain.
#[derive(Default)]
pub struct History {
    blocks: HashMap<u64, Vec<Vec<u8>>>,
}

impl History {
    /// Applies `f` (a change of [off, off+len)) to `model`, recording the blocks' versions.
    pub fn change(&mut self, model: &mut Vec<u8>, off: u64, len: u64, f: impl FnOnce(&mut Vec<u8>)) {
        if len == 0 {
            f(model);
            return;
        }
        let first = off / CRASH_BLOCK;
        let last = (off + len).div_ceil(CRASH_BLOCK);
        let block = |m: &Vec<u8>, i: u64| {
            let s = (i * CRASH_BLOCK) as usize;
            m[s..(s + CRASH_BLOCK as usize).min(m.len())].to_vec()
        };
        for i in first..last {
            let v = block(model, i);
            self.blocks.entry(i).or_insert_with(|| vec![v]);
        }
        f(model);
        for i in first..last {
            let v = block(model, i);
            self.blocks.get_mut(&i).expect("history").push(v);
        }
    }

    /// Everything is durable: no block has more than one possible content.
    pub fn flushed(&mut self) {
        self.blocks.clear();
    }

    /// Checks a device read after a crash: each block is its content at the last flush or one
    /// it was given since (`model` holds the newest of each).
    pub fn check_crash(&self, model: &[u8], got: &[u8], what: &str) {
        assert_eq!(got.len(), model.len(), "{what}: the device changed size");
        for (i, bytes) in got.chunks(CRASH_BLOCK as usize).enumerate() {
            let i = i as u64;
            let ok = match self.blocks.get(&i) {
                Some(versions) => versions.iter().any(|v| v == bytes),
                None => {
                    let s = (i * CRASH_BLOCK) as usize;
                    bytes == &model[s..s + bytes.len()]
                }
            };
            if !ok {
                let known = self.blocks.get(&i).map_or(1, Vec::len);
                panic!(
                    "{what}: block {i} (offset {}) holds none of its {known} version(s) since the last flush",
                    i * CRASH_BLOCK
                );
            }
        }
    }
}

/// A directory for one input's files, on tmpfs (`/dev/shm`) where there is one, removed when
/// dropped. Directories that crashed fuzzers (dead processes) left behind are swept at the
/// first use in a process.
pub struct ScratchDir {
    path: PathBuf,
}

const SCRATCH_PREFIX: &str = "cowdisk-fuzz-";

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        static SWEEP: Once = Once::new();
        static N: AtomicU64 = AtomicU64::new(0);
        let root = scratch_root();
        SWEEP.call_once(|| {
            for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(SCRATCH_PREFIX) else { continue };
                let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        });
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{SCRATCH_PREFIX}{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("scratch dir {}: {e}", path.display()));
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Prepares the process for harnesses that run server threads:
/// - SIGPIPE is ignored, as the Rust runtime does for the `cowdisk` binary: a fuzz target has
///   no Rust `main`, and a write to a socket its peer closed would kill the fuzzer;
/// - panics on the server's own threads (unnamed connection and worker threads, and the
///   `nbd-*` ones), which would otherwise only end their thread, are counted: libFuzzer's hook
///   aborts on any panic, but a replay in `cargo test` would not notice them. Harness threads
///   have names.
pub fn watch_server_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let t = std::thread::current();
            if t.name().map_or(true, |n| n.starts_with("nbd")) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info)
        }));
    });
}

/// Panics on server threads so far (see [`watch_server_panics`]).
pub fn server_panics() -> usize {
    SERVER_PANICS.load(Ordering::SeqCst)
}

/// Whether `FUZZ_TRACE` is set: the harnesses then print each step they run (for triage with
/// `examples/replay`).
pub fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// Prints what `msg` says when tracing.
pub fn trace(msg: impl FnOnce() -> String) {
    if tracing() {
        eprintln!("{}", msg());
    }
}
