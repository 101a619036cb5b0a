//! The TLS pump: one thread per TLS connection that owns the rustls session and the socket and
//! relays plaintext to and from one end of a Unix socket pair, both directions at once.
//!
//! A rustls connection is a single state machine that cannot be shared between the thread
//! reading requests and the threads writing replies, so the rest of the server gets the other
//! end of the pair instead and never knows TLS is there. Everything here is nonblocking and
//! driven by poll(2); buffers are bounded, so a side that stops reading stops the other side
//! from being read (back-pressure) rather than growing memory.
//!
//! Closing, in both directions, is passed on in order:
//! - the client ends (close_notify, EOF, or the server's own `shutdown(Read)` of the socket
//!   when it stops taking requests): what was received is delivered, then the pair is
//!   half-closed so the local side reads EOF; replies still flow the other way;
//! - the local side closes its end: what it wrote is encrypted and sent, then close_notify;
//! - the socket fails or the local side stops reading: the connection is over, both are shut.

use super::sock::Sock;
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// Most plaintext held in each direction before the pump stops reading that direction.
const CHUNK: usize = 64 * 1024;

/// The running pump of one connection.
pub struct Pump {
    thread: JoinHandle<()>,
}

impl Pump {
    /// Starts relaying between `tls` (handshake done) on `sock` and a new socket pair; returns
    /// the end for the handshake and transmission to use.
    pub fn start(tls: ServerConnection, sock: Sock) -> io::Result<(UnixStream, Pump)> {
        let (local, remote) = UnixStream::pair()?;
        remote.set_nonblocking(true)?;
        // The server's registry holds a clone of this socket (same open file): it only ever
        // calls shutdown on it, which works the same on a nonblocking socket.
        sock.set_nonblocking(true)?;
        let mut st = State {
            tls,
            sock,
            pair: remote,
            to_local: Vec::new(),
            to_local_pos: 0,
            to_tls: Vec::new(),
            client_done: false,
            pair_write_shut: false,
            local_done: false,
            close_sent: false,
        };
        let thread = std::thread::Builder::new().name("nbd-tls".into()).spawn(move || {
            // An error here is the connection ending badly; either way both ends are shut
            // so nobody waits on a connection that is gone.
            let _ = st.run();
            st.pair.shutdown(Shutdown::Both).ok();
            st.sock.shutdown(Shutdown::Both);
        })?;
        Ok((local, Pump { thread }))
    }

    /// Waits until the last replies have been sent (or the connection broke).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

struct State {
    tls: ServerConnection,
    sock: Sock,
    pair: UnixStream,
    /// Plaintext from the client not yet written to the pair.
    to_local: Vec<u8>,
    to_local_pos: usize,
    /// Plaintext from the pair that rustls has not yet taken (its send buffer is full).
    to_tls: Vec<u8>,
    /// Nothing more will be taken from the client.
    client_done: bool,
    pair_write_shut: bool,
    /// The local side closed its end: nothing more to send once `to_tls` is out.
    local_done: bool,
    close_sent: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl State {
    fn run(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let mut moved = false;
            if !self.client_done {
                moved |= self.pull_from_client(&mut buf)?;
            }
            moved |= self.deliver_to_local();
            moved |= self.pull_from_local(&mut buf)?;
            moved |= self.flush_tls()?;
            if self.close_sent && !self.tls.wants_write() {
                return Ok(());
            }
            // Sleep only after a turn that moved nothing: then every direction is blocked on
            // its file descriptor. After a turn that moved something, work may be waiting
            // inside rustls instead (plaintext left in its buffer once ours was full, or room
            // in its send buffer just made by a flush), which poll would never report.
            if !moved {
                self.wait()?;
            }
        }
    }

    /// Sends encrypted bytes to the client until the socket is full.
    fn flush_tls(&mut self) -> io::Result<bool> {
        let mut moved = false;
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(n) => moved |= n > 0,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Decrypts what the client sent until nothing more is there or enough is waiting for the
    /// local side.
    fn pull_from_client(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut moved = false;
        while self.to_local.len() < CHUNK {
            // Plaintext rustls already holds first: data can arrive with the handshake's
            // last flight, before the pump ever polls the socket.
            match self.tls.reader().read(buf) {
                Ok(0) => {
                    // close_notify: the client will send nothing more.
                    self.client_done = true;
                    return Ok(true);
                }
                Ok(n) => {
                    self.to_local.extend_from_slice(&buf[..n]);
                    moved = true;
                    continue;
                }
                Err(e) if would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // EOF without close_notify; everything before it was delivered. NBD
                    // frames its own messages, so a truncation cannot pass as a request.
                    self.client_done = true;
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut self.sock) {
                // EOF: the reader reports it (after any plaintext) on the next time round.
                Ok(_) => {
                    moved = true;
                    if let Err(e) = self.tls.process_new_packets() {
                        // Let the client know why (rustls queued an alert), then give up.
                        let _ = self.tls.write_tls(&mut self.sock);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Writes decrypted client data to the pair; half-closes it once the client is done.
    fn deliver_to_local(&mut self) -> bool {
        let mut moved = false;
        while self.to_local_pos < self.to_local.len() {
            match self.pair.write(&self.to_local[self.to_local_pos..]) {
                Ok(n) if n > 0 => {
                    self.to_local_pos += n;
                    moved = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // The local side no longer reads (it has finished with this connection);
                    // what the client sends from now on has nowhere to go. Replies it already
                    // wrote are still flushed by pull_from_local.
                    self.to_local.clear();
                    self.to_local_pos = 0;
                    self.client_done = true;
                    moved = true;
                }
            }
        }
        if self.to_local_pos == self.to_local.len() {
            self.to_local.clear();
            self.to_local_pos = 0;
            if self.client_done && !self.pair_write_shut {
                let _ = self.pair.shutdown(Shutdown::Write);
                self.pair_write_shut = true;
                moved = true;
            }
        }
        moved
    }

    /// Takes what the local side wrote into rustls; queues close_notify once it has closed.
    fn pull_from_local(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut moved = false;
        if !self.local_done && self.to_tls.is_empty() {
            match self.pair.read(buf) {
                Ok(0) => {
                    self.local_done = true;
                    moved = true;
                }
                Ok(n) => {
                    self.to_tls.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if would_block(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.local_done = true;
                    moved = true;
                }
            }
        }
        if !self.to_tls.is_empty() {
            // Takes less than offered (maybe nothing) while the TLS send buffer is full.
            let n = self.tls.writer().write(&self.to_tls)?;
            self.to_tls.drain(..n);
            moved |= n > 0;
        }
        if self.local_done && self.to_tls.is_empty() && !self.close_sent {
            self.tls.send_close_notify();
            self.close_sent = true;
            moved = true;
        }
        Ok(moved)
    }

    /// Sleeps until one of the things the pump is waiting for can happen.
    fn wait(&mut self) -> io::Result<()> {
        let sock_events = (if !self.client_done && self.to_local.len() < CHUNK { libc::POLLIN } else { 0 })
            | (if self.tls.wants_write() { libc::POLLOUT } else { 0 });
        let pair_events = (if !self.local_done && self.to_tls.is_empty() { libc::POLLIN } else { 0 })
            | (if self.to_local_pos < self.to_local.len() { libc::POLLOUT } else { 0 });
        if sock_events == 0 && pair_events == 0 {
            // Nothing can move any more (cannot happen after a turn that moved nothing: a
            // full TLS buffer means wants_write); end rather than sleep forever.
            return Err(io::Error::other("TLS pump has nothing to wait for"));
        }
        // A side with nothing to wait for is left out (negative fd): poll would otherwise
        // report its hang-up over and over and the loop would spin.
        let fd = |events: libc::c_short, fd: i32| if events == 0 { -1 } else { fd };
        let mut pfds = [
            libc::pollfd { fd: fd(sock_events, self.sock.as_raw_fd()), events: sock_events, revents: 0 },
            libc::pollfd { fd: fd(pair_events, self.pair.as_raw_fd()), events: pair_events, revents: 0 },
        ];
        // SAFETY: pfds is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // Errors and hang-ups are found by the reads and writes of the next turn.
        Ok(())
    }
}
