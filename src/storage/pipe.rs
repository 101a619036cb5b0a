//! A kernel pipe that carries a write's bytes from a socket to a file with splice(2), so they
//! are copied once (into the page cache) instead of twice (socket to user memory, then on).
//!
//! Invariant kept by every user: the pipe is empty between uses (between NBD requests), and
//! filling never waits for room that nobody would make: [`Pipe::fill_up`] stops when the pipe
//! is full, and what went in is taken out in full (into a file or a buffer) or thrown away
//! with [`Pipe::discard`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Requested pipe capacity: one 1 MiB write in one round where the kernel allows it. Without
/// privilege Linux allows up to /proc/sys/fs/pipe-max-size (1 MiB by default); a refusal
/// leaves the default (64 KiB), which only means more rounds.
const CAPACITY: libc::c_int = 1 << 20;

#[derive(Debug)]
pub struct Pipe {
    /// Non-blocking, so taking more than the pipe holds is an error, not a hang.
    read: OwnedFd,
    write: OwnedFd,
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Retries a syscall wrapper while it reports EINTR.
fn retry(mut f: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Whether `fd` is ready for `events` within `timeout_ms` (-1: wait as long as it takes).
/// Errors and hang-ups count as ready: the next call on `fd` reports them.
pub(crate) fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one pollfd we own.
    let n = retry(|| unsafe { libc::poll(&mut p, 1, timeout_ms) as isize })?;
    Ok(n > 0 && p.revents != 0)
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on fds we own. A refused capacity is not an error (see CAPACITY).
        unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CAPACITY);
            let fl = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(read.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Pipe { read, write })
    }

    /// Moves up to `max` bytes from the stream socket `src` into the pipe: waits for the
    /// socket until `min` have moved, then takes only what is there already. Stops early when
    /// the pipe is full or the stream ends. Returns how many moved; 0 with a `min` of at least
    /// 1 means the stream ended. It may be called on a pipe that holds bytes.
    pub fn fill_up(&self, src: RawFd, min: usize, max: usize) -> io::Result<usize> {
        let mut moved = 0;
        while moved < max {
            // SAFETY: splice between fds we hold; null offsets, since neither end is seekable.
            // SPLICE_F_NONBLOCK: EAGAIN, not a wait, when the pipe is full (and, on a Unix
            // socket, when no data is there yet).
            let r = retry(|| unsafe {
                libc::splice(
                    src,
                    std::ptr::null_mut(),
                    self.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    max - moved,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            });
            match r {
                Ok(0) => break,
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if moved >= min || !poll_one(self.write.as_raw_fd(), libc::POLLOUT, 0)? {
                        break;
                    }
                    poll_one(src, libc::POLLIN, -1)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Moves exactly `len` bytes, which the pipe must hold, into the file `dst` at `offset`.
    /// On error some of them may have been written and the rest are still in the pipe, except
    /// for EINVAL (the file cannot be spliced into), which comes before any byte moved.
    pub fn drain_to(&self, dst: RawFd, offset: u64, len: usize) -> io::Result<()> {
        let mut off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut left = len;
        while left > 0 {
            // SAFETY: splice from our pipe into an fd the caller holds; `off` is ours and
            // the kernel advances it by the bytes moved.
            let n = retry(|| unsafe {
                libc::splice(self.read.as_raw_fd(), std::ptr::null_mut(), dst, &mut off, left, libc::SPLICE_F_MOVE)
            })
            .map_err(|e| match e.raw_os_error() {
                // EINVAL promises the caller that nothing moved (see above).
                Some(libc::EINVAL) if left < len => io::Error::other(format!("splice failed part way: {e}")),
                _ => e,
            })?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe holds fewer bytes than expected"));
            }
            left -= n;
        }
        Ok(())
    }

    /// Fills `buf` with bytes the pipe holds.
    pub fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: read into memory we own, at most its length.
            let n = retry(|| unsafe { libc::read(self.read.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) })?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe holds fewer bytes than expected"));
            }
            done += n;
        }
        Ok(())
    }

    /// Throws away whatever the pipe holds (after a failed drain), restoring the invariant.
    pub fn discard(&self) -> io::Result<()> {
        let mut sink = [0u8; 64 * 1024];
        loop {
            // SAFETY: read into a local buffer, at most its length.
            match retry(|| unsafe { libc::read(self.read.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) }) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 4096) as u8).collect()
    }

    fn fill_exactly(p: &Pipe, src: &UnixStream, mut n: usize) {
        while n > 0 {
            let k = p.fill_up(src.as_raw_fd(), 1, n).expect("splice from socket");
            assert!(k > 0, "stream ended early");
            n -= k;
        }
    }

    #[test]
    fn bytes_spliced_from_a_socket_land_in_the_file_at_the_offset_unchanged() {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        let data = pattern(3 << 20);
        let sent = data.clone();
        let sender = std::thread::spawn(move || tx.write_all(&sent).expect("send"));
        let path = tmp("splice");
        let file =
            std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("file");
        let p = Pipe::new().expect("pipe");
        let mut at = 0usize;
        // Rounds of whatever one fill brings, each drained whole, as the server does.
        while at < data.len() {
            let k = p.fill_up(rx.as_raw_fd(), 1, data.len() - at).expect("fill");
            assert!(k > 0);
            p.drain_to(file.as_raw_fd(), 4096 + at as u64, k).expect("drain");
            at += k;
        }
        sender.join().expect("sender");
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 4096).expect("read back");
        assert!(back == data, "file differs from what was sent");
        let mut head = [1u8; 4096];
        file.read_exact_at(&mut head, 0).expect("head");
        assert!(head.iter().all(|&b| b == 0), "bytes before the offset were touched");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn draining_more_than_the_pipe_holds_fails_instead_of_waiting() {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        tx.write_all(&[7u8; 100]).expect("send");
        let p = Pipe::new().expect("pipe");
        fill_exactly(&p, &rx, 100);
        let path = tmp("short");
        let file = std::fs::File::create(&path).expect("file");
        let e = p.drain_to(file.as_raw_fd(), 0, 200).expect_err("only 100 bytes are there");
        assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn discard_empties_the_pipe_and_the_stream_continues_after_it() {
        let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
        tx.write_all(&pattern(5000)).expect("send");
        tx.write_all(b"next").expect("send");
        let p = Pipe::new().expect("pipe");
        fill_exactly(&p, &rx, 5000);
        p.discard().expect("discard");
        let mut probe = [0u8; 1];
        let e = p.read_exact(&mut probe).expect_err("the pipe is empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let mut next = [0u8; 4];
        rx.read_exact(&mut next).expect("rest of the stream");
        assert_eq!(&next, b"next");
    }

    #[test]
    fn fill_up_stops_when_the_pipe_is_full_and_resumes_after_a_drain() {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        let data = pattern(1 << 20);
        let sent = data.clone();
        let sender = std::thread::spawn(move || tx.write_all(&sent).expect("send"));
        let p = Pipe::new().expect("pipe");
        // One buffer slot: full after the first piece of data.
        // SAFETY: fcntl on the pipe's own fd.
        assert!(unsafe { libc::fcntl(p.write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } > 0);
        let mut back = Vec::new();
        let mut rounds = 0;
        while back.len() < data.len() {
            let n = p.fill_up(rx.as_raw_fd(), data.len() - back.len(), data.len() - back.len()).expect("fill up");
            assert!(n > 0, "no progress");
            let at = back.len();
            back.resize(at + n, 0);
            p.read_exact(&mut back[at..]).expect("read");
            rounds += 1;
        }
        sender.join().expect("sender");
        assert!(back == data);
        assert!(rounds > 1, "a one-slot pipe cannot take 1 MiB at once, so fill_up must return early");
    }

    #[test]
    fn fill_up_waits_for_a_slow_sender_and_appends_to_what_the_pipe_holds() {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        let p = Pipe::new().expect("pipe");
        tx.write_all(b"abc").expect("send");
        assert_eq!(p.fill_up(rx.as_raw_fd(), 3, 3).expect("fill"), 3);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            tx.write_all(b"defg").expect("send");
        });
        assert_eq!(p.fill_up(rx.as_raw_fd(), 4, 4).expect("fill waits"), 4);
        let mut back = [0u8; 7];
        p.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"abcdefg");
        sender.join().expect("sender");
    }

    #[test]
    fn read_exact_takes_spliced_bytes_in_order() {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        let data = pattern(70_000);
        tx.write_all(&data).expect("send");
        let p = Pipe::new().expect("pipe");
        let mut back = vec![0u8; data.len()];
        let mut at = 0;
        while at < data.len() {
            let k = p.fill_up(rx.as_raw_fd(), 1, data.len() - at).expect("fill");
            p.read_exact(&mut back[at..at + k]).expect("read");
            at += k;
        }
        assert!(back == data);
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("cowdisk-pipe-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }
}
