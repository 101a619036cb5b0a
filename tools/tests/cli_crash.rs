//! kill -9 of `cowdisk flatten` and `cowdisk commit` at random moments: the chain is left as it was before or after the operation, never broken, and an output file is absent or complete.

mod common;

use std::fs::{self};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use common::cli::*;
use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Crash safety: kill -9 during flatten and commit
// ---------------------------------------------------------------------------

const CRASH_SIZE: u64 = 256 * MIB;
/// Kills per operation; `COWDISK_CLI_KILLS=N` runs more.
fn kills() -> usize {
    std::env::var("COWDISK_CLI_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

/// A pristine chain disk-0.cow (frozen, lots of scattered data) <- disk.cow (more scattered
/// data and zeros), and `ref.raw`, its merged device. Shared by the crash tests while any
/// of them runs, then removed.
struct CrashFixture {
    ws: Ws,
}

static CRASH_FIXTURE: Mutex<Weak<CrashFixture>> = Mutex::new(Weak::new());

fn crash_fixture() -> Arc<CrashFixture> {
    let mut slot = CRASH_FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = slot.upgrade() {
        return f;
    }
    let t = Instant::now();
    let ws = Ws::in_memory("crash-fixture");
    ws.create("disk.cow", &["--size", "256M"]);
    let lower = scattered(0xc0ffee, 14000, CRASH_SIZE, 4 * KIB, 12 * KIB);
    ws.serve_write("disk.cow", &lower);
    ws.ok(&["snapshot", "disk.cow", "disk-0.cow"]);
    let mut upper = scattered(0xbeef, 10000, CRASH_SIZE, 4 * KIB, 8 * KIB);
    let mut rng = XorShift::new(5);
    for _ in 0..80 {
        let off = (rng.next_u64() % (CRASH_SIZE / MIB)) * MIB;
        upper.push(Op::Zero(off, 64 * KIB));
    }
    ws.serve_write("disk.cow", &upper);
    ok_in(ws.dir(), &["flatten", "disk.cow", "--output", "ref.raw", "--format", "raw"]);
    {
        let mut model = vec![0u8; CRASH_SIZE as usize];
        apply(&mut model, &lower);
        apply(&mut model, &upper);
        let got = fs::read(ws.p("ref.raw")).unwrap();
        assert_bytes_eq(&got, &model, "crash fixture reference");
    }
    let v = ws.info("disk.cow");
    eprintln!(
        "crash fixture: parent {} data bytes, top {} data bytes, built in {:?}",
        v["layers"][1]["data_bytes"],
        v["layers"][0]["data_bytes"],
        t.elapsed()
    );
    let f = Arc::new(CrashFixture { ws });
    *slot = Arc::downgrade(&f);
    f
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum CrashOp {
    FlattenInPlace,
    FlattenOutput,
    Commit,
}

impl CrashOp {
    fn args(self, run: usize) -> Vec<&'static str> {
        match self {
            CrashOp::FlattenInPlace => vec!["flatten", "disk.cow"],
            CrashOp::FlattenOutput if run.is_multiple_of(2) => {
                vec!["flatten", "disk.cow", "--output", "out.img", "--format", "raw"]
            }
            CrashOp::FlattenOutput => {
                vec!["flatten", "disk.cow", "--output", "out.img", "--format", "cowdisk"]
            }
            CrashOp::Commit => vec!["commit", "disk.cow", "--force"],
        }
    }
}

/// Copies the pristine chain into a fresh directory.
fn fresh_chain(fx: &CrashFixture, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for n in ["disk.cow", "disk-0.cow"] {
        copy_sparse(&fx.ws.p(n), &dir.join(n));
    }
}

/// Verifies what a user may rely on after the operation was killed (or finished): returns
/// "before" or "after".
fn verify_after_kill(fx: &CrashFixture, dir: &Path, op: CrashOp, run: usize) -> &'static str {
    let reference = fx.ws.p("ref.raw");
    // The chain opens.
    let info = run_in(dir, &["info", "--json", "disk.cow"]);
    assert_eq!(info.code, Some(0), "chain does not open\n{}", info.describe());
    let v: Value = serde_json::from_str(&info.stdout).unwrap();
    // No corruption anywhere in the chain (leaks allowed).
    let c = run_in(dir, &["check", "--chain", "disk.cow"]);
    assert!(c.code == Some(0) || c.code == Some(3), "check --chain after kill\n{}", c.describe());
    // The merged device is unchanged.
    let out = unique(".dev", "raw");
    ok_in(dir, &["flatten", "disk.cow", "--output", &out, "--format", "raw"]);
    assert!(same_file_bytes(&dir.join(&out), &reference), "{op:?} run {run}: merged device differs from before");
    fs::remove_file(dir.join(&out)).unwrap();
    let layers = v["layers"].as_array().unwrap().len();
    match op {
        CrashOp::FlattenInPlace => {
            assert!(
                same_file_bytes(&dir.join("disk-0.cow"), &fx.ws.p("disk-0.cow")),
                "flatten in place wrote into the frozen parent"
            );
            match layers {
                2 => "before",
                1 => "after",
                n => panic!("{n} layers after flatten"),
            }
        }
        CrashOp::FlattenOutput => {
            assert_eq!(layers, 2);
            let o = dir.join("out.img");
            if !o.exists() {
                return "before";
            }
            if run.is_multiple_of(2) {
                assert!(same_file_bytes(&o, &reference), "out.img is incomplete");
            } else {
                let c = run_in(dir, &["check", "out.img"]);
                assert_eq!(c.code, Some(0), "{}", c.describe());
                let v = serde_json::from_str::<Value>(&ok_in(dir, &["info", "--json", "out.img"])).unwrap();
                assert_eq!(v["layers"].as_array().unwrap().len(), 1);
                ok_in(dir, &["flatten", "out.img", "--output", "out.raw", "--format", "raw"]);
                assert!(same_file_bytes(&dir.join("out.raw"), &reference), "out.img differs");
            }
            "after"
        }
        CrashOp::Commit => {
            assert_eq!(layers, 2);
            assert_eq!(v["layers"][1]["flags"][0], json!("frozen"));
            if v["layers"][0]["data_bytes"] == json!(0) {
                "after"
            } else {
                "before"
            }
        }
    }
}

fn crash_test(op: CrashOp) {
    let fx = crash_fixture();
    let ws = Ws::in_memory(&test_name());
    // One uncut run: that it succeeds, and roughly how long it takes here.
    let dir = ws.p("full");
    fresh_chain(&fx, &dir);
    let t = Instant::now();
    ok_in(&dir, &op.args(0));
    let mut full = t.elapsed();
    let first_full = full;
    assert_eq!(verify_after_kill(&fx, &dir, op, 0), "after");
    fs::remove_dir_all(&dir).unwrap();

    let mut rng = XorShift::new(op as u64 + 1);
    let mut states = Vec::new();
    let mut killed = 0;
    let kills = kills();
    for run in 0..kills {
        let dir = ws.p(&format!("run{run}"));
        fresh_chain(&fx, &dir);
        // Spread over the run: slot `run` of `kills`, at a pseudo-random point inside it.
        let frac = 0.02 + 0.88 * (run as f64 + (rng.next_u64() % 1000) as f64 / 1000.0) / kills as f64;
        let delay = full.mul_f64(frac);
        let start = Instant::now();
        let mut child = cowdisk_in(&dir, &op.args(run))
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
            thread::sleep(Duration::from_micros(500));
        }
        if finished.is_none() {
            child.kill().unwrap();
        }
        let o = child.wait_with_output().unwrap();
        match finished {
            Some(took) => {
                assert!(
                    o.status.success(),
                    "{op:?} failed on its own: {}\n{}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
                // It ran faster than the uncut run: aim the later kills at this duration.
                full = full.min(took);
            }
            None => {
                assert!(
                    o.status.code().is_none() || o.status.success(),
                    "{op:?}: {}\n{}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
                killed += 1;
            }
        }
        let state = verify_after_kill(&fx, &dir, op, run);
        // Every other time, the operation is run again after the crash: it completes, and
        // leaves a clean chain (what the crash leaked is reclaimed by the writable open).
        if state == "before" && run % 2 == 1 {
            let again = run_in(&dir, &op.args(run));
            assert_eq!(again.code, Some(0), "the re-run after the crash\n{}", again.describe());
            // The only thing it may say on stderr: that it removed what the killed run left.
            for line in again.stderr.lines() {
                assert!(line.contains("left by an interrupted"), "the re-run said: {line}");
            }
            assert_eq!(verify_after_kill(&fx, &dir, op, run), "after");
            let c = run_in(&dir, &["check", "--chain", "disk.cow"]);
            assert_eq!(c.code, Some(0), "after the re-run\n{}", c.describe());
        }
        states.push(format!("{:.0}ms:{state}", delay.as_secs_f64() * 1000.0));
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{op:?}: uncut run {first_full:?}; {killed}/{kills} killed mid-run; kill delay:state {states:?}");
    assert!(
        killed >= kills / 2,
        "{op:?}: only {killed} of {kills} runs were still running when killed (uncut run {first_full:?})"
    );
}

#[test]
fn kill_9_during_flatten_in_place_leaves_the_chain_before_or_after_never_broken() {
    crash_test(CrashOp::FlattenInPlace);
}

#[test]
fn kill_9_during_flatten_to_output_leaves_no_output_or_a_complete_one() {
    crash_test(CrashOp::FlattenOutput);
}

#[test]
fn kill_9_during_commit_leaves_the_device_unchanged_and_the_chain_intact() {
    crash_test(CrashOp::Commit);
}
