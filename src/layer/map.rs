//! The in-memory chunk map of one image: entries by chunk, where each entry's record lives
//! in the map sectors, which sectors are dirty, and loading the map from its extents.
//!
//! Invariant: an entry keeps its map position for life (entries are never moved or removed
//! in place), so a crash while sectors are rewritten can leave each entry old or new, never
//! duplicated (spec §5.2).

use super::alloc::Use;
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::{BlockState, BlockStates};
use crate::format::header::MapExtent;
use crate::format::map::{decode_sector, encode_entry, seal_sector, EntryRef, MapEntry, SECTOR_HEADER};
use crate::format::{Geometry, MAX_MAP_EXTENTS, MIN_MAP_EXTENT, SECTOR_SIZE};
use crate::storage::Storage;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A multiplicative hasher for chunk indexes: keys are small integers, so SipHash's DoS
/// resistance buys nothing and costs a measurable share of a 4 KiB read.
#[derive(Default)]
pub struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (i ^ (i >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 ^= self.0 >> 32;
    }
}

/// A dirty sector whose every entry is to be encoded again.
const ALL_ENTRIES: u64 = u64::MAX;
/// Encoded sectors kept at most (512 KiB): past it the kept ones are dropped.
const ENCODED_KEPT: usize = 1024;

pub type ChunkHashMap<V> = HashMap<u64, V, BuildHasherDefault<ChunkHasher>>;

#[derive(Debug, Clone)]
pub struct Entry {
    /// File offset of the chunk's data slot; 0 when it has none.
    pub data_offset: u64,
    pub blocks: BlockStates,
    /// CRC-32 per block (images with data checksums; empty otherwise); 0 for non-Data blocks.
    pub crcs: Box<[u32]>,
    /// With data checksums (at most 64 blocks per chunk), the blocks of the current slot that a
    /// durable map, or one a flush is writing, may record as Data: bit `i` for block `i`. Such a
    /// block is never overwritten in place (spec §5.8). Set from the entry on load, grown by each
    /// flush's snapshot (F1) of the entry, cleared when the entry gets a new slot (no durable
    /// map can point at a slot taken since: released slots are reused only once that release
    /// is durable). Without data checksums 0, but in a log-structured image (spec §5.10): 1 while
    /// the chunk's slot is the home a record since the last checkpoint holds.
    pub pinned: u64,
    /// Position of the entry's record: sector index * entries_per_sector + index in sector.
    pos: u64,
}

#[derive(Debug)]
pub struct ChunkMap {
    geom: Geometry,
    entries: ChunkHashMap<Entry>,
    /// The same chunks in order, so that walks over a huge, mostly empty disk skip the gaps.
    order: BTreeSet<u64>,
    /// Next unused record position (positions below it may still be holes left by another writer).
    next_pos: u64,
    /// Chunk owning each record position, for re-encoding a sector. A map rather than a vector:
    /// a hostile image may put one entry at a far position.
    owners: ChunkHashMap<u64>,
    extents: Vec<MapExtent>,
    /// Dirty sectors, each with the entries (bit i: entry i of the sector) changed since it
    /// was last encoded; [`ALL_ENTRIES`] where every entry must be encoded again.
    dirty: BTreeMap<u64, u64>,
    /// Sectors as last encoded, so that a flush encodes only the entries that changed (a
    /// sector's other entries are lookups that miss the cache on a big map: most of what a
    /// small flush cost in user time, PROFILING.md). Valid because every change of an entry
    /// goes through [`ChunkMap::entry_mut`] or [`ChunkMap::mark_dirty`], which mark it.
    encoded: ChunkHashMap<[u8; SECTOR_SIZE]>,
    extents_changed: bool,
    /// Every record position below it is taken ([`ChunkMap::free_position`]).
    gap_hint: u64,
}

/// The most map bytes a disk of this geometry can need: one entry per chunk, with room for the
/// doubling growth rule of spec §4.3. Anything larger is refused as corrupt before it is read.
pub fn max_map_bytes(g: &Geometry) -> u64 {
    let needed = g.chunk_count().div_ceil(g.entries_per_sector() as u64) * SECTOR_SIZE as u64;
    let first = MIN_MAP_EXTENT.max(g.chunk_size());
    2 * needed.max(first) + MAX_MAP_EXTENTS as u64 * g.chunk_size()
}

impl ChunkMap {
    pub fn empty(geom: Geometry) -> ChunkMap {
        ChunkMap {
            geom,
            entries: ChunkHashMap::default(),
            order: BTreeSet::new(),
            next_pos: 0,
            owners: ChunkHashMap::default(),
            extents: Vec::new(),
            dirty: BTreeMap::new(),
            encoded: ChunkHashMap::default(),
            extents_changed: false,
            gap_hint: 0,
        }
    }

    /// Reads the sectors of every extent that hold data (holes are skipped: they read as zero,
    /// which is an empty sector), up to the end of the file. Reads and memory are proportional
    /// to the entries on disk, never to the disk's virtual size.
    pub fn load(storage: &dyn Storage, geom: Geometry, extents: &[MapExtent], file_len: u64) -> Result<ChunkMap> {
        let total: u64 = extents.iter().map(|e| e.len).sum();
        if total > max_map_bytes(&geom) {
            return Err(err(
                ErrorKind::Corrupt,
                format!("map extents total {total} bytes, more than a disk of this size can need"),
            ));
        }
        let mut m = ChunkMap::empty(geom);
        m.extents = extents.to_vec();
        let eps = geom.entries_per_sector() as u64;
        let sector = SECTOR_SIZE as u64;
        // Sized by the map, not fixed: opening a small image (or each of a deep chain's layers)
        // should not zero a megabyte it never reads into.
        let mut buf = vec![0u8; total.clamp(sector, 1 << 20) as usize];
        let mut first_sector = 0u64;
        let mut loaded = Vec::new();
        for ext in extents {
            let readable_end = ext.end().min(file_len.next_multiple_of(sector));
            let mut pos = ext.offset;
            while pos < readable_end {
                let Some(data) = storage.next_data(pos)? else {
                    break;
                };
                if data >= readable_end {
                    break;
                }
                pos = pos.max(data / sector * sector);
                let hole = storage.next_hole(pos)?.next_multiple_of(sector).clamp(pos + sector, readable_end);
                let n = ((hole - pos) as usize).min(buf.len());
                storage.read_at(&mut buf[..n], pos)?;
                for (i, bytes) in buf[..n].chunks_exact(SECTOR_SIZE).enumerate() {
                    let off = pos + (i * SECTOR_SIZE) as u64;
                    let si = first_sector + (off - ext.offset) / sector;
                    for (slot, e) in decode_sector(&geom, off, bytes)? {
                        loaded.push((si * eps + slot as u64, e, off));
                    }
                }
                pos += n as u64;
            }
            first_sector += ext.len / sector;
        }
        // Inserted once all are decoded, into tables sized for them: growing both tables entry
        // by entry was a tenth of opening a deep chain.
        m.entries.reserve(loaded.len());
        m.owners.reserve(loaded.len());
        for (pos, e, off) in loaded {
            m.insert_loaded(pos, e, off)?;
        }
        Ok(m)
    }

    fn insert_loaded(&mut self, pos: u64, e: MapEntry, sector_off: u64) -> Result<()> {
        if self.entries.contains_key(&e.chunk) {
            return Err(err(ErrorKind::Corrupt, format!("chunk {} has two map entries", e.chunk)).at(sector_off));
        }
        self.owners.insert(pos, e.chunk);
        self.next_pos = self.next_pos.max(pos + 1);
        self.order.insert(e.chunk);
        let pinned = self.pin_mask(&e.blocks);
        self.entries.insert(
            e.chunk,
            Entry { data_offset: e.data_offset, blocks: e.blocks, crcs: e.crcs.into_boxed_slice(), pinned, pos },
        );
        Ok(())
    }

    /// The blocks of `blocks` that are Data, as [`Entry::pinned`] records them (0 without data
    /// checksums).
    fn pin_mask(&self, blocks: &BlockStates) -> u64 {
        if self.geom.data_checksums {
            blocks.data_mask().unwrap_or(u64::MAX)
        } else {
            0
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    pub fn get(&self, chunk: u64) -> Option<&Entry> {
        self.entries.get(&chunk)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.entries.iter().map(|(&c, e)| (c, e))
    }

    /// Every entry, borrowed, sorted by chunk. Gathered from the table and sorted rather than
    /// looked up chunk by chunk along `order`: on a freshly loaded map each lookup is a cache
    /// miss, and a deep chain's open walks every layer's entries.
    pub fn sorted_entries(&self) -> Vec<(u64, &Entry)> {
        let mut v: Vec<(u64, &Entry)> = self.iter().collect();
        v.sort_unstable_by_key(|&(c, _)| c);
        v
    }

    /// The first chunk at or after `chunk` that has an entry.
    pub fn next_chunk(&self, chunk: u64) -> Option<u64> {
        self.order.range(chunk..).next().copied()
    }

    /// A map holding exactly `entries` in fresh extents taken from `grow`, every sector dirty:
    /// what a whole-map rewrite writes before switching the header to it.
    pub fn rebuilt(
        geom: Geometry,
        entries: Vec<MapEntry>,
        mut grow: impl FnMut(u64) -> Result<u64>,
    ) -> Result<ChunkMap> {
        let mut m = ChunkMap::empty(geom);
        for e in entries {
            // The new map becomes durable as a whole: its Data blocks are pinned from the start.
            let pinned = m.pin_mask(&e.blocks);
            let slot = m.entry_mut(e.chunk, &mut grow)?;
            slot.pinned = pinned;
            slot.data_offset = e.data_offset;
            slot.blocks = e.blocks;
            slot.crcs = e.crcs.into_boxed_slice();
        }
        Ok(m)
    }

    pub fn extents(&self) -> &[MapExtent] {
        &self.extents
    }

    /// Whether the extent list changed since the last [`ChunkMap::take_dirty`] (the header must be rewritten).
    pub fn extents_changed(&self) -> bool {
        self.extents_changed
    }

    fn capacity(&self) -> u64 {
        let sectors: u64 = self.extents.iter().map(|e| e.len / SECTOR_SIZE as u64).sum();
        sectors * self.geom.entries_per_sector() as u64
    }

    /// The entry for `chunk`, created (all blocks absent, no slot) if missing. A new entry may
    /// need a new map extent, taken from never-written space by `grow`.
    pub fn entry_mut(&mut self, chunk: u64, grow: impl FnOnce(u64) -> Result<u64>) -> Result<&mut Entry> {
        if !self.entries.contains_key(&chunk) {
            let pos = if self.next_pos < self.capacity() || self.add_extent(grow)? {
                self.next_pos += 1;
                self.next_pos - 1
            } else {
                self.free_position()?
            };
            self.owners.insert(pos, chunk);
            self.order.insert(chunk);
            self.entries.insert(
                chunk,
                Entry {
                    data_offset: 0,
                    blocks: BlockStates::new(self.geom.blocks_per_chunk()),
                    crcs: vec![0; self.geom.checksum_bytes() / 4].into_boxed_slice(),
                    pinned: 0,
                    pos,
                },
            );
        }
        self.mark_dirty(chunk);
        Ok(self.entries.get_mut(&chunk).expect("inserted above"))
    }

    /// Adds an extent as the growth rule says (spec §4.3), unless the map would then be longer
    /// than a reader allows ([`max_map_bytes`]): false then, and nothing is added.
    fn add_extent(&mut self, grow: impl FnOnce(u64) -> Result<u64>) -> Result<bool> {
        let total: u64 = self.extents.iter().map(|e| e.len).sum();
        let len = total.max(MIN_MAP_EXTENT).max(self.geom.chunk_size()).next_multiple_of(self.geom.chunk_size());
        if self.extents.len() >= MAX_MAP_EXTENTS || total + len > max_map_bytes(&self.geom) {
            return Ok(false);
        }
        let offset = grow(len)?;
        self.extents.push(MapExtent { offset, len });
        self.extents_changed = true;
        Ok(true)
    }

    /// A record position below `next_pos` that no entry holds. Positions are handed out in
    /// order, so such gaps exist only where entries were lost (sectors a crash kept from the
    /// disk) or a file put its entries far apart; only a map that may grow no more looks for
    /// one. The map always has room for every chunk ([`max_map_bytes`] is at least twice what
    /// one entry per chunk needs), so a gap exists while a chunk has no entry.
    fn free_position(&mut self) -> Result<u64> {
        let capacity = self.capacity();
        while self.gap_hint < capacity && self.owners.contains_key(&self.gap_hint) {
            self.gap_hint += 1;
        }
        if self.gap_hint >= capacity {
            return Err(err(ErrorKind::NoSpace, "the chunk map has no room for another entry"));
        }
        // Positions are never given up (entries are not removed), so the ones below stay taken.
        self.gap_hint += 1;
        Ok(self.gap_hint - 1)
    }

    /// The entry of `chunk`, to change without marking its sector dirty: only for changes the
    /// sector as last encoded already holds (a log record made it durable, spec §5.10), or
    /// that no sector holds (the pins).
    pub fn get_mut_quiet(&mut self, chunk: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&chunk)
    }

    pub fn mark_dirty(&mut self, chunk: u64) {
        if let Some(e) = self.entries.get(&chunk) {
            let eps = self.geom.entries_per_sector() as u64;
            *self.dirty.entry(e.pos / eps).or_insert(0) |= 1 << (e.pos % eps);
        }
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.extents_changed
    }

    fn sector_offset(&self, sector: u64) -> u64 {
        let mut s = sector;
        for e in &self.extents {
            let n = e.len / SECTOR_SIZE as u64;
            if s < n {
                return e.offset + s * SECTOR_SIZE as u64;
            }
            s -= n;
        }
        unreachable!("sector {sector} beyond the map's extents")
    }

    /// The entry whose record is at position `pos`, borrowed for encoding.
    fn entry_at(&self, pos: u64) -> Option<EntryRef<'_>> {
        let c = *self.owners.get(&pos)?;
        let e = self.entries.get(&c)?;
        Some(EntryRef { chunk: c, data_offset: e.data_offset, blocks: &e.blocks, crcs: &e.crcs })
    }

    /// Encodes one sector from the current entries: only the `changed` ones (bit i: entry i)
    /// where the sector as last encoded is kept, else all of them.
    fn encode(&mut self, sector: u64, changed: u64) -> (u64, [u8; SECTOR_SIZE]) {
        let (eps, es) = (self.geom.entries_per_sector(), self.geom.entry_size());
        let off = self.sector_offset(sector);
        let first = sector * eps as u64;
        let kept = self.encoded.get(&sector).filter(|_| changed != ALL_ENTRIES).copied();
        let mut b = kept.unwrap_or([0u8; SECTOR_SIZE]);
        for i in 0..eps {
            if kept.is_some() && changed & (1 << i) == 0 {
                continue;
            }
            let e = self.entry_at(first + i as u64);
            let at = SECTOR_HEADER + i * es;
            encode_entry(&self.geom, e, &mut b[at..at + es]);
        }
        seal_sector(&self.geom, off, &mut b);
        self.encoded.insert(sector, b);
        (off, b)
    }

    /// Encodes every dirty sector and clears the dirty state: the snapshot a flush writes
    /// after the data it refers to is durable.
    ///
    /// From here on the snapshot's entries may become durable at any moment, so their Data
    /// blocks are pinned (see [`Entry::pinned`]).
    pub fn take_dirty(&mut self) -> DirtySnapshot {
        let dirty = std::mem::take(&mut self.dirty);
        if self.encoded.len() + dirty.len() > ENCODED_KEPT {
            self.encoded.clear();
        }
        let encoded = dirty.iter().map(|(&s, &changed)| self.encode(s, changed)).collect();
        let sectors: Vec<u64> = dirty.into_keys().collect();
        if self.geom.data_checksums {
            let eps = self.geom.entries_per_sector() as u64;
            for &sector in &sectors {
                for pos in sector * eps..(sector + 1) * eps {
                    let Some(chunk) = self.owners.get(&pos).copied() else { continue };
                    if let Some(e) = self.entries.get_mut(&chunk) {
                        e.pinned |= e.blocks.data_mask().unwrap_or(u64::MAX);
                    }
                }
            }
        }
        let extents_changed = std::mem::take(&mut self.extents_changed);
        DirtySnapshot { sectors, encoded, extents_changed }
    }

    /// Number of sectors a flush would write now.
    pub fn dirty_sectors(&self) -> usize {
        self.dirty.len()
    }

    /// Marks sectors (by number) dirty: the ones a redo journal logged since its last
    /// checkpoint, which the checkpoint writes in place.
    pub fn mark_sectors_dirty(&mut self, sectors: impl IntoIterator<Item = u64>) {
        for s in sectors {
            // No entry changed: the sector as last encoded, if it is kept, is current.
            self.dirty.entry(s).or_insert(0);
        }
    }

    /// Marks a snapshot's sectors dirty again after its write failed.
    pub fn restore_dirty(&mut self, snap: DirtySnapshot) {
        for s in snap.sectors {
            self.dirty.insert(s, ALL_ENTRIES);
        }
        self.extents_changed |= snap.extents_changed;
    }

    /// Everything this map references in the file, for the allocator and the checker.
    pub fn used_ranges(&self) -> Vec<(u64, u64, Use)> {
        let cs = self.geom.chunk_size();
        let mut v: Vec<(u64, u64, Use)> = self.extents.iter().map(|e| (e.offset, e.len, Use::MapExtent)).collect();
        v.extend(
            self.entries
                .iter()
                .filter(|(_, e)| e.data_offset != 0)
                .map(|(&c, e)| (e.data_offset, cs, Use::DataSlot { chunk: c })),
        );
        v
    }

    /// Drops slots that hold no data block (allocated but never written before a crash):
    /// such a slot may lie beyond the end of the file and owns nothing worth keeping.
    pub fn drop_empty_slots(&mut self) -> usize {
        let mut changed = Vec::new();
        for (&c, e) in self.entries.iter_mut() {
            if e.data_offset != 0 && e.blocks.count(BlockState::Data) == 0 {
                e.data_offset = 0;
                changed.push(c);
            }
        }
        for c in &changed {
            self.mark_dirty(*c);
        }
        changed.len()
    }
}

/// Encoded dirty sectors taken at one instant.
#[derive(Debug)]
pub struct DirtySnapshot {
    sectors: Vec<u64>,
    pub encoded: Vec<(u64, [u8; SECTOR_SIZE])>,
    pub extents_changed: bool,
}

impl DirtySnapshot {
    /// The sectors (by number) it holds.
    pub fn sectors(&self) -> &[u64] {
        &self.sectors
    }

    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty() && !self.extents_changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn geom() -> Geometry {
        Geometry::new(1 << 30, 16).unwrap()
    }

    #[test]
    fn new_entries_fill_positions_in_order_and_grow_an_extent_on_demand() {
        let mut m = ChunkMap::empty(geom());
        let mut grown = Vec::new();
        for c in [5u64, 9, 1] {
            m.entry_mut(c, |len| {
                grown.push(len);
                Ok(65536)
            })
            .unwrap();
        }
        assert_eq!(grown, vec![65536]);
        assert_eq!(m.get(5).unwrap().pos, 0);
        assert_eq!(m.get(1).unwrap().pos, 2);
        assert!(m.extents_changed());
    }

    /// A map at the longest a reader allows whose last position is taken (a crafted file; or
    /// gaps left where a crash lost entries): a new entry takes a free position below instead
    /// of a new extent, which would make the image one no reader opens (a review's finding:
    /// one 4K write did that to an image `check` had passed).
    #[test]
    fn a_map_that_may_grow_no_more_fills_a_gap() {
        let g = Geometry::new(1 << 20, 16).unwrap();
        let mut m = ChunkMap::empty(g);
        m.extents.push(MapExtent { offset: 65536, len: 4 << 20 });
        assert!(4 << 20 <= max_map_bytes(&g) && 8 << 20 > max_map_bytes(&g));
        m.next_pos = m.capacity() - 1;
        let no_growth = |_: u64| -> Result<u64> { panic!("the map grew past what a reader allows") };
        m.entry_mut(0, no_growth).unwrap();
        assert_eq!(m.get(0).unwrap().pos, m.capacity() - 1);
        for c in 1..16u64 {
            m.entry_mut(c, no_growth).unwrap();
            assert_eq!(m.get(c).unwrap().pos, c - 1, "chunk {c}");
        }
        assert_eq!(m.extents().len(), 1);
    }

    #[test]
    fn extents_double_the_map() {
        let mut m = ChunkMap::empty(Geometry::new(1 << 40, 12).unwrap());
        let mut next = 8192u64;
        let per_extent = (65536 / 512) * 15;
        for c in 0..(per_extent * 3 + 1) as u64 {
            m.entry_mut(c, |len| {
                let o = next;
                next += len;
                Ok(o)
            })
            .unwrap();
        }
        let lens: Vec<u64> = m.extents().iter().map(|e| e.len).collect();
        assert_eq!(lens, vec![65536, 65536, 131072]);
    }

    /// A flush encodes only the entries that changed in a sector it encoded before: what it
    /// writes must be what encoding every entry would give, through changes, sectors a journal
    /// checkpoint marks again, failed flushes and the kept sectors being dropped.
    #[test]
    fn sectors_encoded_from_changed_entries_equal_a_full_encoding() {
        let g = geom();
        let eps = g.entries_per_sector() as u64;
        let mut m = ChunkMap::empty(g);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let full = |m: &ChunkMap, sector: u64| {
            let entries = (sector * eps..(sector + 1) * eps).map(|pos| m.entry_at(pos));
            crate::format::map::encode_entries(&m.geom, m.sector_offset(sector), entries)
        };
        let mut next = 1u64 << 20;
        for round in 0..400 {
            for _ in 0..rnd(6) {
                let c = rnd(200);
                let e = m
                    .entry_mut(c, |len| {
                        let o = next;
                        next += len;
                        Ok(o)
                    })
                    .unwrap();
                e.data_offset = if rnd(4) == 0 { 0 } else { 65536 * (1 + rnd(1000)) };
                let a = rnd(16) as usize;
                let st = [BlockState::Absent, BlockState::Data, BlockState::Zero][rnd(3) as usize];
                e.blocks.set_range(a, a + 1 + rnd(16 - a as u64) as usize, st);
            }
            if round % 7 == 0 {
                let sectors: Vec<u64> = (0..m.next_pos.div_ceil(eps)).collect();
                m.mark_sectors_dirty(sectors);
            }
            if round % 50 == 0 {
                m.encoded.clear();
            }
            let snap = m.take_dirty();
            for (&sector, (off, bytes)) in snap.sectors().iter().zip(&snap.encoded) {
                assert_eq!(*off, m.sector_offset(sector));
                assert_eq!(bytes[..], full(&m, sector)[..], "round {round}, sector {sector}");
            }
            if round % 11 == 0 {
                m.restore_dirty(snap);
            }
        }
    }

    #[test]
    fn written_snapshot_loads_back_identically() {
        let g = geom();
        let mut m = ChunkMap::empty(g);
        for c in 0..40u64 {
            let e = m.entry_mut(c * 3, |_| Ok(65536)).unwrap();
            e.data_offset = 131072 + c * 65536;
            e.blocks.set_range(0, (c % 16) as usize + 1, BlockState::Data);
        }
        let snap = m.take_dirty();
        let s = MemStorage::new();
        for (off, bytes) in &snap.encoded {
            s.write_at(bytes, *off).unwrap();
        }
        let len = s.len().unwrap();
        let l = ChunkMap::load(&s, g, m.extents(), len).unwrap();
        assert_eq!(l.len(), 40);
        for (c, e) in m.iter() {
            let got = l.get(c).unwrap();
            assert_eq!((got.data_offset, &got.blocks, got.pos), (e.data_offset, &e.blocks, e.pos));
        }
    }

    #[test]
    fn rejects_two_entries_for_one_chunk() {
        let g = geom();
        let mut m = ChunkMap::empty(g);
        m.entry_mut(4, |_| Ok(65536)).unwrap();
        let (off, mut bytes) = m.take_dirty().encoded[0];
        // Copy entry 0 into position 1 and reseal: the same chunk twice.
        bytes.copy_within(16..48, 48);
        let crc = crc32fast::hash(&bytes[4..]);
        bytes[0..4].copy_from_slice(&crc.to_le_bytes());
        let s = MemStorage::new();
        s.write_at(&bytes, off).unwrap();
        let e = ChunkMap::load(&s, g, m.extents(), s.len().unwrap()).unwrap_err();
        assert!(e.to_string().contains("two map entries"));
    }
}
