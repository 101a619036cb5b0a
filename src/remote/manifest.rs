//! The objects of a repository that are not chunk data (format-spec §9.3, §9.4, §9.8): the
//! manifest of a layer, the index of a pack and a trace, each encoded and decoded here, pure.
//! Decoding checks every field a reader relies on, so a hostile or damaged object is an error,
//! never a panic or a wild read.

use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockStates;
use byteorder::{ByteOrder, LittleEndian as LE};
use sha2::{Digest as _, Sha256};

/// A SHA-256.
pub type Digest = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest written as 64 hex digits, or `None`.
pub fn parse_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

/// What a key of a repository's listing under `packs/` is (§9.2): the name of the pack it
/// belongs to (its digest, in lower-case hex as a push writes it), that digest, and whether
/// the key is that pack's index (`.idx`) rather than the pack. `None` for anything else there
/// (an object put there by hand, another repository's under a prefix below this one's): not
/// this repository's to count, read or collect.
pub fn pack_key(key: &str) -> Option<(&str, Digest, bool)> {
    let name = key.strip_prefix("packs/")?;
    let (name, index) = name.strip_suffix(".idx").map_or((name, false), |n| (n, true));
    let digest = parse_hex(name).filter(|_| !name.bytes().any(|b| b.is_ascii_uppercase()))?;
    Some((name, digest, index))
}

const MANIFEST_MAGIC: &[u8; 8] = b"CDMANIF\0";
const INDEX_MAGIC: &[u8; 8] = b"CDPKIDX\0";
const TRACE_MAGIC: &[u8; 8] = b"CDTRACE\0";
const VERSION: u32 = 1;
/// The chunk size of a raw layer (format-spec §9.2).
pub const RAW_CHUNK_SHIFT: u32 = 16;

/// How a record's content is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Stored,
    Zstd,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::Stored => 0,
            Codec::Zstd => 1,
        }
    }

    fn from_code(c: u8) -> Result<Codec> {
        match c {
            0 => Ok(Codec::Stored),
            1 => Ok(Codec::Zstd),
            _ => Err(bad(format!("unknown codec {c}"))),
        }
    }
}

/// Where one chunk's content is: a record in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: Digest,
    pub offset: u64,
    pub stored: u32,
    pub length: u32,
    pub codec: Codec,
}

/// One chunk of a layer: its block states (cowdisk) and, if it has content, what and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry {
    pub chunk: u64,
    /// Cowdisk layers: the block states; raw layers: `None`.
    pub blocks: Option<BlockStates>,
    pub content: Option<(Digest, Location)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Raw,
    Cowdisk,
}

/// A remote layer's parent: another layer of the same repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentLayer {
    pub digest: Digest,
    pub uuid: [u8; 16],
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub kind: LayerKind,
    pub uuid: [u8; 16],
    pub virtual_size: u64,
    pub chunk_shift: u32,
    pub parent: Option<ParentLayer>,
    pub created: u64,
    /// Entries in increasing chunk order.
    pub entries: Vec<ChunkEntry>,
}

fn bad(msg: impl Into<String>) -> crate::Error {
    err(ErrorKind::Corrupt, msg)
}

/// Reads little-endian fields from a byte slice, failing (not panicking) past its end.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| bad("ends early"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(LE::read_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(LE::read_u64(self.take(8)?))
    }
    fn digest(&mut self) -> Result<Digest> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.take(32)?);
        Ok(d)
    }
    fn done(&self) -> Result<()> {
        if self.at != self.b.len() {
            return Err(bad(format!("{} bytes past its end", self.b.len() - self.at)));
        }
        Ok(())
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    let mut b = [0u8; 4];
    LE::write_u32(&mut b, v);
    out.extend_from_slice(&b);
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    let mut b = [0u8; 8];
    LE::write_u64(&mut b, v);
    out.extend_from_slice(&b);
}

impl Manifest {
    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub fn chunk_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.chunk_size())
    }

    /// The length of chunk `c` (the last one may be short).
    pub fn chunk_len(&self, c: u64) -> u64 {
        (self.virtual_size - c * self.chunk_size()).min(self.chunk_size())
    }

    /// Blocks per chunk and the bytes of one bit plane (format-spec §4.2).
    fn planes(&self) -> (usize, usize) {
        let blocks = (self.chunk_size() / 4096) as usize;
        (blocks, (blocks / 8).max(4))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut packs: Vec<Digest> = Vec::new();
        for e in &self.entries {
            if let Some((_, l)) = &e.content {
                if !packs.contains(&l.pack) {
                    packs.push(l.pack);
                }
            }
        }
        let (_, plane) = self.planes();
        let mut out = Vec::with_capacity(124 + 32 * packs.len() + self.entries.len() * (62 + 2 * plane));
        out.extend_from_slice(MANIFEST_MAGIC);
        put_u32(&mut out, VERSION);
        put_u32(&mut out, if self.kind == LayerKind::Raw { 1 } else { 2 });
        out.extend_from_slice(&self.uuid);
        put_u64(&mut out, self.virtual_size);
        put_u32(&mut out, self.chunk_shift);
        let p = self.parent.unwrap_or(ParentLayer { digest: [0; 32], uuid: [0; 16], size: 0 });
        put_u32(&mut out, if self.parent.is_some() { 3 } else { 0 });
        out.extend_from_slice(&p.digest);
        out.extend_from_slice(&p.uuid);
        put_u64(&mut out, p.size);
        put_u64(&mut out, self.created);
        put_u32(&mut out, packs.len() as u32);
        put_u64(&mut out, self.entries.len() as u64);
        for d in &packs {
            out.extend_from_slice(d);
        }
        let mut planes = vec![0u8; 2 * plane];
        for e in &self.entries {
            put_u64(&mut out, e.chunk);
            out.push(u8::from(e.content.is_some()));
            if let Some(b) = &e.blocks {
                b.encode(plane, &mut planes);
                out.extend_from_slice(&planes);
            }
            if let Some((d, l)) = &e.content {
                out.extend_from_slice(d);
                put_u32(&mut out, packs.iter().position(|p| *p == l.pack).unwrap_or(0) as u32);
                put_u64(&mut out, l.offset);
                put_u32(&mut out, l.stored);
                put_u32(&mut out, l.length);
                out.push(l.codec.code());
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Manifest> {
        let mut r = Reader { b, at: 0 };
        if r.take(8)? != MANIFEST_MAGIC {
            return Err(bad("not a cowdisk layer manifest"));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(err(
                ErrorKind::Unsupported,
                format!("manifest version {version} (this build reads {VERSION})"),
            ));
        }
        let kind = match r.u32()? {
            1 => LayerKind::Raw,
            2 => LayerKind::Cowdisk,
            k => return Err(bad(format!("unknown layer kind {k}"))),
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.take(16)?);
        let virtual_size = r.u64()?;
        let chunk_shift = r.u32()?;
        let shift_ok = match kind {
            LayerKind::Raw => chunk_shift == RAW_CHUNK_SHIFT,
            LayerKind::Cowdisk => {
                (crate::format::MIN_CHUNK_SHIFT..=crate::format::MAX_CHUNK_SHIFT).contains(&chunk_shift)
            }
        };
        if !shift_ok || virtual_size == 0 || virtual_size > 1 << 60 {
            return Err(bad("bad geometry"));
        }
        let parent_kind = r.u32()?;
        let digest = r.digest()?;
        let mut puuid = [0u8; 16];
        puuid.copy_from_slice(r.take(16)?);
        let psize = r.u64()?;
        let parent = match (parent_kind, kind) {
            (0, _) => None,
            (3, LayerKind::Cowdisk) => Some(ParentLayer { digest, uuid: puuid, size: psize }),
            _ => return Err(bad(format!("bad parent kind {parent_kind}"))),
        };
        let created = r.u64()?;
        let pack_count = r.u32()? as usize;
        let count = r.u64()?;
        // Each pack digest takes 32 bytes and each entry at least 9: a count the object cannot
        // hold is refused before anything is allocated for it.
        if pack_count > b.len() / 32 || count > (b.len() / 9) as u64 {
            return Err(bad("counts larger than the object"));
        }
        let packs: Vec<Digest> = (0..pack_count).map(|_| r.digest()).collect::<Result<_>>()?;
        let mut m = Manifest {
            kind,
            uuid,
            virtual_size,
            chunk_shift,
            parent,
            created,
            entries: Vec::with_capacity(count as usize),
        };
        let (blocks, plane) = m.planes();
        let chunks = m.chunk_count();
        let mut last: Option<u64> = None;
        for _ in 0..count {
            let chunk = r.u64()?;
            if chunk >= chunks || last.is_some_and(|l| chunk <= l) {
                return Err(bad(format!("entry for chunk {chunk} out of order or past the end")));
            }
            last = Some(chunk);
            let flags = r.u8()?;
            if flags & !1 != 0 {
                return Err(bad("unknown entry flags"));
            }
            let states = match kind {
                LayerKind::Raw => None,
                LayerKind::Cowdisk => {
                    let in_disk = (m.chunk_len(chunk).div_ceil(4096)) as usize;
                    let s = BlockStates::decode(blocks, in_disk, plane, r.take(2 * plane)?)
                        .ok_or_else(|| bad(format!("bad block states for chunk {chunk}")))?;
                    Some(s)
                }
            };
            let has_data = states.as_ref().map_or(true, |s| s.count(crate::format::blocks::BlockState::Data) > 0);
            let content = if flags & 1 != 0 {
                let d = r.digest()?;
                let pi = r.u32()? as usize;
                let pack = *packs.get(pi).ok_or_else(|| bad(format!("pack number {pi} of {pack_count}")))?;
                let loc = Location {
                    pack,
                    offset: r.u64()?,
                    stored: r.u32()?,
                    length: r.u32()?,
                    codec: Codec::from_code(r.u8()?)?,
                };
                if u64::from(loc.length) != m.chunk_len(chunk) {
                    return Err(bad(format!("chunk {chunk}: content length {} is not the chunk's", loc.length)));
                }
                check_location(&loc)?;
                Some((d, loc))
            } else {
                None
            };
            if has_data != content.is_some() {
                return Err(bad(format!("chunk {chunk}: data blocks and content disagree")));
            }
            m.entries.push(ChunkEntry { chunk, blocks: states, content });
        }
        r.done()?;
        Ok(m)
    }
}

/// A record lies within the first [`MAX_PACK`] bytes of its pack, and stores at most what a
/// chunk holds plus zstd's overhead: so no sum of offsets and lengths a reader makes can
/// overflow, and no read asks for more than a chunk's worth.
fn check_location(loc: &Location) -> Result<()> {
    let end = loc.offset.checked_add(u64::from(loc.stored));
    if !end.is_some_and(|e| e <= MAX_PACK) || u64::from(loc.stored) > MAX_STORED {
        return Err(bad(format!("a record at {} of {} bytes lies outside any pack", loc.offset, loc.stored)));
    }
    Ok(())
}

/// The largest pack a reader accepts a record in (push makes them of 1 MiB to 1 GiB).
pub const MAX_PACK: u64 = 1 << 40;
/// The most bytes a record may store: a 2 MiB chunk, and zstd's bound for it.
const MAX_STORED: u64 = (2 << 20) + (64 << 10);

/// The records of one pack (format-spec §9.3).
pub fn encode_index(records: &[(Digest, Location)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 49 * records.len());
    out.extend_from_slice(INDEX_MAGIC);
    put_u32(&mut out, VERSION);
    put_u32(&mut out, records.len() as u32);
    for (d, l) in records {
        out.extend_from_slice(d);
        put_u64(&mut out, l.offset);
        put_u32(&mut out, l.stored);
        put_u32(&mut out, l.length);
        out.push(l.codec.code());
    }
    out
}

/// The records listed in the index of pack `pack`.
pub fn decode_index(pack: Digest, b: &[u8]) -> Result<Vec<(Digest, Location)>> {
    let mut r = Reader { b, at: 0 };
    if r.take(8)? != INDEX_MAGIC {
        return Err(bad("not a pack index"));
    }
    if r.u32()? != VERSION {
        return Err(err(ErrorKind::Unsupported, "pack index version"));
    }
    let n = r.u32()? as usize;
    if n > b.len() / 49 {
        return Err(bad("count larger than the object"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = r.digest()?;
        let loc =
            Location { pack, offset: r.u64()?, stored: r.u32()?, length: r.u32()?, codec: Codec::from_code(r.u8()?)? };
        check_location(&loc)?;
        out.push((d, loc));
    }
    r.done()?;
    Ok(out)
}

pub fn encode_trace(chunks: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + 8 * chunks.len());
    out.extend_from_slice(TRACE_MAGIC);
    put_u32(&mut out, VERSION);
    put_u64(&mut out, chunks.len() as u64);
    for &c in chunks {
        put_u64(&mut out, c);
    }
    out
}

pub fn decode_trace(b: &[u8]) -> Result<Vec<u64>> {
    let mut r = Reader { b, at: 0 };
    if r.take(8)? != TRACE_MAGIC || r.u32()? != VERSION {
        return Err(bad("not a trace"));
    }
    let n = r.u64()?;
    if n > (b.len() / 8) as u64 {
        return Err(bad("count larger than the object"));
    }
    let out = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
    r.done()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::blocks::BlockState;

    fn sample() -> Manifest {
        let mut b = BlockStates::new(16);
        b.set_range(0, 3, BlockState::Data);
        b.set_range(5, 6, BlockState::Zero);
        let loc = Location { pack: [7; 32], offset: 100, stored: 900, length: 65536, codec: Codec::Zstd };
        let mut z = BlockStates::new(16);
        z.set_range(0, 16, BlockState::Zero);
        Manifest {
            kind: LayerKind::Cowdisk,
            uuid: [1; 16],
            virtual_size: 1 << 20,
            chunk_shift: 16,
            parent: Some(ParentLayer { digest: [9; 32], uuid: [2; 16], size: 1 << 20 }),
            created: 1_700_000_000,
            entries: vec![
                ChunkEntry { chunk: 2, blocks: Some(b), content: Some(([3; 32], loc)) },
                ChunkEntry { chunk: 5, blocks: Some(z), content: None },
            ],
        }
    }

    #[test]
    fn manifests_round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let raw = Manifest {
            kind: LayerKind::Raw,
            uuid: [0; 16],
            virtual_size: 100_000,
            chunk_shift: RAW_CHUNK_SHIFT,
            parent: None,
            created: 0,
            entries: vec![ChunkEntry {
                chunk: 1,
                blocks: None,
                content: Some((
                    [4; 32],
                    Location { pack: [5; 32], offset: 0, stored: 10, length: 100_000 - 65536, codec: Codec::Stored },
                )),
            }],
        };
        assert_eq!(Manifest::decode(&raw.encode()).unwrap(), raw);
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_refused_or_decodes_to_something_consistent() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "a manifest cut at {n} decoded");
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x80;
            // Never a panic; a digest or offset flip may still decode (the digest of the
            // whole object is what catches those).
            let _ = Manifest::decode(&x);
        }
    }

    #[test]
    fn data_blocks_without_content_are_refused() {
        let mut m = sample();
        m.entries[0].content = None;
        assert!(Manifest::decode(&m.encode()).unwrap_err().to_string().contains("disagree"));
    }

    #[test]
    fn indexes_and_traces_round_trip() {
        let loc = Location { pack: [8; 32], offset: 3, stored: 4, length: 5, codec: Codec::Stored };
        let recs = vec![([1; 32], loc), ([2; 32], Location { offset: 7, ..loc })];
        assert_eq!(decode_index([8; 32], &encode_index(&recs)).unwrap(), recs);
        assert_eq!(decode_trace(&encode_trace(&[5, 1, 9])).unwrap(), vec![5, 1, 9]);
        assert!(decode_trace(b"junk").is_err());
    }

    #[test]
    fn records_outside_any_pack_are_refused() {
        for (offset, stored) in [(u64::MAX - 3, 10u32), (MAX_PACK, 1), (0, 16 << 20)] {
            let loc = Location { pack: [8; 32], offset, stored, length: 5, codec: Codec::Stored };
            assert!(decode_index([8; 32], &encode_index(&[([1; 32], loc)])).is_err(), "{offset} {stored}");
        }
    }

    #[test]
    fn hex_digests_round_trip() {
        let d = sha256(b"abc");
        assert_eq!(hex(&d), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(parse_hex(&hex(&d)), Some(d));
        assert_eq!(parse_hex("xyz"), None);
    }
}
