//! What a `cowdisk serve` leaves alone and what it survives, through the binary: a `--socket`
//! or `--control` path that is not a socket (kept, start refused), a pid file another server
//! holds (refused, the other's kept), a start that fails half bound (no socket left), a
//! handshake limit of 0 (none), and running out of descriptors (accepting pauses without
//! spinning a core, and resumes).

mod common;

use common::cli::*;
use common::daemon::*;
use common::nbdclient::NbdClient;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Starts `cowdisk serve ARGS` (with `--socket`) expecting it to fail before it serves, and
/// returns what it printed. A server that serves anyway is stopped and the test fails.
fn start_fails(args: &[&str]) -> String {
    match Server::try_start(args) {
        Ok(server) => {
            let log = server.log();
            server.stop();
            panic!("the server started with {args:?}:\n{log}")
        }
        Err(e) => e,
    }
}

/// A mistyped `--socket` or `--control` naming a user's file: the server refuses to start
/// and the file stays as it was (it used to be removed as if a stale socket). A stale socket
/// (nobody listening) is still replaced.
#[test]
fn a_socket_path_naming_a_file_that_is_not_a_socket_is_refused_and_the_file_kept() {
    let (ws, _) = workspace("not-a-socket");
    let (notes, disk, sock) = (ws.p("notes.txt"), ws.p("disk.cow"), ws.p("nbd.sock"));
    std::fs::write(&notes, "my notes\n").unwrap();
    let out = start_fails(&[s(&disk), "--socket", s(&notes)]);
    assert!(out.contains("notes.txt: exists and is not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes\n", "--socket removed a regular file");

    let out = start_fails(&[s(&disk), "--socket", s(&sock), "--control", s(&notes)]);
    assert!(out.contains("notes.txt: exists and is not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes\n", "--control removed a regular file");
    assert!(!sock.exists(), "the NBD socket bound before the control channel failed was left behind");
    assert_eq!(ws.info("disk.cow")["flags"], serde_json::json!([]), "disk.cow was not closed cleanly");

    // A directory is refused the same way (and not emptied).
    std::fs::create_dir(ws.p("d")).unwrap();
    std::fs::write(ws.p("d/keep"), "x").unwrap();
    let out = start_fails(&[s(&disk), "--socket", s(&ws.p("d"))]);
    assert!(out.contains("exists and is not a socket"), "{out}");
    assert!(ws.p("d/keep").exists());

    // A socket nobody listens on is what a killed server leaves: replaced.
    let stale = std::os::unix::net::UnixListener::bind(&sock).expect("bind a socket");
    drop(stale);
    let ctl = ws.p("ctl.sock");
    drop(std::os::unix::net::UnixListener::bind(&ctl).expect("bind a socket"));
    let server = Server::start(&[s(&disk), "--socket", s(&sock), "--control", s(&ctl)]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO over a socket that replaced a stale one");
    assert_eq!(ws.json(&["export", "list", "--json", "--control", s(&ctl)])[0]["name"], "disk");
    drop(c);
    assert!(server.stop().success());
}

/// A second server given the pid file of a running one is refused at once, naming the
/// process that holds it, and the file still names the first server, which removes it when it
/// stops (qemu-nbd locks its pid file likewise). The second used to overwrite the file, and
/// then remove it at its own exit while the first ran on. A pid file left by a killed server
/// is not held: the next server takes it over.
#[test]
fn a_pid_file_held_by_a_running_server_is_refused_to_a_second_one() {
    let (ws, _) = workspace("pid-lock");
    ws.create("other.cow", &["--size", "1M"]);
    let (pid_file, disk, other, a_sock, b_sock) =
        (ws.p("server.pid"), ws.p("disk.cow"), ws.p("other.cow"), ws.p("a.sock"), ws.p("b.sock"));
    let a_args = [s(&disk), "--socket", s(&a_sock), "--pid-file", s(&pid_file)];
    let mut a = Server::start(&a_args);
    a.daemon().wait_ready(&Ready::PidFile(pid_file.clone()), STARTUP_TIMEOUT).expect("pid file");
    let names_a = format!("{}\n", a.pid());
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), names_a);

    let b_args = [s(&other), "--socket", s(&b_sock), "--pid-file", s(&pid_file)];
    let out = start_fails(&b_args);
    assert!(out.contains(&format!("server.pid: pid file in use: the server of process {} holds it", a.pid())), "{out}");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), names_a, "the second server changed the pid file");
    assert!(!ws.p("b.sock").exists(), "the refused server left its socket");
    // Forked, the refusal comes from the command itself.
    let o = ws.run(&["serve", "--fork", "other.cow", "--socket", "b.sock", "--pid-file", s(&pid_file)]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.error_line().contains("pid file in use"), "{}", o.describe());
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), names_a, "the forked server changed the pid file");

    assert!(a.stop().success());
    assert!(!pid_file.exists(), "the first server did not remove its pid file");

    // Killed with -9, a server leaves its pid file; the next one takes it over.
    let mut a = Server::start(&a_args);
    a.daemon().wait_ready(&Ready::PidFile(pid_file.clone()), STARTUP_TIMEOUT).expect("pid file");
    a.kill9();
    assert!(pid_file.exists());
    let mut b = Server::start(&b_args);
    let names_b = format!("{}\n", b.pid());
    assert!(wait_until(STARTUP_TIMEOUT, || std::fs::read_to_string(&pid_file).ok().as_ref() == Some(&names_b)));
    assert!(b.daemon().is_running());
    assert!(b.stop().success());
    assert!(!pid_file.exists());
}

/// A start that binds its Unix socket and then fails on the TCP address (in use) exits 1 and
/// leaves no socket file behind (it used to leave the bound one).
#[test]
fn a_start_that_fails_to_listen_leaves_no_socket_behind() {
    let (ws, _) = workspace("half-bound");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    let port = taken.local_addr().expect("its address").to_string();
    let sock = ws.p("nbd.sock");
    let out = start_fails(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--listen", &port]);
    assert!(out.contains("Address already in use"), "{out}");
    assert!(!sock.exists(), "the Unix socket of a server that never served was left behind");
    drop(taken);
}

/// `--handshake-timeout 0` is no limit (as qemu-nbd's `--handshake-limit 0`): a client that
/// says nothing for longer than the server's check interval is still served. It used to be
/// dropped within 0.2 s.
#[test]
fn a_handshake_timeout_of_zero_is_no_limit() {
    let (ws, _) = workspace("no-limit");
    let sock = ws.p("nbd.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--handshake-timeout", "0"]);
    let mut c = NbdClient::connect_unix(&sock).expect("connect");
    std::thread::sleep(Duration::from_millis(1500));
    let info = c.opt_go("disk", &[]).expect("NBD_OPT_GO after 1.5 s of silence");
    assert_eq!(info.size, SIZE);
    drop(c);
    assert!(server.stop().success());
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces, so split after its ')').
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name and state.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Sets the soft limit on open descriptors of process `pid`; returns the limits before.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reading the limits of a process this test started into a valid rlimit.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    // SAFETY: setting the limits of a process this test started from a valid rlimit.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// The lowest descriptor number process `pid` does not have open: the number its next open
/// would take, so a soft limit of it leaves the process no descriptor to open.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u64>().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap_or(0)
}

/// CPU seconds the process uses over `window`.
fn cpu_over(pid: u32, window: Duration) -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    (cpu_ticks(pid) - before) as f64 / hz
}

/// Out of descriptors (RLIMIT_NOFILE reached), a client that connects waits in the listen
/// backlog: the server says once that it cannot accept, pauses between tries instead of
/// spinning a core (it used to retry at once, forever, on the NBD socket and on the control
/// socket alike), and serves the waiting clients once descriptors are free again.
#[test]
fn out_of_descriptors_the_server_waits_without_spinning_and_then_serves() {
    let (ws, _) = workspace("emfile");
    let (sock, ctl) = (ws.p("nbd.sock"), ws.p("ctl.sock"));
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
    let pid = server.pid();
    assert!(wait_until(STARTUP_TIMEOUT, || ctl.exists()), "no control socket");
    // Let the readiness probe's connection go, then allow no descriptor beyond those open.
    std::thread::sleep(Duration::from_millis(300));
    let old = set_nofile(pid, lowest_free_fd(pid));
    // Restores the limit even if an assertion below fails, so the server can stop cleanly.
    struct Restore(u32, libc::rlimit);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: setting the limits of a process this test started from a valid rlimit.
            unsafe { libc::prlimit(self.0 as libc::pid_t, libc::RLIMIT_NOFILE, &self.1, std::ptr::null_mut()) };
        }
    }
    let restore = Restore(pid, old);

    let mut nbd = UnixStream::connect(&sock).expect("connect: the backlog takes it");
    let busy = cpu_over(pid, Duration::from_secs(2));
    assert!(busy < 0.5, "the server used {busy:.2} s of CPU in 2 s waiting to accept an NBD client");
    // The control channel's accept thread waits inside accept(2), which took its descriptor
    // before the limit came down: the first control client gets in, and is let go at once for
    // want of a second descriptor. The next one waits.
    let mut first = UnixStream::connect(&ctl).expect("connect to the control socket");
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = first.read_to_end(&mut Vec::new());
    let control = UnixStream::connect(&ctl).expect("connect to the control socket");
    let busy = cpu_over(pid, Duration::from_secs(2));
    assert!(busy < 0.5, "the server used {busy:.2} s of CPU in 2 s waiting to accept a control client");
    let log = server.log();
    assert_eq!(log.matches("cannot accept a connection: Too many open files").count(), 1, "{log}");

    drop(restore);
    nbd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut magic = [0u8; 8];
    nbd.read_exact(&mut magic).expect("the waiting NBD client is greeted once descriptors are free");
    assert_eq!(&magic, b"NBDMAGIC");
    control.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = String::new();
    BufReader::new(&control).read_line(&mut greeting).expect("the waiting control client is greeted");
    assert!(greeting.contains("\"cowdisk\""), "{greeting}");
    assert!(
        wait_until(Duration::from_secs(5), || server.log().contains("accepting connections again")),
        "{}",
        server.log()
    );
    drop((nbd, control));
    assert!(server.stop().success());
    assert!(!Path::new(&sock).exists());
}
