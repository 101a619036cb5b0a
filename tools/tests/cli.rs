//! End-to-end tests of the `cowdisk` commands that make and change images, through the built binary (create, snapshot, flatten, commit, serve, demo): what a user sees (stdout, one-line errors, exit codes, `--json`), the disk contents that result, and several overlays of one frozen base served at once.

mod common;

use std::fs::{self, File};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::*;
use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------

#[test]
fn create_accepts_human_sizes_and_shows_them_the_same_way() {
    let ws = Ws::new();
    for (arg, bytes, shown) in [
        ("10G", 10 * GIB, "10G"),
        ("512M", 512 * MIB, "512M"),
        ("4K", 4 * KIB, "4K"),
        ("1.5G", 3 * GIB / 2, "1.5G"),
        ("10GiB", 10 * GIB, "10G"),
    ] {
        let name = format!("disk-{arg}.cow");
        let out = ws.ok(&["create", &name, "--size", arg]);
        assert_eq!(out, format!("created {name} ({shown}, chunk size 64K)\n"));
        let v = ws.info(&name);
        assert_eq!(v["virtual_size"], json!(bytes), "{arg}");
        assert_eq!(v["chunk_size"], json!(65536), "{arg}");
        assert_eq!(v["data_bytes"], json!(0), "{arg}");
        let human = ws.ok(&["info", &name]);
        assert!(human.contains(&format!("virtual size: {shown} ({bytes} bytes)")), "{human}");
        // Sparse from the start: a 10G image is a few KiB on disk.
        assert!(on_disk(&ws.p(&name)) <= 64 * KIB, "{name} is not sparse");
    }
    // Not a size: clap reports it (usage error), without a panic and without a file.
    let o = ws.run(&["create", "bad.cow", "--size", "10X"]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.error_line().contains("invalid size '10X'"), "{}", o.describe());
    assert!(!ws.p("bad.cow").exists());
    // No size and no backing: refused, naming the file.
    ws.fail(&["create", "nosize.cow"], &["nosize.cow", "size"]);
    assert!(!ws.p("nosize.cow").exists());
}

#[test]
fn create_chunk_size_must_be_a_power_of_two_from_4k_to_2m() {
    let ws = Ws::new();
    for (arg, bytes) in [("4K", 4096u64), ("16K", 16384), ("2M", 2 * MIB)] {
        let name = format!("c{arg}.cow");
        let out = ws.ok(&["create", &name, "--size", "1G", "--chunk-size", arg]);
        assert_eq!(out, format!("created {name} (1G, chunk size {arg})\n"));
        assert_eq!(ws.info(&name)["chunk_size"], json!(bytes));
        assert!(ws.ok(&["info", &name]).contains(&format!("chunk size: {arg}\n")));
    }
    for arg in ["3K", "4M", "1K", "6K", "0"] {
        let name = format!("bad{arg}.cow");
        ws.fail(&["create", &name, "--size", "1G", "--chunk-size", arg], &["chunk size", "power of two", "4K", "2M"]);
        assert!(!ws.p(&name).exists(), "{name} created despite the error");
    }
}

/// The documented error form is `cowdisk: FILE: operation: cause`; a refused chunk size
/// is about the image being created, so it is named.
#[test]
fn create_with_a_refused_chunk_size_names_the_image_in_its_error() {
    let ws = Ws::new();
    ws.fail(&["create", "disk.cow", "--size", "1G", "--chunk-size", "3K"], &["disk.cow", "chunk size"]);
    assert!(!ws.p("disk.cow").exists());
}

#[test]
fn create_overlay_on_raw_file_and_on_frozen_image_probes_the_format_and_shows_the_parent() {
    let ws = Ws::new();
    write_random_file(&ws.p("base.raw"), 2 * MIB, 7);
    let base = fs::read(ws.p("base.raw")).unwrap();

    // A raw file is probed as raw; size and contents come from it.
    let out = ws.ok(&["create", "over-raw.cow", "--backing", "base.raw"]);
    assert_eq!(out, "created over-raw.cow (2M, chunk size 64K)\n");
    let v = ws.info("over-raw.cow");
    assert_eq!(v["virtual_size"], json!(2 * MIB));
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["layers"][0]["parent"], json!({"path": "base.raw", "format": "raw"}));
    assert_eq!(v["layers"][1]["format"], json!("raw"));
    assert_eq!(v["layers"][1]["path"], json!("base.raw"));
    assert_bytes_eq(&ws.device("over-raw.cow"), &base, "overlay on raw base");

    // A frozen cowdisk image (made by snapshot) is probed as cowdisk; size and chunk size
    // are inherited.
    ws.create("disk.cow", &["--size", "1M", "--chunk-size", "16K"]);
    ws.serve_write("disk.cow", &[data(0, 64 * KIB, 1)]);
    ws.ok(&["snapshot", "disk.cow", "frozen.cow"]);
    let frozen_dev = ws.device("frozen.cow");
    let out = ws.ok(&["create", "over-frozen.cow", "--backing", "frozen.cow"]);
    assert_eq!(out, "created over-frozen.cow (1M, chunk size 16K)\n");
    let v = ws.info("over-frozen.cow");
    assert_eq!(v["layers"][0]["parent"], json!({"path": "frozen.cow", "format": "cowdisk"}));
    assert_eq!(v["layers"][1]["format"], json!("cowdisk"));
    assert_eq!(v["layers"][1]["flags"], json!(["frozen"]));
    assert_eq!(v["chunk_size"], json!(16384));
    assert_bytes_eq(&ws.device("over-frozen.cow"), &frozen_dev, "overlay on frozen");

    // --backing-format raw forces raw even for a cowdisk file: the disk is its bytes.
    let file_bytes = fs::read(ws.p("frozen.cow")).unwrap();
    ws.ok(&["create", "over-bytes.cow", "--backing", "frozen.cow", "--backing-format", "raw"]);
    let v = ws.info("over-bytes.cow");
    assert_eq!(v["layers"][0]["parent"], json!({"path": "frozen.cow", "format": "raw"}));
    assert_eq!(v["layers"][1]["format"], json!("raw"));
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    let size = file_bytes.len().next_multiple_of(512);
    assert_eq!(v["virtual_size"], json!(size));
    let mut expect = file_bytes.clone();
    expect.resize(size, 0);
    assert_bytes_eq(&ws.device("over-bytes.cow"), &expect, "cowdisk file read as raw");
}

#[test]
fn create_refuses_a_writable_cowdisk_backing_and_an_existing_file() {
    let ws = Ws::new();
    ws.create("live.cow", &["--size", "1M"]);
    ws.serve_write("live.cow", &[data(0, 4096, 3)]);
    let o = ws.fail(&["create", "child.cow", "--backing", "live.cow"], &["live.cow", "writable", "snapshot"]);
    assert!(!ws.p("child.cow").exists(), "{}", o.describe());

    let crc = file_fingerprint(&ws.p("live.cow"));
    ws.fail(&["create", "live.cow", "--size", "2M"], &["live.cow", "already exists"]);
    assert_eq!(file_fingerprint(&ws.p("live.cow")), crc, "existing file was changed");
    write_random_file(&ws.p("some.raw"), 8192, 1);
    ws.fail(
        &["create", "some.raw", "--backing", "live.cow", "--backing-format", "raw"],
        &["some.raw", "already exists"],
    );
    // An empty raw file cannot be a parent; a missing one is named.
    File::create(ws.p("empty.raw")).unwrap();
    ws.fail(&["create", "e.cow", "--backing", "empty.raw"], &["empty.raw", "empty"]);
    ws.fail(&["create", "m.cow", "--backing", "missing.raw"], &["missing.raw"]);
    assert!(!ws.p("e.cow").exists() && !ws.p("m.cow").exists());
}

// ---------------------------------------------------------------------------
// snapshot
// ---------------------------------------------------------------------------

#[test]
fn snapshot_freezes_contents_under_the_new_name_and_leaves_an_empty_overlay_under_the_old() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "8M"]);
    let ops = vec![data(0, 64 * KIB, 1), data(3 * MIB + 4096, 12 * KIB, 2), data(8 * MIB - 4096, 4096, 3)];
    ws.serve_write("disk.cow", &ops);
    let mut model = vec![0u8; 8 * MIB as usize];
    apply(&mut model, &ops);
    let before = ws.info("disk.cow");
    let uuid = before["layers"][0]["uuid"].clone();
    assert_eq!(before["data_bytes"], json!(80 * KIB));

    let out = ws.ok(&["snapshot", "disk.cow", "snap.cow"]);
    assert_eq!(out, "disk.cow frozen as snap.cow; disk.cow is now an empty overlay on it\n");
    let v = ws.info("disk.cow");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{v:#}");
    assert_eq!(layers[0]["path"], json!("disk.cow"));
    assert_eq!(layers[0]["data_bytes"], json!(0));
    assert_eq!(layers[0]["flags"], json!([]));
    assert_eq!(layers[0]["parent"], json!({"path": "snap.cow", "format": "cowdisk"}));
    assert_eq!(layers[1]["path"], json!("snap.cow"));
    assert_eq!(layers[1]["flags"], json!(["frozen"]));
    assert_eq!(layers[1]["data_bytes"], json!(80 * KIB));
    assert_eq!(layers[1]["uuid"], uuid, "the snapshot is the old image itself");
    assert_ne!(layers[0]["uuid"], uuid);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "disk.cow after snapshot");
    assert_bytes_eq(&ws.device("snap.cow"), &model, "snap.cow");

    // New writes go to disk.cow only; the snapshot keeps the old contents.
    let more = vec![data(0, 4096, 9), Op::Zero(3 * MIB, 64 * KIB)];
    ws.serve_write("disk.cow", &more);
    let mut model2 = model.clone();
    apply(&mut model2, &more);
    assert_bytes_eq(&ws.device("disk.cow"), &model2, "disk.cow after writes");
    assert_bytes_eq(&ws.device("snap.cow"), &model, "snap.cow after writes");
    // A snapshot of a snapshot-overlay makes a 3-layer chain, still the same contents.
    ws.ok(&["snapshot", "disk.cow", "snap2.cow"]);
    let v = ws.info("disk.cow");
    let paths: Vec<&str> = v["layers"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["disk.cow", "snap2.cow", "snap.cow"]);
    assert_bytes_eq(&ws.device("disk.cow"), &model2, "after second snapshot");
    assert_eq!(ws.run(&["check", "--chain", "disk.cow"]).code, Some(0));
}

#[test]
fn snapshot_of_a_10g_image_copies_nothing() {
    let ws = Ws::new();
    ws.create("big.cow", &["--size", "10G"]);
    let ops = vec![data(0, MIB, 1), data(5 * GIB, MIB, 2), data(10 * GIB - MIB, MIB, 3)];
    ws.serve_write("big.cow", &ops);
    let id = inode(&ws.p("big.cow"));
    let blocks = on_disk(&ws.p("big.cow"));
    let t = Instant::now();
    ws.ok(&["snapshot", "big.cow", "big-snap.cow"]);
    let took = t.elapsed();
    // The snapshot is the very file that was the image (same inode, no block added): nothing
    // was copied, and its journal area (format-spec §5.9) was given back; the new overlay
    // under the old name is a few KiB.
    assert_eq!(inode(&ws.p("big-snap.cow")), id);
    let after = on_disk(&ws.p("big-snap.cow"));
    assert!((3 * MIB..=blocks).contains(&after), "the snapshot holds {after} bytes, the image held {blocks}");
    assert!(on_disk(&ws.p("big.cow")) <= 64 * KIB, "new overlay occupies {} bytes", on_disk(&ws.p("big.cow")));
    let v = ws.info("big.cow");
    assert_eq!(v["virtual_size"], json!(10 * GIB));
    assert_eq!(v["layers"][1]["data_bytes"], json!(3 * MIB));
    eprintln!("snapshot of a 10G image took {took:?}");
}

#[test]
fn snapshot_failures_name_the_file_and_change_nothing() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "1M"]);
    ws.serve_write("disk.cow", &[data(0, 8192, 5)]);
    ws.create("other.cow", &["--size", "1M"]);
    let crc = |n: &str| file_fingerprint(&ws.p(n));
    let (c_disk, c_other) = (crc("disk.cow"), crc("other.cow"));

    ws.fail(&["snapshot", "missing.cow", "s.cow"], &["missing.cow"]);
    assert!(!ws.p("s.cow").exists());

    ws.fail(&["snapshot", "disk.cow", "other.cow"], &["other.cow", "already exists"]);
    fs::create_dir(ws.p("sub")).unwrap();
    ws.fail(&["snapshot", "disk.cow", "sub/s.cow"], &["sub/s.cow", "same directory"]);
    assert!(!ws.p("sub/s.cow").exists());
    assert_eq!((crc("disk.cow"), crc("other.cow")), (c_disk, c_other));
    // No temporary files are left behind.
    let mut names: Vec<String> =
        fs::read_dir(ws.dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["disk.cow", "other.cow", "sub"]);
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------
// flatten
// ---------------------------------------------------------------------------

#[test]
fn flatten_in_place_drops_the_parents_keeps_contents_and_leaves_lower_layers_untouched() {
    let ws = Ws::new();
    let model = three_layer_chain(&ws);
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 3);
    let (c_base, c_mid) = (file_fingerprint(&ws.p("base.raw")), file_fingerprint(&ws.p("disk-1.cow")));

    let out = ws.ok(&["flatten", "disk.cow"]);
    assert_eq!(out, "disk.cow no longer depends on any parent\n");
    let v = ws.info("disk.cow");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{v:#}");
    assert_eq!(layers[0]["parent"], Value::Null);
    assert_eq!(layers[0]["flags"], json!([]));
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after flatten in place");
    assert_eq!(file_fingerprint(&ws.p("base.raw")), c_base, "base changed");
    assert_eq!(file_fingerprint(&ws.p("disk-1.cow")), c_mid, "frozen layer changed");
    assert_eq!(ws.run(&["check", "disk.cow"]).code, Some(0));
    // The zeros written over base data stay zeros without the base; deleting the old
    // layers does not matter any more.
    fs::remove_file(ws.p("base.raw")).unwrap();
    fs::remove_file(ws.p("disk-1.cow")).unwrap();
    assert_bytes_eq(&ws.device("disk.cow"), &model, "without the old parents");
    // Flattening a standalone image again is a no-op that still succeeds.
    ws.ok(&["flatten", "disk.cow"]);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "second flatten");
}

#[test]
fn flatten_to_output_writes_the_merged_device_raw_and_sparse_or_as_standalone_cowdisk() {
    let ws = Ws::new();
    let size = 64 * MIB;
    ws.create("disk.cow", &["--size", "64M"]);
    let lower = scattered(1, 40, size, 4 * KIB, 128 * KIB);
    ws.serve_write("disk.cow", &lower);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    let mut upper = scattered(2, 40, size, 4 * KIB, 64 * KIB);
    upper.push(Op::Zero(8 * MIB, MIB));
    upper.push(Op::Zero(40 * MIB, 256 * KIB));
    ws.serve_write("disk.cow", &upper);
    let all: Vec<Op> = lower.iter().chain(&upper).cloned().collect();
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &all);
    let c_top = file_fingerprint(&ws.p("disk.cow"));

    let out = ws.ok(&["flatten", "disk.cow", "--output", "out.raw", "--format", "raw"]);
    assert_eq!(out, "wrote the merged contents of disk.cow to out.raw (raw)\n");
    let raw = fs::read(ws.p("out.raw")).unwrap();
    assert_eq!(raw.len() as u64, size);
    assert_bytes_eq(&raw, &model, "out.raw");
    // Sparse: only the written blocks take space (zeros and never-written ranges are holes).
    let written = written_block_bytes(size, &all);
    let used = on_disk(&ws.p("out.raw"));
    assert!(
        used >= written * 9 / 10 && used <= written + 512 * KIB,
        "out.raw occupies {used} bytes for {written} bytes of written blocks"
    );
    assert_eq!(file_fingerprint(&ws.p("disk.cow")), c_top, "the source changed");

    let out = ws.ok(&["flatten", "disk.cow", "--output", "out.cow", "--format", "cowdisk"]);
    assert_eq!(out, "wrote the merged contents of disk.cow to out.cow (cowdisk)\n");
    let v = ws.info("out.cow");
    assert_eq!(v["layers"].as_array().unwrap().len(), 1);
    assert_eq!(v["layers"][0]["parent"], Value::Null);
    assert_eq!(v["virtual_size"], json!(size));
    assert_eq!(v["chunk_size"], json!(65536));
    assert_eq!(v["flags"], json!([]));
    assert_eq!(v["data_bytes"], json!(written));
    assert_bytes_eq(&ws.device("out.cow"), &model, "out.cow");
    assert_eq!(ws.run(&["check", "out.cow"]).code, Some(0));
    // Into another directory, too.
    fs::create_dir(ws.p("sub")).unwrap();
    ws.ok(&["flatten", "disk.cow", "--output", "sub/out.raw", "--format", "raw"]);
    assert!(same_file_bytes(&ws.p("sub/out.raw"), &ws.p("out.raw")));
    // The default format is cowdisk.
    ws.ok(&["flatten", "disk.cow", "--output", "default.cow"]);
    assert_eq!(ws.info("default.cow")["layers"][0]["format"], json!("cowdisk"));

    // An existing output is refused and kept.
    let c_out = file_fingerprint(&ws.p("out.raw"));
    ws.fail(&["flatten", "disk.cow", "--output", "out.raw", "--format", "raw"], &["out.raw", "already exists"]);
    assert_eq!(file_fingerprint(&ws.p("out.raw")), c_out);
}

// ---------------------------------------------------------------------------
// commit
// ---------------------------------------------------------------------------

/// disk-1.cow (frozen, standalone) <- disk.cow, both holding data; returns the model.
fn two_layer_chain(ws: &Ws) -> Vec<u8> {
    ws.create("disk.cow", &["--size", "8M"]);
    let lower = vec![data(0, MIB, 1), data(4 * MIB, 512 * KIB, 2)];
    ws.serve_write("disk.cow", &lower);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    let upper = vec![data(512 * KIB, MIB, 3), Op::Zero(4 * MIB + 64 * KIB, 128 * KIB), data(7 * MIB, 12 * KIB, 4)];
    ws.serve_write("disk.cow", &upper);
    let mut model = vec![0u8; 8 * MIB as usize];
    apply(&mut model, &lower);
    apply(&mut model, &upper);
    model
}

#[test]
fn commit_without_force_is_refused_with_the_reason_and_with_force_moves_the_data_down() {
    let ws = Ws::new();
    let model = two_layer_chain(&ws);
    let before = ws.info("disk.cow");
    let (c_top, c_parent) = (file_fingerprint(&ws.p("disk.cow")), file_fingerprint(&ws.p("disk-1.cow")));

    let o = ws.fail(&["commit", "disk.cow"], &["disk.cow", "disk-1.cow", "other overlays", "--force"]);
    assert_eq!(o.code, Some(1));
    assert_eq!(file_fingerprint(&ws.p("disk.cow")), c_top);
    assert_eq!(file_fingerprint(&ws.p("disk-1.cow")), c_parent);

    let out = ws.ok(&["commit", "disk.cow", "--force"]);
    assert_eq!(out, "committed disk.cow into its parent; it is now an empty overlay\n");
    let v = ws.info("disk.cow");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{v:#}");
    assert_eq!(layers[0]["data_bytes"], json!(0), "the image is empty now");
    assert_eq!(layers[0]["parent"], json!({"path": "disk-1.cow", "format": "cowdisk"}));
    assert_eq!(layers[1]["flags"], json!(["frozen"]), "the parent stays frozen");
    assert_eq!(layers[1]["uuid"], before["layers"][1]["uuid"]);
    // Parent data: 1M + 512K - 128K zeroed + the top's 512K beyond it + 12K.
    assert_eq!(layers[1]["data_bytes"], json!(MIB + 512 * KIB - 128 * KIB + 512 * KIB + 12 * KIB));
    assert_bytes_eq(&ws.device("disk.cow"), &model, "device after commit");
    assert_bytes_eq(&ws.device("disk-1.cow"), &model, "the parent holds it all");
    let map: Value = ws.json(&["map", "--json", "disk.cow"]);
    assert!(
        map.as_array().unwrap().iter().all(|e| e["depth"] != json!(0)),
        "nothing is served by the emptied image: {map:#}"
    );
    assert_eq!(ws.run(&["check", "--chain", "disk.cow"]).code, Some(0));
}

#[test]
fn commit_is_refused_into_a_raw_parent_without_a_parent_and_into_a_parent_another_server_uses() {
    let ws = Ws::new();
    write_random_file(&ws.p("base.raw"), MIB, 1);
    ws.create("on-raw.cow", &["--backing", "base.raw"]);
    ws.serve_write("on-raw.cow", &[data(0, 4096, 2)]);
    let c_base = file_fingerprint(&ws.p("base.raw"));
    ws.fail(&["commit", "on-raw.cow", "--force"], &["on-raw.cow", "raw"]);
    assert_eq!(file_fingerprint(&ws.p("base.raw")), c_base);
    ws.create("alone.cow", &["--size", "1M"]);
    ws.fail(&["commit", "alone.cow", "--force"], &["alone.cow", "no parent"]);
    ws.ok(&["snapshot", "alone.cow", "alone-0.cow"]);
    ws.create("bigger.cow", &["--backing", "alone-0.cow", "--size", "2M"]);
    ws.serve_write("bigger.cow", &[data(MIB + 4096, 4096, 3)]);
    let c_small = file_fingerprint(&ws.p("alone-0.cow"));
    ws.fail(&["commit", "bigger.cow", "--force"], &["bigger.cow", "larger than its parent"]);
    assert_eq!(file_fingerprint(&ws.p("alone-0.cow")), c_small);
    // An empty top: neither file changes at all, refused before either is opened for writing
    // (before 2026-12-04 both had a new header generation written first).
    ws.create("bigger-empty.cow", &["--backing", "alone-0.cow", "--size", "2M"]);
    let c_empty = file_fingerprint(&ws.p("bigger-empty.cow"));
    ws.fail(&["commit", "bigger-empty.cow", "--force"], &["larger than its parent"]);
    assert_eq!(file_fingerprint(&ws.p("alone-0.cow")), c_small, "the refused commit changed the parent");
    assert_eq!(file_fingerprint(&ws.p("bigger-empty.cow")), c_empty, "the refused commit changed the top");

    let model = two_layer_chain(&ws);
    ws.create("other.cow", &["--backing", "disk-1.cow"]);
    let c_parent = file_fingerprint(&ws.p("disk-1.cow"));
    let data_before = ws.info("disk.cow")["layers"][0]["data_bytes"].clone();
    {
        let sock = ws.p("other.sock");
        let _server = Server::start(&[s(&ws.p("other.cow")), "--socket", s(&sock)]);
        ws.fail(&["commit", "disk.cow", "--force"], &["disk-1.cow", "in use"]);
    }
    assert_eq!(file_fingerprint(&ws.p("disk-1.cow")), c_parent, "parent changed");
    assert_eq!(ws.info("disk.cow")["layers"][0]["data_bytes"], data_before);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after refused commit");
    // Once that server is gone the same commit works.
    ws.ok(&["commit", "disk.cow", "--force"]);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after commit");
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[test]
fn errors_are_one_line_naming_the_file_and_cause_and_never_a_panic() {
    let ws = Ws::new();
    write_random_file(&ws.p("plain.raw"), 64 * KIB, 1);
    let cases: &[(&[&str], &[&str])] = &[
        (&["info", "missing.cow"], &["missing.cow", "No such file"]),
        (&["info", "--json", "missing.cow"], &["missing.cow", "No such file"]),
        (&["map", "missing.cow"], &["missing.cow", "No such file"]),
        (&["info", "plain.raw"], &["plain.raw", "not a cowdisk image"]),
        (&["map", "plain.raw"], &["plain.raw", "not a cowdisk image"]),
        (&["flatten", "missing.cow"], &["missing.cow", "No such file"]),
        (&["flatten", "missing.cow", "--output", "o.raw", "--format", "raw"], &["missing.cow", "No such file"]),
        (&["commit", "missing.cow", "--force"], &["missing.cow", "No such file"]),
        (&["snapshot", "missing.cow", "snap.cow"], &["missing.cow", "No such file"]),
        (&["serve", "missing.cow", "--socket", "s.sock"], &["missing.cow", "No such file"]),
        (&["create", "x.cow", "--backing", "missing.raw"], &["missing.raw", "No such file"]),
        (&["create", "x.cow", "--size", "1000"], &["x.cow", "1000"]),
    ];
    for (args, needles) in cases {
        ws.fail(args, needles);
    }
    // A parent that went away is named, by every command that opens the chain.
    write_random_file(&ws.p("gone.raw"), 64 * KIB, 2);
    ws.create("orphan.cow", &["--backing", "gone.raw"]);
    fs::remove_file(ws.p("gone.raw")).unwrap();
    for args in [
        &["info", "orphan.cow"][..],
        &["map", "orphan.cow"],
        &["flatten", "orphan.cow"],
        &["flatten", "orphan.cow", "--output", "o.raw", "--format", "raw"],
        &["serve", "orphan.cow", "--socket", "s.sock"],
    ] {
        ws.fail(args, &["orphan.cow", "gone.raw", "missing"]);
    }
    assert!(!ws.p("x.cow").exists() && !ws.p("o.raw").exists() && !ws.p("snap.cow").exists());
}

#[test]
fn commands_that_write_an_image_a_server_holds_fail_with_in_use() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "4M"]);
    ws.serve_write("disk.cow", &[data(0, 64 * KIB, 1)]);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    ws.serve_write("disk.cow", &[data(MIB, 64 * KIB, 2)]);
    let model = ws.device("disk.cow");
    let sock = ws.p("s.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock)]);
    // (Snapshot, commit and flatten of a served image are done by its server, live:
    // tools/tests/live.rs and live_jobs.rs.) A second server, and a check that repairs, are
    // refused.
    let o = ws.fail(&["check", "--repair", "disk.cow"], &["disk.cow", "in use"]);
    assert_eq!(o.code, Some(1), "an image in use is not a corrupt image: {}", o.describe());
    let o = ws.run(&["serve", "disk.cow", "--socket", "t.sock"]);
    assert_ne!(o.code, Some(0));
    assert!(o.error_line().contains("in use"), "{}", o.describe());
    // Looking is allowed while it is served.
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 2);
    ws.ok(&["map", "disk.cow"]);
    assert!(server.stop().success());
    assert!(!ws.p("snap.cow").exists());
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 2);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after the refused commands");
}

/// Runs `cowdisk ARGS` with stdout a pipe whose reading end is already closed (like
/// `cowdisk map big.cow | head -1` after head has exited).
fn run_into_closed_pipe(ws: &Ws, args: &[&str]) -> Out {
    let mut fds = [0; 2];
    // SAFETY: pipe fills the two-element array with two new descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are fresh and owned only here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let mut cmd = ws.cmd(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::from(write_end)).stderr(Stdio::piped());
    let o = cmd.output().unwrap();
    out_of(&cmd, o)
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_without_a_panic() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "64M"]);
    ws.serve_write("disk.cow", &scattered(5, 200, 64 * MIB, 4 * KIB, 8 * KIB));
    let mut panics = Vec::new();
    for args in [
        &["map", "disk.cow"][..],
        &["map", "--json", "disk.cow"],
        &["info", "disk.cow"],
        &["info", "--json", "disk.cow"],
        &["check", "disk.cow"],
        &["check", "--json", "disk.cow"],
    ] {
        let o = run_into_closed_pipe(&ws, args);
        if o.stderr.contains("panicked") || o.code.is_none() || o.code == Some(101) {
            let why = o.stderr.lines().find(|l| l.contains("failed")).unwrap_or("");
            panics.push(format!("cowdisk {} (exit {:?}): {why}", args.join(" "), o.code));
        } else {
            assert!(o.stderr.lines().count() <= 1, "{}", o.describe());
        }
    }
    assert!(panics.is_empty(), "panicked writing to a closed pipe:\n{}", panics.join("\n"));
}

// ---------------------------------------------------------------------------
// Several overlays of one frozen base, served at once (the Docker case)
// ---------------------------------------------------------------------------

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = stdout_of(&run(&mut c));
    assert!(!out.contains("failed") && !out.contains("error"), "qemu-io {cmds:?}: {out}");
    out
}

fn export_bytes(ws: &Ws, uri: &str) -> Vec<u8> {
    let out = ws.p(&unique(".export", "raw"));
    run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw", uri]).arg(&out));
    let b = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    b
}

#[test]
fn overlays_of_one_frozen_base_served_together_never_see_each_others_writes() {
    if !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let ws = Ws::new();
    let size = 16 * MIB;
    ws.create("golden.cow", &["--size", "16M"]);
    let base_ops = scattered(3, 30, size, 4 * KIB, 256 * KIB);
    ws.serve_write("golden.cow", &base_ops);
    ws.ok(&["snapshot", "golden.cow", "base.cow"]);
    let mut base_model = vec![0u8; size as usize];
    apply(&mut base_model, &base_ops);
    for n in ["a", "b", "c"] {
        ws.create(&format!("{n}.cow"), &["--backing", "base.cow"]);
    }
    let base_file = fs::read(ws.p("base.cow")).unwrap();

    let sock = ws.p("s.sock");
    let server = Server::start(&[s(&ws.p("a.cow")), s(&ws.p("b.cow")), s(&ws.p("c.cow")), "--socket", s(&sock)]);
    let uri = |n: &str| server.uri(n);
    qemu_io(&uri("a"), &["write -P 0xaa 1M 256k", "write -P 0xa1 15M 1M"]);
    qemu_io(&uri("b"), &["write -P 0xbb 1152k 256k", "write -z -u 0 4M"]);
    let mut a = base_model.clone();
    a[MIB as usize..(MIB + 256 * KIB) as usize].fill(0xaa);
    a[(15 * MIB) as usize..].fill(0xa1);
    let mut b = base_model.clone();
    b[(1152 * KIB) as usize..(1408 * KIB) as usize].fill(0xbb);
    b[..(4 * MIB) as usize].fill(0);
    assert_bytes_eq(&export_bytes(&ws, &uri("a")), &a, "export a");
    assert_bytes_eq(&export_bytes(&ws, &uri("b")), &b, "export b");
    assert_bytes_eq(&export_bytes(&ws, &uri("c")), &base_model, "export c");
    // qemu-io reads the pattern back through one export and not the other.
    let out = qemu_io(&uri("a"), &["read -P 0xaa 1M 256k"]);
    assert!(out.contains("read 262144/262144"), "{out}");
    // While they run: new overlays can still be made on the base, info works, and the
    // base cannot be committed into.
    ws.create("d.cow", &["--backing", "base.cow"]);
    ws.ok(&["flatten", "d.cow", "--output", "d.raw", "--format", "raw"]);
    assert_bytes_eq(&fs::read(ws.p("d.raw")).unwrap(), &base_model, "d.raw");
    assert_eq!(ws.info("a.cow")["flags"], json!(["dirty"]));
    ws.fail(&["commit", "c.cow", "--force"], &["c.cow", "in use", "nothing changed"]);
    let left: Vec<_> = fs::read_dir(ws.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".commit-"))
        .collect();
    assert!(left.is_empty(), "the refused commit left {left:?}");
    assert!(server.stop().success());

    assert_eq!(fs::read(ws.p("base.cow")).unwrap(), base_file, "the base file changed");
    assert_bytes_eq(&ws.device("a.cow"), &a, "a.cow after stop");
    assert_bytes_eq(&ws.device("b.cow"), &b, "b.cow after stop");
    assert_bytes_eq(&ws.device("c.cow"), &base_model, "c.cow after stop");
    assert_bytes_eq(&ws.device("d.cow"), &base_model, "d.cow");
    assert_eq!(ws.info("a.cow")["data_bytes"], json!(256 * KIB + MIB));
    assert_eq!(ws.info("c.cow")["data_bytes"], json!(0));
    // Two exports cannot share a name.
    fs::create_dir(ws.p("x")).unwrap();
    ws.create("x/a.cow", &["--backing", "base.cow"]);
    let o = ws.run(&["serve", "a.cow", "x/a.cow", "--socket", "y.sock"]);
    assert_ne!(o.code, Some(0));
    assert!(o.error_line().contains("--name"), "{}", o.describe());
}

// ---------------------------------------------------------------------------
// The main job: `cowdisk demo`
// ---------------------------------------------------------------------------

#[test]
fn demo_serves_an_overlay_on_a_base_holding_ext4_and_reuses_it_next_time() {
    let dir = TempDir::new("demo");
    let demo = dir.join("d");
    let sock = demo.join("nbd.sock");
    let mut cmd = Command::new(cowdisk_bin());
    cmd.arg("demo").arg("--dir").arg(&demo);
    let mut d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    assert!(d.log().contains("nbd+unix:///overlay?socket="), "{}", d.log());
    let mut c = common::nbdclient::NbdClient::connect_unix(&sock).unwrap();
    let info = c.opt_go("overlay", &[]).unwrap();
    assert_eq!(info.size, 64 << 20);
    if tool_path("mkfs.ext4").is_some() {
        // The ext4 superblock magic 0xEF53 at byte 1080: the base holds a real filesystem.
        let sb = c.read(1024, 1024).unwrap();
        assert_eq!(&sb[56..58], &[0x53, 0xef], "no ext4 superblock in the demo base");
    }
    drop(c);
    d.signal(libc::SIGINT).unwrap();
    assert_eq!(d.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0), "{}", d.log());
    // A second run reuses both images.
    let mut cmd = Command::new(cowdisk_bin());
    cmd.arg("demo").arg("--dir").arg(&demo);
    let mut d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    assert!(d.log().contains("reusing base") && d.log().contains("reusing overlay"), "{}", d.log());
    d.signal(libc::SIGTERM).unwrap();
    assert_eq!(d.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
}

#[test]
/// Exit 1, as qemu-img's usage errors: 2 is `check`'s "corrupted" (it was 2 until 2026-12-04,
/// so `check --deeep disk.cow` read as a damaged image).
fn usage_errors_are_one_line_with_exit_code_1() {
    let ws = Ws::new();
    for (args, says) in [
        (&["frob"][..], "unrecognized subcommand 'frob'"),
        (&["check"][..], "<IMAGE>"),
        (&["check", "--deeep", "a.cow"][..], "--deeep"),
        (&["create"][..], "<IMAGE>"),
        (&["create", "a.cow", "--size", "1G", "--chunk-size", "lots"][..], "invalid size 'lots'"),
        (&["info", "a.cow", "--colour"][..], "--colour"),
        (&["flatten", "a.cow", "--format", "raw"][..], "--output"),
    ] {
        let o = ws.run(args);
        assert_no_panic(&o);
        assert_eq!(o.code, Some(1), "{}", o.describe());
        let line = o.error_line();
        assert!(line.contains(says), "expected {says:?} in the error\n{}", o.describe());
        assert!(line.ends_with("(see 'cowdisk --help')"), "{}", o.describe());
    }
    // Help is still help: several lines on stdout, exit 0.
    let o = ws.run(&["create", "--help"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("--backing"), "{}", o.describe());
}

/// An overlay keeps data checksums where its cowdisk parent keeps them, which limits its chunks
/// to 256K; `--no-data-checksums` turns that off (before 2026-12-04 nothing could, and such an
/// overlay with larger chunks could not be made). Reads of the parent's blocks are still
/// verified by the parent's own checksums.
#[test]
fn no_data_checksums_turns_off_what_an_overlay_inherits() {
    let ws = Ws::new();
    ws.create("a.cow", &["--size", "4M", "--data-checksums"]);
    ws.serve_write("a.cow", &[data(0, 64 * KIB, 5)]);
    ws.ok(&["snapshot", "a.cow", "s.cow"]);
    ws.create("inherits.cow", &["--backing", "s.cow"]);
    assert_eq!(ws.info("inherits.cow")["layers"][0]["data_checksums"], true);
    ws.fail(&["create", "big.cow", "--backing", "s.cow", "--chunk-size", "512K"], &["256 KiB"]);
    ws.create("big.cow", &["--backing", "s.cow", "--chunk-size", "512K", "--no-data-checksums"]);
    let info = ws.info("big.cow");
    assert_eq!(info["layers"][0]["data_checksums"], false, "{info}");
    assert_eq!(info["layers"][1]["data_checksums"], true, "{info}");
    ws.serve_write("big.cow", &[data(MIB, 64 * KIB, 6)]);
    let mut model = ws.device("s.cow");
    apply(&mut model, &[data(MIB, 64 * KIB, 6)]);
    assert_eq!(ws.device("big.cow"), model);
    ws.fail(&["create", "x.cow", "--size", "1M", "--data-checksums", "--no-data-checksums"], &["cannot be used with"]);
}
