//! NBD over TLS against the binary: a CA and a server certificate made with the openssl CLI, `cowdisk serve --tls-cert --tls-key [--tls ...]` on a Unix socket and on TCP, libnbd (nbdinfo, nbdcopy) and qemu-img over `nbds://`, the raw client over rustls for the option rules around NBD_OPT_STARTTLS, plain-text clients refused under `--tls require`, handshake failures and stalls, shutdown, and bad certificate files refused with one line naming the file.

mod common;

use common::nbdclient::*;
use common::tls::*;
use common::*;

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 * MIB;
const EXPORT: &str = "disk";

/// A temp dir with a certificate set and a 16 MiB standalone image named after [`EXPORT`].
struct Rig {
    pki: Pki,
    image: PathBuf,
    sock: PathBuf,
    dir: TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = TempDir::for_test();
        let pki = make_pki(dir.path(), "main");
        let image = dir.join(format!("{EXPORT}.cow"));
        run(Command::new(cowdisk_bin()).args(["create", s(&image), "--size", &SIZE.to_string()]));
        let sock = dir.join("nbd.sock");
        Rig { pki, image, sock, dir }
    }

    /// `cowdisk serve IMAGE --socket SOCK --tls-cert --tls-key EXTRA...`
    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec![s(&self.image), "--socket", s(&self.sock), "--tls-cert", s(&self.pki.cert)];
        args.extend(["--tls-key", s(&self.pki.key)]);
        args.extend(extra);
        Server::start(&args)
    }

    fn unix_uri(&self) -> String {
        tls_unix_uri(&self.sock, EXPORT, &self.pki.client)
    }
}

fn assert_tls_reqd(c: &mut NbdClient<UnixStream>, option: u32, data: &[u8]) {
    let r = c.option_exchange(option, data).unwrap_or_else(|e| panic!("{}: {e}", opt_name(option)));
    assert_eq!(r.len(), 1, "{} before TLS got more than one reply: {r:?}", opt_name(option));
    assert_eq!(
        r[0].reply_type,
        NBD_REP_ERR_TLS_REQD,
        "{} before TLS: expected NBD_REP_ERR_TLS_REQD, got {} {:?}",
        opt_name(option),
        rep_name(r[0].reply_type),
        String::from_utf8_lossy(&r[0].data)
    );
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend((export.len() as u32).to_be_bytes());
    v.extend(export.as_bytes());
    v.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend((q.len() as u32).to_be_bytes());
        v.extend(q.as_bytes());
    }
    v
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn libnbd_over_tls_on_a_unix_socket_and_tcp_is_byte_exact() {
    if !require_tools(&["openssl", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let rig = Rig::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // No --tls: a certificate and key mean TLS is required.
    let server = rig.serve(&["--listen", &listen]);
    let log = server.log();
    assert!(log.contains(&format!("nbds+unix:///{EXPORT}?socket=")), "printed URIs:\n{log}");
    assert!(log.contains(&format!("nbds://{listen}/{EXPORT}")), "printed URIs:\n{log}");

    let unix = rig.unix_uri();
    let tcp = tls_tcp_uri(port, EXPORT, &rig.pki.client);
    let info = run(bounded("nbdinfo").arg(&unix));
    let text = stdout_of(&info);
    assert!(text.contains("with TLS"), "nbdinfo over the Unix socket:\n{text}");
    assert!(text.contains(&format!("export-size: {SIZE}")), "nbdinfo over the Unix socket:\n{text}");
    let size = stdout_of(&run(bounded("nbdinfo").args(["--size", &tcp])));
    assert_eq!(size.trim(), SIZE.to_string(), "nbdinfo --size over TCP");

    let input = rig.dir.join("in.raw");
    write_random_file(&input, SIZE, 0x7157);
    let expected = fs::read(&input).unwrap();
    run(bounded("nbdcopy").arg(&input).arg(&unix));
    let out = rig.dir.join("out.raw");
    run(bounded("nbdcopy").arg(&tcp).arg(&out));
    assert_bytes_eq(&fs::read(&out).unwrap(), &expected, "copied in over the Unix socket, out over TCP");
    // 32 MiB requests: replies far larger than any buffer between the worker and the socket.
    fs::remove_file(&out).unwrap();
    run(bounded("nbdcopy").args(["--request-size=33554432"]).arg(&unix).arg(&out));
    assert_bytes_eq(&fs::read(&out).unwrap(), &expected, "copied out with 32 MiB requests");
    let status = server.stop();
    assert!(status.success(), "server exit after TLS clients: {status}");
}

#[test]
fn qemu_img_compares_over_tls_with_x509_credentials() {
    if !require_tools(&["openssl", "qemu-img", "nbdcopy"]) {
        return;
    }
    let rig = Rig::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _server = rig.serve(&["--listen", &listen]);
    let input = rig.dir.join("in.raw");
    write_random_file(&input, SIZE, 0x9e3);
    run(bounded("nbdcopy").arg(&input).arg(rig.unix_uri()));
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&rig.pki.client));
    // qemu needs a name to check the certificate against on a Unix socket; on TCP it uses the host.
    let over_unix = format!("driver=nbd,path={},export={EXPORT},tls-creds=tls0,tls-hostname=localhost", s(&rig.sock));
    let over_tcp = format!("driver=nbd,host=127.0.0.1,port={port},export={EXPORT},tls-creds=tls0");
    for image in [over_unix, over_tcp] {
        let out = run(bounded("qemu-img")
            .args(["compare", "--object", &creds, "--image-opts", &image])
            .arg(format!("driver=file,filename={}", s(&input))));
        assert!(stdout_of(&out).contains("identical"), "qemu-img compare {image}:\n{}", stdout_of(&out));
    }
}

#[test]
fn plain_text_clients_are_refused_under_tls_require() {
    if !require_tools(&["openssl", "nbdinfo"]) {
        return;
    }
    let rig = Rig::new();
    let server = rig.serve(&["--tls", "require"]);

    let mut c = server.connect();
    assert_tls_reqd(&mut c, NBD_OPT_GO, &NbdClient::<UnixStream>::info_payload(EXPORT, &[]));
    assert_tls_reqd(&mut c, NBD_OPT_INFO, &NbdClient::<UnixStream>::info_payload(EXPORT, &[NBD_INFO_BLOCK_SIZE]));
    assert_tls_reqd(&mut c, NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_tls_reqd(&mut c, NBD_OPT_LIST, &[]);
    assert_tls_reqd(&mut c, NBD_OPT_LIST_META_CONTEXT, &meta_payload(EXPORT, &[BASE_ALLOCATION]));
    assert_tls_reqd(&mut c, NBD_OPT_SET_META_CONTEXT, &meta_payload(EXPORT, &[BASE_ALLOCATION]));
    assert_tls_reqd(&mut c, 0x4242, b"unknown option");
    // Longer than the server keeps (16 KiB): still TLS_REQD, not TOO_BIG (the spec's "any
    // other option" in FORCEDTLS mode).
    assert_tls_reqd(&mut c, NBD_OPT_GO, &vec![0u8; 17 * 1024]);
    // Still refused after all that: nothing was let through in plain text.
    assert_tls_reqd(&mut c, NBD_OPT_GO, &NbdClient::<UnixStream>::info_payload(EXPORT, &[]));
    // ABORT is one of the two options allowed before TLS.
    let ack = c.opt_abort().expect("ABORT");
    if let Some(r) = ack {
        assert_eq!(r.reply_type, NBD_REP_ACK, "ABORT reply: {r:?}");
    }
    assert!(closes_within(&mut c, Duration::from_secs(5)), "server kept the connection open after ABORT");

    // EXPORT_NAME cannot be answered with an error: the server hangs up.
    let mut c = server.connect();
    c.send_option(NBD_OPT_EXPORT_NAME, EXPORT.as_bytes()).unwrap();
    assert_eq!(
        c.peer_state(Duration::from_secs(5)).unwrap(),
        PeerState::Closed,
        "EXPORT_NAME in plain text under --tls require must end the session without a reply"
    );

    // A real plain-text client gets nowhere.
    let plain = unix_uri(&rig.sock, EXPORT);
    let out = nbdinfo(&[&plain]);
    assert!(!out.status.success(), "plain nbdinfo against --tls require succeeded:\n{}", stdout_of(&out));

    // And the server still serves TLS clients afterwards.
    let out = run(bounded("nbdinfo").arg(rig.unix_uri()));
    assert!(stdout_of(&out).contains("with TLS"), "{}", stdout_of(&out));
}

/// The option's one reply, and its type.
fn one_reply(c: &mut NbdClient<UnixStream>, option: u32, data: &[u8]) -> u32 {
    let r = c.option_exchange(option, data).unwrap_or_else(|e| panic!("{}: {e}", opt_name(option)));
    assert_eq!(r.len(), 1, "{}: {r:?}", opt_name(option));
    r[0].reply_type
}

/// A client that does not set NBD_FLAG_C_FIXED_NEWSTYLE puts the server in NOTLS mode (spec:
/// "The server MUST operate in NOTLS mode unless [...] the client replied with
/// NBD_FLAG_C_FIXED_NEWSTYLE"): STARTTLS is refused with NBD_REP_ERR_POLICY (it used to be
/// acknowledged); under `--tls require` every other option is refused with
/// NBD_REP_ERR_POLICY too, never NBD_REP_ERR_TLS_REQD, and nothing is served in plain text;
/// under `--tls optional` the plain-text session goes on.
#[test]
fn a_client_without_fixed_newstyle_is_refused_tls_and_under_require_everything() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let rig = Rig::new();
    let unfixed = |server: &Server| {
        let mut c = NbdClient::connect_unix_raw(server.socket()).expect("connect");
        c.read_greeting().expect("greeting");
        c.send_client_flags(0).expect("client flags");
        c
    };
    let server = rig.serve(&["--tls", "require"]);
    let mut c = unfixed(&server);
    assert_eq!(rep_name(one_reply(&mut c, NBD_OPT_STARTTLS, &[])), rep_name(NBD_REP_ERR_POLICY));
    let go = NbdClient::<UnixStream>::info_payload(EXPORT, &[]);
    assert_eq!(rep_name(one_reply(&mut c, NBD_OPT_GO, &go)), rep_name(NBD_REP_ERR_POLICY));
    assert_eq!(rep_name(one_reply(&mut c, NBD_OPT_LIST, &[])), rep_name(NBD_REP_ERR_POLICY));
    c.send_option(NBD_OPT_EXPORT_NAME, EXPORT.as_bytes()).unwrap();
    assert_eq!(c.peer_state(Duration::from_secs(5)).unwrap(), PeerState::Closed, "EXPORT_NAME was not hung up on");
    // A fixed-newstyle client still gets TLS.
    let out = run(bounded("nbdinfo").arg(rig.unix_uri()));
    assert!(stdout_of(&out).contains("with TLS"), "{}", stdout_of(&out));
    assert!(server.stop().success());

    let server = rig.serve(&["--tls", "optional"]);
    let mut c = unfixed(&server);
    assert_eq!(rep_name(one_reply(&mut c, NBD_OPT_STARTTLS, &[])), rep_name(NBD_REP_ERR_POLICY));
    c.opt_go(EXPORT, &[]).expect("plain text goes on under --tls optional");
    c.write(0, &[0x3c; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x3c; 4096]);
    c.disconnect().unwrap();
    assert!(server.stop().success());
}

#[test]
fn tls_optional_serves_plain_and_tls_clients() {
    if !require_tools(&["openssl", "nbdinfo"]) {
        return;
    }
    let rig = Rig::new();
    let server = rig.serve(&["--tls", "optional"]);
    assert!(server.log().contains("nbds+unix://"), "printed URI:\n{}", server.log());

    let out = run(bounded("nbdinfo").arg(unix_uri(&rig.sock, EXPORT)));
    assert!(stdout_of(&out).contains("without TLS"), "plain nbdinfo:\n{}", stdout_of(&out));
    let out = run(bounded("nbdinfo").arg(rig.unix_uri()));
    assert!(stdout_of(&out).contains("with TLS"), "TLS nbdinfo:\n{}", stdout_of(&out));

    // The raw client in plain text: options and I/O work as without TLS.
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    c.opt_go(EXPORT, &[]).unwrap();
    c.write(0, &[0x5a; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    c.disconnect().unwrap();
}

#[test]
fn option_state_from_before_starttls_is_forgotten_and_starttls_is_once_only() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let rig = Rig::new();
    let server = rig.serve(&["--tls", "optional"]);
    let tls13 = client_config(&rig.pki.ca, TLS13);

    // Structured replies and base:allocation negotiated in plain text (where a man in the
    // middle could have injected them) must not survive STARTTLS.
    let mut c = server.connect();
    c.opt_structured_reply().unwrap();
    let ctx = c.opt_set_meta_context(EXPORT, &[BASE_ALLOCATION]).unwrap();
    assert_eq!(ctx.len(), 1, "base:allocation selected in plain text");
    let (mut c, version) = start_tls(c, tls13.clone());
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    let r = c.option_exchange(NBD_OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ERR_INVALID, "second STARTTLS: {r:?}");
    // Nothing is refused with TLS_REQD once TLS is up.
    assert_eq!(c.opt_list().unwrap().len(), 1);
    let info = c.opt_go(EXPORT, &[]).unwrap();
    assert!(
        !info.has_flag(NBD_FLAG_SEND_DF),
        "DF advertised: structured replies from before STARTTLS were kept (flags {:#x})",
        info.transmission_flags
    );
    // The client did not negotiate structured replies over TLS; a structured reply here
    // would not parse as the simple reply it expects.
    c.write(MIB, &[0xc3; 8192]).unwrap();
    assert_eq!(c.read(MIB, 8192).unwrap(), vec![0xc3; 8192]);
    c.disconnect().unwrap();
    assert!(closes_within(&mut c, Duration::from_secs(5)), "server did not close after NBD_CMD_DISC");

    // Extended headers agreed in plain text are forgotten too: the client, which must
    // negotiate them again and did not, is served compact headers.
    let mut c = server.connect();
    c.opt_extended_headers().unwrap();
    let (mut c, _) = start_tls(c, tls13.clone());
    let info = c.opt_go(EXPORT, &[]).unwrap();
    assert!(!info.has_flag(NBD_FLAG_SEND_DF), "extended headers from before STARTTLS were kept");
    assert_eq!(c.read(MIB, 8192).unwrap(), vec![0xc3; 8192], "a compact request after STARTTLS");
    c.disconnect().unwrap();

    // Negotiated over TLS, the same options take effect (and TLS 1.2 works too).
    let (mut c, version) = start_tls(server.connect(), client_config(&rig.pki.ca, TLS12));
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
    c.opt_structured_reply().unwrap();
    assert_eq!(c.opt_set_meta_context(EXPORT, &[BASE_ALLOCATION]).unwrap().len(), 1);
    let info = c.opt_go(EXPORT, &[]).unwrap();
    assert!(info.has_flag(NBD_FLAG_SEND_DF), "flags {:#x}", info.transmission_flags);
    assert_eq!(c.read(MIB, 8192).unwrap(), vec![0xc3; 8192]);
    let status = c.block_status(0, (2 * MIB) as u32, 0).unwrap();
    assert!(!status.is_empty(), "block status over TLS");
    // A burst of pipelined writes and reads larger than the pump's buffers.
    let data = random_bytes(4 * MIB as usize, 77);
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let cookie = c.next_cookie();
        c.send_request(0, NBD_CMD_WRITE, cookie, 4 * MIB + i as u64 * MIB, MIB as u32, chunk).unwrap();
    }
    for _ in 0..4 {
        c.read_response().unwrap().check().unwrap();
    }
    assert_bytes_eq(&c.read(4 * MIB, (4 * MIB) as u32).unwrap(), &data, "pipelined writes read back over TLS");
    c.disconnect().unwrap();
}

#[test]
fn failed_and_stalled_tls_handshakes_are_dropped_and_the_server_carries_on() {
    if !require_tools(&["openssl", "nbdinfo"]) {
        return;
    }
    let rig = Rig::new();
    let port = free_port();
    let server = rig.serve(&["--handshake-timeout", "2", "--listen", &format!("127.0.0.1:{port}")]);

    // A client that does not trust the server's CA (over TCP: libnbd checks the server's
    // certificate only there).
    let other = make_pki(rig.dir.path(), "other");
    let out = nbdinfo(&[&tls_tcp_uri(port, EXPORT, &other.client)]);
    assert!(!out.status.success(), "nbdinfo trusting another CA connected:\n{}", stdout_of(&out));
    let out = nbdinfo(&["--size", &tls_tcp_uri(port, EXPORT, &rig.pki.client)]);
    assert!(out.status.success(), "nbdinfo with the right CA after one with the wrong one");

    // STARTTLS acknowledged, then something that is not TLS.
    let mut c = server.connect();
    let r = c.option_exchange(NBD_OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r[0].reply_type, NBD_REP_ACK);
    c.stream().write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(closes_within(&mut c, Duration::from_secs(5)), "garbage instead of a ClientHello was not dropped");

    // STARTTLS acknowledged, then silence: the handshake deadline covers the TLS handshake.
    let t = Instant::now();
    let mut c = server.connect();
    let r = c.option_exchange(NBD_OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r[0].reply_type, NBD_REP_ACK);
    assert!(closes_within(&mut c, Duration::from_secs(10)), "a stalled TLS handshake was never dropped");
    assert!(t.elapsed() >= Duration::from_millis(1500), "dropped before the deadline: {:?}", t.elapsed());

    // TLS up, then silence in option haggling: still the same deadline, through the pump.
    let t = Instant::now();
    let (mut c, _) = start_tls(server.connect(), client_config(&rig.pki.ca, TLS13));
    assert!(closes_within(&mut c, Duration::from_secs(10)), "a stalled handshake over TLS was never dropped");
    assert!(t.elapsed() >= Duration::from_millis(1500), "dropped before the deadline: {:?}", t.elapsed());

    let out = run(bounded("nbdinfo").arg(rig.unix_uri()));
    assert!(stdout_of(&out).contains("with TLS"), "{}", stdout_of(&out));
}

#[test]
fn sigterm_with_tls_clients_connected_exits_promptly_and_cleanly() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let rig = Rig::new();
    let mut server = rig.serve(&[]);
    let cfg = client_config(&rig.pki.ca, TLS13);
    let (mut idle, _) = start_tls(server.connect(), cfg.clone());
    idle.opt_go(EXPORT, &[]).unwrap();
    idle.write(0, &[1; 4096]).unwrap();
    let (mut haggling, _) = start_tls(server.connect(), cfg);
    haggling.opt_list().unwrap();

    let t = Instant::now();
    server.daemon().signal(libc::SIGTERM).unwrap();
    let status = server.daemon().wait_exit(Duration::from_secs(8)).expect("server still running 8 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
    // The shutdown grace (10 s) is for requests in flight; idle TLS connections must not use it.
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t.elapsed());
    assert!(closes_within(&mut idle, Duration::from_secs(2)));
    assert!(closes_within(&mut haggling, Duration::from_secs(2)));
}

/// `cowdisk serve` with these TLS arguments fails at once with one line on stderr mentioning
/// every string in `names`, and does not start listening.
#[track_caller]
fn refused(rig: &Rig, tls_args: &[&str], names: &[&str]) {
    let mut args = vec!["serve", s(&rig.image), "--socket", s(&rig.sock)];
    args.extend(tls_args);
    let out = run_status(Command::new(cowdisk_bin()).args(&args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve {tls_args:?} succeeded");
    assert_eq!(err.trim().lines().count(), 1, "serve {tls_args:?}: not one line:\n{err}");
    for n in names {
        assert!(err.contains(n), "serve {tls_args:?}: error does not name {n}:\n{err}");
    }
    assert!(!rig.sock.exists(), "serve {tls_args:?} created its socket before failing");
}

#[test]
fn bad_certificate_or_key_files_are_refused_with_one_line_naming_the_file() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let rig = Rig::new();
    let (cert, key) = (s(&rig.pki.cert), s(&rig.pki.key));
    let missing = rig.dir.join("no-such-dir/cert.pem");
    let missing = s(&missing);
    refused(&rig, &["--tls-cert", missing, "--tls-key", key], &[missing]);
    refused(&rig, &["--tls-cert", cert, "--tls-key", missing], &[missing]);
    // Each file given the other's contents.
    refused(&rig, &["--tls-cert", key, "--tls-key", key], &[key]);
    refused(&rig, &["--tls-cert", cert, "--tls-key", cert], &[cert]);
    // PEM armour around something that is not a certificate / key.
    let junk_cert = rig.dir.join("junk-cert.pem");
    fs::write(&junk_cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    refused(&rig, &["--tls-cert", s(&junk_cert), "--tls-key", key], &[s(&junk_cert)]);
    let junk_key = rig.dir.join("junk-key.pem");
    fs::write(&junk_key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    refused(&rig, &["--tls-cert", cert, "--tls-key", s(&junk_key)], &[s(&junk_key)]);
    // A key that belongs to another certificate.
    let other = make_pki(rig.dir.path(), "other");
    refused(&rig, &["--tls-cert", cert, "--tls-key", s(&other.key)], &[cert, s(&other.key)]);
    // TLS asked for without the files.
    refused(&rig, &["--tls", "require"], &["--tls-cert"]);
    refused(&rig, &["--tls", "optional"], &["--tls-cert"]);
    let half = ["serve", s(&rig.image), "--socket", s(&rig.sock), "--tls-cert", cert];
    let out = run_status(Command::new(cowdisk_bin()).args(half));
    assert!(!out.status.success(), "--tls-cert without --tls-key accepted");

    // The key in SEC1 form ("EC PRIVATE KEY") is accepted too.
    let sec1 = rig.dir.join("server-key-sec1.pem");
    openssl(&["ec", "-in", key, "-out", s(&sec1)]);
    assert!(fs::read_to_string(&sec1).unwrap().contains("BEGIN EC PRIVATE KEY"), "openssl ec wrote PKCS#8");
    let server = Server::start(&[s(&rig.image), "--socket", s(&rig.sock), "--tls-cert", cert, "--tls-key", s(&sec1)]);
    let (mut c, _) = start_tls(server.connect(), client_config(&rig.pki.ca, TLS13));
    assert_eq!(c.opt_list().unwrap().len(), 1);
}
