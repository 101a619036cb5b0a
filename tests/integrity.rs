//! Integrity: single bit flips anywhere in an image with data checksums (data blocks, map
//! sectors, header slots) are caught: a read errors instead of returning wrong data, or the
//! damaged copy is never used, and check says what is wrong. A checksum failure at run time
//! marks the image corrupt, which refuses writable opens until `check --repair` finds it sound.

mod common;

use common::{pattern, TempDir};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::format::FLAG_CORRUPT;
use cowdisk::ops::check::{check, CheckOptions};
use cowdisk::{Chain, ChainOptions, DiskFlush, DiskRead, DiskWrite, ErrorKind};
use std::path::Path;

const SIZE: u64 = 1 << 20;

fn make(dir: &TempDir) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("sums.cow");
    let o = CreateOptions { size: Some(SIZE), data_checksums: Some(true), ..Default::default() };
    create_image(&p, &o).unwrap().close().unwrap();
    let c = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
    let data = pattern(11, SIZE as usize);
    c.write_at(&data, 0).unwrap();
    c.close().unwrap();
    (p, data)
}

fn read_all(p: &Path) -> cowdisk::Result<Vec<u8>> {
    let c = Chain::open(p, ChainOptions::default())?;
    let mut b = vec![0u8; SIZE as usize];
    c.read_at(&mut b, 0)?;
    Ok(b)
}

fn deep(p: &Path) -> cowdisk::ops::check::CheckReport {
    check(p, &CheckOptions { deep: true, ..Default::default() }, &|_, _| {})
}

#[test]
fn every_flipped_bit_is_caught() {
    let d = TempDir::new("bitflip");
    let (p, data) = make(&d);
    let good = std::fs::read(&p).unwrap();
    let h = cowdisk::layer::read_header_only(&p).unwrap();
    let img = cowdisk::layer::Image::open(&p, cowdisk::layer::OpenOptions::inspect()).unwrap();
    let slots: Vec<u64> = img.entries().iter().map(|(_, e)| e.data_offset).collect();
    drop(img);
    let ext = h.map_extents[0];
    let used_sectors: Vec<u64> = (ext.offset..ext.end().min(good.len() as u64))
        .step_by(512)
        .filter(|&o| good[o as usize..o as usize + 512].iter().any(|&b| b != 0))
        .collect();
    assert!(!used_sectors.is_empty() && slots.len() == 16);

    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut cases = Vec::new();
    for _ in 0..40 {
        let slot = slots[rnd(slots.len() as u64) as usize];
        cases.push(("data", slot + rnd(65536), rnd(8)));
    }
    for _ in 0..20 {
        let s = used_sectors[rnd(used_sectors.len() as u64) as usize];
        cases.push(("map", s + rnd(512), rnd(8)));
    }
    for _ in 0..20 {
        cases.push(("header", rnd(8192), rnd(8)));
    }
    for (what, byte, bit) in cases {
        let mut b = good.clone();
        b[byte as usize] ^= 1 << bit;
        std::fs::write(&p, &b).unwrap();
        match (what, read_all(&p)) {
            (_, Ok(got)) if what == "header" => {
                // The damaged slot is passed over; the other one serves the same image.
                assert!(got == data, "header flip at {byte}: wrong data");
                let r = deep(&p);
                assert!(r.images[0].header_slot_damaged, "header flip at {byte} not reported: {r:?}");
                assert_eq!(r.exit_code(), 3);
            }
            (_, Ok(_)) => panic!("{what} flip at byte {byte} bit {bit} went unnoticed"),
            ("data", Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::BadChecksum, "{e}");
                assert!(e.to_string().contains("data checksum mismatch"), "{e}");
                let r = deep(&p);
                assert_eq!(r.exit_code(), 2, "data flip at {byte}: {r:?}");
                assert_eq!(r.images[0].damaged_blocks, 1);
            }
            (_, Err(e)) => {
                assert!(matches!(e.kind(), ErrorKind::BadChecksum | ErrorKind::Corrupt), "{what} flip: {e}");
                assert_eq!(deep(&p).exit_code(), 2);
            }
        }
    }
    std::fs::write(&p, &good).unwrap();
    assert_eq!(deep(&p).exit_code(), 0);
}

#[test]
fn a_checksum_failure_at_run_time_marks_the_image_corrupt_until_repair() {
    let d = TempDir::new("corruptflag");
    let (p, data) = make(&d);
    let good = std::fs::read(&p).unwrap();
    let img = cowdisk::layer::Image::open(&p, cowdisk::layer::OpenOptions::inspect()).unwrap();
    let (chunk, e) = img.entries().into_iter().next().unwrap();
    drop(img);
    let damaged = e.data_offset + 100;
    let mut b = good.clone();
    b[damaged as usize] ^= 0x01;
    std::fs::write(&p, &b).unwrap();

    // A server would be running this chain: the client's read fails, nothing wrong is returned.
    let c = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
    let mut buf = vec![0u8; 4096];
    let at = chunk * 65536;
    assert_eq!(c.read_at(&mut buf, at).unwrap_err().kind(), ErrorKind::BadChecksum);
    // Other blocks still read.
    c.read_at(&mut buf, at + 8192).unwrap();
    assert!(buf[..] == data[(at + 8192) as usize..(at + 12288) as usize]);
    c.flush().unwrap();
    c.close().unwrap();
    drop(c);
    assert!(cowdisk::layer::read_header_only(&p).unwrap().has_flag(FLAG_CORRUPT));
    let e = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("check --repair"), "{e}");

    // Repair scrubs first: the block is still bad, so the mark stays.
    let r = check(&p, &CheckOptions { repair: true, ..Default::default() }, &|_, _| {});
    assert_eq!(r.exit_code(), 2, "{r:?}");
    assert!(cowdisk::layer::read_header_only(&p).unwrap().has_flag(FLAG_CORRUPT));

    // Once the block is sound again (restored from elsewhere), repair clears the mark.
    let mut now = std::fs::read(&p).unwrap();
    now[damaged as usize] ^= 0x01;
    std::fs::write(&p, &now).unwrap();
    let r = check(&p, &CheckOptions { repair: true, ..Default::default() }, &|_, _| {});
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(!cowdisk::layer::read_header_only(&p).unwrap().has_flag(FLAG_CORRUPT));
    Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
}
