//! End-to-end NBD tests of `cowdisk serve` beyond single requests: protocol violations that end the connection, disconnects, pipelining and multi-conn, several exports, and shutdown and locking.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::nbdclient::*;
use common::nbdtest::*;
use common::*;

// ---------------------------------------------------------------------------
// Protocol violations that end the connection
// ---------------------------------------------------------------------------

#[test]
fn bad_request_magic_closes_the_connection() {
    let fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    assert_usable(&mut c, "GO");
    let mut req = [0u8; 28];
    req[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    req[6..8].copy_from_slice(&NBD_CMD_READ.to_be_bytes());
    req[24..].copy_from_slice(&4096u32.to_be_bytes());
    c.send_raw(&req).unwrap();
    assert_closed_within(&mut c, Duration::from_secs(5), "bad request magic");
    // Other clients are unaffected.
    assert_usable(&mut simple_client(&fx.server, "disk"), "another client's bad magic");
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let fx = fixture();
    let mut c = fx.server.connect();
    c.send_option_raw(0x1122_3344_5566_7788, NBD_OPT_LIST, 0, &[]).unwrap();
    assert_closed_within(&mut c, Duration::from_secs(5), "bad option magic");
}

#[test]
fn option_over_32_mib_closes_without_waiting_for_its_payload() {
    let fx = fixture();
    let mut c = fx.server.connect();
    // Only the header: a server that tried to read (or allocate) 1 GiB would sit waiting.
    c.send_option_raw(IHAVEOPT, NBD_OPT_GO, 1 << 30, &[]).unwrap();
    let t = Instant::now();
    assert_closed_within(&mut c, Duration::from_secs(3), "1 GiB option");
    assert!(t.elapsed() < Duration::from_secs(2), "closed promptly");

    // Just over 32 MiB (qemu-nbd's bound too), likewise.
    let mut c = fx.server.connect();
    c.send_option_raw(IHAVEOPT, 0x4242, (32 << 20) + 1, &[]).unwrap();
    assert_closed_within(&mut c, Duration::from_secs(3), "32 MiB + 1 option");
}

#[test]
fn option_over_16_kib_is_read_and_answered_too_big_and_haggling_goes_on() {
    let fx = fixture();
    // At the limit an unknown option is merely unsupported.
    let mut c = fx.server.connect();
    let r = c.option_exchange(0x4242, &vec![0u8; 16 * 1024]).unwrap();
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_UNSUP);

    // Past it the spec asks a server to "simply error inbound options", not hang up: a
    // well-formed SET_META_CONTEXT of five 3.5 KB queries (17.5 KB) and a 1 MiB unknown option
    // get NBD_REP_ERR_TOO_BIG, and the same connection then selects and uses its export.
    c.opt_structured_reply().unwrap();
    let long: Vec<String> = (0..5).map(|i| format!("x-{i}:{}", "a".repeat(3500))).collect();
    let queries: Vec<&str> = long.iter().map(String::as_str).collect();
    assert_rep_error(c.opt_set_meta_context("disk", &queries), NBD_REP_ERR_TOO_BIG, "a 17.5 KB SET_META_CONTEXT");
    let r = c.option_exchange(0x4242, &vec![7u8; 1 << 20]).unwrap();
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_TOO_BIG, "a 1 MiB option");
    let set = c.opt_set_meta_context("disk", &["base:allocation"]).expect("SET after the refusals");
    assert_eq!(set.len(), 1);
    c.opt_go("disk", &[]).expect("GO after the refusals");
    c.write(0, &[9u8; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![9u8; 4096]);

    // NBD_OPT_EXPORT_NAME has no error reply: a name that long is hung up on.
    let mut c = fx.server.connect();
    c.send_option_raw(IHAVEOPT, NBD_OPT_EXPORT_NAME, 20_000, &vec![b'x'; 20_000]).unwrap();
    assert_closed_within(&mut c, Duration::from_secs(3), "a 20,000-byte export name");
}

#[test]
fn export_name_longer_than_4096_bytes_closes_the_connection() {
    let fx = fixture();
    let mut c = fx.server.connect();
    let err = c.opt_export_name(&"x".repeat(5000)).expect_err("a 5000-byte export name");
    assert!(is_disconnect(&err), "expected a hang-up, got {err}");
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let fx = fixture();
    let mut c = NbdClient::connect_unix_raw(&fx.sock).unwrap();
    c.read_greeting().unwrap();
    c.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | 1 << 7).unwrap();
    assert_closed_within(&mut c, Duration::from_secs(5), "unknown client flags");
}

#[test]
fn client_stalling_in_the_handshake_is_dropped_after_the_timeout_but_idle_transmission_is_not() {
    let fx = fixture_with("16M", &["--handshake-timeout", "1"]);
    let t0 = Instant::now();
    // Never answers the greeting.
    let mut silent = NbdClient::connect_unix_raw(&fx.sock).unwrap();
    silent.read_greeting().unwrap();
    // Stops in the middle of option haggling.
    let mut haggler = fx.server.connect();
    haggler.opt_structured_reply().unwrap();
    // Done with the handshake, then idle.
    let mut idle = simple_client(&fx.server, "disk");

    assert_closed_within(&mut silent, Duration::from_secs(3), "silent client");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(900), "dropped after the timeout, not before ({waited:?})");
    assert_closed_within(&mut haggler, Duration::from_secs(3), "stalled haggling");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    thread::sleep(Duration::from_millis(1800).saturating_sub(t0.elapsed()));
    assert_usable(&mut idle, "idling past the handshake timeout");
}

/// Connects and completes GO, retrying while the server still counts an earlier connection
/// that is on its way out (e.g. the harness's readiness probe).
fn connect_when_admitted(server: &Server) -> NbdClient<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match NbdClient::connect_unix(server.socket()).and_then(|mut c| {
            c.opt_go("disk", &[])?;
            Ok(c)
        }) {
            Ok(c) => return c,
            Err(e) if is_disconnect(&e) && Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot connect: {e}\n{}", server.log()),
        }
    }
}

#[test]
fn connection_cap_refuses_a_third_client_while_two_keep_working() {
    let fx = fixture_with("16M", &["--max-connections", "2"]);
    let mut a = connect_when_admitted(&fx.server);
    let mut b = connect_when_admitted(&fx.server);

    let t = Instant::now();
    let third = NbdClient::connect_unix(&fx.sock);
    let err = third.err().expect("a third connection must be refused");
    assert!(is_disconnect(&err), "refused by hanging up, got {err}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused immediately");

    let data = random_bytes(4096, 120);
    a.write(0, &data).expect("first client still works");
    b.flush().unwrap();
    assert_bytes_eq(&b.read(0, 4096).unwrap(), &data, "second client still works");

    // Once one leaves, a new client gets in.
    a.disconnect().unwrap();
    assert_closed_within(&mut a, Duration::from_secs(5), "DISC");
    let mut d = connect_when_admitted(&fx.server);
    assert_bytes_eq(&d.read(0, 4096).unwrap(), &data, "client admitted later");

    // With both slots free again, a burst of simultaneous connects admits exactly two.
    for mut c in [b, d] {
        c.disconnect().unwrap();
        // Closed means the server has forgotten the connection.
        assert_closed_within(&mut c, Duration::from_secs(5), "DISC");
    }
    let burst: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&fx.sock).expect("connect")).collect();
    let mut admitted = Vec::new();
    for s in burst {
        let mut c = NbdClient::from_stream(s).unwrap();
        match c.read_greeting() {
            Ok(_) => admitted.push(c),
            Err(e) => assert!(is_disconnect(&e), "refused by hanging up, got {e}"),
        }
    }
    assert_eq!(admitted.len(), 2, "a burst of 8 connects with --max-connections 2");
}

// ---------------------------------------------------------------------------
// Pipelining, multi-conn, several exports
// ---------------------------------------------------------------------------

#[test]
fn clients_that_leave_their_replies_unread_do_not_stall_a_client_asking_for_little() {
    // Four connections with two 32 MiB reads each, their replies never read, hold the whole
    // server-wide budget of payload bytes in flight (256 MiB). Another client's small reads
    // and writes must still be answered, not wait until those clients go.
    let fx = fixture_with("80M", &[]);
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let mut c = simple_client(&fx.server, "disk");
        for k in 0..2 {
            c.send_request(0, NBD_CMD_READ, 0x400 + k, k * 32 * MIB, 32 * MIB as u32, &[]).expect("send a 32 MiB read");
        }
        hogs.push(c);
    }
    thread::sleep(Duration::from_millis(500));
    let mut c = simple_client(&fx.server, "disk");
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let data = random_bytes(4096, 77);
    let t = Instant::now();
    c.write(64 * MIB, &data).unwrap_or_else(|e| panic!("a 4 KiB write beside the unread replies: {e}"));
    assert_bytes_eq(
        &c.read(64 * MIB, 4096).unwrap_or_else(|e| panic!("a 4 KiB read beside them: {e}")),
        &data,
        "read back",
    );
    c.write(70 * MIB, &random_bytes(4 * MIB as usize, 78)).unwrap_or_else(|e| panic!("a 4 MiB write beside them: {e}"));
    eprintln!("answered in {:?} beside 256 MiB of unread replies", t.elapsed());
    drop(hogs);
    c.flush().expect("flush once they are gone");
}

#[test]
fn sixty_four_pipelined_reads_and_writes_are_matched_by_cookie() {
    let fx = fixture_with("32M", &[]);
    let area = |i: u64| i * 256 * KIB;
    let len = |i: u64| (4 * KIB * (1 + i % 16)) as u32;
    // Even areas are read (prepared first), odd areas are written, all in one batch.
    let mut c = simple_client(&fx.server, "disk");
    for i in (0..64).step_by(2) {
        c.write(area(i), &random_bytes(len(i) as usize, 200 + i)).unwrap();
    }
    drop(c);

    for structured in [false, true] {
        let mut c = client(&fx.server, "disk", structured);
        let salt = if structured { 1000 } else { 0 };
        let cookie_of = |i: u64| 0x5eed_0000_0000_0000 ^ (i.wrapping_mul(0x9e37_79b9) << 8);
        let reqs = (0..64u64)
            .map(|i| {
                if i % 2 == 0 {
                    Req::new(NBD_CMD_READ, cookie_of(i), area(i), len(i), vec![])
                } else {
                    let data = random_bytes(len(i) as usize, 300 + salt + i);
                    Req::new(NBD_CMD_WRITE, cookie_of(i), area(i), len(i), data)
                }
            })
            .collect();
        let sender = send_batch(&mut c, reqs);
        assert_eq!(c.inflight_count(), 64);
        let mut order = Vec::new();
        for _ in 0..64 {
            let r = c.read_response().expect("response");
            let i = (0..64).find(|&i| cookie_of(i) == r.cookie).expect("reply carries one of our cookies");
            assert!(r.is_ok(), "request {i}: error {}", r.error);
            if i % 2 == 0 {
                assert_eq!(r.request_type, NBD_CMD_READ);
                assert_bytes_eq(&r.read_data().unwrap(), &random_bytes(len(i) as usize, 200 + i), "pipelined read");
            } else {
                assert_eq!(r.request_type, NBD_CMD_WRITE);
            }
            order.push(i);
        }
        sender.join().unwrap().expect("send the batch");
        eprintln!("completion order: {order:?}");
        order.sort_unstable();
        assert_eq!(order, (0..64).collect::<Vec<_>>(), "one reply per request");
        assert_eq!(c.inflight_count(), 0);
        for i in (1..64).step_by(2) {
            assert_bytes_eq(
                &c.read(area(i), len(i)).unwrap(),
                &random_bytes(len(i) as usize, 300 + salt + i),
                "pipelined write landed",
            );
        }
    }
}

/// Sends a FLUSH of `MIB`-sized writes of new data (more each try, until the FLUSH is still
/// running 20 ms later, else the order says nothing), then a READ of the first block, and
/// returns whether the READ was answered first.
fn read_beside_a_long_flush(c: &mut NbdClient<UnixStream>, next: &mut u64, block: &[u8], tag: u64) -> bool {
    let mut dirty = 32 * MIB;
    loop {
        assert!(dirty <= 512 * MIB, "a FLUSH of 512 MiB of new data was over within 20 ms");
        let data = random_bytes(MIB as usize, 42 + tag);
        for _ in 0..dirty / MIB {
            c.write(*next, &data).unwrap();
            *next += MIB;
        }
        let (flush, read) = (0xf1a5_0000 + tag, 0x4ead_0000 + tag);
        c.send_request(0, NBD_CMD_FLUSH, flush, 0, 0, &[]).unwrap();
        thread::sleep(Duration::from_millis(20));
        if readable_now(c.stream()) {
            assert_eq!(c.read_response().expect("flush reply").cookie, flush);
            dirty *= 2;
            continue;
        }
        c.send_request(0, NBD_CMD_READ, read, 0, 4096, &[]).unwrap();
        let first = c.read_response().expect("first reply");
        let second = c.read_response().expect("second reply");
        assert!(first.is_ok() && second.is_ok());
        let data = if first.cookie == read { first.read_data() } else { second.read_data() };
        assert_bytes_eq(&data.unwrap(), block, "the read beside the flush");
        eprintln!("{tag}: {} MiB dirty; the READ answered first: {}", dirty / MIB, first.cookie == read);
        return first.cookie == read;
    }
}

/// Whether a reply is waiting on the socket (without reading it).
fn readable_now(s: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own, no wait.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// A client that keeps requests in flight (qemu, the kernel) must not see a read wait behind a
/// slow FLUSH on the same connection: a thread reads on while the FLUSH runs. The server stops
/// doing that for a connection at queue depth 1 (it would only move the stream between
/// threads, PROFILING.md), and must start again as soon as the client shows it keeps requests
/// in flight: on a fresh connection, after a burst of pipelined requests, and after one request
/// sent before the reply to the one before (which may wait, once).
#[test]
fn a_read_sent_while_a_long_flush_runs_is_answered_first_also_after_a_queue_depth_1_stretch() {
    let fx = fixture_with("2G", &[]);
    let mut c = simple_client(&fx.server, "disk");
    let block = random_bytes(4096, 41);
    c.write(0, &block).unwrap();
    c.flush().unwrap();
    let mut next = MIB;
    let qd1_stretch = |c: &mut NbdClient<UnixStream>| {
        for _ in 0..1100 {
            assert_bytes_eq(&c.read(0, 4096).unwrap(), &block, "a read at queue depth 1");
        }
    };
    assert!(read_beside_a_long_flush(&mut c, &mut next, &block, 0), "fresh connection: the READ waited for the FLUSH");

    qd1_stretch(&mut c);
    let burst = (0..8).map(|i| Req::new(NBD_CMD_READ, 0xb0 + i, 0, 4096, vec![])).collect();
    send_batch(&mut c, burst).join().unwrap().expect("send the burst");
    for _ in 0..8 {
        assert!(c.read_response().expect("burst reply").is_ok());
    }
    assert!(read_beside_a_long_flush(&mut c, &mut next, &block, 1), "after a burst: the READ waited for the FLUSH");

    qd1_stretch(&mut c);
    // The first READ may wait for its FLUSH (nothing showed the server it should read on);
    // the FLUSH's reply then finds it sent, so the second must not.
    read_beside_a_long_flush(&mut c, &mut next, &block, 2);
    assert!(
        read_beside_a_long_flush(&mut c, &mut next, &block, 3),
        "after a READ sent beside a FLUSH: the next READ waited"
    );
}

/// After a queue-depth-1 stretch, a client sends a 1 MiB READ and then a 1 MiB WRITE before it
/// reads the READ's reply (the spec lets it keep requests in flight). The reply is larger than
/// the socket takes at once, so it can only be sent while the client reads, and the client
/// reads only once its WRITE is sent: the server must read the WRITE meanwhile. Before
/// 2026-12-04 a quiet connection (see src/nbd/transmission.rs `next_request`) did not, and
/// both waited for ever; a fresh connection did.
#[test]
fn a_write_sent_before_reading_a_large_reads_reply_is_taken_also_after_a_queue_depth_1_stretch() {
    let fx = fixture();
    // A plain client on a plain socket: its requests as bytes, replies read as they come.
    let mut c = simple_client(&fx.server, "disk").into_stream();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = |typ: u16, cookie: u64, len: u32| {
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    // A simple reply: its cookie and, for the READ cookies (0x51, 0x53: 1 MiB), its data.
    let reply = |c: &mut UnixStream, data: usize| {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).expect("a reply within 20 s");
        assert_eq!(&h[4..8], &[0u8; 4], "the request failed");
        let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
        let mut b = vec![0u8; if matches!(cookie, 0x51 | 0x53) { MIB as usize } else { data }];
        c.read_exact(&mut b).expect("a reply's data within 20 s");
        (cookie, b)
    };
    for i in 0..1100 {
        c.write_all(&req(NBD_CMD_READ, 0x1000 + i, 512)).unwrap();
        assert_eq!(reply(&mut c, 512).0, 0x1000 + i);
    }
    let new = random_bytes(MIB as usize, 44);
    c.write_all(&req(NBD_CMD_READ, 0x51, MIB as u32)).unwrap();
    // Sent once the READ runs (a WRITE already there when the server looks makes it read on).
    std::thread::sleep(Duration::from_millis(100));
    let (mut w, done) = (c.try_clone().unwrap(), std::sync::mpsc::channel());
    let sender = thread::spawn(move || {
        let mut msg = req(NBD_CMD_WRITE, 0x52, MIB as u32);
        msg.extend_from_slice(&new);
        w.write_all(&msg).unwrap();
        done.0.send(()).unwrap();
        new
    });
    // The client sends its WRITE before it reads: give it 20 s.
    assert!(done.1.recv_timeout(Duration::from_secs(20)).is_ok(), "the server did not read the WRITE in 20 s");
    let new = sender.join().unwrap();
    let mut answered = [reply(&mut c, 0).0, reply(&mut c, 0).0];
    answered.sort();
    assert_eq!(answered, [0x51, 0x52]);
    c.write_all(&req(NBD_CMD_READ, 0x53, MIB as u32)).unwrap();
    assert_bytes_eq(&reply(&mut c, 0).1, &new, "the WRITE landed");
}

/// CPU time (user + system) the process `pid` has used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_queue_depth_1_client_gone_idle_costs_the_server_no_cpu() {
    // A quiet connection's thread looks for the next request a little while before it sleeps
    // (src/nbd/spin.rs); a client that stops sending must not keep it looking.
    let fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    for _ in 0..3000 {
        c.read(0, 4096).unwrap();
    }
    let pid = fx.server.pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 2 s of a spinning thread would be some 200 ticks at 100 Hz.
    assert!(used <= 10, "the server used {used} ticks of CPU in 2 s with its only client idle");
    assert!(c.read(0, 4096).is_ok(), "the connection still answers after the pause");
}

#[test]
fn multi_conn_a_write_acknowledged_on_one_connection_is_seen_on_another_after_its_flush() {
    let fx = fixture();
    let mut a = simple_client(&fx.server, "disk");
    let mut b = structured_client(&fx.server, "disk");
    assert!(a.export().unwrap().has_flag(NBD_FLAG_CAN_MULTI_CONN));
    for round in 0..8u64 {
        let data = random_bytes(64 * 1024, 400 + round);
        let off = round * MIB + 4096 * round;
        a.write(off, &data).expect("write on A");
        b.flush().expect("flush on B");
        assert_bytes_eq(&b.read(off, data.len() as u32).unwrap(), &data, "B sees A's write");
        let back = random_bytes(4096, 500 + round);
        b.write(off, &back).expect("write on B");
        a.flush().expect("flush on A");
        assert_bytes_eq(&a.read(off, 4096).unwrap(), &back, "A sees B's write");
    }
}

#[test]
fn named_exports_over_one_raw_base_are_isolated_and_the_base_is_untouched() {
    let dir = TempDir::for_test();
    let base = dir.join("base.raw");
    write_random_file(&base, 4 * MIB, 600);
    let base_before = std::fs::read(&base).unwrap();
    let o1 = create_overlay_on_raw(&dir, "o1.cow", &base);
    let o2 = create_overlay_on_raw(&dir, "o2.cow", &base);
    let sock = dir.join("nbd.sock");
    let server = serve(&[&o1, &o2], &sock, &["--name", "one", "--name", "two"]);

    let mut l = server.connect();
    let names: Vec<String> = l.opt_list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["one", "two"]);

    let mut one = structured_client(&server, "one");
    let mut two = simple_client(&server, "two");
    assert_eq!(one.export().unwrap().size, 4 * MIB);
    assert_bytes_eq(&one.read(0, 4 * MIB as u32).unwrap(), &base_before, "export one shows the base");

    let data = random_bytes(100 * 1024, 601);
    let at = MIB + 1000;
    one.write(at, &data).expect("write through export one");
    one.trim(3 * MIB, 64 * KIB as u32).expect("trim through export one");
    one.flush().unwrap();

    let mut want_one = base_before.clone();
    want_one[at as usize..at as usize + data.len()].copy_from_slice(&data);
    want_one[3 * MIB as usize..(3 * MIB + 64 * KIB) as usize].fill(0);
    assert_bytes_eq(&one.read(0, 4 * MIB as u32).unwrap(), &want_one, "export one has its changes over the base");
    two.flush().unwrap();
    assert_bytes_eq(&two.read(0, 4 * MIB as u32).unwrap(), &base_before, "export two still shows only the base");
    let map = status_map(&mut one, 0, 4 * MIB);
    assert_eq!(flags_at(&map, 0), 0, "base data is data");
    assert_eq!(flags_at(&map, 3 * MIB), NBD_STATE_HOLE | NBD_STATE_ZERO, "the trim hides the base");

    assert_eq!(std::fs::read(&base).unwrap(), base_before, "base file unchanged");
    drop((one, two, l));
    assert_eq!(server.stop().code(), Some(0));
    assert_eq!(std::fs::read(&base).unwrap(), base_before, "base file unchanged after shutdown");
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

#[test]
fn sigterm_with_requests_in_flight_exits_zero_and_every_acknowledged_write_survives_restart() {
    const LEN: usize = 16 * 1024;
    const N: u64 = 2048; // 32 MiB of writes: far more than get sent before the signal.
    let dir = TempDir::for_test();
    let image = create_image(&dir, "disk.cow", "32M");
    let sock = dir.join("nbd.sock");
    let mut server = serve(&[&image], &sock, &[]);

    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("GO");
    let mut rx = c.into_stream();
    let mut tx = rx.try_clone().expect("clone socket");
    // One thread keeps writing requests while this one collects replies and sends SIGTERM.
    let sender = thread::spawn(move || {
        let mut sent = 0u64;
        for i in 0..N {
            let mut msg = Vec::with_capacity(28 + LEN);
            msg.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            msg.extend_from_slice(&0u16.to_be_bytes());
            msg.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
            msg.extend_from_slice(&i.to_be_bytes());
            msg.extend_from_slice(&(i * LEN as u64).to_be_bytes());
            msg.extend_from_slice(&(LEN as u32).to_be_bytes());
            msg.extend_from_slice(&random_bytes(LEN, 7000 + i));
            if tx.write_all(&msg).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });

    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut acked = BTreeSet::new();
    let mut signalled = false;
    loop {
        let mut r = [0u8; 16];
        match rx.read_exact(&mut r) {
            Ok(()) => {}
            Err(e) if is_disconnect(&e) => break,
            Err(e) => panic!("reading replies: {e}\n{}", server.log()),
        }
        let magic = u32::from_be_bytes(r[..4].try_into().unwrap());
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(r[8..].try_into().unwrap());
        assert_eq!(magic, NBD_SIMPLE_REPLY_MAGIC);
        assert!(cookie < N, "unknown cookie {cookie}");
        match error {
            0 => assert!(acked.insert(cookie), "two replies for {cookie}"),
            // A server may refuse work while shutting down; such writes are not acknowledged.
            NBD_ESHUTDOWN => {}
            e => panic!("write {cookie} failed with {}", errno_name(e)),
        }
        if !signalled && acked.len() >= 32 {
            server.daemon().signal(libc::SIGTERM).expect("send SIGTERM");
            signalled = true;
        }
    }
    assert!(signalled, "the connection ended before SIGTERM\n{}", server.log());
    let status =
        server.daemon().wait_exit(STOP_TIMEOUT).unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "exit status\n{}", server.log());
    let sent = sender.join().expect("sender thread");
    eprintln!("sent {sent} writes, {} acknowledged before the server exited", acked.len());
    assert_eq!(header_flags(&image) & HEADER_FLAG_DIRTY, 0, "clean exit clears DIRTY");
    drop(server);

    let server = serve(&[&image], &sock, &[]);
    let mut c = simple_client(&server, "disk");
    for i in 0..N {
        let got = c.read(i * LEN as u64, LEN as u32).unwrap();
        let want = random_bytes(LEN, 7000 + i);
        if acked.contains(&i) {
            assert_bytes_eq(&got, &want, &format!("acknowledged write {i}"));
        } else {
            assert!(is_zero(&got) || got == want, "unacknowledged write {i} is torn");
        }
    }
}

#[test]
fn dirty_flag_is_set_while_serving_and_clear_after_a_clean_exit() {
    let mut fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    c.write(0, &random_bytes(4096, 800)).unwrap();
    c.flush().unwrap();
    assert_ne!(header_flags(&fx.image) & HEADER_FLAG_DIRTY, 0, "an image open for writing is marked dirty");
    // A client still connected does not keep the server from exiting.
    fx.server.daemon().signal(libc::SIGTERM).unwrap();
    let status = fx.server.daemon().wait_exit(STOP_TIMEOUT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", fx.server.log());
    assert_closed_within(&mut c, Duration::from_secs(5), "server exit");
    assert_eq!(header_flags(&fx.image) & HEADER_FLAG_DIRTY, 0, "DIRTY cleared on clean exit");
}

#[test]
fn sigint_stops_the_server_cleanly_like_sigterm() {
    let mut fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    let data = random_bytes(8192, 801);
    c.write(65536, &data).unwrap();
    fx.server.daemon().signal(libc::SIGINT).unwrap();
    let status = fx.server.daemon().wait_exit(STOP_TIMEOUT).expect("exit after SIGINT");
    assert_eq!(status.code(), Some(0), "{}", fx.server.log());
    assert_eq!(header_flags(&fx.image) & HEADER_FLAG_DIRTY, 0, "DIRTY cleared on clean exit");
    // The write was answered before the signal, and shutdown flushes: it is in the image.
    drop(c);
    let again = serve(&[&fx.image], &fx.dir.join("again.sock"), &[]);
    let mut c = simple_client(&again, "disk");
    assert_eq!(c.read(65536, 8192).unwrap(), data);
}

#[test]
fn second_server_of_an_image_held_writable_fails_with_in_use() {
    let fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    let sock2 = fx.dir.join("second.sock");
    let out = run_bounded(
        Command::new(cowdisk_bin()).arg("serve").arg(&fx.image).arg("--socket").arg(&sock2),
        Duration::from_secs(15),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second server must fail: {stderr}");
    assert!(stderr.contains("in use"), "stderr: {stderr}");
    // Also read-only: the image is being written.
    let out = run_bounded(
        Command::new(cowdisk_bin()).arg("serve").arg(&fx.image).arg("--read-only").arg("--socket").arg(&sock2),
        Duration::from_secs(15),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "read-only server must fail too: {stderr}");
    assert!(stderr.contains("in use"), "stderr: {stderr}");
    assert_usable(&mut c, "the failed second server");

    // Once the first server is gone the image can be served again.
    drop(c);
    let Fixture { server, image, dir, .. } = fx;
    assert_eq!(server.stop().code(), Some(0));
    let again = serve(&[&image], &dir.join("third.sock"), &[]);
    assert_usable(&mut simple_client(&again, "disk"), "restart");
}
