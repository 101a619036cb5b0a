//! Writes seed corpora for the fuzz targets: `make_seeds <dir>` fills `<dir>/<target>` for
//! every target. Run by tools/fuzz/run.sh before fuzzing.

use cowdisk::format::header::{ParentFormat, ParentRef, PendingSnapshot};
use cowdisk::format::{Geometry, FLAG_CORRUPT, FLAG_FROZEN};
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::MemStorage;
use cowdisk::{Chain, DiskWrite, DiskZero};
use cowdisk_fuzz::harness::client::{go, meta, opt, req, write};
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

/// A tour of every request type (and some edge cases) for the `disk` export.
fn requests(structured: bool) -> Vec<u8> {
    {
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
    }
}

fn nbd_seeds(dir: &Path) {
    let d = dir.join("nbd_server");
    let flags = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
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

/// image_files: the image_ops seeds, and the same with the operations only files have
/// (NBD writes, flatten of the open chain, copy into a file) woven in.
fn image_files_seeds(dir: &Path) {
    let d = dir.join("image_files");
    for i in 0u64..24 {
        let mut v = vec![(i * 17) as u8, (i * 5) as u8, (i * 3) as u8 | (i & 1) as u8];
        let mut r = pattern(i + 300, 60 + (i as usize * 37) % 400);
        // Every 13th byte an op of the files' own (13, 14, 15 mod 16), as far as the decoder
        // lands on it.
        for (k, b) in r.iter_mut().enumerate().filter(|(k, _)| k % 13 == 0) {
            *b = (*b & 0xf0) | (13 + (k / 13 % 3) as u8);
        }
        v.extend(r);
        save(&d, &format!("files-{i:02}"), &v);
    }
    for i in 0u64..8 {
        let mut v = vec![(i * 17) as u8, (i * 5) as u8, (i * 3) as u8 | (i & 1) as u8];
        v.extend(pattern(i + 100, 60 + (i as usize * 37) % 400));
        save(&d, &format!("ops-{i:02}"), &v);
    }
}

/// A ClientHello as a rustls client sends it (for the raw nbd_tls seeds).
fn client_hello(tls13_only: bool) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let vers: &[&rustls::SupportedProtocolVersion] =
        if tls13_only { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(vers)
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(std::sync::Arc::new(cfg), ServerName::try_from("localhost").unwrap())
        .expect("client");
    let mut v = Vec::new();
    c.write_tls(&mut v).expect("hello");
    v
}

/// nbd_tls: byte 0 = server (bits 0-1: required, verify, optional) | identity << 2 (none,
/// CA's, foreign, self-signed) | versions << 4 | raw << 6. Scripted: plain length, plain
/// bytes (client flags, options), mutation count and mutations (u16 LE position, kind,
/// value), then the plaintext sent over TLS.
fn nbd_tls_seeds(dir: &Path) {
    let d = dir.join("nbd_tls");
    let flags = 3u32.to_be_bytes().to_vec();
    let mut over_tls = Vec::new();
    over_tls.extend(opt(8, &[]));
    over_tls.extend(meta(10, "disk", &["base:allocation"]));
    over_tls.extend(go(7, "disk", &[3, 1, 2]));
    over_tls.extend(requests(true));
    let mut list_go = opt(3, &[]);
    list_go.extend(go(6, "disk", &[1]));
    list_go.extend(go(7, "ro", &[]));
    list_go.extend(req(0, 0, 1, 0, 4096));
    let scripted = |b0: u8, plain_opts: &[u8], muts: &[(u16, u8, u8)], app: &[u8]| {
        let mut plain = flags.clone();
        plain.extend_from_slice(plain_opts);
        assert!(plain.len() < 256);
        let mut v = vec![b0, plain.len() as u8];
        v.extend(plain);
        v.push(muts.len() as u8);
        for (pos, kind, val) in muts {
            v.extend(pos.to_le_bytes());
            v.push(*kind);
            v.push(*val);
        }
        v.extend_from_slice(app);
        v
    };
    let mut pre = opt(3, &[]); // LIST before TLS: refused when TLS is required
    pre.extend(opt(8, &[]));
    pre.extend(go(6, "disk", &[1, 2]));
    for server in 0u8..3 {
        for id in 0u8..4 {
            for versions in 0u8..3 {
                let b0 = server | id << 2 | versions << 4;
                let tag = format!("s{server}-id{id}-v{versions}");
                save(&d, &format!("{tag}-go"), &scripted(b0, &[], &[], &over_tls));
                if versions == 0 {
                    save(&d, &format!("{tag}-pre-list"), &scripted(b0, &pre, &[], &list_go));
                    save(&d, &format!("{tag}-flip"), &scripted(b0, &[], &[(60, 0, 0x40)], &over_tls));
                    save(&d, &format!("{tag}-cut"), &scripted(b0, &[], &[(100, 1, 0)], &over_tls));
                    save(&d, &format!("{tag}-insert"), &scripted(b0, &[], &[(5, 2, 7)], &over_tls));
                }
            }
        }
        // Plain options that end the plain phase (GO, EXPORT_NAME, ABORT).
        save(&d, &format!("s{server}-plain-go"), &scripted(server, &go(7, "disk", &[]), &[], &[]));
        save(&d, &format!("s{server}-plain-export-name"), &scripted(server, &opt(1, b"disk"), &[], &[]));
        // Raw: plain options, STARTTLS, a real ClientHello, then garbage.
        for (k, tls13) in [(0, true), (1, false)] {
            let mut raw = vec![server | 0x40];
            raw.extend(&flags);
            raw.extend(opt(8, &[]));
            raw.extend(opt(5, &[]));
            raw.extend(client_hello(tls13));
            save(&d, &format!("s{server}-raw-hello{k}"), &raw);
        }
        let mut raw = vec![server | 0x40];
        raw.extend(&flags);
        raw.extend(&pre);
        raw.extend(opt(5, b"x"));
        raw.extend(opt(5, &[]));
        raw.extend(pattern(5, 300));
        save(&d, &format!("s{server}-raw-garbage"), &raw);
    }
}

/// nbd_multi: setup byte (files, 2 or 3 connections, window, chunk), connection byte
/// (structured, threads), then ops.
fn nbd_multi_seeds(dir: &Path) {
    let d = dir.join("nbd_multi");
    for i in 0u64..24 {
        let mut v = vec![(i * 7) as u8, (i * 13) as u8];
        v.extend(pattern(i + 500, 100 + (i as usize * 53) % 500));
        save(&d, &format!("multi-{i:02}"), &v);
    }
}

/// ops_chain: setup byte (size, chunk size, checksums, base), then steps.
fn ops_chain_seeds(dir: &Path) {
    let d = dir.join("ops_chain");
    for i in 0u64..24 {
        let mut v = vec![(i * 11) as u8];
        let mut steps = pattern(i + 700, 80 + (i as usize * 41) % 300);
        // A snapshot, a commit and a kill early on, whatever the bytes say.
        for (k, op) in [(0usize, 7u8), (18, 10), (30, 11), (40, 9), (50, 8)] {
            if let Some(b) = steps.get_mut(k) {
                *b = op;
            }
        }
        v.append(&mut steps);
        save(&d, &format!("ops-{i:02}"), &v);
    }
}

fn main() {
    let out: PathBuf = std::env::args().nth(1).expect("usage: make_seeds <dir>").into();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    image_open_seeds(&out, &golden);
    image_ops_seeds(&out);
    image_files_seeds(&out);
    nbd_seeds(&out);
    nbd_tls_seeds(&out);
    nbd_multi_seeds(&out);
    ops_chain_seeds(&out);
    eprintln!("seeds written under {}", out.display());
}
