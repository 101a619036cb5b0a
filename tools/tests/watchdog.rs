//! systemd's watchdog through the `cowdisk serve` binary: keep-alives every half of WatchdogSec while serving, none for another process's watchdog, stopped while a disk does not answer (not for slow clients or a live snapshot), and going on through a long zeroing that moves.

mod common;

use common::cli::*;
use common::daemon::*;
use common::nbdclient::{NbdClient, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES};
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// systemd's watchdog (WatchdogSec=): with WATCHDOG_USEC set, the server sends WATCHDOG=1 at
/// least every half of it while it serves; with WATCHDOG_PID naming another process, none.
#[test]
fn watchdog_keep_alives_come_every_half_interval_while_serving() {
    let (ws, _) = workspace("watchdog");
    for (pid_env, pings) in [(None, true), (Some("1"), false)] {
        let listen_at = ws.p("notify.sock");
        let _ = std::fs::remove_file(&listen_at);
        let listener = std::os::unix::net::UnixDatagram::bind(&listen_at).expect("bind the notification socket");
        let sock = ws.p("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(cowdisk_bin());
        cmd.args(["serve", s(&ws.p("disk.cow")), "--socket", s(&sock)])
            .env("NOTIFY_SOCKET", &listen_at)
            .env("WATCHDOG_USEC", "400000");
        if let Some(p) = pid_env {
            cmd.env("WATCHDOG_PID", p);
        }
        let mut d = Daemon::spawn(cmd).expect("start the server");
        assert!(notification(&listener, STARTUP_TIMEOUT).starts_with("READY=1\n"), "{}", d.log());
        if pings {
            // Every keep-alive within the interval (generous: 2 s each on a busy machine).
            for _ in 0..5 {
                assert_eq!(notification(&listener, Duration::from_secs(2)), "WATCHDOG=1\n", "{}", d.log());
            }
        } else {
            listener.set_read_timeout(Some(Duration::from_millis(1500))).expect("timeout");
            let mut buf = [0u8; 64];
            let got = listener.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
            assert!(got.is_err(), "a keep-alive for another process's watchdog: {got:?}");
        }
        d.signal(libc::SIGTERM).expect("SIGTERM");
        assert_eq!(d.wait_exit(STOP_TIMEOUT).and_then(|s| s.code()), Some(0), "{}", d.log());
    }
}

/// Sends SIGCONT to a process this test stopped, when dropped: a failing test leaves no
/// stopped nbdkit behind (and so no FUSE mount that cannot be released).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Every notification that arrives within `window`.
fn notifications_within(sock: &std::os::unix::net::UnixDatagram, window: Duration) -> Vec<String> {
    let end = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = end.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        sock.set_read_timeout(Some(left)).expect("set a read timeout");
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

/// The watchdog is fed only while requests move: a read from a disk that does not answer (the
/// overlay's base is a file on nbdfuse, whose nbdkit is stopped with SIGSTOP) stops the
/// keep-alives, with a status line saying why, until the disk answers again; then the read
/// completes with the base's bytes and the keep-alives go on. A client that sends a write's
/// payload slowly, or does not read its replies, stops nothing: waiting for a client is never a
/// stall (otherwise any client could get the server restarted).
#[test]
fn watchdog_keep_alives_stop_while_a_disk_does_not_answer_but_not_for_slow_clients() {
    if !require_tools(&["nbdkit", "nbdfuse"]) {
        return;
    }
    let dir = TempDir::for_test();
    let kit_sock = dir.join("nbdkit.sock");
    let mut kit = tool("nbdkit");
    kit.args(["--foreground", "--unix"]).arg(&kit_sock).args(["memory", "64M"]);
    let mut kit = Daemon::start(kit, Ready::UnixSocket(kit_sock.clone()));
    // The base's bytes at the place the stuck read asks for, written straight to nbdkit (not
    // through the FUSE file, whose page cache would then answer the read). 42 MiB is none of
    // the 4 MiB-aligned pieces the base's fingerprint samples.
    const AT: u64 = 42 << 20;
    let want = random_bytes(4096, 0x57a1);
    let mut direct = NbdClient::connect_unix(&kit_sock).expect("connect to nbdkit");
    direct.opt_go("", &[]).expect("GO");
    direct.write(AT, &want).expect("write to nbdkit");
    direct.flush().expect("flush nbdkit");
    drop(direct);
    let fuse = NbdFuse::mount(&format!("nbd+unix:///?socket={}", kit_sock.display()), &dir.join("mnt"))
        .expect("nbdfuse mount");
    let top = dir.join("disk.cow");
    ok_in(dir.path(), &["create", s(&top), "--backing", s(fuse.disk())]);

    let listen_at = dir.join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&listen_at).expect("bind the notification socket");
    let sock = dir.join("nbd.sock");
    let mut cmd = Command::new(cowdisk_bin());
    // Keep-alives every second; a request stuck for a second withholds them.
    cmd.args(["serve", s(&top), "--socket", s(&sock)]).env("NOTIFY_SOCKET", &listen_at).env("WATCHDOG_USEC", "2000000");
    let mut d = Daemon::spawn(cmd).expect("start the server");
    assert!(notification(&listener, STARTUP_TIMEOUT).starts_with("READY=1\n"), "{}", d.log());
    let beats = |window: Duration| notifications_within(&listener, window);
    let keeps_beating = |what: &str| {
        let got = beats(Duration::from_secs(5));
        let n = got.iter().filter(|m| *m == "WATCHDOG=1\n").count();
        assert!(n >= 3, "{what}: {n} keep-alives in 5 s ({got:?})");
        assert!(got.iter().all(|m| !m.starts_with("STATUS=")), "{what}: {got:?}");
    };
    keeps_beating("idle");

    // A write of 1 MiB (spliced from the socket) whose payload stops after 64 KiB.
    let data = random_bytes(1 << 20, 0x51);
    let mut slow = NbdClient::connect_unix(&sock).expect("connect");
    slow.opt_go("disk", &[]).expect("GO");
    let cookie = slow.next_cookie();
    slow.send_request(0, NBD_CMD_WRITE, cookie, 0, 1 << 20, &data[..64 << 10]).expect("send the write's start");
    keeps_beating("a client sending a write's payload slowly");
    // Meanwhile a live snapshot waits for that write to finish, and holds back a read of
    // another client: requests waiting for the slow client, not for a disk.
    let mut snapshot = Command::new(cowdisk_bin())
        .args(["snapshot", s(&top), s(&dir.join("snap.cow"))])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cowdisk snapshot");
    std::thread::sleep(Duration::from_millis(300));
    let mut held = NbdClient::connect_unix(&sock).expect("connect");
    held.opt_go("disk", &[]).expect("GO");
    let held_cookie = held.next_cookie();
    held.send_request(0, NBD_CMD_READ, held_cookie, 8 << 20, 4096, &[]).expect("send a read");
    keeps_beating("requests held behind a client sending a write's payload slowly");
    assert!(snapshot.try_wait().expect("the snapshot's state").is_none(), "the snapshot did not wait for the write");
    slow.send_raw(&data[64 << 10..]).expect("send the rest");
    slow.wait_response(cookie).expect("the write's reply").check().expect("the write succeeds");
    let snapped = snapshot.wait_with_output().expect("the snapshot ends");
    assert!(snapped.status.success(), "snapshot: {}", String::from_utf8_lossy(&snapped.stderr));
    held.wait_response(held_cookie).expect("the held read's reply").check().expect("the held read succeeds");

    // 48 reads of 1 MiB whose replies the client does not read: the server waits to send.
    let mut deaf = NbdClient::connect_unix(&sock).expect("connect");
    deaf.opt_go("disk", &[]).expect("GO");
    let cookies: Vec<u64> = (0..48)
        .map(|_| {
            let c = deaf.next_cookie();
            deaf.send_request(0, NBD_CMD_READ, c, 0, 1 << 20, &[]).expect("send a read");
            c
        })
        .collect();
    keeps_beating("a client not reading its replies");
    for c in cookies {
        let r = deaf.wait_response(c).expect("a read's reply");
        assert_eq!(r.check().expect("the read succeeds").data, data, "what the slow write wrote");
    }

    // The disk stops answering: a read of the base waits on nbdkit.
    kit.signal(libc::SIGSTOP).expect("SIGSTOP nbdkit");
    let resume = Resume(kit.pid());
    let mut stuck = NbdClient::connect_unix(&sock).expect("connect");
    stuck.opt_go("disk", &[]).expect("GO");
    let cookie = stuck.next_cookie();
    stuck.send_request(0, NBD_CMD_READ, cookie, AT, 4096, &[]).expect("send the read");
    let got = beats(Duration::from_secs(5));
    let status = got.iter().position(|m| m.starts_with("STATUS=a request has made no progress"));
    let Some(at) = status else { panic!("no status saying keep-alives stop: {got:?}\n{}", d.log()) };
    assert!(!got[at..].iter().any(|m| m == "WATCHDOG=1\n"), "a keep-alive while stuck: {got:?}");
    let more = beats(Duration::from_secs(3));
    assert!(more.is_empty(), "notifications while the read stays stuck: {more:?}");

    drop(resume);
    let r = stuck.wait_response(cookie).expect("the read's reply once the disk answers");
    assert_eq!(r.check().expect("the read succeeds").data, want, "the base's bytes");
    let got = beats(Duration::from_secs(4));
    assert_eq!(
        got.first().map(String::as_str),
        Some("STATUS=requests make progress again: watchdog keep-alives resumed\n"),
        "{got:?}"
    );
    assert!(got.iter().filter(|m| *m == "WATCHDOG=1\n").count() >= 3, "keep-alives after the disk answers: {got:?}");
    assert!(d.log().contains("watchdog keep-alives withheld"), "the notice is not on stderr: {}", d.log());

    drop((slow, held, deaf, stuck));
    d.signal(libc::SIGTERM).expect("SIGTERM");
    assert_eq!(d.wait_exit(STOP_TIMEOUT).and_then(|s| s.code()), Some(0), "{}", d.log());
    fuse.unmount().expect("unmount nbdfuse");
}

/// A request that runs long but moves is not a stuck one: a zeroing of terabytes (extended
/// headers: one request), which covers its chunks one after another, keeps the keep-alives
/// coming. The zeroing grows until one takes three times the stall limit, so that the test
/// proves something on a fast machine too.
#[test]
fn watchdog_keep_alives_go_on_through_a_long_zeroing_that_moves() {
    let ws = Ws::in_memory("watchdog-zeroing");
    ws.create("big.cow", &["--size", "16T"]);
    let listen_at = ws.p("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&listen_at).expect("bind the notification socket");
    let sock = ws.p("nbd.sock");
    let mut cmd = Command::new(cowdisk_bin());
    // Keep-alives every 0.5 s; a request with no step for 0.5 s withholds them.
    cmd.args(["serve", s(&ws.p("big.cow")), "--socket", s(&sock)])
        .env("NOTIFY_SOCKET", &listen_at)
        .env("WATCHDOG_USEC", "1000000");
    let mut d = Daemon::spawn(cmd).expect("start the server");
    assert!(notification(&listener, STARTUP_TIMEOUT).starts_with("READY=1\n"), "{}", d.log());
    let mut c = NbdClient::connect_unix(&sock).expect("connect");
    c.opt_extended_headers().expect("extended headers");
    c.opt_go("big", &[]).expect("GO");
    let mut tried = Vec::new();
    for len in [1u64 << 40, 4 << 40, 16 << 40] {
        let _ = notifications_within(&listener, Duration::from_millis(10));
        let t = Instant::now();
        let cookie = c.next_cookie();
        c.send_request64(0, NBD_CMD_WRITE_ZEROES, cookie, 0, len, &[]).expect("send the zeroing");
        c.wait_response(cookie).expect("the zeroing's reply").check().expect("the zeroing succeeds");
        let took = t.elapsed();
        let got = notifications_within(&listener, Duration::from_millis(10));
        tried.push(format!("{} TiB in {:.2} s", len >> 40, took.as_secs_f64()));
        if took < Duration::from_millis(1500) {
            continue;
        }
        assert!(
            !got.iter().any(|m| m.starts_with("STATUS=")),
            "a moving zeroing taken for stuck: {got:?}\n{}",
            d.log()
        );
        let n = got.iter().filter(|m| *m == "WATCHDOG=1\n").count();
        assert!(n >= 2, "{n} keep-alives during {tried:?}: {got:?}");
        d.signal(libc::SIGTERM).expect("SIGTERM");
        assert_eq!(d.wait_exit(STOP_TIMEOUT).and_then(|s| s.code()), Some(0), "{}", d.log());
        return;
    }
    panic!("no zeroing took 1.5 s ({tried:?}): the test proves nothing");
}
