//! Writes seed corpora for the fuzz targets: `make_seeds <dir>` fills `<dir>/image_open`,
//! `<dir>/image_ops` and `<dir>/nbd_server`. Run by tools/fuzz/run.sh before fuzzing.

use cowdisk::format::header::{ParentFormat, ParentRef, PendingSnapshot};
use cowdisk::format::{Geometry, FLAG_CORRUPT, FLAG_FROZEN};
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::MemStorage;
use cowdisk::{Chain, DiskWrite, DiskZero};
use cowdisk_fuzz::harness::{image_open, pattern};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn save(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// Builds a small image in memory with `f` applied to its chain; `close` false leaves it dirty.
fn image(size: u64, shift: u32, parent: Option<ParentRef>, close: bool, f: impl Fn(&Chain)) -> Vec<u8> {
    image_g(Geometry::new(size, shift).expect("geometry"), parent, close, f)
}

fn image_g(g: Geometry, parent: Option<ParentRef>, close: bool, f: impl Fn(&Chain)) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let img = Image::create_on(s.clone(), Path::new("seed.cow"), g, parent, [0x33; 16]).expect("create");
    let c = Chain::assemble(img, Vec::new(), None);
    f(&c);
    if close {
        c.close().expect("close");
        let bytes = s.snapshot();
        drop(c);
        bytes
    } else {
        c.top().flush().expect("flush");
        let bytes = s.snapshot();
        std::mem::forget(c);
        bytes
    }
}

fn with_header(bytes: Vec<u8>, f: impl FnOnce(&mut cowdisk::format::header::Header)) -> Vec<u8> {
    let s = Arc::new(MemStorage::from_bytes(bytes));
    let img = Image::open_on(
        s.clone(),
        Path::new("seed.cow"),
        OpenOptions { allow_frozen: true, allow_corrupt: true, ..OpenOptions::writable() },
    )
    .expect("reopen seed");
    img.update_header(f).expect("update header");
    img.close().expect("close");
    drop(img);
    s.snapshot()
}

fn ops_tail(seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    // A fixed tour of every op, then random bytes.
    for op in 0u8..8 {
        v.push(op);
        v.push(op.wrapping_mul(37)); // span selector
        v.extend_from_slice(&(u64::from(op) * 5000 + 123).to_le_bytes());
        v.extend_from_slice(&(u32::from(op) * 3000 + 7).to_le_bytes());
        v.extend_from_slice(&(seed as u32 + u32::from(op)).to_le_bytes());
    }
    v.extend(pattern(seed, 120));
    v
}

fn image_open_seeds(dir: &Path, golden: &Path) {
    let d = dir.join("image_open");
    for name in ["standalone-4k.cow", "overlay-64k.cow"] {
        if let Ok(b) = std::fs::read(golden.join(name)) {
            save(&d, &format!("golden-{name}"), &b);
            save(&d, &format!("golden-{name}-fixcrc"), &image_open::join(&b, &[], 3));
            save(&d, &format!("golden-{name}-ops"), &image_open::join(&b, &ops_tail(1), 3));
        }
    }
    let raw_parent = ParentRef {
        format: ParentFormat::Raw,
        path: b"base.raw".to_vec(),
        uuid: [0; 16],
        size: 65536,
        fingerprint: 0x1234_5678,
    };
    let cow_parent = ParentRef {
        format: ParentFormat::Cowdisk,
        path: b"../lower/parent.cow".to_vec(),
        uuid: [0x44; 16],
        size: 1 << 20,
        fingerprint: 0,
    };
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("empty-4k", image(256 * 1024, 12, None, true, |_| {})),
        ("small-512", image(512, 12, None, true, |c| c.write_at(&[1; 100], 0).unwrap())),
        (
            "writes-4k",
            image(256 * 1024, 12, None, true, |c| {
                c.write_at(&pattern(5, 9000), 3000).unwrap();
                c.write_zeroes(20_000, 10_000, false).unwrap();
                c.write_at(&[0xee; 512], 256 * 1024 - 512).unwrap();
            }),
        ),
        (
            "dirty-16k",
            image(1 << 20, 14, None, false, |c| {
                c.write_at(&pattern(6, 40_000), 100_000).unwrap();
                c.discard(100_000, 20_000).unwrap();
            }),
        ),
        (
            "raw-parent-64k",
            image(128 * 1024, 16, Some(raw_parent), true, |c| {
                c.write_at(&[0xcc; 4096], 4096).unwrap();
                c.discard(65536, 65536).unwrap();
            }),
        ),
        (
            "cow-parent-32k",
            image(4 << 20, 15, Some(cow_parent), true, |c| {
                c.write_at(&pattern(7, 5000), (2 << 20) - 100).unwrap();
            }),
        ),
        (
            "huge-virtual",
            image(1 << 60, 16, None, true, |c| {
                c.write_at(&[9; 4096], (1 << 60) - 4096).unwrap();
                c.write_at(&[8; 4096], 0).unwrap();
            }),
        ),
    ];
    let sums = Geometry::new(512 * 1024, 14).unwrap().with_data_checksums(true).unwrap();
    seeds.push((
        "checksums-16k",
        image_g(sums, None, true, |c| {
            c.write_at(&pattern(9, 20_000), 1000).unwrap();
            c.write_at(&pattern(10, 4096), 8192).unwrap();
            c.discard(40_960, 16_384).unwrap();
        }),
    ));
    seeds.push((
        "checksums-dirty",
        image_g(sums, None, false, |c| {
            c.write_at(&pattern(11, 9000), 70_000).unwrap();
            c.top().flush().unwrap();
            c.write_at(&pattern(12, 3000), 71_000).unwrap();
        }),
    ));
    let base = image(64 * 1024, 12, None, true, |c| c.write_at(&pattern(8, 8192), 0).unwrap());
    seeds.push(("frozen", with_header(base.clone(), |h| h.set_flag(FLAG_FROZEN, true))));
    seeds.push(("corrupt", with_header(base.clone(), |h| h.set_flag(FLAG_CORRUPT, true))));
    seeds.push((
        "pending",
        with_header(base, |h| {
            h.pending = Some(PendingSnapshot {
                live: b"disk.cow".to_vec(),
                snapshot: b"snap.cow".to_vec(),
                temp: b".disk.cow.tmp".to_vec(),
            })
        }),
    ));
    for (i, (name, mut bytes)) in seeds.into_iter().enumerate() {
        // Trailing zeros read back as zeros: drop them while the image still opens.
        let full = bytes.clone();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        if !image_open::opens(&bytes) {
            bytes = full;
        }
        save(&d, name, &bytes);
        save(&d, &format!("{name}-fixcrc"), &image_open::join(&bytes, &[], 3));
        save(&d, &format!("{name}-ops"), &image_open::join(&bytes, &ops_tail(i as u64 + 10), 3));
    }
}

fn image_ops_seeds(dir: &Path) {
    let d = dir.join("image_ops");
    for i in 0u64..24 {
        let mut v = vec![
            (i * 17) as u8,                // size, lower count
            (i * 5) as u8,                 // top chunk shift
            (i * 3) as u8 | (i & 1) as u8, // base
        ];
        v.extend(pattern(i + 100, 60 + (i as usize * 37) % 400));
        save(&d, &format!("ops-{i:02}"), &v);
    }
}

/// NBD client byte streams.
mod nbd {
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

    pub fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    pub fn go(o: u32, name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        opt(o, &d)
    }

    pub fn meta(o: u32, name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        opt(o, &d)
    }

    pub fn req(flags: u16, typ: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    pub fn write(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        let mut v = req(flags, 1, cookie, offset, data.len() as u32);
        v.extend_from_slice(data);
        v
    }
}

fn nbd_seeds(dir: &Path) {
    use nbd::*;
    let d = dir.join("nbd_server");
    let flags = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    let requests = |structured: bool| {
        let mut v = Vec::new();
        v.extend(req(0, 0, 1, 0, 4096)); // read
        v.extend(write(0, 2, 8192, &pattern(1, 4096))); // write
        v.extend(write(1, 3, 5000, &pattern(2, 300))); // write FUA, unaligned
        v.extend(req(0, 0, 4, 0, 200_000)); // large read with holes
        if structured {
            v.extend(req(4, 0, 5, 65536, 131_072)); // read DF
            v.extend(req(0, 7, 6, 0, 1 << 20)); // block status
            v.extend(req(8, 7, 7, 4096, 65536)); // block status REQ_ONE
        }
        v.extend(req(0, 4, 8, 131_072, 65536)); // trim
        v.extend(req(0, 6, 9, 300_000, 10_000)); // write zeroes
        v.extend(req(2, 6, 10, 400_000, 8192)); // write zeroes NO_HOLE
        v.extend(req(16, 6, 11, 500_000, 4096)); // FAST_ZERO
        v.extend(req(0, 3, 12, 0, 0)); // flush
        v.extend(req(0, 5, 13, 0, 4096)); // cache
        v.extend(req(0, 0, 14, (1 << 20) - 10, 100)); // read out of range
        v.extend(req(0, 9, 15, 0, 1)); // unknown command
        v.extend(req(0, 2, 16, 0, 0)); // disc
        v
    };
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    // Structured replies, base:allocation, GO.
    let mut s = flags.clone();
    s.extend(opt(8, &[]));
    s.extend(meta(9, "disk", &[]));
    s.extend(meta(10, "disk", &["base:allocation"]));
    s.extend(go(7, "disk", &[3, 1, 2]));
    s.extend(requests(true));
    seeds.push(("go-structured", s));
    // Old-style EXPORT_NAME, simple replies.
    let mut s = flags.clone();
    s.extend(opt(1, b"disk"));
    s.extend(requests(false));
    seeds.push(("export-name-simple", s));
    // LIST, INFO, then GO on the read-only export; writes must fail.
    let mut s = 1u32.to_be_bytes().to_vec();
    s.extend(opt(3, &[]));
    s.extend(go(6, "ro", &[0, 1, 2, 3]));
    s.extend(go(6, "nope", &[]));
    s.extend(opt(8, &[]));
    s.extend(go(7, "ro", &[]));
    s.extend(requests(true));
    seeds.push(("go-read-only", s));
    // Errors during haggling, then GO on the default export.
    let mut s = flags.clone();
    s.extend(opt(5, &[])); // STARTTLS with TLS off
    s.extend(opt(99, b"unknown"));
    s.extend(meta(10, "disk", &["base:allocation"])); // before STRUCTURED_REPLY
    s.extend(opt(8, b"x")); // with data
    s.extend(go(7, "", &[]));
    s.extend(write(0, 1, 0, &pattern(3, 100)));
    s.extend(req(0, 1, 2, 0, 40 << 20)); // oversized write, payload missing
    seeds.push(("haggle-errors", s));
    let mut s = flags.clone();
    s.extend(opt(2, &[])); // ABORT
    seeds.push(("abort", s));
    for (name, s) in seeds {
        let mut odd = s.clone();
        if odd.len() % 2 == 0 {
            odd.push(0);
        }
        let mut even = s;
        if even.len() % 2 == 1 {
            even.push(0);
        }
        eprintln!("nbd seed {name}: {:?} (requests, reply bytes)", cowdisk_fuzz::harness::nbd_server::session(&even));
        save(&d, &format!("{name}-1thread"), &even);
        save(&d, &format!("{name}-2threads"), &odd);
    }
}

fn main() {
    let out: PathBuf = std::env::args().nth(1).expect("usage: make_seeds <dir>").into();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    image_open_seeds(&out, &golden);
    image_ops_seeds(&out);
    nbd_seeds(&out);
    eprintln!("seeds written under {}", out.display());
}
