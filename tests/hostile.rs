//! Hostile images: every malformed or malicious file is refused with a typed error naming the
//! file, quickly, and without an allocation sized by an unchecked header field.

mod common;

use common::TempDir;
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::{Chain, ChainOptions, DiskWrite, ErrorKind};
use std::path::Path;
use std::time::{Duration, Instant};

/// A valid image with one map extent and a few data slots, as bytes, plus its map extent offset.
fn valid_image(dir: &TempDir) -> (Vec<u8>, u64) {
    let p = dir.join("valid.cow");
    create_image(&p, &CreateOptions { size: Some(4 << 20), ..Default::default() }).unwrap().close().unwrap();
    let c = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
    for i in 0..3u64 {
        c.write_at(&[0x5a; 4096], i * 65536 * 3).unwrap();
    }
    c.close().unwrap();
    drop(c);
    let b = std::fs::read(&p).unwrap();
    let ext = cowdisk::layer::read_header_only(&p).unwrap().map_extents[0].offset;
    (b, ext)
}

fn le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Applies `f` to both header slots and reseals their checksums.
fn patch_headers(b: &mut [u8], f: impl Fn(&mut [u8])) {
    for slot in 0..2 {
        let s = &mut b[slot * 4096..(slot + 1) * 4096];
        f(s);
        let crc = crc32fast::hash(&s[..4092]);
        s[4092..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Rewrites map sector at `off` through `f` and reseals it.
fn patch_sector(b: &mut [u8], off: u64, f: impl Fn(&mut [u8])) {
    let s = &mut b[off as usize..off as usize + 512];
    f(s);
    let crc = crc32fast::hash(&s[4..]);
    s[..4].copy_from_slice(&crc.to_le_bytes());
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `bytes` as an image file and returns the error, checking it is quick, typed and one line.
fn refused(dir: &TempDir, name: &str, bytes: &[u8], kind: ErrorKind, words: &str) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let t = Instant::now();
    let e = Chain::open(&p, ChainOptions::default()).expect_err(name);
    assert!(t.elapsed() < Duration::from_secs(2), "{name}: took {:?}", t.elapsed());
    assert_eq!(e.kind(), kind, "{name}: {e}");
    let s = e.to_string();
    assert!(s.contains(&p.display().to_string()), "{name}: error does not name the file: {s}");
    assert!(s.contains(words), "{name}: '{s}' lacks '{words}'");
    assert!(!s.contains('\n'));
}

#[test]
fn every_hostile_image_is_refused_quickly_with_its_kind() {
    let d = TempDir::new("hostile");
    let (good, ext) = valid_image(&d);
    let hwm_before = rss_kib();

    refused(&d, "empty", &[], ErrorKind::NotAnImage, "not a cowdisk image");
    refused(&d, "magic-only", b"COWDISK\0", ErrorKind::Truncated, "shorter than");
    refused(&d, "half-header", &good[..6000], ErrorKind::Truncated, "shorter than");
    refused(&d, "text", &vec![b'x'; 100_000], ErrorKind::NotAnImage, "not a cowdisk image");

    let mut b = good.clone();
    b[200] ^= 1;
    b[4096 + 200] ^= 1;
    refused(&d, "bad-header-crc", &b, ErrorKind::BadChecksum, "header checksum");

    let mut b = good.clone();
    b[ext as usize + 40] ^= 0x80;
    refused(&d, "bad-map-crc", &b, ErrorKind::BadChecksum, "map sector checksum");

    let mut b = good.clone();
    patch_headers(&mut b, |s| le64(s, 40, 1 << 63));
    refused(&d, "huge-size", &b, ErrorKind::Corrupt, "virtual size");

    let mut b = good.clone();
    patch_headers(&mut b, |s| le64(s, 40, 0));
    refused(&d, "zero-size", &b, ErrorKind::Corrupt, "virtual size");

    for shift in [0u8, 11, 22, 255] {
        let mut b = good.clone();
        patch_headers(&mut b, |s| s[48] = shift);
        refused(&d, &format!("chunk-shift-{shift}"), &b, ErrorKind::Corrupt, "chunk size");
    }

    let mut b = good.clone();
    patch_headers(&mut b, |s| le64(s, 24, 1 << 5));
    refused(&d, "unknown-incompat", &b, ErrorKind::Unsupported, "unknown incompatible features");

    let mut b = good.clone();
    patch_headers(&mut b, |s| le64(s, 72, 1 << 9));
    refused(&d, "unknown-flag", &b, ErrorKind::Unsupported, "unknown header flags");

    let mut b = good.clone();
    patch_headers(&mut b, |s| le32(s, 8, 2));
    refused(&d, "version-2", &b, ErrorKind::Unsupported, "version 2");

    // A map extent of 2^61 bytes: refused from the header alone, nothing read or allocated.
    let mut b = good.clone();
    patch_headers(&mut b, |s| le64(s, 128, 1 << 61));
    refused(&d, "huge-map-extent", &b, ErrorKind::Corrupt, "more than a disk of this size can need");

    let mut b = good.clone();
    patch_headers(&mut b, |s| le32(s, 116, 65));
    refused(&d, "too-many-extents", &b, ErrorKind::Corrupt, "map extents");

    let mut b = good.clone();
    patch_headers(&mut b, |s| le64(s, 120, 4096));
    refused(&d, "extent-in-header", &b, ErrorKind::Corrupt, "misplaced");

    let mut b = good.clone();
    patch_headers(&mut b, |s| {
        le32(s, 80, 2);
        le32(s, 84, 5000);
    });
    refused(&d, "overlong-parent-path", &b, ErrorKind::Corrupt, "parent path length");

    // Map entries (64 KiB chunks: 15 entries of 32 bytes per sector, the first at byte 16).
    let entry = |i: usize| ext as usize + 16 + 32 * i;
    let mut b = good.clone();
    patch_sector(&mut b, ext, |s| le64(s, 16 + 8, 1 << 40));
    refused(&d, "entry-past-disk-end", &b, ErrorKind::Corrupt, "past the end of the disk");

    let mut b = good.clone();
    patch_sector(&mut b, ext, |s| le64(s, 16 + 16, 1 << 40));
    refused(&d, "entry-past-file-end", &b, ErrorKind::Corrupt, "past the end of the file");

    let mut b = good.clone();
    patch_sector(&mut b, ext, |s| le64(s, 16 + 16, 4096));
    refused(&d, "entry-into-header", &b, ErrorKind::Corrupt, "misplaced slot");

    let mut b = good.clone();
    patch_sector(&mut b, ext, |s| le64(s, 16 + 16, ext));
    refused(&d, "entry-into-map", &b, ErrorKind::Corrupt, "overlap");

    let mut b = good.clone();
    let second_slot = u64::from_le_bytes(b[entry(1) + 16..entry(1) + 24].try_into().unwrap());
    patch_sector(&mut b, ext, |s| le64(s, 16 + 16, second_slot));
    refused(&d, "two-entries-one-slot", &b, ErrorKind::Corrupt, "overlap");

    let mut b = good.clone();
    let chunk1 = u64::from_le_bytes(b[entry(1) + 8..entry(1) + 16].try_into().unwrap());
    patch_sector(&mut b, ext, |s| le64(s, 16 + 8, chunk1));
    refused(&d, "two-entries-one-chunk", &b, ErrorKind::Corrupt, "two map entries");

    let mut b = good.clone();
    patch_sector(&mut b, ext, |s| le64(s, 8, ext + 512));
    refused(&d, "misplaced-sector", &b, ErrorKind::Corrupt, "misplaced");

    // A sparse 1 TiB disk whose one map sector sits 1 GiB into a legal extent: holes are
    // skipped and positions are kept sparsely, so the open reads and holds almost nothing.
    let p = d.join("sparse-far-entry.cow");
    create_image(&p, &CreateOptions { size: Some(1 << 40), ..Default::default() }).unwrap().close().unwrap();
    let c = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
    c.write_at(&[7u8; 4096], 0).unwrap();
    c.close().unwrap();
    drop(c);
    let mut b = std::fs::read(&p).unwrap();
    let ext = cowdisk::layer::read_header_only(&p).unwrap().map_extents[0].offset;
    // A second extent of 1 GiB at 2 GiB, its last sector the only one in use.
    let far = (2u64 << 30) + (1 << 30) - 512;
    patch_headers(&mut b, |s| {
        le32(s, 116, 2);
        le64(s, 136, 2 << 30);
        le64(s, 144, 1 << 30);
    });
    let mut sector = b[ext as usize..ext as usize + 512].to_vec();
    b[ext as usize..ext as usize + 512].fill(0);
    le64(&mut sector, 8, far);
    le64(&mut sector, 16 + 8, 12345);
    let crc = crc32fast::hash(&sector[4..]);
    sector[..4].copy_from_slice(&crc.to_le_bytes());
    let f = std::fs::OpenOptions::new().write(true).truncate(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &b, 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &sector, far).unwrap();
    drop(f);
    let t = Instant::now();
    let c = Chain::open(&p, ChainOptions::default()).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!(c.top().entry_count(), 1);
    assert_eq!(c.top().next_chunk(0), Some(12345));
    drop(c);

    let grown = rss_kib().saturating_sub(hwm_before);
    assert!(grown < 64 * 1024, "refusing hostile images raised peak memory by {grown} KiB");
}

#[test]
fn a_parent_that_is_a_device_is_refused_unless_allowed() {
    let d = TempDir::new("device-parent");
    let p = d.join("ov.cow");
    let e = create_image(
        &p,
        &CreateOptions {
            backing: Some("/dev/null".into()),
            backing_format: Some(cowdisk::format::header::ParentFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert!(!p.exists());
    let _ = Path::new("/dev/null");
}

/// A header at the largest generation cannot be followed: the next would wrap to 0 and lose
/// to it (the higher generation is current). Opening it for writing is refused with a typed
/// error, nothing is written, and it still reads.
#[test]
fn a_header_at_the_largest_generation_is_not_written_past() {
    let dir = TempDir::new("hostile-gen");
    let (mut b, _) = valid_image(&dir);
    for (slot, g) in [(0usize, u64::MAX - 1), (1, u64::MAX)] {
        let s = &mut b[slot * 4096..(slot + 1) * 4096];
        le64(s, 16, g);
        let crc = crc32fast::hash(&s[..4092]);
        s[4092..].copy_from_slice(&crc.to_le_bytes());
    }
    let p = dir.join("gen.cow");
    std::fs::write(&p, &b).unwrap();
    let e = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("generation"), "{e}");
    assert!(std::fs::read(&p).unwrap() == b, "the refused open wrote to the file");
    // An offline snapshot writes the header without opening the map: refused the same way.
    let e = cowdisk::ops::snapshot::snapshot(&p, &dir.join("snap.cow")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(std::fs::read(&p).unwrap() == b, "the refused snapshot wrote to the file");
    let c = Chain::open(&p, ChainOptions::default()).unwrap();
    let mut got = vec![0u8; 4096];
    cowdisk::DiskRead::read_at(&c, &mut got, 65536 * 3).unwrap();
    assert_eq!(got, vec![0x5a; 4096]);
}

/// A log-structured image (format-spec §5.10) whose log is 8,192 records of 64 KiB laid over
/// one another, each one's head among the block images of the one before, all valid (32 MiB
/// of file): a reader follows no record in the data area longer than the one cluster a
/// writer puts there, so the image opens as its map says without holding what the records
/// claim (about 480 MiB of block images before the bound).
#[test]
fn a_log_of_records_laid_over_one_another_is_not_held_in_memory() {
    use cowdisk::layer::journal::{Layout, Record, MAX_LOG_RECORDS};
    use cowdisk::DiskRead;
    use std::os::unix::fs::FileExt;
    let d = TempDir::new("hostile-log");
    let p = d.join("log.cow");
    create_image(&p, &CreateOptions { size: Some(64 << 20), log: true, ..Default::default() })
        .unwrap()
        .close()
        .unwrap();
    // A FUA write into the log gives the image its journal area; the close, a checkpoint.
    let c = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
    c.write_fua_from(&mut &[0x5a; 4096][..], 8192, 4096).unwrap();
    c.close().unwrap();
    drop(c);
    let h = cowdisk::layer::read_header_only(&p).unwrap();
    let area = h.journal.expect("a FUA write left no journal area");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let place = f.metadata().unwrap().len().next_multiple_of(1 << 20);
    // The area: only a checkpoint naming the log's place.
    f.write_all_at(&vec![0u8; area.len as usize], area.offset).unwrap();
    f.write_all_at(&Record::checkpoint(1, place).encode(&h.uuid, Layout::LogArea), area.offset).unwrap();
    // Record k (numbered 2 + k) at place + 4096 k: its head, then 15 block images that are the
    // heads of the 15 records after it. Made last first, so that each one's CRC covers what
    // the later ones put there; only the heads are written, a record's blocks being the rest.
    let mut later: std::collections::VecDeque<Vec<u8>> = (0..15).map(|_| vec![0u8; 4096]).collect();
    for k in (0..MAX_LOG_RECORDS).rev() {
        let at = place + 4096 * k;
        let r = Record {
            seq: 2 + k,
            replay_from: 2,
            sectors: Vec::new(),
            blocks: later.iter().enumerate().map(|(i, b)| (at + 4096 * (1 + i as u64), b.clone())).collect(),
            next: if k + 1 < MAX_LOG_RECORDS { at + 4096 } else { 0 },
            before: 0,
        };
        let bytes = r.encode(&h.uuid, Layout::LogHome);
        assert_eq!(bytes.len(), 65536);
        f.write_all_at(&bytes[..4096], at).unwrap();
        later.pop_back();
        later.push_front(bytes[..4096].to_vec());
    }
    // The last records' blocks: zeros, as the heads after the last are.
    f.set_len(place + 4096 * (MAX_LOG_RECORDS + 15)).unwrap();
    drop(f);
    let before = rss_kib();
    let t = Instant::now();
    let c = Chain::open(&p, ChainOptions::default()).unwrap();
    let mut got = vec![0u8; 12288];
    c.read_at(&mut got, 4096).unwrap();
    assert!(got[..4096].iter().all(|&x| x == 0) && got[4096..8192].iter().all(|&x| x == 0x5a));
    drop(c);
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 128 * 1024, "opening the crafted log raised peak memory by {grown} KiB");
}
