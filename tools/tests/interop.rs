//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio's nbd engine) against `cowdisk serve` over nbd+unix:// URIs: an overlay on a pseudo-random raw base reads and writes exactly like a plain disk, reports its allocation truthfully, and never touches the base.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::nbdtest::{nbdinfo_map, MapRun};
use common::*;

/// Size of the raw base (and so of overlays on it).
const BASE_SIZE: u64 = 32 * MIB;

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

fn cowdisk(args: &[&str]) -> Output {
    run(Command::new(cowdisk_bin()).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A temp dir holding a raw base of pseudo-random bytes and a server exporting
/// cowdisk images made on (or beside) it. The server is declared first so it
/// is stopped before the directory is removed.
struct Rig {
    server: Server,
    base: PathBuf,
    /// The base's bytes when the rig was made; it must never change.
    base_bytes: Vec<u8>,
    dir: TempDir,
}

/// What an image in a [`Rig`] is made of.
enum Img<'a> {
    /// An overlay on the rig's raw base.
    Overlay(&'a str),
    /// A standalone image (no parent) of this size.
    Standalone(&'a str, u64),
}

impl Rig {
    /// A raw base of `base_size` random bytes, the given images, and one
    /// `cowdisk serve` exporting them all (export name = image name).
    fn new(base_size: u64, images: &[Img], serve_args: &[&str]) -> Rig {
        let dir = TempDir::for_test();
        let base = dir.join("base.raw");
        write_random_file(&base, base_size, 0xba5e);
        let base_bytes = fs::read(&base).unwrap();
        let mut paths = Vec::new();
        for img in images {
            match img {
                Img::Overlay(name) => {
                    let p = dir.join(format!("{name}.cow"));
                    cowdisk(&["create", s(&p), "--backing", s(&base), "--backing-format", "raw"]);
                    paths.push(p);
                }
                Img::Standalone(name, size) => {
                    let p = dir.join(format!("{name}.cow"));
                    cowdisk(&["create", s(&p), "--size", &size.to_string()]);
                    paths.push(p);
                }
            }
        }
        let sock = dir.join("nbd.sock");
        let mut args: Vec<&str> = paths.iter().map(|p| s(p)).collect();
        args.extend(["--socket", s(&sock)]);
        args.extend(serve_args);
        let server = Server::start(&args);
        Rig { server, base, base_bytes, dir }
    }

    fn uri(&self, export: &str) -> String {
        self.server.uri(export)
    }

    #[track_caller]
    fn assert_base_unchanged(&self) {
        let now = fs::read(&self.base).unwrap();
        assert_bytes_eq(&now, &self.base_bytes, "raw base after writes through the overlay");
    }
}

/// `qemu-io -f raw -c CMD... URI`; panics (with output) unless every command succeeded.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let out = run(&mut cmd);
    let text = stdout_of(&out);
    assert!(!text.contains("failed"), "qemu-io reported a failure with exit status 0:\n{text}");
    text
}

/// The bytes `qemu-io -c 'read -v OFF LEN'` dumps, parsed from its hex listing
/// (`OFFSET:  xx xx ... ascii`; each line shows up to 16 bytes).
fn qemu_io_read_v(uri: &str, offset: u64, len: usize) -> Vec<u8> {
    let text = qemu_io(uri, &[&format!("read -v {offset} {len}")]);
    let mut bytes = Vec::with_capacity(len);
    for line in text.lines() {
        let Some((addr, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        assert_eq!(addr, offset + bytes.len() as u64, "read -v listing out of order:\n{text}");
        let n = (len - bytes.len()).min(16);
        // Take exactly n byte tokens: the ASCII column may contain spaces.
        for tok in rest.split_whitespace().take(n) {
            bytes.push(u8::from_str_radix(tok, 16).unwrap_or_else(|_| panic!("bad hex byte {tok:?} in:\n{text}")));
        }
    }
    assert_eq!(bytes.len(), len, "read -v listing incomplete:\n{text}");
    bytes
}

/// `qemu-img compare` of the export (raw) against a raw file: true if identical.
fn qemu_img_identical(uri: &str, file: &Path) -> bool {
    let out = run_status(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(uri).arg(file));
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}\n{}\n{}",
            out.status,
            stdout_of(&out),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A copy of the export's contents, via `nbdcopy URI -` (stdout).
fn export_bytes(uri: &str) -> Vec<u8> {
    run(tool("nbdcopy").arg(uri).arg("-")).stdout
}

/// Exit code of an `nbdinfo --can X` / `--is X` query: 0 true, 2 false.
fn nbdinfo_query(uri: &str, kind: &str, what: &str) -> bool {
    let out = run_status(tool("nbdinfo").arg(kind).arg(what).arg(uri));
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {kind} {what} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

/// The map a disk of `size` should have when exactly `data` (sorted,
/// non-overlapping byte ranges) holds data and everything else is a hole.
fn expected_map(size: u64, data: &[(u64, u64)]) -> Vec<MapRun> {
    let hole = |offset, length| MapRun { offset, length, kind: 3, desc: "hole,zero".into() };
    let mut out: Vec<MapRun> = Vec::new();
    let mut pos = 0;
    for &(off, len) in data {
        assert!(off >= pos, "ranges must be sorted and disjoint");
        if off > pos {
            out.push(hole(pos, off - pos));
        }
        match out.last_mut() {
            Some(last) if last.kind == 0 && last.offset + last.length == off => last.length += len,
            _ => out.push(MapRun { offset: off, length: len, kind: 0, desc: "data".into() }),
        }
        pos = off + len;
    }
    if pos < size {
        out.push(hole(pos, size - pos));
    }
    out
}

fn fill(buf: &mut [u8], offset: u64, len: u64, byte: u8) {
    buf[offset as usize..(offset + len) as usize].fill(byte);
}

// ---------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------

#[test]
fn qemu_io_patterns_at_aligned_and_unaligned_offsets_read_back_and_never_reach_the_base() {
    if !require_tool("qemu-io") {
        return;
    }
    let rig = Rig::new(BASE_SIZE, &[Img::Overlay("disk")], &[]);
    let uri = rig.uri("disk");
    let mut expected = rig.base_bytes.clone();

    // (offset, length, pattern): chunk-aligned, block-aligned, inside one
    // block, across a block boundary, across a 64K chunk boundary, a long
    // unaligned run over many chunks, the very end of the disk, and one
    // unaligned 8 MiB request.
    let writes: &[(u64, u64, u8)] = &[
        (MIB, 64 * KIB, 0xab),
        (4 * KIB, 4 * KIB, 0x11),
        (3000, 777, 0xcd),
        (12 * KIB - 100, 300, 0x5a),
        (3 * 64 * KIB - 1000, 2500, 0x77),
        (5 * MIB + 1, MIB + 3333, 0xe1),
        (BASE_SIZE - 513, 513, 0x3c),
        (21 * MIB + 12345, 8 * MIB + 1, 0xf0),
    ];
    let mut cmds: Vec<String> = writes.iter().map(|(o, l, p)| format!("write -P {p:#x} {o} {l}")).collect();
    // Non-uniform data (a pattern cannot show bytes landing in the wrong
    // place): 300000 random bytes at an unaligned offset, from a file.
    let random_src = rig.dir.join("random.bin");
    let random = random_bytes(300_000, 0x7a2d);
    fs::write(&random_src, &random).unwrap();
    let random_at = 7 * MIB + 333;
    cmds.push(format!("write -s {} {random_at} {}", s(&random_src), random.len()));
    // FUA, and several requests in flight at once.
    cmds.push(format!("write -f -P 0x42 {} 12345", 9 * MIB + 7));
    for i in 0..8u64 {
        cmds.push(format!("aio_write -P {:#x} {} 40000", 0x80 + i, 12 * MIB + i * 40000));
    }
    cmds.push("aio_flush".into());
    cmds.push("flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
    for &(o, l, p) in writes {
        fill(&mut expected, o, l, p);
    }
    expected[random_at as usize..random_at as usize + random.len()].copy_from_slice(&random);
    fill(&mut expected, 9 * MIB + 7, 12345, 0x42);
    for i in 0..8u64 {
        fill(&mut expected, 12 * MIB + i * 40000, 40000, 0x80 + i as u8);
    }

    // Read back with pattern verification, from a new connection.
    let mut verify: Vec<String> = writes.iter().map(|(o, l, p)| format!("read -P {p:#x} {o} {l}")).collect();
    verify.push(format!("read -P 0x42 {} 12345", 9 * MIB + 7));
    for i in 0..8u64 {
        verify.push(format!("read -P {:#x} {} 40000", 0x80 + i, 12 * MIB + i * 40000));
    }
    let refs: Vec<&str> = verify.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);

    // Spot checks across the edges, where base bytes meet written bytes.
    for &(o, len) in &[
        (2990u64, 32usize),
        (3000 + 777 - 10, 20),
        (12 * KIB - 108, 16),
        (12 * KIB + 190, 20),
        (3 * 64 * KIB - 1008, 24),
        (3 * 64 * KIB + 1490, 24),
        (5 * MIB - 7, 16),
        (6 * MIB + 3330, 16),
        (BASE_SIZE - 520, 20),
        (20 * MIB + 123, 48),
        (random_at - 8, 16),
        (random_at + 150_000, 40),
        (random_at + 300_000 - 8, 16),
        (29 * MIB + 12340, 16),
    ] {
        let got = qemu_io_read_v(&uri, o, len);
        assert_bytes_eq(&got, &expected[o as usize..o as usize + len], &format!("read -v {o} {len}"));
    }

    // Zeroing: unmapped, allocated, and fast-zero-only (-n -u is metadata only).
    qemu_io(
        &uri,
        &[
            &format!("write -z -u {} {}", 14 * MIB, 64 * KIB),
            &format!("write -z {} {}", 15 * MIB + 4096, 10000),
            &format!("write -z -u -n {} {}", 16 * MIB, 128 * KIB),
            &format!("discard {} {}", 17 * MIB, 256 * KIB),
        ],
    );
    fill(&mut expected, 14 * MIB, 64 * KIB, 0);
    fill(&mut expected, 15 * MIB + 4096, 10000, 0);
    fill(&mut expected, 16 * MIB, 128 * KIB, 0);
    fill(&mut expected, 17 * MIB, 256 * KIB, 0);
    qemu_io(
        &uri,
        &[
            &format!("read -P 0 {} {}", 14 * MIB, 64 * KIB),
            &format!("read -P 0 {} 10000", 15 * MIB + 4096),
            &format!("read -P 0 {} {}", 16 * MIB, 128 * KIB),
            &format!("read -P 0 {} {}", 17 * MIB, 256 * KIB),
        ],
    );

    // The whole device, through another client, is exactly what we expect.
    if require_tool("nbdcopy") {
        assert_bytes_eq(&export_bytes(&uri), &expected, "whole export after qemu-io writes");
    }
    rig.assert_base_unchanged();
    let status = rig.server.stop();
    assert!(status.success(), "cowdisk serve on SIGTERM: {status}");
    assert_bytes_eq(&fs::read(&rig.base).unwrap(), &rig.base_bytes, "base after stop");
}

// ---------------------------------------------------------------------------
// qemu-img
// ---------------------------------------------------------------------------

#[test]
fn qemu_img_compare_and_convert_from_and_into_the_export_are_byte_exact() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let rig = Rig::new(BASE_SIZE, &[Img::Overlay("disk"), Img::Overlay("into")], &[]);
    let uri = rig.uri("disk");

    // A fresh overlay is its base.
    assert!(qemu_img_identical(&uri, &rig.base), "fresh overlay vs base");

    // Write, and keep the expected raw image locally.
    let mut expected = rig.base_bytes.clone();
    qemu_io(
        &uri,
        &[
            "write -P 0x61 0 4096",
            "write -P 0x62 100000 300000",
            &format!("write -P 0x63 {} 77777", 7 * MIB + 5),
            &format!("write -z {} {}", 20 * MIB, MIB),
        ],
    );
    fill(&mut expected, 0, 4096, 0x61);
    fill(&mut expected, 100000, 300000, 0x62);
    fill(&mut expected, 7 * MIB + 5, 77777, 0x63);
    fill(&mut expected, 20 * MIB, MIB, 0);
    let expected_file = rig.dir.join("expected.raw");
    fs::write(&expected_file, &expected).unwrap();
    assert!(qemu_img_identical(&uri, &expected_file), "export vs locally maintained expected image");
    assert!(!qemu_img_identical(&uri, &rig.base), "compare must see the writes (export vs base)");

    // convert FROM the export.
    let out = rig.dir.join("converted.raw");
    run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&out));
    assert_eq!(fs::metadata(&out).unwrap().len(), BASE_SIZE);
    assert_files_equal(&out, &expected_file);

    // convert INTO an existing export (-n), plain URI target. The source has
    // data, written zeroes and a sparse hole, so qemu-img both writes and
    // zeroes; -W -m 8 keeps several requests in flight, completing out of order.
    let src = rig.dir.join("src.raw");
    write_random_file(&src, BASE_SIZE, 0x5eed);
    {
        let mut f = open_rw(&src);
        f.seek(SeekFrom::Start(3 * MIB + 512)).unwrap();
        f.write_all(&vec![0u8; (MIB + 1536) as usize]).unwrap();
        // A real hole: punch it by rewriting the tail after a truncate.
        let tail = fs::read(&src).unwrap()[(12 * MIB) as usize..].to_vec();
        f.set_len(10 * MIB).unwrap();
        f.seek(SeekFrom::Start(12 * MIB)).unwrap();
        f.write_all(&tail).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(fs::metadata(&src).unwrap().len(), BASE_SIZE);
    run(tool("qemu-img").args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    assert!(qemu_img_identical(&uri, &src), "export after convert -n into it");
    let back = rig.dir.join("back.raw");
    run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&back));
    assert_files_equal(&back, &src);

    // convert INTO the other overlay, target given by --target-image-opts.
    let src2 = rig.dir.join("src2.raw");
    write_random_file(&src2, BASE_SIZE, 0x5eed2);
    let sock = rig.server.socket().to_string_lossy().replace(',', ",,");
    run(tool("qemu-img")
        .args(["convert", "-n", "-f", "raw"])
        .arg(&src2)
        .arg("--target-image-opts")
        .arg(format!("driver=nbd,server.type=unix,server.path={sock},export=into")));
    let into = rig.uri("into");
    assert!(qemu_img_identical(&into, &src2), "export 'into' after convert");
    // ...and that left the first export alone.
    assert!(qemu_img_identical(&uri, &src), "export 'disk' unaffected");

    rig.assert_base_unchanged();
}

// ---------------------------------------------------------------------------
// nbdinfo
// ---------------------------------------------------------------------------

#[test]
fn nbdinfo_reports_size_and_flags_of_writable_and_read_only_exports() {
    if !require_tool("nbdinfo") {
        return;
    }
    let rig = Rig::new(BASE_SIZE, &[Img::Overlay("disk"), Img::Standalone("blank", 48 * MIB)], &[]);
    let uri = rig.uri("disk");

    let size = stdout_of(&run(tool("nbdinfo").arg("--size").arg(&uri)));
    assert_eq!(size.trim(), BASE_SIZE.to_string());
    let size = stdout_of(&run(tool("nbdinfo").arg("--size").arg(rig.uri("blank"))));
    assert_eq!(size.trim(), (48 * MIB).to_string());

    for can in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert!(nbdinfo_query(&uri, "--can", can), "writable export: --can {can}");
    }
    assert!(!nbdinfo_query(&uri, "--is", "read-only"));

    // The plain text listing agrees.
    let text = stdout_of(&run(tool("nbdinfo").arg(&uri)));
    assert!(text.contains("export=\"disk\""), "{text}");
    assert!(text.contains(&format!("export-size: {BASE_SIZE}")), "{text}");
    assert!(text.contains("is_read_only: false"), "{text}");
    assert!(text.contains("base:allocation"), "{text}");

    // --list shows both exports of the one server.
    let list = stdout_of(&run(tool("nbdinfo").arg("--list").arg(&uri)));
    assert!(list.contains("export=\"disk\"") && list.contains("export=\"blank\""), "{list}");

    // The same overlay served --read-only by a second server once the first is gone.
    let Rig { server, dir, .. } = rig;
    assert!(server.stop().success());
    let ro_sock = dir.join("ro.sock");
    let ro = Server::start(&[s(&dir.join("disk.cow")), "--read-only", "--socket", s(&ro_sock)]);
    let ro_uri = ro.uri("disk");
    assert!(nbdinfo_query(&ro_uri, "--is", "read-only"));
    for can in ["write", "trim", "zero", "fast-zero", "fua"] {
        assert!(!nbdinfo_query(&ro_uri, "--can", can), "read-only export: --can {can}");
    }
    assert!(nbdinfo_query(&ro_uri, "--can", "read"));
    assert!(nbdinfo_query(&ro_uri, "--can", "flush"));
    let text = stdout_of(&run(tool("nbdinfo").arg(&ro_uri)));
    assert!(text.contains("is_read_only: true"), "{text}");
    assert_eq!(stdout_of(&run(tool("nbdinfo").arg("--size").arg(&ro_uri))).trim(), BASE_SIZE.to_string());
    // A client that tries to write anyway is refused, and the data stays.
    if require_tool("qemu-io") {
        let out = run_status(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x99 0 4096"]).arg(&ro_uri));
        assert!(!out.status.success(), "qemu-io write to a read-only export succeeded");
        let mut cmd = tool("qemu-io");
        cmd.args(["-r", "-f", "raw", "-c", "read -v 0 16"]).arg(&ro_uri);
        let text = stdout_of(&run(&mut cmd));
        assert!(text.contains("read 16/16"), "{text}");
    }
    drop(ro);
}

#[test]
fn nbdinfo_map_reports_data_exactly_where_written_and_hole_zero_after_discard() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    let rig = Rig::new(
        BASE_SIZE,
        &[Img::Standalone("blank", SIZE), Img::Overlay("disk"), Img::Standalone("striped", SIZE)],
        &[],
    );
    let uri = rig.uri("blank");

    // Nothing written: one hole.
    assert_eq!(nbdinfo_map(None, &uri), expected_map(SIZE, &[]));

    // Block-aligned (4K) ranges: a whole chunk at 0, a lone block, a range
    // across a chunk boundary, a multi-chunk run, two adjacent writes, the last block.
    let mut data: Vec<(u64, u64)> = vec![
        (0, 64 * KIB),
        (MIB + 8 * KIB, 4 * KIB),
        (2 * MIB + 60 * KIB, 12 * KIB),
        (5 * MIB, 3 * MIB + 20 * KIB),
        (10 * MIB, 4 * KIB),
        (10 * MIB + 4 * KIB, 8 * KIB),
        (SIZE - 4 * KIB, 4 * KIB),
    ];
    let cmds: Vec<String> =
        data.iter().enumerate().map(|(i, (o, l))| format!("write -P {:#x} {o} {l}", 0x21 + i)).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
    assert_eq!(nbdinfo_map(None, &uri), expected_map(SIZE, &data), "map after writing {data:?}");

    // Discard inside the multi-chunk run (not chunk-aligned) and a whole chunk.
    let trims = [(5 * MIB + 8 * KIB, 16 * KIB), (6 * MIB, 64 * KIB)];
    let cmds: Vec<String> = trims.iter().map(|(o, l)| format!("discard {o} {l}")).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
    data.retain(|&(o, _)| o != 5 * MIB);
    data.extend([
        (5 * MIB, 8 * KIB),
        (5 * MIB + 24 * KIB, MIB - 24 * KIB),
        (6 * MIB + 64 * KIB, 2 * MIB - 64 * KIB + 20 * KIB),
    ]);
    data.sort();
    assert_eq!(nbdinfo_map(None, &uri), expected_map(SIZE, &data), "map after discarding {trims:?}");
    // Trimmed ranges read as zeroes.
    qemu_io(
        &uri,
        &[
            &format!("read -P 0 {} {}", 5 * MIB + 8 * KIB, 16 * KIB),
            &format!("read -P 0 {} {}", 6 * MIB, 64 * KIB),
            &format!("read -P 0x24 {} {}", 5 * MIB, 8 * KIB),
        ],
    );

    // On an overlay everything is data (the base's); a discard makes a
    // hole,zero range that hides the base there, and nowhere else.
    let ov = rig.uri("disk");
    assert_eq!(nbdinfo_map(None, &ov), expected_map(BASE_SIZE, &[(0, BASE_SIZE)]));
    qemu_io(&ov, &[&format!("discard {} {}", 3 * MIB, 192 * KIB)]);
    assert_eq!(
        nbdinfo_map(None, &ov),
        expected_map(BASE_SIZE, &[(0, 3 * MIB), (3 * MIB + 192 * KIB, BASE_SIZE - 3 * MIB - 192 * KIB)])
    );
    qemu_io(&ov, &[&format!("read -P 0 {} {}", 3 * MIB, 192 * KIB)]);

    // Every other 4K block written: ~3000 extents, more than one block
    // status reply carries, so the client must page through them.
    let striped = rig.uri("striped");
    let blocks: Vec<u64> = (0..3000).step_by(2).collect();
    let cmds: Vec<String> = blocks.iter().map(|b| format!("write -q -P 0x33 {} 4096", b * 4 * KIB)).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&striped, &refs);
    let data: Vec<(u64, u64)> = blocks.iter().map(|b| (b * 4 * KIB, 4 * KIB)).collect();
    let map = nbdinfo_map(None, &striped);
    assert_eq!(map.len(), 2 * blocks.len(), "striped map has {} runs", map.len());
    assert_eq!(map, expected_map(SIZE, &data), "striped map");
    rig.assert_base_unchanged();
}

// ---------------------------------------------------------------------------
// nbdcopy
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_copies_export_to_file_file_into_export_and_export_to_export_byte_exact() {
    if !require_tool("nbdcopy") {
        return;
    }
    let rig = Rig::new(BASE_SIZE, &[Img::Overlay("disk"), Img::Overlay("twin")], &[]);
    let uri = rig.uri("disk");

    // Export -> file: a fresh overlay copies out as its base.
    let out = rig.dir.join("out.raw");
    run(tool("nbdcopy").arg(&uri).arg(&out));
    assert_files_equal(&out, &rig.base);

    // File -> export, the source with a sparse hole and a zero run, so
    // nbdcopy must zero parts of the export that the base has data in.
    let src = rig.dir.join("src.raw");
    {
        let mut f = fs::File::create(&src).unwrap();
        f.write_all(&random_bytes((9 * MIB) as usize, 77)).unwrap();
        f.write_all(&vec![0u8; (2 * MIB + 4096) as usize]).unwrap();
        // 11 MiB + 4 KiB .. 20 MiB stays a hole.
        f.seek(SeekFrom::Start(20 * MIB)).unwrap();
        f.write_all(&random_bytes((12 * MIB) as usize, 78)).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(fs::metadata(&src).unwrap().len(), BASE_SIZE);
    run(tool("nbdcopy").arg("--flush").arg(&src).arg(&uri));
    let back = rig.dir.join("back.raw");
    run(tool("nbdcopy").arg(&uri).arg(&back));
    assert_files_equal(&back, &src);

    // Export -> export on the same server (the twin overlay starts as the base).
    let twin = rig.uri("twin");
    run(tool("nbdcopy").arg(&uri).arg(&twin));
    assert_bytes_eq(&export_bytes(&twin), &fs::read(&src).unwrap(), "twin after nbdcopy");
    // Single connection, to stdout.
    let single = run(tool("nbdcopy").arg("--connections=1").arg(&twin).arg("-")).stdout;
    assert_bytes_eq(&single, &fs::read(&src).unwrap(), "nbdcopy --connections=1");

    rig.assert_base_unchanged();
}

// ---------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------

#[test]
fn fio_randwrite_on_two_connections_verifies_crc32c_then_randread() {
    if !require_tool("fio") {
        return;
    }
    const HALF: u64 = 32 * MIB;
    let rig = Rig::new(2 * HALF, &[Img::Overlay("disk")], &[]);
    let uri = rig.uri("disk");
    // Two jobs (two processes, two NBD connections) write disjoint halves:
    // job N covers [N * 32M, N * 32M + 32M).
    let common = |name: &str| -> Vec<String> {
        vec![
            format!("--name={name}"),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--bs=4k".into(),
            "--iodepth=32".into(),
            "--numjobs=2".into(),
            format!("--size={HALF}"),
            format!("--offset_increment={HALF}"),
        ]
    };
    let mut w = common("randwrite");
    w.extend(["--rw=randwrite".into(), "--verify=crc32c".into()]);
    let text = run_fio(rig.dir.path(), &w, 2);
    assert!(text.contains("WRITE:") && text.contains("READ:"), "{text}");

    // New connections verify what the first pair wrote, without writing.
    let mut v = common("randwrite");
    v.extend(["--rw=randwrite".into(), "--verify=crc32c".into(), "--verify_only".into()]);
    run_fio(rig.dir.path(), &v, 2);

    // Plain random reads across both halves.
    let mut r = common("randread");
    r.push("--rw=randread".into());
    let text = run_fio(rig.dir.path(), &r, 2);
    assert!(text.contains("READ:"), "{text}");

    rig.assert_base_unchanged();
}

/// The URI `cowdisk serve` prints opens the export, whatever the image and socket are named:
/// the export name and the socket path are percent-encoded (RFC 3986, as the NBD URI format
/// asks). Before 2026-12-04 `my disk#1.cow` was printed as `nbd+unix:///my disk#1?socket=...`,
/// which qemu-io refuses ("No valid URL specified").
#[test]
fn the_printed_uri_opens_an_export_whose_name_has_a_space_and_a_hash() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::for_test();
    let image = dir.join("my disk#1.cow");
    cowdisk(&["create", s(&image), "--size", "1M"]);
    let server = Server::start(&[s(&image), "--socket", s(&dir.join("a sock?.sock"))]);
    wait_until(std::time::Duration::from_secs(10), || server.log().contains("control channel at"));
    let log = server.log();
    let uri = log
        .lines()
        .find_map(|l| l.strip_prefix("serving my disk#1 at "))
        .unwrap_or_else(|| panic!("no URI printed: {log}"))
        .to_owned();
    assert!(uri.starts_with("nbd+unix:///my%20disk%231?socket="), "{uri}");
    let out = qemu_io(&uri, &["write -P 0x5a 4096 4096", "read -P 0x5a 4096 4096"]);
    assert!(out.contains("read 4096/4096"), "{out}");
    let info = stdout_of(&run(Command::new("nbdinfo").arg(&uri)));
    assert!(info.contains("export=\"my disk#1\""), "{info}");
    drop(server);
}
