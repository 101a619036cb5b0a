//! The offline commands and the file systems under them, through the binary: a sparse raw base
//! stays sparse through `map` and `flatten` (every form); `check --repair` on a read-only mount
//! is an error, not a verdict; a full file system is blamed on the file being written; `--rate`
//! holds an offline `commit` and an in-place `flatten`.

mod common;

use common::cli::*;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A 64 MiB raw base with 4 KiB of data at 1 MiB and at 40 MiB, holes elsewhere.
fn sparse_base(ws: &Ws) -> Vec<u8> {
    let f = std::fs::File::create(ws.p("base.raw")).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    for (at, seed) in [(MIB, 1), (40 * MIB, 2)] {
        f.write_all_at(&random_bytes(4096, seed), at).unwrap();
    }
    drop(f);
    std::fs::read(ws.p("base.raw")).unwrap()
}

/// A raw base's holes read as zeros and are reported so (`map`: zero, at the base's depth, as
/// qemu-img map says of a sparse backing file), and every flatten keeps them holes: to a raw
/// file, to a cowdisk file, and in place. Until 2026-12-04 the whole base was data: a 64 MiB
/// base with 8 KiB written flattened to 64 MiB on disk (found by a review).
#[test]
fn a_sparse_raw_base_stays_sparse_through_map_and_flatten() {
    let ws = Ws::new();
    let base = sparse_base(&ws);
    ws.create("ov.cow", &["--backing", "base.raw"]);
    let map = ws.json(&["map", "ov.cow", "--json"]);
    let runs: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"].as_bool().unwrap()))
        .collect();
    let data: u64 = runs.iter().filter(|r| r.2).map(|r| r.1).sum();
    assert!(data <= 64 << 10, "map calls {data} bytes of the sparse base data: {runs:?}");
    assert!(runs.iter().any(|r| r.2 && r.0 <= MIB && MIB < r.0 + r.1), "the data at 1 MiB is not data: {runs:?}");
    assert!(map.as_array().unwrap().iter().all(|e| e["depth"] == 1), "{map}");

    ws.ok(&["flatten", "ov.cow", "--output", "flat.raw", "--format", "raw"]);
    assert_bytes_eq(&std::fs::read(ws.p("flat.raw")).unwrap(), &base, "flat.raw");
    assert!(on_disk(&ws.p("flat.raw")) < MIB, "flat.raw takes {} bytes", on_disk(&ws.p("flat.raw")));
    ws.ok(&["flatten", "ov.cow", "--output", "flat.cow"]);
    assert_bytes_eq(&ws.device("flat.cow"), &base, "flat.cow");
    assert!(on_disk(&ws.p("flat.cow")) < 2 * MIB, "flat.cow takes {} bytes", on_disk(&ws.p("flat.cow")));
    ws.ok(&["flatten", "ov.cow"]);
    std::fs::remove_file(ws.p("base.raw")).unwrap();
    assert_bytes_eq(&ws.device("ov.cow"), &base, "ov.cow flattened in place, without its base");
    assert!(on_disk(&ws.p("ov.cow")) < 2 * MIB, "ov.cow takes {} bytes", on_disk(&ws.p("ov.cow")));
}

/// Mounts `dir` again, read-only, at `at`.
fn read_only_view(dir: &Path, at: &Path) -> Mount {
    let m = Mount::with_options(dir, at, &["--bind"]).unwrap_or_else(|e| panic!("bind mount: {e}"));
    run(tool("mount").args(["-o", "remount,bind,ro"]).arg(m.path()));
    m
}

/// `check --repair` that cannot write the image (a read-only mount) has not checked anything
/// less: exit 1 and the reason, never "corrupt" (it said a clean image was corrupt, exit 2,
/// until 2026-12-04; found by a review). The same check without `--repair` is clean.
#[test]
fn check_repair_on_a_read_only_mount_is_an_error_not_a_corrupt_verdict() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "8M"]);
    ws.serve_write("disk.cow", &[data(0, 65536, 7)]);
    let view = read_only_view(ws.dir(), &ws.p("ro"));
    let img = view.path().join("disk.cow");
    let o = ws.run(&["check", s(&img)]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = ws.fail(&["check", "--repair", s(&img)], &["Read-only file system"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains("corrupt") && !o.stderr.contains("corrupt"), "{}", o.describe());
    let o = ws.run(&["check", "--repair", "--json", s(&img)]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains("\"corrupt\""), "{}", o.describe());
    view.unmount().expect("unmount the read-only view");
}

/// A flatten whose output's file system fills up names the output (the file that could not
/// be written), not the base it was reading from the same file system (found by a review:
/// "base.raw: copy: No space left on device"), and leaves no file behind.
#[test]
fn a_full_file_system_is_blamed_on_the_file_being_written() {
    let ws = Ws::new();
    let small = Mount::with_options(Path::new("tmpfs"), &ws.p("small"), &["-t", "tmpfs", "-o", "size=8m"])
        .unwrap_or_else(|e| panic!("mount tmpfs: {e}"));
    // Base, overlay and output on one file system, so the kernel copies file to file.
    write_random_file(&small.path().join("base.raw"), 5 * MIB, 0xf1);
    ws.create(s(&small.path().join("top.cow")), &["--backing", s(&small.path().join("base.raw"))]);
    let before: Vec<_> = std::fs::read_dir(small.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    let out = small.path().join("flat.raw");
    let o = ws.fail(
        &["flatten", s(&small.path().join("top.cow")), "--output", s(&out), "--format", "raw"],
        &["No space left on device"],
    );
    let line = o.error_line();
    assert!(line.contains("flat.raw") && !line.contains("base.raw"), "{}", o.describe());
    let after: Vec<_> = std::fs::read_dir(small.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(after.len(), before.len(), "the failed flatten left a file: {after:?}");
    small.unmount().expect("unmount the tmpfs");
}

/// `--rate` holds an offline commit and an in-place flatten to that many bytes a second (both
/// ignored it until 2026-12-04: 64 MiB went in a third of a second at `--rate 8M`; found by a
/// review), and each does what it says.
#[test]
fn rate_holds_an_offline_commit_and_an_in_place_flatten() {
    let ws = Ws::new();
    write_random_file(&ws.p("base.raw"), 16 * MIB, 0xb0);
    ws.create("p.cow", &["--backing", "base.raw"]);
    ws.ok(&["snapshot", "p.cow", "s.cow"]);
    let ops: Vec<Op> = (0..8u64).map(|i| data(i * 2 * MIB, MIB, 10 + i)).collect();
    ws.serve_write("p.cow", &ops);
    let want = ws.device("p.cow");
    let t = Instant::now();
    let out = ws.ok(&["commit", "p.cow", "--force", "--rate", "4M"]);
    let took = t.elapsed();
    assert!(out.contains("it is now an empty overlay"), "{out}");
    assert!(took >= Duration::from_millis(1500), "8 MiB committed at --rate 4M in {took:?}");
    assert_eq!(ws.info("p.cow")["layers"][0]["data_bytes"], 0, "{}", ws.info("p.cow"));
    assert_bytes_eq(&ws.device("p.cow"), &want, "after the commit");
    assert_eq!(ws.run(&["check", "--chain", "p.cow"]).code, Some(0));

    let t = Instant::now();
    ws.ok(&["flatten", "p.cow", "--rate", "8M"]);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1500), "16 MiB flattened at --rate 8M in {took:?}");
    assert_eq!(ws.info("p.cow")["layers"].as_array().map(Vec::len), Some(1), "{}", ws.info("p.cow"));
    assert_bytes_eq(&ws.device("p.cow"), &want, "after the flatten");
}
