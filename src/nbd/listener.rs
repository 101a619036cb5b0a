//! The server's listening sockets: TCP or Unix, bound here or inherited already listening
//! (socket activation), and a Unix socket's file, which a listener removes when dropped if
//! it is still the file it made. The control channel binds its socket with [`bind_unix`] too.

use super::sock::Sock;
use crate::error::{err, Error, ErrorKind, Result};
use std::io;
use std::net::TcpListener;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

pub(super) enum Listener {
    Tcp(TcpListener),
    /// With the socket file to remove when dropped: `None` for an inherited socket (not ours
    /// to remove).
    Unix(UnixListener, Option<Bound>),
}

/// A socket file this server bound: its path and the file it made there (device, inode).
pub(super) struct Bound {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

/// The (device, inode) of what is at `p` now, not following a symbolic link.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// The socket file goes with its listener, also when a later listener of the same start
/// fails to bind (nothing is left behind by a server that never served), but only while it
/// is still the file this server made: another server may have taken the path since.
impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(b)) = self {
            let now = file_id(&b.path);
            if now.is_some() && now == b.id {
                let _ = std::fs::remove_file(&b.path);
            }
        }
    }
}

impl Listener {
    pub(super) fn bind_tcp(addr: &str) -> Result<Listener> {
        TcpListener::bind(addr).map(Listener::Tcp).map_err(|e| Error::io("bind", e).with_file(Path::new(addr)))
    }

    /// [`bind_unix`], and the socket file to remove when dropped.
    pub(super) fn bind_unix(p: &Path) -> Result<Listener> {
        let l = bind_unix(p)?;
        Ok(Listener::Unix(l, Some(Bound { path: p.to_path_buf(), id: file_id(p) })))
    }

    pub(super) fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    pub(super) fn accept(&self) -> io::Result<Sock> {
        let s = match self {
            Listener::Tcp(l) => Sock::Tcp(l.accept()?.0),
            Listener::Unix(l, _) => Sock::Unix(l.accept()?.0),
        };
        // Listeners are non-blocking so a lost accept race cannot stall the loop; connections block.
        match &s {
            Sock::Tcp(t) => t.set_nonblocking(false)?,
            Sock::Unix(u) => u.set_nonblocking(false)?,
        }
        Ok(s)
    }
}

/// Binds a Unix socket at `p`. What is there already is removed only if it is a socket that
/// no server listens on (one left by a server that was killed); a live one is refused as in
/// use, and anything else (a regular file, a directory, a symbolic link) is refused and left
/// alone: a mistyped `--socket` must never delete a user's file. (qemu-nbd unlinks whatever
/// is there.) The control channel binds its socket the same way.
pub fn bind_unix(p: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(p).is_ok() {
                return Err(err(ErrorKind::InUse, "in use: a server is already listening on this socket").with_file(p));
            }
            std::fs::remove_file(p).map_err(|e| Error::io("remove stale socket", e).with_file(p))?;
        }
        Ok(_) => {
            return Err(err(ErrorKind::InvalidArgument, "exists and is not a socket: name another path for the socket")
                .with_file(p))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("stat", e).with_file(p)),
    }
    UnixListener::bind(p).map_err(|e| Error::io("bind", e).with_file(p))
}

/// An `int` socket option of `fd`.
fn sockopt(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, an int of that size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes over an inherited listening socket, after checking it is one a client can reach
/// (the checks sd_is_socket makes): a descriptor that is not open, not a socket, not a
/// stream, not listening (a systemd socket unit with `Accept=yes` hands over connections)
/// or of another family is refused, and the descriptor left alone.
pub(super) fn inherit(fd: RawFd) -> Result<Listener> {
    use std::os::fd::FromRawFd;
    let refuse = |why: String| err(ErrorKind::InvalidArgument, format!("inherited descriptor {fd}: {why}"));
    let os = |e: io::Error| refuse(e.to_string());
    // SAFETY: fstat fills a stat of the right size; an invalid fd is reported as EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(os(io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(refuse("not a socket".into()));
    }
    if sockopt(fd, libc::SO_TYPE).map_err(os)? != libc::SOCK_STREAM {
        return Err(refuse("not a stream socket".into()));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(os)? == 0 {
        return Err(refuse("a socket that is not listening (a systemd socket unit needs Accept=no)".into()));
    }
    // SAFETY: an all-zero sockaddr_storage is valid; getsockname writes at most `len` bytes.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return Err(os(io::Error::last_os_error()));
    }
    // Not handed on to anything this process may start.
    // SAFETY: F_SETFD on a descriptor checked open above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(os(io::Error::last_os_error()));
    }
    // SAFETY (both): the descriptor is an open listening socket of that family, handed to
    // this process to own; nothing else in it uses the number.
    match libc::c_int::from(addr.ss_family) {
        libc::AF_UNIX => Ok(Listener::Unix(unsafe { UnixListener::from_raw_fd(fd) }, None)),
        libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(unsafe { TcpListener::from_raw_fd(fd) })),
        f => Err(refuse(format!("address family {f} is neither TCP nor Unix"))),
    }
}
