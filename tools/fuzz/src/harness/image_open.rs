//! `image_open`: the input is (mostly) the bytes of an image file.
//!
//! Layout: `image ++ ops ++ ops_len (u16 LE) ++ mode (u8) ++ "OP"`. An input that does not end
//! in the two bytes "OP" is all image (no ops, mode 0), so a plain image file (the golden
//! images) is an input as it is.
//!
//! `mode` bit 0 recomputes the CRCs of both header slots, bit 1 those of the map sectors the
//! headers point at, so that mutations get past the checksums into the validation behind them.
//!
//! The image is opened on in-memory storage with `OpenOptions::inspect()` and `read_only()`
//! (which must not change a byte of it; writes must be refused) and with
//! `OpenOptions::writable()`. Each open that succeeds becomes a one-layer chain that runs the
//! ops. For devices up to [`MODEL_LIMIT`] the contents are checked against a byte model, and
//! after a clean close the image must open again and read the same.

use super::{check_extents, pattern, read_all, span, Bytes, CappedStorage, Model, MODEL_LIMIT};
use cowdisk::device::{DiskExtents, DiskFlush, DiskRead, DiskWrite, DiskZero};
use cowdisk::format::header::Header;
use cowdisk::format::{HEADER_SLOT_SIZE, MAGIC, SECTOR_SIZE};
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::{MemStorage, Storage};
use cowdisk::Chain;
use std::path::Path;
use std::sync::Arc;

pub const FIX_HEADER_CRC: u8 = 1;
pub const FIX_MAP_CRC: u8 = 2;
/// Most ops run per open.
const MAX_OPS: usize = 48;
/// Longest read or write one op does.
const MAX_IO: u64 = 256 * 1024;
/// Largest the in-memory image file may grow (see [`CappedStorage`]).
const STORAGE_CAP: u64 = 256 << 20;
/// Longest zeroing or discard: metadata work per chunk, so bounded to keep runs fast.
const MAX_ZERO: u64 = 4 << 20;

/// Marks an input that carries ops and a mode after the image.
pub const TRAILER: &[u8; 2] = b"OP";

/// Splits an input into (image bytes, op bytes, mode).
pub fn split(data: &[u8]) -> (&[u8], &[u8], u8) {
    let n = data.len();
    if n < 5 || &data[n - 2..] != TRAILER {
        return (data, &[], 0);
    }
    let mode = data[n - 3];
    let ops_len = (u16::from_le_bytes([data[n - 5], data[n - 4]]) as usize).min(n - 5);
    let body = &data[..n - 5];
    let (image, ops) = body.split_at(body.len() - ops_len);
    (image, ops, mode)
}

/// Builds an input from its parts (the inverse of [`split`]), for seeds and tests.
pub fn join(image: &[u8], ops: &[u8], mode: u8) -> Vec<u8> {
    let mut v = image.to_vec();
    v.extend_from_slice(ops);
    v.extend_from_slice(&(ops.len() as u16).to_le_bytes());
    v.push(mode);
    v.extend_from_slice(TRAILER);
    v
}

/// Recomputes checksums so that mutated fields reach the decoders behind them.
pub fn fix_checksums(b: &mut [u8], mode: u8) {
    const CRC_AT: usize = HEADER_SLOT_SIZE - 4;
    if mode & FIX_HEADER_CRC != 0 {
        for slot in 0..2 {
            let s = slot * HEADER_SLOT_SIZE;
            if b.len() >= s + HEADER_SLOT_SIZE && b[s..s + 8] == MAGIC {
                let crc = crc32(&b[s..s + CRC_AT]);
                b[s + CRC_AT..s + HEADER_SLOT_SIZE].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
    if mode & FIX_MAP_CRC != 0 {
        let mut extents = Vec::new();
        for slot in 0..2 {
            let s = slot * HEADER_SLOT_SIZE;
            if b.len() >= s + HEADER_SLOT_SIZE {
                if let Ok(h) = Header::decode(&b[s..s + HEADER_SLOT_SIZE]) {
                    extents.extend(h.map_extents);
                }
            }
        }
        let len = b.len() as u64;
        for e in extents {
            let mut off = e.offset;
            while off < e.offset.saturating_add(e.len) && off + SECTOR_SIZE as u64 <= len {
                let sec = &mut b[off as usize..off as usize + SECTOR_SIZE];
                if sec.iter().any(|&x| x != 0) {
                    let crc = crc32(&sec[4..]);
                    sec[..4].copy_from_slice(&crc.to_le_bytes());
                }
                off += SECTOR_SIZE as u64;
            }
        }
    }
}

/// CRC-32 (IEEE), bitwise: the harness must not depend on anything but cowdisk and std.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// What the fuzz target runs.
pub fn run(data: &[u8]) {
    let (image, ops, mode) = split(data);
    let mut bytes = image.to_vec();
    fix_checksums(&mut bytes, mode);
    let path = Path::new("fuzz.cow");

    // Inspection: nothing may be written, writes must be refused.
    let s = Arc::new(CappedStorage::new(bytes.clone(), STORAGE_CAP));
    if let Ok(img) = Image::open_on(s.clone(), path, OpenOptions::inspect()) {
        exercise_metadata(&img);
        let chain = Chain::assemble(img, Vec::new(), None);
        run_ops(&chain, &mut Bytes::new(ops), false);
        let _ = chain.close();
        drop(chain);
        assert!(s.inner.snapshot() == bytes, "opening with OpenOptions::inspect() changed the image");
    }

    // Read-only (what a lower layer gets): same promise.
    let s = Arc::new(CappedStorage::new(bytes.clone(), STORAGE_CAP));
    if let Ok(img) = Image::open_on(s.clone(), path, OpenOptions::read_only()) {
        drop(img);
        assert!(s.inner.snapshot() == bytes, "opening with OpenOptions::read_only() changed the image");
    }

    // Writable.
    let s = Arc::new(CappedStorage::new(bytes, STORAGE_CAP));
    let Ok(img) = Image::open_on(s.clone(), path, OpenOptions::writable()) else {
        return;
    };
    exercise_metadata(&img);
    let chain = Chain::assemble(img, Vec::new(), None);
    let model = run_ops(&chain, &mut Bytes::new(ops), true);
    let closed = chain.close();
    drop(chain);
    let (Some(model), Ok(())) = (model, closed) else {
        return;
    };
    // A cleanly closed image opens again, for inspection and for writing, and reads the same.
    for opts in [OpenOptions::inspect(), OpenOptions::writable()] {
        let again = Image::open_on(s.clone(), path, opts)
            .unwrap_or_else(|e| panic!("image closed cleanly after the ops does not open again ({opts:?}): {e}"));
        let chain = Chain::assemble(again, Vec::new(), None);
        let got = read_all(&chain).expect("read after reopen");
        model.assert_range(&got, 0, "after close and reopen");
        chain.close().expect("close after reopen");
    }
}

fn exercise_metadata(img: &Image) {
    let _ = img.header();
    let _ = img.entries();
    let _ = img.entry_count();
    let _ = img.data_bytes();
    let _ = img.free_ranges();
    let _ = img.space();
    let _ = img.next_chunk(0);
    let _ = img.repaired_on_open();
}

/// Runs ops from `b` against `chain`. With `writable`, returns the model if it stayed exact
/// (every op succeeded and the device is small enough to model).
fn run_ops(chain: &Chain, b: &mut Bytes, writable: bool) -> Option<Model> {
    let size = chain.size();
    let cs = chain.top().geometry().chunk_size();
    let mut model = if size <= MODEL_LIMIT { read_all(chain).map(|bytes| Model { bytes }) } else { None };
    for _ in 0..MAX_OPS {
        if b.is_empty() {
            break;
        }
        let op = b.u8();
        match op % 8 {
            0 => {
                let (off, len) = span(b, size, cs, MAX_IO);
                let mut buf = vec![0u8; len as usize];
                if chain.read_at(&mut buf, off).is_ok() {
                    if let Some(m) = &model {
                        m.assert_range(&buf, off, "read");
                    }
                }
            }
            1 => {
                let (off, len) = span(b, size, cs, MAX_IO);
                let data = pattern(u64::from(b.u32()), len as usize);
                let r = chain.write_at(&data, off);
                if !writable {
                    assert!(r.is_err(), "write to a read-only chain succeeded");
                    continue;
                }
                match (r, &mut model) {
                    (Ok(()), Some(m)) => m.bytes[off as usize..(off + len) as usize].copy_from_slice(&data),
                    (Err(_), _) => model = None,
                    _ => {}
                }
            }
            2..=4 => {
                let (off, len) = span(b, size, cs, MAX_ZERO);
                let (off, len) = if op % 8 == 3 { (off, len.min(MAX_IO)) } else { (off, len) };
                let r = match op % 8 {
                    2 => chain.write_zeroes(off, len, false),
                    3 => chain.write_zeroes(off, len, true),
                    _ => chain.discard(off, len),
                };
                if !writable {
                    assert!(r.is_err() || len == 0, "zeroing a read-only chain succeeded");
                    continue;
                }
                match (r, &mut model) {
                    (Ok(()), Some(m)) => m.bytes[off as usize..(off + len) as usize].fill(0),
                    (Err(_), _) => model = None,
                    _ => {}
                }
            }
            5 => {
                if chain.flush().is_err() && writable {
                    model = None;
                }
            }
            _ => {
                let whole = op & 0x80 != 0;
                let (off, len) = span(b, size, cs, u64::MAX);
                let len = if whole { size - off } else { len.max(1) };
                let max = if op & 0x40 != 0 { 1 } else { 1 + usize::from(b.u8()) * 4 };
                if let Ok(ext) = chain.extents(off, len, max) {
                    check_extents(&ext, off, len, max);
                    if let Some(m) = &model {
                        m.assert_extents(&ext, "extents");
                    }
                }
            }
        }
    }
    model
}

/// Whether `s` holds what an image file may: used by the seed maker to pick inputs.
pub fn opens(bytes: &[u8]) -> bool {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes.to_vec()));
    Image::open_on(s, Path::new("fuzz.cow"), OpenOptions::inspect()).is_ok()
}
