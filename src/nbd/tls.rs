//! The connection stream as the handshake and transmission see it, and the place where
//! NBD_OPT_STARTTLS upgrades a connection to TLS (rustls on aws-lc-rs, TLS 1.2 and 1.3, server
//! certificate from PEM files, no client certificates).
//!
//! After the TLS handshake the connection is carried on through a [`Pump`]: a rustls session
//! cannot be read on one thread while another writes it, but the transmission engine reads
//! requests and writes replies from different threads. The pump thread owns the session and
//! the socket and relays plaintext to one end of a Unix socket pair; the rest of the server
//! talks to the other end exactly as it would to a plain socket.

use super::payload::Incoming;
use super::server::Sock;
use super::tls_pump::Pump;
use crate::error::{err, Error, ErrorKind, Result};
use rustls::ServerConnection;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

/// TLS settings of a server: its certificate chain and private key.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<rustls::ServerConfig>,
}

/// One line saying what is wrong with a PEM file.
fn pem_error(file: &Path, what: &str, e: pem::Error) -> Error {
    match e {
        pem::Error::Io(io) => {
            Error::io(if what == "certificate" { "read TLS certificate" } else { "read TLS key" }, io)
        }
        pem::Error::NoItemsFound => err(ErrorKind::InvalidArgument, format!("no PEM {what} found in this file")),
        other => err(ErrorKind::InvalidArgument, format!("bad PEM {what}: {other}")),
    }
    .with_file(file)
}

impl TlsConfig {
    /// Loads a certificate chain (leaf first, as `-----BEGIN CERTIFICATE-----` blocks) and its
    /// private key (PKCS#8, PKCS#1 or SEC1 PEM). Every error names the file it is about.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsConfig> {
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_error(cert, "certificate", e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pem_error(cert, "certificate", e))?;
        if certs.is_empty() {
            return Err(pem_error(cert, "certificate", pem::Error::NoItemsFound));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, "private key", e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Loaded once on its own so that an unusable key is blamed on the key file, and a
        // key that does not belong to the certificate on the certificate.
        provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| err(ErrorKind::InvalidArgument, format!("unusable private key: {e}")).with_file(key))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err(ErrorKind::Unsupported, format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| {
                let msg = match e {
                    rustls::Error::InconsistentKeys(_) => format!("does not match the private key {}", key.display()),
                    rustls::Error::InvalidCertificate(c) => format!("not a usable X.509 certificate ({c:?})"),
                    other => format!("unusable certificate: {other}"),
                };
                err(ErrorKind::InvalidArgument, msg).with_file(cert)
            })?;
        Ok(TlsConfig { inner: Arc::new(config) })
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
