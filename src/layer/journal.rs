//! The redo journal of one image (spec §5.9): its record format, reading back the chain of
//! records a crash left, and the store that shows an image as if they were replayed.
//!
//! A small flush writes one record holding the map sectors it changed and a copy of every block
//! written since the flush before, with one durable write into an area written before (so that
//! the write needs no file-system metadata); the sectors go to their places in the file only at
//! the next checkpoint. Invariants: records lie one after another from the start of the area,
//! each numbered one more than the one before it; a record is valid only whole (its CRC) and in
//! sequence; every record from the newest valid record's `replay_from` on is replayed, in order,
//! before the map in the file is trusted.

use crate::error::{err, ErrorKind, Result};
use crate::format::header::MapExtent;
use crate::format::{BLOCK_SIZE, SECTOR_SIZE};
use crate::storage::Storage;
use byteorder::{ByteOrder, LittleEndian as LE};
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"CDJR";
/// Bytes of a record's fixed head, before its offset lists.
const HEAD: usize = 40;
const SECTOR: usize = SECTOR_SIZE;
const BLOCK: usize = BLOCK_SIZE as usize;

/// The most a writer gives a journal area (it gives 1/256 of the disk, at least 256 KiB): about
/// 800 flushes of one 4K write between checkpoints, small beside what an overlay grows by (the
/// growth target of 1.1× the bytes written counts it: 16 MiB made scattered writes over a
/// tenth of a 1 GiB disk 1.16×). With 2 MiB, 8a measured 0.84×, with 64 MiB 0.85×.
pub const AREA: u64 = 4 << 20;
/// The most block bytes one record carries; a flush with more written since the one before
/// makes a checkpoint instead (a long record costs more than the sync it would save).
pub const MAX_RECORD_DATA: u64 = 256 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// The oldest record still to be replayed (`seq + 1` for a checkpoint's record: none).
    pub replay_from: u64,
    /// Map sectors: file offset and content.
    pub sectors: Vec<(u64, [u8; SECTOR])>,
    /// Data blocks: file offset and 4096 bytes.
    pub blocks: Vec<(u64, Vec<u8>)>,
}

/// CRC-32 of the image's uuid followed by `bytes`.
fn seal(uuid: &[u8; 16], bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(uuid);
    h.update(bytes);
    h.finalize()
}

fn head_len(sectors: usize, blocks: usize) -> usize {
    (HEAD + 8 * (sectors + blocks)).next_multiple_of(SECTOR)
}

impl Record {
    /// A checkpoint's record, numbered `seq`: it names nothing, and nothing before it is to be
    /// replayed.
    pub fn checkpoint(seq: u64) -> Record {
        Record { seq, replay_from: seq + 1, sectors: Vec::new(), blocks: Vec::new() }
    }

    /// Bytes a record of `sectors` sectors and `blocks` blocks takes (a multiple of 512).
    pub fn len_for(sectors: usize, blocks: usize) -> usize {
        head_len(sectors, blocks) + SECTOR * sectors + BLOCK * blocks
    }

    /// Bytes the record takes in the area (never zero: a record has a head).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        Record::len_for(self.sectors.len(), self.blocks.len())
    }

    /// The record's bytes, sealed with the image's `uuid`: the CRC covers the uuid first, so
    /// that bytes a guest wrote (which a record copies, and which stale space in the area may
    /// hold) can never pass for a record of this image: the guest never sees its uuid.
    pub fn encode(&self, uuid: &[u8; 16]) -> Vec<u8> {
        let head = head_len(self.sectors.len(), self.blocks.len());
        let mut b = vec![0u8; self.len()];
        b[4..8].copy_from_slice(MAGIC);
        LE::write_u64(&mut b[8..], self.seq);
        LE::write_u64(&mut b[16..], self.replay_from);
        LE::write_u32(&mut b[24..], self.len() as u32);
        LE::write_u32(&mut b[28..], self.sectors.len() as u32);
        LE::write_u32(&mut b[32..], self.blocks.len() as u32);
        let offsets = self.sectors.iter().map(|s| s.0).chain(self.blocks.iter().map(|d| d.0));
        for (i, off) in offsets.enumerate() {
            LE::write_u64(&mut b[HEAD + 8 * i..], off);
        }
        let mut at = head;
        for (_, s) in &self.sectors {
            b[at..at + SECTOR].copy_from_slice(s);
            at += SECTOR;
        }
        for (_, d) in &self.blocks {
            b[at..at + BLOCK].copy_from_slice(d);
            at += BLOCK;
        }
        let crc = seal(uuid, &b[4..]);
        LE::write_u32(&mut b[0..], crc);
        b
    }

    /// The record starting with `head` (its first 512 bytes), reading the rest with `more`;
    /// `None` if it is not a whole, valid record of at most `room` bytes.
    fn read(
        head: &[u8],
        room: u64,
        uuid: &[u8; 16],
        more: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Option<Record>> {
        if head.len() < SECTOR || &head[4..8] != MAGIC {
            return Ok(None);
        }
        let len = LE::read_u32(&head[24..]) as usize;
        let (ns, nd) = (LE::read_u32(&head[28..]) as usize, LE::read_u32(&head[32..]) as usize);
        // Bounded before anything is sized by them: the record must fit in what is left.
        if ns as u64 > room / SECTOR as u64 || nd as u64 > room / BLOCK as u64 {
            return Ok(None);
        }
        let hl = head_len(ns, nd);
        if len as u64 > room || len != hl + SECTOR * ns + BLOCK * nd {
            return Ok(None);
        }
        let mut b = vec![0u8; len];
        b[..SECTOR].copy_from_slice(&head[..SECTOR]);
        more(&mut b[SECTOR..])?;
        if seal(uuid, &b[4..]) != LE::read_u32(&b[0..]) {
            return Ok(None);
        }
        let off = |i: usize| LE::read_u64(&b[HEAD + 8 * i..]);
        let mut at = hl;
        let mut sectors = Vec::with_capacity(ns);
        for i in 0..ns {
            let mut s = [0u8; SECTOR];
            s.copy_from_slice(&b[at..at + SECTOR]);
            sectors.push((off(i), s));
            at += SECTOR;
        }
        let mut blocks = Vec::with_capacity(nd);
        for i in 0..nd {
            blocks.push((off(ns + i), b[at..at + BLOCK].to_vec()));
            at += BLOCK;
        }
        Ok(Some(Record { seq: LE::read_u64(&b[8..]), replay_from: LE::read_u64(&b[16..]), sectors, blocks }))
    }
}

/// What a journal area holds: the records from its start that are valid and in sequence.
#[derive(Debug, Default)]
pub struct Chain {
    pub records: Vec<Record>,
    /// File offset just past the last of them (the area's start if there is none).
    pub end: u64,
}

impl Chain {
    /// Reads the chain from `area` of `storage`, an image whose uuid is `uuid`.
    pub fn read(storage: &dyn Storage, area: &MapExtent, uuid: &[u8; 16]) -> Result<Chain> {
        let mut chain = Chain { records: Vec::new(), end: area.offset };
        let mut head = [0u8; SECTOR];
        while chain.end + SECTOR as u64 <= area.end() {
            storage.read_at(&mut head, chain.end)?;
            let at = chain.end;
            let room = area.end() - at;
            let Some(r) = Record::read(&head, room, uuid, |rest| storage.read_at(rest, at + SECTOR as u64))? else {
                break;
            };
            if chain.records.last().is_some_and(|p| r.seq != p.seq + 1) {
                break;
            }
            chain.end += r.len() as u64;
            chain.records.push(r);
        }
        Ok(chain)
    }

    /// The records to replay, oldest first: from the newest record's `replay_from` on.
    pub fn to_replay(&self) -> &[Record] {
        let Some(last) = self.records.last() else { return &[] };
        let first = self.records.iter().position(|r| r.seq >= last.replay_from).unwrap_or(self.records.len());
        &self.records[first..]
    }

    /// The sequence number the next record takes.
    pub fn next_seq(&self) -> u64 {
        self.records.last().map_or(1, |r| r.seq + 1)
    }

    /// The bytes replaying puts where, later records over earlier ones. Every place must be
    /// one the journal may name: sectors inside a map extent, blocks at or after `data_start`
    /// outside the map extents and the journal (a record that names another place is corrupt,
    /// not replayed).
    pub fn patches(&self, extents: &[MapExtent], area: &MapExtent, data_start: u64) -> Result<BTreeMap<u64, Vec<u8>>> {
        let inside = |e: &MapExtent, off: u64, n: u64| off >= e.offset && off + n <= e.end();
        let overlaps = |e: &MapExtent, off: u64, n: u64| off < e.end() && e.offset < off + n;
        let mut out = BTreeMap::new();
        for r in self.to_replay() {
            for (off, s) in &r.sectors {
                if off % SECTOR as u64 != 0 || !extents.iter().any(|e| inside(e, *off, SECTOR as u64)) {
                    return Err(err(
                        ErrorKind::Corrupt,
                        format!("journal record {} names a map sector at {off}", r.seq),
                    ));
                }
                out.insert(*off, s.to_vec());
            }
            for (off, d) in &r.blocks {
                let n = BLOCK as u64;
                let misplaced = off % n != 0
                    || *off < data_start
                    || off.checked_add(n).map_or(true, |e| e > crate::format::header::MAX_FILE_SIZE)
                    || overlaps(area, *off, n)
                    || extents.iter().any(|e| overlaps(e, *off, n));
                if misplaced {
                    return Err(err(
                        ErrorKind::Corrupt,
                        format!("journal record {} names a data block at {off}", r.seq),
                    ));
                }
                out.insert(*off, d.clone());
            }
        }
        Ok(out)
    }
}

/// An image's file as its journal's replay would leave it, for readers that may not write
/// (spec §5.9): reads see the replayed bytes over the file's; nothing can be written.
#[derive(Debug)]
pub struct Replayed {
    inner: std::sync::Arc<dyn Storage>,
    /// Non-overlapping pieces (512 or 4096 bytes) by file offset.
    patches: BTreeMap<u64, Vec<u8>>,
}

impl Replayed {
    pub fn new(inner: std::sync::Arc<dyn Storage>, patches: BTreeMap<u64, Vec<u8>>) -> Replayed {
        Replayed { inner, patches }
    }

    /// Start and end of the first piece that ends after `offset` (pieces never overlap).
    fn piece_from(&self, offset: u64) -> Option<(u64, u64)> {
        // Pieces are at most a block long: one that ends after offset starts after offset - BLOCK.
        self.patches
            .range(offset.saturating_sub(BLOCK as u64)..)
            .map(|(&at, b)| (at, at + b.len() as u64))
            .find(|&(_, end)| end > offset)
    }
}

fn read_only() -> crate::Error {
    err(ErrorKind::ReadOnly, "an image whose journal is not replayed yet is read-only here")
}

impl Storage for Replayed {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        // Pieces are at most a block long: any that overlaps starts after offset - BLOCK.
        for (&at, bytes) in self.patches.range(offset.saturating_sub(BLOCK as u64)..end) {
            let (s, e) = (at.max(offset), (at + bytes.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&bytes[(s - at) as usize..(e - at) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only())
    }

    fn len(&self) -> Result<u64> {
        let last = self.patches.iter().next_back().map_or(0, |(at, b)| at + b.len() as u64);
        Ok(self.inner.len()?.max(last))
    }

    fn set_len(&self, _len: u64) -> Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn punch(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    // Data is the file's data and the replayed pieces (which may lie in its holes); holes are
    // what neither covers. Said exactly, not "everything may be data": `check` counts the space
    // no slot or extent uses by it, and would take every hole for leaked space.
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        let file = self.inner.next_data(offset)?;
        let piece = self.piece_from(offset).map(|(at, _)| at.max(offset));
        Ok(match (file, piece) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn next_hole(&self, offset: u64) -> Result<u64> {
        let len = self.len()?;
        let mut pos = offset;
        loop {
            if pos >= len {
                return Ok(len.max(offset));
            }
            // Past the file's end (pieces may go further) the file answers its length: never
            // before `pos`.
            let hole = self.inner.next_hole(pos)?.clamp(pos, len);
            // A piece that starts at or before the file's hole and goes past it fills it.
            match self.piece_from(hole) {
                Some((at, end)) if at <= hole && hole < len => pos = end,
                _ => return Ok(hole),
            }
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn rec(seq: u64, replay_from: u64, fill: u8) -> Record {
        Record {
            seq,
            replay_from,
            sectors: vec![(131072 + 512 * seq, [fill; SECTOR])],
            blocks: vec![(65536 + 4096 * seq, vec![fill; BLOCK])],
        }
    }

    const UUID: [u8; 16] = [7; 16];

    fn area() -> MapExtent {
        MapExtent { offset: 1 << 20, len: 1 << 20 }
    }

    fn write_chain(s: &MemStorage, recs: &[Record]) -> u64 {
        let mut at = area().offset;
        for r in recs {
            s.write_at(&r.encode(&UUID), at).unwrap();
            at += r.len() as u64;
        }
        at
    }

    #[test]
    fn the_replayed_file_tells_its_holes_from_data_with_pieces_in_holes_and_past_the_end() {
        use crate::storage::{FileStorage, LockMode};
        let p = std::env::temp_dir().join(format!("cowdisk-replayed-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        std::fs::File::create(&p).unwrap();
        let f = FileStorage::open(&p, true, LockMode::None).unwrap();
        // The file: data [0, 4096), a hole to its end at 16384.
        f.write_at(&[1u8; BLOCK], 0).unwrap();
        f.set_len(16384).unwrap();
        // Pieces: two adjacent in the hole, one past the file's end.
        let patches: BTreeMap<u64, Vec<u8>> =
            [8192u64, 12288, 16384].into_iter().map(|at| (at, vec![2u8; BLOCK])).collect();
        let r = Replayed::new(std::sync::Arc::new(f), patches);
        assert_eq!(r.len().unwrap(), 20480);
        assert_eq!(r.next_data(0).unwrap(), Some(0));
        assert_eq!(r.next_hole(0).unwrap(), 4096);
        assert_eq!(r.next_data(4096).unwrap(), Some(8192));
        assert_eq!(r.next_data(9000).unwrap(), Some(9000));
        assert_eq!(r.next_hole(8192).unwrap(), 20480, "adjacent pieces and one past the end are one run");
        assert_eq!(r.next_hole(16384).unwrap(), 20480);
        assert_eq!(r.next_data(20480).unwrap(), None);
        assert_eq!(r.next_hole(20480).unwrap(), 20480);
        assert_eq!(r.next_hole(25000).unwrap(), 25000, "never before the offset asked");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn records_round_trip_and_the_chain_ends_at_a_torn_or_stale_one() {
        let s = MemStorage::new();
        s.write_at(&vec![0u8; 2 << 20], 0).unwrap();
        let recs = [rec(7, 7, 1), rec(8, 7, 2), rec(9, 7, 3)];
        let end = write_chain(&s, &recs);
        let c = Chain::read(&s, &area(), &UUID).unwrap();
        assert_eq!(c.records, recs);
        assert_eq!(c.end, end);
        assert_eq!(c.next_seq(), 10);
        // A stale record after the chain (an older number) is not part of it.
        s.write_at(&rec(3, 3, 9).encode(&UUID), end).unwrap();
        assert_eq!(Chain::read(&s, &area(), &UUID).unwrap().records.len(), 3);
        // A torn last record (one sector of its data never written) ends the chain before it.
        let third = area().offset + (recs[0].len() + recs[1].len()) as u64;
        s.write_at(&[0u8; 512], third + 1024).unwrap();
        let c = Chain::read(&s, &area(), &UUID).unwrap();
        assert_eq!(c.records, recs[..2]);
        assert_eq!(c.to_replay(), &recs[..2]);
        // Records sealed for another image are none of this one's.
        assert!(Chain::read(&s, &area(), &[8; 16]).unwrap().records.is_empty());
    }

    #[test]
    fn replay_starts_where_the_newest_record_says_and_later_records_win() {
        let s = MemStorage::new();
        s.write_at(&vec![0u8; 2 << 20], 0).unwrap();
        let mut later = rec(12, 11, 5);
        later.blocks[0].0 = 65536 + 4096 * 11;
        write_chain(&s, &[rec(10, 11, 0), rec(11, 11, 4), later]);
        let c = Chain::read(&s, &area(), &UUID).unwrap();
        assert_eq!(c.to_replay().iter().map(|r| r.seq).collect::<Vec<_>>(), vec![11, 12]);
        let extents = [MapExtent { offset: 131072, len: 65536 }];
        let p = c.patches(&extents, &area(), 65536).unwrap();
        assert_eq!(p[&(65536 + 4096 * 11)], vec![5u8; BLOCK], "record 12 rewrote record 11's block");
        let r = Replayed::new(std::sync::Arc::new(s), p);
        let mut b = vec![0u8; 8192];
        r.read_at(&mut b, 65536 + 4096 * 11 - 2048).unwrap();
        assert_eq!(&b[..2048], &[0u8; 2048][..]);
        assert_eq!(&b[2048..6144], &[5u8; BLOCK][..]);
        // A record naming a place outside the map extents is corrupt, not replayed.
        let bad = Chain { records: vec![rec(1, 1, 1)], end: 0 };
        assert!(bad.patches(&[], &area(), 65536).is_err());
    }
}
