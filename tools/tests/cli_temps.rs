//! Temporary files of `create`, `flatten --output` and `commit`, through the binary: one a
//! killed run left behind never blocks the next run and is removed with a message naming it,
//! and concurrent runs never share one or replace each other's result.

mod common;

use common::cli::*;
use common::*;
use std::process::{Command, Stdio};

/// A process id no process can have (above the kernel's largest pid_max, 2^22).
const DEAD_PID: u32 = (1 << 22) + 1;

fn hidden_files(ws: &Ws) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(ws.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn a_temporary_file_left_by_a_killed_create_does_not_block_the_next_create() {
    let ws = Ws::new();
    // What a create killed between making its temporary file and renaming it leaves: the
    // fixed name of earlier versions (which made every later create fail with "File exists"),
    // and a unique name of a process that is gone.
    std::fs::write(ws.p(".d.cow.create.tmp"), b"half-written").unwrap();
    std::fs::write(ws.p(&format!(".d.cow.create.{DEAD_PID}-0.tmp")), b"half-written").unwrap();
    let o = ws.run(&["create", "d.cow", "--size", "1M"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.stdout, "created d.cow (1M, chunk size 64K)\n");
    for name in [".d.cow.create.tmp".to_string(), format!(".d.cow.create.{DEAD_PID}-0.tmp")] {
        // Named as the user named the image (here relative to the working directory).
        assert!(o.stderr.contains(&format!("removed {name}, ")), "{}", o.describe());
        assert!(o.stderr.contains("left by an interrupted create"), "{}", o.describe());
    }
    assert_eq!(hidden_files(&ws), Vec::<String>::new(), "temporary files left");
    assert_eq!(ws.info("d.cow")["virtual_size"], 1 << 20);
    // Another image's temporary files are not touched.
    std::fs::write(ws.p(&format!(".other.cow.create.{DEAD_PID}-0.tmp")), b"x").unwrap();
    ws.ok(&["create", "e.cow", "--size", "1M"]);
    assert_eq!(hidden_files(&ws), vec![format!(".other.cow.create.{DEAD_PID}-0.tmp")]);
}

#[test]
fn stale_temporary_files_of_flatten_and_commit_are_removed_and_do_not_block() {
    let ws = Ws::new();
    let model = three_layer_chain(&ws);
    std::fs::write(ws.p(".out.raw.flatten.tmp"), b"x").unwrap();
    std::fs::write(ws.p(&format!(".disk.cow.commit.{DEAD_PID}-7.tmp")), b"x").unwrap();
    let o = ws.run(&["flatten", "disk.cow", "--output", "out.raw", "--format", "raw"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("left by an interrupted flatten"), "{}", o.describe());
    assert_bytes_eq(&std::fs::read(ws.p("out.raw")).unwrap(), &model, "flattened output");
    // A compaction killed before its rename leaves a temporary file as big as the merged
    // layer; the next compaction into the same name removes it.
    std::fs::write(ws.p(&format!(".merged.cow.compact.{DEAD_PID}-0.tmp")), b"x").unwrap();
    ws.ok(&["snapshot", "disk.cow", "disk-2.cow"]);
    let o = ws.run(&["compact", "disk.cow", "merged.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("left by an interrupted compact"), "{}", o.describe());
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after compact");
    let o = ws.run(&["commit", "disk.cow", "--force"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("left by an interrupted commit"), "{}", o.describe());
    assert_eq!(hidden_files(&ws), Vec::<String>::new(), "temporary files left");
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after commit");
}

#[test]
fn concurrent_flattens_to_one_output_never_replace_each_other() {
    let ws = Ws::new();
    let model = three_layer_chain(&ws);
    for round in 0..4 {
        let out = format!("out{round}.cow");
        let start = || {
            ws.cmd(&["flatten", "disk.cow", "--output", &out])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (start(), start());
        let results: Vec<Out> =
            [a, b].into_iter().map(|c| out_of(&Command::new("flatten"), c.wait_with_output().unwrap())).collect();
        let won = results.iter().filter(|o| o.code == Some(0)).count();
        let all: Vec<String> = results.iter().map(Out::describe).collect();
        assert!(won >= 1, "neither flatten succeeded: {all:?}");
        for o in results.iter().filter(|o| o.code != Some(0)) {
            // The loser found the output there (before starting, or at its final rename).
            assert!(o.error_line().contains("already exists"), "{}", o.describe());
        }
        assert_bytes_eq(&ws.device(&out), &model, "the flattened output");
        assert_eq!(hidden_files(&ws), Vec::<String>::new(), "temporary files left");
    }
}

/// Ctrl-C (SIGINT) or SIGTERM in the middle of `flatten --output` removes the hidden
/// temporary file the copy was going into, and the process still ends by the signal (as a
/// shell expects). Before 2026-12-04 a full-size hidden file stayed behind until a later
/// flatten to the same output name swept it.
#[test]
fn an_interrupted_flatten_leaves_no_temporary_file() {
    use std::os::unix::process::ExitStatusExt;
    let ws = Ws::new();
    write_random_file(&ws.p("base.raw"), 384 << 20, 0x51);
    ws.create("d.cow", &["--backing", "base.raw"]);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = ws
            .cmd(&["flatten", "d.cow", "--output", "out.raw", "--format", "raw"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start flatten");
        let started = wait_until(std::time::Duration::from_secs(20), || {
            hidden_files(&ws).iter().any(|n| n.contains(".flatten."))
        });
        assert!(started, "no temporary file appeared");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().expect("wait for flatten");
        assert_eq!(status.signal(), Some(sig), "flatten was not ended by signal {sig}: {status:?}");
        assert_eq!(hidden_files(&ws), Vec::<String>::new(), "temporary files left after signal {sig}");
        assert!(!ws.p("out.raw").exists(), "an output appeared");
    }
}

/// A server killed (kill -9, a power cut) in the middle of a live snapshot leaves the
/// snapshot's temporary file behind (`.IMAGE.snapshot.PID-N.tmp`). Serving the image again
/// removes it, as the next snapshot would; one of a process still running stays. Before
/// 2026-12-05 it stayed until the next snapshot of that image.
#[test]
fn serving_an_image_again_removes_what_a_killed_live_snapshot_left() {
    let ws = Ws::new();
    ws.create("d.cow", &["--size", "1M"]);
    ws.create("e.cow", &["--size", "1M"]);
    let stale = format!(".d.cow.snapshot.{DEAD_PID}-0.tmp");
    let running = format!(".d.cow.snapshot.{}-0.tmp", std::process::id());
    let others = format!(".e.cow.snapshot.{DEAD_PID}-0.tmp");
    for name in [&stale, &running, &others] {
        std::fs::write(ws.p(name), b"half-made overlay").unwrap();
    }
    let snapshot_temps =
        || -> Vec<String> { hidden_files(&ws).into_iter().filter(|n| n.contains(".snapshot.")).collect() };
    let sock = ws.p("s.sock");
    let server = Server::start(&[ws.p("d.cow").to_str().unwrap(), "--socket", sock.to_str().unwrap()]);
    let mut left = vec![others.clone(), running.clone()];
    left.sort();
    assert_eq!(snapshot_temps(), left, "serving d.cow");
    drop(server);
    // Read-only, the image is not this server's to change: nothing is removed.
    let server = Server::start(&[ws.p("e.cow").to_str().unwrap(), "--read-only", "--socket", sock.to_str().unwrap()]);
    assert!(snapshot_temps().contains(&others), "a read-only server removed e.cow's");
    drop(server);
}
