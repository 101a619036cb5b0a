//! TLS test kit shared by tls.rs and tls_auth.rs: certificate authorities, server and client certificates made with the openssl CLI (EC P-256 or RSA of any size in PKCS#1), libnbd / qemu client certificate directories, `nbds://` URIs, tools run under a time limit, and the raw NBD client over rustls (with or without a client certificate).

use super::nbdclient::*;
use super::{run, run_status, tool, tool_path};

use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

pub fn openssl(args: &[&str]) {
    run(tool("openssl").args(args));
}

/// The kind of private key to make.
#[derive(Clone, Copy, Debug)]
pub enum KeyAlg {
    /// EC P-256 (PKCS#8).
    Ec,
    /// RSA of this many bits, in the traditional PKCS#1 form ("BEGIN RSA PRIVATE KEY") that
    /// certtool and older openssl write and other NBD servers load.
    Rsa(u32),
}

/// Writes a new private key of kind `alg` to `path`.
pub fn new_key(path: &Path, alg: KeyAlg) {
    match alg {
        KeyAlg::Ec => openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", s(path)]),
        KeyAlg::Rsa(bits) => openssl(&["genrsa", "-traditional", "-out", s(path), &bits.to_string()]),
    }
}

/// What gnutls (libnbd, qemu) checks of a server: the name or address it connected to, and
/// server use.
const SERVER_EXT: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
                          basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n";
/// A client certificate: client use only; qemu refuses to present one whose key usage lacks
/// key encipherment.
const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n\
                          keyUsage=critical,digitalSignature,keyEncipherment\n";

/// A CA, a server certificate it signed (for localhost and 127.0.0.1) and the server's key;
/// `client` is a libnbd / qemu certificate directory holding only `ca-cert.pem`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client: PathBuf,
}

/// A new CA and server certificate (EC P-256) under `dir/pki-TAG`.
pub fn make_pki(dir: &Path, tag: &str) -> Pki {
    let d = dir.join(format!("pki-{tag}"));
    fs::create_dir_all(&d).unwrap();
    let ca_key = d.join("ca-key.pem");
    let ca = d.join("ca-cert.pem");
    new_key(&ca_key, KeyAlg::Ec);
    let subj = format!("/CN=cowdisk test CA {tag}");
    openssl(&["req", "-x509", "-new", "-key", s(&ca_key), "-out", s(&ca), "-subj", &subj, "-days", "2"]);
    let client = d.join("client");
    fs::create_dir_all(&client).unwrap();
    fs::copy(&ca, client.join("ca-cert.pem")).unwrap();
    let mut pki = Pki { cert: PathBuf::new(), key: PathBuf::new(), dir: d, ca, ca_key, client };
    let (cert, key) = pki.issue("server", "/CN=localhost", KeyAlg::Ec, SERVER_EXT);
    pki.cert = cert;
    pki.key = key;
    pki
}

impl Pki {
    /// A new key of kind `alg` and a certificate for it signed by this CA: `NAME-cert.pem`
    /// and `NAME-key.pem` in this PKI's directory.
    pub fn issue(&self, name: &str, subject: &str, alg: KeyAlg, ext: &str) -> (PathBuf, PathBuf) {
        let key = self.dir.join(format!("{name}-key.pem"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}-cert.pem"));
        let ext_file = self.dir.join(format!("{name}-ext.cnf"));
        new_key(&key, alg);
        openssl(&["req", "-new", "-key", s(&key), "-out", s(&csr), "-subj", subject]);
        fs::write(&ext_file, ext).unwrap();
        let mut a = vec!["x509", "-req", "-in", s(&csr), "-CA", s(&self.ca), "-CAkey", s(&self.ca_key)];
        a.extend(["-CAcreateserial", "-out", s(&cert), "-days", "2", "-extfile", s(&ext_file)]);
        openssl(&a);
        (cert, key)
    }

    /// A server certificate and key of kind `alg` signed by this CA.
    pub fn server_cert(&self, name: &str, alg: KeyAlg) -> (PathBuf, PathBuf) {
        self.issue(name, "/CN=localhost", alg, SERVER_EXT)
    }

    /// A libnbd / qemu client certificate directory `client-NAME`: `ca-cert.pem` (the CA the
    /// client checks the server against, `server_ca`) and `client-cert.pem` +
    /// `client-key.pem`, a key of kind `alg` with a certificate signed by this CA.
    pub fn client_dir(&self, name: &str, server_ca: &Path, alg: KeyAlg) -> PathBuf {
        let (cert, key) = self.issue(&format!("client-{name}"), &format!("/CN=client {name}"), alg, CLIENT_EXT);
        let d = self.dir.join(format!("client-{name}"));
        fs::create_dir_all(&d).unwrap();
        fs::copy(server_ca, d.join("ca-cert.pem")).unwrap();
        fs::copy(&cert, d.join("client-cert.pem")).unwrap();
        fs::copy(&key, d.join("client-key.pem")).unwrap();
        d
    }
}

// ---------------------------------------------------------------------------
// URIs and tools
// ---------------------------------------------------------------------------

/// Percent-encodes for a URI query value (keeps `/`).
pub fn esc(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, super::URI_PATH).to_string()
}

/// `nbds+unix:///EXPORT?socket=SOCK&tls-certificates=CERTS` (EXPORT may be empty, as for
/// `nbdinfo --list`).
pub fn tls_unix_uri(sock: &Path, export: &str, certs: &Path) -> String {
    format!("nbds+unix:///{export}?socket={}&tls-certificates={}", esc(s(sock)), esc(s(certs)))
}

pub fn tls_tcp_uri(port: u16, export: &str, certs: &Path) -> String {
    format!("nbds://127.0.0.1:{port}/{export}?tls-certificates={}", esc(s(certs)))
}

/// `prog` under timeout(1): a server that stops relaying must fail the test, not hang it.
pub fn bounded(prog: &str) -> Command {
    let mut c = tool("timeout");
    c.args(["-k", "5", "120"]).arg(tool_path(prog).unwrap_or_else(|| PathBuf::from(prog)));
    c
}

/// nbdinfo under a time limit, whatever its exit status.
pub fn nbdinfo(args: &[&str]) -> std::process::Output {
    run_status(bounded("nbdinfo").args(args))
}

// ---------------------------------------------------------------------------
// The raw client over rustls
// ---------------------------------------------------------------------------

/// The raw client's transport once NBD_OPT_STARTTLS has been acknowledged.
pub struct TlsSock(StreamOwned<ClientConnection, UnixStream>);

impl Read for TlsSock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for TlsSock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl NbdStream for TlsSock {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.sock.set_read_timeout(t)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.0.sock.shutdown(Shutdown::Write)
    }
}

pub const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
pub const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// A client that trusts the CA in `ca` and presents no certificate.
pub fn client_config(ca: &Path, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    client_config_with_cert(ca, versions, None)
}

/// A client that trusts the CA in `ca` and, given a libnbd-style certificate directory,
/// presents its `client-cert.pem` (signed with `client-key.pem`).
pub fn client_config_with_cert(
    ca: &Path,
    versions: &[&'static SupportedProtocolVersion],
    client_dir: Option<&Path>,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA certificate")).expect("CA certificate accepted");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
    Arc::new(match client_dir {
        None => builder.with_no_client_auth(),
        Some(d) => {
            let certs = CertificateDer::pem_file_iter(d.join("client-cert.pem"))
                .expect("client certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate");
            let key = PrivateKeyDer::from_pem_file(d.join("client-key.pem")).expect("client key");
            builder.with_client_auth_cert(certs, key).expect("client certificate and key accepted")
        }
    })
}

/// Sends NBD_OPT_STARTTLS (expecting NBD_REP_ACK) and runs the TLS handshake as far as the
/// client sees it; Err is the client's handshake failure. Under TLS 1.3 a client finishes its
/// side before the server has checked the client's certificate, so a refusal of that
/// certificate shows only at the next read.
pub fn try_start_tls(
    mut c: NbdClient<UnixStream>,
    cfg: Arc<ClientConfig>,
) -> io::Result<(NbdClient<TlsSock>, rustls::ProtocolVersion)> {
    let r = c.option_exchange(NBD_OPT_STARTTLS, &[]).expect("STARTTLS exchange");
    assert_eq!(r.len(), 1, "STARTTLS answered with more than one reply: {r:?}");
    assert_eq!(r[0].reply_type, NBD_REP_ACK, "STARTTLS refused: {r:?}");
    let (hf, cf) = (c.handshake_flags, c.client_flags);
    let sock = c.into_stream();
    let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut tls = StreamOwned::new(conn, sock);
    // The handshake now, so that a failure shows here rather than at the first option.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let version = tls.conn.protocol_version().expect("a TLS version after the handshake");
    let mut c = NbdClient::from_stream(TlsSock(tls))?;
    // The greeting happened in plain text; the client must remember what it agreed there.
    c.handshake_flags = hf;
    c.client_flags = cf;
    Ok((c, version))
}

/// [`try_start_tls`] that must succeed.
pub fn start_tls(c: NbdClient<UnixStream>, cfg: Arc<ClientConfig>) -> (NbdClient<TlsSock>, rustls::ProtocolVersion) {
    try_start_tls(c, cfg).expect("TLS handshake with the server")
}

/// Reads until the server closes (after whatever it still sends, e.g. a TLS alert), or
/// gives up after `timeout`; true if it closed.
pub fn closes_within<S: NbdStream>(c: &mut NbdClient<S>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match c.peer_state(Duration::from_millis(200)) {
            Ok(PeerState::Closed) => return true,
            Ok(PeerState::StillOpen) | Ok(PeerState::SentData(_)) => {}
            // Anything else a broken TLS session reports (bad record, reset) is also an end.
            Err(_) => return true,
        }
    }
    false
}
