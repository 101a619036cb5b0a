//! Changed-block tracking through the binary: `cowdisk diff` (its JSON, agreement with a byte model of what each layer wrote, its refusals), the NBD contexts `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME` as the raw client, nbdinfo and qemu-img read them, and the README's incremental backup recipe, run as written, giving a byte-identical disk.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use common::cli::*;
use common::nbdclient::*;
use common::nbdtest::{nbdinfo_map, status_maps};
use common::*;
use serde_json::Value;

const SIZE: u64 = 4 * MIB;
const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------
// The chain and its model
// ---------------------------------------------------------------------------

/// What the layers above the raw base were written with, oldest first: s1.cow, s2.cow, then
/// disk.cow (the top).
struct Written {
    layers: [Vec<Op>; 3],
}

/// base.raw (random) <- s1.cow <- s2.cow <- disk.cow, each layer written through
/// `cowdisk serve` with its ops and then frozen by `cowdisk snapshot` (all but the top).
fn build(ws: &Ws, layers: [Vec<Op>; 3]) -> Written {
    write_random_file(&ws.p("base.raw"), SIZE, 0xba5e);
    ws.create("disk.cow", &["--backing", "base.raw", "--backing-format", "raw", "--chunk-size", "16K"]);
    for (ops, snap) in layers.iter().zip(["s1.cow", "s2.cow", ""]) {
        ws.serve_write("disk.cow", ops);
        if !snap.is_empty() {
            ws.ok(&["snapshot", "disk.cow", snap]);
        }
    }
    Written { layers }
}

/// The ops below use 4 KiB-aligned and unaligned writes; blocks a layer's ops touch.
fn touched(ops: &[Op]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for op in ops {
        let (off, len) = match op {
            Op::Data(off, d) => (*off, d.len() as u64),
            Op::Zero(off, len) => (*off, *len),
        };
        out.extend(off / BLOCK..(off + len).div_ceil(BLOCK));
    }
    out
}

/// The device of image `name`: the raw base as it is, any other through `flatten --output`.
fn device(ws: &Ws, name: &str) -> Vec<u8> {
    if name.ends_with(".raw") {
        fs::read(ws.p(name)).unwrap()
    } else {
        ws.device(name)
    }
}

/// (offset, length, changed) of `cowdisk diff --json`, checked to be what the README says:
/// an array of objects with exactly these three fields, covering the device from 0 in order,
/// with no two neighbours saying the same.
fn diff_json(ws: &Ws, old: &str, new: &str) -> Vec<(u64, u64, bool)> {
    let v = ws.json(&["diff", old, new, "--json"]);
    let arr = v.as_array().unwrap_or_else(|| panic!("diff --json is not an array: {v}"));
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in arr {
        let keys: BTreeSet<&str> = e.as_object().expect("extent object").keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["offset", "length", "changed"]), "fields of {e}");
        let (off, len, changed) = (e["offset"].as_u64(), e["length"].as_u64(), e["changed"].as_bool());
        let (Some(off), Some(len), Some(changed)) = (off, len, changed) else { panic!("field types of {e}") };
        assert_eq!(off, out.last().map_or(0, |l| l.0 + l.1), "extents follow each other: {v}");
        assert!(len > 0, "empty extent in {v}");
        assert!(out.last().is_none_or(|l| l.2 != changed), "neighbours saying the same are merged: {v}");
        out.push((off, len, changed));
    }
    out
}

/// The blocks that `runs` (offset, length, changed) mark changed; every boundary must fall on
/// a block boundary (or the device's end).
fn changed_blocks(runs: &[(u64, u64, bool)]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &(off, len, changed) in runs {
        assert!(off % BLOCK == 0, "an extent starts inside a block: {runs:?}");
        if changed {
            out.extend(off / BLOCK..(off + len).div_ceil(BLOCK));
        }
    }
    out
}

/// What a backup relies on: every block whose bytes differ between `old` and `new` is in
/// `changed`; and nothing is changed that no layer above OLD touched (`may`).
#[track_caller]
fn assert_sound(changed: &BTreeSet<u64>, old: &[u8], new: &[u8], may: &BTreeSet<u64>, what: &str) {
    for b in 0..(new.len() as u64).div_ceil(BLOCK) {
        let r = (b * BLOCK) as usize..((b + 1) * BLOCK).min(new.len() as u64) as usize;
        let differs = old.get(r.clone()) != Some(&new[r]);
        assert!(!differs || changed.contains(&b), "{what}: block {b} differs but is not reported changed");
    }
    let extra: Vec<_> = changed.difference(may).collect();
    assert!(extra.is_empty(), "{what}: blocks reported changed that nothing above OLD touched: {extra:?}");
}

fn data_only_layers() -> [Vec<Op>; 3] {
    [
        vec![data(MIB, 64 * KIB, 1), data(3 * MIB + 100, 5000, 2)],
        vec![data(0, 8 * KIB, 3), data(MIB + 16 * KIB, 4 * KIB, 4), data(2 * MIB + 10, 1, 5)],
        vec![data(512 * KIB, 12 * KIB, 6), data(MIB + 60 * KIB, 8 * KIB, 7), data(SIZE - 4 * KIB, 4 * KIB, 8)],
    ]
}

// ---------------------------------------------------------------------------
// cowdisk diff
// ---------------------------------------------------------------------------

#[test]
fn diff_marks_exactly_the_blocks_later_layers_wrote() {
    let ws = Ws::new();
    let w = build(&ws, data_only_layers());
    let names = ["base.raw", "s1.cow", "s2.cow", "disk.cow"];
    let devices: Vec<Vec<u8>> = names.iter().map(|n| device(&ws, n)).collect();
    for old in 0..names.len() {
        for new in old + 1..names.len() {
            let what = format!("diff {} {}", names[old], names[new]);
            let runs = diff_json(&ws, names[old], names[new]);
            assert_eq!(runs.last().map(|l| l.0 + l.1), Some(SIZE), "{what} covers the device");
            let written: BTreeSet<u64> = w.layers[old..new].iter().flat_map(|ops| touched(ops)).collect();
            // Data writes only: every block they touched became Data, and nothing else did.
            assert_eq!(changed_blocks(&runs), written, "{what}");
            assert_sound(&written, &devices[old], &devices[new], &written, &what);
        }
    }
    let text = ws.ok(&["diff", "s2.cow", "disk.cow"]);
    assert!(text.lines().any(|l| l.contains("0x80000") && l.ends_with("changed")), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert_eq!(last, "24K of 4M may differ, in 3 extents", "summary line of:\n{text}");
}

#[test]
fn diff_covers_every_byte_that_differs_after_zeroes_and_layers_of_other_sizes() {
    let ws = Ws::new();
    let layers = [
        vec![data(0, 2 * MIB, 1), Op::Zero(100 * KIB, 64 * KIB)],
        vec![Op::Zero(MIB - 6000, 70 * KIB), data(3 * MIB, 4 * KIB, 2), Op::Zero(3 * MIB, 4 * KIB)],
        vec![data(2 * MIB - 8 * KIB, 16 * KIB, 3), Op::Zero(0, 256 * KIB), Op::Zero(SIZE - 10 * KIB, 10 * KIB)],
    ];
    let w = build(&ws, layers);
    let names = ["base.raw", "s1.cow", "s2.cow", "disk.cow"];
    let devices: Vec<Vec<u8>> = names.iter().map(|n| device(&ws, n)).collect();
    for old in 0..names.len() - 1 {
        let what = format!("diff {} disk.cow", names[old]);
        let may: BTreeSet<u64> = w.layers[old..].iter().flat_map(|ops| touched(ops)).collect();
        let runs = diff_json(&ws, names[old], "disk.cow");
        assert_sound(&changed_blocks(&runs), &devices[old], &devices[3], &may, &what);
    }
    // A middle layer shorter than the device hides what lies below past its end, and a top
    // larger than the layer compared with has bytes that layer never had: both are changed.
    ws.create("short.cow", &["--backing", "s2.cow", "--size", "3M"]);
    ws.ok(&["snapshot", "short.cow", "short-1.cow"]);
    ws.create("big.cow", &["--backing", "short-1.cow", "--size", "6M"]);
    let runs = diff_json(&ws, "s2.cow", "big.cow");
    assert_eq!(runs, [(0, 3 * MIB, false), (3 * MIB, 3 * MIB, true)]);
    // Nothing above short-1.cow records anything past its 3M: those bytes are new all the same.
    assert_eq!(diff_json(&ws, "short-1.cow", "big.cow"), [(0, 3 * MIB, false), (3 * MIB, 3 * MIB, true)]);
    let (s2, big) = (device(&ws, "s2.cow"), device(&ws, "big.cow"));
    assert_sound(&changed_blocks(&runs), &s2, &big, &(3 * MIB / BLOCK..6 * MIB / BLOCK).collect(), "s2 -> big");
}

#[test]
fn diff_refuses_images_it_cannot_compare_in_one_line() {
    let ws = Ws::new();
    build(&ws, data_only_layers());
    ws.create("other.cow", &["--size", "4M"]);
    fs::write(ws.p("notes.txt"), "not an image").unwrap();
    let before: Vec<u64> = ["s1.cow", "s2.cow", "disk.cow"].iter().map(|n| file_fingerprint(&ws.p(n))).collect();
    ws.fail(&["diff", "disk.cow", "s1.cow"], &["disk.cow: diff: is above s1.cow", "cowdisk diff s1.cow disk.cow"]);
    ws.fail(&["diff", "other.cow", "disk.cow"], &["other.cow: diff: is not in the chain of disk.cow"]);
    ws.fail(&["diff", "notes.txt", "disk.cow"], &["notes.txt", "is not in the chain of disk.cow"]);
    ws.fail(&["diff", "disk.cow", "disk.cow"], &["OLD and NEW are the same image"]);
    ws.fail(&["diff", "nosuch.cow", "disk.cow"], &["nosuch.cow", "No such file"]);
    ws.fail(&["diff", "s1.cow", "nosuch.cow"], &["nosuch.cow"]);
    ws.fail(&["diff", "s1.cow", "notes.txt"], &["notes.txt"]);
    ws.fail(&["diff", "s1.cow"], &["NEW"]);
    let after: Vec<u64> = ["s1.cow", "s2.cow", "disk.cow"].iter().map(|n| file_fingerprint(&ws.p(n))).collect();
    assert_eq!(before, after, "a refused diff changes nothing");
}

// ---------------------------------------------------------------------------
// The NBD contexts
// ---------------------------------------------------------------------------

/// The chain of [`data_only_layers`] served (export "disk"), with `extra` serve arguments.
fn served(ws: &Ws, extra: &[&str]) -> (Server, Written) {
    let w = build(ws, data_only_layers());
    let (image, sock) = (ws.p("disk.cow"), ws.p("nbd.sock"));
    let mut args = vec![s(&image), "--socket", s(&sock)];
    args.extend_from_slice(extra);
    (Server::start(&args), w)
}

/// `runs` (start, end, value) with neighbours of equal value merged.
fn merged(runs: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (s, e, v) in runs {
        match out.last_mut() {
            Some(l) if l.1 == s && l.2 == v => l.1 = e,
            _ => out.push((s, e, v)),
        }
    }
    out
}

/// What the contexts must say, from the CLI's view of the same (flushed) state:
/// allocation depth from `map --json` (depth + 1; 0 where nothing is allocated), dirty from
/// `diff OLD disk.cow --json`.
fn expected_depths(ws: &Ws, image: &str) -> Vec<(u64, u64, u32)> {
    let map = ws.json(&["map", image, "--json"]);
    merged(map.as_array().unwrap().iter().map(|e| {
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        (off, off + len, e["depth"].as_u64().map_or(0, |d| d as u32 + 1))
    }))
}

fn expected_dirty(ws: &Ws, old: &str, new: &str) -> Vec<(u64, u64, u32)> {
    merged(diff_json(ws, old, new).into_iter().map(|(o, l, c)| (o, o + l, u32::from(c))))
}

#[test]
fn contexts_are_listed_and_selected_as_qemu_nbd_offers_them() {
    let ws = Ws::new();
    let (server, _) = served(&ws, &["--allocation-depth", "--dirty-bitmaps"]);
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    let names = |v: Vec<MetaContext>| v.into_iter().map(|m| m.name).collect::<Vec<_>>();
    let bitmaps = ["qemu:dirty-bitmap:s2.cow", "qemu:dirty-bitmap:s1.cow", "qemu:dirty-bitmap:base.raw"];
    let all = names(c.opt_list_meta_context("disk", &[]).unwrap());
    assert_eq!(all, [&["base:allocation", "qemu:allocation-depth"][..], &bitmaps].concat());
    let qemu = names(c.opt_list_meta_context("disk", &["qemu:"]).unwrap());
    assert_eq!(qemu, [&["qemu:allocation-depth"][..], &bitmaps].concat());
    assert_eq!(names(c.opt_list_meta_context("disk", &["qemu:dirty-bitmap:"]).unwrap()), bitmaps);
    let one = names(c.opt_list_meta_context("disk", &["qemu:dirty-bitmap:s1.cow", "qemu:dirty-bitmap:s1"]).unwrap());
    assert_eq!(one, ["qemu:dirty-bitmap:s1.cow"], "a bitmap is named by the layer's whole file name");
    assert!(c.opt_list_meta_context("disk", &["qemu:dirty-bitmap:disk.cow"]).unwrap().is_empty(), "not the top");
    for prefix in ["qemu:", "qemu:dirty-bitmap:", "base:"] {
        assert!(c.opt_set_meta_context("disk", &[prefix]).unwrap().is_empty(), "SET {prefix} selects nothing");
    }
    // Several at once: ids in the order asked, each context once.
    let asked = ["qemu:dirty-bitmap:s1.cow", "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:s1.cow"];
    let set = c.opt_set_meta_context("disk", &asked).unwrap();
    assert_eq!(names(set.clone()), &asked[..3]);
    let ids: Vec<u32> = set.iter().map(|m| m.id).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3, "distinct ids: {set:?}");
    c.opt_go("disk", &[]).unwrap();

    let maps = status_maps(&mut c, &ids, 0, SIZE);
    let hole_zero = merged(maps[1].iter().copied());
    assert_eq!(hole_zero, [(0, SIZE, 0)], "base:allocation: the raw base holds data everywhere");
    assert_eq!(merged(maps[2].iter().copied()), expected_depths(&ws, "disk.cow"), "qemu:allocation-depth");
    assert_eq!(merged(maps[0].iter().copied()), expected_dirty(&ws, "s1.cow", "disk.cow"), "dirty since s1");
    // NBD_CMD_FLAG_REQ_ONE: one descriptor in each chunk.
    let reply = c.block_status(MIB, 64 * KIB as u32, NBD_CMD_FLAG_REQ_ONE).unwrap();
    assert_eq!(
        reply.iter().map(|r| (r.0, r.1.len())).collect::<Vec<_>>(),
        ids.iter().map(|&i| (i, 1)).collect::<Vec<_>>()
    );
    // A write shows in all three at once.
    c.write(2 * MIB, &random_bytes(4096, 9)).unwrap();
    let reply = c.block_status(2 * MIB, 4096, 0).unwrap();
    let values: Vec<(u32, u32)> = reply.iter().map(|r| (r.1[0].length, r.1[0].flags)).collect();
    assert_eq!(values, [(4096, 1), (4096, 0), (4096, 1)], "dirty, data, depth 1 (the top)");
}

#[test]
fn without_being_asked_the_server_tells_clients_nothing_about_its_layers() {
    let ws = Ws::new();
    let (server, _) = served(&ws, &["--allocation-depth"]);
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    let names: Vec<String> = c.opt_list_meta_context("disk", &[]).unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["base:allocation", "qemu:allocation-depth"], "no --dirty-bitmaps: no layer names");
    assert!(c.opt_set_meta_context("disk", &["qemu:dirty-bitmap:s1.cow"]).unwrap().is_empty());
    drop(c);
    drop(server);
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&ws.p("plain.sock"))]);
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    let names: Vec<String> = c.opt_list_meta_context("disk", &["qemu:"]).unwrap().into_iter().map(|m| m.name).collect();
    assert!(names.is_empty(), "no --allocation-depth either: nothing in qemu: {names:?}");
}

#[test]
fn nbdinfo_and_qemu_img_read_allocation_depth_and_dirty_bitmaps() {
    if !require_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let ws = Ws::new();
    let (server, w) = served(&ws, &["--allocation-depth", "--dirty-bitmaps"]);
    let uri = server.uri("disk");
    // Written live (a trim is a zero op to the model).
    let live = [data(MIB + 8 * KIB, 3000, 1), Op::Zero(3 * MIB, 64 * KIB), Op::Zero(0, 4 * KIB)];
    {
        let mut c = server.connect();
        c.opt_go("disk", &[]).unwrap();
        c.write(MIB + 8 * KIB, &random_bytes(3000, 1)).unwrap();
        c.write_zeroes(3 * MIB, 64 * KIB as u32, 0).unwrap();
        c.trim(0, 4 * KIB as u32).unwrap();
        c.flush().unwrap();
    }
    let now = run(tool("nbdcopy").arg(&uri).arg("-")).stdout;
    let text = stdout_of(&run(tool("nbdinfo").arg(&uri)));
    for ctx in ["qemu:allocation-depth", "qemu:dirty-bitmap:s1.cow", "qemu:dirty-bitmap:base.raw"] {
        assert!(text.lines().any(|l| l.trim() == ctx), "nbdinfo lists {ctx}:\n{text}");
    }
    let runs =
        |ctx: &str| nbdinfo_map(Some(ctx), &uri).iter().map(|r| (r.offset, r.offset + r.length, r.kind)).collect();
    let depths: Vec<(u64, u64, u32)> = runs("qemu:allocation-depth");
    assert_eq!(merged(depths.clone()), expected_depths(&ws, "disk.cow"), "nbdinfo --map=qemu:allocation-depth");
    assert!(depths.contains(&(3 * MIB, 3 * MIB + 64 * KIB, 1)), "zeros written to the top are its own: {depths:?}");
    for (i, old) in ["base.raw", "s1.cow", "s2.cow"].into_iter().enumerate() {
        let ctx = format!("qemu:dirty-bitmap:{old}");
        let dirty: Vec<(u64, u64, u32)> = runs(&ctx);
        let may: BTreeSet<u64> = w.layers[i..].iter().chain([&live.to_vec()]).flat_map(|ops| touched(ops)).collect();
        let blocks = changed_blocks(&dirty.iter().map(|&(s, e, v)| (s, e - s, v == 1)).collect::<Vec<_>>());
        assert_sound(&blocks, &device(&ws, old), &now, &may, &ctx);
        assert_eq!(merged(dirty), expected_dirty(&ws, old, "disk.cow"), "nbdinfo --map={ctx}");
        // qemu reads a bitmap through x-dirty-bitmap as if it were base:allocation, so the dirty
        // flag (bit 0) shows as NBD_STATE_HOLE: dirty areas are "data": false.
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},export=disk,x-dirty-bitmap={ctx}",
            s(&ws.p("nbd.sock"))
        );
        let out = run(tool("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
        let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
        let seen = merged(v.as_array().unwrap().iter().map(|e| {
            let (off, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            (off, off + len, u32::from(!e["data"].as_bool().unwrap()))
        }));
        assert_eq!(seen, expected_dirty(&ws, old, "disk.cow"), "qemu-img map x-dirty-bitmap={ctx}");
    }
}

#[test]
fn a_snapshot_served_read_only_shows_what_changed_between_two_snapshots() {
    if !require_tool("nbdinfo") {
        return;
    }
    let ws = Ws::new();
    build(&ws, data_only_layers());
    let server =
        Server::start(&[s(&ws.p("s2.cow")), "--read-only", "--dirty-bitmaps", "--socket", s(&ws.p("s2.sock"))]);
    let dirty: Vec<(u64, u64, u32)> = nbdinfo_map(Some("qemu:dirty-bitmap:s1.cow"), &server.uri("s2"))
        .iter()
        .map(|r| (r.offset, r.offset + r.length, r.kind))
        .collect();
    assert_eq!(merged(dirty), expected_dirty(&ws, "s1.cow", "s2.cow"));
}

#[test]
fn layer_names_two_layers_share_are_not_offered_as_bitmaps() {
    let ws = Ws::new();
    for d in ["a", "b"] {
        fs::create_dir(ws.p(d)).unwrap();
    }
    ws.create("a/disk.cow", &["--size", "1M"]);
    ws.ok(&["snapshot", "a/disk.cow", "a/snap.cow"]);
    ws.create("b/disk.cow", &["--backing", "a/snap.cow"]);
    ws.ok(&["snapshot", "b/disk.cow", "b/snap.cow"]);
    let server = Server::start(&[s(&ws.p("b/disk.cow")), "--dirty-bitmaps", "--socket", s(&ws.p("nbd.sock"))]);
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    assert!(c.opt_list_meta_context("disk", &["qemu:dirty-bitmap:"]).unwrap().is_empty(), "snap.cow twice");
    assert!(c.opt_set_meta_context("disk", &["qemu:dirty-bitmap:snap.cow"]).unwrap().is_empty());
    // diff tells them apart by file, not by name.
    assert_eq!(diff_json(&ws, "a/snap.cow", "b/disk.cow"), [(0, MIB, false)]);
}

/// A commit stopped half-way leaves its intermediate layer in the chain (`disk.cow.commit-…`):
/// the commit's own, gone when the next commit ends, so it is not offered as a bitmap (a
/// client that selected it would be told from then on that everything changed); the
/// snapshots around it still are.
#[test]
fn a_commits_intermediate_layer_is_not_offered_as_a_bitmap() {
    let ws = Ws::new();
    let top: Vec<Op> = (0..16u64).map(|i| data(i * 256 * KIB, 128 * KIB, 300 + i)).collect();
    build(&ws, [vec![data(0, 4096, 1)], vec![data(MIB, 4096, 2)], top]);
    let (sock, ctl) = (ws.p("nbd.sock"), ws.p("ctl.sock"));
    let server = Server::start(&[s(&ws.p("disk.cow")), "--dirty-bitmaps", "--socket", s(&sock), "--control", s(&ctl)]);
    ws.ok(&["commit", "disk.cow", "--force", "--detach", "--rate", "64K", "--control", s(&ctl)]);
    ws.ok(&["jobs", "cancel", "1", "--control", s(&ctl)]);
    let layers = || -> Vec<String> {
        ws.info("disk.cow")["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        wait_until(std::time::Duration::from_secs(10), || layers().iter().any(|l| l.contains(".commit-"))),
        "{:?}",
        layers()
    );
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    let listed: Vec<String> =
        c.opt_list_meta_context("disk", &["qemu:dirty-bitmap:"]).unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(listed, ["s2.cow", "s1.cow", "base.raw"].map(|n| format!("qemu:dirty-bitmap:{n}")), "{:?}", layers());
    drop(c);
    assert!(server.stop().success());
}

#[test]
fn a_selected_bitmap_keeps_meaning_its_layer_across_live_snapshots() {
    let ws = Ws::new();
    let (image, sock, ctl) = (ws.p("disk.cow"), ws.p("nbd.sock"), ws.p("ctl.sock"));
    build(&ws, [vec![], vec![], vec![]]);
    let server = Server::start(&[s(&image), "--socket", s(&sock), "--control", s(&ctl), "--dirty-bitmaps"]);
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    let set = c.opt_set_meta_context("disk", &["qemu:dirty-bitmap:s1.cow"]).unwrap();
    c.opt_go("disk", &[]).unwrap();
    // A second client has the same bitmap and base:allocation in one request.
    let mut both = server.connect();
    both.opt_structured_reply().unwrap();
    let both_ids: Vec<u32> = both
        .opt_set_meta_context("disk", &["qemu:dirty-bitmap:s1.cow", "base:allocation"])
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(both_ids.len(), 2);
    both.opt_go("disk", &[]).unwrap();
    c.write(MIB, &random_bytes(8192, 1)).unwrap();
    ws.ok(&["snapshot", "disk.cow", "s4.cow", "--control", s(&ctl)]);
    c.write(3 * MIB, &random_bytes(4096, 2)).unwrap();
    // s1.cow is now three layers down, not two: still the same layer, so both writes show.
    let dirty = merged(status_maps(&mut c, &[set[0].id], 0, SIZE).remove(0));
    let want = [(0, MIB, 0), (MIB, MIB + 8192, 1), (MIB + 8192, 3 * MIB, 0), (3 * MIB, 3 * MIB + 4096, 1)];
    assert_eq!(dirty, [&want[..], &[(3 * MIB + 4096, SIZE, 0)]].concat());
    let mut l = server.connect();
    l.opt_structured_reply().unwrap();
    let listed: Vec<String> =
        l.opt_list_meta_context("disk", &["qemu:dirty-bitmap:"]).unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(listed, ["s4.cow", "s2.cow", "s1.cow", "base.raw"].map(|n| format!("qemu:dirty-bitmap:{n}")));
    let alloc_before = merged(status_maps(&mut both, &both_ids, 0, SIZE).remove(1));
    // A compaction merges s1.cow away: its name is gone, and what changed since it can no
    // longer be told, so a client that selected it is told that everything may have (never
    // answered from another layer, which could hide a change from a backup), and the other
    // context of the same request still answers.
    let out = ws.run(&["compact", "disk.cow", "merged.cow", "--control", s(&ctl)]);
    assert_eq!(out.code, Some(0), "compact\n{}", out.describe());
    assert_eq!(merged(status_maps(&mut c, &[set[0].id], 0, SIZE).remove(0)), [(0, SIZE, 1)], "merged-away bitmap");
    let mut after = status_maps(&mut both, &both_ids, 0, SIZE).into_iter().map(merged);
    assert_eq!(after.next().unwrap(), [(0, SIZE, 1)], "merged-away bitmap beside base:allocation");
    assert_eq!(after.next().unwrap(), alloc_before, "base:allocation beside a merged-away bitmap");
    let listed: Vec<String> =
        l.opt_list_meta_context("disk", &["qemu:dirty-bitmap:"]).unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(listed, ["qemu:dirty-bitmap:merged.cow", "qemu:dirty-bitmap:base.raw"]);
    // A new snapshot given the merged-away layer's name is another layer: the client that
    // selected the old one is still told that everything may have changed. (It used to be
    // answered from the new layer, "nothing changed": an incremental backup would have
    // missed every write since the old one.)
    let _ = fs::remove_file(ws.p("s1.cow"));
    ws.ok(&["snapshot", "disk.cow", "s1.cow", "--control", s(&ctl)]);
    assert_eq!(merged(status_maps(&mut c, &[set[0].id], 0, SIZE).remove(0)), [(0, SIZE, 1)], "bitmap of a reused name");
    // A client that selects the name now gets the new layer: nothing changed since it.
    let mut fresh = server.connect();
    fresh.opt_structured_reply().unwrap();
    let id = fresh.opt_set_meta_context("disk", &["qemu:dirty-bitmap:s1.cow"]).unwrap()[0].id;
    fresh.opt_go("disk", &[]).unwrap();
    assert_eq!(merged(status_maps(&mut fresh, &[id], 0, SIZE).remove(0)), [(0, SIZE, 0)], "the new s1.cow");
}

// ---------------------------------------------------------------------------
// Incremental backup, as the README tells it
// ---------------------------------------------------------------------------

/// The README's shell block that copies the dirty extents (the first `sh` block after the
/// "Incremental backup" heading that reads a dirty bitmap).
fn readme_recipe() -> String {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split_once("### Incremental backup").expect("README has an Incremental backup section").1;
    let mut blocks = section.split("```sh\n").skip(1).map(|b| b.split_once("```").map_or(b, |x| x.0));
    blocks.find(|b| b.contains("qemu:dirty-bitmap:")).expect("a sh block reading a dirty bitmap").to_string()
}

#[test]
fn incremental_backup_recipe_from_the_readme_gives_a_byte_identical_disk() {
    if !require_tools(&["nbdinfo", "nbdcopy", "qemu-img", "bash"]) {
        return;
    }
    let ws = Ws::new();
    // s1.cow is the snapshot the full backup is taken of; s2.cow a later snapshot; disk.cow
    // served and written on.
    let layers =
        [vec![data(0, SIZE, 1)], vec![data(MIB, 64 * KIB, 2), Op::Zero(2 * MIB, 128 * KIB)], vec![data(100, 5000, 3)]];
    build(&ws, layers);
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&ws.p("nbd.sock")), "--dirty-bitmaps"]);
    ws.ok(&["flatten", "s1.cow", "--output", "full.raw", "--format", "raw"]);
    {
        let mut c = server.connect();
        c.opt_go("disk", &[]).unwrap();
        c.write(3 * MIB + 7, &random_bytes(70_000, 4)).unwrap();
        c.write_zeroes(MIB + 4 * KIB, 8 * KIB as u32, 0).unwrap();
        c.trim(SIZE - 64 * KIB, 64 * KIB as u32).unwrap();
        c.write(SIZE - 8 * KIB, &random_bytes(100, 5)).unwrap();
        c.flush().unwrap();
    }
    // A byte in a block nothing wrote since s1: the recipe must leave it alone.
    let marker = 1536 * KIB;
    let full = fs::OpenOptions::new().write(true).open(ws.p("full.raw")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&full, &[0xa5], marker).unwrap();
    let recipe = readme_recipe();
    let out = run(Command::new(tool_path("bash").unwrap()).arg("-euc").arg(&recipe).current_dir(ws.dir()));
    assert!(out.stderr.is_empty(), "the recipe printed errors:\n{}", String::from_utf8_lossy(&out.stderr));
    run(tool("nbdcopy").arg(server.uri("disk")).arg(ws.p("now.raw")));
    let (after, now) = (fs::read(ws.p("full.raw")).unwrap(), fs::read(ws.p("now.raw")).unwrap());
    assert_eq!(first_difference(&after, &now), Some(marker as usize), "only dirty extents are copied");
    std::os::unix::fs::FileExt::write_all_at(&full, &now[marker as usize..][..1], marker).unwrap();
    assert!(same_file_bytes(&ws.p("full.raw"), &ws.p("now.raw")), "full backup + incremental == the disk now");

    // The point-in-time variant: a live snapshot s3.cow exported read-only beside the disk,
    // which goes on being written; the same loop with EXPORT changed as the README says.
    drop(server);
    let ctl = ws.p("ctl.sock");
    let server = Server::start(&[
        s(&ws.p("disk.cow")),
        "--socket",
        s(&ws.p("nbd.sock")),
        "--control",
        s(&ctl),
        "--dirty-bitmaps",
    ]);
    fs::remove_file(ws.p("full.raw")).unwrap();
    ws.ok(&["flatten", "s1.cow", "--output", "full.raw", "--format", "raw"]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).unwrap();
    c.write(MIB, &random_bytes(64 * 1024, 6)).unwrap();
    ws.ok(&["snapshot", "disk.cow", "s3.cow", "--control", s(&ctl)]);
    ws.ok(&["export", "add", "s3.cow", "--read-only", "--control", s(&ctl)]);
    c.write(2 * MIB, &random_bytes(64 * 1024, 7)).unwrap();
    let line = "SOCK=$PWD/nbd.sock EXPORT=disk\n";
    assert!(recipe.starts_with(line), "the recipe starts with {line:?}:\n{recipe}");
    let recipe = recipe.replacen(line, "SOCK=$PWD/nbd.sock EXPORT=s3\n", 1);
    let out = run(Command::new(tool_path("bash").unwrap()).arg("-euc").arg(&recipe).current_dir(ws.dir()));
    assert!(out.stderr.is_empty(), "the recipe printed errors:\n{}", String::from_utf8_lossy(&out.stderr));
    c.write(3 * MIB, &random_bytes(64 * 1024, 8)).unwrap();
    ws.ok(&["export", "remove", "s3", "--control", s(&ctl)]);
    let after = fs::read(ws.p("full.raw")).unwrap();
    assert_bytes_eq(&after, &ws.device("s3.cow"), "full backup at s1 + incremental from s3 == s3");
}
