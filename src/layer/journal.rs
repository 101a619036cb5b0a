//! The redo journal of one image (spec §5.9, and the log of §5.10): its record format, reading
//! back the chain of records a crash left, and the store that shows an image as if they were
//! replayed.
//!
//! A small flush writes one record holding the map sectors it changed and a copy of every block
//! written since the flush before, with one durable write into space written before (so that
//! the write needs no file-system metadata); the sectors go to their places in the file only at
//! the next checkpoint. Invariants: without LOG, records lie one after another from the start
//! of the area; with LOG, the area holds the checkpoint's record and every record names the
//! place of the next (in the data area, where a record's blocks may be their own home). Each
//! record is numbered one more than the one before it; a record is valid only whole (its CRC)
//! and in sequence; every record from the newest valid record's `replay_from` on is replayed,
//! in order, before the map in the file is trusted.

use crate::error::{err, ErrorKind, Result};
use crate::format::header::MapExtent;
use crate::format::{BLOCK_SIZE, SECTOR_SIZE};
use crate::storage::Storage;
use byteorder::{ByteOrder, LittleEndian as LE};
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"CDJR";
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
/// The longest record in the data area a reader reads (spec §5.10): one cluster of a LOG
/// image, what a writer puts there. With [`MAX_LOG_RECORDS`] it bounds what a chain holds in
/// memory (64 MiB), whatever a file says: with 64 KiB allowed, records laid over one another
/// (each one's head among the block images of the one before) made a reader hold about
/// 512 MiB from a 32 MiB log (found by a review).
pub const MAX_LOG_RECORD: u64 = 8 << 10;
/// How far below the largest file a log's place must lie (spec §5.10: 64 KiB).
const NEXT_ROOM: u64 = 64 << 10;
/// The most records in the data area between two checkpoints (spec §5.10): a writer
/// checkpoints before it writes more, and a reader takes a chain with more as corrupt (what
/// it holds in memory stays bounded, whatever a file says).
pub const MAX_LOG_RECORDS: u64 = 8192;

/// How a record is laid out, by where it lies and the image's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Spec §5.9: in the area, a 40-byte fixed head.
    Area,
    /// Spec §5.10, in the area of a LOG image: a 48-byte fixed head (with `next`).
    LogArea,
    /// Spec §5.10, in the data area: a 48-byte fixed head, the head and sector images padded
    /// to 4096, and `before` block images ahead of the head.
    LogHome,
}

impl Layout {
    fn fixed(self) -> usize {
        match self {
            Layout::Area => 40,
            Layout::LogArea | Layout::LogHome => 48,
        }
    }

    fn has_next(self) -> bool {
        self != Layout::Area
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// The oldest record still to be replayed (`seq + 1` for a checkpoint's record: none).
    pub replay_from: u64,
    /// Map sectors: file offset and content.
    pub sectors: Vec<(u64, [u8; SECTOR])>,
    /// Data blocks: file offset and 4096 bytes.
    pub blocks: Vec<(u64, Vec<u8>)>,
    /// LOG: the place of the log's next record (spec §5.10), 0 for none.
    pub next: u64,
    /// LOG, in the data area: how many of `blocks` lie before the head in the file (0 or 1).
    pub before: u32,
}

/// Bytes of the head and the sector images: up to where the block images after the head start.
fn head_part(sectors: usize, blocks: usize, layout: Layout) -> usize {
    let end = (layout.fixed() + 8 * (sectors + blocks)).next_multiple_of(SECTOR) + SECTOR * sectors;
    if layout == Layout::LogHome {
        end.next_multiple_of(BLOCK)
    } else {
        end
    }
}

impl Record {
    /// A checkpoint's record, numbered `seq`: it names no sector or block, and nothing before
    /// it is to be replayed. With LOG, `next` names where the log's next record goes (0: none).
    pub fn checkpoint(seq: u64, next: u64) -> Record {
        Record { seq, replay_from: seq + 1, sectors: Vec::new(), blocks: Vec::new(), next, before: 0 }
    }

    /// Bytes a record of `sectors` sectors and `blocks` blocks takes.
    pub fn len_for(sectors: usize, blocks: usize, layout: Layout) -> usize {
        head_part(sectors, blocks, layout) + BLOCK * blocks
    }

    /// Bytes the record takes (never zero: a record has a head).
    pub fn len(&self, layout: Layout) -> usize {
        Record::len_for(self.sectors.len(), self.blocks.len(), layout)
    }

    /// Where block image `i` lies, from the record's first byte.
    pub fn image_at(&self, i: usize, layout: Layout) -> u64 {
        let before = self.before as usize;
        let at = if i < before {
            BLOCK * i
        } else {
            BLOCK * before + head_part(self.sectors.len(), self.blocks.len(), layout) + BLOCK * (i - before)
        };
        at as u64
    }

    /// The record's bytes in file order, sealed with the image's `uuid`: the CRC covers the
    /// uuid first, so that bytes a guest wrote (which a record copies, and which stale space
    /// may hold) can never pass for a record of this image: the guest never sees its uuid.
    pub fn encode(&self, uuid: &[u8; 16], layout: Layout) -> Vec<u8> {
        let (ns, nd) = (self.sectors.len(), self.blocks.len());
        let h = BLOCK * self.before as usize;
        let mut b = vec![0u8; self.len(layout)];
        b[h + 4..h + 8].copy_from_slice(MAGIC);
        LE::write_u64(&mut b[h + 8..], self.seq);
        LE::write_u64(&mut b[h + 16..], self.replay_from);
        let len = b.len() as u32;
        LE::write_u32(&mut b[h + 24..], len);
        LE::write_u32(&mut b[h + 28..], ns as u32);
        LE::write_u32(&mut b[h + 32..], nd as u32);
        if layout.has_next() {
            LE::write_u32(&mut b[h + 36..], self.before);
            LE::write_u64(&mut b[h + 40..], self.next);
        }
        let offsets = self.sectors.iter().map(|s| s.0).chain(self.blocks.iter().map(|d| d.0));
        for (i, off) in offsets.enumerate() {
            LE::write_u64(&mut b[h + layout.fixed() + 8 * i..], off);
        }
        let mut at = h + (layout.fixed() + 8 * (ns + nd)).next_multiple_of(SECTOR);
        for (_, s) in &self.sectors {
            b[at..at + SECTOR].copy_from_slice(s);
            at += SECTOR;
        }
        for (i, (_, d)) in self.blocks.iter().enumerate() {
            let at = self.image_at(i, layout) as usize;
            b[at..at + BLOCK].copy_from_slice(d);
        }
        let crc = seal(uuid, &b, h);
        LE::write_u32(&mut b[h..], crc);
        b
    }

    /// The record whose head is at `head_at` in `storage`, `None` if there is none there that
    /// is whole, valid and at most `room` bytes from its first byte on. Returns it with the
    /// place of its first byte.
    fn read(
        storage: &dyn Storage,
        head_at: u64,
        room: u64,
        uuid: &[u8; 16],
        layout: Layout,
    ) -> Result<Option<(Record, u64)>> {
        let mut head = [0u8; SECTOR];
        storage.read_at(&mut head, head_at)?;
        if &head[4..8] != MAGIC {
            return Ok(None);
        }
        let len = LE::read_u32(&head[24..]) as usize;
        let (ns, nd) = (LE::read_u32(&head[28..]) as usize, LE::read_u32(&head[32..]) as usize);
        let before = if layout.has_next() { LE::read_u32(&head[36..]) } else { 0 };
        // Bounded before anything is sized by them: the record must fit in what is left.
        let fits = ns as u64 <= room / SECTOR as u64 && nd as u64 <= room / BLOCK as u64;
        if !fits || before as usize > nd || (before != 0 && layout != Layout::LogHome) {
            return Ok(None);
        }
        let h = (BLOCK * before as usize) as u64;
        let Some(start) = head_at.checked_sub(h) else { return Ok(None) };
        if len as u64 > room || len != Record::len_for(ns, nd, layout) {
            return Ok(None);
        }
        let mut b = vec![0u8; len];
        storage.read_at(&mut b, start)?;
        let h = h as usize;
        if seal(uuid, &b, h) != LE::read_u32(&b[h..]) {
            return Ok(None);
        }
        let off = |i: usize| LE::read_u64(&b[h + layout.fixed() + 8 * i..]);
        let mut at = h + (layout.fixed() + 8 * (ns + nd)).next_multiple_of(SECTOR);
        let mut sectors = Vec::with_capacity(ns);
        for i in 0..ns {
            let mut s = [0u8; SECTOR];
            s.copy_from_slice(&b[at..at + SECTOR]);
            sectors.push((off(i), s));
            at += SECTOR;
        }
        let next = if layout.has_next() { LE::read_u64(&b[h + 40..]) } else { 0 };
        let mut r = Record {
            seq: LE::read_u64(&b[h + 8..]),
            replay_from: LE::read_u64(&b[h + 16..]),
            sectors,
            blocks: Vec::with_capacity(nd),
            next,
            before,
        };
        for i in 0..nd {
            let at = r.image_at(i, layout) as usize;
            r.blocks.push((off(ns + i), b[at..at + BLOCK].to_vec()));
        }
        Ok(Some((r, start)))
    }
}

/// Gives up the journal area `area` of an image whose chain holds nothing to replay (a
/// checkpoint just ran), while a header in force may still name it: makes all of it but its
/// first sector durable as zeros (the block after its first 4 KiB punched, the rest of that
/// block written with zeros, synced), then punches the first 4 KiB, unsynced (the caller
/// syncs before the header that drops the area). Spec §5.9, "Dropping the area".
///
/// Why the order: a punch not yet synced may land in part (§5.1). Had the first sector's
/// landed and not the rest, the live image would read an empty chain, its next record would
/// be numbered 1 at the area's start, and stale records further in (of this image, so their
/// CRCs hold) would join the new chain where one happened to sit at its end with the next
/// number; the next open would replay them over the map (found by a review, 2026-12-05).
/// In this order, a first sector gone means the rest is durably zeros. The last punch is a
/// whole 4 KiB block, not the sector alone: a file system frees only whole blocks, and a
/// frozen layer would keep a block a sector's punch only zeroed as leaked space.
pub fn drop_area(storage: &dyn Storage, area: &MapExtent) -> Result<()> {
    let head = (BLOCK as u64).min(area.len);
    if area.len > head {
        storage.punch(area.offset + head, area.len - head)?;
    }
    if head > SECTOR as u64 {
        storage.write_at(&vec![0u8; (head - SECTOR as u64) as usize], area.offset + SECTOR as u64)?;
    }
    storage.sync()?;
    storage.punch(area.offset, head)
}

/// CRC-32 of the image's uuid followed by the record's bytes `b` but the CRC field (the 4
/// bytes at `h`, where its head starts).
fn seal(uuid: &[u8; 16], b: &[u8], h: usize) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(uuid);
    c.update(&b[..h]);
    c.update(&b[h + 4..]);
    c.finalize()
}

/// What a journal holds: the records from the area's start that are valid and in sequence.
/// Without LOG they lie one after another; with it (spec §5.10) the record after one lies
/// either where the area's records go on or at the place in the data area the last record
/// named, its head there or one block after it.
#[derive(Debug, Default)]
pub struct Chain {
    pub records: Vec<Record>,
    /// File offset of each record's first byte, and whether it lies in the area.
    pub places: Vec<(u64, bool)>,
    /// File offset just past the last record in the area (the area's start if there is none).
    pub end: u64,
    /// Whether the image has LOG.
    pub log: bool,
}

impl Chain {
    /// Reads the chain of `area` of `storage`, an image whose uuid is `uuid`, with LOG if
    /// `log`. A record that names as the next place one no record may be (not a multiple of
    /// 4096, or past the largest file) is corrupt.
    pub fn read(storage: &dyn Storage, area: &MapExtent, uuid: &[u8; 16], log: bool) -> Result<Chain> {
        let mut chain = Chain { records: Vec::new(), places: Vec::new(), end: area.offset, log };
        let in_area = if log { Layout::LogArea } else { Layout::Area };
        let (mut log_at, mut logged) = (0u64, 0u64);
        loop {
            let follows = |r: &Record, chain: &Chain| chain.records.last().map_or(true, |p| r.seq == p.seq + 1);
            let mut found = None;
            if chain.end + SECTOR as u64 <= area.end() {
                if let Some((r, at)) = Record::read(storage, chain.end, area.end() - chain.end, uuid, in_area)? {
                    if follows(&r, &chain) {
                        found = Some((r, at, true));
                    }
                }
            }
            // The first record is the area's; later ones may be in the log.
            if found.is_none() && log_at != 0 && !chain.records.is_empty() {
                for before in 0..2u64 {
                    let head = log_at + before * BLOCK as u64;
                    if let Some((r, at)) = Record::read(storage, head, MAX_LOG_RECORD, uuid, Layout::LogHome)? {
                        if at == log_at && follows(&r, &chain) {
                            found = Some((r, at, false));
                            break;
                        }
                    }
                }
            }
            let Some((r, at, in_area_now)) = found else { break };
            if !in_area_now {
                logged += 1;
                if logged > MAX_LOG_RECORDS {
                    return Err(err(
                        ErrorKind::Corrupt,
                        format!("more than {MAX_LOG_RECORDS} journal records in the log"),
                    ));
                }
            }
            let layout = if in_area_now { in_area } else { Layout::LogHome };
            if in_area_now {
                chain.end = at + r.len(layout) as u64;
            }
            if log {
                let n = r.next;
                if n != 0 && (n % BLOCK as u64 != 0 || n > crate::format::header::MAX_FILE_SIZE - NEXT_ROOM) {
                    return Err(err(ErrorKind::Corrupt, format!("journal record {} names its next at {n}", r.seq)));
                }
                log_at = n;
            }
            chain.places.push((at, in_area_now));
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
    /// outside the map extents and the journal area, and in a log each record itself outside
    /// them too (a record that names another place, or lies in one, is corrupt, not replayed).
    /// A block already at its place (a log record's block whose home is the record) is not
    /// a piece: replaying it would write what is there.
    pub fn patches(&self, extents: &[MapExtent], area: &MapExtent, data_start: u64) -> Result<BTreeMap<u64, Vec<u8>>> {
        // Checked: a record controls `off`, and a wrapped sum would pass as inside.
        let inside =
            |e: &MapExtent, off: u64, n: u64| off >= e.offset && off.checked_add(n).is_some_and(|x| x <= e.end());
        let overlaps = |e: &MapExtent, off: u64, n: u64| off < e.end() && e.offset < off + n;
        let misplaced = |off: u64, n: u64| {
            off < data_start
                || off.checked_add(n).map_or(true, |e| e > crate::format::header::MAX_FILE_SIZE)
                || overlaps(area, off, n)
                || extents.iter().any(|e| overlaps(e, off, n))
        };
        let first = self.records.len() - self.to_replay().len();
        let mut out = BTreeMap::new();
        for (r, &(place, in_area)) in self.to_replay().iter().zip(&self.places[first..]) {
            let layout = match (in_area, self.log) {
                (true, false) => Layout::Area,
                (true, true) => Layout::LogArea,
                (false, _) => Layout::LogHome,
            };
            let len = r.len(layout) as u64;
            if !in_area && misplaced(place, len) {
                return Err(err(ErrorKind::Corrupt, format!("journal record {} lies at {place}", r.seq)));
            }
            for (off, s) in &r.sectors {
                if off % SECTOR as u64 != 0 || !extents.iter().any(|e| inside(e, *off, SECTOR as u64)) {
                    return Err(err(
                        ErrorKind::Corrupt,
                        format!("journal record {} names a map sector at {off}", r.seq),
                    ));
                }
                out.insert(*off, s.to_vec());
            }
            for (i, (off, d)) in r.blocks.iter().enumerate() {
                let n = BLOCK as u64;
                if off % n != 0 || misplaced(*off, n) {
                    return Err(err(
                        ErrorKind::Corrupt,
                        format!("journal record {} names a data block at {off}", r.seq),
                    ));
                }
                if *off == place + r.image_at(i, layout) {
                    // Its own home: the file holds the record's image there (the CRC covered
                    // it), so the replay writes nothing; an earlier piece for the place is older.
                    out.remove(off);
                    continue;
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
            next: 0,
            before: 0,
        }
    }

    const UUID: [u8; 16] = [7; 16];

    fn area() -> MapExtent {
        MapExtent { offset: 1 << 20, len: 1 << 20 }
    }

    fn write_chain(s: &MemStorage, recs: &[Record]) -> u64 {
        let mut at = area().offset;
        for r in recs {
            s.write_at(&r.encode(&UUID, Layout::Area), at).unwrap();
            at += r.len(Layout::Area) as u64;
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
        let c = Chain::read(&s, &area(), &UUID, false).unwrap();
        assert_eq!(c.records, recs);
        assert_eq!(c.end, end);
        assert_eq!(c.next_seq(), 10);
        // A stale record after the chain (an older number) is not part of it.
        s.write_at(&rec(3, 3, 9).encode(&UUID, Layout::Area), end).unwrap();
        assert_eq!(Chain::read(&s, &area(), &UUID, false).unwrap().records.len(), 3);
        // A torn last record (one sector of its data never written) ends the chain before it.
        let third = area().offset + (recs[0].len(Layout::Area) + recs[1].len(Layout::Area)) as u64;
        s.write_at(&[0u8; 512], third + 1024).unwrap();
        let c = Chain::read(&s, &area(), &UUID, false).unwrap();
        assert_eq!(c.records, recs[..2]);
        assert_eq!(c.to_replay(), &recs[..2]);
        // Records sealed for another image are none of this one's.
        assert!(Chain::read(&s, &area(), &[8; 16], false).unwrap().records.is_empty());
    }

    #[test]
    fn replay_starts_where_the_newest_record_says_and_later_records_win() {
        let s = MemStorage::new();
        s.write_at(&vec![0u8; 2 << 20], 0).unwrap();
        let mut later = rec(12, 11, 5);
        later.blocks[0].0 = 65536 + 4096 * 11;
        write_chain(&s, &[rec(10, 11, 0), rec(11, 11, 4), later]);
        let c = Chain::read(&s, &area(), &UUID, false).unwrap();
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
        let bad = Chain { records: vec![rec(1, 1, 1)], places: vec![(area().offset, true)], end: 0, log: false };
        assert!(bad.patches(&[], &area(), 65536).is_err());
        // So is one naming a sector at 2^64 - 512, whose end wraps past zero (a review's
        // crafted file: it passed as inside a map extent, check said ok and serve failed).
        let mut wrapped = rec(1, 1, 1);
        wrapped.sectors[0].0 = u64::MAX - 511;
        let bad = Chain { records: vec![wrapped], places: vec![(area().offset, true)], end: 0, log: false };
        let e = bad.patches(&extents, &area(), 65536).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }

    /// A log (spec §5.10): records in the area name the log's next place; a record there has
    /// its head first or after one block; its blocks at their own images are not replayed
    /// (they are there), a copy in the area is; the chain ends where neither place holds the
    /// next record, and a record lying on a map extent is corrupt.
    #[test]
    fn a_log_chain_goes_between_the_area_and_the_data_area_and_leaves_home_blocks_where_they_are() {
        let s = MemStorage::new();
        let area = MapExtent { offset: 1 << 20, len: 1 << 20 };
        let extents = [MapExtent { offset: 65536, len: 65536 }];
        let (w1, w2) = (4 << 20, 6 << 20);
        let mut at = area.offset;
        let put = |r: &Record, place: u64, layout: Layout| {
            s.write_at(&r.encode(&UUID, layout), place).unwrap();
            place + r.len(layout) as u64
        };
        at = put(&Record::checkpoint(4, w1), at, Layout::LogArea);
        // Record 5 in the log, its block (block 1 of an 8 KiB slot at w1) after its head.
        let r5 = Record {
            seq: 5,
            replay_from: 5,
            sectors: vec![(65536, [1; SECTOR])],
            blocks: vec![(w1 + 4096, vec![2; BLOCK])],
            next: w2,
            before: 0,
        };
        assert_eq!(put(&r5, w1, Layout::LogHome), w1 + 8192);
        // Record 6 in the area (a copy of a block written in place), naming the log's place.
        let r6 = Record {
            seq: 6,
            replay_from: 5,
            sectors: vec![(66048, [3; SECTOR])],
            blocks: vec![(200 << 10, vec![4; BLOCK])],
            next: w2,
            before: 0,
        };
        at = put(&r6, at, Layout::LogArea);
        // Record 7 in the log, its block (block 0 of the slot at w2) before its head.
        let r7 = Record {
            seq: 7,
            replay_from: 5,
            sectors: vec![(65536, [5; SECTOR])],
            blocks: vec![(w2, vec![6; BLOCK])],
            next: w2 + 8192,
            before: 1,
        };
        assert_eq!(r7.image_at(0, Layout::LogHome), 0);
        put(&r7, w2, Layout::LogHome);
        let c = Chain::read(&s, &area, &UUID, true).unwrap();
        assert_eq!(c.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5, 6, 7]);
        assert_eq!(
            c.places,
            vec![(area.offset, true), (w1, false), (at - r6.len(Layout::LogArea) as u64, true), (w2, false)]
        );
        assert_eq!(c.end, at);
        let p = c.patches(&extents, &area, 8192).unwrap();
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![65536, 66048, 200 << 10]);
        assert_eq!(p[&65536], vec![5u8; SECTOR], "the later record's sector wins");
        // A record on a map extent is corrupt.
        let mut bad = Chain::read(&s, &area, &UUID, true).unwrap();
        bad.places[3] = (65536, false);
        assert!(bad.patches(&extents, &area, 8192).is_err());
        // A torn record 7 (its block's last sector lost) ends the chain after record 6.
        s.write_at(&[0u8; SECTOR], w2 + 3584).unwrap();
        assert_eq!(Chain::read(&s, &area, &UUID, true).unwrap().records.len(), 3);
    }

    /// A record in the data area is one cluster at most (spec §5.10): a longer one at the log's
    /// place ends the chain, as no record there would, so that records laid over one another
    /// cannot make a reader hold more than a writer writes.
    #[test]
    fn a_record_in_the_data_area_longer_than_a_cluster_ends_the_chain() {
        let s = MemStorage::new();
        let area = MapExtent { offset: 8192, len: 4096 };
        let place = 1 << 20;
        s.write_at(&Record::checkpoint(1, place).encode(&UUID, Layout::LogArea), area.offset).unwrap();
        let rec = |blocks: u64| Record {
            seq: 2,
            replay_from: 2,
            sectors: vec![],
            blocks: (0..blocks).map(|i| (place + 4096 * (1 + i), vec![7; BLOCK])).collect(),
            next: 0,
            before: 0,
        };
        for (blocks, read) in [(1, 2), (2, 1), (15, 1)] {
            let r = rec(blocks);
            assert_eq!(r.len(Layout::LogHome) as u64, 4096 * (1 + blocks));
            s.write_at(&r.encode(&UUID, Layout::LogHome), place).unwrap();
            let c = Chain::read(&s, &area, &UUID, true).unwrap();
            assert_eq!(c.records.len(), read, "a record of {blocks} blocks at the log's place");
        }
    }

    /// A chain with more records in the data area than a writer writes between checkpoints
    /// is corrupt: a hostile file cannot make a reader hold any number of them.
    #[test]
    fn a_log_longer_than_a_writer_writes_between_checkpoints_is_corrupt() {
        let s = MemStorage::new();
        let area = MapExtent { offset: 8192, len: 4096 };
        let first = 1 << 20;
        s.write_at(&Record::checkpoint(1, first).encode(&UUID, Layout::LogArea), area.offset).unwrap();
        let put = |n: u64| {
            let at = first + 8192 * (n - 2);
            let r = Record { seq: n, replay_from: 2, sectors: vec![], blocks: vec![], next: at + 8192, before: 0 };
            s.write_at(&r.encode(&UUID, Layout::LogHome), at).unwrap();
        };
        for n in 2..2 + MAX_LOG_RECORDS {
            put(n);
        }
        let c = Chain::read(&s, &area, &UUID, true).unwrap();
        assert_eq!(c.records.len() as u64, 1 + MAX_LOG_RECORDS);
        put(2 + MAX_LOG_RECORDS);
        let e = Chain::read(&s, &area, &UUID, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }
}
