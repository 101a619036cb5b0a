//! Live operations on a running `cowdisk serve`, through the binary and real clients: snapshots
//! taken while clients write (each holds exactly what they had acknowledged; fio's verify
//! passes; an ext4 mounted on the export keeps working and a snapshot of it mounts), exports
//! added, listed and removed while the server runs, and the control channel's refusals.

mod common;

use common::cli::*;
use common::live::{Ctl, Live};
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const BLOCK: u64 = 4096;

/// One acknowledged write: the block it left behind, and when it was called and answered.
struct Acked {
    called: u64,
    returned: u64,
    block: u64,
    content: Vec<u8>,
}

#[test]
fn twenty_live_snapshots_each_hold_exactly_what_clients_had_acknowledged() {
    const SIZE: u64 = 16 << 20;
    let live = Live::start(SIZE);
    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    // Two connections; connection t owns the blocks b with b % 2 == t, so each block's writes
    // are ordered. Some writes cover part of a block (the server copies the rest up).
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let mut c = live.client();
            let (clock, stop, acked) = (clock.clone(), stop.clone(), acked.clone());
            let mut model = live.base.clone();
            std::thread::spawn(move || {
                let mut rng = XorShift::new(t + 7);
                while !stop.load(Ordering::Relaxed) {
                    let block = rng.next_u64() % (SIZE / BLOCK / 2) * 2 + t;
                    let (off, len) = match rng.next_u64() % 3 {
                        0 => (block * BLOCK + 512 * (rng.next_u64() % 7), 512),
                        _ => (block * BLOCK, BLOCK),
                    };
                    let data = random_bytes(len as usize, rng.next_u64());
                    let called = clock.fetch_add(1, Ordering::SeqCst);
                    c.write(off, &data).expect("a write failed during live snapshots");
                    if rng.next_u64().is_multiple_of(8) {
                        c.flush().expect("a flush failed during live snapshots");
                    }
                    let returned = clock.fetch_add(1, Ordering::SeqCst);
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    let b = (block * BLOCK) as usize;
                    let content = model[b..b + BLOCK as usize].to_vec();
                    acked.lock().unwrap().push(Acked { called, returned, block, content });
                }
            })
        })
        .collect();
    let mut snaps = Vec::new();
    let mut longest: f64 = 0.0;
    for k in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let name = format!("snap{k:02}.cow");
        let called = clock.fetch_add(1, Ordering::SeqCst);
        longest = longest.max(live.snapshot(&name));
        let returned = clock.fetch_add(1, Ordering::SeqCst);
        snaps.push((name, called, returned));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap();
    eprintln!("{} writes acknowledged during 20 live snapshots; longest pause {longest:.1} ms", acked.len());
    assert!(acked.len() > 200, "only {} writes", acked.len());
    // Per block: the last write acknowledged before the snapshot was asked for, or a write
    // that was in flight while it ran; nothing that began after it returned.
    for (name, called, returned) in &snaps {
        let dev = live.snapshot_bytes(name);
        for b in 0..SIZE / BLOCK {
            let got = &dev[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let writes: Vec<&Acked> = acked.iter().filter(|w| w.block == b).collect();
            let before = writes.iter().rev().find(|w| w.returned < *called);
            let mut allowed =
                vec![before.map_or(&live.base[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize], |w| &w.content[..])];
            allowed
                .extend(writes.iter().filter(|w| w.called < *returned && w.returned > *called).map(|w| &w.content[..]));
            assert!(allowed.contains(&got), "{name}: block {b} holds neither what was acknowledged before the snapshot nor a write in flight during it");
        }
    }
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    let chk = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 22);
}

#[test]
fn a_client_that_stops_in_the_middle_of_a_write_does_not_stall_the_others_during_a_live_snapshot() {
    use common::nbdclient::NBD_CMD_WRITE;
    use std::io::Write;
    use std::time::{Duration, Instant};
    const SIZE: u64 = 16 << 20;
    let live = Live::start(SIZE);
    // A sends a 1 MiB write (run as its payload arrives) and half its payload, then stops.
    let mut a = live.client();
    let data = random_bytes(MIB as usize, 0xa11);
    let half = data.len() / 2;
    a.send_request(0, NBD_CMD_WRITE, 0xa, 2 * MIB, MIB as u32, &data[..half]).expect("send half a write");
    let mut b = live.client();
    b.set_timeout(Some(Duration::from_secs(5))).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let snap = std::thread::scope(|scope| {
        let snap = scope.spawn(|| live.snapshot("snap.cow"));
        // The snapshot now waits for A's write. B goes on meanwhile, in turns with the
        // snapshot's attempts: each of its requests waits a fraction of a second at most.
        std::thread::sleep(Duration::from_millis(300));
        let mut slowest = Duration::ZERO;
        let mut answered = 0;
        let mut failed = None;
        while started.elapsed() < Duration::from_secs(2) && failed.is_none() {
            let t = Instant::now();
            match b.read(5 * MIB, 4096) {
                Ok(_) => answered += 1,
                Err(e) => failed = Some(e),
            }
            slowest = slowest.max(t.elapsed());
        }
        let waited = !snap.is_finished();
        // A sends the rest (also when B failed: the snapshot thread must end): its write
        // lands, and the snapshot goes through.
        a.stream().write_all(&data[half..]).expect("send the rest of the payload");
        a.read_response().expect("A's write answered").check().expect("A's write succeeded");
        let snap = snap.join().expect("the snapshot");
        assert!(failed.is_none(), "B's read while A stalls a snapshot: {failed:?}");
        assert!(waited, "the snapshot did not wait for A's write in flight");
        assert!(slowest < Duration::from_secs(1), "B waited {slowest:?} for a read");
        eprintln!("{answered} reads answered beside the stalled write, the slowest in {slowest:?}");
        snap
    });
    assert!(snap >= 1500.0, "the pause reported ({snap} ms) leaves out the wait for A's write");
    assert_bytes_eq(&b.read(2 * MIB, MIB as u32).unwrap(), &data, "A's write after the snapshot");
}

#[test]
fn fio_random_writes_with_verify_on_two_connections_survive_twenty_live_snapshots() {
    if !require_tool("fio") {
        return;
    }
    let live = Live::start(128 << 20);
    let fio = live.fio_on_two_connections("live");
    // Snapshots while fio writes: spaced out over its run, at least twenty of them.
    let mut pauses = Vec::new();
    let mut during = 0;
    // (At most 40, to bound the test's time.)
    while (!fio.is_finished() || pauses.len() < 20) && pauses.len() < 40 {
        let running = !fio.is_finished();
        pauses.push(live.snapshot(&format!("s{:02}.cow", pauses.len())));
        during += usize::from(running && !fio.is_finished());
    }
    let text = fio.join().expect("fio failed");
    assert!(text.contains("WRITE:"), "{text}");
    assert!(during >= 20, "only {during} snapshots were taken while fio ran");
    pauses.sort_by(f64::total_cmp);
    eprintln!(
        "{} live snapshots ({during} while fio wrote): pauses median {:.1} ms, longest {:.1} ms",
        pauses.len(),
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    let chk = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
}

#[test]
fn an_ext4_mounted_on_the_export_keeps_working_across_live_snapshots_and_jobs_and_a_snapshot_mounts() {
    if !require_fs_stack() || !require_tool("fio") {
        return;
    }
    let live = Live::start(64 << 20);
    let work = live.ws.p("fs");
    std::fs::create_dir_all(&work).unwrap();
    let fs = FsOverNbd::create(&live.uri(), &work);
    let mnt = fs.path().to_path_buf();
    let args: Vec<String> = vec![
        "--name=inext4".into(),
        format!("--filename={}", mnt.join("data").display()),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--size=16m".into(),
        "--fsync=16".into(),
        "--verify=crc32c".into(),
    ];
    let dir = live.ws.dir().to_path_buf();
    let fio = std::thread::spawn(move || run_fio(&dir, &args, 1));
    for k in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        live.snapshot(&format!("fs{k}.cow"));
    }
    // The background jobs too, while fio writes inside the file system: a commit (into
    // fs5.cow), a compaction of the layers under the top, a flatten.
    let ctl = s(&live.ctl);
    live.ws.ok(&["commit", "disk.cow", "--force", "--control", ctl]);
    live.ws.ok(&["compact", "disk.cow", "all.cow", "--control", ctl]);
    live.ws.ok(&["flatten", "disk.cow", "--control", ctl]);
    fio.join().expect("fio inside the ext4 failed");
    std::fs::write(mnt.join("after"), b"written after the snapshots and jobs").unwrap();
    fs.release().expect("unmount");
    assert_eq!(live.ws.info("disk.cow")["layers"].as_array().unwrap().len(), 1, "not flattened");
    // A snapshot of a mounted file system is what a power cut would leave: it mounts (the
    // journal replays) and then checks clean.
    let raw = live.ws.p("fs3.raw");
    live.ws.ok(&["flatten", "fs3.cow", "--output", s(&raw), "--format", "raw"]);
    {
        let l = LoopDev::attach(&raw).expect("losetup");
        let m = Mount::new(l.path(), &live.ws.p("snapmnt")).expect("the snapshot's ext4 mounts");
        m.unmount().unwrap();
        let out = fsck_ext4(l.path());
        assert!(out.status.success(), "e2fsck of the snapshot: {}", String::from_utf8_lossy(&out.stdout));
        l.detach().unwrap();
    }
    // And the disk itself, unmounted cleanly after all of it, checks clean and holds the
    // file written last.
    let Live { server, ws, .. } = live;
    assert!(server.stop().success());
    let raw = ws.p("final.raw");
    ws.ok(&["flatten", "disk.cow", "--output", s(&raw), "--format", "raw"]);
    let l = LoopDev::attach(&raw).expect("losetup");
    let out = fsck_ext4(l.path());
    assert!(out.status.success(), "e2fsck of the disk: {}", String::from_utf8_lossy(&out.stdout));
    let m = Mount::new(l.path(), &ws.p("finalmnt")).expect("mount");
    assert_eq!(std::fs::read(m.path().join("after")).unwrap(), b"written after the snapshots and jobs");
    m.unmount().unwrap();
    l.detach().unwrap();
}

/// The exports of a running server, as `export list --json` shows them, by name.
fn exports(ws: &Ws, ctl: &Path) -> Vec<Value> {
    ws.json(&["export", "list", "--json", "--control", s(ctl)]).as_array().cloned().unwrap_or_default()
}

fn field(list: &[Value], name: &str, key: &str) -> Value {
    list.iter().find(|e| e["name"] == name).map(|e| e[key].clone()).unwrap_or(Value::Null)
}

#[test]
fn exports_are_added_listed_and_removed_while_the_server_runs() {
    let live = Live::start(4 << 20);
    let (ws, ctl) = (&live.ws, &live.ctl);
    ws.create("guest.cow", &["--size", "2M"]);
    let out = ws.ok(&["export", "add", "guest.cow", "--name", "guest", "--control", s(ctl)]);
    assert_eq!(out, "serving guest.cow as export guest\n");
    let mut c = live.server.connect();
    c.opt_go("guest", &[]).unwrap();
    c.write(4096, &[7u8; 8192]).unwrap();
    c.flush().unwrap();
    let list = exports(ws, ctl);
    assert_eq!(field(&list, "guest", "connections"), 1);
    assert_eq!(field(&list, "guest", "writes"), 1);
    assert_eq!(field(&list, "guest", "bytes_written"), 8192);
    assert_eq!(field(&list, "disk", "connections"), 0);
    // In use: refused, and nothing changes.
    ws.fail(&["export", "remove", "guest", "--control", s(ctl)], &["guest", "1 client connected", "--force"]);
    assert_eq!(c.read(4096, 4096).unwrap(), vec![7u8; 4096]);
    // The other export is not disturbed by any of it.
    let mut d = live.client();
    d.write(0, &[1u8; 4096]).unwrap();
    // A refused removal leaves the export where it was: the first is the default export, so
    // a client asking for the empty name still gets "disk", not "guest".
    ws.fail(&["export", "remove", "disk", "--control", s(ctl)], &["disk", "1 client connected"]);
    let names: Vec<Value> = exports(ws, ctl).iter().map(|e| e["name"].clone()).collect();
    assert_eq!(names, ["disk", "guest"]);
    let mut e = live.server.connect();
    e.opt_go("", &[]).unwrap();
    assert_eq!(e.read(0, 4096).unwrap(), vec![1u8; 4096], "the default export is no longer disk");
    drop(e);
    // Forced: the client's connection ends, the image is closed cleanly at once.
    ws.ok(&["export", "remove", "guest", "--force", "--control", s(ctl)]);
    assert!(c.read(0, 4096).is_err(), "the removed export still answered");
    let info = ws.info("guest.cow");
    assert_eq!(info["flags"], serde_json::json!([]), "not closed cleanly: {info}");
    assert!(exports(ws, ctl).iter().all(|e| e["name"] != "guest"));
    assert_eq!(d.read(0, 4096).unwrap(), vec![1u8; 4096]);
    // Added again under the same name, it serves what was written before.
    ws.ok(&["export", "add", "guest.cow", "--name", "guest", "--read-only", "--control", s(ctl)]);
    let mut c = live.server.connect();
    c.opt_go("guest", &[]).unwrap();
    assert_eq!(c.read(4096, 8192).unwrap(), vec![7u8; 8192]);
    assert!(c.write(0, &[1u8; 512]).is_err(), "a read-only export took a write");
    assert_eq!(field(&exports(ws, ctl), "guest", "read_only"), true);
    drop(c);
    drop(d);
    assert!(live.server.stop().success());
}

#[test]
fn the_control_channel_refuses_bad_requests_in_one_line_and_changes_nothing() {
    let live = Live::start(4 << 20);
    let (ws, ctl) = (&live.ws, &live.ctl);
    let before = ws.info("disk.cow");
    ws.create("other.cow", &["--size", "1M"]);
    // An image this server does not serve.
    ws.fail(&["snapshot", "other.cow", "o1.cow", "--control", s(ctl)], &["other.cow", "not served by this server"]);
    assert!(!ws.p("o1.cow").exists());
    // A snapshot name that exists.
    ws.fail(&["snapshot", "disk.cow", "other.cow", "--control", s(ctl)], &["other.cow", "already exists"]);
    assert_eq!(ws.info("disk.cow")["layers"], before["layers"]);
    // Removing or adding what does not exist / exists.
    ws.fail(&["export", "remove", "nosuch", "--control", s(ctl)], &["no export named \"nosuch\""]);
    ws.fail(&["export", "add", "disk.cow", "--name", "disk2", "--control", s(ctl)], &["disk.cow", "served already"]);
    ws.fail(
        &["export", "add", "other.cow", "--name", "disk", "--control", s(ctl)],
        &["export named \"disk\" exists already"],
    );
    // Names no client could ask for: longer than an NBD string (4096 bytes, which would
    // break NBD_OPT_LIST for every client), or empty (the default export's name).
    let long = "x".repeat(4097);
    for name in [long.as_str(), ""] {
        ws.fail(&["export", "add", "other.cow", "--name", name, "--control", s(ctl)], &["1 to 4096 bytes"]);
    }
    assert_eq!(exports(ws, ctl).len(), 1, "a refused name was added");
    // A socket of another user is refused before anything is sent.
    let theirs = ws.p("theirs.sock");
    let _l = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    if is_root() {
        // root may use anyone's socket, as with any file; only another user is refused.
        let o = run_status(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(cowdisk_bin())
                .args(["export", "list", "--control", s(ctl)]),
        );
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("belongs to user 0"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Garbage on the wire, and a client that leaves without reading its reply.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut sock = std::os::unix::net::UnixStream::connect(ctl).unwrap();
        let mut r = BufReader::new(sock.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"cowdisk\""), "{line}");
        sock.write_all(b"{not json\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"error\"") && line.contains("not a JSON request"), "{line}");
        sock.write_all(b"{\"execute\":\"export-list\",\"id\":1}\n").unwrap();
    }
    assert_eq!(exports(ws, ctl).len(), 1);
    assert_eq!(ws.info("disk.cow")["layers"], before["layers"]);
    assert!(live.server.stop().success());
}

#[test]
fn snapshot_finds_the_server_of_an_image_without_being_told() {
    let ws = Ws::in_memory("live-default");
    ws.create("d.cow", &["--size", "1M"]);
    let server = Server::start(&[s(&ws.p("d.cow")), "--socket", s(&ws.p("n.sock"))]);
    let out = ws.ok(&["snapshot", "d.cow", "d1.cow"]);
    assert!(out.contains("(live: clients paused"), "{out}");
    assert!(server.stop().success());
    // Without a server, the same command snapshots offline.
    let out = ws.ok(&["snapshot", "d.cow", "d2.cow"]);
    assert!(!out.contains("live"), "{out}");
    assert_eq!(ws.info("d.cow")["layers"].as_array().unwrap().len(), 3);
}

/// An image served by the name of a symbolic link (here to a file in another directory): a
/// live snapshot replaces the link with the new overlay (spec §3.3 uses the path as given),
/// and the server still knows its image by that name for the next snapshot and for jobs,
/// found by `cowdisk snapshot` without being told where the server is.
#[test]
fn an_image_served_through_a_symbolic_link_keeps_its_live_operations() {
    let ws = Ws::in_memory("live-symlink");
    std::fs::create_dir(ws.p("real")).unwrap();
    std::fs::create_dir(ws.p("links")).unwrap();
    ws.create("real/d.cow", &["--size", "1M"]);
    std::os::unix::fs::symlink("../real/d.cow", ws.p("links/d.cow")).unwrap();
    let ctl = ws.p("c.sock");
    let server = Server::start(&[s(&ws.p("links/d.cow")), "--socket", s(&ws.p("n.sock")), "--control", s(&ctl)]);
    let mut c = server.connect();
    c.opt_go("d", &[]).unwrap();
    let mut model = vec![0u8; 1 << 20];
    for (i, snap) in ["links/s1.cow", "links/s2.cow", "links/s3.cow"].iter().enumerate() {
        let block = vec![b'a' + i as u8; 4096];
        c.write(i as u64 * 8192, &block).unwrap();
        model[i * 8192..i * 8192 + 4096].copy_from_slice(&block);
        let out = ws.ok(&["snapshot", "links/d.cow", snap]);
        assert!(out.contains("(live: clients paused"), "snapshot {i}: {out}");
    }
    // The server lists its image by the name it serves it under.
    let list = ws.json(&["export", "list", "--json", "--control", s(&ctl)]);
    let listed = list.as_array().unwrap().iter().find(|e| e["name"] == "d").map(|e| e["image"].clone());
    assert_eq!(listed, Some(Value::from(s(&ws.p("links/d.cow").canonicalize().unwrap()))), "{list}");
    // A job through the same name: commit the top into s3 while the client is connected.
    c.write(3 * 8192, &[b'z'; 4096]).unwrap();
    model[3 * 8192..3 * 8192 + 4096].fill(b'z');
    let out = ws.ok(&["commit", "links/d.cow", "--force"]);
    assert!(out.contains("(live)"), "{out}");
    // The file the link pointed at is the first snapshot now, not the served image: refused.
    ws.fail(&["snapshot", "real/d.cow", "real/x.cow"], &["not served by this server"]);
    assert!(!ws.p("real/x.cow").exists());
    assert_eq!(c.read(0, 1 << 20).unwrap(), model, "the export's contents");
    drop(c);
    assert!(server.stop().success());
    let layers: Vec<Value> =
        ws.info("links/d.cow")["layers"].as_array().unwrap().iter().map(|l| l["path"].clone()).collect();
    assert_eq!(layers, ["links/d.cow", "links/s3.cow", "links/s2.cow", "links/s1.cow"], "the chain");
    assert_eq!(ws.device("links/d.cow"), model, "the image's contents after the server stopped");
}

/// A commit through a symbolic link, offline and live: the new empty overlay takes the link's
/// name (as a snapshot's does), and the file the link led to, whose blocks are now in the
/// parent, goes with it. Before 2026-12-04 that file stayed behind: a full second overlay on
/// the parent, which read its old disk when opened by its own name.
#[test]
fn a_commit_through_a_symbolic_link_leaves_no_file_behind() {
    let ws = Ws::in_memory("commit-symlink");
    std::fs::create_dir(ws.p("real")).unwrap();
    ws.create("w.cow", &["--size", "1M"]);
    ws.ok(&["snapshot", "w.cow", "p.cow"]);
    let mut model = vec![0u8; 1 << 20];
    for (round, live) in [false, true].into_iter().enumerate() {
        // dN.cow -> real/dN.cow, an overlay whose parent "p.cow" is found from the link's
        // directory (format-spec §3.3).
        let (link, target) = (format!("d{round}.cow"), format!("real/d{round}.cow"));
        ws.create(&link, &["--backing", "p.cow"]);
        std::fs::rename(ws.p(&link), ws.p(&target)).unwrap();
        std::os::unix::fs::symlink(&target, ws.p(&link)).unwrap();
        let at = round * 8192;
        let block = vec![b'k' + round as u8; 4096];
        model[at..at + 4096].copy_from_slice(&block);
        let ctl = ws.p("c.sock");
        let server = Server::start(&[s(&ws.p(&link)), "--socket", s(&ws.p("n.sock")), "--control", s(&ctl)]);
        let mut c = server.connect();
        c.opt_go(&format!("d{round}"), &[]).unwrap();
        c.write(at as u64, &block).unwrap();
        if live {
            let out = ws.ok(&["commit", &link, "--force"]);
            assert!(out.contains("(live)"), "{out}");
            assert_eq!(c.read(0, 1 << 20).unwrap(), model, "the export's contents after a live commit");
        }
        drop(c);
        assert!(server.stop().success());
        if !live {
            ws.ok(&["commit", &link, "--force"]);
        }
        assert!(!ws.p(&target).exists(), "round {round}: the file the link led to is still there");
        let md = std::fs::symlink_metadata(ws.p(&link)).unwrap();
        assert!(md.file_type().is_file(), "round {round}: the image's name holds the new overlay");
        let left: Vec<String> = std::fs::read_dir(ws.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".commit"))
            .collect();
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
        let layers: Vec<Value> =
            ws.info(&link)["layers"].as_array().unwrap().iter().map(|l| l["path"].clone()).collect();
        assert_eq!(layers, [link.as_str(), "p.cow"], "round {round}: the chain");
        assert_eq!(ws.device(&link), model, "round {round}: the image's contents");
        assert_eq!(ws.device("p.cow"), model, "round {round}: the parent holds the committed blocks");
    }
    // Behind a chain of links another link still names the file: it is left (before a review
    // of the fix, it was removed and that link left dangling).
    ws.create("e.cow", &["--backing", "p.cow"]);
    std::fs::rename(ws.p("e.cow"), ws.p("real/g.cow")).unwrap();
    std::os::unix::fs::symlink("real/g.cow", ws.p("f.cow")).unwrap();
    std::os::unix::fs::symlink("f.cow", ws.p("e.cow")).unwrap();
    ws.ok(&["commit", "e.cow", "--force"]);
    assert!(ws.p("real/g.cow").exists() && ws.p("f.cow").exists(), "a file another link names was removed");
}

/// A commit's intermediate layer is known by its name (`IMAGE.commit-` and eight hex digits):
/// the next commit of an image on such a layer merges it into its parent and deletes it. So a
/// layer the user makes may not take such a name: a snapshot (live or offline) or a
/// compaction into one is refused and changes nothing, and a later commit leaves the user's
/// snapshots where they are.
#[test]
fn a_layer_the_user_names_like_a_commits_intermediate_layer_is_refused() {
    let live = Live::start(1 << 20);
    let (ws, ctl) = (&live.ws, s(&live.ctl));
    let reserved = "disk.cow.commit-0a1b2c3d";
    let mut c = live.client();
    c.write(0, &[5u8; 4096]).unwrap();
    ws.fail(&["snapshot", "disk.cow", reserved, "--control", ctl], &[reserved, "kept for the intermediate layer"]);
    live.snapshot("s1.cow");
    live.snapshot("s2.cow");
    ws.fail(&["compact", "disk.cow", reserved, "--control", ctl], &[reserved, "kept for the intermediate layer"]);
    assert!(!ws.p(reserved).exists());
    c.write(4096, &[6u8; 4096]).unwrap();
    ws.ok(&["commit", "disk.cow", "--force", "--control", ctl]);
    drop(c);
    assert!(live.server.stop().success());
    let layers: Vec<Value> =
        ws.info("disk.cow")["layers"].as_array().unwrap().iter().map(|l| l["path"].clone()).collect();
    assert_eq!(layers, ["disk.cow", "s2.cow", "s1.cow", "base.raw"]);
    // Offline, the same refusal, and the chain is unchanged.
    ws.fail(&["snapshot", "disk.cow", "disk.cow.commit-ffffffff"], &["kept for the intermediate layer"]);
    assert!(!ws.p("disk.cow.commit-ffffffff").exists());
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 4);
    let device = ws.device("disk.cow");
    assert_eq!(&device[..4096], &[5u8; 4096][..]);
    assert_eq!(&device[4096..8192], &[6u8; 4096][..]);
    assert_eq!(&device[8192..], &live.base[8192..]);
}

/// The mode and owner of a file, as `ls -l` shows them.
fn mode_and_owner(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (md.mode() & 0o7777, md.uid(), md.gid())
}

/// A snapshot or a commit puts a new file under the image's name, and a compaction writes the
/// image's data into a new layer: each keeps the image's permission bits and owner (as root,
/// here given to `nobody`), live and offline. Before 2026-12-04 each new file was root's with
/// mode 0644: everything written after a snapshot landed in a world-readable file, and a VM
/// running as another user could no longer open its disk.
#[test]
fn snapshots_commits_and_compactions_keep_the_images_mode_and_owner() {
    use std::os::unix::fs::PermissionsExt;
    let live = Live::start(1 << 20);
    let (ws, ctl) = (&live.ws, s(&live.ctl));
    let img = ws.p("disk.cow");
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o640)).unwrap();
    // nobody:nogroup on Debian; only root may give a file away.
    let owner = if is_root() { (65534, 65534) } else { (mode_and_owner(&img).1, mode_and_owner(&img).2) };
    if is_root() {
        std::os::unix::fs::chown(&img, Some(owner.0), Some(owner.1)).unwrap();
    }
    let want = (0o640, owner.0, owner.1);
    let mut c = live.client();
    c.write(0, &[3u8; 4096]).unwrap();
    live.snapshot("s1.cow");
    assert_eq!(mode_and_owner(&img), want, "after a live snapshot");
    c.write(4096, &[4u8; 4096]).unwrap();
    live.snapshot("s2.cow");
    c.write(8192, &[5u8; 4096]).unwrap();
    ws.ok(&["commit", "disk.cow", "--force", "--control", ctl]);
    assert_eq!(mode_and_owner(&img), want, "after a live commit");
    ws.ok(&["compact", "disk.cow", "merged.cow", "--control", ctl]);
    assert_eq!(mode_and_owner(&ws.p("merged.cow")), want, "the merged layer");
    drop(c);
    assert!(live.server.stop().success());
    ws.ok(&["snapshot", "disk.cow", "s3.cow"]);
    assert_eq!(mode_and_owner(&img), want, "after an offline snapshot");
    ws.serve_write("disk.cow", &[data(0, 4096, 9)]);
    ws.ok(&["commit", "disk.cow", "--force"]);
    assert_eq!(mode_and_owner(&img), want, "after an offline commit");
}

/// Two live snapshots of two exports in one directory, to one name, at the same moment: one
/// takes the name, the other is refused ("already exists") with nothing changed, and both
/// exports go on. Before 2026-12-04 both could find the name free and both decide; the one
/// that linked second could never complete, its export answered every request with EIO, and
/// its image opened nowhere again, not even after a restart (found by a review).
#[test]
fn two_snapshots_to_one_name_at_once_take_it_once_and_refuse_the_other_with_nothing_changed() {
    let ws = Ws::in_memory("snap-race");
    ws.create("a.cow", &["--size", "1M"]);
    ws.create("b.cow", &["--size", "1M"]);
    let ctl = ws.p("c.sock");
    let server =
        Server::start(&[s(&ws.p("a.cow")), s(&ws.p("b.cow")), "--socket", s(&ws.p("n.sock")), "--control", s(&ctl)]);
    let (mut a, mut b) = (server.connect(), server.connect());
    a.opt_go("a", &[]).unwrap();
    b.opt_go("b", &[]).unwrap();
    for i in 0..20u8 {
        a.write(u64::from(i) * 4096, &[i + 1; 4096]).unwrap();
        b.write(u64::from(i) * 4096, &[i + 101; 4096]).unwrap();
        let snap = s(&ws.p(&format!("s{i}.cow"))).to_owned();
        let snapshot = |img: &str| ("snapshot", serde_json::json!({"image": s(&ws.p(img)), "snapshot": snap}));
        let replies = Ctl::at_once(&ctl, vec![snapshot("a.cow"), snapshot("b.cow")]);
        let took = replies.iter().filter(|r| r.get("return").is_some()).count();
        assert_eq!(took, 1, "round {i}: {replies:?}");
        let refused = replies.iter().find(|r| r.get("error").is_some()).unwrap();
        assert!(refused.to_string().contains("already exists"), "round {i}: {refused}");
        // Both exports go on, with what their clients wrote.
        assert_eq!(a.read(u64::from(i) * 4096, 4096).unwrap(), vec![i + 1; 4096], "round {i}: export a");
        assert_eq!(b.read(u64::from(i) * 4096, 4096).unwrap(), vec![i + 101; 4096], "round {i}: export b");
    }
    drop((a, b));
    assert!(server.stop().success());
    for img in ["a.cow", "b.cow"] {
        ws.ok(&["check", "--chain", img]);
        let base = if img == "a.cow" { 1 } else { 101 };
        let device = ws.device(img);
        for i in 0..20usize {
            assert_eq!(device[i * 4096], base + i as u8, "{img}: block {i}");
        }
    }
}

/// Two forced removals of one export at once: one removes it, the other answers (no such
/// export), and neither waits for ever (before 2026-12-04 the second looped on the removed
/// chain's claim until the server stopped). And an `export-add` racing an `export-remove` of
/// the same name: either the removal finds nothing, or it removes what was added; never both
/// "done" with the image left open under no export (before, the image stayed locked by the
/// server, unlisted and unremovable, until a restart). Found by a review.
#[test]
fn racing_export_adds_and_removes_each_end_and_leave_no_hidden_export() {
    let ws = Ws::in_memory("export-race");
    ws.create("z.cow", &["--size", "1M"]);
    ws.create("x.cow", &["--size", "1M"]);
    let ctl = ws.p("c.sock");
    let server = Server::start(&[s(&ws.p("z.cow")), "--socket", s(&ws.p("n.sock")), "--control", s(&ctl)]);
    let x = s(&ws.p("x.cow")).to_owned();
    let mut check = Ctl::connect(&ctl);
    let listed = |c: &mut Ctl| -> bool {
        c.call("export-list", serde_json::json!({}))["return"].as_array().unwrap().iter().any(|e| e["name"] == "x")
    };
    for round in 0..60 {
        let added = check.call("export-add", serde_json::json!({"image": x, "name": "x"}));
        assert!(added.get("return").is_some(), "round {round}: {added}");
        let two_removals = round % 2 == 0;
        // A client of the export: a forced removal then takes a while (its connection winds
        // down), long enough for the other request to meet it.
        let client = two_removals.then(|| {
            let mut c = server.connect();
            c.opt_go("x", &[]).unwrap();
            c
        });
        let remove = ("export-remove", serde_json::json!({"name": "x", "force": true}));
        // Otherwise: removed first by the one request and added again by the other, or the
        // other way round.
        let first =
            if two_removals { remove.clone() } else { ("export-add", serde_json::json!({"image": x, "name": "x"})) };
        let replies = Ctl::at_once(&ctl, vec![first, remove]);
        drop(client);
        if two_removals {
            let done = replies.iter().filter(|r| r.get("return").is_some()).count();
            assert_eq!(done, 1, "round {round}: {replies:?}");
        }
        // Whatever the order: listed exactly when served, and removable then; after that the
        // image is free: it can be served again.
        if listed(&mut check) {
            let r = check.call("export-remove", serde_json::json!({"name": "x", "force": true}));
            assert!(r.get("return").is_some(), "round {round}: {r}");
        }
        let again = check.call("export-add", serde_json::json!({"image": x, "name": "y"}));
        assert!(again.get("return").is_some(), "round {round}: {replies:?}, then: {again}");
        let r = check.call("export-remove", serde_json::json!({"name": "y", "force": true}));
        assert!(r.get("return").is_some(), "round {round}: {r}");
    }
    ws.ok(&["check", "x.cow"]);
    drop(check);
    assert!(server.stop().success());
}
