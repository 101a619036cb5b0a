//! A large write's payload taken straight off the socket while the device writes it: bytes
//! the request reader has already buffered go first, the rest is spliced from the socket
//! through a pipe into the image file (one copy instead of two; see [`Pipe`]). The device
//! asks for bytes to be made [ready](Payload::ready) before it takes its locks, so a client
//! slow to send them keeps no lock held meanwhile.

use super::sock::Sock;
use super::winding::Winding;
use crate::device::Payload;
use crate::error::{err, Error, ErrorKind, Result};
use crate::storage::{Pipe, Storage};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// What a connection's requests are read from.
pub trait Incoming: Read + Send {
    /// The stream socket behind it (plain, or the local end of a TLS pump's pair), whose
    /// bytes can be spliced; `None` for anything else.
    fn socket_fd(&self) -> Option<RawFd>;
}

impl Incoming for Sock {
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl Incoming for UnixStream {
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// A recorded request stream (the fuzz harness replays one).
impl Incoming for io::Cursor<Vec<u8>> {
    fn socket_fd(&self) -> Option<RawFd> {
        None
    }
}

pub struct SocketPayload<'a> {
    r: &'a mut BufReader<Box<dyn Incoming>>,
    /// `None` where no pipe could be made: bytes then go through memory (as they do when the
    /// stream is not a socket).
    pipe: Option<&'a Pipe>,
    /// Payload bytes still in the reader's buffer or the socket.
    left: usize,
    /// Payload bytes [`Payload::ready`] moved into the pipe ahead of time. In stream order
    /// they come after the payload bytes in the reader's buffer and before the socket's.
    staged: usize,
    /// Bytes were lost between the socket and storage (a pipe that could not be emptied):
    /// the request stream is out of step and the connection must end.
    lost: bool,
    /// The connection's counts: reading from the socket is a wait for the payload (stall.rs).
    winding: &'a Winding,
}

fn client_error(e: io::Error) -> Error {
    Error::io("read the write payload from the client", e)
}

impl<'a> SocketPayload<'a> {
    pub fn new(
        r: &'a mut BufReader<Box<dyn Incoming>>,
        pipe: Option<&'a Pipe>,
        len: usize,
        winding: &'a Winding,
    ) -> SocketPayload<'a> {
        SocketPayload { r, pipe, left: len, staged: 0, lost: false, winding }
    }

    /// Moves between `min` and `max` bytes from the socket into the pipe: a wait on the client.
    fn fill(&self, pipe: &Pipe, fd: RawFd, min: usize, max: usize) -> Result<usize> {
        self.winding.on_payload(|| pipe.fill_up(fd, min, max)).map_err(client_error)
    }

    /// Reads and drops whatever of the payload the device did not take (after an error), so
    /// the next request starts where it should. Err means the connection cannot go on.
    pub fn finish(mut self) -> io::Result<()> {
        if self.staged > 0 {
            self.discard_staged();
        }
        if self.lost {
            return Err(io::Error::other("write payload lost in a pipe"));
        }
        io::copy(&mut self.r.take(self.left as u64), &mut io::sink()).and_then(|n| {
            if n == self.left as u64 {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            }
        })
    }

    fn claim(&self, n: usize) -> Result<()> {
        if n > self.left + self.staged {
            let have = self.left + self.staged;
            return Err(err(ErrorKind::InvalidArgument, format!("{n} bytes asked of a payload of {have}")));
        }
        Ok(())
    }

    /// Payload bytes in the reader's buffer (which may also hold the next request).
    fn buffered(&self) -> usize {
        self.r.buffer().len().min(self.left)
    }

    fn socket(&self) -> Option<(&'a Pipe, RawFd)> {
        self.pipe.zip(self.r.get_ref().socket_fd())
    }

    /// The pipe that holds the staged bytes (only [`Payload::ready`] stages, and only with one).
    fn staged_pipe(&self) -> Result<&'a Pipe> {
        self.pipe.ok_or_else(|| err(ErrorKind::Io, "staged bytes without a pipe"))
    }

    /// Empties the pipe after a failed write, restoring its invariant (empty between uses).
    fn discard_staged(&mut self) {
        self.staged = 0;
        if let Some(pipe) = self.pipe {
            self.lost |= pipe.discard().is_err();
        }
    }

    /// Takes the next `len` bytes, which are all in the reader's buffer, into `storage`.
    fn buffer_to(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> Result<()> {
        let res = storage.write_at(&self.r.buffer()[..len], offset);
        self.r.consume(len);
        self.left -= len;
        res
    }
}

impl Payload for SocketPayload<'_> {
    /// Moves bytes from the socket into the pipe (as far as it takes).
    fn ready(&mut self, min: usize, max: usize) -> Result<usize> {
        let max = max.min(self.left + self.staged);
        let mut have = self.buffered() + self.staged;
        if have < max {
            if let Some((pipe, fd)) = self.socket() {
                // Never past the payload: `max - have` <= the payload bytes still in the socket.
                let n = self.fill(pipe, fd, min.saturating_sub(have), max - have)?;
                self.left -= n;
                self.staged += n;
                have += n;
            }
        }
        Ok(have.min(max))
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        self.claim(buf.len())?;
        let b = self.buffered().min(buf.len());
        buf[..b].copy_from_slice(&self.r.buffer()[..b]);
        self.r.consume(b);
        self.left -= b;
        let p = self.staged.min(buf.len() - b);
        if p > 0 {
            let pipe = self.staged_pipe()?;
            if let Err(e) = pipe.read_exact(&mut buf[b..b + p]) {
                self.discard_staged();
                return Err(client_error(e));
            }
            self.staged -= p;
        }
        let rest = &mut buf[b + p..];
        self.left -= rest.len();
        let r = &mut *self.r;
        self.winding.on_payload(|| r.read_exact(rest)).map_err(client_error)
    }

    fn take_to(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> Result<()> {
        self.claim(len)?;
        let b = self.buffered().min(len);
        if b > 0 {
            self.buffer_to(storage, offset, b)?;
        }
        let mut done = b;
        let p = self.staged.min(len - done);
        if p > 0 {
            let pipe = self.staged_pipe()?;
            if let Err(e) = storage.write_from_pipe(pipe, p, offset + done as u64) {
                self.discard_staged();
                return Err(e);
            }
            self.staged -= p;
            done += p;
        }
        if done == len {
            return Ok(());
        }
        let Some((pipe, fd)) = self.socket() else {
            let mut tmp = vec![0u8; len - done];
            self.take(&mut tmp)?;
            return storage.write_at(&tmp, offset + done as u64);
        };
        while done < len {
            let n = self.fill(pipe, fd, 1, len - done)?;
            if n == 0 {
                return Err(client_error(io::ErrorKind::UnexpectedEof.into()));
            }
            self.left -= n;
            if let Err(e) = storage.write_from_pipe(pipe, n, offset + done as u64) {
                self.discard_staged();
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FaultKind, FaultStorage, FileStorage};
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::Arc;

    const LEN: usize = 3 << 20;

    fn pattern() -> Vec<u8> {
        (0..LEN).map(|i| (i * 7 + i / 65536) as u8).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cowdisk-payload-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A reader over a socket that is sent a write's payload and then `b"NEXT"`, with the
    /// first bytes of the payload already in the read buffer (as after reading a header).
    fn stream() -> (BufReader<Box<dyn Incoming>>, std::thread::JoinHandle<()>) {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        let sender = std::thread::spawn(move || {
            tx.write_all(&pattern()).expect("send payload");
            tx.write_all(b"NEXT").expect("send next");
        });
        let mut r = BufReader::with_capacity(64 * 1024, Box::new(rx) as Box<dyn Incoming>);
        assert!(!r.fill_buf().expect("first bytes").is_empty());
        (r, sender)
    }

    #[test]
    fn payload_split_between_the_read_buffer_and_the_socket_lands_in_order_and_the_stream_goes_on() {
        let path = tmp("ok");
        let file = FileStorage::create(&path).expect("create");
        let (mut r, sender) = stream();
        let pipe = Pipe::new().expect("pipe");
        let w = Winding::default();
        let mut p = SocketPayload::new(&mut r, Some(&pipe), LEN, &w);
        p.take_to(&file, 4096, LEN).expect("payload into the file");
        p.finish().expect("nothing left to drain");
        let mut next = [0u8; 4];
        r.read_exact(&mut next).expect("next request");
        assert_eq!(&next, b"NEXT");
        sender.join().expect("sender");
        let mut back = vec![0u8; LEN];
        file.read_at(&mut back, 4096).expect("read back");
        assert!(back == pattern(), "the file holds other bytes than were sent");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_write_failing_with_bytes_in_the_pipe_is_an_error_and_the_rest_is_drained_in_step() {
        let path = tmp("fail");
        let file = Arc::new(FileStorage::create(&path).expect("create"));
        let faulty = FaultStorage::new(file);
        // The buffered head is write 0; the first splice from the pipe (write 1) fails.
        faulty.arm(1, FaultKind::Eio, false);
        let (mut r, sender) = stream();
        let pipe = Pipe::new().expect("pipe");
        let w = Winding::default();
        let mut p = SocketPayload::new(&mut r, Some(&pipe), LEN, &w);
        let e = p.take_to(&faulty, 0, LEN).expect_err("the second write fails");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(faulty.failures(), 1);
        p.finish().expect("the rest of the payload is read and dropped");
        let mut next = [0u8; 4];
        r.read_exact(&mut next).expect("next request");
        assert_eq!(&next, b"NEXT", "the stream is in step after the failed write");
        let mut probe = [0u8; 1];
        assert!(pipe.read_exact(&mut probe).is_err(), "the pipe is left empty");
        sender.join().expect("sender");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn bytes_made_ready_ahead_are_taken_after_the_buffered_ones_and_before_the_socket() {
        let path = tmp("ready");
        let file = FileStorage::create(&path).expect("create");
        let (mut r, sender) = stream();
        let buffered = r.buffer().len();
        let pipe = Pipe::new().expect("pipe");
        let w = Winding::default();
        let mut p = SocketPayload::new(&mut r, Some(&pipe), LEN, &w);
        let ready = p.ready(LEN, LEN).expect("ready");
        assert!(ready > buffered && ready <= LEN, "ready {ready}, buffered {buffered}");
        assert_eq!(p.ready(10, 10).expect("ready again"), 10, "asking for less never takes more");
        let mut head = vec![0u8; 1000];
        p.take(&mut head).expect("head");
        p.take_to(&file, 0, LEN / 2).expect("middle");
        let mut tail = vec![0u8; LEN - 1000 - LEN / 2];
        p.take(&mut tail).expect("tail");
        p.finish().expect("all taken");
        let mut next = [0u8; 4];
        r.read_exact(&mut next).expect("next request");
        assert_eq!(&next, b"NEXT");
        sender.join().expect("sender");
        let mut mid = vec![0u8; LEN / 2];
        file.read_at(&mut mid, 0).expect("read back");
        let want = pattern();
        assert!(head == want[..1000], "head out of order");
        assert!(mid == want[1000..1000 + LEN / 2], "middle out of order");
        assert!(tail == want[1000 + LEN / 2..], "tail out of order");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_failed_write_of_bytes_made_ready_ahead_drops_them_and_keeps_the_stream_in_step() {
        let path = tmp("readyfail");
        let faulty = FaultStorage::new(Arc::new(FileStorage::create(&path).expect("create")));
        // Write 0 is the buffered head, write 1 the bytes made ready in the pipe.
        faulty.arm(1, FaultKind::NoSpace, false);
        let (mut r, sender) = stream();
        let pipe = Pipe::new().expect("pipe");
        let w = Winding::default();
        let mut p = SocketPayload::new(&mut r, Some(&pipe), LEN, &w);
        assert!(p.ready(LEN, LEN).expect("ready") > 0);
        let e = p.take_to(&faulty, 0, LEN).expect_err("the staged write fails");
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        p.finish().expect("the rest is dropped");
        let mut next = [0u8; 4];
        r.read_exact(&mut next).expect("next request");
        assert_eq!(&next, b"NEXT", "in step after the failure");
        let mut probe = [0u8; 1];
        assert!(pipe.read_exact(&mut probe).is_err(), "the pipe is left empty");
        sender.join().expect("sender");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn without_a_pipe_the_payload_goes_through_memory() {
        let path = tmp("nopipe");
        let file = FileStorage::create(&path).expect("create");
        let (mut r, sender) = stream();
        let w = Winding::default();
        let mut p = SocketPayload::new(&mut r, None, LEN, &w);
        let mut head = vec![0u8; 1000];
        p.take(&mut head).expect("head into memory");
        p.take_to(&file, 0, LEN - 1000).expect("rest into the file");
        p.finish().expect("nothing left");
        sender.join().expect("sender");
        let mut back = vec![0u8; LEN - 1000];
        file.read_at(&mut back, 0).expect("read back");
        let want = pattern();
        assert!(head == want[..1000] && back == want[1000..], "bytes out of order");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn asking_for_more_than_the_payload_holds_is_refused_before_reading() {
        let (mut r, sender) = stream();
        let w = Winding::default();
        let mut p = SocketPayload::new(&mut r, None, 10, &w);
        let mut buf = [0u8; 11];
        assert_eq!(p.take(&mut buf).expect_err("11 of 10").kind(), ErrorKind::InvalidArgument);
        p.finish().expect("drain the 10");
        let mut rest = vec![0u8; LEN - 10];
        r.read_exact(&mut rest).expect("the rest of the stream");
        assert!(rest == pattern()[10..]);
        sender.join().expect("sender");
    }
}
