//! End-to-end NBD handshake tests of `cowdisk serve` through the harness's raw client (and the `nbd` crate's client for old-style EXPORT_NAME): every option, what each advertises (size, flags, block sizes, exports and their descriptions, meta contexts), and option errors after which haggling continues.

mod common;

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::nbdclient::*;
use common::nbdtest::*;
use common::*;

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
    // No --description: none at all, rather than anything derived from the image.
    assert_eq!(info.description, None, "description requested, none given: {info:?}");
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
fn descriptions_are_only_what_the_operator_gave_and_no_server_path_is_told() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = TempDir::for_test();
    // Where the images live is the server's business: a marker to look for in what clients see.
    dir.subdir("srv-images-7c1e");
    let base = dir.join("srv-images-7c1e/base.raw");
    write_random_file(&base, 4 * MIB, 1);
    let alpha = create_image(&dir, "srv-images-7c1e/alpha.cow", "4M");
    let beta = create_overlay_on_raw(&dir, "srv-images-7c1e/beta.cow", &base);
    let sock = dir.join("nbd.sock");
    // In the order of the images, as --name; "" is no description.
    let server = serve(&[&alpha, &beta], &sock, &["--description", "", "--description", "Build cache, team A"]);

    let list = stdout_of(&run(tool("nbdinfo").args(["--list", &unix_uri(&sock, "")])));
    assert!(list.contains("export=\"alpha\"") && list.contains("export=\"beta\""), "nbdinfo --list:\n{list}");
    assert!(list.contains("description: Build cache, team A"), "nbdinfo --list:\n{list}");
    assert_eq!(list.matches("description:").count(), 1, "one export has a description:\n{list}");
    for leak in ["srv-images-7c1e", ".cow", ".raw", "chain of"] {
        assert!(!list.contains(leak), "nbdinfo --list shows {leak:?}:\n{list}");
    }

    let mut c = server.connect();
    let listed: Vec<(String, String)> = c.opt_list().unwrap().into_iter().map(|e| (e.name, e.description)).collect();
    assert_eq!(listed, [("alpha".into(), "".into()), ("beta".into(), "Build cache, team A".into())]);
    assert_eq!(c.opt_info("alpha", &[NBD_INFO_DESCRIPTION]).unwrap().description, None);
    let beta_info = c.opt_info("beta", &[NBD_INFO_DESCRIPTION]).unwrap();
    assert_eq!(beta_info.description.as_deref(), Some("Build cache, team A"));
    drop(c);
    drop(server);

    // More descriptions than images is a mistake, refused in one line before serving.
    let out =
        run_status(Command::new(cowdisk_bin()).args(["serve", path_str(&alpha), "--socket", path_str(&sock)]).args([
            "--description",
            "a",
            "--description",
            "b",
        ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.trim().lines().count() == 1, "{err}");
    assert!(err.contains("--description"), "{err}");
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
fn a_failed_set_meta_context_leaves_no_context_selected() {
    // "Issuing this command replaces all previously-set metadata contexts (including when
    // this command fails)": block status after a failed SET is refused, not answered with the
    // contexts of the SET before it.
    let fx = fixture();
    let malformed = [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 1, 0, 0, 0, 0xff];
    // Five 3.5 KB queries: 17.5 KB, more than the server reads (NBD_REP_ERR_TOO_BIG).
    let long: Vec<String> = (0..5).map(|i| format!("x-{i}:{}", "a".repeat(3500))).collect();
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    for (what, data) in [
        ("a SET for an unknown export", NbdClient::<UnixStream>::meta_context_payload("nosuch", &[BASE_ALLOCATION])),
        ("a malformed SET", malformed.to_vec()),
        ("a SET too long to read", NbdClient::<UnixStream>::meta_context_payload("disk", &long)),
    ] {
        let mut c = fx.server.connect();
        c.opt_structured_reply().unwrap();
        assert_eq!(c.opt_set_meta_context("disk", &[BASE_ALLOCATION]).expect("SET").len(), 1);
        let r = c.option_exchange(NBD_OPT_SET_META_CONTEXT, &data).unwrap();
        assert!(r.last().unwrap().is_error(), "{what}: {}", rep_name(r.last().unwrap().reply_type));
        c.opt_go("disk", &[]).expect("GO");
        assert_nbd_error(c.block_status(0, 4096, 0), NBD_EINVAL, what);
    }
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
    // Spec (Conventions): an error message is at most 4096 bytes, also one that names an
    // unknown export whose name is as long as a name may be.
    let long = "n".repeat(4096);
    for (what, r) in [("INFO", c.opt_info(&long, &[])), ("GO", c.opt_go(&long, &[]))] {
        let e = r.expect_err("an unknown export of 4096 bytes");
        let rep = rep_error(&e).unwrap_or_else(|| panic!("{what}: a transport error: {e}"));
        assert_eq!(rep.reply_type, NBD_REP_ERR_UNKNOWN, "{what}: {rep}");
        assert!(rep.message.len() <= 4096, "{what}: an error message of {} bytes", rep.message.len());
    }
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
