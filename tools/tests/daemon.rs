//! `cowdisk serve` as a daemon, through the binary and the real tools that start one: socket
//! activation by systemd-socket-activate (with the sample units of tools/systemd, checked by
//! systemd-analyze) and by libnbd (nbdcopy, nbdinfo), readiness told to NOTIFY_SOCKET,
//! `--pid-file`, `--fork`, `--log`, and SIGTERM in each mode (requests in flight answered,
//! images flushed and closed, pid file removed, exit 0).

mod common;

use common::cli::*;
use common::daemon::*;
use common::nbdclient::{NbdClient, Reply, NBD_CMD_WRITE};
use common::*;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Each write of [`writes_then`]: several are still on their way when the signal comes.
/// Below the size from which the server splices a write's payload straight from the socket
/// (128 KiB): a spliced write cut off by the shutdown leaves the space of its new slot leaked,
/// in the foreground as in these modes (a defect of the write path, not of how the server was
/// started), and `check` would report that here.
const WRITE: usize = 64 << 10;

/// Sends 16 writes without waiting for their replies, `stop` (a SIGTERM) after the fourth,
/// so that it comes while the server is reading and writing them, then reads replies until
/// the server closes the connection. Returns the writes it acknowledged.
fn writes_then(mut c: NbdClient<UnixStream>, stop: impl FnOnce()) -> Vec<u64> {
    let mut stop = Some(stop);
    for i in 0..16u64 {
        let data = random_bytes(WRITE, 500 + i);
        // Once the server stops reading, the rest cannot be sent: that is expected.
        if c.send_request(0, NBD_CMD_WRITE, i, i * WRITE as u64, WRITE as u32, &data).is_err() {
            break;
        }
        if i == 3 {
            if let Some(f) = stop.take() {
                f();
            }
        }
    }
    let mut acked = Vec::new();
    while let Ok(r) = c.read_reply() {
        if let Reply::Simple { cookie, error: 0, .. } = r {
            acked.push(cookie);
        }
    }
    eprintln!("{} of 16 writes acknowledged before the server stopped", acked.len());
    acked
}

/// After a clean stop: `disk.cow` is closed cleanly (no dirty flag), checks clean, and holds
/// every acknowledged write over the base.
fn assert_stopped_cleanly(ws: &Ws, base: &[u8], acked: &[u64]) {
    assert!(!acked.is_empty(), "no write was acknowledged before the server stopped");
    assert_eq!(ws.info("disk.cow")["flags"], serde_json::json!([]), "disk.cow was not closed cleanly");
    let chk = ws.run(&["check", "disk.cow"]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
    ws.ok(&["flatten", "disk.cow", "--output", "after.raw", "--format", "raw"]);
    let dev = std::fs::read(ws.p("after.raw")).expect("read after.raw");
    assert_eq!(dev.len(), base.len());
    for i in 0..16u64 {
        let (at, data) = (i as usize * WRITE, random_bytes(WRITE, 500 + i));
        let got = &dev[at..at + WRITE];
        if acked.contains(&i) {
            assert!(got == &data[..], "acknowledged write {i} is not in the image");
        } else {
            assert!(got == &base[at..at + WRITE] || got == &data[..], "unacknowledged write {i} is torn");
        }
    }
    let untouched = 16 * WRITE;
    assert!(dev[untouched..] == base[untouched..], "the image changed where nobody wrote");
}

/// The value of `KEY=` lines of a systemd unit, comments skipped.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|l| l.trim().strip_prefix(&prefix)).map(str::to_owned).collect()
}

#[test]
fn the_sample_units_verify_and_serve_by_socket_activation_until_sigterm() {
    if !require_tools(&["systemd-socket-activate", "systemd-analyze", "nbdinfo"]) {
        return;
    }
    let (ws, base) = workspace("units");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    let (socket_unit, service_unit) = (read("cowdisk@.socket"), read("cowdisk@.service"));
    let bin = cowdisk_bin();
    // systemd-analyze checks the units as systemd would load them for instance "disk" (it
    // also wants ExecStart's program to exist, hence this binary in place of the installed one).
    let units = ws.p("units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("cowdisk@disk.socket"), &socket_unit).unwrap();
    std::fs::write(units.join("cowdisk@disk.service"), service_unit.replace("/usr/local/bin/cowdisk", s(&bin)))
        .unwrap();
    let v = run_status(
        tool("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(units.join("cowdisk@disk.socket"))
            .arg(units.join("cowdisk@disk.service")),
    );
    let said = String::from_utf8_lossy(&v.stderr);
    assert!(v.status.success() && said.trim().is_empty(), "systemd-analyze verify: {}\n{said}", v.status);

    // What systemd does for `systemctl start cowdisk@disk.socket` and a first client: the
    // units' own ListenStream= and ExecStart=, with %t (/run), %i and the paths made local.
    let local = |v: &str| {
        v.replace("%t", s(&ws.p("run")))
            .replace("%i", "disk")
            .replace("/var/lib/cowdisk", s(ws.dir()))
            .replace("/usr/local/bin/cowdisk", s(&bin))
    };
    let listen = unit_values(&socket_unit, "ListenStream");
    assert_eq!(listen.len(), 1, "the sample socket unit listens on one Unix socket: {listen:?}");
    let sock = PathBuf::from(local(&listen[0]));
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    let exec = unit_values(&service_unit, "ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    // Type=notify, as the unit says: systemd passes NOTIFY_SOCKET and waits for READY=1.
    assert_eq!(unit_values(&service_unit, "Type"), ["notify"], "the sample service is Type=notify");
    let notify = std::os::unix::net::UnixDatagram::bind(ws.p("notify.sock")).expect("bind a notify socket");
    let mut cmd = tool("systemd-socket-activate");
    // The activator passes its children only the variables it is told to.
    cmd.arg("-l").arg(&sock).arg(format!("--setenv=NOTIFY_SOCKET={}", s(&ws.p("notify.sock"))));
    cmd.arg("--").args(local(&exec[0]).split_whitespace());
    // The first connection starts the server, as with systemd.
    let mut d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    assert!(wait_until(STARTUP_TIMEOUT, || d.log().contains("control channel at")), "{}", d.log());
    assert_eq!(notification(&notify, STARTUP_TIMEOUT), format!("READY=1\nMAINPID={}\n", d.pid()), "{}", d.log());
    let uri = unix_uri(&sock, "disk");
    assert!(d.log().contains(&format!("serving disk at nbd+unix:///disk?socket={}", sock.display())), "{}", d.log());
    let size = run(tool("nbdinfo").args(["--size", &uri]));
    assert_eq!(stdout_of(&size).trim(), SIZE.to_string());

    // `systemctl stop`: SIGTERM to the service's process, which is the one the activator
    // became (it execs the server in its place).
    let mut c = NbdClient::connect_unix(&sock).expect("connect");
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    let acked = writes_then(c, || d.signal(libc::SIGTERM).expect("SIGTERM"));
    let status = d.wait_exit(STOP_TIMEOUT).unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", d.log()));
    assert_eq!(status.code(), Some(0), "{}", d.log());
    // The socket is systemd's, which goes on listening there for the next client.
    assert!(sock.exists(), "the server removed the socket it inherited");
    assert_stopped_cleanly(&ws, &base, &acked);
}

#[test]
fn socket_activation_serves_every_inherited_socket_and_removes_its_pid_file() {
    if !require_tools(&["systemd-socket-activate", "nbdinfo"]) {
        return;
    }
    let (ws, _) = workspace("sa-multi");
    let (sock, pid_file) = (ws.p("nbd.sock"), ws.p("cowdisk.pid"));
    let tcp = format!("127.0.0.1:{}", free_port());
    let mut cmd = tool("systemd-socket-activate");
    cmd.current_dir(ws.dir()).arg("-l").arg(&sock).args(["-l", &tcp, "--"]).arg(cowdisk_bin());
    cmd.args(["serve", "disk.cow", "--pid-file", s(&pid_file)]);
    let mut d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    d.wait_ready(&Ready::PidFile(pid_file.clone()), STARTUP_TIMEOUT).expect("pid file");
    let pid = std::fs::read_to_string(&pid_file).expect("read pid file");
    assert_eq!(pid, format!("{}\n", d.pid()));
    // Both inherited sockets serve the export, and the startup lines (on stderr under socket
    // activation) say where.
    let log = d.log();
    assert!(log.contains(&format!("serving disk at nbd+unix:///disk?socket={}", sock.display())), "{log}");
    assert!(log.contains(&format!("serving disk at nbd://{tcp}/disk")), "{log}");
    for uri in [unix_uri(&sock, "disk"), format!("nbd://{tcp}/disk")] {
        assert_eq!(stdout_of(&run(tool("nbdinfo").args(["--size", &uri]))).trim(), SIZE.to_string(), "{uri}");
    }
    // The control channel works as without activation.
    let ctl = log.lines().find_map(|l| l.strip_prefix("control channel at ")).expect("control channel line");
    let list = ws.json(&["export", "list", "--json", "--control", ctl]);
    assert_eq!(list[0]["name"], "disk", "{list}");
    d.signal(libc::SIGTERM).expect("SIGTERM");
    let status = d.wait_exit(STOP_TIMEOUT).unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", d.log()));
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(!pid_file.exists(), "the pid file outlived the server");
    assert!(!Path::new(ctl).exists(), "the control socket outlived the server");
    assert!(sock.exists(), "the server removed the socket it inherited");
}

#[test]
fn socket_activation_refuses_socket_and_listen_and_connection_sockets_in_one_line() {
    if !require_tool("systemd-socket-activate") {
        return;
    }
    let (ws, _) = workspace("sa-refuse");
    // --socket and --listen: the sockets are the activating side's to choose.
    for (flag, value) in [("--socket", "mine.sock"), ("--listen", "127.0.0.1:1")] {
        let sock = ws.p("act.sock");
        let mut cmd = tool("systemd-socket-activate");
        cmd.current_dir(ws.dir()).arg("-l").arg(&sock).arg("--").arg(cowdisk_bin());
        cmd.args(["serve", "disk.cow", flag, value]);
        let mut d = Daemon::spawn(cmd).expect("start systemd-socket-activate");
        assert!(wait_until(STARTUP_TIMEOUT, || UnixStream::connect(&sock).is_ok()), "{}", d.log());
        let status = d.wait_exit(STARTUP_TIMEOUT).unwrap_or_else(|| panic!("{flag} was not refused\n{}", d.log()));
        assert_eq!(status.code(), Some(1), "{}", d.log());
        let log = d.log();
        let last = log.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            format!(
                "cowdisk: {flag} cannot be used with socket activation (LISTEN_FDS): the server listens on the \
                 sockets it inherits"
            ),
            "{log}"
        );
        assert!(!ws.p("mine.sock").exists());
        std::fs::remove_file(&sock).unwrap();
    }
    // Accept=yes hands over each connection instead of the listening socket.
    let sock = ws.p("accept.sock");
    let mut cmd = tool("systemd-socket-activate");
    cmd.current_dir(ws.dir()).args(["--accept", "-l"]).arg(&sock).arg("--").arg(cowdisk_bin());
    cmd.args(["serve", "disk.cow"]);
    let d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    let want =
        "cowdisk: inherited descriptor 3: a socket that is not listening (a systemd socket unit needs Accept=no)";
    assert!(wait_until(STARTUP_TIMEOUT, || d.log().contains(want)), "{}", d.log());
    assert_eq!(ws.info("disk.cow")["flags"], serde_json::json!([]));
}

/// `cowdisk serve ARGS` with the environment a socket activator gives, set by a shell that
/// then becomes cowdisk (so LISTEN_PID, its `$$`, is cowdisk's pid) after `setup`.
fn activated(ws: &Ws, setup: &str, fds: &str, args: &[&str]) -> Out {
    let script = format!("{setup}\nexport LISTEN_PID=$$ LISTEN_FDS={fds}\nexec \"$0\" serve \"$@\"");
    let mut cmd = Command::new("sh");
    cmd.current_dir(ws.dir()).arg("-c").arg(script).arg(cowdisk_bin()).args(args);
    let o = run_status(&mut cmd);
    out_of(&cmd, o)
}

#[test]
fn socket_activation_with_a_wrong_environment_fails_in_one_line_or_is_ignored() {
    let (ws, _) = workspace("sa-env");
    for (setup, fds, want) in [
        ("", "0", "cowdisk: socket activation: LISTEN_FDS=0 is not a number from 1 to 16"),
        ("", "lots", "cowdisk: socket activation: LISTEN_FDS=lots is not a number from 1 to 16"),
        ("exec 3<base.raw", "1", "cowdisk: inherited descriptor 3: not a socket"),
        ("exec 3<&-", "1", "cowdisk: inherited descriptor 3: Bad file descriptor (os error 9)"),
    ] {
        let o = activated(&ws, setup, fds, &["disk.cow"]);
        assert_no_panic(&o);
        assert_eq!(o.code, Some(1), "{}", o.describe());
        assert_eq!(o.error_line(), want, "{}", o.describe());
        assert_eq!(ws.info("disk.cow")["flags"], serde_json::json!([]));
    }
    // LISTEN_PID naming another process: meant for someone else, so the server listens where
    // it is told, as nbdkit does, and says it ignored the variables.
    let sock = ws.p("own.sock");
    let server = Server::start_with_env(
        &[s(&ws.p("disk.cow")), "--socket", s(&sock)],
        &[("LISTEN_PID", "1"), ("LISTEN_FDS", "1")],
    );
    assert!(server.log().contains("LISTEN_PID=1 is not this process"), "{}", server.log());
    let mut c = server.connect();
    assert_eq!(c.opt_go("disk", &[]).expect("NBD_OPT_GO").size, SIZE);
    drop(c);
    assert!(server.stop().success());
}

#[test]
fn libnbd_starts_cowdisk_by_socket_activation_and_stdout_stays_the_callers() {
    if !require_tools(&["nbdcopy", "nbdinfo"]) {
        return;
    }
    let (ws, base) = workspace("sa-libnbd");
    // nbdcopy hands cowdisk a socket of its own (LISTEN_FDS=1) and copies the disk to its
    // stdout, which cowdisk shares: a single startup line there would corrupt the copy.
    let bin = cowdisk_bin();
    let mut cmd = tool("nbdcopy");
    cmd.current_dir(ws.dir()).args(["--", "["]).arg(&bin).args(["serve", "disk.cow", "--read-only", "]", "-"]);
    let o = run(&mut cmd);
    assert!(o.stdout == base, "nbdcopy's output is not the disk ({} bytes, {} expected)", o.stdout.len(), base.len());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("serving disk (read-only) at nbd+unix:///disk?socket="), "{err}");
    let info = run(tool("nbdinfo")
        .current_dir(ws.dir())
        .args(["--size", "--", "["])
        .arg(&bin)
        .args(["serve", "disk.cow", "]"]));
    assert_eq!(stdout_of(&info), format!("{SIZE}\n"));
    assert_eq!(ws.info("disk.cow")["flags"], serde_json::json!([]));
}

/// Makes this test process the reaper of the servers that `--fork` leaves behind once their
/// foreground process has exited, so that their exit status can be read.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl: {}", std::io::Error::last_os_error());
}

/// Waits (up to `timeout`) for the exit of `pid`, a process this one reaps.
fn wait_pid(pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: a valid int for the status; WNOHANG does not block.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)).or(Some(-1));
        }
        if r < 0 || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `script` in bash (with `$BIN` the cowdisk binary), and its exit code and stdout;
/// fails the test if it has not finished within `timeout`.
fn bash_within(ws: &Ws, script: &str, timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new("bash")
        .current_dir(ws.dir())
        .env("BIN", cowdisk_bin())
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bash");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let done = wait_until(timeout, || reader.is_finished());
    if !done {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for bash");
    assert!(done, "`{script}` did not finish within {timeout:?}");
    (status.code(), reader.join().expect("stdout reader"))
}

#[test]
fn fork_returns_once_serving_without_holding_the_callers_stdout_and_sigterm_stops_it_cleanly() {
    become_subreaper();
    let (ws, base) = workspace("fork");
    let (sock, pid_file) = (ws.p("nbd.sock"), ws.p("cowdisk.pid"));
    // $(...) returns only once every holder of its pipe has let go: the server must not keep it.
    let script = "out=$(\"$BIN\" serve --fork disk.cow --socket nbd.sock --pid-file cowdisk.pid); rc=$?; \
                  printf '%s\\n' \"$out\"; exit $rc";
    let (code, out) = bash_within(&ws, script, STARTUP_TIMEOUT);
    assert_eq!(code, Some(0), "{out}");
    // Serving already: no waiting, no retry.
    let mut c = NbdClient::connect_unix(&sock).expect("the socket accepts as soon as --fork returned");
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("a pid");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "serving disk at nbd+unix:///disk?socket=nbd.sock");
    let ctl = lines[1].strip_prefix("control channel at ").unwrap_or_else(|| panic!("{out}"));
    assert!(ctl.ends_with(&format!("/server-{pid}.sock")), "{out}");
    assert_eq!(lines[2], format!("running in the background as process {pid}"));
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("the server's descriptors");
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    // The control channel of the forked server answers.
    assert_eq!(ws.json(&["export", "list", "--json", "--control", ctl])[0]["name"], "disk");
    let acked = writes_then(c, || {
        // SAFETY: signalling the server this test started (and reaps).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    });
    assert_eq!(wait_pid(pid, STOP_TIMEOUT), Some(0), "the forked server did not exit 0 after SIGTERM");
    assert!(!pid_file.exists(), "the pid file outlived the server");
    assert!(!Path::new(ctl).exists() && !sock.exists(), "sockets outlived the server");
    assert_stopped_cleanly(&ws, &base, &acked);
}

#[test]
fn fork_fails_with_the_servers_error_line_when_it_cannot_start() {
    let (ws, _) = workspace("fork-fail");
    let o = ws.run(&["serve", "--fork", "missing.cow", "--socket", "nbd.sock"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.error_line().starts_with("cowdisk: missing.cow: open: "), "{}", o.describe());
    assert_eq!(o.stdout, "");
    // A pid file that cannot be made fails before the fork: nothing is left behind.
    let o = ws.run(&["serve", "--fork", "disk.cow", "--socket", "nbd.sock", "--pid-file", "no/such/dir/x.pid"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.error_line().starts_with("cowdisk: "), "{}", o.describe());
    assert!(o.error_line().contains("no/such/dir/x.pid: pid file: No such file or directory"), "{}", o.describe());
    assert_eq!(o.stdout, "");
    assert!(!ws.p("nbd.sock").exists());
    assert_eq!(ws.info("disk.cow")["flags"], serde_json::json!([]));
    // The image is free: another server takes it at once.
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&ws.p("nbd.sock"))]);
    assert!(server.stop().success());
}

#[test]
fn pid_file_in_the_foreground_is_written_when_serving_and_removed_at_sigterm() {
    let (ws, _) = workspace("pidfile");
    let (sock, pid_file) = (ws.p("nbd.sock"), ws.p("p.pid"));
    let mut server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--pid-file", s(&pid_file)]);
    server.daemon().wait_ready(&Ready::PidFile(pid_file.clone()), STARTUP_TIMEOUT).expect("pid file");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), format!("{}\n", server.pid()));
    assert!(server.stop().success());
    assert!(!pid_file.exists(), "the pid file outlived the server");
}

#[test]
fn a_server_killed_with_sigkill_leaves_nothing_behind_once_the_next_one_starts() {
    let (ws, _) = workspace("sweep");
    ws.create("other.cow", &["--size", "1M"]);
    let run = ws.p("run");
    std::fs::create_dir_all(&run).expect("mkdir run");
    let env = [("XDG_RUNTIME_DIR", run.to_str().expect("utf-8"))];
    let rundir = run.join("cowdisk");
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&rundir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let (disk, other, a_sock, b_sock) = (ws.p("disk.cow"), ws.p("other.cow"), ws.p("a.sock"), ws.p("b.sock"));
    let s = |p: &PathBuf| p.to_str().expect("utf-8").to_string();
    let (disk, other, a_sock, b_sock) = (s(&disk), s(&other), s(&a_sock), s(&b_sock));
    let mut a = Server::start_with_env(&[&disk, "--socket", &a_sock], &env);
    let a_server = format!("server-{}.sock", a.pid());
    // The control channel may come up just after the NBD socket the start waited for.
    let ready = |pid: u32| {
        let n = names();
        n.contains(&format!("server-{pid}.sock")) && n.iter().any(|n| n.starts_with("image-"))
    };
    assert!(wait_until(Duration::from_secs(10), || ready(a.pid())), "{:?}", names());
    let left = names();
    assert!(left.contains(&a_server), "{left:?}");
    a.kill9();
    assert_eq!(names(), left, "a killed server removed its files itself");

    let b = Server::start_with_env(&[&other, "--socket", &b_sock], &env);
    // B's control socket comes first, then the sweep, then B's link.
    let b_server = format!("server-{}.sock", b.pid());
    assert!(
        wait_until(Duration::from_secs(10), || {
            let n = names();
            n.len() == 2 && n.contains(&b_server)
        }),
        "{:?}",
        names()
    );
    let now = names();
    assert_eq!(now.len(), 2, "the dead server's socket and link are still there: {now:?}");
    assert!(now.contains(&format!("server-{}.sock", b.pid())), "{now:?}");
    b.stop();
    assert!(names().is_empty(), "{:?}", names());
}

/// systemd's `Type=notify` (sd_notify(3)): with NOTIFY_SOCKET set, the server sends READY=1
/// with its pid once its socket accepts connections (a client connecting the moment it
/// arrives is served), and STOPPING=1 at SIGTERM; a path and an abstract name alike.
#[test]
fn notify_socket_is_told_ready_once_serving_and_stopping_at_sigterm() {
    let (ws, _) = workspace("notify");
    let abstract_name = format!("cowdisk-test-notify-{}", std::process::id());
    for (addr, bound) in [
        (s(&ws.p("notify.sock")).to_owned(), std::os::unix::net::UnixDatagram::bind(ws.p("notify.sock"))),
        (format!("@{abstract_name}"), {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("an address");
            std::os::unix::net::UnixDatagram::bind_addr(&a)
        }),
    ] {
        let listener = bound.expect("bind the notification socket");
        let sock = ws.p("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(cowdisk_bin());
        cmd.args(["serve", s(&ws.p("disk.cow")), "--socket", s(&sock)]).env("NOTIFY_SOCKET", &addr);
        let mut d = Daemon::spawn(cmd).expect("start the server");
        let ready = notification(&listener, STARTUP_TIMEOUT);
        assert_eq!(ready, format!("READY=1\nMAINPID={}\n", d.pid()), "{addr}\n{}", d.log());
        let mut c = NbdClient::connect_unix(&sock).expect("the socket accepts once READY=1 is sent");
        c.opt_go("disk", &[]).expect("NBD_OPT_GO");
        drop(c);
        d.signal(libc::SIGTERM).expect("SIGTERM");
        assert_eq!(notification(&listener, STOP_TIMEOUT), "STOPPING=1\n", "{addr}");
        assert_eq!(d.wait_exit(STOP_TIMEOUT).and_then(|s| s.code()), Some(0), "{}", d.log());
    }
}

/// A `Type=forking` service with `WatchdogSec=`: systemd sets WATCHDOG_PID to the process it
/// starts, which forks the server and exits; the server, the service's main process from then
/// on (MAINPID= in its READY=1), sends the keep-alives. It used to send none (WATCHDOG_PID
/// named the process that had exited), and systemd would have killed the service once
/// `WatchdogSec=` passed.
#[test]
fn a_forked_server_sends_the_keep_alives_meant_for_the_process_that_started_it() {
    become_subreaper();
    let (ws, _) = workspace("fork-watchdog");
    let listen_at = ws.p("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&listen_at).expect("bind the notification socket");
    // `exec` keeps the shell's process id: WATCHDOG_PID names the process started, as systemd's does.
    let script = format!(
        "export NOTIFY_SOCKET='{}' WATCHDOG_USEC=400000 WATCHDOG_PID=$$; \
         exec \"$BIN\" serve --fork disk.cow --socket nbd.sock --pid-file cowdisk.pid >/dev/null",
        s(&listen_at)
    );
    let (code, _) = bash_within(&ws, &script, STARTUP_TIMEOUT);
    assert_eq!(code, Some(0));
    let pid: i32 = std::fs::read_to_string(ws.p("cowdisk.pid")).expect("pid file").trim().parse().expect("a pid");
    // Stops the forked server even if an assertion below fails.
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: signalling the server this test started (and reaps).
            unsafe { libc::kill(self.0, libc::SIGTERM) };
            wait_pid(self.0, STOP_TIMEOUT);
        }
    }
    let stop = Stop(pid);
    assert_eq!(notification(&listener, STARTUP_TIMEOUT), format!("READY=1\nMAINPID={pid}\n"));
    for _ in 0..3 {
        assert_eq!(notification(&listener, Duration::from_secs(2)), "WATCHDOG=1\n", "no keep-alive from the server");
    }
    std::mem::forget(stop);
    // SAFETY: signalling the server this test started (and reaps).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(wait_pid(pid, STOP_TIMEOUT), Some(0));
}

/// SIGHUP without `--log` (a terminal that hangs up on a foreground server) stops the server
/// as SIGTERM does: requests already read answered, the image flushed and closed cleanly, the
/// pid file removed, exit 0. It used to be SIGHUP's default action: killed where it stood.
#[test]
fn sighup_without_log_stops_the_server_cleanly() {
    let (ws, base) = workspace("sighup");
    let (sock, pid_file) = (ws.p("nbd.sock"), ws.p("p.pid"));
    let mut server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--pid-file", s(&pid_file)]);
    server.daemon().wait_ready(&Ready::PidFile(pid_file.clone()), STARTUP_TIMEOUT).expect("pid file");
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    let acked = writes_then(c, || server.daemon().signal(libc::SIGHUP).expect("SIGHUP"));
    let status = server.daemon().wait_exit(STOP_TIMEOUT).expect("the server exits after SIGHUP");
    assert_eq!(status.code(), Some(0), "{status}: {}", server.log());
    assert!(!pid_file.exists() && !sock.exists(), "the pid file or socket outlived the server");
    assert_stopped_cleanly(&ws, &base, &acked);
}

/// `--log FILE`: once serving, the server's stderr is appended to FILE, forked (stdin and
/// stdout still /dev/null) or in the foreground; the startup lines still go to the caller. A
/// log that cannot be opened fails the start in one line, before anything is served.
#[test]
fn log_takes_the_servers_stderr_once_serving_forked_or_not() {
    become_subreaper();
    let (ws, _) = workspace("log");
    std::fs::write(ws.p("server.log"), "an earlier line\n").unwrap();
    let script = "out=$(\"$BIN\" serve --fork disk.cow --socket nbd.sock --pid-file cowdisk.pid --log server.log); \
                  rc=$?; printf '%s\\n' \"$out\"; exit $rc";
    let (code, out) = bash_within(&ws, script, STARTUP_TIMEOUT);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("serving disk at "), "the startup lines go to the caller: {out}");
    let pid: i32 = std::fs::read_to_string(ws.p("cowdisk.pid")).expect("pid file").trim().parse().expect("a pid");
    let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}")).expect("the server's descriptors");
    assert_eq!((fd(0), fd(1)), (PathBuf::from("/dev/null"), PathBuf::from("/dev/null")));
    assert_eq!(fd(2), ws.p("server.log"), "the forked server's stderr");
    // SAFETY: signalling the server this test started (and reaps).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(wait_pid(pid, STOP_TIMEOUT), Some(0));
    let log = std::fs::read_to_string(ws.p("server.log")).unwrap();
    assert!(log.starts_with("an earlier line\n"), "appended, not truncated: {log:?}");
    assert!(!log.contains("serving disk"), "the startup lines are not logged: {log:?}");

    let sock = ws.p("fg.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock), "--log", s(&ws.p("server.log"))]);
    // The socket accepts before the startup lines are printed and stderr moves to the log.
    let pid = server.pid();
    let stderr = || std::fs::read_link(format!("/proc/{pid}/fd/2")).ok();
    assert!(
        wait_until(STARTUP_TIMEOUT, || stderr().as_deref() == Some(ws.p("server.log").as_path())),
        "{:?}",
        stderr()
    );
    assert!(server.log().contains("serving disk at "), "{}", server.log());
    assert!(server.stop().success());

    let o = ws.run(&["serve", "disk.cow", "--socket", "x.sock", "--log", "no/such/dir/server.log"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.error_line().contains("no/such/dir/server.log: --log: No such file or directory"), "{}", o.describe());
    assert!(!ws.p("x.sock").exists(), "nothing served");
}

/// logrotate's way (rename the file, then `kill -HUP`): SIGHUP makes the server open `--log`
/// again, so that what it says afterwards goes to the new file and nothing more to the renamed
/// one, and it goes on serving. A NOTIFY_SOCKET nobody listens on makes it say something at
/// READY=1 and again at STOPPING=1.
#[test]
fn sighup_opens_the_log_again_after_it_was_renamed() {
    let (ws, _) = workspace("logrotate");
    let (sock, log, rotated) = (ws.p("nbd.sock"), ws.p("server.log"), ws.p("server.log.1"));
    let server = Server::start_with_env(
        &[s(&ws.p("disk.cow")), "--socket", s(&sock), "--log", s(&log)],
        &[("NOTIFY_SOCKET", s(&ws.p("nobody.sock")))],
    );
    let said = |p: &Path| std::fs::read_to_string(p).unwrap_or_default().matches("cannot notify").count();
    assert!(wait_until(STARTUP_TIMEOUT, || said(&log) == 1), "READY=1's failure is not in the log");
    std::fs::rename(&log, &rotated).expect("rotate the log");
    let pid = server.pid();
    // SAFETY: signalling the server this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let stderr = || std::fs::read_link(format!("/proc/{pid}/fd/2")).ok();
    assert!(wait_until(STARTUP_TIMEOUT, || stderr().as_deref() == Some(log.as_path())), "stderr is {:?}", stderr());
    let mut c = NbdClient::connect_unix(&sock).expect("still serving after SIGHUP");
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    c.write(0, &[7u8; 4096]).expect("write");
    drop(c);
    assert!(server.stop().success(), "the server did not stop cleanly");
    assert_eq!((said(&rotated), said(&log)), (1, 1), "STOPPING=1's failure goes to the new log alone");
}
