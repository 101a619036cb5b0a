//! NBD extended headers (NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies, 64-bit
//! lengths): qemu 9 and later ask for them first, so qemu-img and qemu-io use them against
//! `cowdisk serve` wherever they run in these tests; here, what they change for a user (a
//! 16 TiB disk mapped in a handful of requests, trims and zeroings of more than 4 GiB in one
//! request) and the negotiation and request rules, with the raw client.

mod common;

use std::process::Command;
use std::time::Duration;

use common::nbdclient::*;
use common::nbdtest::*;
use common::*;

/// Greeting + extended headers + base:allocation + GO on `name`.
fn extended_client(fx: &Fixture, name: &str) -> NbdClient<std::os::unix::net::UnixStream> {
    let mut c = fx.server.connect();
    c.opt_extended_headers().expect("NBD_OPT_EXTENDED_HEADERS");
    let ctx = c.opt_set_meta_context(name, &[BASE_ALLOCATION]).expect("NBD_OPT_SET_META_CONTEXT");
    assert_eq!(ctx.len(), 1, "one context selected: {ctx:?}");
    c.opt_go(name, &[]).expect("NBD_OPT_GO");
    c
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(uri));
    let text = stdout_of(&out);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
    text
}

/// qemu-img maps a 16 TiB overlay holding two 4K blocks, 4 GiB apart, in five block status
/// requests (with 32-bit lengths it would take over 4,000), and the map is right.
#[test]
fn qemu_maps_a_16_tib_disk_in_a_few_requests() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let fx = fixture_with("16T", &[]);
    let uri = fx.server.uri("disk");
    qemu_io(&uri, &["write -P 0x11 5G 4k", "write -P 0x22 9G 4k"]);
    let out = run(Command::new("qemu-img").args([
        "--trace",
        "nbd_send_request",
        "--trace",
        "nbd_receive_option_reply",
        "map",
        "--output=json",
        &uri,
    ]));
    let (stdout, trace) = (stdout_of(&out), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(
        trace.contains("Received option reply 11 (extended headers), type 1 (ack)"),
        "qemu did not get extended headers:\n{trace}"
    );
    let status: Vec<&str> = trace.lines().filter(|l| l.contains("(block status)")).collect();
    assert!(!status.is_empty() && status.len() <= 8, "{} block status requests:\n{trace}", status.len());
    let longest = status
        .iter()
        .filter_map(|l| l.split(".len = ").nth(1)?.split(',').next()?.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(longest > 1 << 32, "no block status request over 4 GiB: {status:?}");
    let map: serde_json::Value = serde_json::from_str(&stdout).expect("qemu-img map --output=json");
    let data: Vec<(u64, u64)> = map
        .as_array()
        .expect("a list of extents")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(data, [(5 * GIB, 4096), (9 * GIB, 4096)], "{stdout}");
    let read = qemu_io(&uri, &["read -P 0x11 5G 4k", "read -P 0x22 9G 4k", "read -P 0 9663672320 4k"]);
    assert_eq!(read.matches("read 4096/4096").count(), 3, "{read}");
}

/// One trim of 8 GiB and one zeroing of 4 GiB, each a single request, clear exactly what they
/// cover; block status answers with 64-bit descriptors, one of them longer than 4 GiB; reads
/// come back in extended chunks that repeat the request's offset (the client checks).
#[test]
fn sixty_four_bit_trim_zeroing_and_block_status_in_one_request_each() {
    let fx = fixture_with("16G", &[]);
    let mut c = extended_client(&fx, "disk");
    let blocks = [(GIB, 1u64), (7 * GIB, 2), (9 * GIB, 3), (13 * GIB, 4)];
    for &(at, seed) in &blocks {
        c.write(at, &random_bytes(4096, seed)).expect("write");
    }
    // qemu's writes do not set NBD_CMD_FLAG_PAYLOAD_LEN; the spec's clients do: both are read.
    let flagged = random_bytes(4096, 9);
    c.command(NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_WRITE, 15 * GIB, 4096, &flagged)
        .and_then(|r| r.check())
        .expect("write");
    assert_bytes_eq(&c.read(15 * GIB, 4096).expect("read"), &flagged, "write flagged PAYLOAD_LEN");

    let status = c.command64(0, NBD_CMD_BLOCK_STATUS, 0, 16 * GIB, &[]).and_then(|r| r.block_status_ext());
    let status = status.expect("block status");
    assert_eq!(status.len(), 1, "{status:?}");
    let hole = u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert_eq!(status[0].1[..3], [(GIB, hole), (4096, 0), (6 * GIB - 4096, hole)], "{status:?}");

    c.command64(0, NBD_CMD_TRIM, 0, 8 * GIB, &[]).and_then(|r| r.check()).expect("an 8 GiB trim");
    c.command64(0, NBD_CMD_WRITE_ZEROES, 8 * GIB, 4 * GIB, &[]).and_then(|r| r.check()).expect("a 4 GiB zeroing");
    for &(at, seed) in &blocks {
        let got = c.read(at, 4096).expect("read");
        if at < 12 * GIB {
            assert!(is_zero(&got), "the block at {at} survived the trim or zeroing");
        } else {
            assert_bytes_eq(&got, &random_bytes(4096, seed), "a block past both");
        }
    }
    // A read long enough to be answered in hole and data chunks.
    let around = c.read(13 * GIB - 512 * KIB, (MIB) as u32).expect("read across a hole");
    assert!(is_zero(&around[..512 * KIB as usize]));
    assert_bytes_eq(&around[512 * KIB as usize..][..4096], &random_bytes(4096, 4), "data after a hole");
    let status = c.command64(0, NBD_CMD_BLOCK_STATUS, 0, 13 * GIB, &[]).and_then(|r| r.block_status_ext());
    assert_eq!(status.expect("block status")[0].1, [(13 * GIB, hole)], "one descriptor for 13 GiB of zeros");
}

/// Negotiation: the option takes no data; structured replies cannot follow it (they can come
/// before it); NBD_OPT_EXPORT_NAME after it is hung up on; meta contexts need only it.
#[test]
fn extended_headers_negotiation_rules() {
    let fx = fixture();
    let mut c = fx.server.connect();
    let r = c.option_exchange(NBD_OPT_EXTENDED_HEADERS, b"x").expect("reply");
    assert_eq!(r.last().map(|r| r.reply_type), Some(NBD_REP_ERR_INVALID), "{r:?}");
    c.opt_extended_headers().expect("NBD_OPT_EXTENDED_HEADERS");
    assert_rep_error(
        c.opt_structured_reply(),
        NBD_REP_ERR_EXT_HEADER_REQD,
        "structured replies after extended headers",
    );
    c.opt_extended_headers().expect("asked again");
    c.opt_set_meta_context("disk", &[BASE_ALLOCATION]).expect("meta context with extended headers alone");
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    c.write(0, &random_bytes(4096, 1)).expect("write");
    assert_bytes_eq(&assert_usable(&mut c, "the write"), &random_bytes(4096, 1), "read back");

    let mut c = fx.server.connect();
    c.opt_structured_reply().expect("structured replies first");
    c.opt_extended_headers().expect("then extended headers");
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    assert_usable(&mut c, "structured, then extended");

    let mut c = fx.server.connect();
    c.opt_extended_headers().expect("NBD_OPT_EXTENDED_HEADERS");
    c.send_option(NBD_OPT_EXPORT_NAME, b"disk").expect("send NBD_OPT_EXPORT_NAME");
    assert_closed_within(&mut c, Duration::from_secs(5), "NBD_OPT_EXPORT_NAME after extended headers");
}

/// A payload on a command that takes none is read and refused, and the connection goes on; one
/// longer than the advertised maximum payload ends the connection, as the spec says it should.
#[test]
fn extended_payloads_on_commands_that_take_none() {
    let fx = fixture();
    let mut c = extended_client(&fx, "disk");
    for typ in [NBD_CMD_TRIM, NBD_CMD_BLOCK_STATUS, NBD_CMD_READ] {
        let r = c.command(NBD_CMD_FLAG_PAYLOAD_LEN, typ, 0, 1000, &[0xee; 1000]);
        assert_nbd_error(r.and_then(|r| r.check()), NBD_EINVAL, "a payload on a command that takes none");
        assert_usable(&mut c, "a refused payload");
    }
    let cookie = c.next_cookie();
    c.send_request64(NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_WRITE, cookie, 0, u64::from(MAX_PAYLOAD_ADVERTISED) + 1, &[])
        .expect("send the header");
    assert_closed_within(&mut c, Duration::from_secs(5), "a payload over the maximum");
}

/// Shutdown with extended headers: writes sent one after another across a SIGTERM are each
/// answered, the first one read after it with NBD_ESHUTDOWN in an extended error chunk (the
/// client checks the framing), its payload read and dropped; the server then exits cleanly.
#[test]
fn writes_across_sigterm_are_refused_in_extended_replies() {
    let mut fx = fixture();
    let mut c = extended_client(&fx, "disk");
    c.write(0, &[1u8; 4096]).expect("a write before the signal");
    fx.server.daemon().signal(libc::SIGTERM).expect("SIGTERM");
    let mut refused = None;
    for i in 0..10_000u64 {
        let r = c.command(0, NBD_CMD_WRITE, (i % 64) * 4096, 4096, &[2u8; 4096]).expect("a reply, not a hang-up");
        if r.error != 0 {
            refused = Some(r.error);
            break;
        }
    }
    assert_eq!(refused, Some(NBD_ESHUTDOWN), "no write was refused with ESHUTDOWN");
    let status = fx.server.daemon().wait_exit(STOP_TIMEOUT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fx.server.log());
}
