//! Deterministic test data (xorshift), checksums and byte-exact comparisons of buffers and files.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

/// xorshift64*: tiny, fast, deterministic; not for anything but test data.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero forever.
        XorShift(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Writes `size` pseudo-random bytes; same (size, seed) gives the same file,
/// and the first N bytes equal `random_bytes(N, seed)` whenever N % 8 == 0.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        left -= n as u64;
    }
    f.sync_all().unwrap_or_else(|e| panic!("cannot sync {}: {e}", path.display()));
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32_TABLE: [u32; 256] = crc32_table();

/// Incremental CRC-32 (IEEE, as zlib): start with 0, feed chunks in order.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// A fingerprint of the whole file, to tell whether it changed: 64-bit FNV-1a. Not a CRC-32:
/// a cowdisk header or map sector carries the CRC-32 of its own bytes, and a block changed
/// together with its CRC is a codeword of the CRC, so a CRC-32 of the whole file does not
/// change when only such blocks do (a header rewritten with a new generation went unseen).
pub fn file_fingerprint(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut h = FNV_START;
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if n == 0 {
            return h;
        }
        h = fnv_update(h, &buf[..n]);
    }
}

/// [`file_fingerprint`] of bytes in memory.
pub fn bytes_fingerprint(data: &[u8]) -> u64 {
    fnv_update(FNV_START, data)
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv_update(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Offset of the first differing byte, or of the end of the shorter input.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

/// Like `assert_eq!` on byte slices, without dumping megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(i) = first_difference(actual, expected) {
        let show = |s: &[u8]| s.get(i..(i + 16).min(s.len())).map(|w| format!("{w:02x?}")).unwrap_or_default();
        panic!(
            "{what}: first difference at byte {i} (lengths {} vs {} expected)\n  actual:   {}\n  expected: {}",
            actual.len(),
            expected.len(),
            show(actual),
            show(expected)
        );
    }
}

/// Streams both files; the offset of the first difference (or of the end of
/// the shorter file), or `None` if they are identical.
pub fn files_first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let mut fa = File::open(a)?;
    let mut fb = File::open(b)?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if let Some(i) = first_difference(&ba[..na], &bb[..nb]) {
            return Ok(Some(pos + i as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        pos += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[track_caller]
pub fn assert_files_equal(a: &Path, b: &Path) {
    match files_first_difference(a, b) {
        Ok(None) => {}
        Ok(Some(off)) => panic!("{} and {} differ at byte {off}", a.display(), b.display()),
        Err(e) => panic!("cannot compare {} and {}: {e}", a.display(), b.display()),
    }
}

/// Opens a file for reading and writing without truncating (e.g. a disk image).
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}
