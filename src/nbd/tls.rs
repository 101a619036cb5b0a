//! The connection stream as the handshake and transmission see it, and the place where
//! NBD_OPT_STARTTLS upgrades a connection to TLS (rustls on aws-lc-rs, TLS 1.2 and 1.3, server
//! certificate from PEM files, client certificates checked against a CA when asked to).
//!
//! After the TLS handshake the connection is carried on through a [`Pump`]: a rustls session
//! cannot be read on one thread while another writes it, but the transmission engine reads
//! requests and writes replies from different threads. The pump thread owns the session and
//! the socket and relays plaintext to one end of a Unix socket pair; the rest of the server
//! talks to the other end exactly as it would to a plain socket.

use super::payload::Incoming;
use super::sock::Sock;
use super::tls_pump::Pump;
use crate::error::{err, Error, ErrorKind, Result};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

/// TLS settings of a server: its certificate chain and private key and, when clients must
/// prove who they are, the CA that signs their certificates.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<rustls::ServerConfig>,
    verifies_clients: bool,
}

/// Which PEM file an error is about; decides the wording and the operation named.
#[derive(Clone, Copy)]
enum PemFile {
    Certificate,
    Key,
    Ca,
}

impl PemFile {
    fn what(self) -> &'static str {
        match self {
            PemFile::Certificate => "certificate",
            PemFile::Key => "private key",
            PemFile::Ca => "CA certificate",
        }
    }

    fn op(self) -> &'static str {
        match self {
            PemFile::Certificate => "read TLS certificate",
            PemFile::Key => "read TLS key",
            PemFile::Ca => "read TLS CA certificate",
        }
    }
}

/// One line saying what is wrong with a PEM file.
fn pem_error(file: &Path, kind: PemFile, e: pem::Error) -> Error {
    let what = kind.what();
    match e {
        pem::Error::Io(io) => Error::io(kind.op(), io),
        pem::Error::NoItemsFound => err(ErrorKind::InvalidArgument, format!("no PEM {what} found in this file")),
        other => err(ErrorKind::InvalidArgument, format!("bad PEM {what}: {other}")),
    }
    .with_file(file)
}

/// Every `-----BEGIN CERTIFICATE-----` block of a file, in order; at least one.
fn read_certs(file: &Path, kind: PemFile) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| pem_error(file, kind, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(file, kind, e))?;
    if certs.is_empty() {
        return Err(pem_error(file, kind, pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// A verifier that admits only clients whose certificate chains to a CA in `ca`. Clients
/// without a certificate are refused too: an optional check would let anyone in.
fn client_verifier(ca: &Path, provider: Arc<CryptoProvider>) -> Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca, PemFile::Ca)? {
        roots
            .add(c)
            .map_err(|e| err(ErrorKind::InvalidArgument, format!("not a usable CA certificate ({e})")).with_file(ca))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| err(ErrorKind::InvalidArgument, format!("unusable CA certificates: {e}")).with_file(ca))
}

impl TlsConfig {
    /// Loads a certificate chain (leaf first, as `-----BEGIN CERTIFICATE-----` blocks) and its
    /// private key (PKCS#8, PKCS#1 or SEC1 PEM); any client may connect. Every error names
    /// the file it is about.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsConfig> {
        TlsConfig::load(cert, key, None)
    }

    /// [`TlsConfig::from_pem_files`], and with `client_ca` every client must present a
    /// certificate signed by a CA in that PEM file: one without, or with a certificate from
    /// another CA, fails the TLS handshake before it can send a single NBD option.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsConfig> {
        let certs = read_certs(cert, PemFile::Certificate)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, PemFile::Key, e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Loaded once on its own so that an unusable key is blamed on the key file, and a
        // key that does not belong to the certificate on the certificate.
        provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| err(ErrorKind::InvalidArgument, format!("unusable private key: {e}")).with_file(key))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err(ErrorKind::Unsupported, format!("TLS setup: {e}")))?;
        let builder = match client_ca {
            Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(certs, key_der).map_err(|e| {
            let msg = match e {
                rustls::Error::InconsistentKeys(_) => format!("does not match the private key {}", key.display()),
                rustls::Error::InvalidCertificate(c) => format!("not a usable X.509 certificate ({c:?})"),
                other => format!("unusable certificate: {other}"),
            };
            err(ErrorKind::InvalidArgument, msg).with_file(cert)
        })?;
        Ok(TlsConfig { inner: Arc::new(config), verifies_clients: client_ca.is_some() })
    }

    /// Whether clients must present a certificate from the configured CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }
}

pub enum Stream {
    Plain(Sock),
    /// TLS is up: plaintext goes through this end of the pair, the pump does the rest.
    Piped(UnixStream, Option<Pump>),
}

/// A request reader, a reply writer, and a way to close both.
pub type Split = (Box<dyn Incoming>, Box<dyn Write + Send>, Box<dyn Fn() + Send + Sync>);

impl Stream {
    /// Runs the TLS server handshake on a plain stream (the client has just had NBD_REP_ACK
    /// to NBD_OPT_STARTTLS) and hands the session to a pump. The handshake blocks; the
    /// server's handshake deadline still applies because it shuts the raw socket down.
    pub fn upgrade(self, cfg: &TlsConfig) -> io::Result<Stream> {
        let mut sock = match self {
            Stream::Plain(s) => s,
            Stream::Piped(..) => return Err(io::Error::other("TLS is already active")),
        };
        let mut tls = ServerConnection::new(cfg.inner.clone()).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            // complete_io sends whatever alert rustls queued before reporting a failure.
            tls.complete_io(&mut sock)?;
        }
        while tls.wants_write() {
            tls.write_tls(&mut sock)?;
        }
        let (local, pump) = Pump::start(tls, sock)?;
        Ok(Stream::Piped(local, Some(pump)))
    }

    /// The pump thread of a TLS stream, for the caller to wait on once the connection is over
    /// (it may still be sending the last replies).
    pub fn take_pump(&mut self) -> Option<Pump> {
        match self {
            Stream::Plain(_) => None,
            Stream::Piped(_, p) => p.take(),
        }
    }

    /// Separates the stream into a request reader, a reply writer, and a way to close both.
    pub fn split(self) -> io::Result<Split> {
        match self {
            Stream::Plain(s) => {
                let r = s.try_clone()?;
                let c = s.try_clone()?;
                Ok((Box::new(r), Box::new(s), Box::new(move || c.shutdown(Shutdown::Both))))
            }
            Stream::Piped(s, _) => {
                let r = s.try_clone()?;
                let c = s.try_clone()?;
                // The pump sees the pair close, sends close_notify and closes the socket.
                Ok((
                    Box::new(r),
                    Box::new(s),
                    Box::new(move || {
                        let _ = c.shutdown(Shutdown::Both);
                    }),
                ))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
            Stream::Piped(s, _) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Piped(s, _) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
