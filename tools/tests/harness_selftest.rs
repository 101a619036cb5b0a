//! Self-tests of the shared integration-test harness (tests/common): the raw NBD client against real third-party servers (nbdkit, qemu-nbd), and the daemon / nbdfuse / loop / mount guards releasing everything they took.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::nbdclient::*;
use common::*;

const DISK_SIZE: u64 = 64 * MIB;

/// nbdkit's memory plugin: a sparse 64 MiB RAM disk, a real NBD server.
fn nbdkit_memory(dir: &TempDir) -> (Daemon, std::path::PathBuf) {
    let sock = dir.join("nbdkit.sock");
    let mut cmd = tool("nbdkit");
    // --foreground: otherwise nbdkit forks and the guard would track the wrong pid.
    cmd.args(["--foreground", "--unix"]).arg(&sock).args(["memory", "64M"]);
    (Daemon::start(cmd, Ready::UnixSocket(sock.clone())), sock)
}

/// Handshake, structured replies, base:allocation and GO in the usual order.
fn full_client(sock: &Path) -> NbdClient<UnixStream> {
    let mut c = NbdClient::connect_unix(sock).expect("connect + greeting");
    c.opt_structured_reply().expect("structured replies");
    let ctx = c.opt_set_meta_context("", &[BASE_ALLOCATION]).expect("set meta context");
    assert_eq!(ctx.len(), 1, "{ctx:?}");
    assert_eq!(ctx[0].name, BASE_ALLOCATION);
    c.opt_go("", &[NBD_INFO_BLOCK_SIZE]).expect("GO");
    c
}

/// The flags of the extent covering `pos`, given extents starting at `start`.
fn status_at(extents: &[Extent], start: u64, pos: u64) -> Option<u32> {
    let mut at = start;
    for e in extents {
        if pos < at + u64::from(e.length) {
            return Some(e.flags);
        }
        at += u64::from(e.length);
    }
    None
}

#[test]
fn handshake_go_and_simple_read_write_flush_roundtrip() {
    if !require_tool("nbdkit") {
        return;
    }
    let dir = TempDir::for_test();
    let (server, sock) = nbdkit_memory(&dir);

    let mut c = NbdClient::connect_unix(&sock).unwrap();
    assert_ne!(c.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE, 0);
    assert_ne!(c.client_flags & NBD_FLAG_C_FIXED_NEWSTYLE, 0);
    // NO_ZEROES must be echoed exactly when offered.
    assert_eq!(c.client_flags & NBD_FLAG_C_NO_ZEROES != 0, c.handshake_flags & NBD_FLAG_NO_ZEROES != 0);

    let list = c.opt_list().unwrap();
    assert!(list.iter().any(|e| e.name.is_empty()), "default export listed: {list:?}");

    let info = c.opt_info("", &[NBD_INFO_BLOCK_SIZE]).unwrap();
    assert_eq!(info.size, DISK_SIZE);
    let go = c.opt_go("", &[NBD_INFO_BLOCK_SIZE]).unwrap();
    assert_eq!(go.size, DISK_SIZE);
    assert_eq!(go.transmission_flags, info.transmission_flags, "INFO then GO must agree");
    assert!(go.has_flag(NBD_FLAG_HAS_FLAGS) && go.has_flag(NBD_FLAG_SEND_FLUSH), "{go:?}");
    assert!(!go.has_flag(NBD_FLAG_READ_ONLY));
    if let Some((min, pref, max)) = go.block_size {
        assert!(min <= pref && pref <= max, "{:?}", go.block_size);
    }

    let data = random_bytes(64 * 1024, 1);
    c.write(MIB, &data).unwrap();
    c.flush().unwrap();
    assert_bytes_eq(&c.read(MIB, data.len() as u32).unwrap(), &data, "read back");
    assert!(c.read(8 * MIB, 4096).unwrap().iter().all(|&b| b == 0), "unwritten area reads as zeroes");

    // Without structured replies everything comes back as simple replies.
    let cookie = c.next_cookie();
    c.send_request(0, NBD_CMD_READ, cookie, MIB, 512, &[]).unwrap();
    match c.read_reply().unwrap() {
        Reply::Simple { cookie: got, error: 0, data: d } => {
            assert_eq!(got, cookie);
            assert_bytes_eq(&d, &data[..512], "simple read payload");
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }

    // Reading past the end is an error, reported and survivable.
    let err = c.read(DISK_SIZE, 512).unwrap_err();
    let e = cmd_error(&err).unwrap_or_else(|| panic!("expected an NBD error, got {err}"));
    assert_eq!(e.error, NBD_EINVAL, "{e}");
    c.flush().unwrap();

    c.disconnect().unwrap();
    assert_eq!(c.peer_state(Duration::from_secs(5)).unwrap(), PeerState::Closed);

    let status = server.stop();
    assert!(status.success() || status.code().is_none(), "nbdkit exit status {status}");
}

#[test]
fn raw_options_and_malformed_input_get_error_replies() {
    if !require_tool("nbdkit") {
        return;
    }
    let dir = TempDir::for_test();
    let (_server, sock) = nbdkit_memory(&dir);
    let mut c = NbdClient::connect_unix(&sock).unwrap();

    // An option no server knows.
    let replies = c.option_exchange(0x7777_0001, b"whatever").unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, NBD_REP_ERR_UNSUP, "{replies:?}");

    // NBD_OPT_LIST must not carry data.
    let err = c.option_exchange(NBD_OPT_LIST, b"junk").unwrap();
    assert_eq!(err.last().unwrap().reply_type, NBD_REP_ERR_INVALID, "{err:?}");

    // GO whose name length claims more bytes than the option carries.
    let mut bad = NbdClient::<UnixStream>::info_payload("", &[]);
    bad[..4].copy_from_slice(&1000u32.to_be_bytes());
    let err = c.option_exchange(NBD_OPT_GO, &bad).unwrap();
    assert!(err.last().unwrap().is_error(), "{err:?}");

    // Meta contexts before structured replies are invalid.
    let err = c.opt_set_meta_context("", &[BASE_ALLOCATION]).unwrap_err();
    let rep = rep_error(&err).unwrap_or_else(|| panic!("expected an option error, got {err}"));
    assert!(rep.reply_type & NBD_REP_FLAG_ERROR != 0, "{rep}");

    // Still negotiating normally after all that.
    c.opt_structured_reply().unwrap();
    let listed = c.opt_list_meta_context("", &[]).unwrap();
    assert!(listed.iter().any(|m| m.name == BASE_ALLOCATION), "{listed:?}");

    let abort = c.opt_abort().unwrap();
    if let Some(r) = abort {
        assert_eq!(r.reply_type, NBD_REP_ACK);
    }
    assert_eq!(c.peer_state(Duration::from_secs(5)).unwrap(), PeerState::Closed);

    // A client that sends garbage instead of flags gets hung up on.
    let mut g = NbdClient::connect_unix_raw(&sock).unwrap();
    g.read_greeting().unwrap();
    g.send_client_flags(0xffff_fff0).unwrap();
    assert_eq!(g.peer_state(Duration::from_secs(5)).unwrap(), PeerState::Closed);
}

#[test]
fn export_name_enters_transmission() {
    if !require_tool("nbdkit") {
        return;
    }
    let dir = TempDir::for_test();
    let (_server, sock) = nbdkit_memory(&dir);
    let mut c = NbdClient::connect_unix(&sock).unwrap();
    let info = c.opt_export_name("").unwrap();
    assert_eq!(info.size, DISK_SIZE);
    c.write(0, b"hello, export name").unwrap();
    assert_eq!(c.read(0, 18).unwrap(), b"hello, export name");
    c.disconnect().unwrap();
}

#[test]
fn structured_read_of_unwritten_area() {
    if !require_tool("nbdkit") {
        return;
    }
    let dir = TempDir::for_test();
    let (_server, sock) = nbdkit_memory(&dir);
    let mut c = full_client(&sock);

    let data = random_bytes(4096, 2);
    c.write(MIB, &data).unwrap();
    // One read spanning a hole, the data, and another hole.
    let resp = c.command(0, NBD_CMD_READ, MIB - 8192, 16384, &[]).unwrap();
    assert!(resp.structured, "{resp:?}");
    assert!(resp.chunks.last().unwrap().is_done());
    let got = resp.read_data().unwrap();
    assert!(got[..8192].iter().all(|&b| b == 0));
    assert_bytes_eq(&got[8192..12288], &data, "data between holes");
    assert!(got[12288..].iter().all(|&b| b == 0));

    let err = c.read(DISK_SIZE - 512, 1024).unwrap_err();
    assert!(cmd_error(&err).is_some(), "out-of-range read must be an NBD error: {err}");
}

/// qemu-nbd answers reads of unallocated areas with NBD_REPLY_TYPE_OFFSET_HOLE
/// (nbdkit sends data chunks), so it exercises the hole parsing path.
#[test]
fn structured_read_of_hole_from_qemu_nbd() {
    if !require_tools(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = TempDir::for_test();
    let image = dir.join("disk.qcow2");
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
    let sock = dir.join("qemu-nbd.sock");
    let mut cmd = tool("qemu-nbd");
    // --persistent: otherwise qemu-nbd exits after the readiness probe disconnects.
    cmd.args(["--persistent", "--format=qcow2", "--socket"]).arg(&sock).arg(&image);
    let _server = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));

    let mut c = full_client(&sock);
    let resp = c.command(0, NBD_CMD_READ, 0, 65536, &[]).unwrap();
    assert!(
        resp.chunks.iter().any(|ch| matches!(ch.kind, ChunkKind::OffsetHole { offset: 0, .. })),
        "expected a hole chunk, got {:?}",
        resp.chunks
    );
    assert!(resp.read_data().unwrap().iter().all(|&b| b == 0));

    let data = random_bytes(65536, 3);
    c.write(65536, &data).unwrap();
    let resp = c.command(0, NBD_CMD_READ, 0, 131072, &[]).unwrap();
    let got = resp.read_data().unwrap();
    assert!(got[..65536].iter().all(|&b| b == 0));
    assert_bytes_eq(&got[65536..], &data, "data after hole");
    assert!(resp.chunks.iter().any(|ch| matches!(ch.kind, ChunkKind::OffsetData { .. })));
}

#[test]
fn base_allocation_block_status_after_write() {
    if !require_tool("nbdkit") {
        return;
    }
    let dir = TempDir::for_test();
    let (_server, sock) = nbdkit_memory(&dir);
    let mut c = full_client(&sock);
    let ctx_id = c.meta_contexts()[0].id;

    let before = c.block_status(0, DISK_SIZE as u32, 0).unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].0, ctx_id);
    let flags = status_at(&before[0].1, 0, 2 * MIB).unwrap();
    assert_eq!(flags & (NBD_STATE_HOLE | NBD_STATE_ZERO), NBD_STATE_HOLE | NBD_STATE_ZERO);

    c.write(2 * MIB, &random_bytes(64 * 1024, 4)).unwrap();
    let after = c.block_status(0, DISK_SIZE as u32, 0).unwrap();
    let extents = &after[0].1;
    assert_eq!(status_at(extents, 0, 2 * MIB).unwrap() & NBD_STATE_HOLE, 0, "{extents:?}");
    assert_ne!(status_at(extents, 0, 0).unwrap() & NBD_STATE_HOLE, 0, "{extents:?}");
    assert_ne!(status_at(extents, 0, 40 * MIB).map_or(NBD_STATE_HOLE, |f| f) & NBD_STATE_HOLE, 0);

    let one = c.block_status(2 * MIB, 4096, NBD_CMD_FLAG_REQ_ONE).unwrap();
    assert_eq!(one[0].1.len(), 1, "REQ_ONE gives one extent: {one:?}");
    assert!(one[0].1[0].length <= 4096);
}

#[test]
fn pipelined_requests_are_matched_by_cookie() {
    if !require_tool("nbdkit") {
        return;
    }
    let dir = TempDir::for_test();
    // More threads than the default make out-of-order replies likely.
    let sock = dir.join("nbdkit.sock");
    let mut cmd = tool("nbdkit");
    cmd.args(["--foreground", "--threads", "16", "--unix"]).arg(&sock).args(["memory", "64M"]);
    let _server = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    let mut c = full_client(&sock);

    const N: u64 = 32;
    const LEN: usize = 128 * 1024;
    let cookie_of = |i: u64| 0xfeed_0000_0000_0000 | (i * 7919);
    for i in 0..N {
        let data = random_bytes(LEN, 100 + i);
        c.send_request(0, NBD_CMD_WRITE, cookie_of(i), i * LEN as u64, LEN as u32, &data).unwrap();
    }
    assert_eq!(c.inflight_count(), N as usize);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let r = c.read_response().unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.request_type, NBD_CMD_WRITE);
        assert!(seen.insert(r.cookie), "duplicate reply for {:#x}", r.cookie);
    }
    assert_eq!(seen, (0..N).map(cookie_of).collect());

    // Reads in reverse order, collected in whatever order they finish.
    for i in (0..N).rev() {
        c.send_request(0, NBD_CMD_READ, cookie_of(i), i * LEN as u64, LEN as u32, &[]).unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..N {
        let r = c.read_response().unwrap();
        let i = (0..N).find(|&i| cookie_of(i) == r.cookie).expect("known cookie");
        assert_bytes_eq(&r.read_data().unwrap(), &random_bytes(LEN, 100 + i), "pipelined read");
        order.push(i);
    }
    eprintln!("pipelined read completion order: {order:?}");
    assert_eq!(c.inflight_count(), 0);

    // wait_response keeps other completions for later.
    let a = c.next_cookie();
    let b = c.next_cookie();
    c.send_request(0, NBD_CMD_READ, a, 0, 4096, &[]).unwrap();
    c.send_request(0, NBD_CMD_FLUSH, b, 0, 0, &[]).unwrap();
    assert_eq!(c.wait_response(b).unwrap().cookie, b);
    assert_eq!(c.wait_response(a).unwrap().cookie, a);
}

#[test]
fn daemon_guard_reports_early_exit_timeouts_and_stops() {
    // Early exit: the error carries the daemon's output.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo out-marker; echo err-marker >&2; exit 3"]);
    let err = Daemon::try_start(cmd, Ready::UnixSocket("/nonexistent/sock".into()), Duration::from_secs(5))
        .err()
        .expect("must fail");
    assert!(err.contains("exited") && err.contains("out-marker") && err.contains("err-marker"), "{err}");

    // Never ready: stopped after the timeout, not left behind.
    let dir = TempDir::for_test();
    let pidfile = dir.join("pid");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("echo $$ > {}.tmp; exec sleep 60", pidfile.display()));
    let err = Daemon::try_start(cmd, Ready::PidFile(pidfile.clone()), Duration::from_millis(500))
        .err()
        .expect("must time out");
    assert!(err.contains("not ready"), "{err}");
    let pid: u32 = std::fs::read_to_string(format!("{}.tmp", pidfile.display())).unwrap().trim().parse().unwrap();
    assert!(!pid_exists(pid), "timed-out daemon {pid} must be gone");

    // stop() with a process that ignores SIGTERM falls back to SIGKILL; use
    // a short grace period through terminate() to keep the test fast.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' TERM; echo ready > \"$0\"; while :; do sleep 1; done"]).arg(&pidfile);
    let mut d = Daemon::start(cmd, Ready::PidFile(pidfile.clone()));
    let pid = d.pid();
    let status = d.terminate(Duration::from_millis(300));
    assert_eq!(status.code(), None, "killed by a signal: {status}");
    drop(d);
    assert!(!pid_exists(pid));

    // kill9 then drop: nothing left, and drop copes with the reaped child.
    let _ = std::fs::remove_file(&pidfile);
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let mut d = Daemon::start(cmd, Ready::Immediately);
    let pid = d.pid();
    assert!(d.is_running());
    d.kill9();
    assert!(!d.is_running());
    drop(d);
    assert!(!pid_exists(pid));

    // Drop alone also stops a running daemon.
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let d = Daemon::start(cmd, Ready::Immediately);
    let pid = d.pid();
    drop(d);
    assert!(!pid_exists(pid));
}

#[test]
fn server_start_fails_with_log_when_cowdisk_exits_early() {
    // Whatever `cowdisk serve` grows into, a missing image must not serve.
    let dir = TempDir::for_test();
    let sock = dir.join("s.sock");
    let err = Server::try_start(&["--socket", sock.to_str().unwrap(), "/nonexistent/image.cow"])
        .err()
        .expect("must not become ready");
    assert!(err.contains("exited"), "{err}");
    assert!(Server::try_start(&["/nonexistent/image.cow"]).err().unwrap().contains("--socket"));
}

#[test]
fn uri_helpers() {
    assert_eq!(unix_uri(Path::new("/tmp/a b/s.sock"), ""), "nbd+unix:///?socket=/tmp/a%20b/s.sock");
    assert_eq!(unix_uri(Path::new("/tmp/s"), "base/x"), "nbd+unix:///base%2Fx?socket=/tmp/s");
}

#[test]
fn data_helpers_are_deterministic() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926, "standard CRC-32 check value");
    assert_eq!(crc32_update(crc32_update(0, b"1234"), b"56789"), 0xcbf4_3926);
    assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
    assert_ne!(random_bytes(1000, 7), random_bytes(1000, 8));

    let dir = TempDir::for_test();
    let (a, b) = (dir.join("a"), dir.join("b"));
    write_random_file(&a, 3 * MIB + 5, 9);
    write_random_file(&b, 3 * MIB + 5, 9);
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 3 * MIB + 5);
    assert_bytes_eq(&std::fs::read(&a).unwrap()[..4096], &random_bytes(4096, 9), "file prefix");
    assert_files_equal(&a, &b);
    assert_eq!(file_fingerprint(&a), file_fingerprint(&b));
    // Why not a CRC-32 of the file: a block that carries the CRC-32 of its own bytes (a
    // cowdisk header) changed together with that CRC leaves the file's CRC-32 as it was.
    let block = |gen: u8| {
        let mut v = vec![gen; 60];
        v.extend_from_slice(&crc32(&v).to_le_bytes());
        v
    };
    let (c1, c2) = (dir.join("c1"), dir.join("c2"));
    std::fs::write(&c1, [&random_bytes(100, 3)[..], &block(1), &random_bytes(100, 4)].concat()).unwrap();
    std::fs::write(&c2, [&random_bytes(100, 3)[..], &block(2), &random_bytes(100, 4)].concat()).unwrap();
    let crc_of = |p: &std::path::Path| crc32(&std::fs::read(p).unwrap());
    assert_eq!(crc_of(&c1), crc_of(&c2), "CRC-32 is blind to such a change");
    assert_ne!(file_fingerprint(&c1), file_fingerprint(&c2), "the fingerprint must see it");

    let f = open_rw(&b);
    std::os::unix::fs::FileExt::write_at(&f, b"x", 2 * MIB + 17).unwrap();
    assert_eq!(files_first_difference(&a, &b).unwrap(), Some(2 * MIB + 17));
    f.set_len(MIB).unwrap();
    assert_eq!(files_first_difference(&a, &b).unwrap(), Some(MIB));

    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(!path.exists(), "TempDir removed on drop");
}

/// Everything the stack took: loop device lines and mounts to check afterwards.
struct Taken {
    disk: std::path::PathBuf,
    fuse_dir: std::path::PathBuf,
    mnt_dir: std::path::PathBuf,
    nbdfuse_pid: u32,
}

fn assert_released(t: &Taken) {
    let lines = losetup_lines_mentioning(&t.disk);
    assert!(lines.is_empty(), "loop device still bound: {lines:?}");
    assert!(loops_backed_by(&t.disk).is_empty());
    assert!(!is_mounted(&t.mnt_dir), "{} still mounted", t.mnt_dir.display());
    assert!(!is_mounted(&t.fuse_dir), "{} still mounted", t.fuse_dir.display());
    assert!(!pid_exists(t.nbdfuse_pid), "nbdfuse {} still running", t.nbdfuse_pid);
}

fn build_stack_and_write(sock: &Path, work: &Path) -> (FsOverNbd, Taken) {
    let fs = FsOverNbd::create(&unix_uri(sock, ""), work);
    let taken = Taken {
        disk: fs.fuse.disk().to_path_buf(),
        fuse_dir: fs.fuse.mountpoint().to_path_buf(),
        mnt_dir: fs.path().to_path_buf(),
        nbdfuse_pid: fs.fuse.pid().unwrap(),
    };
    assert!(is_mounted(&taken.mnt_dir) && is_mounted(&taken.fuse_dir));
    assert!(loop_is_attached(fs.loopdev.path()));
    assert_eq!(losetup_lines_mentioning(&taken.disk).len(), 1);
    assert_eq!(loops_backed_by(&taken.disk), vec![fs.loopdev.path().to_path_buf()]);
    let file = fs.path().join("data.bin");
    write_random_file(&file, 3 * MIB, 11);
    assert_bytes_eq(&std::fs::read(&file).unwrap(), &random_bytes(3 * MIB as usize, 11), "data.bin");
    (fs, taken)
}

#[test]
fn ext4_over_nbdfuse_and_loop_is_released_on_drop_and_on_panic() {
    if !(require_tool("nbdkit") && require_fs_stack()) {
        return;
    }
    let dir = TempDir::for_test();
    let (server, sock) = nbdkit_memory(&dir);

    // Normal drop.
    let (fs, taken) = build_stack_and_write(&sock, &dir.subdir("a"));
    drop(fs);
    assert_released(&taken);

    // The data survived: remount the same export without formatting, then
    // release explicitly and check the filesystem is clean.
    let fs = FsOverNbd::attach(&unix_uri(&sock, ""), &dir.subdir("b"));
    let file = fs.path().join("data.bin");
    assert_bytes_eq(&std::fs::read(&file).unwrap(), &random_bytes(3 * MIB as usize, 11), "data.bin");
    let FsOverNbd { mount, loopdev, fuse } = fs;
    mount.unmount().unwrap();
    let fsck = fsck_ext4(loopdev.path());
    assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    let disk = fuse.disk().to_path_buf();
    loopdev.detach().unwrap();
    assert!(losetup_lines_mentioning(&disk).is_empty());
    fuse.unmount().unwrap();

    // A panic in the middle of a test unwinds through the guards.
    let work = dir.subdir("c");
    let taken = std::panic::catch_unwind(|| {
        let (_fs, taken) = build_stack_and_write(&sock, &work);
        std::panic::panic_any(taken)
    })
    .expect_err("must panic")
    .downcast::<Taken>()
    .expect("payload");
    assert_released(&taken);

    assert!(mounts_under(dir.path()).is_empty());
    server.stop();
}

#[test]
fn require_tool_skips_loudly_or_fails_on_ci() {
    assert!(require_tool("sh"));
    let missing_tool = "cowdisk-no-such-tool-xyz";
    if std::env::var("CI").as_deref() == Ok("true") {
        let err = std::panic::catch_unwind(|| require_tool(missing_tool)).expect_err("must panic on CI");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("CI=true") && msg.contains(missing_tool), "{msg}");
    } else {
        assert!(!require_tool(missing_tool));
    }
}

#[test]
fn busy_mount_falls_back_to_lazy_umount_and_loop_detaches_after() {
    if !(require_tools(&["losetup", "mkfs.ext4", "mount", "umount"]) && require_root()) {
        return;
    }
    let dir = TempDir::for_test();
    let image = dir.join("fs.img");
    std::fs::File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    let loopdev = LoopDev::attach(&image).unwrap();
    mkfs_ext4(loopdev.path());
    let mount = Mount::new(loopdev.path(), &dir.join("mnt")).unwrap();
    let target = mount.path().to_path_buf();
    let busy = std::fs::File::create(target.join("held-open")).unwrap();

    let err = mount.unmount().expect_err("busy fs cannot be unmounted normally");
    assert!(err.contains("umount -l"), "{err}");
    assert!(!is_mounted(&target), "lazy umount detached it");

    // The lazily detached fs pins the loop device until the last file closes.
    drop(busy);
    loopdev.detach().unwrap();
    assert!(losetup_lines_mentioning(&image).is_empty());
    assert!(loops_backed_by(&image).is_empty());
}
