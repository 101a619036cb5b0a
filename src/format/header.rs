//! The image header: its 4096-byte slot layout, the parent reference inside it, and the
//! rule for choosing between the two slots (spec §2, §3).

use super::*;
use crate::error::Error;
use byteorder::{ByteOrder, LittleEndian as LE};

/// Byte offsets inside a header slot (spec §2.1).
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const SLOT_SIZE: usize = 12;
    pub const GENERATION: usize = 16;
    pub const INCOMPAT: usize = 24;
    pub const COMPAT: usize = 32;
    pub const VIRTUAL_SIZE: usize = 40;
    pub const CHUNK_SHIFT: usize = 48;
    pub const BLOCK_SHIFT: usize = 49;
    pub const UUID: usize = 56;
    pub const FLAGS: usize = 72;
    pub const PARENT_FORMAT: usize = 80;
    pub const PARENT_PATH_LEN: usize = 84;
    pub const PARENT_UUID: usize = 88;
    pub const PARENT_SIZE: usize = 104;
    pub const PARENT_FINGERPRINT: usize = 112;
    pub const EXTENT_COUNT: usize = 116;
    pub const EXTENTS: usize = 120;
    pub const PARENT_PATH: usize = 1144;
    pub const PENDING_KIND: usize = 3192;
    pub const PENDING_LENS: usize = 3196;
    pub const PENDING_NAMES: usize = 3204;
    pub const JOURNAL_OFFSET: usize = 3972;
    pub const JOURNAL_LEN: usize = 3980;
    pub const CRC: usize = 4092;
}

/// How the parent's bytes are to be read; recorded at create, never probed on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentFormat {
    Raw,
    Cowdisk,
    /// A layer in an object store, named by URL (spec §9); its manifest says whether it is
    /// a cowdisk layer or a raw base.
    Remote,
}

impl ParentFormat {
    pub fn name(self) -> &'static str {
        match self {
            ParentFormat::Raw => "raw",
            ParentFormat::Cowdisk => "cowdisk",
            ParentFormat::Remote => "remote",
        }
    }
}

/// Who the parent is: where to find it and how to recognise it (spec §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    pub format: ParentFormat,
    /// Path bytes as given (relative paths are relative to the overlay's directory).
    pub path: Vec<u8>,
    /// The parent's image UUID (cowdisk parents); zero for raw parents.
    pub uuid: [u8; 16],
    /// Virtual size (cowdisk parent) or file length (raw parent).
    pub size: u64,
    /// Raw parents: fingerprint of sampled content (spec §3.2); zero for cowdisk.
    pub fingerprint: u32,
}

/// A run of the file holding map sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    pub offset: u64,
    pub len: u64,
}

impl MapExtent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub incompat: u64,
    pub compat: u64,
    pub geometry: Geometry,
    pub uuid: [u8; 16],
    pub flags: u64,
    pub parent: Option<ParentRef>,
    pub map_extents: Vec<MapExtent>,
    /// An interrupted snapshot to finish (spec §5.7).
    pub pending: Option<PendingSnapshot>,
    /// The redo journal's area (spec §5.9), with INCOMPAT_JOURNAL.
    pub journal: Option<MapExtent>,
}

/// The intent record of a snapshot (spec §5.7): once it is durable in a frozen image's header,
/// the snapshot is decided, and whoever opens the image by its live name completes it.
/// Names are file names in the image's directory (no '/', no NUL, 1 to 255 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSnapshot {
    /// The name the image had, which becomes the new overlay's.
    pub live: Vec<u8>,
    /// The name the frozen image takes.
    pub snapshot: Vec<u8>,
    /// The complete new overlay, waiting under a temporary name.
    pub temp: Vec<u8>,
}

/// Longest file name a pending snapshot records.
pub const MAX_PENDING_NAME: usize = 255;
const PENDING_NAME_SLOT: usize = 256;

impl Header {
    pub fn new(geometry: Geometry, uuid: [u8; 16], parent: Option<ParentRef>) -> Header {
        Header {
            generation: 1,
            incompat: 0,
            compat: 0,
            geometry,
            uuid,
            flags: 0,
            parent,
            map_extents: Vec::new(),
            pending: None,
            journal: None,
        }
    }

    pub fn has_flag(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }

    pub fn set_flag(&mut self, flag: u64, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// The slot a header of this generation lives in: even generations in slot 0, odd in slot 1.
    pub fn slot_offset(&self) -> u64 {
        (self.generation % 2) * HEADER_SLOT_SIZE as u64
    }

    pub fn encode(&self) -> [u8; HEADER_SLOT_SIZE] {
        let mut b = [0u8; HEADER_SLOT_SIZE];
        b[off::MAGIC..off::MAGIC + 8].copy_from_slice(&MAGIC);
        LE::write_u32(&mut b[off::VERSION..], VERSION);
        LE::write_u32(&mut b[off::SLOT_SIZE..], HEADER_SLOT_SIZE as u32);
        LE::write_u64(&mut b[off::GENERATION..], self.generation);
        let mut incompat = if self.geometry.data_checksums {
            self.incompat | INCOMPAT_DATA_CHECKSUMS
        } else {
            self.incompat & !INCOMPAT_DATA_CHECKSUMS
        };
        incompat &= !(INCOMPAT_JOURNAL | INCOMPAT_LOG);
        if self.geometry.log {
            incompat |= INCOMPAT_LOG;
        }
        if let Some(j) = &self.journal {
            incompat |= INCOMPAT_JOURNAL;
            LE::write_u64(&mut b[off::JOURNAL_OFFSET..], j.offset);
            LE::write_u64(&mut b[off::JOURNAL_LEN..], j.len);
        }
        LE::write_u64(&mut b[off::INCOMPAT..], incompat);
        LE::write_u64(&mut b[off::COMPAT..], self.compat);
        LE::write_u64(&mut b[off::VIRTUAL_SIZE..], self.geometry.virtual_size);
        b[off::CHUNK_SHIFT] = self.geometry.chunk_shift as u8;
        b[off::BLOCK_SHIFT] = BLOCK_SHIFT as u8;
        b[off::UUID..off::UUID + 16].copy_from_slice(&self.uuid);
        LE::write_u64(&mut b[off::FLAGS..], self.flags);
        if let Some(p) = &self.parent {
            let fmt = match p.format {
                ParentFormat::Raw => 1,
                ParentFormat::Cowdisk => 2,
                ParentFormat::Remote => 3,
            };
            LE::write_u32(&mut b[off::PARENT_FORMAT..], fmt);
            LE::write_u32(&mut b[off::PARENT_PATH_LEN..], p.path.len() as u32);
            b[off::PARENT_UUID..off::PARENT_UUID + 16].copy_from_slice(&p.uuid);
            LE::write_u64(&mut b[off::PARENT_SIZE..], p.size);
            LE::write_u32(&mut b[off::PARENT_FINGERPRINT..], p.fingerprint);
            b[off::PARENT_PATH..off::PARENT_PATH + p.path.len()].copy_from_slice(&p.path);
        }
        LE::write_u32(&mut b[off::EXTENT_COUNT..], self.map_extents.len() as u32);
        for (i, e) in self.map_extents.iter().enumerate() {
            let at = off::EXTENTS + 16 * i;
            LE::write_u64(&mut b[at..], e.offset);
            LE::write_u64(&mut b[at + 8..], e.len);
        }
        if let Some(p) = &self.pending {
            LE::write_u32(&mut b[off::PENDING_KIND..], 1);
            for (i, name) in [&p.live, &p.snapshot, &p.temp].into_iter().enumerate() {
                LE::write_u16(&mut b[off::PENDING_LENS + 2 * i..], name.len() as u16);
                let at = off::PENDING_NAMES + PENDING_NAME_SLOT * i;
                b[at..at + name.len()].copy_from_slice(name);
            }
        }
        let crc = crc32fast::hash(&b[..off::CRC]);
        LE::write_u32(&mut b[off::CRC..], crc);
        b
    }

    /// Decodes and validates one slot. Errors carry no file context; the caller adds it.
    pub fn decode(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SLOT_SIZE {
            return Err(err(ErrorKind::Truncated, "header slot is truncated"));
        }
        if b[off::MAGIC..off::MAGIC + 8] != MAGIC {
            return Err(err(ErrorKind::NotAnImage, "not a cowdisk image (bad magic)"));
        }
        let crc = LE::read_u32(&b[off::CRC..]);
        if crc32fast::hash(&b[..off::CRC]) != crc {
            return Err(err(ErrorKind::BadChecksum, "header checksum mismatch"));
        }
        let version = LE::read_u32(&b[off::VERSION..]);
        if version != VERSION {
            return Err(err(
                ErrorKind::Unsupported,
                format!("format version {version} is not supported (this build reads version {VERSION})"),
            ));
        }
        let slot = LE::read_u32(&b[off::SLOT_SIZE..]);
        if slot as usize != HEADER_SLOT_SIZE {
            return Err(err(ErrorKind::Corrupt, format!("header slot size {slot} is not 4096")));
        }
        let incompat = LE::read_u64(&b[off::INCOMPAT..]);
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(err(
                ErrorKind::Unsupported,
                format!("unknown incompatible features {:#x}", incompat & !KNOWN_INCOMPAT),
            ));
        }
        let flags = LE::read_u64(&b[off::FLAGS..]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(err(ErrorKind::Unsupported, format!("unknown header flags {:#x}", flags & !KNOWN_FLAGS)));
        }
        if u32::from(b[off::BLOCK_SHIFT]) != BLOCK_SHIFT {
            return Err(err(ErrorKind::Corrupt, format!("block size 2^{} is not 4096", b[off::BLOCK_SHIFT])));
        }
        let geometry = Geometry::new(LE::read_u64(&b[off::VIRTUAL_SIZE..]), u32::from(b[off::CHUNK_SHIFT]))
            .and_then(|g| g.with_data_checksums(incompat & INCOMPAT_DATA_CHECKSUMS != 0))
            .and_then(|g| g.with_log(incompat & INCOMPAT_LOG != 0))
            .map_err(|e| err(ErrorKind::Corrupt, e.message().to_string()))?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[off::UUID..off::UUID + 16]);

        // Rules 9 to 11 of spec §2.1, in its order: parent, map extents, pending snapshot.
        let parent = decode_parent(b)?;
        let count = LE::read_u32(&b[off::EXTENT_COUNT..]) as usize;
        if count > MAX_MAP_EXTENTS {
            return Err(err(ErrorKind::Corrupt, format!("{count} map extents (at most {MAX_MAP_EXTENTS})")));
        }
        let mut map_extents: Vec<MapExtent> = Vec::with_capacity(count);
        for i in 0..count {
            let at = off::EXTENTS + 16 * i;
            let e = MapExtent { offset: LE::read_u64(&b[at..]), len: LE::read_u64(&b[at + 8..]) };
            validate_extent(&geometry, &e)?;
            if map_extents.iter().any(|o| e.offset < o.end() && o.offset < e.end()) {
                return Err(err(ErrorKind::Corrupt, format!("map extent {i} overlaps another")));
            }
            map_extents.push(e);
        }
        let pending = decode_pending(b)?;
        let journal = if incompat & INCOMPAT_JOURNAL != 0 {
            let j = MapExtent {
                offset: LE::read_u64(&b[off::JOURNAL_OFFSET..]),
                len: LE::read_u64(&b[off::JOURNAL_LEN..]),
            };
            validate_extent(&geometry, &j)
                .and_then(|_| {
                    if j.len > MAX_JOURNAL {
                        Err(err(ErrorKind::Corrupt, format!("a journal of {} bytes (at most {MAX_JOURNAL})", j.len)))
                    } else if map_extents.iter().any(|o| j.offset < o.end() && o.offset < j.end()) {
                        Err(err(ErrorKind::Corrupt, "the journal overlaps a map extent"))
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| err(ErrorKind::Corrupt, format!("journal: {}", e.message())))?;
            Some(j)
        } else {
            None
        };
        Ok(Header {
            generation: LE::read_u64(&b[off::GENERATION..]),
            incompat,
            compat: LE::read_u64(&b[off::COMPAT..]),
            geometry,
            uuid,
            flags,
            parent,
            map_extents,
            pending,
            journal,
        })
    }

    /// Decodes slot `slot` (0 or 1): like [`Header::decode`], and the generation must belong
    /// in that slot (even generations in slot 0, odd in slot 1).
    pub fn decode_slot(b: &[u8], slot: u64) -> Result<Header> {
        let h = Header::decode(b)?;
        if h.generation % 2 != slot {
            return Err(err(
                ErrorKind::Corrupt,
                format!("header generation {} does not belong in slot {slot}", h.generation),
            ));
        }
        Ok(h)
    }

    /// Picks the current header from the two slots: the valid one with the higher generation.
    /// Returns the header and whether the other slot was unreadable (a torn header write).
    ///
    /// Only a slot that fails its checksum (or holds no header at all) may be passed over: that
    /// is what an interrupted header write leaves. A slot that passes its checksum but is
    /// refused (unknown version or incompatible feature, invalid contents) refuses the image,
    /// so an old reader never falls back to stale metadata behind a newer writer's header.
    pub fn choose(area: &[u8]) -> Result<(Header, bool)> {
        let a = Header::decode_slot(&area[..HEADER_SLOT_SIZE], 0);
        let b = Header::decode_slot(&area[HEADER_SLOT_SIZE..], 1);
        let torn = |e: &Error| matches!(e.kind(), ErrorKind::BadChecksum | ErrorKind::NotAnImage);
        match (a, b) {
            (Ok(a), Ok(b)) => Ok((if b.generation > a.generation { b } else { a }, false)),
            (Err(e), _) | (_, Err(e)) if !torn(&e) => Err(e),
            (Ok(h), Err(_)) | (Err(_), Ok(h)) => Ok((h, true)),
            (Err(ea), Err(eb)) => {
                // Report the most telling failure: a non-image only if neither slot looks like one.
                if ea.kind() == ErrorKind::NotAnImage {
                    Err(eb)
                } else {
                    Err(ea)
                }
            }
        }
    }
}

fn decode_pending(b: &[u8]) -> Result<Option<PendingSnapshot>> {
    let kind = LE::read_u32(&b[off::PENDING_KIND..]);
    let area = &b[off::PENDING_LENS..off::PENDING_NAMES + 3 * PENDING_NAME_SLOT];
    match kind {
        0 if area.iter().all(|&x| x == 0) => Ok(None),
        0 => Err(err(ErrorKind::Corrupt, "pending-snapshot fields set without a pending snapshot")),
        1 => {
            let mut names = Vec::with_capacity(3);
            for i in 0..3 {
                let len = LE::read_u16(&b[off::PENDING_LENS + 2 * i..]) as usize;
                let at = off::PENDING_NAMES + PENDING_NAME_SLOT * i;
                let name = &b[at..at + PENDING_NAME_SLOT];
                if len == 0
                    || len > MAX_PENDING_NAME
                    || name[..len].iter().any(|&c| c == 0 || c == b'/')
                    || name[len..].iter().any(|&c| c != 0)
                {
                    return Err(err(ErrorKind::Corrupt, "pending snapshot names a file badly"));
                }
                names.push(name[..len].to_vec());
            }
            let temp = names.pop().unwrap_or_default();
            let snapshot = names.pop().unwrap_or_default();
            let live = names.pop().unwrap_or_default();
            Ok(Some(PendingSnapshot { live, snapshot, temp }))
        }
        k => Err(err(ErrorKind::Unsupported, format!("unknown pending operation {k}"))),
    }
}

fn decode_parent(b: &[u8]) -> Result<Option<ParentRef>> {
    let fmt = LE::read_u32(&b[off::PARENT_FORMAT..]);
    let len = LE::read_u32(&b[off::PARENT_PATH_LEN..]) as usize;
    let format = match fmt {
        0 => {
            if len != 0 {
                return Err(err(ErrorKind::Corrupt, "parent path without a parent format"));
            }
            return Ok(None);
        }
        1 => ParentFormat::Raw,
        2 => ParentFormat::Cowdisk,
        3 => ParentFormat::Remote,
        other => return Err(err(ErrorKind::Corrupt, format!("unknown parent format {other}"))),
    };
    if len == 0 || len > MAX_PARENT_PATH {
        return Err(err(ErrorKind::Corrupt, format!("parent path length {len} out of range (1 to {MAX_PARENT_PATH})")));
    }
    let path = b[off::PARENT_PATH..off::PARENT_PATH + len].to_vec();
    if path.contains(&0) {
        return Err(err(ErrorKind::Corrupt, "parent path contains a NUL byte"));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[off::PARENT_UUID..off::PARENT_UUID + 16]);
    Ok(Some(ParentRef {
        format,
        path,
        uuid,
        size: LE::read_u64(&b[off::PARENT_SIZE..]),
        fingerprint: LE::read_u32(&b[off::PARENT_FINGERPRINT..]),
    }))
}

fn validate_extent(g: &Geometry, e: &MapExtent) -> Result<()> {
    let cs = g.chunk_size();
    let ok = e.offset >= g.data_start()
        && e.offset % cs == 0
        && e.len > 0
        && e.len % cs == 0
        && e.offset.checked_add(e.len).is_some_and(|end| end <= MAX_FILE_SIZE);
    if ok {
        Ok(())
    } else {
        Err(err(ErrorKind::Corrupt, format!("map extent at {} length {} is misplaced", e.offset, e.len)))
    }
}

/// Largest file offset any structure may reach: far beyond any real file, small enough that
/// offset arithmetic on validated values never overflows.
pub const MAX_FILE_SIZE: u64 = 1 << 62;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let g = Geometry::new(1 << 30, 16).unwrap();
        let mut h = Header::new(
            g,
            [7; 16],
            Some(ParentRef {
                format: ParentFormat::Cowdisk,
                path: b"base.cow".to_vec(),
                uuid: [9; 16],
                size: 1 << 30,
                fingerprint: 0,
            }),
        );
        h.map_extents.push(MapExtent { offset: 65536, len: 65536 });
        h
    }

    /// A header slot that breaks every validity rule of spec §2.1 at once, mended one rule at a
    /// time in the spec's order: each time, the error is the next rule's.
    #[test]
    fn validity_rules_are_applied_in_the_order_the_spec_lists_them() {
        let mut b = sample().encode();
        let reseal = |b: &mut [u8; HEADER_SLOT_SIZE]| {
            let crc = crc32fast::hash(&b[..off::CRC]);
            LE::write_u32(&mut b[off::CRC..], crc);
        };
        // Break rules 3 to 12 (rule 12: generation 5 in slot 0).
        LE::write_u32(&mut b[off::VERSION..], 2);
        LE::write_u32(&mut b[off::SLOT_SIZE..], 512);
        LE::write_u64(&mut b[off::INCOMPAT..], 1 << 7);
        LE::write_u64(&mut b[off::FLAGS..], 1 << 9);
        b[off::BLOCK_SHIFT] = 9;
        b[off::CHUNK_SHIFT] = 30;
        LE::write_u32(&mut b[off::PARENT_FORMAT..], 7);
        LE::write_u32(&mut b[off::EXTENT_COUNT..], 65);
        LE::write_u32(&mut b[off::PENDING_KIND..], 2);
        LE::write_u64(&mut b[off::GENERATION..], 5);
        // Rules 1 and 2: the magic, then the checksum.
        let good_magic = b[..8].to_vec();
        b[0] = b'X';
        assert_eq!(Header::decode_slot(&b, 0).unwrap_err().kind(), ErrorKind::NotAnImage);
        b[..8].copy_from_slice(&good_magic);
        assert_eq!(Header::decode_slot(&b, 0).unwrap_err().kind(), ErrorKind::BadChecksum);
        reseal(&mut b);
        type Mend<'a> = (&'a str, &'a dyn Fn(&mut [u8; HEADER_SLOT_SIZE]));
        let mends: [Mend; 10] = [
            ("version", &|b| LE::write_u32(&mut b[off::VERSION..], 1)),
            ("slot size", &|b| LE::write_u32(&mut b[off::SLOT_SIZE..], 4096)),
            ("incompatible", &|b| LE::write_u64(&mut b[off::INCOMPAT..], 0)),
            ("flags", &|b| LE::write_u64(&mut b[off::FLAGS..], 0)),
            ("block size", &|b| b[off::BLOCK_SHIFT] = 12),
            ("chunk", &|b| b[off::CHUNK_SHIFT] = 16),
            ("parent", &|b| LE::write_u32(&mut b[off::PARENT_FORMAT..], 2)),
            ("map extents", &|b| LE::write_u32(&mut b[off::EXTENT_COUNT..], 1)),
            ("pending", &|b| LE::write_u32(&mut b[off::PENDING_KIND..], 0)),
            ("slot", &|b| LE::write_u64(&mut b[off::GENERATION..], 4)),
        ];
        for (rule, (word, mend)) in (3..=12).zip(mends) {
            let e = Header::decode_slot(&b, 0).expect_err("still invalid");
            assert!(e.to_string().contains(word), "rule {rule} ({word}) is not the one reported: {e}");
            mend(&mut b);
            reseal(&mut b);
        }
        assert!(Header::decode_slot(&b, 0).is_ok());
    }

    #[test]
    fn roundtrips_every_field() {
        let mut h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        h.pending = Some(PendingSnapshot {
            live: b"disk.cow".to_vec(),
            snapshot: b"snap1.cow".to_vec(),
            temp: b".disk.cow.snapshot-1.tmp".to_vec(),
        });
        let b = h.encode();
        assert_eq!(LE::read_u32(&b[3192..]), 1);
        assert_eq!(LE::read_u16(&b[3198..]), 9);
        assert_eq!(&b[3204 + 256..3204 + 256 + 9], b"snap1.cow");
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn rejects_pending_snapshot_name_with_a_slash() {
        let mut h = sample();
        h.pending = Some(PendingSnapshot { live: b"a".to_vec(), snapshot: b"../b".to_vec(), temp: b"t".to_vec() });
        assert_eq!(Header::decode(&h.encode()).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn fields_sit_at_the_offsets_the_spec_gives() {
        let b = sample().encode();
        assert_eq!(&b[0..8], b"COWDISK\0");
        assert_eq!(LE::read_u32(&b[8..]), 1);
        assert_eq!(LE::read_u32(&b[12..]), 4096);
        assert_eq!(LE::read_u64(&b[16..]), 1);
        assert_eq!(LE::read_u64(&b[40..]), 1 << 30);
        assert_eq!((b[48], b[49]), (16, 12));
        assert_eq!(&b[56..72], &[7; 16]);
        assert_eq!(LE::read_u32(&b[80..]), 2);
        assert_eq!(LE::read_u32(&b[84..]), 8);
        assert_eq!(&b[88..104], &[9; 16]);
        assert_eq!(LE::read_u32(&b[116..]), 1);
        assert_eq!(LE::read_u64(&b[120..]), 65536);
        assert_eq!(&b[1144..1152], b"base.cow");
        assert_eq!(LE::read_u32(&b[4092..]), crc32fast::hash(&b[..4092]));
    }

    #[test]
    fn rejects_bad_magic_as_not_an_image() {
        let mut b = sample().encode();
        b[0] = b'X';
        assert_eq!(Header::decode(&b).unwrap_err().kind(), ErrorKind::NotAnImage);
    }

    #[test]
    fn rejects_any_flipped_bit_by_checksum() {
        let good = sample().encode();
        for byte in [9, 40, 200, 1144, 3000, 4091] {
            let mut b = good;
            b[byte] ^= 0x10;
            assert_eq!(Header::decode(&b).unwrap_err().kind(), ErrorKind::BadChecksum, "byte {byte}");
        }
    }

    fn reseal(b: &mut [u8; HEADER_SLOT_SIZE]) {
        let crc = crc32fast::hash(&b[..4092]);
        LE::write_u32(&mut b[4092..], crc);
    }

    #[test]
    fn data_checksum_feature_bit_roundtrips_through_the_geometry() {
        let mut h = sample();
        h.geometry = h.geometry.with_data_checksums(true).unwrap();
        let b = h.encode();
        assert_eq!(LE::read_u64(&b[24..]), 1);
        let d = Header::decode(&b).unwrap();
        assert!(d.geometry.data_checksums);
        assert_eq!(d.incompat & INCOMPAT_DATA_CHECKSUMS, d.incompat);
    }

    #[test]
    fn rejects_unknown_incompatible_feature_but_not_compatible_one() {
        let mut b = sample().encode();
        LE::write_u64(&mut b[24..], 1 << 40);
        reseal(&mut b);
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("incompatible"));
        let mut b = sample().encode();
        LE::write_u64(&mut b[32..], 1 << 40);
        reseal(&mut b);
        assert!(Header::decode(&b).is_ok());
    }

    #[test]
    fn rejects_chunk_size_out_of_range_as_corrupt() {
        let mut b = sample().encode();
        b[48] = 22;
        reseal(&mut b);
        assert_eq!(Header::decode(&b).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_map_extent_inside_the_header_area() {
        let mut b = sample().encode();
        LE::write_u64(&mut b[120..], 0);
        reseal(&mut b);
        assert_eq!(Header::decode(&b).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_overlapping_map_extents() {
        let mut h = sample();
        h.map_extents.push(MapExtent { offset: 65536, len: 131072 });
        assert_eq!(Header::decode(&h.encode()).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_map_extent_reaching_past_max_file_size() {
        let mut h = sample();
        h.map_extents[0].len = u64::MAX - 65535;
        assert_eq!(Header::decode(&h.encode()).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn rejects_overlong_parent_path() {
        let mut b = sample().encode();
        LE::write_u32(&mut b[84..], 2049);
        reseal(&mut b);
        assert_eq!(Header::decode(&b).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn chooses_the_higher_valid_generation() {
        let mut h1 = sample();
        h1.generation = 4;
        let mut h2 = sample();
        h2.generation = 5;
        h2.flags = FLAG_FROZEN;
        let mut area = vec![0u8; 8192];
        area[..4096].copy_from_slice(&h1.encode());
        area[4096..].copy_from_slice(&h2.encode());
        assert_eq!(Header::choose(&area).unwrap(), (h2.clone(), false));
        area[5000] ^= 1; // torn write of the newer slot: fall back to the older
        assert_eq!(Header::choose(&area).unwrap(), (h1, true));
    }

    #[test]
    fn a_newer_slot_with_an_unknown_feature_refuses_instead_of_falling_back() {
        let mut h1 = sample();
        h1.generation = 4;
        let mut h2 = sample();
        h2.generation = 5;
        h2.incompat = 1 << 33;
        let mut area = vec![0u8; 8192];
        area[..4096].copy_from_slice(&h1.encode());
        area[4096..].copy_from_slice(&h2.encode());
        assert_eq!(Header::choose(&area).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn rejects_generation_in_the_wrong_slot() {
        let mut h = sample();
        h.generation = 3;
        let mut area = vec![0u8; 8192];
        area[..4096].copy_from_slice(&h.encode());
        area[4096..].copy_from_slice(&h.encode());
        let e = Header::choose(&area).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("slot 0"));
    }
}
