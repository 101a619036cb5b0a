//! The on-disk format: every constant of format-spec.md, the image geometry, and the codecs
//! for header, parent reference, map sectors and raw-parent fingerprints.
//!
//! Nothing in here does I/O except through [`crate::storage::Storage`] in the fingerprint;
//! encode/decode are pure so that they can be tested byte by byte against the spec.

pub mod blocks;
pub mod fingerprint;
pub mod header;
pub mod map;

use crate::error::{err, ErrorKind, Result};

/// Bytes 0..8 of both header slots (spec §2).
pub const MAGIC: [u8; 8] = *b"COWDISK\0";
/// The only format version this build reads and writes (spec §8).
pub const VERSION: u32 = 1;
/// Size of one header slot; slot 0 at offset 0, slot 1 at offset 4096 (spec §2).
pub const HEADER_SLOT_SIZE: usize = 4096;
/// Bytes reserved for the two header slots at the start of the file.
pub const HEADER_AREA: u64 = 2 * HEADER_SLOT_SIZE as u64;
/// Unit of atomic update for the map (spec §5, media assumptions).
pub const SECTOR_SIZE: usize = 512;
/// log2 of the block size: the unit of presence inside a chunk.
pub const BLOCK_SHIFT: u32 = 12;
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SHIFT;
pub const MIN_CHUNK_SHIFT: u32 = 12;
/// The chunk size of a log-structured image (INCOMPAT_LOG, spec §5.10): 8 KiB.
pub const LOG_CHUNK_SHIFT: u32 = 13;
pub const MAX_CHUNK_SHIFT: u32 = 21;
pub const DEFAULT_CHUNK_SHIFT: u32 = 16;
/// Virtual sizes are whole 512-byte sectors, at least one, at most 2^60 bytes.
pub const SIZE_ALIGN: u64 = 512;
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 60;
/// Most images in one chain, counting the top and a raw base.
pub const MAX_CHAIN_DEPTH: usize = 256;
pub const MAX_PARENT_PATH: usize = 2048;
pub const MAX_MAP_EXTENTS: usize = 64;
/// The smallest map extent; later extents double the map's size (spec §4.3).
pub const MIN_MAP_EXTENT: u64 = 64 * 1024;

/// Header flags (spec §2.2).
pub const FLAG_FROZEN: u64 = 1 << 0;
pub const FLAG_DIRTY: u64 = 1 << 1;
pub const FLAG_CORRUPT: u64 = 1 << 2;
pub const KNOWN_FLAGS: u64 = FLAG_FROZEN | FLAG_DIRTY | FLAG_CORRUPT;

/// Incompatible feature: every data block carries a CRC-32 in its map entry (spec §2.3, §4.2).
pub const INCOMPAT_DATA_CHECKSUMS: u64 = 1 << 0;
/// Incompatible features this build understands.
/// The image has a redo journal (spec §5.9): its map on the file may be older than its last
/// flush until the journal is replayed, so a reader that does not know it must refuse.
pub const INCOMPAT_JOURNAL: u64 = 1 << 1;
/// The journal's records live in the data area and a record's blocks stay there as their home
/// (spec §5.10): a reader that does not follow the records out of the journal area would read
/// a map that is older than the last flush.
pub const INCOMPAT_LOG: u64 = 1 << 2;
pub const KNOWN_INCOMPAT: u64 = INCOMPAT_DATA_CHECKSUMS | INCOMPAT_JOURNAL | INCOMPAT_LOG;
/// Longest journal area a header may list.
pub const MAX_JOURNAL: u64 = 64 << 20;
/// Largest chunk size that may carry data checksums: the entry must fit in one map sector.
pub const MAX_CHECKSUM_CHUNK_SHIFT: u32 = 18;

/// The shape of one image's address space, derived from the header's size and chunk shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub virtual_size: u64,
    pub chunk_shift: u32,
    /// Whether map entries carry a CRC-32 per block (INCOMPAT_DATA_CHECKSUMS).
    pub data_checksums: bool,
    /// Whether the image's durable writes of new chunks go to a log in the data area whose
    /// records are those chunks' slots (INCOMPAT_LOG, spec §5.10): 8 KiB chunks, no checksums.
    pub log: bool,
}

impl Geometry {
    /// Validates a size and chunk shift the way the header decoder does.
    pub fn new(virtual_size: u64, chunk_shift: u32) -> Result<Geometry> {
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&chunk_shift) {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("chunk size 2^{chunk_shift} is out of range (4 KiB to 2 MiB, a power of two)"),
            ));
        }
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || virtual_size % SIZE_ALIGN != 0 {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("virtual size {virtual_size} is invalid (a multiple of 512, at least 512, at most 2^60)"),
            ));
        }
        Ok(Geometry { virtual_size, chunk_shift, data_checksums: false, log: false })
    }

    /// The same geometry with per-block data checksums; chunks of at most 256 KiB only.
    pub fn with_data_checksums(self, on: bool) -> Result<Geometry> {
        if on && self.chunk_shift > MAX_CHECKSUM_CHUNK_SHIFT {
            return Err(err(ErrorKind::InvalidArgument, "data checksums need a chunk size of at most 256 KiB"));
        }
        if on && self.log {
            return Err(err(ErrorKind::InvalidArgument, "a log-structured image has no data checksums"));
        }
        Ok(Geometry { data_checksums: on, ..self })
    }

    /// The same geometry with the log-structured data home of spec §5.10: 8 KiB chunks only
    /// (a record is one cluster, the new slot of the chunk written: its block where the slot
    /// has it, the record's head in the other), and no data checksums (a block's checksum
    /// would have to be written with it, in the same record).
    pub fn with_log(self, on: bool) -> Result<Geometry> {
        if on && self.chunk_shift != LOG_CHUNK_SHIFT {
            return Err(err(ErrorKind::InvalidArgument, "a log-structured image needs 8 KiB chunks"));
        }
        if on && self.data_checksums {
            return Err(err(ErrorKind::InvalidArgument, "a log-structured image has no data checksums"));
        }
        Ok(Geometry { log: on, ..self })
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub fn blocks_per_chunk(&self) -> usize {
        1 << (self.chunk_shift - BLOCK_SHIFT)
    }

    pub fn chunk_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.chunk_size())
    }

    /// Bytes of one bitmap plane in a map entry: max(4, blocks_per_chunk / 8) (spec §4.2).
    pub fn bitmap_bytes(&self) -> usize {
        (self.blocks_per_chunk() / 8).max(4)
    }

    /// Bytes of one map entry: 24 + 2 bitmap planes (+ 4 per block with data checksums).
    pub fn entry_size(&self) -> usize {
        24 + 2 * self.bitmap_bytes() + self.checksum_bytes()
    }

    /// Bytes of the per-block CRC-32 array of a map entry (0 without data checksums).
    pub fn checksum_bytes(&self) -> usize {
        if self.data_checksums {
            4 * self.blocks_per_chunk()
        } else {
            0
        }
    }

    pub fn entries_per_sector(&self) -> usize {
        (SECTOR_SIZE - map::SECTOR_HEADER) / self.entry_size()
    }

    /// First byte a data slot or map extent may occupy: the header area rounded up to a chunk.
    pub fn data_start(&self) -> u64 {
        HEADER_AREA.next_multiple_of(self.chunk_size())
    }

    /// Number of blocks of chunk `chunk` that lie inside the virtual size (the last chunk may be short).
    pub fn blocks_in_chunk(&self, chunk: u64) -> usize {
        let start = chunk << self.chunk_shift;
        let end = (start + self.chunk_size()).min(self.virtual_size);
        (end - start).div_ceil(BLOCK_SIZE) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_spec_table() {
        let g = Geometry::new(1 << 30, DEFAULT_CHUNK_SHIFT).unwrap();
        assert_eq!(g.chunk_size(), 65536);
        assert_eq!(g.blocks_per_chunk(), 16);
        assert_eq!(g.bitmap_bytes(), 4);
        assert_eq!(g.entry_size(), 32);
        assert_eq!(g.entries_per_sector(), 15);
        assert_eq!(g.data_start(), 65536);
        assert_eq!(g.chunk_count(), 16384);
    }

    #[test]
    fn smallest_and_largest_chunk_entry_sizes_match_spec_table() {
        let small = Geometry::new(1 << 20, 12).unwrap();
        assert_eq!((small.entry_size(), small.entries_per_sector(), small.data_start()), (32, 15, 8192));
        let big = Geometry::new(1 << 30, 21).unwrap();
        assert_eq!(big.bitmap_bytes(), 64);
        assert_eq!((big.entry_size(), big.entries_per_sector()), (152, 3));
    }

    #[test]
    fn checksum_entries_match_spec_table() {
        let g = Geometry::new(1 << 30, 16).unwrap().with_data_checksums(true).unwrap();
        assert_eq!((g.entry_size(), g.entries_per_sector()), (96, 5));
        let g = Geometry::new(1 << 30, 18).unwrap().with_data_checksums(true).unwrap();
        assert_eq!((g.entry_size(), g.entries_per_sector()), (296, 1));
        assert!(Geometry::new(1 << 30, 19).unwrap().with_data_checksums(true).is_err());
    }

    #[test]
    fn rejects_chunk_size_out_of_range() {
        assert_eq!(Geometry::new(1 << 20, 11).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(Geometry::new(1 << 20, 22).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn rejects_zero_unaligned_and_huge_sizes() {
        for s in [0, 511, 513, MAX_VIRTUAL_SIZE + 512] {
            assert!(Geometry::new(s, 16).is_err(), "size {s} accepted");
        }
        assert!(Geometry::new(MAX_VIRTUAL_SIZE, 16).is_ok());
    }

    #[test]
    fn last_chunk_counts_only_blocks_inside_the_disk() {
        let g = Geometry::new(65536 + 4096 + 512, 16).unwrap();
        assert_eq!(g.chunk_count(), 2);
        assert_eq!(g.blocks_in_chunk(0), 16);
        assert_eq!(g.blocks_in_chunk(1), 2);
    }
}
