//! The connection stream as the handshake and transmission see it: plain sockets now; the
//! place where NBD_OPT_STARTTLS upgrades a connection to TLS.

use super::server::Sock;
use std::io::{self, Read, Write};
use std::net::Shutdown;

/// TLS settings of a server. Not yet implemented: a server built without TLS answers
/// NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP and never constructs this.
pub struct TlsConfig {
    _private: (),
}

pub enum Stream {
    Plain(Sock),
}

type Split = (Box<dyn Read + Send>, Box<dyn Write + Send>, Box<dyn Fn() + Send + Sync>);

impl Stream {
    pub fn upgrade(self, _cfg: &TlsConfig) -> io::Result<Stream> {
        Err(io::Error::other("TLS is not supported by this build"))
    }

    /// Separates the stream into a request reader, a reply writer, and a way to close both.
    pub fn split(self) -> io::Result<Split> {
        match self {
            Stream::Plain(s) => {
                let r = s.try_clone()?;
                let c = s.try_clone()?;
                Ok((Box::new(r), Box::new(s), Box::new(move || c.shutdown(Shutdown::Both))))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
