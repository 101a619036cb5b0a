//! Background jobs on a running `cowdisk serve`, through the binary: commit, compaction and
//! flatten run while fio writes and verifies on two connections; a job killed with SIGKILL or
//! stopped by SIGTERM half-way leaves a chain that reads the same and that the same command
//! run again finishes; a command following its job says so when the server dies or stops
//! under it; jobs are listed, cancelled, and one at a time per chain; a snapshot asked at the
//! same moment as a job is taken whole or refused, never half-done; `export remove` waits for
//! no job but refuses or (forced) cancels it; a live commit that must be refused leaves the
//! chain as an offline one does.

mod common;

use common::cli::*;
use common::live::Live;
use common::*;
use serde_json::Value;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const SIZE: u64 = 48 << 20;

/// Fills the chain of `live` with data in three layers: writes, a snapshot, writes, a
/// snapshot, writes (so a commit, a compaction and a flatten each have work to do).
fn layered(live: &Live) {
    let mut c = live.client();
    for (k, snap) in [(0u64, Some("s1.cow")), (1, Some("s2.cow")), (2, None)] {
        for i in 0..24u64 {
            let off = ((i * 2_654_435_761 + k * 977) % (SIZE / 65536 - 2)) * 65536 + 512 * (i % 9);
            c.write(off, &random_bytes(40_000 + (i as usize % 5) * 20_000, k << 32 | i)).unwrap();
        }
        c.flush().unwrap();
        if let Some(s) = snap {
            live.snapshot(s);
        }
    }
}

/// The whole device, read through a new connection.
fn device(live: &Live) -> Vec<u8> {
    let mut c = live.client();
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(4 << 20) {
        out.extend(c.read(off, 4 << 20).unwrap());
    }
    out
}

fn layers(ws: &Ws) -> Vec<String> {
    ws.info("disk.cow")["layers"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap().to_string()).collect()
}

fn jobs(live: &Live) -> Vec<Value> {
    live.ws.json(&["jobs", "--json", "--control", s(&live.ctl)]).as_array().cloned().unwrap_or_default()
}

/// `cowdisk commit disk.cow --force --rate 256K`, followed (not detached: the command waits
/// for the job and reports how it ended), in a thread; returns once the job has run 300 ms.
fn slow_commit_under_way(live: &Live) -> std::thread::JoinHandle<Out> {
    let (dir, ctl) = (live.ws.dir().to_path_buf(), live.ctl.clone());
    let follower = std::thread::spawn(move || {
        run_in(&dir, &["commit", "disk.cow", "--force", "--rate", "256K", "--control", s(&ctl)])
    });
    let t = Instant::now();
    while jobs(live).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "the job did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    follower
}

#[test]
fn commit_compaction_and_flatten_run_while_fio_writes_and_verifies() {
    if !require_tool("fio") {
        return;
    }
    let live = Live::start(SIZE);
    layered(&live);
    let fio = live.fio_on_two_connections("jobs");
    let ctl = s(&live.ctl);
    let out = live.ws.ok(&["commit", "disk.cow", "--force", "--control", ctl]);
    assert!(out.contains("(live)"), "{out}");
    let out = live.ws.ok(&["compact", "disk.cow", "merged.cow", "--control", ctl]);
    assert!(out.contains("merged the layers"), "{out}");
    let out = live.ws.ok(&["flatten", "disk.cow", "--control", ctl]);
    assert!(out.contains("(live)"), "{out}");
    let running_at_end = !fio.is_finished();
    let text = fio.join().expect("fio failed while the jobs ran");
    assert!(text.contains("WRITE:"), "{text}");
    eprintln!("fio was {} running when the last job ended", if running_at_end { "still" } else { "no longer" });
    let done: Vec<String> = jobs(&live).iter().map(|j| format!("{} {}", j["kind"], j["state"])).collect();
    assert_eq!(done, ["\"commit\" \"completed\"", "\"compact\" \"completed\"", "\"flatten\" \"completed\""]);
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    assert_eq!(layers(&ws), ["disk.cow"]);
    let c = ws.run(&["check", "--chain", "--deep", "disk.cow"]);
    assert_eq!(c.code, Some(0), "{}", c.describe());
}

/// Runs `args` (a job) detached and slowed down, kills the server at `after`, and returns
/// whether the job had finished by then.
fn start_then_kill(live: &mut Live, args: &[&str], after: Duration) -> bool {
    live.ws.ok(args);
    std::thread::sleep(after);
    let finished = jobs(live).iter().all(|j| j["state"] != "running");
    live.server.daemon().kill9();
    finished
}

#[test]
fn a_job_killed_half_way_leaves_the_same_disk_and_the_same_command_finishes_it() {
    for (kind, args, k) in [
        ("commit", &["commit", "disk.cow", "--force"][..], 0u64),
        ("compact", &["compact", "disk.cow", "merged.cow"][..], 1),
        ("flatten", &["flatten", "disk.cow"][..], 2),
        ("commit", &["commit", "disk.cow", "--force"][..], 3),
    ] {
        let mut live = Live::start(SIZE);
        layered(&live);
        let before = device(&live);
        let ctl = live.ctl.clone();
        let mut detached: Vec<&str> = args.to_vec();
        detached.extend(["--detach", "--rate", "2M", "--control", s(&ctl)]);
        let after = Duration::from_millis(150 + 350 * k);
        let finished = start_then_kill(&mut live, &detached, after);
        eprintln!("{kind}: killed after {after:?} ({})", if finished { "it had finished" } else { "half-way" });
        // The chain opens and reads the same, and has nothing worse than leaked space.
        let c = live.ws.run(&["check", "--chain", "disk.cow"]);
        assert!(matches!(c.code, Some(0 | 3)), "{kind} after the kill: {}", c.describe());
        let sock = live.ws.p("nbd.sock");
        live.server = Server::start(&[s(&live.ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
        assert_bytes_eq(&device(&live), &before, &format!("{kind} killed half-way"));
        // The same command, run again, finishes the work.
        let mut again: Vec<&str> = args.to_vec();
        again.extend(["--control", s(&ctl)]);
        if kind == "compact" && live.ws.p("merged.cow").exists() {
            // It finished before the kill: the chain already stands on the merged layer.
            assert!(layers(&live.ws).iter().any(|l| l.ends_with("merged.cow")));
        } else {
            // Finishing may say it removed what the killed run left (a compaction's temporary
            // file), and nothing else.
            let o = live.ws.run(&again);
            assert_eq!(o.code, Some(0), "{kind} run again: {}", o.describe());
            assert!(
                o.stderr.lines().all(|l| l.contains("left by an interrupted compact")),
                "{kind} run again: {}",
                o.describe()
            );
        }
        assert_bytes_eq(&device(&live), &before, &format!("{kind} finished after the kill"));
        let names = layers(&live.ws);
        match kind {
            "flatten" => assert_eq!(names, ["disk.cow"]),
            "compact" => assert_eq!(names.len(), 3, "{names:?}"),
            _ => assert!(names.iter().all(|n| !n.contains(".commit-")), "{names:?}"),
        }
        let Live { server, ws, .. } = live;
        assert!(server.stop().success());
        let c = ws.run(&["check", "--chain", "disk.cow"]);
        assert_eq!(c.code, Some(0), "{kind}: {}", c.describe());
    }
}

#[test]
fn jobs_are_listed_cancelled_and_run_one_at_a_time() {
    let live = Live::start(SIZE);
    layered(&live);
    let before = device(&live);
    let (ws, ctl) = (&live.ws, s(&live.ctl));
    let out = ws.ok(&["commit", "disk.cow", "--force", "--detach", "--rate", "4M", "--control", ctl]);
    assert!(out.starts_with("job 1 started"), "{out}");
    let j = &jobs(&live)[0];
    assert_eq!(
        (j["kind"].as_str(), j["state"].as_str(), j["rate"].as_u64()),
        (Some("commit"), Some("running"), Some(4 << 20))
    );
    // One job per chain, and no snapshot meanwhile.
    ws.fail(&["flatten", "disk.cow", "--control", ctl], &["in use", "a commit job is running"]);
    ws.fail(&["snapshot", "disk.cow", "x.cow", "--control", ctl], &["in use", "a commit job is running"]);
    ws.ok(&["jobs", "cancel", "1", "--control", ctl]);
    let t = Instant::now();
    while jobs(&live)[0]["state"] == "running" {
        assert!(t.elapsed() < Duration::from_secs(10), "the job did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(jobs(&live)[0]["state"], "cancelled");
    assert!(ws.ok(&["jobs", "--control", ctl]).contains("commit"));
    assert_bytes_eq(&device(&live), &before, "after the cancelled commit");
    // What it had copied into the parent is given back: no space leaked.
    let c = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(c.code, Some(0), "after the cancelled commit: {}", c.describe());
    // Cancelled, it left its intermediate layer; the next commit starts from it, and then
    // commits what was written since, as asked: the image is left empty. (It used to commit
    // the intermediate layer alone, leave what was written since in the image, and say it had
    // committed it.)
    assert!(layers(ws).iter().any(|l| l.contains(".commit-")), "{:?}", layers(ws));
    let mut c = live.client();
    c.write(40 << 20, &random_bytes(1 << 20, 0xb)).unwrap();
    c.flush().unwrap();
    drop(c);
    let before = device(&live);
    ws.ok(&["commit", "disk.cow", "--force", "--control", ctl]);
    assert!(layers(ws).iter().all(|l| !l.contains(".commit-")), "{:?}", layers(ws));
    assert_eq!(ws.info("disk.cow")["layers"][0]["data_bytes"], 0, "the image still holds data: {:?}", layers(ws));
    assert_bytes_eq(&device(&live), &before, "after the commit run again");
    let Live { server, .. } = live;
    assert!(server.stop().success());
}

#[test]
fn export_remove_is_refused_while_a_job_runs_and_with_force_cancels_it_first() {
    // Served by a relative path (as `cowdisk serve disk.cow` is): the job knows its image by
    // that path, the export by the canonical one; the removal must see the job all the same.
    let live = Live::start_relative(SIZE);
    layered(&live);
    let before = device(&live);
    let (ws, ctl) = (&live.ws, s(&live.ctl));
    ws.ok(&["commit", "disk.cow", "--force", "--detach", "--rate", "2M", "--control", ctl]);
    assert_eq!(jobs(&live)[0]["state"], "running");
    ws.fail(&["export", "remove", "disk", "--control", ctl], &["in use", "commit job is running", "--force"]);
    assert_eq!(jobs(&live)[0]["state"], "running", "a refused removal leaves the job alone");
    assert_bytes_eq(&device(&live), &before, "the export after the refused removal");
    ws.ok(&["export", "remove", "disk", "--force", "--control", ctl]);
    assert_eq!(jobs(&live)[0]["state"], "cancelled", "the forced removal cancels the job first");
    // The cancelled job gave back what it had copied: nothing leaks, and the chain reads the same.
    let c = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(c.code, Some(0), "after the forced removal: {}", c.describe());
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    let out = ws.p("after.raw");
    ws.ok(&["flatten", "disk.cow", "--output", s(&out), "--format", "raw"]);
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &before, "the image after the forced removal");
}

#[test]
fn a_live_commit_that_must_be_refused_changes_nothing_like_an_offline_one() {
    // A top larger than its cowdisk parent: commit would have to grow the parent.
    let ws = Ws::in_memory("refused");
    ws.create("p0.cow", &["--size", "16M"]);
    ws.ok(&["snapshot", "p0.cow", "p.cow"]);
    ws.create("disk.cow", &["--backing", "p.cow", "--size", "32M"]);
    ws.fail(&["commit", "disk.cow", "--force"], &["larger than its parent", "disk.cow"]);
    let before = layers(&ws);
    let (sock, ctl) = (ws.p("nbd.sock"), ws.p("ctl.sock"));
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    c.write(0, &random_bytes(65536, 5)).unwrap();
    c.flush().unwrap();
    for _ in 0..2 {
        ws.fail(&["commit", "disk.cow", "--force", "--control", s(&ctl)], &["larger than its parent"]);
        assert_eq!(layers(&ws), before, "a refused live commit left the chain as it was");
    }
    drop(c);
    assert!(server.stop().success());
    let c = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(c.code, Some(0), "after the refused commits: {}", c.describe());
}

#[test]
fn sigterm_during_a_job_stops_it_at_a_safe_point_and_the_server_exits_cleanly() {
    let live = Live::start(SIZE);
    layered(&live);
    let before = device(&live);
    let Live { server, ws, ctl, base } = live;
    ws.ok(&["flatten", "disk.cow", "--detach", "--rate", "4M", "--control", s(&ctl)]);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert!(server.stop().success(), "the server did not exit cleanly");
    assert!(t.elapsed() < Duration::from_secs(5), "stopping took {:?}", t.elapsed());
    let c = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(c.code, Some(0), "{}", c.describe());
    let sock = ws.p("nbd.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
    let live = Live { server, ws, ctl, base };
    assert_bytes_eq(&device(&live), &before, "after the stopped flatten");
    live.ws.ok(&["flatten", "disk.cow", "--control", s(&live.ctl)]);
    assert_eq!(layers(&live.ws), ["disk.cow"]);
    assert_bytes_eq(&device(&live), &before, "after the flatten run again");
}

#[test]
fn a_followed_job_whose_server_dies_or_stops_says_so_and_the_command_run_again_finishes_it() {
    // kill -9, then SIGTERM (which cancels the job before the server exits).
    for kill in [true, false] {
        let mut live = Live::start(SIZE);
        layered(&live);
        let before = device(&live);
        let follower = slow_commit_under_way(&live);
        let sock = live.ws.p("nbd.sock");
        if kill {
            live.server.daemon().kill9();
        } else {
            let Live { server, ws, ctl, base } = live;
            assert!(server.stop().success(), "the server did not exit cleanly");
            let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
            live = Live { server, ws, ctl, base };
        }
        let o = follower.join().expect("follower thread");
        assert_eq!(o.code, Some(1), "{}", o.describe());
        let line = o.error_line();
        // At SIGTERM the server cancels the job and closes the control channel: the command
        // sees whichever comes first.
        let stopped = line.contains("the server stopped while job 1 (commit) was running");
        let cancelled = line.contains("job 1 (commit) was cancelled") && line.contains("its server stopping");
        assert!(stopped || (!kill && cancelled), "{}", o.describe());
        assert!(line.contains("running the command again finishes it"), "{}", o.describe());
        if kill {
            live.server = Server::start(&[s(&live.ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&live.ctl)]);
        }
        assert_bytes_eq(&device(&live), &before, "after the interrupted commit");
        live.ws.ok(&["commit", "disk.cow", "--force", "--control", s(&live.ctl)]);
        assert!(layers(&live.ws).iter().all(|l| !l.contains(".commit-")), "{:?}", layers(&live.ws));
        assert_bytes_eq(&device(&live), &before, "after the commit run again");
        let Live { server, .. } = live;
        assert!(server.stop().success());
    }
}

/// `cowdisk ARGS` in `dir`, killed if it has not ended within 30 s (a command that waits for
/// ever fails the test instead of hanging it); how it ended and how long it took.
fn run_within(dir: &std::path::Path, args: &[&str]) -> (Out, Duration) {
    let mut cmd = std::process::Command::new("timeout");
    cmd.args(["-k", "5", "30"]).arg(cowdisk_bin()).args(args).current_dir(dir);
    let t = Instant::now();
    let output = run_status(&mut cmd);
    (out_of(&cmd, output), t.elapsed())
}

/// A live snapshot waits for a write in flight whose client stopped sending its payload.
/// Meanwhile an `export remove` of that export is refused at once, saying why (it used to wait
/// as long as the client, holding up every other export change of the server), another export
/// is added, and `export remove --force` disconnects the client, which ends the snapshot's
/// wait: it returns, the snapshot command with it, and the image checks clean.
#[test]
fn a_snapshot_stalled_by_a_client_holds_up_no_export_change() {
    use common::nbdclient::NBD_CMD_WRITE;
    let live = Live::start(SIZE);
    let (ws, ctl) = (&live.ws, s(&live.ctl).to_string());
    let mut a = live.client();
    let data = random_bytes(1 << 20, 0x5a);
    a.send_request(0, NBD_CMD_WRITE, 0xa, 2 << 20, 1 << 20, &data[..4096]).expect("a write's first 4 KiB");
    std::thread::sleep(Duration::from_millis(200));
    let snap = {
        let (dir, ctl) = (ws.dir().to_path_buf(), ctl.clone());
        std::thread::spawn(move || run_within(&dir, &["snapshot", "disk.cow", "snap.cow", "--control", &ctl]))
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!snap.is_finished(), "the snapshot did not wait for the write in flight");
    let (o, took) = run_within(ws.dir(), &["export", "remove", "disk", "--control", &ctl]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.error_line().contains("in use: a snapshot of this chain is being taken"), "{}", o.describe());
    assert!(took < Duration::from_secs(10), "the refusal took {took:?}");
    ws.create("other.cow", &["--size", "1M"]);
    let (o, _) = run_within(ws.dir(), &["export", "add", "other.cow", "--control", &ctl]);
    assert_eq!(o.code, Some(0), "export add beside the stalled snapshot: {}", o.describe());
    let (o, _) = run_within(ws.dir(), &["export", "remove", "disk", "--force", "--control", &ctl]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let (sn, _) = snap.join().expect("the snapshot command");
    assert!(sn.code.is_some(), "the snapshot command was killed: {}", sn.describe());
    a.set_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(!a.read_response().is_ok_and(|r| r.is_ok()), "the write whose payload never came was acknowledged");
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    let c = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(c.code, Some(0), "{}", c.describe());
}

/// An offline `commit` of an image whose live commit was interrupted (the server killed):
/// it finishes the interrupted commit (the intermediate layer goes into the parent) and then
/// commits what the image holds, written after the interruption, so that the image is the
/// empty overlay the command says it is. Before 2026-12-04 it did only the first (found by a
/// review).
#[test]
fn an_offline_commit_after_an_interrupted_live_one_leaves_the_image_empty() {
    let mut live = Live::start(SIZE);
    layered(&live);
    let follower = slow_commit_under_way(&live);
    live.server.daemon().kill9();
    assert_eq!(follower.join().expect("follower thread").code, Some(1));
    // Written after the interruption, into the image on the intermediate layer.
    let sock = live.ws.p("nbd.sock");
    live.server = Server::start(&[s(&live.ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&live.ctl)]);
    live.client().write(4096, &random_bytes(65536, 77)).unwrap();
    let before = device(&live);
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    assert!(ws.info("disk.cow")["layers"][1]["path"].as_str().unwrap().contains(".commit-"), "{:?}", layers(&ws));
    let out = ws.ok(&["commit", "disk.cow", "--force"]);
    assert!(out.contains("it is now an empty overlay"), "{out}");
    let info = ws.info("disk.cow");
    assert_eq!(info["layers"][0]["data_bytes"], 0, "the image still holds data: {info}");
    assert!(layers(&ws).iter().all(|l| !l.contains(".commit-")), "{:?}", layers(&ws));
    assert_bytes_eq(&ws.device("disk.cow"), &before, "after the offline commit");
}

/// A snapshot and a job asked for at the same moment, round after round, with a client
/// writing between rounds: the job always runs (a job asked during a snapshot waits for it),
/// and the snapshot is either taken whole, holding every acknowledged write, or refused
/// because the job runs, leaving no file. The disk reads what was written throughout, and the
/// chain checks clean at the end.
#[test]
fn a_snapshot_racing_a_job_start_is_taken_whole_or_refused() {
    let live = Live::start(SIZE);
    let mut model = live.base.clone();
    let mut c = live.client();
    let ctl = s(&live.ctl).to_string();
    let (mut taken, mut refused) = (0, 0);
    for round in 0..9u64 {
        // Two new cowdisk layers below the top each round, so that every kind of job has
        // work to do (a compaction needs two, a commit one).
        for k in 0..2u64 {
            for i in 0..6u64 {
                let off = ((round * 7919 + k * 131 + i * 2_654_435_761) % (SIZE / 65536 - 2)) * 65536 + 512 * i;
                let data = random_bytes(20_000 + 9_000 * i as usize, round << 40 | k << 32 | i);
                c.write(off, &data).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            c.flush().unwrap();
            live.snapshot(&format!("p{round}-{k}.cow"));
        }
        let (kind, mut job): (&str, Vec<String>) = match round % 3 {
            0 => ("commit", vec!["commit".into(), "disk.cow".into(), "--force".into()]),
            1 => ("compact", vec!["compact".into(), "disk.cow".into(), format!("m{round}.cow")]),
            _ => ("flatten", vec!["flatten".into(), "disk.cow".into()]),
        };
        job.extend(["--control".into(), ctl.clone()]);
        let snap = format!("r{round}.cow");
        let ask = vec!["snapshot".into(), "disk.cow".into(), snap.clone(), "--control".into(), ctl.clone()];
        // Both at once, or one of them 2 ms behind the other.
        let (snap_delay, job_delay) = [(0, 0), (2, 0), (0, 2)][(round / 3) as usize];
        let barrier = Arc::new(Barrier::new(2));
        let start = |args: Vec<String>, delay: u64| {
            let (dir, b) = (live.ws.dir().to_path_buf(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                std::thread::sleep(Duration::from_millis(delay));
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                run_in(&dir, &a)
            })
        };
        let (j, sn) = (start(job, job_delay), start(ask, snap_delay));
        let (j, sn) = (j.join().expect("job command"), sn.join().expect("snapshot command"));
        assert_eq!(j.code, Some(0), "round {round}, {kind}: {}", j.describe());
        if sn.code == Some(0) {
            taken += 1;
            assert!(sn.stdout.contains("clients paused"), "round {round}: {}", sn.describe());
            assert_bytes_eq(&live.snapshot_bytes(&snap), &model, &format!("round {round}: snapshot beside a {kind}"));
        } else {
            refused += 1;
            let line = sn.error_line();
            assert!(line.contains("in use") && line.contains(&format!("a {kind} job is running")), "{}", sn.describe());
            assert!(!live.ws.p(&snap).exists(), "round {round}: a refused snapshot left {snap}");
        }
        assert_bytes_eq(&device(&live), &model, &format!("round {round}: after the {kind} and the snapshot"));
    }
    eprintln!("snapshots taken beside a job: {taken}; refused because the job ran: {refused}");
    assert!(jobs(&live).iter().all(|j| j["state"] == "completed"), "{:?}", jobs(&live));
    drop(c);
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    let c = ws.run(&["check", "--chain", "--deep", "disk.cow"]);
    assert_eq!(c.code, Some(0), "{}", c.describe());
}
