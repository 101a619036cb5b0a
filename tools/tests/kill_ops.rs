//! kill -9 of `cowdisk snapshot`, `flatten` (in place, and to a raw or a cowdisk file),
//! `commit --force` and `check --repair` at moments spread over their run: after each kill the
//! chain opens (`info`, `map`), `check --chain` finds at worst leaked space, the merged device
//! read through `cowdisk serve` is byte for byte what it was (an output file is absent or
//! complete), the state is the one before the operation or the one after it, and the same
//! command run again completes and leaves the final state, with no temporary file behind.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use common::cli::*;
use common::*;
use serde_json::Value;

/// The device of the chain that flatten, commit and repair work on: large enough that they
/// run for tens to hundreds of milliseconds here, so that kills land in the middle.
const SIZE: u64 = 64 * MIB;
/// The top layer leaves the end of the device alone: the leaky copy of it writes there.
const UNTOUCHED: u64 = 8 * MIB;
/// Snapshot takes constant time whatever the size, so its chain is small; it runs on a real
/// disk, where its syncs take time, instead of tmpfs.
const SMALL: u64 = 8 * MIB;

/// Kills per operation; `COWDISK_KILLS=N` runs more.
fn kills() -> usize {
    std::env::var("COWDISK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// Built once and shared by the tests while any of them runs. `big/`: base.raw <- disk-0.cow
/// (frozen) <- disk.cow, with scattered data and zeros in both layers, and leaky.cow: disk.cow
/// after a server wrote into chunks it had no slot for and was killed before flushing (dirty,
/// leaked space, the same device). `small/`: base.raw <- disk.cow.
struct Fixture {
    ws: Ws,
    big: Vec<u8>,
    small: Vec<u8>,
}

static FIXTURE: Mutex<Weak<Fixture>> = Mutex::new(Weak::new());

fn fixture() -> Arc<Fixture> {
    let mut slot = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = slot.upgrade() {
        return f;
    }
    let t = Instant::now();
    let ws = Ws::in_memory("kf");
    let big = chain(&ws.p("big"), SIZE, 2500, 2000);
    let dir = ws.p("big");
    copy_sparse(&dir.join("disk.cow"), &dir.join("leaky.cow"));
    {
        let sock = dir.join("leak.sock");
        let mut server = Server::start(&[s(&dir.join("leaky.cow")), "--socket", s(&sock)]);
        let mut c = server.connect();
        c.opt_go("leaky", &[]).unwrap();
        for op in scattered(0x1ea4, 200, UNTOUCHED, 4 * KIB, 16 * KIB) {
            if let Op::Data(off, d) = op {
                c.write(SIZE - UNTOUCHED + off, &d).unwrap();
            }
        }
        server.kill9();
    }
    let c = run_in(&dir, &["check", "leaky.cow"]);
    assert_eq!(c.code, Some(3), "the leaky fixture has no leaks\n{}", c.describe());
    assert_bytes_eq(&device_in(&dir, "leaky.cow"), &big, "the leaky fixture");
    let small = chain(&ws.p("small"), SMALL, 300, 200);
    eprintln!("kill_ops fixture built in {:?}", t.elapsed());
    let f = Arc::new(Fixture { ws, big, small });
    *slot = Arc::downgrade(&f);
    f
}

/// base.raw <- disk-0.cow (frozen, `lower` scattered writes) <- disk.cow (`upper` scattered
/// writes and some zeroed ranges, none in the last [`UNTOUCHED`] bytes of a big chain) in
/// `dir`; returns the merged device.
fn chain(dir: &Path, size: u64, lower: usize, upper: usize) -> Vec<u8> {
    fs::create_dir(dir).unwrap();
    write_random_file(&dir.join("base.raw"), size, size ^ 0xba5e);
    let mut model = fs::read(dir.join("base.raw")).unwrap();
    ok_in(dir, &["create", "disk.cow", "--backing", "base.raw"]);
    let lower = scattered(size ^ 0xc0ffee, lower, size, 4 * KIB, 12 * KIB);
    serve_write(&dir.join("disk.cow"), &lower);
    ok_in(dir, &["snapshot", "disk.cow", "disk-0.cow"]);
    let top = if size > UNTOUCHED { size - UNTOUCHED } else { size };
    let mut upper = scattered(size ^ 0xbeef, upper, top, 4 * KIB, 8 * KIB);
    let mut rng = XorShift::new(size);
    for _ in 0..40 {
        upper.push(Op::Zero((rng.next_u64() % (top / MIB)) * MIB, 64 * KIB));
    }
    serve_write(&dir.join("disk.cow"), &upper);
    apply(&mut model, &lower);
    apply(&mut model, &upper);
    assert_bytes_eq(&device_in(dir, "disk.cow"), &model, "the fixture chain");
    model
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum KillOp {
    Snapshot,
    FlattenInPlace,
    FlattenRaw,
    FlattenCowdisk,
    Commit,
    Repair,
}

use KillOp::*;

/// What a kill left, as `info` and `check` tell it.
#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    Before,
    /// A snapshot decided (the image frozen with its intent record) but not carried out; any
    /// writer that opens the image finishes it.
    Decided,
    After,
}

impl KillOp {
    fn args(self) -> &'static [&'static str] {
        match self {
            Snapshot => &["snapshot", "disk.cow", "snap.cow"],
            FlattenInPlace => &["flatten", "disk.cow"],
            FlattenRaw => &["flatten", "disk.cow", "--output", "out.img", "--format", "raw"],
            FlattenCowdisk => &["flatten", "disk.cow", "--output", "out.img", "--format", "cowdisk"],
            Commit => &["commit", "disk.cow", "--force"],
            Repair => &["check", "disk.cow", "--repair"],
        }
    }

    fn device(self, fx: &Fixture) -> &[u8] {
        if self == Snapshot {
            &fx.small
        } else {
            &fx.big
        }
    }

    /// The files of the directory once the operation has completed.
    fn final_files(self) -> BTreeSet<&'static str> {
        let mut f: BTreeSet<&str> = ["base.raw", "disk-0.cow", "disk.cow"].into();
        match self {
            Snapshot => {
                f.insert("snap.cow");
            }
            FlattenRaw | FlattenCowdisk => {
                f.insert("out.img");
            }
            _ => {}
        }
        f
    }
}

/// The fixture's chain for `op` in a fresh directory: the raw base hard-linked where it can be
/// (nothing writes it; `check --chain` verifies its fingerprint), the cowdisk layers copied.
fn fresh_chain(fx: &Fixture, op: KillOp, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let from = fx.ws.p(if op == Snapshot { "small" } else { "big" });
    if fs::hard_link(from.join("base.raw"), dir.join("base.raw")).is_err() {
        copy_sparse(&from.join("base.raw"), &dir.join("base.raw"));
    }
    copy_sparse(&from.join("disk-0.cow"), &dir.join("disk-0.cow"));
    let top = if op == Repair { "leaky.cow" } else { "disk.cow" };
    copy_sparse(&from.join(top), &dir.join("disk.cow"));
}

#[track_caller]
fn json_in(dir: &Path, args: &[&str]) -> Value {
    let out = ok_in(dir, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}):\n{out}"))
}

fn has_flag(layer: &Value, flag: &str) -> bool {
    layer["flags"].as_array().is_some_and(|f| f.iter().any(|v| v == flag))
}

/// The exports of `cowdisk serve --read-only` on `images` read whole and compared with
/// `device`; returns the first (export, offset) that differs.
fn served_difference(dir: &Path, images: &[&str], device: &[u8]) -> Option<(String, u64)> {
    let sock = dir.join("v.sock");
    let mut args: Vec<String> = images.iter().map(|i| s(&dir.join(i)).to_owned()).collect();
    args.extend(["--read-only".into(), "--socket".into(), s(&sock).into()]);
    let server = Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for image in images {
        let name = image.trim_end_matches(".cow").trim_end_matches(".img");
        let mut c = server.connect();
        c.opt_go(name, &[]).unwrap_or_else(|e| panic!("NBD_OPT_GO {name}: {e}\n{}", server.log()));
        let step = 8 * MIB as usize;
        for (i, want) in device.chunks(step).enumerate() {
            let got = c.read((i * step) as u64, want.len() as u32).unwrap_or_else(|e| panic!("read {name}: {e}"));
            if let Some(d) = first_difference(&got, want) {
                return Some((name.to_owned(), (i * step + d) as u64));
            }
        }
    }
    drop(server);
    let _ = fs::remove_file(&sock);
    None
}

/// What `info`, `map` and `check` say after the operation was killed (or ran to its end): the
/// chain opens and is sound, an output file is absent or complete. Returns the state left.
fn inspect(fx: &Fixture, dir: &Path, op: KillOp, what: &str) -> State {
    let device = op.device(fx);
    let info = json_in(dir, &["info", "--json", "disk.cow"]);
    let layers = info["layers"].as_array().unwrap();
    let map = json_in(dir, &["map", "--json", "disk.cow"]);
    let end =
        map.as_array().and_then(|m| m.last()).map(|e| e["offset"].as_u64().unwrap() + e["length"].as_u64().unwrap());
    assert_eq!(end, Some(device.len() as u64), "{what}: map does not cover the device");
    let check = run_in(dir, &["check", "--chain", "--json", "disk.cow"]);
    assert!(matches!(check.code, Some(0) | Some(3)), "{what}: check --chain\n{}", check.describe());
    let status: Value = serde_json::from_str(&check.stdout).unwrap();
    let out = dir.join("out.img");
    let state = match op {
        Snapshot if layers.len() == 4 => State::After,
        Snapshot if has_flag(&layers[0], "snapshot-pending") => State::Decided,
        FlattenInPlace if layers.len() == 1 => State::After,
        FlattenRaw | FlattenCowdisk if out.exists() => State::After,
        Commit if info["data_bytes"] == 0 => State::After,
        Repair if status["status"] == "clean" => State::After,
        _ => State::Before,
    };
    let want_layers = match (op, state) {
        (Snapshot, State::After) => 4,
        (FlattenInPlace, State::After) => 1,
        _ => 3,
    };
    assert_eq!(layers.len(), want_layers, "{what}: layers in state {state:?}\n{info}");
    if state == State::Before {
        assert!(!has_flag(&layers[0], "frozen"), "{what}: the image is frozen\n{info}");
    }
    // A snapshot killed after its rename leaves its intent record in the frozen layer, where
    // it is inert (spec §5.7.1: it only counts under the live name).
    if layers.len() > 1 {
        let parent = &layers[1];
        assert!(has_flag(parent, "frozen"), "{what}: the parent is not frozen\n{info}");
        assert!(op == Snapshot || !has_flag(parent, "snapshot-pending"), "{what}: parent\n{info}");
    }
    if state == State::After && op == FlattenRaw {
        assert!(same_bytes(&out, device), "{what}: out.img is there but differs from the device");
    }
    if state == State::After && op == FlattenCowdisk {
        let v = json_in(dir, &["info", "--json", "out.img"]);
        assert_eq!(v["layers"].as_array().unwrap().len(), 1, "{what}: out.img is not standalone");
        let c = run_in(dir, &["check", "out.img"]);
        assert_eq!(c.code, Some(0), "{what}: out.img\n{}", c.describe());
    }
    state
}

/// The merged device (and a cowdisk output) read whole through `cowdisk serve --read-only`:
/// byte for byte the device before the operation.
fn read_back(fx: &Fixture, dir: &Path, op: KillOp, what: &str) {
    let mut images = vec!["disk.cow"];
    if op == FlattenCowdisk && dir.join("out.img").exists() {
        images.push("out.img");
    }
    if let Some((name, off)) = served_difference(dir, &images, op.device(fx)) {
        panic!("{what}: {name} read through cowdisk serve differs from the device at byte {off}");
    }
}

fn same_bytes(p: &Path, want: &[u8]) -> bool {
    fs::read(p).is_ok_and(|b| b == want)
}

/// The command run again after a kill completes, or (an output that exists, a snapshot that
/// was made) refuses with one error line; then the final state, clean, without stray files,
/// and with `read` its device read back.
fn rerun_and_verify_final(fx: &Fixture, dir: &Path, op: KillOp, state: State, what: &str, read: bool) {
    let o = run_in(dir, op.args());
    if state == State::After && matches!(op, Snapshot | FlattenRaw | FlattenCowdisk) {
        assert_eq!(o.code, Some(1), "{what}: run again\n{}", o.describe());
        assert!(o.error_line().contains("already exists"), "{what}: run again\n{}", o.describe());
    } else {
        assert_eq!(o.code, Some(0), "{what}: run again in state {state:?}\n{}", o.describe());
        // The only thing it may say on stderr: that it removed what the killed run left.
        for line in o.stderr.lines() {
            assert!(line.contains("left by an interrupted"), "{what}: run again, it said: {line}");
        }
    }
    let what = format!("{what}, run again");
    assert_eq!(inspect(fx, dir, op, &what), State::After, "{what}");
    if read {
        read_back(fx, dir, op, &what);
    }
    let info = json_in(dir, &["info", "--json", "disk.cow"]);
    let layers = info["layers"].as_array().unwrap();
    if matches!(op, Snapshot | Commit) {
        assert_eq!(info["data_bytes"], 0, "{what}: the top is not empty");
    }
    assert!(!has_flag(&layers[0], "dirty") && !has_flag(&layers[0], "frozen"), "{what}: {info}");
    let c = run_in(dir, &["check", "--chain", "disk.cow"]);
    assert_eq!(c.code, Some(0), "{what}: check --chain\n{}", c.describe());
    let files: BTreeSet<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let want: BTreeSet<String> = op.final_files().into_iter().map(str::to_owned).collect();
    assert_eq!(files, want, "{what}: files left in the directory");
}

fn kill_test(op: KillOp) {
    let began = Instant::now();
    let fx = fixture();
    // Snapshot's syncs only cost something on a real disk; the others move hundreds of MiB,
    // which a kill -9 (unlike a power cut) leaves in the page cache: tmpfs keeps them fast.
    let ws = if op == Snapshot { Ws::new() } else { Ws::in_memory("ko") };
    // One uncut run: that it succeeds, and how long it takes here.
    let dir = ws.p("full");
    fresh_chain(&fx, op, &dir);
    let t = Instant::now();
    let o = run_in(&dir, op.args());
    let mut full = t.elapsed();
    let first_full = full;
    assert_eq!(o.code, Some(0), "{}", o.describe());
    rerun_and_verify_final(&fx, &dir, op, State::After, &format!("{op:?} uncut"), true);
    fs::remove_dir_all(&dir).unwrap();

    let mut rng = XorShift::new(op as u64 + 1);
    let mut states = Vec::new();
    let mut killed = 0;
    let kills = kills();
    for run in 0..kills {
        let dir = ws.p(&format!("r{run}"));
        fresh_chain(&fx, op, &dir);
        // Spread over the run: slot `run` of `kills`, at a pseudo-random point inside it.
        let frac = 0.02 + 0.9 * (run as f64 + (rng.next_u64() % 1000) as f64 / 1000.0) / kills as f64;
        let delay = full.mul_f64(frac);
        let start = Instant::now();
        let mut child = cowdisk_in(&dir, op.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut finished = None;
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                finished = Some(start.elapsed());
                break;
            }
            thread::sleep(Duration::from_micros(200));
        }
        // Spawning returns once the program runs, which may already be past `delay`.
        let at = start.elapsed();
        if finished.is_none() {
            child.kill().unwrap();
        }
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        match finished {
            // It ran faster than the uncut run: aim the later kills at this duration.
            Some(took) => full = full.min(took),
            None => killed += 1,
        }
        assert!(o.status.code().is_none() || o.status.success(), "{op:?} failed on its own: {}\n{stderr}", o.status);
        let what = format!("{op:?} killed after {at:?}");
        let found = inspect(&fx, &dir, op, &what);
        let mut state = found;
        // Serving the image finishes a decided snapshot, so every other snapshot runs again
        // on exactly what the kill left, and has its device read once that is done.
        let read_first = op != Snapshot || run % 2 == 0;
        if read_first {
            read_back(&fx, &dir, op, &what);
            state = inspect(&fx, &dir, op, &format!("{what}, served"));
        }
        rerun_and_verify_final(&fx, &dir, op, state, &what, !read_first || run % 2 == 1);
        states.push(format!("{:.1}ms:{found:?}", at.as_secs_f64() * 1000.0));
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "{op:?}: uncut run {first_full:?}; {killed}/{kills} killed mid-run; test took {:?}; killed at:state {states:?}",
        began.elapsed()
    );
    assert!(killed >= kills / 2, "{op:?}: only {killed} of {kills} runs were still running when killed");
}

#[test]
fn kill_9_during_snapshot_leaves_the_image_before_or_decided_or_after_and_a_rerun_completes_it() {
    kill_test(Snapshot);
}

#[test]
fn kill_9_during_flatten_in_place_leaves_the_chain_before_or_after_never_broken() {
    kill_test(FlattenInPlace);
}

#[test]
fn kill_9_during_flatten_to_a_raw_file_leaves_no_output_or_a_complete_one() {
    kill_test(FlattenRaw);
}

#[test]
fn kill_9_during_flatten_to_a_cowdisk_file_leaves_no_output_or_a_complete_one() {
    kill_test(FlattenCowdisk);
}

#[test]
fn kill_9_during_commit_leaves_the_device_unchanged_and_the_chain_intact() {
    kill_test(Commit);
}

#[test]
fn kill_9_during_check_repair_leaves_the_leaks_or_reclaims_them_and_never_damages_the_image() {
    kill_test(Repair);
}
