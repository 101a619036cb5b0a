//! Golden images: small committed files whose bytes are checked against format-spec.md by a
//! reader written here from the spec alone, and against what the library produces today, so
//! that any change of the on-disk format is deliberate. `COWDISK_BLESS=1` rewrites them.

mod common;

use byteorder::{ByteOrder, LittleEndian as LE};
use common::TempDir;
use cowdisk::format::fingerprint::raw_fingerprint;
use cowdisk::format::header::{ParentFormat, ParentRef};
use cowdisk::format::Geometry;
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::FileStorage;
use cowdisk::{Chain, ChainOptions, DiskRead, DiskWrite, DiskZero};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn base_bytes() -> Vec<u8> {
    (0..65536u32).map(|i| (i % 251) as u8).collect()
}

/// Builds the golden files into `dir` with fixed UUIDs and a fixed sequence of operations.
fn build(dir: &Path) {
    // standalone-4k.cow: 256 KiB, 4 KiB chunks.
    let p = dir.join("standalone-4k.cow");
    let g = Geometry::new(256 * 1024, 12).unwrap();
    let img = Image::create_on(Arc::new(FileStorage::create(&p).unwrap()), &p, g, None, [0x11; 16]).unwrap();
    let c = Chain::assemble(img, Vec::new(), None);
    c.write_at(&[0xaa; 4096], 0).unwrap();
    c.write_at(&[0xbb; 100], 5000).unwrap();
    c.close().unwrap();
    drop(c);

    // base.raw + overlay-64k.cow: 128 KiB overlay on a 64 KiB raw base.
    let b = dir.join("base.raw");
    std::fs::write(&b, base_bytes()).unwrap();
    let raw = RawImage::open(&b, false, cowdisk::storage::LockMode::Shared).unwrap();
    let fp = raw_fingerprint(raw.storage().as_ref(), raw.size()).unwrap();
    let o = dir.join("overlay-64k.cow");
    let parent = ParentRef {
        format: ParentFormat::Raw,
        path: b"base.raw".to_vec(),
        uuid: [0; 16],
        size: 65536,
        fingerprint: fp,
    };
    let g = Geometry::new(128 * 1024, 16).unwrap();
    let img = Image::create_on(Arc::new(FileStorage::create(&o).unwrap()), &o, g, Some(parent), [0x22; 16]).unwrap();
    let c = Chain::assemble(img, Vec::new(), Some(raw));
    c.write_at(&[0xcc; 4096], 4096).unwrap();
    c.discard(8192, 8192).unwrap();
    c.discard(65536, 65536).unwrap();
    c.close().unwrap();
}

#[test]
fn library_still_writes_the_committed_golden_bytes() {
    let d = TempDir::new("golden");
    build(d.path());
    let bless = std::env::var("COWDISK_BLESS").is_ok_and(|v| v == "1");
    for name in ["standalone-4k.cow", "base.raw", "overlay-64k.cow"] {
        let now = std::fs::read(d.join(name)).unwrap();
        let gp = golden_dir().join(name);
        if bless {
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&gp, &now).unwrap();
        }
        let committed =
            std::fs::read(&gp).unwrap_or_else(|e| panic!("{}: {e} (run with COWDISK_BLESS=1)", gp.display()));
        assert!(now == committed, "{name}: the library now writes different bytes; if the format change is deliberate, bump the version log in format-spec.md and bless");
    }
}

/// One map entry as format-spec.md §4.2 lays it out.
#[derive(Debug, PartialEq)]
struct SpecEntry {
    chunk: u64,
    data_offset: u64,
    data_bits: u32,
    zero_bits: u32,
}

/// Reads the current header slot and the in-use map entries straight from the bytes, by the spec.
fn spec_read(b: &[u8]) -> (Vec<u8>, Vec<SpecEntry>) {
    let slot = |i: usize| &b[i * 4096..(i + 1) * 4096];
    let valid = |s: &[u8]| &s[0..8] == b"COWDISK\0" && LE::read_u32(&s[4092..]) == crc32fast::hash(&s[..4092]);
    assert!(valid(slot(0)) && valid(slot(1)), "both header slots valid after a clean close");
    let h = if LE::read_u64(&slot(1)[16..]) > LE::read_u64(&slot(0)[16..]) { slot(1) } else { slot(0) };
    let chunk_shift = h[48];
    let blocks = 1usize << (chunk_shift - 12);
    let p = (blocks / 8).max(4);
    let entry_size = 24 + 2 * p;
    let mut entries = Vec::new();
    for i in 0..LE::read_u32(&h[116..]) as usize {
        let (off, len) = (LE::read_u64(&h[120 + 16 * i..]) as usize, LE::read_u64(&h[128 + 16 * i..]) as usize);
        for s in (off..(off + len).min(b.len())).step_by(512) {
            let sec = &b[s..s + 512];
            if sec.iter().all(|&x| x == 0) {
                continue;
            }
            assert_eq!(LE::read_u32(sec), crc32fast::hash(&sec[4..]));
            assert_eq!(&sec[4..8], b"CDMS");
            assert_eq!(LE::read_u64(&sec[8..]) as usize, s);
            for e in 0..(512 - 16) / entry_size {
                let r = &sec[16 + e * entry_size..16 + (e + 1) * entry_size];
                if LE::read_u32(r) == 1 {
                    entries.push(SpecEntry {
                        chunk: LE::read_u64(&r[8..]),
                        data_offset: LE::read_u64(&r[16..]),
                        data_bits: LE::read_u32(&r[24..]),
                        zero_bits: LE::read_u32(&r[24 + p..]),
                    });
                }
            }
        }
    }
    entries.sort_by_key(|e| e.chunk);
    (h.to_vec(), entries)
}

#[test]
fn standalone_golden_matches_the_spec() {
    let b = std::fs::read(golden_dir().join("standalone-4k.cow")).unwrap();
    let (h, entries) = spec_read(&b);
    assert_eq!(LE::read_u32(&h[8..]), 1, "version");
    assert_eq!(LE::read_u64(&h[40..]), 256 * 1024, "virtual size");
    assert_eq!((h[48], h[49]), (12, 12), "chunk and block shift");
    assert_eq!(&h[56..72], &[0x11; 16], "uuid");
    assert_eq!(LE::read_u64(&h[72..]), 0, "flags: clean, not frozen");
    assert_eq!(LE::read_u32(&h[80..]), 0, "no parent");
    // Chunk 0 holds block 0; chunk 1 holds the partial write at 5000 (a whole block, copied up from zeros).
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].chunk, entries[0].data_bits, entries[0].zero_bits), (0, 1, 0));
    assert_eq!((entries[1].chunk, entries[1].data_bits, entries[1].zero_bits), (1, 1, 0));
    let s0 = entries[0].data_offset as usize;
    let s1 = entries[1].data_offset as usize;
    assert!(s0 >= 8192 && s0 % 4096 == 0 && s1 % 4096 == 0 && s0 != s1);
    assert!(b[s0..s0 + 4096].iter().all(|&x| x == 0xaa));
    assert!(b[s1..s1 + 904].iter().all(|&x| x == 0));
    assert!(b[s1 + 904..s1 + 1004].iter().all(|&x| x == 0xbb));
}

#[test]
fn overlay_golden_matches_the_spec() {
    let b = std::fs::read(golden_dir().join("overlay-64k.cow")).unwrap();
    let (h, entries) = spec_read(&b);
    assert_eq!(LE::read_u32(&h[80..]), 1, "raw parent");
    assert_eq!(LE::read_u32(&h[84..]), 8);
    assert_eq!(&h[1144..1152], b"base.raw");
    assert_eq!(LE::read_u64(&h[104..]), 65536, "parent size");
    // Fingerprint by §3.2: CRC-32 of the size (u64 LE) and the whole file (it is at most 64 KiB).
    let mut f = crc32fast::Hasher::new();
    f.update(&65536u64.to_le_bytes());
    f.update(&base_bytes());
    assert_eq!(LE::read_u32(&h[112..]), f.finalize());
    // Chunk 0: block 1 data, blocks 2-3 zero (the base shows through there otherwise).
    // Chunk 1 lies past the base: its discard needs no whiteout, so it has no entry.
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].chunk, entries[0].data_bits, entries[0].zero_bits), (0, 0b10, 0b1100));
    let s = entries[0].data_offset as usize;
    // The first entry took the first map extent (64 KiB at the data start), then its slot.
    assert_eq!(LE::read_u64(&h[120..]), 65536, "first map extent at the data start");
    assert_eq!(LE::read_u64(&h[128..]), 65536, "first map extent is 64 KiB");
    assert_eq!(s, 131072, "first data slot after the map extent");
    assert!(b[s + 4096..s + 8192].iter().all(|&x| x == 0xcc));
}

#[test]
fn golden_overlay_reads_as_the_merged_disk() {
    let c = Chain::open(&golden_dir().join("overlay-64k.cow"), ChainOptions { inspect: false, ..Default::default() })
        .unwrap();
    let mut got = vec![0u8; 128 * 1024];
    c.read_at(&mut got, 0).unwrap();
    let mut want = base_bytes();
    want.resize(128 * 1024, 0);
    want[4096..8192].fill(0xcc);
    want[8192..16384].fill(0);
    assert!(got == want);
    let _ = OpenOptions::inspect();
}
