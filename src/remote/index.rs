//! The two files of one remote layer in the shared cache, as bytes: the index file's header
//! and its CRC-checked records (one per manifest entry), where each lives, and the upkeep
//! done on both files under the cache's lock (eviction, and the sweep of bytes no record
//! covers). `chunks.rs` owns what a process does with them (reads, fills, publishes).

use super::manifest::{Digest, Manifest};
use crate::error::Result;
use crate::storage::Storage;
use crate::storage::{FileStorage, LockMode};
use byteorder::{ByteOrder, LittleEndian as LE};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const MAGIC: &[u8; 8] = b"CDCHUNKS";
const VERSION: u32 = 1;
/// Index header: magic, version (4), chunk shift (4), entries (8), the layer's digest (32),
/// 8 reserved.
pub(super) const HEADER: u64 = 64;
/// A record: tag (8, 0 for none), chunk index (8), length (4), CRC-32 of those 20 bytes (4),
/// last use in seconds since 1970 (4, outside the CRC: a use may rewrite it alone), reserved.
pub(super) const RECORD: u64 = 32;

/// The index header of a layer of `entries` entries in chunks of `1 << chunk_shift` bytes.
pub(super) fn index_header(chunk_shift: u32, entries: u64, digest: &Digest) -> [u8; HEADER as usize] {
    let mut header = [0u8; HEADER as usize];
    header[..8].copy_from_slice(MAGIC);
    LE::write_u32(&mut header[8..12], VERSION);
    LE::write_u32(&mut header[12..16], chunk_shift);
    LE::write_u64(&mut header[16..24], entries);
    header[24..56].copy_from_slice(digest);
    header
}

/// A record as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub tag: u64,
    pub chunk: u64,
    pub length: u32,
    pub last_use: u32,
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD as usize] {
        let mut b = [0u8; RECORD as usize];
        LE::write_u64(&mut b[0..8], self.tag);
        LE::write_u64(&mut b[8..16], self.chunk);
        LE::write_u32(&mut b[16..20], self.length);
        let crc = crc32fast::hash(&b[0..20]);
        LE::write_u32(&mut b[20..24], crc);
        LE::write_u32(&mut b[24..28], self.last_use);
        b
    }

    /// The record in `b`, or None for none (tag 0) or one that does not check.
    pub fn decode(b: &[u8]) -> Option<Record> {
        let b = b.get(..RECORD as usize)?;
        let tag = LE::read_u64(&b[0..8]);
        if tag == 0 || LE::read_u32(&b[20..24]) != crc32fast::hash(&b[0..20]) {
            return None;
        }
        Some(Record {
            tag,
            chunk: LE::read_u64(&b[8..16]),
            length: LE::read_u32(&b[16..20]),
            last_use: LE::read_u32(&b[24..28]),
        })
    }
}

pub(super) fn now_secs() -> u32 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}

/// The files of layer `name` (its digest in hex) in cache directory `dir`.
pub(super) fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = dir.join("layers");
    (d.join(format!("{name}.index")), d.join(format!("{name}.data")))
}

/// The length of the index file of a layer with manifest `m`.
pub(super) fn index_len(m: &Manifest) -> u64 {
    HEADER + m.entries.len() as u64 * RECORD
}

/// Where entry `i`'s record is in the index file.
pub(super) fn record_offset(i: usize) -> u64 {
    HEADER + i as u64 * RECORD
}

/// The space a chunk of `len` bytes counts for: whole file system blocks.
pub(super) fn footprint(len: u64) -> u64 {
    len.next_multiple_of(4096)
}

/// Every record of the index file `p`, with its entry number: what eviction chooses from.
pub(super) fn records_of(p: &Path) -> Vec<(usize, Record)> {
    std::fs::read(p).map_or_else(|_| Vec::new(), |b| records_in(&b))
}

/// Every record of an index file whose bytes are `bytes`, with its entry number.
fn records_in(bytes: &[u8]) -> Vec<(usize, Record)> {
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return Vec::new();
    }
    bytes[HEADER as usize..]
        .chunks_exact(RECORD as usize)
        .enumerate()
        .filter_map(|(i, b)| Record::decode(b).map(|r| (i, r)))
        .collect()
}

/// Removes entries `victims` (entry number, record) of the layer whose index is `ip` and data
/// `dp`: their records cleared and synced first, then their bytes punched out. The caller
/// holds the cache's lock.
pub(super) fn evict_locked(ip: &Path, dp: &Path, shift: u32, victims: &[(usize, Record)]) -> Result<()> {
    if victims.is_empty() {
        return Ok(());
    }
    let index = FileStorage::open(ip, true, LockMode::None)?;
    let data = FileStorage::open(dp, true, LockMode::None)?;
    evict_in(&index, &data, shift, victims)
}

/// [`evict_locked`] on the two files open as `index` and `data`.
///
/// When clearing the records fails (the sync above all), they are written back before the
/// error is returned, and nothing is punched: the cleared records may be in the page cache
/// and not on the disk, and a sweep (the next holder of the lock recounts after a failed
/// change) reads the page cache, so it would punch bytes that the records on the disk, read
/// after a reboot or once the pages are dropped, still name: a chunk read as zeros. Written
/// back, the records name bytes that are still there, wherever they are read from.
fn evict_in(index: &dyn Storage, data: &dyn Storage, shift: u32, victims: &[(usize, Record)]) -> Result<()> {
    let cleared = victims.iter().try_for_each(|(i, _)| index.write_at(&[0u8; RECORD as usize], record_offset(*i)));
    if let Err(e) = cleared.and_then(|()| index.sync()) {
        for (i, r) in victims {
            let _ = index.write_at(&r.encode(), record_offset(*i));
        }
        return Err(e);
    }
    for (_, r) in victims {
        data.punch(r.chunk << shift, footprint(u64::from(r.length)))?;
    }
    Ok(())
}

/// Punches every byte of the data file `dp` that no record of the index `ip` covers: what a
/// process killed between a fill's data and its record, or between an eviction's records and
/// its punches, leaves. The caller holds the cache's lock, under which every fill is written
/// and recorded, so no such byte belongs to a fill under way. Returns the bytes punched.
pub(super) fn sweep_locked(ip: &Path, dp: &Path, shift: u32) -> Result<u64> {
    let mut kept: Vec<(u64, u64)> = records_of(ip)
        .iter()
        .map(|(_, r)| (r.chunk << shift, (r.chunk << shift) + footprint(u64::from(r.length))))
        .collect();
    kept.sort_unstable();
    let data = FileStorage::open(dp, true, LockMode::None)?;
    let (mut pos, mut k, mut punched) = (0u64, 0usize, 0u64);
    while let Some(start) = data.next_data(pos)? {
        let end = data.next_hole(start)?;
        if end <= start {
            break;
        }
        // The gaps between kept ranges inside this run of data.
        let mut at = start;
        while at < end {
            while k < kept.len() && kept[k].1 <= at {
                k += 1;
            }
            let next = kept.get(k).map_or(end, |r| r.0.clamp(at, end));
            if next > at {
                data.punch(at, next - at)?;
                punched += next - at;
            }
            at = kept.get(k).map_or(end, |r| r.1.min(end)).max(next);
        }
        pos = end;
    }
    Ok(punched)
}

/// The chunk shift an index file records.
pub(super) fn shift_of(p: &Path) -> Option<u32> {
    let mut b = [0u8; 16];
    let f = std::fs::File::open(p).ok()?;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).ok()?;
    (&b[..8] == MAGIC).then(|| LE::read_u32(&b[12..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FaultKind, FaultStorage, MemStorage};
    use std::sync::Arc;

    /// Found in review (2026-12-04): an eviction whose sync of the cleared records failed left
    /// them cleared in the page cache only; the sweep that follows a failed change punched the
    /// bytes those records still named on the disk. The records are now written back.
    #[test]
    fn an_eviction_whose_sync_failed_leaves_its_records_and_their_bytes() {
        let shift = 12;
        let recs: Vec<(usize, Record)> =
            (0..3u64).map(|c| (c as usize, Record { tag: 10 + c, chunk: c, length: 4096, last_use: 1 })).collect();
        let mem = Arc::new(MemStorage::new());
        mem.write_at(&index_header(shift, 3, &[9; 32]), 0).unwrap();
        for (i, r) in &recs {
            mem.write_at(&r.encode(), record_offset(*i)).unwrap();
        }
        let data = MemStorage::new();
        data.write_at(&[5u8; 3 * 4096], 0).unwrap();
        let index = FaultStorage::new(mem.clone());
        // Two records cleared (operations 0 and 1), then the sync (2) fails.
        index.arm(2, FaultKind::Eio, false);
        assert!(evict_in(&index, &data, shift, &recs[..2]).is_err());
        assert_eq!(records_in(&mem.snapshot()), recs, "the records the eviction cleared are back");
        let mut b = vec![0u8; 3 * 4096];
        data.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 5), "nothing was punched");
        // And without a fault the two go, records first, then their bytes.
        index.arm(u64::MAX, FaultKind::Eio, false);
        evict_in(&index, &data, shift, &recs[..2]).unwrap();
        assert_eq!(records_in(&mem.snapshot()), recs[2..]);
        data.read_at(&mut b, 0).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0) && b[8192..].iter().all(|&x| x == 5));
    }

    #[test]
    fn records_round_trip_and_a_damaged_one_reads_as_none() {
        let r = Record { tag: 77, chunk: 5, length: 65536, last_use: 1_000 };
        let mut b = r.encode();
        assert_eq!(Record::decode(&b), Some(r));
        // The time of last use is outside the CRC.
        b[24] ^= 0xff;
        assert_eq!(Record::decode(&b).map(|x| x.tag), Some(77));
        b[9] ^= 1;
        assert_eq!(Record::decode(&b), None);
        assert_eq!(Record::decode(&[0u8; 32]), None);
    }
}
