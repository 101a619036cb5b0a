//! A server that stops, or removes an export by force, while a real client (libnbd, through
//! nbdsh; over a Unix socket, and over TCP with TLS) keeps talking to it: every request gets an answer, NBD_ESHUTDOWN for those the
//! server refused (NBD_REP_ERR_SHUTDOWN for options), the refused writes are not in the
//! image, the acknowledged ones are, and the server does not wait out its grace period.

mod common;

use common::nbdtest::*;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;
/// Well under the server's 10 s grace period: a server that needed it would fail the tests.
const PROMPT: Duration = Duration::from_secs(5);
/// The server's quiet spell before it closes a winding-down connection's read side
/// (src/nbd/winding.rs, `QUIET`), in seconds.
const QUIET_SECS: f64 = 0.2;

/// The byte block `b` is written with the `g`th time (never zero, so a block left unwritten
/// tells); the scripts compute it as `(b + 17 * g) % 251 + 1`.
fn fill(b: u64, g: u64) -> u8 {
    ((b + 17 * g) % 251 + 1) as u8
}

/// Runs `script` in nbdsh (libnbd's Python shell; `h` is its handle) and returns its stdout.
/// Lines of the form `block B ok` or `block B ERRNO` say what became of each write.
fn nbdsh(script: &str) -> String {
    // nbdsh runs the first python3 on PATH; Debian's libnbd module is built for Debian's
    // (a pyenv python3 ahead of it on PATH, as on the CI machines, lacks it).
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = tool("nbdsh").env("PATH", path).arg("-c").arg(script).output().expect("run nbdsh");
    assert!(
        out.status.success(),
        "nbdsh failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What became of each write, in the order the client learned it: (block, how many times it
/// was written before, "ok" or the errno name libnbd reported), from lines `block B G OUTCOME`.
fn outcomes(stdout: &str) -> Vec<(u64, u64, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("block")).then(|| {
                let mut n = || w.next().and_then(|x| x.parse().ok()).expect("a number");
                let (b, g) = (n(), n());
                (b, g, w.next().unwrap_or("").to_owned())
            })
        })
        .collect()
}

/// The last acknowledged write of each block (no two writes of a block are in flight at once
/// in these scripts, so it is the one the block must hold).
fn acknowledged(done: &[(u64, u64, String)]) -> BTreeMap<u64, u64> {
    let mut last = BTreeMap::new();
    for (b, g, _) in done.iter().filter(|(_, _, o)| o == "ok") {
        let e = last.entry(*b).or_insert(*g);
        *e = (*e).max(*g);
    }
    last
}

/// Serves `image` again and checks it block by block: each block holds its last acknowledged
/// write; blocks with none (refused, never sent) read as zeros.
fn assert_only_acknowledged_writes_landed(dir: &TempDir, image: &Path, size: u64, acked: &BTreeMap<u64, u64>) {
    let server = serve(&[image], &dir.join("again.sock"), &[]);
    let mut c = simple_client(&server, "disk");
    for piece in 0..size / MIB {
        let got = c.read(piece * MIB, MIB as u32).expect("read back");
        for (i, bytes) in got.chunks(BLOCK as usize).enumerate() {
            let b = piece * MIB / BLOCK + i as u64;
            let want = acked.get(&b).map_or(0, |&g| fill(b, g));
            assert!(bytes.iter().all(|&x| x == want), "block {b} should read {want:#x} throughout");
        }
    }
}

/// A server of `disk.cow` (`size`) on `nbd.sock` with its control channel on `control.sock`
/// and `extra` arguments, in a new test directory; `None` without nbdsh (skipped).
struct Rig {
    server: Server,
    image: PathBuf,
    sock: PathBuf,
    control: PathBuf,
    dir: TempDir,
}

fn rig(size: &str, extra: &[&str]) -> Option<Rig> {
    if !require_tool("nbdsh") {
        return None;
    }
    let dir = TempDir::for_test();
    let image = create_image(&dir, "disk.cow", size);
    let (sock, control) = (dir.join("nbd.sock"), dir.join("control.sock"));
    let mut args = vec!["--control", path_str(&control)];
    args.extend_from_slice(extra);
    let server = serve(&[&image], &sock, &args);
    Some(Rig { server, image, sock, control, dir })
}

fn wait_exit_promptly(server: &mut Server, what: &str) {
    let t = Instant::now();
    let status = server.daemon().wait_exit(PROMPT).unwrap_or_else(|| panic!("no exit after {what}\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "exit status\n{}", server.log());
    eprintln!("server exited {:?} after {what}", t.elapsed());
}

/// Writes one block after another (queue depth 1) through a client that connects with
/// `connect` (Python, on handle `h`); after 300 it sends the server SIGTERM and writes on until
/// a write fails, as a guest would, tries one more, then disconnects. Both failures must be
/// ESHUTDOWN, the server must exit promptly, and only the acknowledged writes may be in the
/// image.
fn writes_across_sigterm(serve_extra: &[&str], connect: impl FnOnce(&Path) -> String) {
    let Some(Rig { mut server, image, sock, dir, .. }) = rig("16M", serve_extra) else { return };
    let script = format!(
        r#"
import os, signal
{connect}
b = 0
while True:
    try:
        h.pwrite(bytes([b % 251 + 1]) * 4096, b * 4096)
        print("block", b, 0, "ok")
    except nbd.Error as e:
        print("block", b, 0, e.errno)
        break
    b += 1
    if b == 300:
        os.kill({pid}, signal.SIGTERM)
try:
    h.pwrite(bytes([b % 251 + 1]) * 4096, (b + 1) * 4096)
    print("block", b + 1, 0, "ok")
except nbd.Error as e:
    print("block", b + 1, 0, e.errno)
h.shutdown()
"#,
        connect = connect(&sock),
        pid = server.pid(),
    );
    let done = outcomes(&nbdsh(&script));
    let refused: Vec<_> = done.iter().filter(|(_, _, o)| o != "ok").collect();
    assert_eq!(refused.len(), 2, "the first write refused, and the one after it: {refused:?}");
    for (b, _, why) in &refused {
        assert_eq!(why, "ESHUTDOWN", "write to block {b}");
        assert!(*b >= 300, "refused before the signal");
    }
    wait_exit_promptly(&mut server, "SIGTERM and the client's disconnect");
    drop(server);
    assert_only_acknowledged_writes_landed(&dir, &image, 16 * MIB, &acknowledged(&done));
}

#[test]
fn a_client_writing_when_the_server_stops_is_answered_eshutdown_and_only_acknowledged_writes_land() {
    writes_across_sigterm(&[], |sock| format!("h.connect_unix({:?})", path_str(sock)));
}

/// The same over TCP and TLS: the refusals go through the TLS pump, and the read side closed
/// at the end is the raw socket's.
#[test]
fn a_tls_client_over_tcp_writing_when_the_server_stops_is_answered_eshutdown_too() {
    if !require_tool("openssl") {
        return;
    }
    let pki_dir = TempDir::for_test();
    let pki = common::tls::make_pki(pki_dir.path(), "wind");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (cert, key) = (path_str(&pki.cert), path_str(&pki.key));
    let uri = common::tls::tls_tcp_uri(port, "disk", &pki.client);
    writes_across_sigterm(&["--listen", &listen, "--tls-cert", cert, "--tls-key", key], |_| {
        format!("h.set_uri_allow_local_file(True)\nh.connect_uri({uri:?})")
    });
}

/// A request that runs past the quiet spell keeps the connection open: a FLUSH of what was
/// written just before is running when SIGTERM comes; once it is answered, the client's next
/// write is answered ESHUTDOWN, not lost on a closed socket. The flush must outlast the quiet
/// spell twice and end before the longest a wind-down reads on (2 s), whatever the machine's
/// own disk: the image lives on an ext4 on a disk that nbdkit serves at 175 MB/s (its rate
/// filter), through nbdfuse and a loop device, where the flush of 64 MiB written just before
/// took 0.98 s in each of several runs. (The test used to rely on the machine's disk being
/// slow enough, and proved nothing on one that took 2 GiB in 0.1 s.)
#[test]
fn a_client_waiting_for_a_slow_flush_at_sigterm_is_still_answered_eshutdown_after_it() {
    if !require_tools(&["nbdsh", "nbdkit", "nbdfuse"]) || !require_loop_mount() {
        return;
    }
    let dir = TempDir::for_test();
    let kit_sock = dir.join("nbdkit.sock");
    let mut kit = tool("nbdkit");
    kit.args(["--foreground", "--unix"]).arg(&kit_sock).args(["--filter=rate", "memory", "1G", "rate=175M"]);
    let kit = Daemon::start(kit, Ready::UnixSocket(kit_sock.clone()));
    let fs = FsOverNbd::create(&format!("nbd+unix:///?socket={}", kit_sock.display()), dir.path());
    let image = fs.path().join("disk.cow");
    run(std::process::Command::new(cowdisk_bin()).arg("create").arg(&image).args(["--size", "256M"]));
    let sock = dir.join("nbd.sock");
    let mut server = serve(&[&image], &sock, &[]);
    let mb = 64u64;
    let script = format!(
        r#"
import os, signal, time
h.connect_unix({sock:?})
MB = {mb}
for k in range(MB):
    h.pwrite(b"".join(bytes([b % 251 + 1]) * 4096 for b in range(k * 256, (k + 1) * 256)), k << 20)
t = time.time()
c = h.aio_flush()
time.sleep(0.05)
os.kill({pid}, signal.SIGTERM)
while not h.aio_command_completed(c):
    h.poll(-1)
print("flush", time.time() - t)
try:
    h.pwrite(bytes([1]) * 4096, MB << 20)
    print("after ok")
except nbd.Error as e:
    print("after", e.errno)
h.shutdown()
"#,
        sock = path_str(&sock),
        pid = server.pid(),
    );
    let out = nbdsh(&script);
    let flush: f64 =
        out.lines().find_map(|l| l.strip_prefix("flush ")).and_then(|t| t.parse().ok()).expect("flush time");
    eprintln!("a flush of {mb} MiB took {flush:.3} s");
    assert!(flush > 2.0 * QUIET_SECS, "a flush of {mb} MiB in {flush:.3} s does not outlast the quiet spell twice");
    assert!(flush < 2.0, "a flush of {mb} MiB in {flush:.3} s outlasts the longest a wind-down reads on");
    assert!(out.lines().any(|l| l == "after ESHUTDOWN"), "the write after the flush:\n{out}");
    wait_exit_promptly(&mut server, "SIGTERM and the client's disconnect");
    drop(server);
    // Every 1 MiB write was acknowledged; the refused one did not land.
    let acked: BTreeMap<u64, u64> = (0..mb * 256).map(|b| (b, 0)).collect();
    assert_only_acknowledged_writes_landed(&dir, &image, (mb + 1) * MIB, &acked);
    fs.release().expect("unmount the file system, detach its loop device, unmount nbdfuse");
    assert!(kit.stop().success());
}

#[test]
fn a_forced_export_removal_answers_every_pipelined_write_ok_or_eshutdown() {
    let Some(Rig { mut server, image, sock, control, dir }) = rig("32M", &[]) else { return };
    // Keeps 64 writes in flight, over the blocks in a scattered order and round again (no two
    // writes of a block in flight at once); after 500 are sent it starts `cowdisk export
    // remove --force` and writes on; once a write fails it sends no more, collects the answers
    // of those in flight, disconnects, and waits for the removal. At most a minute.
    let script = format!(
        r#"
import errno, subprocess, time
h.connect_unix({sock:?})
N = 8192
state = {{"inflight": 0, "stop": False}}
def done(b, g):
    def cb(err):
        state["inflight"] -= 1
        e = err.value if hasattr(err, "value") else err
        print("block", b, g, "ok" if e == 0 else errno.errorcode.get(e, e))
        if e != 0:
            state["stop"] = True
        return 0
    return cb
sent = 0
remover = None
deadline = time.time() + 60
while True:
    while not state["stop"] and state["inflight"] < 64 and time.time() < deadline:
        b, g = (sent * 7919) % N, sent // N
        h.aio_pwrite(bytes([(b + 17 * g) % 251 + 1]) * 4096, b * 4096, completion=done(b, g))
        state["inflight"] += 1
        sent += 1
    if remover is None and sent >= 500:
        remover = subprocess.Popen([{bin:?}, "export", "remove", "disk", "--force", "--control", {control:?}],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if state["inflight"] == 0 and (state["stop"] or time.time() >= deadline):
        break
    h.poll(1)
h.shutdown()
out, _ = remover.communicate()
print("remove", remover.returncode, out.strip())
"#,
        sock = path_str(&sock),
        bin = path_str(&cowdisk_bin()),
        control = path_str(&control),
    );
    let out = nbdsh(&script);
    assert!(out.contains("remove 0 export disk removed"), "the removal succeeds:\n{out}");
    let done = outcomes(&out);
    let refused = done.iter().filter(|(_, _, o)| o == "ESHUTDOWN").count();
    let other: Vec<_> = done.iter().filter(|(_, _, o)| o != "ok" && o != "ESHUTDOWN").collect();
    assert!(other.is_empty(), "every write is acknowledged or refused with ESHUTDOWN: {other:?}");
    assert!(refused >= 1, "the client wrote on for a minute and no write was refused");
    eprintln!("{} writes acknowledged, {refused} refused", done.len() - refused);
    // The server serves on, without the export; its image is closed and can be served anew.
    assert!(server.is_running(), "the server keeps running\n{}", server.log());
    assert_eq!(server.stop().code(), Some(0));
    assert_only_acknowledged_writes_landed(&dir, &image, 32 * MIB, &acknowledged(&done));
}

#[test]
fn a_client_still_negotiating_when_the_server_stops_is_answered_rep_err_shutdown() {
    let Some(Rig { mut server, sock, dir: _dir, .. }) = rig("16M", &[]) else { return };
    // In libnbd's option mode the client stays in negotiation: it lists the exports, the
    // server is sent SIGTERM, and the client asks for NBD_OPT_INFO until one is refused.
    let script = format!(
        r#"
import os, signal, time
h.set_opt_mode(True)
h.connect_unix({sock:?})
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
print("listed", names)
os.kill({pid}, signal.SIGTERM)
for i in range(200):
    try:
        h.opt_info()
        time.sleep(0.01)
    except nbd.Error as e:
        print("info", e.errno, e.string)
        break
h.opt_abort()
print("aborted")
"#,
        sock = path_str(&sock),
        pid = server.pid(),
    );
    let out = nbdsh(&script);
    assert!(out.contains("listed ['disk']"), "{out}");
    let info = out.lines().find(|l| l.starts_with("info ")).unwrap_or_else(|| panic!("no option refused:\n{out}"));
    assert!(info.starts_with("info ESHUTDOWN "), "refused as shutting down (NBD_REP_ERR_SHUTDOWN): {info}");
    assert!(out.contains("aborted"), "NBD_OPT_ABORT is still answered:\n{out}");
    wait_exit_promptly(&mut server, "SIGTERM and the client's abort");
}
