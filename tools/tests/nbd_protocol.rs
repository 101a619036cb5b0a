//! End-to-end NBD protocol tests of `cowdisk serve` ("Serve the merged device over NBD"): the real binary driven by the harness's independent raw client (and the `nbd` crate's client for old-style EXPORT_NAME), covering the handshake, every command, bad input, disconnects, pipelining and multi-conn, and shutdown/locking.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::nbdclient::*;
use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Size of the images most tests serve.
const DISK: u64 = 16 * MIB;
/// The largest payload the server advertises (NBD_INFO_BLOCK_SIZE maximum).
const MAX_PAYLOAD_ADVERTISED: u32 = 32 << 20;

/// Every transmission flag a writable export must advertise (SEND_DF only comes with
/// structured replies).
const RW_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_SEND_FAST_ZERO
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_CAN_MULTI_CONN;
/// A read-only export: no FUA, TRIM, WRITE_ZEROES or FAST_ZERO.
const RO_FLAGS: u16 =
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;

/// Header flag DIRTY (format-spec §2.2), in the u64 at byte 72 of a header slot (§2.1).
const HEADER_FLAG_DIRTY: u64 = 1 << 1;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `cowdisk create DIR/FILE --size SIZE`.
fn create_image(dir: &TempDir, file: &str, size: &str) -> PathBuf {
    let p = dir.join(file);
    run(Command::new(cowdisk_bin()).arg("create").arg(&p).args(["--size", size]));
    p
}

/// `cowdisk create DIR/FILE --backing BASE --backing-format raw`.
fn create_overlay_on_raw(dir: &TempDir, file: &str, base: &Path) -> PathBuf {
    let p = dir.join(file);
    run(Command::new(cowdisk_bin()).arg("create").arg(&p).arg("--backing").arg(base).args(["--backing-format", "raw"]));
    p
}

/// `cowdisk serve IMAGES... --socket SOCK EXTRA...`, ready when the socket accepts.
fn serve(images: &[&Path], sock: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<&str> = images.iter().map(|p| path_str(p)).collect();
    args.extend(["--socket", path_str(sock)]);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A fresh image of `size` served alone as export "disk".
struct Fixture {
    // Declared first so the server stops before the directory is removed.
    server: Server,
    image: PathBuf,
    sock: PathBuf,
    dir: TempDir,
}

fn fixture_with(size: &str, extra: &[&str]) -> Fixture {
    let dir = TempDir::for_test();
    let image = create_image(&dir, "disk.cow", size);
    let sock = dir.join("nbd.sock");
    let server = serve(&[&image], &sock, extra);
    Fixture { server, image, sock, dir }
}

fn fixture() -> Fixture {
    fixture_with("16M", &[])
}

/// Greeting + GO on `name`, simple replies.
fn simple_client(server: &Server, name: &str) -> NbdClient<UnixStream> {
    let mut c = server.connect();
    c.opt_go(name, &[]).expect("NBD_OPT_GO");
    c
}

/// Greeting + structured replies + base:allocation + GO on `name`.
fn structured_client(server: &Server, name: &str) -> NbdClient<UnixStream> {
    let mut c = server.connect();
    c.opt_structured_reply().expect("NBD_OPT_STRUCTURED_REPLY");
    let ctx = c.opt_set_meta_context(name, &[BASE_ALLOCATION]).expect("NBD_OPT_SET_META_CONTEXT");
    assert_eq!(ctx.len(), 1, "one context selected: {ctx:?}");
    c.opt_go(name, &[]).expect("NBD_OPT_GO");
    c
}

fn client(server: &Server, name: &str, structured: bool) -> NbdClient<UnixStream> {
    if structured {
        structured_client(server, name)
    } else {
        simple_client(server, name)
    }
}

/// The request failed with exactly NBD error `expected` (not a transport error).
#[track_caller]
fn assert_nbd_error<T>(result: io::Result<T>, expected: u32, what: &str) {
    match result {
        Ok(_) => panic!("{what}: succeeded, expected {} ({expected})", errno_name(expected)),
        Err(e) => match cmd_error(&e) {
            Some(ce) => assert_eq!(ce.error, expected, "{what}: expected {}, got {ce}", errno_name(expected)),
            None => panic!("{what}: expected an {} reply, got a transport error: {e}", errno_name(expected)),
        },
    }
}

/// The option failed with exactly `expected` (an NBD_REP_ERR_*).
#[track_caller]
fn assert_rep_error<T: std::fmt::Debug>(result: io::Result<T>, expected: u32, what: &str) {
    match result {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {}", rep_name(expected)),
        Err(e) => match rep_error(&e) {
            Some(r) => assert_eq!(r.reply_type, expected, "{what}: expected {}, got {r}", rep_name(expected)),
            None => panic!("{what}: expected {}, got a transport error: {e}", rep_name(expected)),
        },
    }
}

/// A successful read after an error proves the connection is still in sync.
#[track_caller]
fn assert_usable<S: NbdStream>(c: &mut NbdClient<S>, what: &str) -> Vec<u8> {
    let data = c.read(0, 4096).unwrap_or_else(|e| panic!("connection unusable after {what}: {e}"));
    assert_eq!(data.len(), 4096, "read after {what}");
    data
}

/// The server hangs up within `within`.
#[track_caller]
fn assert_closed_within<S: NbdStream>(c: &mut NbdClient<S>, within: Duration, what: &str) {
    let state = c.peer_state(within).unwrap_or_else(|e| panic!("{what}: checking the connection: {e}"));
    assert_eq!(state, PeerState::Closed, "{what}: the server must close the connection within {within:?}");
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The flags of the header slot with the highest generation (format-spec §2).
fn header_flags(image: &Path) -> u64 {
    let mut b = vec![0u8; 8192];
    File::open(image)
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap_or_else(|e| panic!("cannot read the header of {}: {e}", image.display()));
    let le64 = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let mut best: Option<(u64, u64)> = None;
    for slot in b.chunks(4096) {
        let crc = u32::from_le_bytes(slot[4092..4096].try_into().unwrap());
        if &slot[..8] != b"COWDISK\0" || crc32(&slot[..4092]) != crc {
            continue;
        }
        let (generation, flags) = (le64(slot, 16), le64(slot, 72));
        if !matches!(best, Some((g, _)) if g >= generation) {
            best = Some((generation, flags));
        }
    }
    best.unwrap_or_else(|| panic!("{}: no valid header slot", image.display())).1
}

/// Block status of [offset, offset+len) as (start, end, flags) runs, asking again from the
/// first byte a reply left out (the server may describe only a prefix).
fn status_map<S: NbdStream>(c: &mut NbdClient<S>, offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let ctx = c.meta_contexts()[0].id;
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let want = (end - pos).min(u64::from(u32::MAX)) as u32;
        let reply = c.block_status(pos, want, 0).expect("NBD_CMD_BLOCK_STATUS");
        assert_eq!(reply.len(), 1, "one chunk per context: {reply:?}");
        assert_eq!(reply[0].0, ctx, "chunk carries the negotiated context id");
        let total: u64 = reply[0].1.iter().map(|e| u64::from(e.length)).sum();
        assert!(
            total <= u64::from(want),
            "descriptors ({total} bytes) exceed the {want}-byte request at {pos}: {reply:?}"
        );
        for e in &reply[0].1 {
            out.push((pos, pos + u64::from(e.length), e.flags));
            pos += u64::from(e.length);
        }
    }
    out
}

fn flags_at(map: &[(u64, u64, u32)], pos: u64) -> u32 {
    map.iter()
        .find(|(s, e, _)| (*s..*e).contains(&pos))
        .unwrap_or_else(|| panic!("offset {pos} not described by {map:?}"))
        .2
}

/// One request of a batch for [`send_batch`].
struct Req {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

impl Req {
    fn new(typ: u16, cookie: u64, offset: u64, length: u32, payload: Vec<u8>) -> Req {
        Req { flags: 0, typ, cookie, offset, length, payload }
    }
}

/// Sends a whole batch of requests from a second thread, leaving this one free to read
/// replies: the server stops reading requests while it cannot send replies, so a client
/// that writes a big batch before reading anything can deadlock on full socket buffers.
fn send_batch(c: &mut NbdClient<UnixStream>, reqs: Vec<Req>) -> thread::JoinHandle<io::Result<()>> {
    let mut wire = Vec::new();
    for r in reqs {
        if r.typ != NBD_CMD_DISC {
            c.expect_reply_for(r.cookie, r.typ, r.offset, r.length);
        }
        wire.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        wire.extend_from_slice(&r.flags.to_be_bytes());
        wire.extend_from_slice(&r.typ.to_be_bytes());
        wire.extend_from_slice(&r.cookie.to_be_bytes());
        wire.extend_from_slice(&r.offset.to_be_bytes());
        wire.extend_from_slice(&r.length.to_be_bytes());
        wire.extend_from_slice(&r.payload);
    }
    let mut tx = c.stream().try_clone().expect("clone the client socket");
    thread::spawn(move || tx.write_all(&wire))
}

/// Runs a command that is expected to exit by itself; kills it after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!(
                "{cmd:?} still running after {timeout:?}; killed it\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

#[test]
fn info_and_go_report_size_exact_flags_and_block_size_and_df_only_after_structured_reply() {
    let fx = fixture();
    let mut c = fx.server.connect();
    assert_eq!(
        c.handshake_flags,
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        "greeting offers fixed newstyle and no-zeroes"
    );

    let info = c.opt_info("disk", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION]).expect("NBD_OPT_INFO");
    assert_eq!(info.size, DISK);
    assert_eq!(info.transmission_flags, RW_FLAGS, "flags {:#06x}, want {RW_FLAGS:#06x}", info.transmission_flags);
    assert_eq!(info.block_size, Some((1, 4096, MAX_PAYLOAD_ADVERTISED)), "NBD_INFO_BLOCK_SIZE");
    assert_eq!(info.name.as_deref(), Some("disk"));
    assert!(info.description.as_deref().is_some_and(|d| !d.is_empty()), "description requested and given: {info:?}");
    assert!(info.unknown.is_empty(), "{info:?}");

    // INFO left us negotiating: structured replies can still be turned on, and then the
    // same export also advertises DF.
    c.opt_structured_reply().expect("NBD_OPT_STRUCTURED_REPLY");
    let info = c.opt_info("disk", &[]).expect("second NBD_OPT_INFO");
    assert_eq!(info.transmission_flags, RW_FLAGS | NBD_FLAG_SEND_DF);

    let go = c.opt_go("disk", &[NBD_INFO_BLOCK_SIZE]).expect("NBD_OPT_GO");
    assert_eq!(go.size, DISK);
    assert_eq!(go.transmission_flags, RW_FLAGS | NBD_FLAG_SEND_DF, "GO agrees with INFO");
    assert_eq!(go.block_size, Some((1, 4096, MAX_PAYLOAD_ADVERTISED)));
    // GO entered transmission.
    assert!(is_zero(&assert_usable(&mut c, "GO")));

    // Without structured replies GO gives exactly the base flags, no DF.
    let mut s = fx.server.connect();
    let go = s.opt_go("disk", &[]).expect("NBD_OPT_GO (simple)");
    assert_eq!(go.transmission_flags, RW_FLAGS, "flags {:#06x}", go.transmission_flags);
}

#[test]
fn read_only_export_advertises_read_only_without_fua_trim_or_write_zeroes_and_refuses_writes_with_eperm() {
    let dir = TempDir::for_test();
    let image = create_image(&dir, "disk.cow", "16M");
    let sock = dir.join("nbd.sock");
    let data = random_bytes(8192, 1);
    {
        let server = serve(&[&image], &sock, &[]);
        let mut c = simple_client(&server, "disk");
        c.write(0, &data).expect("write while writable");
        c.flush().expect("flush");
        c.disconnect().expect("disc");
        assert_eq!(server.stop().code(), Some(0));
    }
    let server = serve(&[&image], &sock, &["--read-only"]);

    let mut c = server.connect();
    let info = c.opt_info("disk", &[NBD_INFO_BLOCK_SIZE]).expect("NBD_OPT_INFO");
    assert_eq!(info.transmission_flags, RO_FLAGS, "flags {:#06x}, want {RO_FLAGS:#06x}", info.transmission_flags);
    c.opt_structured_reply().expect("structured replies");
    let go = c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    assert_eq!(go.transmission_flags, RO_FLAGS | NBD_FLAG_SEND_DF);

    for structured in [false, true] {
        let mut c = client(&server, "disk", structured);
        let mode = if structured { "structured" } else { "simple" };
        assert_nbd_error(
            c.write(0, &random_bytes(4096, 2)),
            NBD_EPERM,
            &format!("{mode}: write to a read-only export"),
        );
        assert_usable(&mut c, "a refused write");
        assert_nbd_error(c.trim(0, 4096), NBD_EPERM, &format!("{mode}: trim on a read-only export"));
        assert_usable(&mut c, "a refused trim");
        assert_nbd_error(c.write_zeroes(0, 4096, 0), NBD_EPERM, &format!("{mode}: write zeroes on a read-only export"));
        assert_usable(&mut c, "a refused write zeroes");
        c.flush().expect("flush is allowed on a read-only export");
        c.cache(0, 4096).expect("cache is allowed on a read-only export");
        assert_bytes_eq(&c.read(0, 8192).expect("read"), &data, "data unchanged by refused writes");
    }

    // The nbd crate's old-style client sees the same: read-only, and writes fail.
    let mut s = UnixStream::connect(&sock).expect("connect");
    let export = nbd::client::handshake(&mut s, b"disk").expect("nbd crate handshake");
    assert!(export.readonly, "{export:?}");
    assert!(!export.send_trim, "{export:?}");
    let mut nc = nbd::client::NbdClient::new(&mut s, &export);
    let err = nc.write(&[1u8; 512]).expect_err("write must fail");
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    let mut buf = vec![0u8; 8192];
    nc.seek(SeekFrom::Start(0)).unwrap();
    nc.read_exact(&mut buf).expect("read through the nbd crate");
    assert_bytes_eq(&buf, &data, "read-only data through the nbd crate");
}

#[test]
fn list_names_every_export_in_order() {
    let dir = TempDir::for_test();
    let a = create_image(&dir, "alpha.cow", "4M");
    let b = create_image(&dir, "beta.cow", "8M");
    let c3 = create_image(&dir, "gamma.cow", "1M");
    let sock = dir.join("nbd.sock");
    let server = serve(&[&a, &b, &c3], &sock, &["--name", "first", "--name", "second"]);

    let mut c = server.connect();
    let list = c.opt_list().expect("NBD_OPT_LIST");
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    // Named by --name in order; the third defaults to its file stem.
    assert_eq!(names, ["first", "second", "gamma"], "{list:?}");
    // LIST does not end negotiation.
    let info = c.opt_info("second", &[]).expect("INFO after LIST");
    assert_eq!(info.size, 8 * MIB);
    let info = c.opt_info("gamma", &[]).expect("INFO by default name");
    assert_eq!(info.size, MIB);
    // NBD_OPT_LIST with data is invalid, and haggling continues.
    let r = c.option_exchange(NBD_OPT_LIST, b"junk").expect("exchange");
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_INVALID, "{r:?}");
    assert_eq!(c.opt_list().expect("LIST again").len(), 3);
}

#[test]
fn abort_is_acked_then_the_server_closes() {
    let fx = fixture();
    let mut c = fx.server.connect();
    c.opt_structured_reply().expect("an option before ABORT");
    let reply = c.opt_abort().expect("NBD_OPT_ABORT").expect("the server ACKs ABORT before closing");
    assert_eq!(reply.option, NBD_OPT_ABORT);
    assert_eq!(reply.reply_type, NBD_REP_ACK, "{reply:?}");
    assert!(reply.data.is_empty());
    assert_closed_within(&mut c, Duration::from_secs(5), "after ABORT");
}

#[test]
fn structured_reply_with_data_is_invalid_and_without_makes_reads_and_errors_structured() {
    let fx = fixture();
    let mut c = fx.server.connect();
    let r = c.option_exchange(NBD_OPT_STRUCTURED_REPLY, b"x").expect("exchange");
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data: {r:?}");
    c.opt_structured_reply().expect("NBD_OPT_STRUCTURED_REPLY");
    c.opt_go("disk", &[]).expect("GO");
    let resp = c.command(0, NBD_CMD_READ, 0, 4096, &[]).expect("read");
    assert!(resp.structured, "{resp:?}");
    assert!(resp.chunks.last().is_some_and(Chunk::is_done));
    assert!(is_zero(&resp.read_data().expect("data")));
    // Errors come as an error chunk carrying a message for humans.
    let resp = c.command(0, NBD_CMD_READ, DISK, 4096, &[]).expect("reply");
    assert!(resp.structured, "{resp:?}");
    match resp.chunks.as_slice() {
        [only] if only.is_done() => match only.error() {
            Some((NBD_EINVAL, msg)) => assert!(!msg.is_empty(), "error chunk without a message"),
            other => panic!("expected an EINVAL error chunk, got {other:?}"),
        },
        other => panic!("expected one final error chunk, got {other:?}"),
    }
    c.flush().expect("flush");
}

#[test]
fn meta_context_options_need_structured_replies_and_offer_base_allocation() {
    let fx = fixture();
    let mut c = fx.server.connect();
    assert_rep_error(
        c.opt_list_meta_context("disk", &[BASE_ALLOCATION]),
        NBD_REP_ERR_INVALID,
        "LIST_META_CONTEXT before STRUCTURED_REPLY",
    );
    assert_rep_error(
        c.opt_set_meta_context("disk", &[BASE_ALLOCATION]),
        NBD_REP_ERR_INVALID,
        "SET_META_CONTEXT before STRUCTURED_REPLY",
    );
    c.opt_structured_reply().expect("structured replies");

    let names = |v: Vec<MetaContext>| v.into_iter().map(|m| m.name).collect::<Vec<_>>();
    let all = c.opt_list_meta_context("disk", &[]).expect("LIST all");
    assert_eq!(names(all), [BASE_ALLOCATION]);
    let ns = c.opt_list_meta_context("disk", &["base:"]).expect("LIST base:");
    assert_eq!(names(ns), [BASE_ALLOCATION]);
    let none = c.opt_list_meta_context("disk", &["qemu:dirty-bitmap:x"]).expect("LIST unknown");
    assert!(none.is_empty(), "{none:?}");
    assert_rep_error(
        c.opt_set_meta_context("nosuch", &[BASE_ALLOCATION]),
        NBD_REP_ERR_UNKNOWN,
        "SET_META_CONTEXT for an unknown export",
    );
    let none = c.opt_set_meta_context("disk", &["qemu:dirty-bitmap:x"]).expect("SET unknown context");
    assert!(none.is_empty(), "{none:?}");
    let set = c.opt_set_meta_context("disk", &[BASE_ALLOCATION]).expect("SET base:allocation");
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].name, BASE_ALLOCATION);
    let id = set[0].id;

    c.opt_go("disk", &[]).expect("GO");
    let bs = c.block_status(0, 64 * KIB as u32, 0).expect("block status");
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0].0, id, "block status uses the id SET_META_CONTEXT gave");
}

#[test]
fn export_name_enters_transmission_with_and_without_no_zeroes() {
    let fx = fixture();
    let data = random_bytes(4096, 3);
    // Modern client: NO_ZEROES agreed, 10-byte reply.
    let mut c = fx.server.connect();
    assert_ne!(c.client_flags & NBD_FLAG_C_NO_ZEROES, 0);
    let info = c.opt_export_name("disk").expect("NBD_OPT_EXPORT_NAME");
    assert_eq!(info.size, DISK);
    assert_eq!(info.transmission_flags, RW_FLAGS);
    c.write(MIB, &data).expect("write");
    assert_bytes_eq(&c.read(MIB, 4096).expect("read"), &data, "read back");

    // Old client: only FIXED_NEWSTYLE, so the reply carries 124 zero bytes.
    let mut old = NbdClient::connect_unix_raw(&fx.sock).expect("connect");
    old.read_greeting().expect("greeting");
    old.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE).expect("flags");
    let info = old.opt_export_name("disk").expect("EXPORT_NAME");
    assert_eq!(info.size, DISK);
    assert_bytes_eq(&old.read(MIB, 4096).expect("read"), &data, "old client sees the write");

    // A structured client entering by EXPORT_NAME gets structured replies and DF.
    let mut s = fx.server.connect();
    s.opt_structured_reply().expect("structured");
    let info = s.opt_export_name("disk").expect("EXPORT_NAME");
    assert_eq!(info.transmission_flags, RW_FLAGS | NBD_FLAG_SEND_DF);
    let resp = s.command(0, NBD_CMD_READ, MIB, 4096, &[]).expect("read");
    assert!(resp.structured);
    assert_bytes_eq(&resp.read_data().unwrap(), &data, "structured read");
}

#[test]
fn export_name_via_the_nbd_crate_reads_writes_trims_and_flushes() {
    use nbd::client::NbdExt;
    let fx = fixture();
    let mut s = UnixStream::connect(&fx.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let export = nbd::client::handshake(&mut s, b"disk").expect("nbd crate handshake");
    assert_eq!(export.size, DISK);
    assert!(!export.readonly && export.send_flush && export.send_trim, "{export:?}");
    let mut c = nbd::client::NbdClient::new(&mut s, &export);

    let data = random_bytes(64 * 1024, 4);
    c.seek(SeekFrom::Start(2 * MIB)).unwrap();
    c.write_all(&data).expect("write");
    c.flush().expect("flush");
    let mut back = vec![0u8; data.len()];
    c.seek(SeekFrom::Start(2 * MIB)).unwrap();
    c.read_exact(&mut back).expect("read");
    assert_bytes_eq(&back, &data, "nbd crate read back");

    c.seek(SeekFrom::Start(2 * MIB)).unwrap();
    c.trim(4096).expect("trim");
    c.seek(SeekFrom::Start(2 * MIB)).unwrap();
    c.read_exact(&mut back).expect("read after trim");
    assert!(is_zero(&back[..4096]), "trimmed block reads zero");
    assert_bytes_eq(&back[4096..], &data[4096..], "rest untouched by trim");

    // Reading the last bytes of the export works.
    let mut tail = vec![0u8; 512];
    c.seek(SeekFrom::Start(DISK - 512)).unwrap();
    c.read_exact(&mut tail).expect("read at the end");
    assert!(is_zero(&tail));
}

#[test]
fn unknown_and_malformed_options_get_error_replies_and_haggling_continues() {
    let fx = fixture();
    let mut c = fx.server.connect();
    let r = c.option_exchange(0x4242, b"whatever").expect("exchange");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].reply_type, NBD_REP_ERR_UNSUP, "{r:?}");
    let r = c.option_exchange(NBD_OPT_PEEK_EXPORT, &[]).expect("exchange");
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_UNSUP, "{r:?}");
    let r = c.option_exchange(NBD_OPT_STARTTLS, &[]).expect("exchange");
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_UNSUP, "no TLS configured: {r:?}");
    // GO whose name length runs past the option's end.
    let mut bad = NbdClient::<UnixStream>::info_payload("disk", &[]);
    bad[..4].copy_from_slice(&1000u32.to_be_bytes());
    let r = c.option_exchange(NBD_OPT_GO, &bad).expect("exchange");
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_INVALID, "{r:?}");

    let go = c.opt_go("disk", &[]).expect("GO still works");
    assert_eq!(go.size, DISK);
    assert_usable(&mut c, "the rejected options");
}

#[test]
fn go_for_an_unknown_export_is_err_unknown_and_haggling_continues() {
    let fx = fixture();
    let mut c = fx.server.connect();
    assert_rep_error(c.opt_info("nosuch", &[]), NBD_REP_ERR_UNKNOWN, "INFO for an unknown export");
    assert_rep_error(c.opt_go("nosuch", &[]), NBD_REP_ERR_UNKNOWN, "GO for an unknown export");
    c.opt_go("disk", &[]).expect("GO for the real export");
    assert_usable(&mut c, "GO for an unknown export");

    // EXPORT_NAME cannot report an error: the server hangs up.
    let mut e = fx.server.connect();
    let err = e.opt_export_name("nosuch").expect_err("EXPORT_NAME of an unknown export");
    assert!(is_disconnect(&err), "expected a hang-up, got {err}");
}

#[test]
fn empty_export_name_selects_the_first_export() {
    let dir = TempDir::for_test();
    let a = create_image(&dir, "a.cow", "4M");
    let b = create_image(&dir, "b.cow", "8M");
    let sock = dir.join("nbd.sock");
    let server = serve(&[&a, &b], &sock, &[]);

    let mut c = server.connect();
    let info = c.opt_info("", &[NBD_INFO_NAME]).expect("INFO ''");
    assert_eq!(info.size, 4 * MIB, "'' is the first export");
    assert_eq!(info.name.as_deref(), Some("a"));
    c.opt_go("", &[]).expect("GO ''");
    let data = random_bytes(4096, 5);
    c.write(0, &data).expect("write via ''");

    let mut ca = simple_client(&server, "a");
    assert_bytes_eq(&ca.read(0, 4096).unwrap(), &data, "export a holds the write");
    let mut cb = simple_client(&server, "b");
    assert!(is_zero(&cb.read(0, 4096).unwrap()), "export b does not");

    let mut e = server.connect();
    let info = e.opt_export_name("").expect("EXPORT_NAME ''");
    assert_eq!(info.size, 4 * MIB);
    assert_bytes_eq(&e.read(0, 4096).unwrap(), &data, "EXPORT_NAME ''");
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

#[test]
fn write_with_and_without_fua_then_flush_read_back_in_both_reply_modes() {
    let fx = fixture();
    for (i, structured) in [false, true].into_iter().enumerate() {
        let mut c = client(&fx.server, "disk", structured);
        let base = (i as u64 + 1) * MIB;
        let plain = random_bytes(12345, 10 + i as u64);
        let fua = random_bytes(65536, 20 + i as u64);
        c.write(base + 7, &plain).expect("write");
        c.write_flags(base + 64 * KIB, &fua, NBD_CMD_FLAG_FUA).expect("write with FUA");
        c.flush().expect("flush");
        assert_bytes_eq(&c.read(base + 7, plain.len() as u32).unwrap(), &plain, "unaligned write");
        assert_bytes_eq(&c.read(base + 64 * KIB, fua.len() as u32).unwrap(), &fua, "FUA write");
        let around = c.read(base, 7).unwrap();
        assert!(is_zero(&around), "bytes before an unaligned write stay zero");
    }
    // Simple reply to a read: header then exactly the data.
    let mut c = simple_client(&fx.server, "disk");
    let cookie = c.next_cookie();
    c.send_request(0, NBD_CMD_READ, cookie, MIB + 7, 100, &[]).unwrap();
    match c.read_reply().expect("reply") {
        Reply::Simple { cookie: got, error: 0, data } => {
            assert_eq!(got, cookie);
            assert_bytes_eq(&data, &random_bytes(12345, 10)[..100], "simple payload");
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

#[test]
fn structured_read_of_unwritten_range_is_hole_chunks_and_df_gives_one_data_chunk() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    let len = 256 * KIB as u32;

    let resp = c.command(0, NBD_CMD_READ, 0, len, &[]).expect("read");
    let holes: u64 = resp
        .chunks
        .iter()
        .map(|ch| match ch.kind {
            ChunkKind::OffsetHole { length, .. } => u64::from(length),
            _ => 0,
        })
        .sum();
    assert!(
        !resp.chunks.iter().any(|ch| matches!(ch.kind, ChunkKind::OffsetData { .. })),
        "an unwritten range needs no data chunk: {:?}",
        resp.chunks
    );
    assert_eq!(holes, u64::from(len), "holes cover the request");
    assert!(is_zero(&resp.read_data().expect("reassembled")));

    // Data in the middle: data chunk(s) for it, holes around it.
    let data = random_bytes(4096, 30);
    c.write(128 * KIB, &data).expect("write");
    let resp = c.command(0, NBD_CMD_READ, 0, len, &[]).expect("read");
    assert!(
        resp.chunks.iter().any(|ch| matches!(ch.kind, ChunkKind::OffsetHole { offset: 0, .. })),
        "leading hole: {:?}",
        resp.chunks
    );
    assert!(
        resp.chunks.iter().any(|ch| matches!(
            &ch.kind,
            ChunkKind::OffsetData { offset, data } if *offset <= 128 * KIB
                && *offset + data.len() as u64 >= 132 * KIB
        )),
        "data chunk over the written block"
    );
    let got = resp.read_data().expect("reassembled");
    assert!(is_zero(&got[..128 * KIB as usize]));
    assert_bytes_eq(&got[128 * KIB as usize..132 * KIB as usize], &data, "data");
    assert!(is_zero(&got[132 * KIB as usize..]));

    // DF: exactly one content chunk, a data chunk with the zeros present.
    let resp = c.command(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, len, &[]).expect("DF read");
    let content: Vec<&Chunk> = resp.chunks.iter().filter(|ch| !matches!(ch.kind, ChunkKind::None)).collect();
    assert_eq!(content.len(), 1, "DF allows one content chunk: {content:?}");
    match &content[0].kind {
        ChunkKind::OffsetData { offset, data } => {
            assert_eq!(*offset, 0);
            assert_eq!(data.len(), len as usize);
        }
        other => panic!("DF read of mixed data must be one data chunk, got {other:?}"),
    }
    assert_bytes_eq(&resp.read_data().unwrap(), &got, "DF read equals fragmented read");

    // DF is refused without structured replies (it was never advertised).
    let mut s = simple_client(&fx.server, "disk");
    assert_nbd_error(
        s.command(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 4096, &[]).and_then(Response::check),
        NBD_EINVAL,
        "DF without structured replies",
    );
    assert_usable(&mut s, "DF without structured replies");
}

#[test]
fn reads_of_unwritten_ranges_after_large_writes_and_reads_are_zeros_in_both_reply_modes() {
    // The server reuses its payload and reply buffers across requests: a read must never
    // show bytes of an earlier request on the connection.
    let fx = fixture_with("64M", &[]);
    for (i, structured) in [false, true].into_iter().enumerate() {
        let mut c = client(&fx.server, "disk", structured);
        let data = random_bytes(MIB as usize, 40 + i as u64);
        let at = 4 * MIB + i as u64 * MIB;
        c.write(at, &data).expect("1 MiB write");
        assert_bytes_eq(&c.read(at, MIB as u32).unwrap(), &data, "1 MiB read back");
        let unwritten = 16 * MIB + i as u64 * MIB;
        for len in [MIB as u32, 4096, 100] {
            let got = if structured {
                c.command(NBD_CMD_FLAG_DF, NBD_CMD_READ, unwritten, len, &[])
                    .and_then(Response::check)
                    .and_then(|r| r.read_data())
                    .expect("DF read")
            } else {
                c.read(unwritten, len).expect("read")
            };
            assert_eq!(got.len(), len as usize);
            assert!(is_zero(&got), "{len}-byte read of an unwritten range after a 1 MiB read is all zeros");
        }
    }
}

#[test]
fn trim_makes_the_range_read_zero_and_leaves_neighbours() {
    let fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    let data = random_bytes(256 * 1024, 40);
    c.write(MIB, &data).expect("write");
    c.trim(MIB + 64 * KIB, 64 * KIB as u32).expect("trim aligned");
    c.trim(MIB + 200 * KIB + 100, 1000).expect("trim unaligned");
    let got = c.read(MIB, data.len() as u32).unwrap();
    let mut want = data.clone();
    want[64 * 1024..128 * 1024].fill(0);
    want[200 * 1024 + 100..200 * 1024 + 1100].fill(0);
    assert_bytes_eq(&got, &want, "after trims");
}

#[test]
fn write_zeroes_plain_no_hole_and_fast_zero_and_fast_zero_with_no_hole_is_enotsup() {
    let fx = fixture();
    for structured in [false, true] {
        let mut c = client(&fx.server, "disk", structured);
        let base = if structured { 4 * MIB } else { MIB };
        let data = random_bytes(512 * 1024, 50);
        c.write(base, &data).expect("write");
        let k = |n: u64| base + n * KIB;

        c.write_zeroes(k(0), 64 * KIB as u32, 0).expect("plain");
        c.write_zeroes(k(64), 64 * KIB as u32, NBD_CMD_FLAG_NO_HOLE).expect("NO_HOLE");
        c.write_zeroes(k(128), 64 * KIB as u32, NBD_CMD_FLAG_FAST_ZERO).expect("FAST_ZERO alone is fast here");
        c.write_zeroes(k(192) + 10, 3000, NBD_CMD_FLAG_FUA).expect("FUA, unaligned");
        assert_nbd_error(
            c.write_zeroes(k(256), 64 * KIB as u32, NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE),
            NBD_ENOTSUP,
            "FAST_ZERO with NO_HOLE",
        );
        assert_usable(&mut c, "ENOTSUP");

        let mut want = data.clone();
        want[..192 * 1024].fill(0);
        want[192 * 1024 + 10..192 * 1024 + 3010].fill(0);
        assert_bytes_eq(
            &c.read(base, data.len() as u32).unwrap(),
            &want,
            "zeroed ranges read zero; the ENOTSUP range is untouched",
        );
    }
}

#[test]
fn cache_succeeds_and_changes_nothing() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    let data = random_bytes(64 * 1024, 60);
    c.write(MIB, &data).expect("write");
    c.cache(MIB, 64 * KIB as u32).expect("cache written range");
    c.cache(8 * MIB, MIB as u32).expect("cache unwritten range");
    assert_bytes_eq(&c.read(MIB, data.len() as u32).unwrap(), &data, "after cache");
    assert!(is_zero(&c.read(8 * MIB, 4096).unwrap()));
    let map = status_map(&mut c, 8 * MIB, MIB);
    assert_eq!(flags_at(&map, 8 * MIB), NBD_STATE_HOLE | NBD_STATE_ZERO, "cache allocates nothing");
}

#[test]
fn block_status_reports_holes_and_zeros_for_unwritten_and_trimmed_ranges_and_data_for_written() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    let seg = 64 * KIB;
    c.write(MIB, &random_bytes(seg as usize, 70)).expect("write data");
    c.write(2 * MIB, &random_bytes(seg as usize, 71)).expect("write");
    c.trim(2 * MIB, seg as u32).expect("trim it");
    c.write(3 * MIB, &random_bytes(seg as usize, 72)).expect("write");
    c.write_zeroes(3 * MIB, seg as u32, 0).expect("zero it");
    c.write_zeroes(4 * MIB, seg as u32, NBD_CMD_FLAG_NO_HOLE).expect("zero with NO_HOLE");

    let map = status_map(&mut c, 0, 5 * MIB);
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(flags_at(&map, 0), hz, "never written: {map:?}");
    assert_eq!(flags_at(&map, MIB - 1), hz);
    assert_eq!(flags_at(&map, MIB), 0, "written data: {map:?}");
    assert_eq!(flags_at(&map, MIB + seg - 1), 0);
    assert_eq!(flags_at(&map, MIB + seg), hz, "after the data");
    assert_eq!(flags_at(&map, 2 * MIB), hz, "trimmed: {map:?}");
    assert_ne!(flags_at(&map, 3 * MIB) & NBD_STATE_ZERO, 0, "write-zeroed reads zero: {map:?}");
    assert_eq!(flags_at(&map, 4 * MIB) & NBD_STATE_HOLE, 0, "NO_HOLE leaves no hole: {map:?}");
    // The whole export can be described, and the description covers exactly it.
    let all = status_map(&mut c, 0, DISK);
    assert_eq!(all.last().unwrap().1, DISK);
}

#[test]
fn block_status_req_one_gives_one_descriptor_and_descriptors_never_exceed_the_request() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    c.write(MIB, &random_bytes(64 * 1024, 80)).expect("write");
    c.write(MIB + 192 * KIB, &random_bytes(4096, 81)).expect("write");

    let one = c.block_status(MIB - 4096, 8192, NBD_CMD_FLAG_REQ_ONE).expect("REQ_ONE");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].1.len(), 1, "REQ_ONE: one descriptor: {one:?}");
    assert!(one[0].1[0].length <= 8192, "{one:?}");
    assert_eq!(one[0].1[0].flags, NBD_STATE_HOLE | NBD_STATE_ZERO);

    let one = c.block_status(MIB + 100, 1000, NBD_CMD_FLAG_REQ_ONE).expect("REQ_ONE inside data");
    assert_eq!(one[0].1, [Extent { length: 1000, flags: 0 }]);

    let one = c.block_status(0, 2 * MIB as u32, NBD_CMD_FLAG_REQ_ONE).expect("REQ_ONE over many extents");
    assert_eq!(one[0].1.len(), 1, "{one:?}");
    assert_eq!(one[0].1[0], Extent { length: MIB as u32, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });

    // Without REQ_ONE, at aligned and unaligned places, the sum never exceeds the request.
    for (offset, len) in [
        (0u64, 4 * MIB as u32),
        (MIB + 100, 1000),
        (MIB - 1, 2),
        (MIB + 60 * KIB + 1, 200 * KIB as u32),
        (MIB + 195 * KIB, 1),
        (DISK - 1, 1),
        (DISK - 300 * KIB, 300 * KIB as u32),
    ] {
        let r = c.block_status(offset, len, 0).expect("block status");
        let ext = &r[0].1;
        assert!(!ext.is_empty());
        let sum: u64 = ext.iter().map(|e| u64::from(e.length)).sum();
        assert!(sum <= u64::from(len), "[{offset}, +{len}): descriptors sum to {sum}: {ext:?}");
    }
    let exact = c.block_status(MIB - 1, 2, 0).expect("straddling");
    assert_eq!(
        exact[0].1,
        [Extent { length: 1, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }, Extent { length: 1, flags: 0 }]
    );
}

#[test]
fn disc_answers_every_request_in_flight_then_closes() {
    let fx = fixture();
    for structured in [false, true] {
        let mut c = client(&fx.server, "disk", structured);
        let mut expect: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
        let mut reqs = Vec::new();
        for i in 0..16u64 {
            let cookie = c.next_cookie();
            let off = i * 256 * KIB;
            if i % 2 == 0 {
                let data = random_bytes(256 * 1024, 90 + i);
                reqs.push(Req::new(NBD_CMD_WRITE, cookie, off, data.len() as u32, data));
                expect.insert(cookie, None);
            } else {
                reqs.push(Req::new(NBD_CMD_READ, cookie, off, 256 * KIB as u32, vec![]));
                expect.insert(cookie, Some(vec![0u8; 256 * 1024]));
            }
        }
        reqs.push(Req::new(NBD_CMD_DISC, c.next_cookie(), 0, 0, vec![]));
        let sender = send_batch(&mut c, reqs);
        for _ in 0..16 {
            let r = c.read_response().expect("every request before DISC is answered");
            let want = expect.remove(&r.cookie).expect("known cookie");
            assert!(r.is_ok(), "{:?}", r.error);
            if let Some(want) = want {
                assert_bytes_eq(&r.read_data().unwrap(), &want, "read before DISC");
            }
        }
        sender.join().unwrap().expect("send the batch");
        assert_closed_within(&mut c, Duration::from_secs(5), "after DISC");
    }
    // The writes sent before DISC landed.
    let mut c = simple_client(&fx.server, "disk");
    assert_bytes_eq(&c.read(0, 256 * KIB as u32).unwrap(), &random_bytes(256 * 1024, 90), "write before DISC");
}

// ---------------------------------------------------------------------------
// Bad input: an error reply, and the connection stays usable
// ---------------------------------------------------------------------------

#[test]
fn out_of_range_requests_get_einval_or_enospc_and_change_nothing() {
    let fx = fixture();
    for structured in [false, true] {
        let mode = if structured { "structured" } else { "simple" };
        let mut c = client(&fx.server, "disk", structured);
        let what = |s: &str| format!("{mode}: {s}");

        assert_nbd_error(c.read(DISK - 512, 1024), NBD_EINVAL, &what("read past the end"));
        assert_usable(&mut c, "read past the end");
        assert_nbd_error(c.read(DISK, 1), NBD_EINVAL, &what("read at the end"));
        assert_usable(&mut c, "read at the end");
        assert_nbd_error(c.read(u64::MAX - 511, 1024), NBD_EINVAL, &what("read whose offset+length overflows"));
        assert_usable(&mut c, "overflowing read");
        assert_nbd_error(c.trim(DISK - 512, 1024), NBD_EINVAL, &what("trim past the end"));
        assert_usable(&mut c, "trim past the end");
        assert_nbd_error(c.trim(u64::MAX - 511, 1024), NBD_EINVAL, &what("trim whose offset+length overflows"));
        assert_usable(&mut c, "overflowing trim");
        assert_nbd_error(c.write(DISK - 512, &[0xaa; 1024]), NBD_ENOSPC, &what("write past the end"));
        assert_usable(&mut c, "write past the end");
        assert_nbd_error(c.write_zeroes(DISK - 512, 1024, 0), NBD_ENOSPC, &what("write zeroes past the end"));
        assert_usable(&mut c, "write zeroes past the end");
        assert_nbd_error(c.cache(DISK - 512, 1024), NBD_EINVAL, &what("cache past the end"));
        assert_usable(&mut c, "cache past the end");
        if structured {
            assert_nbd_error(c.block_status(DISK - 512, 1024, 0), NBD_EINVAL, &what("block status past the end"));
            assert_usable(&mut c, "block status past the end");
        }
        // The in-range part of the refused write was not written.
        assert!(is_zero(&c.read(DISK - 512, 512).unwrap()), "{mode}: a refused write changes nothing");
    }
}

#[test]
fn unknown_command_and_unknown_or_misplaced_flags_get_einval() {
    let fx = fixture();
    for structured in [false, true] {
        let mode = if structured { "structured" } else { "simple" };
        let mut c = client(&fx.server, "disk", structured);
        let what = |s: &str| format!("{mode}: {s}");
        for typ in [NBD_CMD_RESIZE, 9, 0x4242] {
            assert_nbd_error(
                c.command(0, typ, 0, 4096, &[]).and_then(Response::check),
                NBD_EINVAL,
                &what(&format!("unknown command {typ}")),
            );
            assert_usable(&mut c, "an unknown command");
        }
        assert_nbd_error(
            c.command(1 << 9, NBD_CMD_READ, 0, 4096, &[]).and_then(Response::check),
            NBD_EINVAL,
            &what("unknown flag on READ"),
        );
        assert_usable(&mut c, "an unknown flag");
        assert_nbd_error(
            c.command(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, 0, 4096, &[]).and_then(Response::check),
            NBD_EINVAL,
            &what("REQ_ONE on READ"),
        );
        assert_usable(&mut c, "a misplaced flag");
        // A refused WRITE's payload is still consumed, and nothing is written.
        assert_nbd_error(c.write_flags(MIB, &[0x55; 4096], 1 << 9), NBD_EINVAL, &what("unknown flag on WRITE"));
        assert_usable(&mut c, "a WRITE with an unknown flag");
        assert_nbd_error(
            c.write_flags(MIB, &[0x55; 4096], NBD_CMD_FLAG_NO_HOLE),
            NBD_EINVAL,
            &what("NO_HOLE on WRITE"),
        );
        assert_usable(&mut c, "a WRITE with NO_HOLE");
        assert!(is_zero(&c.read(MIB, 4096).unwrap()), "{mode}: refused writes wrote nothing");
    }
}

#[test]
fn write_payload_over_32_mib_is_drained_and_refused_with_einval() {
    let fx = fixture_with("64M", &[]);
    let mut c = simple_client(&fx.server, "disk");
    let big = vec![0x5au8; 33 << 20];
    let cookie = c.next_cookie();
    c.send_request(0, NBD_CMD_WRITE, cookie, 0, big.len() as u32, &big).expect("send 33 MiB write");
    let r = c.wait_response(cookie).expect("reply to the oversized write");
    assert_eq!(r.error, NBD_EINVAL, "{}", errno_name(r.error));
    // The payload was drained: the next request is parsed correctly, and nothing was written.
    assert!(is_zero(&assert_usable(&mut c, "an oversized write")));
    assert!(is_zero(&c.read(32 * MIB, 4096).unwrap()));

    // Reads over the maximum are refused too, without a payload.
    assert_nbd_error(c.read(0, MAX_PAYLOAD_ADVERTISED + 4096), NBD_EINVAL, "read over 32 MiB");
    assert_usable(&mut c, "an oversized read");

    // Exactly the maximum is fine.
    let max = random_bytes(MAX_PAYLOAD_ADVERTISED as usize, 100);
    c.write(0, &max).expect("a 32 MiB write");
    assert_bytes_eq(&c.read(0, MAX_PAYLOAD_ADVERTISED).unwrap(), &max, "32 MiB read");
}

#[test]
fn oversized_read_is_refused_at_once_while_another_client_is_in_the_middle_of_a_write() {
    let fx = fixture();
    // Client A sends a 1 MiB write but only half its payload, and stalls.
    let mut a = simple_client(&fx.server, "disk");
    let cookie = a.next_cookie();
    let data = random_bytes(MIB as usize, 130);
    let mut req = Vec::new();
    req.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&(MIB as u32).to_be_bytes());
    req.extend_from_slice(&data[..data.len() / 2]);
    a.expect_reply_for(cookie, NBD_CMD_WRITE, 0, MIB as u32);
    a.send_raw(&req).unwrap();

    // Client B's read of 4 GiB - 1 bytes must get its error now, not once A finishes.
    let mut b = simple_client(&fx.server, "disk");
    b.set_timeout(Some(Duration::from_secs(5))).unwrap();
    for structured in [false, true] {
        let mut b2 = client(&fx.server, "disk", structured);
        b2.set_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_nbd_error(b2.read(0, u32::MAX), NBD_EINVAL, "read of 4 GiB - 1 bytes");
        assert_usable(&mut b2, "an oversized read");
    }
    assert_nbd_error(b.read(0, u32::MAX), NBD_EINVAL, "read of 4 GiB - 1 bytes");

    // A was not disturbed: the rest of its payload completes the write.
    a.send_raw(&data[data.len() / 2..]).unwrap();
    a.wait_response(cookie).and_then(Response::check).expect("A's write");
    assert_bytes_eq(&b.read(0, MIB as u32).unwrap(), &data, "A's write landed");
}

#[test]
fn zero_length_requests_are_harmless() {
    let fx = fixture();
    for structured in [false, true] {
        let mode = if structured { "structured" } else { "simple" };
        let mut c = client(&fx.server, "disk", structured);
        let data = random_bytes(8192, 110);
        c.write(MIB, &data).expect("write");
        assert!(c.read(MIB, 0).expect("zero-length read").is_empty());
        assert!(c.read(DISK, 0).expect("zero-length read at the end").is_empty());
        c.write(MIB, &[]).expect("zero-length write");
        c.trim(MIB, 0).expect("zero-length trim");
        c.write_zeroes(MIB, 0, 0).expect("zero-length write zeroes");
        c.command(0, NBD_CMD_FLUSH, 0, 0, &[]).and_then(Response::check).expect("flush");
        c.cache(MIB, 0).expect("zero-length cache");
        assert_bytes_eq(&c.read(MIB, 8192).unwrap(), &data, &format!("{mode}: zero-length requests changed nothing"));
    }
}

#[test]
fn block_status_without_a_negotiated_context_is_einval() {
    let fx = fixture();
    // No structured replies at all.
    let mut c = simple_client(&fx.server, "disk");
    assert_nbd_error(
        c.command(0, NBD_CMD_BLOCK_STATUS, 0, 4096, &[]).and_then(Response::check),
        NBD_EINVAL,
        "block status without structured replies",
    );
    assert_usable(&mut c, "block status without structured replies");

    // Structured replies but no SET_META_CONTEXT.
    let mut c = fx.server.connect();
    c.opt_structured_reply().unwrap();
    c.opt_go("disk", &[]).unwrap();
    assert_nbd_error(c.block_status(0, 4096, 0), NBD_EINVAL, "block status without a context");
    assert_usable(&mut c, "block status without a context");

    // A context selected, but the last SET_META_CONTEXT selected nothing.
    let mut c = fx.server.connect();
    c.opt_structured_reply().unwrap();
    c.opt_set_meta_context("disk", &[BASE_ALLOCATION]).unwrap();
    c.opt_set_meta_context("disk", &["qemu:dirty-bitmap:x"]).unwrap();
    c.opt_go("disk", &[]).unwrap();
    assert_nbd_error(c.block_status(0, 4096, 0), NBD_EINVAL, "block status after SET_META_CONTEXT selected nothing");
    assert_usable(&mut c, "block status with a dropped context");
}

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
fn option_longer_than_16_kib_closes_without_waiting_for_its_payload() {
    let fx = fixture();
    let mut c = fx.server.connect();
    // Only the header: a server that tried to read (or allocate) 1 GiB would sit waiting.
    c.send_option_raw(IHAVEOPT, NBD_OPT_GO, 1 << 30, &[]).unwrap();
    let t = Instant::now();
    assert_closed_within(&mut c, Duration::from_secs(3), "1 GiB option");
    assert!(t.elapsed() < Duration::from_secs(2), "closed promptly");

    // Just over the limit, with the bytes actually sent, is refused the same way.
    let mut c = fx.server.connect();
    c.send_option_raw(IHAVEOPT, 0x4242, 16 * 1024 + 1, &vec![0u8; 16 * 1024 + 1]).unwrap();
    assert_closed_within(&mut c, Duration::from_secs(3), "16 KiB + 1 option");

    // At the limit an unknown option is merely unsupported.
    let mut c = fx.server.connect();
    let r = c.option_exchange(0x4242, &vec![0u8; 16 * 1024]).unwrap();
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_UNSUP);
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
