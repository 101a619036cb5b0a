//! Map sectors: the 512-byte, self-checksummed units the chunk map is stored in, and the
//! map entries inside them (spec §4).

use super::blocks::{BlockState, BlockStates};
use super::header::MAX_FILE_SIZE;
use super::*;
use byteorder::{ByteOrder, LittleEndian as LE};

/// Bytes before the first entry of a sector: crc32, magic, the sector's own file offset.
pub const SECTOR_HEADER: usize = 16;
pub const SECTOR_MAGIC: [u8; 4] = *b"CDMS";
/// Entry flag: the entry is in use.
pub const ENTRY_IN_USE: u32 = 1;

/// One chunk's record in one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub chunk: u64,
    /// File offset of the chunk's data slot; 0 when the chunk has no slot.
    pub data_offset: u64,
    pub blocks: BlockStates,
    /// CRC-32 of each Data block (images with data checksums; empty otherwise). Entries of
    /// blocks that are not Data are zero.
    pub crcs: Vec<u32>,
}

/// A map entry's fields, borrowed: what encoding needs, without a copy of the entry.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub chunk: u64,
    pub data_offset: u64,
    pub blocks: &'a BlockStates,
    pub crcs: &'a [u32],
}

impl MapEntry {
    pub fn as_ref(&self) -> EntryRef<'_> {
        EntryRef { chunk: self.chunk, data_offset: self.data_offset, blocks: &self.blocks, crcs: &self.crcs }
    }
}

/// Encodes one sector at file offset `sector_offset`; `entries` has one element per entry
/// position (`None` = unused). A sector with no entry in use encodes as all zeros.
pub fn encode_sector(g: &Geometry, sector_offset: u64, entries: &[Option<&MapEntry>]) -> [u8; SECTOR_SIZE] {
    encode_entries(g, sector_offset, entries.iter().map(|e| e.map(MapEntry::as_ref)))
}

/// [`encode_sector`] over borrowed entries, one per entry position.
pub fn encode_entries<'a>(
    g: &Geometry,
    sector_offset: u64,
    entries: impl IntoIterator<Item = Option<EntryRef<'a>>>,
) -> [u8; SECTOR_SIZE] {
    let mut b = [0u8; SECTOR_SIZE];
    let es = g.entry_size();
    for (i, e) in entries.into_iter().enumerate() {
        let at = SECTOR_HEADER + i * es;
        encode_entry(g, e, &mut b[at..at + es]);
    }
    seal_sector(g, sector_offset, &mut b);
    b
}

/// Writes entry `e` (or an unused entry) into `out`, one entry's bytes of a sector. The sector
/// needs [`seal_sector`] afterwards.
pub fn encode_entry(g: &Geometry, e: Option<EntryRef<'_>>, out: &mut [u8]) {
    out.fill(0);
    let Some(e) = e else { return };
    LE::write_u32(out, ENTRY_IN_USE);
    LE::write_u64(&mut out[8..], e.chunk);
    LE::write_u64(&mut out[16..], e.data_offset);
    let planes = 24 + 2 * g.bitmap_bytes();
    e.blocks.encode(g.bitmap_bytes(), &mut out[24..planes]);
    if g.data_checksums {
        for (i, c) in e.crcs.iter().enumerate().take(g.blocks_per_chunk()) {
            LE::write_u32(&mut out[planes + 4 * i..], *c);
        }
    }
}

/// Completes a sector whose entries are written: its magic, offset and CRC, or all zeros if
/// no entry is in use.
pub fn seal_sector(g: &Geometry, sector_offset: u64, b: &mut [u8; SECTOR_SIZE]) {
    let es = g.entry_size();
    let in_use = (0..g.entries_per_sector()).any(|i| LE::read_u32(&b[SECTOR_HEADER + i * es..]) & ENTRY_IN_USE != 0);
    if !in_use {
        b.fill(0);
        return;
    }
    b[4..8].copy_from_slice(&SECTOR_MAGIC);
    LE::write_u64(&mut b[8..16], sector_offset);
    let crc = crc32fast::hash(&b[4..]);
    LE::write_u32(&mut b[0..4], crc);
}

/// Decodes one sector read from file offset `sector_offset`: the in-use entries with their
/// positions. An all-zero sector is empty. Every field is validated against the geometry.
pub fn decode_sector(g: &Geometry, sector_offset: u64, b: &[u8]) -> Result<Vec<(usize, MapEntry)>> {
    // Most sectors of a sparse layer's map are empty: an OR over all bytes, with no early exit,
    // compiles to wide vector ORs, where a byte-wise `all` was a fifth of opening a deep chain.
    if b.iter().fold(0u8, |acc, &x| acc | x) == 0 {
        return Ok(Vec::new());
    }
    let corrupt = |msg: String| err(ErrorKind::Corrupt, msg).at(sector_offset);
    if crc32fast::hash(&b[4..SECTOR_SIZE]) != LE::read_u32(&b[0..4]) {
        return Err(err(ErrorKind::BadChecksum, "map sector checksum mismatch").at(sector_offset));
    }
    if b[4..8] != SECTOR_MAGIC {
        return Err(corrupt("map sector has a bad magic".into()));
    }
    if LE::read_u64(&b[8..16]) != sector_offset {
        return Err(corrupt(format!("map sector claims to live at {} (misplaced write)", LE::read_u64(&b[8..16]))));
    }
    let es = g.entry_size();
    let mut out = Vec::new();
    for i in 0..g.entries_per_sector() {
        let at = SECTOR_HEADER + i * es;
        let raw = &b[at..at + es];
        let flags = LE::read_u32(raw);
        if flags == 0 {
            if raw.iter().any(|&x| x != 0) {
                return Err(corrupt(format!("unused map entry {i} is not zero")));
            }
            continue;
        }
        if flags != ENTRY_IN_USE || LE::read_u32(&raw[4..]) != 0 {
            return Err(corrupt(format!("map entry {i} has unknown flags {flags:#x}")));
        }
        let chunk = LE::read_u64(&raw[8..]);
        if chunk >= g.chunk_count() {
            return Err(corrupt(format!("map entry for chunk {chunk} is past the end of the disk")));
        }
        let data_offset = LE::read_u64(&raw[16..]);
        let blocks = BlockStates::decode(g.blocks_per_chunk(), g.blocks_in_chunk(chunk), g.bitmap_bytes(), &raw[24..])
            .ok_or_else(|| corrupt(format!("map entry for chunk {chunk} has invalid block bits")))?;
        if data_offset == 0 {
            if blocks.count(BlockState::Data) != 0 {
                return Err(corrupt(format!("map entry for chunk {chunk} has data blocks but no data slot")));
            }
        } else if data_offset % g.chunk_size() != 0
            || data_offset < g.data_start()
            || data_offset > MAX_FILE_SIZE - g.chunk_size()
        {
            return Err(corrupt(format!("map entry for chunk {chunk} points at misplaced slot {data_offset}")));
        }
        let mut crcs = Vec::new();
        if g.data_checksums {
            let planes = 24 + 2 * g.bitmap_bytes();
            crcs = (0..g.blocks_per_chunk()).map(|k| LE::read_u32(&raw[planes + 4 * k..])).collect();
            if (0..g.blocks_per_chunk()).any(|k| crcs[k] != 0 && blocks.get(k) != BlockState::Data) {
                return Err(corrupt(format!("map entry for chunk {chunk} has a checksum for a block without data")));
            }
        }
        out.push((i, MapEntry { chunk, data_offset, blocks, crcs }));
    }
    if out.is_empty() {
        return Err(corrupt("map sector has a header but no entries".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom() -> Geometry {
        Geometry::new(1 << 30, 16).unwrap()
    }

    fn entry(chunk: u64, off: u64) -> MapEntry {
        let mut blocks = BlockStates::new(16);
        blocks.set_range(0, 4, BlockState::Data);
        blocks.set_range(4, 6, BlockState::Zero);
        MapEntry { chunk, data_offset: off, blocks, crcs: Vec::new() }
    }

    #[test]
    fn roundtrips_entries_at_their_positions() {
        let g = geom();
        let (a, b) = (entry(3, 131072), entry(9, 196608));
        let mut slots: Vec<Option<&MapEntry>> = vec![None; g.entries_per_sector()];
        slots[0] = Some(&a);
        slots[14] = Some(&b);
        let s = encode_sector(&g, 65536, &slots);
        let got = decode_sector(&g, 65536, &s).unwrap();
        assert_eq!(got, vec![(0, a), (14, b)]);
    }

    #[test]
    fn entry_bytes_sit_where_the_spec_says() {
        let g = geom();
        let a = entry(3, 131072);
        let mut slots: Vec<Option<&MapEntry>> = vec![None; 15];
        slots[1] = Some(&a);
        let s = encode_sector(&g, 65536, &slots);
        assert_eq!(&s[4..8], b"CDMS");
        assert_eq!(LE::read_u64(&s[8..]), 65536);
        let at = 16 + 32;
        assert_eq!(LE::read_u32(&s[at..]), 1);
        assert_eq!(LE::read_u64(&s[at + 8..]), 3);
        assert_eq!(LE::read_u64(&s[at + 16..]), 131072);
        assert_eq!(&s[at + 24..at + 32], &[0x0f, 0, 0, 0, 0x30, 0, 0, 0]);
    }

    #[test]
    fn checksums_follow_the_planes_and_roundtrip() {
        let g = geom().with_data_checksums(true).unwrap();
        let mut a = entry(3, 131072);
        a.crcs = vec![0; 16];
        for (k, c) in a.crcs.iter_mut().enumerate().take(4) {
            *c = 0xdead_0000 + k as u32;
        }
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        assert_eq!(LE::read_u32(&s[16 + 32 + 4..]), 0xdead_0001);
        assert_eq!(decode_sector(&g, 65536, &s).unwrap(), vec![(0, a)]);
    }

    #[test]
    fn rejects_a_checksum_on_a_block_without_data() {
        let g = geom().with_data_checksums(true).unwrap();
        let mut a = entry(3, 131072);
        a.crcs = vec![0; 16];
        a.crcs[5] = 7; // block 5 is Zero
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        assert_eq!(decode_sector(&g, 65536, &s).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn all_zero_sector_is_empty() {
        assert!(decode_sector(&geom(), 65536, &[0u8; 512]).unwrap().is_empty());
    }

    #[test]
    fn rejects_flipped_bit_by_checksum() {
        let g = geom();
        let a = entry(3, 131072);
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        for byte in [0, 5, 20, 40, 511] {
            let mut t = s;
            t[byte] ^= 4;
            assert_eq!(decode_sector(&g, 65536, &t).unwrap_err().kind(), ErrorKind::BadChecksum);
        }
    }

    #[test]
    fn rejects_sector_read_from_another_offset() {
        let g = geom();
        let a = entry(3, 131072);
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        let e = decode_sector(&g, 66048, &s).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("misplaced"));
    }

    #[test]
    fn rejects_map_entry_for_chunk_past_end_of_disk() {
        let g = geom();
        let a = entry(g.chunk_count(), 131072);
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        assert!(decode_sector(&g, 65536, &s).unwrap_err().to_string().contains("past the end"));
    }

    #[test]
    fn rejects_map_entry_pointing_into_the_header() {
        let g = geom();
        let a = entry(1, 0x1000);
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        assert_eq!(decode_sector(&g, 65536, &s).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_data_blocks_without_a_slot() {
        let g = geom();
        let a = entry(1, 0);
        let s = encode_sector(&g, 65536, &[Some(&a)]);
        assert!(decode_sector(&g, 65536, &s).unwrap_err().to_string().contains("no data slot"));
    }
}
