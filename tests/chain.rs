//! The merged device on real files: every refusal a user can meet when opening a chain (each
//! with its one-line message), persistence, concurrent writers, and memory at scale.

mod common;

use common::{pattern, TempDir};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::format::header::{ParentFormat, ParentRef};
use cowdisk::format::FLAG_FROZEN;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::LockMode;
use cowdisk::{Chain, ChainOptions, DiskFlush, DiskRead, DiskWrite, DiskZero, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn rw() -> ChainOptions {
    ChainOptions { writable: true, ..Default::default() }
}

fn standalone(p: &Path, size: u64) {
    create_image(p, &CreateOptions { size: Some(size), ..Default::default() }).unwrap().close().unwrap();
}

fn freeze(p: &Path) {
    let img = Image::open(p, OpenOptions::writable()).unwrap();
    img.update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
    img.close().unwrap();
}

fn overlay(p: &Path, parent: &Path) {
    let o = CreateOptions { backing: Some(parent.to_path_buf()), ..Default::default() };
    create_image(p, &o).unwrap().close().unwrap();
}

/// Rewrites both header slots of `p` through `f` (bytes of one slot) and reseals their checksums.
fn patch_header(p: &Path, f: impl Fn(&mut [u8])) {
    let mut b = std::fs::read(p).unwrap();
    for slot in 0..2 {
        let s = &mut b[slot * 4096..(slot + 1) * 4096];
        f(s);
        let crc = crc32fast::hash(&s[..4092]);
        s[4092..].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(p, b).unwrap();
}

fn open_err(p: &Path) -> cowdisk::Error {
    Chain::open(p, ChainOptions::default()).unwrap_err()
}

fn assert_one_line_naming(e: &cowdisk::Error, file: &Path, words: &str) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s}");
    assert!(s.contains(&file.display().to_string()), "error does not name {}: {s}", file.display());
    assert!(s.contains(words), "error lacks '{words}': {s}");
}

#[test]
fn refuses_a_file_that_is_not_an_image() {
    let d = TempDir::new("notimg");
    let p = d.join("x.cow");
    std::fs::write(&p, vec![0x41u8; 10000]).unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::NotAnImage);
    assert_one_line_naming(&e, &p, "not a cowdisk image");
}

#[test]
fn refuses_a_truncated_image() {
    let d = TempDir::new("trunc");
    let p = d.join("t.cow");
    standalone(&p, 1 << 20);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..5000]).unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Truncated);
    assert_one_line_naming(&e, &p, "shorter than");
}

#[test]
fn refuses_bad_header_checksum() {
    let d = TempDir::new("crc");
    let p = d.join("c.cow");
    standalone(&p, 1 << 20);
    let mut b = std::fs::read(&p).unwrap();
    b[100] ^= 1;
    b[4096 + 100] ^= 1;
    std::fs::write(&p, b).unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::BadChecksum);
    assert_one_line_naming(&e, &p, "header checksum");
}

#[test]
fn refuses_bad_map_sector_checksum_naming_the_offset() {
    let d = TempDir::new("mapcrc");
    let p = d.join("m.cow");
    standalone(&p, 1 << 20);
    let c = Chain::open(&p, rw()).unwrap();
    c.write_at(&[1u8; 4096], 0).unwrap();
    c.close().unwrap();
    drop(c);
    let img = Image::open(&p, OpenOptions::inspect()).unwrap();
    let ext = img.header().map_extents[0];
    drop(img);
    let mut b = std::fs::read(&p).unwrap();
    b[ext.offset as usize + 30] ^= 0x40;
    std::fs::write(&p, b).unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::BadChecksum);
    assert_one_line_naming(&e, &p, &format!("map sector checksum mismatch (at offset {})", ext.offset));
}

#[test]
fn refuses_unknown_incompatible_feature() {
    let d = TempDir::new("feat");
    let p = d.join("f.cow");
    standalone(&p, 1 << 20);
    patch_header(&p, |s| s[24..32].copy_from_slice(&(1u64 << 17).to_le_bytes()));
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_one_line_naming(&e, &p, "unknown incompatible features 0x20000");
}

#[test]
fn refuses_missing_parent() {
    let d = TempDir::new("missing");
    let (base, top) = (d.join("base.raw"), d.join("top.cow"));
    std::fs::write(&base, pattern(1, 1 << 20)).unwrap();
    overlay(&top, &base);
    std::fs::remove_file(&base).unwrap();
    let e = open_err(&top);
    assert_eq!(e.kind(), ErrorKind::ParentMissing);
    assert_one_line_naming(&e, &top, "base.raw is missing");
}

#[test]
fn refuses_raw_parent_whose_content_changed() {
    let d = TempDir::new("rawchg");
    let (base, top) = (d.join("base.raw"), d.join("top.cow"));
    std::fs::write(&base, pattern(1, 1 << 20)).unwrap();
    overlay(&top, &base);
    // Same size, different bytes at the start (always sampled).
    let mut b = std::fs::read(&base).unwrap();
    b[10] ^= 0xff;
    std::fs::write(&base, b).unwrap();
    let e = open_err(&top);
    assert_eq!(e.kind(), ErrorKind::ParentChanged);
    assert_one_line_naming(&e, &top, "fingerprint");
}

#[test]
fn refuses_raw_parent_of_another_size() {
    let d = TempDir::new("rawsize");
    let (base, top) = (d.join("base.raw"), d.join("top.cow"));
    std::fs::write(&base, pattern(1, 1 << 20)).unwrap();
    overlay(&top, &base);
    std::fs::write(&base, pattern(1, (1 << 20) + 512)).unwrap();
    let e = open_err(&top);
    assert_eq!(e.kind(), ErrorKind::ParentChanged);
    assert_one_line_naming(&e, &top, "size");
}

#[test]
fn refuses_cowdisk_parent_swapped_for_another_image() {
    let d = TempDir::new("swap");
    let (a, b, top) = (d.join("a.cow"), d.join("b.cow"), d.join("top.cow"));
    standalone(&a, 1 << 20);
    freeze(&a);
    overlay(&top, &a);
    standalone(&b, 1 << 20);
    freeze(&b);
    std::fs::rename(&b, &a).unwrap();
    let e = open_err(&top);
    assert_eq!(e.kind(), ErrorKind::ParentChanged);
    assert_one_line_naming(&e, &top, "UUID");
}

#[test]
fn refuses_a_writable_image_as_parent() {
    let d = TempDir::new("wparent");
    let (a, top) = (d.join("a.cow"), d.join("top.cow"));
    standalone(&a, 1 << 20);
    let o = CreateOptions { backing: Some(a.clone()), ..Default::default() };
    let e = create_image(&top, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_one_line_naming(&e, &a, "freeze it first");
    assert!(!top.exists());
}

#[test]
fn refuses_a_parent_loop() {
    let d = TempDir::new("loop");
    let (a, b) = (d.join("a.cow"), d.join("b.cow"));
    standalone(&a, 1 << 20);
    freeze(&a);
    overlay(&b, &a);
    freeze(&b);
    let bh = Image::open(&b, OpenOptions::inspect()).unwrap().header();
    // Point a back at b: a -> b -> a.
    let forged = Image::open(
        &a,
        OpenOptions { write: true, lock: LockMode::Exclusive, allow_frozen: true, allow_corrupt: false },
    )
    .unwrap();
    forged
        .update_header(|h| {
            h.parent = Some(ParentRef {
                format: ParentFormat::Cowdisk,
                path: b"b.cow".to_vec(),
                uuid: bh.uuid,
                size: 1 << 20,
                fingerprint: 0,
            })
        })
        .unwrap();
    forged.close().unwrap();
    drop(forged);
    let e = open_err(&b);
    assert_eq!(e.kind(), ErrorKind::ChainLoop);
    assert_one_line_naming(&e, &a, "loop");
}

#[test]
fn refuses_a_chain_deeper_than_256_images() {
    let d = TempDir::new("deep");
    let mut paths: Vec<PathBuf> = vec![d.join("l0.cow")];
    standalone(&paths[0], 64 * 1024);
    for i in 1..257 {
        freeze(&paths[i - 1]);
        let p = d.join(&format!("l{i}.cow"));
        overlay(&p, &paths[i - 1]);
        paths.push(p);
    }
    // 256 images (l0..l255) open (format-spec §3.3 rule 1); 257 do not.
    let ok = Chain::open(&paths[255], ChainOptions::default()).unwrap();
    assert_eq!(ok.depth(), 256);
    drop(ok);
    let e = open_err(&paths[256]);
    assert_eq!(e.kind(), ErrorKind::ChainTooDeep);
    assert_one_line_naming(&e, &paths[256], "deeper than 256");
}

#[test]
fn second_writer_gets_in_use() {
    let d = TempDir::new("inuse");
    let p = d.join("a.cow");
    standalone(&p, 1 << 20);
    let _held = Chain::open(&p, rw()).unwrap();
    let e = Chain::open(&p, rw()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    assert_one_line_naming(&e, &p, "in use");
}

#[test]
fn flushed_writes_survive_an_unclean_stop() {
    let d = TempDir::new("persist");
    let (base, top) = (d.join("base.raw"), d.join("top.cow"));
    std::fs::write(&base, pattern(9, 4 << 20)).unwrap();
    overlay(&top, &base);
    let c = Chain::open(&top, rw()).unwrap();
    let data = pattern(5, 300_000);
    c.write_at(&data, 12345).unwrap();
    c.flush().unwrap();
    // What a power cut after the flush leaves: the file as it is now, without a clean close.
    let crashed = d.join("crashed.cow");
    std::fs::copy(&top, &crashed).unwrap();
    drop(c);
    let r = Chain::open(&crashed, ChainOptions { writable: true, ..Default::default() }).unwrap();
    assert!(r.top().header().flags & cowdisk::format::FLAG_DIRTY != 0);
    let mut got = vec![0u8; data.len()];
    r.read_at(&mut got, 12345).unwrap();
    assert!(got == data);
    let mut head = vec![0u8; 12345];
    r.read_at(&mut head, 0).unwrap();
    assert!(head[..] == pattern(9, 12345)[..]);
}

#[test]
fn whole_chunk_writes_take_exactly_their_space_and_rewrites_take_none() {
    // Runs of whole chunks into new slots have their space allocated before they are written
    // (one fallocate per run): the overlay must still grow by what was written, no more.
    let d = TempDir::new("whole");
    let (base, top) = (d.join("base.raw"), d.join("top.cow"));
    std::fs::write(&base, pattern(3, 8 << 20)).unwrap();
    overlay(&top, &base);
    let size_on_disk = || std::fs::metadata(&top).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    let c = Chain::open(&top, rw()).unwrap();
    c.flush().unwrap();
    let before = size_on_disk();
    let data = pattern(4, 2 << 20);
    c.write_at(&data, 1 << 20).unwrap();
    c.flush().unwrap();
    let grown = size_on_disk() - before;
    assert!((2 << 20..(2 << 20) + (256 << 10)).contains(&grown), "2 MiB of whole chunks grew the file by {grown}");
    let again = pattern(5, 2 << 20);
    c.write_at(&again, 1 << 20).unwrap();
    c.flush().unwrap();
    assert_eq!(size_on_disk() - before, grown, "rewriting the same chunks takes no new space");
    c.close().unwrap();
    drop(c);
    let r = Chain::open(&top, ChainOptions::default()).unwrap();
    let mut got = vec![0u8; 4 << 20];
    r.read_at(&mut got, 0).unwrap();
    let base_bytes = pattern(3, 8 << 20);
    assert!(got[..1 << 20] == base_bytes[..1 << 20], "the chunk before the run still falls through");
    assert!(got[1 << 20..3 << 20] == again[..], "the rewritten run reads back");
    assert!(got[3 << 20..] == base_bytes[3 << 20..4 << 20], "the chunk after the run still falls through");
}

#[test]
fn racing_first_writes_to_one_chunk_all_survive() {
    let d = TempDir::new("race");
    let (base, top) = (d.join("base.raw"), d.join("top.cow"));
    std::fs::write(&base, pattern(3, 2 << 20)).unwrap();
    overlay(&top, &base);
    let c = Arc::new(Chain::open(&top, rw()).unwrap());
    for round in 0..20u64 {
        // 16 threads each write a distinct unaligned 1000-byte piece of the same fresh chunk.
        let chunk_base = round * 65536;
        let handles: Vec<_> = (0..16u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let off = chunk_base + 100 + t * 4000;
                    c.write_at(&pattern(round * 100 + t, 1000), off).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut expect = pattern(3, 2 << 20)[chunk_base as usize..chunk_base as usize + 65536].to_vec();
        for t in 0..16u64 {
            let at = (100 + t * 4000) as usize;
            expect[at..at + 1000].copy_from_slice(&pattern(round * 100 + t, 1000));
        }
        let mut got = vec![0u8; 65536];
        c.read_at(&mut got, chunk_base).unwrap();
        assert!(got == expect, "round {round}: a racing write was lost");
    }
}

#[test]
fn many_readers_and_writers_see_consistent_blocks() {
    let d = TempDir::new("mt");
    let top = d.join("top.cow");
    standalone(&top, 8 << 20);
    let c = Arc::new(Chain::open(&top, rw()).unwrap());
    // Each writer owns a stripe of blocks and writes blocks whose 4 KiB are all one byte value;
    // readers must never see a block mixing two values.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let block = (i * 4 + w) % 2048;
                    c.write_at(&[((i % 250) + 1) as u8; 4096], block * 4096).unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4u64)
        .map(|r| {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                for i in 0..600u64 {
                    c.read_at(&mut buf, ((i * 7 + r) % 2048) * 4096).unwrap();
                    assert!(buf.iter().all(|&b| b == buf[0]), "torn block");
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn one_tib_image_with_little_data_opens_small() {
    let d = TempDir::new("tib");
    let p = d.join("big.cow");
    standalone(&p, 1 << 40);
    let c = Chain::open(&p, rw()).unwrap();
    // 256 chunks spread over the whole terabyte.
    for i in 0..256u64 {
        c.write_at(&pattern(i, 4096), i * (1 << 32) + 8192).unwrap();
    }
    c.close().unwrap();
    drop(c);
    let on_disk = std::fs::metadata(&p).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(on_disk < 4 << 20, "image holds {on_disk} bytes on disk for 1 MiB of data");
    let before = rss_kib();
    let c = Chain::open(&p, ChainOptions::default()).unwrap();
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 16 * 1024, "opening grew RSS by {grown} KiB");
    assert_eq!(c.top().entry_count(), 256);
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 255 * (1 << 32) + 8192).unwrap();
    assert!(b == pattern(255, 4096));
}

/// A log-structured image (format-spec §5.10) on real files: FUA writes of blocks into chunks
/// it has no slot for become records one cluster apart (each record is its chunk's slot);
/// a partial rewrite of such a block before the next checkpoint moves its chunk and keeps
/// the rest of the block; a discard of one reads as zeros; and all of it reads back after a
/// reopen, with the image closed clean and holding no leaked space.
#[test]
fn fua_writes_of_a_log_structured_image_are_records_that_stay_their_blocks_home() {
    let d = TempDir::new("logchain");
    let p = d.join("log.cow");
    let opts = CreateOptions { size: Some(4 << 20), log: true, ..Default::default() };
    create_image(&p, &opts).unwrap().close().unwrap();
    let c = Chain::open(&p, rw()).unwrap();
    assert!(c.top().geometry().log);
    let mut model = vec![0u8; 4 << 20];
    // The first write gives the map its first extent, with a header write: not a record.
    c.write_fua_from(&mut &[7u8; 4096][..], 0, 4096).unwrap();
    model[..4096].fill(7);
    // Blocks 1 and 0 of chunks 10 to 13: the record's head after or before the block.
    for (i, off) in [10u64 * 8192 + 4096, 11 * 8192, 12 * 8192 + 4096, 13 * 8192].into_iter().enumerate() {
        let data = pattern(i as u64 + 1, 4096);
        c.write_fua_from(&mut &data[..], off, 4096).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    let slots: Vec<u64> = (10..14).map(|ch| c.top().with_entry(ch, |e| e.map_or(0, |e| e.data_offset))).collect();
    for w in slots.windows(2) {
        assert_eq!(w[1], w[0] + 8192, "records one after another in the log: {slots:?}");
    }
    // Part of a block written in the log, rewritten without FUA: the chunk moves, the rest of
    // the block comes along.
    let part = pattern(99, 1000);
    let at = 10 * 8192 + 4096 + 700;
    c.write_at(&part, at).unwrap();
    model[at as usize..at as usize + 1000].copy_from_slice(&part);
    assert_ne!(c.top().with_entry(10, |e| e.map_or(0, |e| e.data_offset)), slots[0], "the chunk moved");
    c.discard(12 * 8192, 8192).unwrap();
    model[12 * 8192..13 * 8192].fill(0);
    let mut now = vec![0u8; 4 << 20];
    c.read_at(&mut now, 0).unwrap();
    assert!(now == model, "the device reads what was written");
    c.flush().unwrap();
    c.close().unwrap();
    drop(c);
    let c = Chain::open(&p, ChainOptions::default()).unwrap();
    c.read_at(&mut now, 0).unwrap();
    assert!(now == model, "the device reads what was written after a reopen");
    let r = cowdisk::ops::check::check(&p, &Default::default(), &|_, _| {});
    assert_eq!(r.exit_code(), 0, "closed clean, nothing leaked: {r:?}");
}
