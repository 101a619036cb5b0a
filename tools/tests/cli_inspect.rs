//! End-to-end tests of the `cowdisk` commands that inspect images (info, map, check and check --repair), through the built binary: their output field by field against what was written, exit codes, and the damage `check` must find.

mod common;

use std::fs::{self};
use std::thread;
use std::time::Duration;

use common::cli::*;
use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// info and map
// ---------------------------------------------------------------------------

#[test]
fn info_shows_size_chunk_size_allocation_flags_and_every_layer() {
    let ws = Ws::new();
    three_layer_chain(&ws);
    let v = ws.info("disk.cow");
    assert_eq!(v["image"], json!("disk.cow"));
    assert_eq!(v["virtual_size"], json!(4 * MIB));
    assert_eq!(v["chunk_size"], json!(16384));
    assert_eq!(v["data_bytes"], json!(12 * KIB), "8K + 4K written; zeros hold no data");
    assert_eq!(v["flags"], json!([]));
    assert!(v["disk_bytes"].as_u64().unwrap() >= 12 * KIB);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(l["depth"], json!(i));
        assert_eq!(l["virtual_size"], json!(4 * MIB));
        assert!(l["disk_bytes"].as_u64().unwrap() >= l["data_bytes"].as_u64().unwrap() / 2);
    }
    let uuid_ok = |u: &Value| {
        let u = u.as_str().unwrap();
        u.len() == 36 && u.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
    };
    let l0 = &layers[0];
    assert_eq!(l0["path"], json!("disk.cow"));
    assert_eq!(l0["format"], json!("cowdisk"));
    assert_eq!(l0["chunk_size"], json!(16384));
    assert_eq!(l0["data_bytes"], json!(12 * KIB));
    assert_eq!(l0["flags"], json!([]));
    assert!(uuid_ok(&l0["uuid"]));
    assert_eq!(l0["parent"], json!({"path": "disk-1.cow", "format": "cowdisk"}));
    let l1 = &layers[1];
    assert_eq!(l1["path"], json!("disk-1.cow"));
    assert_eq!(l1["format"], json!("cowdisk"));
    assert_eq!(l1["chunk_size"], json!(16384));
    assert_eq!(l1["data_bytes"], json!(72 * KIB));
    assert_eq!(l1["flags"], json!(["frozen"]));
    assert!(uuid_ok(&l1["uuid"]));
    assert_ne!(l0["uuid"], l1["uuid"]);
    assert_eq!(l1["parent"], json!({"path": "base.raw", "format": "raw"}));
    let l2 = &layers[2];
    assert_eq!(l2["path"], json!("base.raw"));
    assert_eq!(l2["format"], json!("raw"));
    assert_eq!(l2["chunk_size"], Value::Null);
    assert_eq!(l2["data_bytes"], json!(4 * MIB));
    assert_eq!(l2["disk_bytes"], json!(4 * MIB));
    assert_eq!(l2["uuid"], Value::Null);
    assert_eq!(l2["flags"], json!([]));
    assert_eq!(l2["parent"], Value::Null);

    let human = ws.ok(&["info", "disk.cow"]);
    let lines: Vec<&str> = human.lines().collect();
    let line = |prefix: &str| -> &str {
        let found: Vec<&&str> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(found.len(), 1, "one line starting {prefix:?} in\n{human}");
        found[0]
    };
    assert_eq!(lines[0], "image: disk.cow");
    assert_eq!(line("virtual size: "), "virtual size: 4M (4194304 bytes)");
    assert_eq!(line("chunk size: "), "chunk size: 16K");
    assert!(line("allocated: ").starts_with("allocated: 12K of data, "), "{human}");
    assert_eq!(line("flags: "), "flags: none");
    assert_eq!(line("chain "), "chain (3 layers):");
    let l0 = line("  [0] ");
    assert!(l0.starts_with("  [0] disk.cow (cowdisk, 4M, chunk 16K, data 12K, on disk "), "{human}");
    assert!(l0.contains(" uuid ") && !l0.contains("[frozen]"), "{human}");
    let l1 = line("  [1] ");
    assert!(l1.starts_with("  [1] disk-1.cow (cowdisk, 4M, chunk 16K, data 72K, on disk "), "{human}");
    assert!(l1.contains("[frozen]") && l1.contains(" uuid "), "{human}");
    assert_eq!(line("  [2] "), "  [2] base.raw (raw, 4M, on disk 4M)");
    // The layers are the last lines, in order.
    assert_eq!(lines[lines.len() - 3..], [l0, l1, "  [2] base.raw (raw, 4M, on disk 4M)"]);

    // While a server has it open for writing, the flags say so (info needs no lock).
    let sock = ws.p("s.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock)]);
    assert_eq!(ws.info("disk.cow")["flags"], json!(["dirty"]));
    assert!(ws.ok(&["info", "disk.cow"]).contains("flags: dirty\n"));
    assert!(server.stop().success());
    assert_eq!(ws.info("disk.cow")["flags"], json!([]));
}

#[test]
fn map_merges_extents_into_runs_by_depth_and_zero_matching_what_was_written() {
    let ws = Ws::new();
    three_layer_chain(&ws);
    let d = |o: u64, l: u64, depth: u64| json!({"offset": o, "length": l, "data": true, "zero": false, "depth": depth});
    let expect = json!([
        d(0, 8 * KIB, 0),
        d(8 * KIB, MIB - 8 * KIB, 2),
        d(MIB, 16 * KIB, 1),
        d(MIB + 16 * KIB, 4 * KIB, 0),
        d(MIB + 20 * KIB, 44 * KIB, 1),
        d(MIB + 64 * KIB, MIB - 64 * KIB, 2),
        json!({"offset": 2 * MIB, "length": 64 * KIB, "data": false, "zero": true, "depth": 0}),
        d(2 * MIB + 64 * KIB, MIB - 60 * KIB, 2),
        d(3 * MIB + 4 * KIB, 8 * KIB, 1),
        d(3 * MIB + 12 * KIB, MIB - 12 * KIB, 2),
    ]);
    let map = ws.json(&["map", "--json", "disk.cow"]);
    assert_eq!(map, expect, "got {map:#}");

    let human = ws.ok(&["map", "disk.cow"]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 11, "{human}");
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(cols, ["offset", "length", "served", "by"]);
    let row = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(row(1), "0x0 0x2000 data, depth 0 (disk.cow)");
    assert_eq!(row(2), "0x2000 0xfe000 data, depth 2 (base.raw)");
    assert_eq!(row(3), "0x100000 0x4000 data, depth 1 (disk-1.cow)");
    assert_eq!(row(7), "0x200000 0x10000 zero, depth 0 (disk.cow)");

    // A standalone image: never-written ranges are zero and unallocated (no depth).
    ws.create("alone.cow", &["--size", "1M"]);
    ws.serve_write("alone.cow", &[data(64 * KIB, 4 * KIB, 1)]);
    let u = |o: u64, l: u64| json!({"offset": o, "length": l, "data": false, "zero": true, "depth": null});
    assert_eq!(
        ws.json(&["map", "--json", "alone.cow"]),
        json!([u(0, 64 * KIB), d(64 * KIB, 4 * KIB, 0), u(68 * KIB, MIB - 68 * KIB)])
    );
    let human = ws.ok(&["map", "alone.cow"]);
    assert!(human.contains("zero (unallocated)"), "{human}");
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[track_caller]
fn check_json(ws: &Ws, args: &[&str], code: i32) -> Value {
    let mut a = vec!["check", "--json"];
    a.extend_from_slice(args);
    let o = ws.run(&a);
    assert_eq!(o.code, Some(code), "{}", o.describe());
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e})\n{}", o.describe()))
}

#[test]
fn check_exits_0_clean_2_corrupt_naming_the_file_3_leaked_and_repair_reclaims_leaks() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "4M"]);
    let ops = vec![data(0, 256 * KIB, 1), data(2 * MIB, 64 * KIB, 2)];
    ws.serve_write("disk.cow", &ops);
    let mut model = vec![0u8; 4 * MIB as usize];
    apply(&mut model, &ops);

    // Clean.
    let o = ws.run(&["check", "disk.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.stdout, "disk.cow: checksums and invariants ok\n");
    let v = check_json(&ws, &["disk.cow"], 0);
    assert_eq!(v["status"], json!("clean"));
    assert_eq!(v["exit_code"], json!(0));
    assert_eq!(v["leaked_bytes"], json!(0));
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    let i0 = &v["images"][0];
    assert_eq!(i0["path"], json!("disk.cow"));
    assert_eq!(i0["errors"], json!([]));
    assert_eq!(i0["leaked_bytes"], json!(0));
    assert_eq!(i0["dirty"], json!(false));
    assert_eq!(i0["repaired"], json!(false));

    // Leaked: 64 KiB of data past everything the map refers to.
    fs::copy(ws.p("disk.cow"), ws.p("leaky.cow")).unwrap();
    append_leak(&ws.p("leaky.cow"));
    let o = ws.run(&["check", "leaky.cow"]);
    assert_eq!(o.code, Some(3), "{}", o.describe());
    assert!(o.stdout.starts_with("leaky.cow: checksums and invariants ok; 64K leaked"), "{}", o.describe());
    let v = check_json(&ws, &["leaky.cow"], 3);
    assert_eq!(v["status"], json!("leaks"));
    assert_eq!(v["exit_code"], json!(3));
    assert_eq!(v["leaked_bytes"], json!(64 * KIB));
    assert_eq!(v["images"][0]["leaked_bytes"], json!(64 * KIB));
    assert_eq!(v["images"][0]["errors"], json!([]));
    assert_eq!(v["images"][0]["repaired"], json!(false));
    let used = on_disk(&ws.p("leaky.cow"));
    let o = ws.run(&["check", "--repair", "leaky.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("64K leaked (reclaimed)"), "{}", o.describe());
    assert!(on_disk(&ws.p("leaky.cow")) + 64 * KIB <= used, "the leak was not punched");
    let v = check_json(&ws, &["leaky.cow"], 0);
    assert_eq!(v["leaked_bytes"], json!(0));
    assert_eq!(v["status"], json!("clean"));
    assert_bytes_eq(&ws.device("leaky.cow"), &model, "after repair");
    // --repair --json reports what it did.
    fs::copy(ws.p("disk.cow"), ws.p("leaky2.cow")).unwrap();
    append_leak(&ws.p("leaky2.cow"));
    let v = check_json(&ws, &["--repair", "leaky2.cow"], 0);
    assert_eq!(v["images"][0]["repaired"], json!(true));
    assert_eq!(v["images"][0]["leaked_bytes"], json!(64 * KIB));
    assert_eq!(v["status"], json!("clean"));

    // Corrupt: one byte of a map sector flipped.
    fs::copy(ws.p("disk.cow"), ws.p("bad.cow")).unwrap();
    corrupt_map_sector(&ws.p("bad.cow"));
    let o = ws.run(&["check", "bad.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("bad.cow"), "{}", o.describe());
    assert!(o.stdout.contains("checksum"), "{}", o.describe());
    let v = check_json(&ws, &["bad.cow"], 2);
    assert_eq!(v["status"], json!("corrupt"));
    assert_eq!(v["exit_code"], json!(2));
    assert_eq!(v["images"][0]["path"], json!("bad.cow"));
    let errs = v["images"][0]["errors"].as_array().unwrap();
    assert!(!errs.is_empty());
    assert!(errs[0].as_str().unwrap().contains("bad.cow"), "{v:#}");
    // --repair does not "repair" corruption, and the other commands refuse the image.
    assert_eq!(ws.run(&["check", "--repair", "bad.cow"]).code, Some(2));
    ws.fail(&["info", "bad.cow"], &["bad.cow", "checksum"]);
    ws.fail(&["map", "bad.cow"], &["bad.cow", "checksum"]);
    ws.fail(&["flatten", "bad.cow", "--output", "x.raw", "--format", "raw"], &["bad.cow"]);
    assert!(!ws.p("x.raw").exists());
}

#[test]
fn check_chain_checks_every_layer_and_reports_a_swapped_raw_base() {
    let ws = Ws::new();
    three_layer_chain(&ws);
    let v = check_json(&ws, &["--chain", "disk.cow"], 0);
    let paths: Vec<&str> = v["images"].as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["disk.cow", "disk-1.cow"], "{v:#}");
    let o = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(o.stdout, "disk.cow: checksums and invariants ok\ndisk-1.cow: checksums and invariants ok\n");

    // A leak in a lower layer is found only with --chain.
    append_leak(&ws.p("disk-1.cow"));
    assert_eq!(ws.run(&["check", "disk.cow"]).code, Some(0));
    let v = check_json(&ws, &["--chain", "disk.cow"], 3);
    assert_eq!(v["images"][1]["leaked_bytes"], json!(64 * KIB));
    check_json(&ws, &["--chain", "--repair", "disk.cow"], 0);
    check_json(&ws, &["--chain", "disk.cow"], 0);

    // A corrupt lower layer: check of the top alone passes, --chain names the layer.
    copy_sparse(&ws.p("disk-1.cow"), &ws.p("good-mid"));
    corrupt_map_sector(&ws.p("disk-1.cow"));
    assert_eq!(ws.run(&["check", "disk.cow"]).code, Some(0));
    let o = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("disk-1.cow"), "{}", o.describe());
    copy_sparse(&ws.p("good-mid"), &ws.p("disk-1.cow"));
    assert_eq!(ws.run(&["check", "--chain", "disk.cow"]).code, Some(0));

    // The raw base swapped for another file of the same size.
    write_random_file(&ws.p("base.raw"), 4 * MIB, 0xd1ff);
    let o = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("base.raw"), "{}", o.describe());
    assert!(o.stdout.contains("changed"), "{}", o.describe());
    let v = check_json(&ws, &["--chain", "disk.cow"], 2);
    assert_eq!(v["status"], json!("corrupt"));
    let all_errors = v["images"].to_string();
    assert!(all_errors.contains("base.raw") && all_errors.contains("changed"), "{v:#}");
    // Reading the disk refuses the swapped base too.
    ws.fail(&["flatten", "disk.cow", "--output", "x.raw", "--format", "raw"], &["base.raw", "changed"]);
    let o = ws.run(&["serve", "disk.cow", "--socket", "x.sock"]);
    assert_ne!(o.code, Some(0));
    assert!(o.error_line().contains("base.raw"), "{}", o.describe());
}

#[test]
fn check_after_kill_9_of_serve_during_writes_finds_no_corruption_and_repair_leaves_it_clean() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "64M"]);
    let sock = ws.p("s.sock");
    let mut server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock)]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).unwrap();
    let writer = thread::spawn(move || {
        let mut rng = XorShift::new(77);
        let buf = random_bytes(256 * KIB as usize, 78);
        let mut n = 0u64;
        loop {
            let off = (rng.next_u64() % 255) * 256 * KIB;
            let r = if n % 16 == 15 { c.flush() } else { c.write(off, &buf) };
            if r.is_err() {
                return n;
            }
            n += 1;
        }
    });
    thread::sleep(Duration::from_millis(400));
    server.kill9();
    let requests = writer.join().unwrap();
    assert!(requests > 10, "only {requests} requests before the kill");

    let o = ws.run(&["check", "disk.cow"]);
    assert!(o.code == Some(0) || o.code == Some(3), "after kill -9: {}", o.describe());
    let v = check_json(&ws, &["disk.cow"], o.code.unwrap());
    assert_eq!(v["images"][0]["dirty"], json!(true), "not closed cleanly");
    check_json(&ws, &["--repair", "disk.cow"], 0);
    let v = check_json(&ws, &["disk.cow"], 0);
    assert_eq!(v["images"][0]["dirty"], json!(false));
    assert_eq!(v["leaked_bytes"], json!(0));
    assert_eq!(ws.info("disk.cow")["flags"], json!([]));
    // Still a usable disk.
    ws.serve_write("disk.cow", &[data(0, 4096, 1)]);
    assert_eq!(ws.device("disk.cow")[..4096], random_bytes(4096, 1)[..]);
}

/// A FIFO named as an image (or as a parent) is refused at once: opening one for reading
/// waits for a writer, and `info`, `check` and `map` of a FIFO waited forever before
/// 2026-12-04.
#[test]
fn a_fifo_named_as_an_image_is_refused_at_once() {
    let ws = Ws::new();
    let fifo = ws.p("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let sock = ws.p("s.sock");
    let commands: [&[&str]; 5] = [
        &["info", "pipe"],
        &["check", "pipe"],
        &["map", "pipe"],
        &["create", "o.cow", "--backing", "pipe"],
        &["serve", "pipe", "--socket", s(&sock)],
    ];
    for args in commands {
        let mut child = ws
            .cmd(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start cowdisk");
        let done = wait_until(Duration::from_secs(10), || child.try_wait().ok().flatten().is_some());
        if !done {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cowdisk {args:?} still waits on a FIFO after 10 s");
        }
        let out = child.wait_with_output().expect("output");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{args:?} succeeded: {said}");
        assert!(said.contains("is a FIFO or socket, not a disk image"), "{args:?}: {said}");
    }
    assert!(!ws.p("o.cow").exists());
}

/// `check` of an image a server is writing: what the server wrote since its last flush sits
/// where the durable map does not point yet, which is not a leak. It is reported as the image
/// being in use, with exit 0 (before 2026-12-04: "leaked", exit 3, every time, which
/// `--repair` then refused as the image is open). Once the server has stopped, the same image
/// checks clean.
#[test]
fn check_of_an_image_a_server_is_writing_says_in_use_not_leaked() {
    let ws = Ws::new();
    ws.create("d.cow", &["--size", "8M"]);
    let server = Server::start(&[s(&ws.p("d.cow")), "--socket", s(&ws.p("n.sock"))]);
    let mut c = server.connect();
    c.opt_go("d", &[]).expect("NBD_OPT_GO");
    c.write(0, &[1u8; 4096]).expect("write");
    c.flush().expect("flush");
    for i in 1..8u64 {
        c.write(i << 20, &[7u8; 65536]).expect("write");
    }
    let o = ws.run(&["check", "d.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("open for writing in another process"), "{}", o.describe());
    assert!(!o.stdout.contains("leaked"), "{}", o.describe());
    let j = ws.json(&["check", "d.cow", "--json"]);
    assert_eq!((j["status"].as_str(), j["leaked_bytes"].as_u64()), (Some("clean"), Some(0)), "{j}");
    assert_eq!(j["images"][0]["in_use"], true, "{j}");
    assert!(j["images"][0]["unflushed_bytes"].as_u64() > Some(0), "nothing unflushed to tell apart: {j}");
    c.flush().expect("flush");
    drop(c);
    assert!(server.stop().success());
    let o = ws.run(&["check", "d.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(!o.stdout.contains("open for writing"), "{}", o.describe());
}
