//! `nbd_tls`: the server's STARTTLS path fed by a hostile client. Three servers run in the
//! fuzzing process for its whole life (`Server::bind` + `run` on Unix sockets, exports as in
//! `nbd_server`): TLS required, TLS required with client certificates checked against a CA
//! (`--tls-ca` + `--tls-verify-peer`), and TLS optional. Each input is one client connection:
//!
//! - **raw** (bit 6 of byte 0): the rest of the input goes to the socket as it is: plain
//!   options, and after an NBD_OPT_STARTTLS whatever bytes the fuzzer makes of a TLS
//!   handshake (the seeds hold recorded ClientHellos);
//! - **scripted**: the input's plain part is cut into whole options up to NBD_OPT_STARTTLS
//!   (added if missing), then a real rustls client runs the TLS handshake, with or without a
//!   client certificate (the CA's, another CA's, a self-signed one), TLS 1.2 and/or 1.3, while
//!   up to 8 mutations (flip, insert, drop, cut) change the bytes it sends; once it is through,
//!   the rest of the input is sent as plaintext over TLS (options, then requests).
//!
//! Checks, besides no panic on any server thread, no hang, no unbounded allocation:
//! - with TLS required, nothing before TLS answers an option with anything but an ACK (to
//!   STARTTLS, ABORT) or an error: no export list, no export information;
//! - with client certificates checked, a client without the CA's certificate receives not one
//!   byte of plaintext over TLS;
//! - an unmutated handshake with an acceptable certificate succeeds;
//! - after the client has sent everything and shut its side, the server closes the
//!   connection within [`CLOSE_DEADLINE`];
//! - while the hostile connection is still open, a second, well-behaved client on the same
//!   server gets through STARTTLS, NBD_OPT_GO and a read.

use super::client::{be, go, opt, read_option_reply, req, split_options};
use super::{nbd_server, server_panics, watch_server_panics, ScratchDir};
use cowdisk::nbd::handshake::{TlsMode, MAX_OPTION_LEN};
use cowdisk::nbd::proto::*;
use cowdisk::nbd::server::{ListenAddr, Server, ServerConfig};
use cowdisk::nbd::tls::TlsConfig;
use cowdisk::nbd::Export;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long the server may take to close a connection whose client has finished.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(15);
/// How long a client waits for the server's next handshake flight before giving up on a
/// mutated handshake (the server may rightly be waiting for bytes that never come).
const STALL: Duration = Duration::from_millis(200);
/// Most plain-text bytes kept from the server for checking.
const KEEP: usize = 1 << 20;

const CERTS: [(&str, &str); 12] = [
    ("ca-cert.pem", include_str!("../../certs/ca-cert.pem")),
    ("ca-key.pem", include_str!("../../certs/ca-key.pem")),
    ("server-cert.pem", include_str!("../../certs/server-cert.pem")),
    ("server-key.pem", include_str!("../../certs/server-key.pem")),
    ("client-cert.pem", include_str!("../../certs/client-cert.pem")),
    ("client-key.pem", include_str!("../../certs/client-key.pem")),
    ("foreign-cert.pem", include_str!("../../certs/foreign-cert.pem")),
    ("foreign-key.pem", include_str!("../../certs/foreign-key.pem")),
    ("foreign-ca-cert.pem", include_str!("../../certs/foreign-ca-cert.pem")),
    ("foreign-ca-key.pem", include_str!("../../certs/foreign-ca-key.pem")),
    ("selfsigned-cert.pem", include_str!("../../certs/selfsigned-cert.pem")),
    ("selfsigned-key.pem", include_str!("../../certs/selfsigned-key.pem")),
];

fn pem(name: &str) -> &'static str {
    CERTS.iter().find(|(n, _)| *n == name).map(|(_, p)| *p).expect("known PEM")
}

/// The servers under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Required,
    Verify,
    Optional,
}

impl Kind {
    fn of(b: u8) -> Kind {
        match b & 3 {
            0 => Kind::Required,
            2 => Kind::Optional,
            _ => Kind::Verify,
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Who the client says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// No client certificate.
    Anonymous,
    /// A certificate from the server's CA.
    Good,
    /// A certificate from another CA.
    Foreign,
    /// A self-signed certificate.
    SelfSigned,
}

impl Identity {
    fn of(b: u8) -> Identity {
        [Identity::Anonymous, Identity::Good, Identity::Foreign, Identity::SelfSigned][usize::from(b & 3)]
    }
}

struct Servers {
    /// The sockets and PEM files; lives as long as the process (the servers never stop). A
    /// static is never dropped: a fuzzer that exits leaves it for a later process to sweep,
    /// and a test binary removes it with `remove_scratch` when its last TLS session is done.
    dir: ScratchDir,
    sockets: Vec<PathBuf>,
    /// Client configurations by identity (4) and protocol versions (3).
    clients: Vec<Arc<ClientConfig>>,
}

static SERVERS: OnceLock<Servers> = OnceLock::new();

fn servers() -> &'static Servers {
    SERVERS.get_or_init(|| {
        watch_server_panics();
        let dir = ScratchDir::new("tls");
        for (name, text) in CERTS {
            std::fs::write(dir.join(name), text).expect("write PEM");
        }
        let mut sockets = Vec::new();
        for kind in [Kind::Required, Kind::Verify, Kind::Optional] {
            let ca = dir.join("ca-cert.pem");
            let tls = TlsConfig::load(
                &dir.join("server-cert.pem"),
                &dir.join("server-key.pem"),
                (kind == Kind::Verify).then_some(ca.as_path()),
            )
            .expect("server TLS config");
            let sock = dir.join(&format!("{kind:?}.sock"));
            let cfg = ServerConfig {
                listen: vec![ListenAddr::Unix(sock.clone())],
                max_connections: 16,
                handshake_timeout: Duration::from_secs(5),
                threads_per_connection: 2,
                max_in_flight_bytes: 64 << 20,
                tls: Some(tls),
                tls_mode: if kind == Kind::Optional { TlsMode::Optional } else { TlsMode::Required },
                ..ServerConfig::default()
            };
            let exports = nbd_server::exports()
                .into_iter()
                .map(|e| Export::new(e.name.clone(), e.description.clone(), e.disk.clone()))
                .collect();
            let server = Server::bind(cfg, exports).expect("bind fuzz server");
            std::thread::Builder::new()
                .name(format!("fuzz-server-{kind:?}"))
                .spawn(move || server.run())
                .expect("server thread");
            sockets.push(sock);
        }
        let mut clients = Vec::new();
        for id in [Identity::Anonymous, Identity::Good, Identity::Foreign, Identity::SelfSigned] {
            for versions in 0..3 {
                clients.push(client_config(id, versions));
            }
        }
        Servers { dir, sockets, clients }
    })
}

/// Removes the servers' socket and PEM directory. The servers keep running, but no client
/// can reach them afterwards: call it only after the process's last `session`.
pub fn remove_scratch() {
    if let Some(s) = SERVERS.get() {
        let _ = std::fs::remove_dir_all(s.dir.path());
    }
}

fn certs(name: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem(name).as_bytes()).collect::<Result<_, _>>().expect("PEM certificates")
}

fn key(name: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem(name).as_bytes()).expect("PEM key")
}

fn client_config(id: Identity, versions: u8) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let vers: &[&rustls::SupportedProtocolVersion] = match versions {
        1 => &[&rustls::version::TLS13],
        2 => &[&rustls::version::TLS12],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut roots = RootCertStore::empty();
    for c in certs("ca-cert.pem") {
        roots.add(c).expect("CA");
    }
    let b = ClientConfig::builder_with_provider(provider).with_protocol_versions(vers).expect("versions");
    let b = b.with_root_certificates(roots);
    let mut cfg = match id {
        Identity::Anonymous => b.with_no_client_auth(),
        Identity::Good => b.with_client_auth_cert(certs("client-cert.pem"), key("client-key.pem")).expect("client"),
        Identity::Foreign => {
            b.with_client_auth_cert(certs("foreign-cert.pem"), key("foreign-key.pem")).expect("foreign")
        }
        Identity::SelfSigned => {
            b.with_client_auth_cert(certs("selfsigned-cert.pem"), key("selfsigned-key.pem")).expect("self-signed")
        }
    };
    // Every input starts from nothing: no session of an earlier input is resumed.
    cfg.resumption = Resumption::disabled();
    Arc::new(cfg)
}

fn connect(kind: Kind) -> UnixStream {
    let s = UnixStream::connect(&servers().sockets[kind.index()]).expect("connect to the fuzz server");
    s.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s
}

/// Reads exactly `buf.len()` bytes, or fails at EOF or after `deadline`.
fn read_by(s: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(e),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct ByDeadline<'a>(&'a mut UnixStream, Instant);

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        read_by(self.0, &mut buf[..1], self.1)?;
        Ok(1)
    }
}

/// Checks the plain-text phase's option replies: with TLS required, only ACKs and errors.
/// Returns whether the server acknowledged STARTTLS (the stream is TLS from then on).
fn plain_replies(s: &mut UnixStream, sent: &[(u32, &[u8])], kind: Kind) -> bool {
    let deadline = Instant::now() + CLOSE_DEADLINE;
    for &(o, _) in sent {
        loop {
            let Ok((ro, typ, payload)) = read_option_reply(&mut ByDeadline(s, deadline), MAX_OPTION_LEN as usize + 64)
            else {
                return false;
            };
            assert_eq!(ro, o, "reply for option {ro} while option {o} was asked");
            if kind != Kind::Optional {
                assert!(
                    typ == REP_ACK || typ & (1 << 31) != 0,
                    "TLS is required, yet option {o} got reply type {typ:#x} before TLS ({} bytes)",
                    payload.len()
                );
                if o != OPT_STARTTLS && o != OPT_ABORT {
                    assert_eq!(typ, REP_ERR_TLS_REQD, "option {o} before TLS got {typ:#x}, not NBD_REP_ERR_TLS_REQD");
                }
            }
            if typ == REP_ACK || typ & (1 << 31) != 0 {
                if o == OPT_STARTTLS {
                    return typ == REP_ACK;
                }
                break;
            }
        }
    }
    false
}

/// What the client saw of the session.
#[derive(Default, Debug)]
pub struct Seen {
    /// The server acknowledged NBD_OPT_STARTTLS (scripted inputs).
    pub starttls: bool,
    /// The client finished its side of the TLS handshake.
    pub handshake_done: bool,
    /// Plaintext bytes received over TLS.
    pub plaintext: usize,
    /// The TLS error the client saw, if any.
    pub tls_error: Option<String>,
}

/// Applies the mutations that fall into `[pos, pos + buf.len())` of the client's outgoing
/// TLS stream; returns the bytes to send and whether the stream is now out of step (its
/// lengths changed or it was cut), after which the client sends nothing more.
fn mutate(buf: &[u8], pos: usize, muts: &[(usize, u8, u8)]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(buf.len() + 64);
    let mut spoiled = false;
    let mut i = 0;
    while i < buf.len() {
        let at = pos + i;
        let mut byte = Some(buf[i]);
        let mut skip = 1;
        for &(_, kind, val) in muts.iter().filter(|m| m.0 == at) {
            match kind % 4 {
                0 => byte = byte.map(|b| b ^ val.max(1)),
                1 => return (out, true),
                2 => {
                    out.extend(std::iter::repeat(val).take(usize::from(val % 32) + 1));
                    spoiled = true;
                }
                _ => {
                    skip = usize::from(val % 16) + 1;
                    byte = None;
                    spoiled = true;
                }
            }
        }
        out.extend(byte);
        i += skip;
    }
    (out, spoiled)
}

/// Runs the client's side of the TLS handshake (with mutations), then sends `app` over TLS.
/// Returns the connection if the client got through the handshake.
fn tls_client(
    s: &mut UnixStream,
    cfg: Arc<ClientConfig>,
    muts: &[(usize, u8, u8)],
    app: &[u8],
    seen: &mut Seen,
) -> Option<ClientConnection> {
    let mut c = ClientConnection::new(cfg, ServerName::try_from("localhost").expect("name")).expect("client");
    let mut sent = 0usize;
    let deadline = Instant::now() + CLOSE_DEADLINE;
    loop {
        while c.wants_write() {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("to memory");
            let (bytes, spoiled) = mutate(&buf, sent, muts);
            sent += buf.len();
            if s.write_all(&bytes).is_err() || spoiled {
                return None;
            }
        }
        if !c.is_handshaking() {
            seen.handshake_done = true;
            break;
        }
        // A mutated handshake may leave the server waiting for bytes that never come: give up
        // soon. An unmutated one must go through.
        let wait = if muts.is_empty() { deadline.saturating_duration_since(Instant::now()) } else { STALL };
        if wait.is_zero() {
            panic!("TLS handshake made no progress for {CLOSE_DEADLINE:?}");
        }
        s.set_read_timeout(Some(wait)).expect("timeout");
        match c.read_tls(s) {
            Ok(0) => return None,
            Ok(_) => {
                if let Err(e) = c.process_new_packets() {
                    seen.tls_error = Some(e.to_string());
                    // Send the alert, as a real client would.
                    let mut buf = Vec::new();
                    let _ = c.write_tls(&mut buf);
                    let _ = s.write_all(&buf);
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) && !muts.is_empty() => {
                return None
            }
            Err(e) => {
                assert!(!muts.is_empty() || e.kind() != io::ErrorKind::WouldBlock, "TLS handshake stalled: {e}");
                return None;
            }
        }
    }
    if c.writer().write_all(app).is_err() {
        return Some(c);
    }
    let mut buf = Vec::new();
    while c.wants_write() {
        if c.write_tls(&mut buf).is_err() {
            break;
        }
    }
    let _ = s.write_all(&buf);
    Some(c)
}

/// Reads until the server closes the connection, decrypting with `tls` if given. Panics if the
/// server keeps it open past [`CLOSE_DEADLINE`].
fn drain(s: &mut UnixStream, mut tls: Option<ClientConnection>, seen: &mut Seen, what: &str) -> Vec<u8> {
    if let Some(c) = tls.as_mut() {
        c.send_close_notify();
        let mut buf = Vec::new();
        while c.wants_write() {
            if c.write_tls(&mut buf).is_err() {
                break;
            }
        }
        let _ = s.write_all(&buf);
    }
    let _ = s.shutdown(Shutdown::Write);
    let deadline = Instant::now() + CLOSE_DEADLINE;
    let mut raw = Vec::new();
    let mut plain = vec![0u8; 16 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{what}: the server kept the connection open {CLOSE_DEADLINE:?} after the client finished"
        );
        s.set_read_timeout(Some(left)).expect("timeout");
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            // A reset after the server closed with our data unread is a close too.
            Err(_) => break,
        };
        match tls.as_mut() {
            None => {
                if raw.len() < KEEP {
                    raw.extend_from_slice(&buf[..n]);
                }
            }
            Some(c) => {
                if seen.tls_error.is_some() {
                    continue;
                }
                let mut rd = &buf[..n];
                while !rd.is_empty() {
                    if c.read_tls(&mut rd).is_err() {
                        break;
                    }
                    if let Err(e) = c.process_new_packets() {
                        seen.tls_error = Some(e.to_string());
                        break;
                    }
                    while let Ok(k @ 1..) = c.reader().read(&mut plain) {
                        seen.plaintext += k;
                    }
                }
            }
        }
    }
    raw
}

/// A well-behaved client: STARTTLS, a certificate from the CA, NBD_OPT_GO to "ro", one read.
fn probe(kind: Kind) -> Result<(), String> {
    let mut s = connect(kind);
    let deadline = Instant::now() + CLOSE_DEADLINE;
    let mut g = [0u8; 18];
    read_by(&mut s, &mut g, deadline).map_err(|e| format!("greeting: {e}"))?;
    let mut hello = 3u32.to_be_bytes().to_vec();
    hello.extend(opt(OPT_STARTTLS, &[]));
    s.write_all(&hello).map_err(|e| format!("send STARTTLS: {e}"))?;
    let (o, typ, _) =
        read_option_reply(&mut ByDeadline(&mut s, deadline), 4096).map_err(|e| format!("STARTTLS: {e}"))?;
    if (o, typ) != (OPT_STARTTLS, REP_ACK) {
        return Err(format!("STARTTLS answered with {typ:#x}"));
    }
    s.set_read_timeout(Some(CLOSE_DEADLINE)).map_err(|e| e.to_string())?;
    let c = ClientConnection::new(servers().clients[3].clone(), ServerName::try_from("localhost").expect("name"))
        .map_err(|e| e.to_string())?;
    let mut t = rustls::StreamOwned::new(c, s);
    let mut msg = go(OPT_GO, "ro", &[]);
    msg.extend(req(0, CMD_READ, 7, 4096, 4096));
    msg.extend(req(0, CMD_DISC, 8, 0, 0));
    t.write_all(&msg).map_err(|e| format!("TLS handshake or GO: {e}"))?;
    loop {
        let (o, typ, _) = read_option_reply(&mut t, 4096).map_err(|e| format!("GO reply: {e}"))?;
        if o != OPT_GO {
            return Err(format!("reply for option {o}"));
        }
        if typ == REP_ACK {
            break;
        }
        if typ != REP_INFO {
            return Err(format!("GO answered with {typ:#x}"));
        }
    }
    let mut r = vec![0u8; 16 + 4096];
    t.read_exact(&mut r).map_err(|e| format!("read reply: {e}"))?;
    if be(&r[0..4]) as u32 != SIMPLE_REPLY_MAGIC || be(&r[4..8]) != 0 || be(&r[8..16]) != 7 {
        return Err(format!("bad read reply {:x?}", &r[..16]));
    }
    Ok(())
}

/// What the fuzz target runs.
pub fn run(data: &[u8]) {
    let _ = session(data);
}

/// Runs one input; returns what the client saw.
pub fn session(data: &[u8]) -> Seen {
    let servers = servers();
    let panics = server_panics();
    let Some((&b0, rest)) = data.split_first() else { return Seen::default() };
    let kind = Kind::of(b0);
    let id = Identity::of(b0 >> 2);
    let versions = (b0 >> 4) & 3;
    let refused = kind == Kind::Verify && id != Identity::Good;
    let mut s = connect(kind);
    let mut g = [0u8; 18];
    read_by(&mut s, &mut g, Instant::now() + CLOSE_DEADLINE).expect("greeting");
    assert_eq!(be(&g[0..8]), NBDMAGIC, "greeting");
    let mut seen = Seen::default();
    let raw_out;
    // The server may see the client go at any moment; a write to a closed socket must not
    // kill the fuzzer (SIGPIPE is ignored by the Rust runtime, and errors are ignored here).
    if b0 & 0x40 != 0 {
        // Raw: the bytes as they are.
        let _ = s.write_all(rest);
        let probe_result = probe(kind);
        raw_out = drain(&mut s, None, &mut seen, "raw client");
        probe_result.unwrap_or_else(|e| panic!("the server stopped serving other clients: {e}"));
        if kind != Kind::Optional {
            check_plain_stream(&raw_out);
        }
    } else {
        let plain_len = rest.first().map_or(0, |&b| usize::from(b)).min(rest.len().saturating_sub(1));
        let (plain, rest) = rest.get(1..).unwrap_or_default().split_at(plain_len);
        let n_muts = rest.first().map_or(0, |&b| usize::from(b % 9));
        let rest = rest.get(1..).unwrap_or_default();
        let mut muts = Vec::new();
        let mut r = rest;
        for _ in 0..n_muts {
            if r.len() < 4 {
                break;
            }
            muts.push((usize::from(u16::from_le_bytes([r[0], r[1]])), r[2], r[3]));
            r = &r[4..];
        }
        let app = r;
        // The plain part: client flags, then whole options up to STARTTLS (added if missing);
        // an option that ends the plain phase otherwise (ABORT, EXPORT_NAME, GO) ends it.
        let (flags, opts) = if plain.len() >= 4 { plain.split_at(4) } else { (&[0, 0, 0, 3][..], &[][..]) };
        let mut sent: Vec<(u32, &[u8])> = Vec::new();
        let starttls = opt(OPT_STARTTLS, &[]);
        let mut ends = false;
        for (o, bytes) in split_options(opts, MAX_OPTION_LEN) {
            sent.push((o, bytes));
            if o == OPT_STARTTLS {
                break;
            }
            if matches!(o, OPT_ABORT | OPT_EXPORT_NAME | OPT_GO) {
                ends = true;
                break;
            }
        }
        if !ends && sent.last().map_or(true, |(o, _)| *o != OPT_STARTTLS) {
            sent.push((OPT_STARTTLS, &starttls));
        }
        let mut msg = flags.to_vec();
        for (_, b) in &sent {
            msg.extend_from_slice(b);
        }
        let _ = s.write_all(&msg);
        let bad_flags = be(flags) as u32 & !KNOWN_CLIENT_FLAGS != 0;
        let tls_up = !ends && !bad_flags && plain_replies(&mut s, &sent, kind);
        seen.starttls = tls_up;
        let mut conn = None;
        if tls_up {
            let cfg = servers.clients[match id {
                Identity::Anonymous => 0,
                Identity::Good => 3,
                Identity::Foreign => 6,
                Identity::SelfSigned => 9,
            } + usize::from(versions % 3)]
            .clone();
            conn = tls_client(&mut s, cfg, &muts, app, &mut seen);
            if muts.is_empty() && !refused {
                assert!(
                    seen.handshake_done,
                    "an unmutated handshake with an acceptable client failed: {:?}",
                    seen.tls_error
                );
            }
        }
        let probe_result = probe(kind);
        raw_out = drain(&mut s, conn, &mut seen, "scripted client");
        probe_result.unwrap_or_else(|e| panic!("the server stopped serving other clients: {e}"));
        if refused {
            assert_eq!(seen.plaintext, 0, "a client the CA did not certify ({id:?}) received plaintext over TLS");
        }
        if (ends || bad_flags) && kind != Kind::Optional {
            check_plain_stream(&raw_out);
        }
    }
    assert_eq!(server_panics(), panics, "a server thread panicked");
    seen
}

/// With TLS required, what the server says in plain text before STARTTLS is acknowledged:
/// the greeting was read already; then only option replies that are ACKs (to STARTTLS or
/// ABORT) or errors. Everything after an ACK to STARTTLS is TLS and not looked at.
fn check_plain_stream(mut out: &[u8]) {
    while out.len() >= 20 {
        if be(&out[0..8]) != OPT_REPLY_MAGIC {
            panic!("TLS is required, yet the server sent {} bytes that are no option reply before TLS", out.len());
        }
        let (o, typ, len) = (be(&out[8..12]) as u32, be(&out[12..16]) as u32, be(&out[16..20]) as usize);
        assert!(
            typ == REP_ACK || typ & (1 << 31) != 0,
            "TLS is required, yet option {o} got reply type {typ:#x} before TLS"
        );
        if o != OPT_STARTTLS && o != OPT_ABORT {
            assert_eq!(typ, REP_ERR_TLS_REQD, "option {o} before TLS got {typ:#x}");
        }
        if o == OPT_STARTTLS && typ == REP_ACK {
            return;
        }
        out = &out[(20 + len).min(out.len())..];
    }
}
