//! `cowdisk serve` as a daemon: the listening sockets it inherits through socket activation
//! (LISTEN_PID, LISTEN_FDS), the pid file, `--fork` (the foreground process waits until the
//! server it forked accepts connections, or failed before that, and then returns), `--log`
//! (where stderr goes once it serves; reopened at SIGHUP), and readiness and keep-alives told
//! to a service manager (sd_notify: NOTIFY_SOCKET, for systemd's `Type=notify` and
//! `WatchdogSec=`).

use crate::Failure;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The first inherited descriptor: fixed by the socket-activation protocol.
const FIRST_FD: RawFd = 3;
/// The most sockets accepted (nbdkit's limit): a wild LISTEN_FDS must not make us adopt
/// every descriptor number up to it.
const MAX_FDS: u32 = 16;
/// What the forked server sends the waiting foreground process once it serves.
const READY: u8 = b'R';

/// The listening sockets handed over by whoever started this process (systemd, libnbd's
/// `nbd_connect_systemd_socket_activation`, `systemd-socket-activate`): descriptors 3 to
/// 3+LISTEN_FDS-1, when LISTEN_PID is this process's id. Empty without socket activation.
///
/// The variables are removed in any case, so that nothing this process starts mistakes them
/// for its own; LISTEN_FDNAMES too (names are not used: every socket serves every export).
/// Must run before `--fork`: the id in LISTEN_PID is the one of the process started.
pub fn inherited_sockets() -> Result<Vec<RawFd>, Failure> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(Vec::new()) };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (a wrapper that forked): serve as if not activated, as
        // nbdkit does, but say so, since the sockets the operator configured go unused.
        eprintln!("cowdisk: LISTEN_PID={pid} is not this process ({}): socket activation ignored", std::process::id());
        return Ok(Vec::new());
    }
    let n = match fds.trim().parse::<u32>() {
        Ok(n @ 1..=MAX_FDS) => n as RawFd,
        _ => {
            return Err(Failure(format!("socket activation: LISTEN_FDS={fds} is not a number from 1 to {MAX_FDS}"), 1))
        }
    };
    let fds: Vec<RawFd> = (FIRST_FD..FIRST_FD + n).collect();
    for &fd in &fds {
        // Checked open now, before this process opens anything: a missing descriptor's number
        // would otherwise go to the first file opened (an image), which would then be taken
        // for the socket. Close-on-exec, as nbdkit does, so nothing started inherits it.
        // SAFETY: F_SETFD on a descriptor number; an invalid one is reported as EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(os_error(&format!("inherited descriptor {fd}")));
        }
    }
    Ok(fds)
}

/// What the serving process does once its sockets accept connections: write the pid file,
/// and, forked, tell the foreground process to return.
pub struct Daemon {
    /// Locked from the start, written once ready; removed when dropped (a start that fails
    /// leaves none behind).
    pid_file: Option<PidFile>,
    /// Forked: the pipe to the waiting foreground process.
    parent: Option<OwnedFd>,
    /// `--log`: opened (appending) before anything else, so a bad path fails the start; and
    /// its path, absolute, which SIGHUP opens again.
    log: Option<(std::fs::File, PathBuf)>,
}

fn os_error(what: &str) -> Failure {
    Failure(format!("{what}: {}", std::io::Error::last_os_error()), 1)
}

impl Daemon {
    /// Nothing to do when ready (`cowdisk demo`).
    pub fn none() -> Daemon {
        Daemon { pid_file: None, parent: None, log: None }
    }

    /// With `fork`, forks: the foreground process stays here until the server is ready (exit
    /// 0) or has failed (its exit code; the server printed its error line on the stderr they
    /// share), and only the server returns. Call while the process has one thread (fork
    /// copies only the caller's) and before any image is opened.
    pub fn start(pid_file: Option<PathBuf>, fork: bool, log: Option<PathBuf>) -> Result<Daemon, Failure> {
        // Absolute now, so that removing it at exit does not depend on the directory then;
        // locked before the fork, so that a server already holding it is reported by the
        // command itself. The forked server inherits the lock (flock locks belong to the
        // open file, which both processes share until the foreground one exits).
        let pid_file = match pid_file {
            Some(p) => {
                Some(PidFile::lock(std::path::absolute(&p).map_err(|e| Failure(format!("{}: {e}", p.display()), 1))?)?)
            }
            None => None,
        };
        let log = match log {
            Some(p) => {
                let fail = |e: std::io::Error| Failure(format!("{}: --log: {e}", p.display()), 1);
                let f = std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(fail)?;
                Some((f, std::path::absolute(&p).map_err(fail)?))
            }
            None => None,
        };
        if !fork {
            return Ok(Daemon { pid_file, parent: None, log });
        }
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_string())));
        if threads.as_deref().is_some_and(|n| n != "1") {
            return Err(Failure("--fork: cannot fork a process that runs several threads".into(), 1));
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os_error("--fork: pipe"));
        }
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let starter = std::process::id();
        // SAFETY: the process has one thread (checked above), so the child gets a consistent
        // copy of every lock and allocator state.
        match unsafe { libc::fork() } {
            -1 => Err(os_error("--fork: fork")),
            0 => {
                drop(r);
                // Its own session: a Ctrl-C or hang-up meant for the shell that started it
                // does not reach the server it left running.
                // SAFETY: setsid has no memory-safety preconditions.
                unsafe { libc::setsid() };
                // A service manager's WATCHDOG_PID names the process it started; a forking
                // service hands the service over to this one (its main process from now on,
                // as MAINPID= tells the manager once ready), and with it the keep-alives.
                if std::env::var("WATCHDOG_PID").is_ok_and(|p| p.trim().parse::<u32>().ok() == Some(starter)) {
                    // The process still has one thread: nothing reads the environment meanwhile.
                    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
                }
                Ok(Daemon { pid_file, parent: Some(w), log })
            }
            child => {
                drop(w);
                std::process::exit(wait_for_server(r, child))
            }
        }
    }

    /// Whether this is the server a `--fork` left running.
    pub fn is_forked(&self) -> bool {
        self.parent.is_some()
    }

    /// Writes the pid file, once the sockets accept connections; it is removed (and its lock
    /// let go) when the returned guard is dropped.
    pub fn write_pid_file(&mut self) -> Result<Option<PidFile>, Failure> {
        let p = self.pid_file.take();
        if let Some(p) = &p {
            p.write()?;
        }
        Ok(p)
    }

    /// Called once the server serves and its startup lines are printed. Forked, it lets go of
    /// the terminal or pipe it was started with (stdin, stdout and stderr become /dev/null, as
    /// with qemu-nbd --fork, so that a caller's `$(cowdisk serve --fork ...)` returns; stderr
    /// the `--log` file if there is one) and tells the foreground process to return. In the
    /// foreground, `--log` takes stderr alone. With `--log`, SIGHUP from then on opens the
    /// file again (see [`reopen_log`]). Last, a service manager that asked (NOTIFY_SOCKET) is
    /// told the server is ready.
    pub fn ready(&mut self) -> Result<(), Failure> {
        let log = self.log.as_ref().map(|(f, _)| f);
        if let Some(w) = self.parent.take() {
            let _ = std::io::stdout().flush();
            detach_stdio(log)?;
            // The foreground process may be gone (killed while it waited): nothing to tell.
            let _ = std::fs::File::from(w).write_all(&[READY]);
        } else if let Some(log) = log {
            // SAFETY: dup2 onto stderr from a descriptor we hold open.
            if unsafe { libc::dup2(log.as_raw_fd(), 2) } < 0 {
                return Err(os_error("--log: dup2"));
            }
        }
        if let Some((_, path)) = &self.log {
            reopen_log_on_sighup(path)?;
        }
        notify(&format!("READY=1\nMAINPID={}\n", std::process::id()));
        Ok(())
    }
}

/// `--log`'s path, for the SIGHUP handler; set once, before the handler is installed.
static LOG_PATH: OnceLock<CString> = OnceLock::new();

/// Makes SIGHUP open the `--log` file at `path` again and put it under stderr, as logrotate's
/// `postrotate` step expects of a daemon (rename the file, signal, the daemon writes to a new
/// one). Without `--log`, SIGHUP keeps its default action.
fn reopen_log_on_sighup(path: &std::path::Path) -> Result<(), Failure> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Failure("--log: a NUL in the path".into(), 1))?;
    if LOG_PATH.set(c).is_err() {
        return Ok(()); // already installed
    }
    // SAFETY: installing a handler that makes only async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = reopen_log as extern "C" fn(libc::c_int) as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGHUP, &sa, std::ptr::null_mut()) != 0 {
            return Err(os_error("--log: sigaction(SIGHUP)"));
        }
    }
    Ok(())
}

/// The SIGHUP handler: open(2), dup2(2) and close(2), all async-signal-safe, with errno kept
/// for the code it interrupted. If the file cannot be opened (its directory gone), stderr
/// stays where it was: better the old file than nothing.
extern "C" fn reopen_log(_: libc::c_int) {
    let Some(path) = LOG_PATH.get() else { return };
    // SAFETY: errno is this thread's; path is a valid NUL-terminated string that lives forever.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC, 0o644);
        if fd >= 0 {
            libc::dup2(fd, 2);
            libc::close(fd);
        }
        *errno = saved;
    }
}

/// Tells a service manager that asked (NOTIFY_SOCKET) that the server begins its shutdown.
pub fn notify_stopping() {
    notify("STOPPING=1\n");
}

/// How often to tell a service manager's watchdog that the server is alive (sd_watchdog_enabled(3)):
/// half of WATCHDOG_USEC, if it is set, and WATCHDOG_PID is unset or this process's id (it
/// names the process the manager watches; a wrapper's child is not it).
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(1)))
}

/// One watchdog keep-alive (WATCHDOG=1), sent from the server's accept loop.
pub fn notify_watchdog() {
    notify("WATCHDOG=1\n");
}

/// What the watchdog check saw (keep-alives withheld for a stuck request, or resumed): on
/// stderr, and as the service's status line (`systemctl status`).
pub fn watchdog_notice(m: &str) {
    eprintln!("cowdisk: {m}");
    notify(&format!("STATUS={m}\n"));
}

/// Sends `state` to the service manager's notification socket (sd_notify(3)): NOTIFY_SOCKET
/// names a Unix datagram socket, a path or, after `@`, an abstract name. Written by hand: the
/// protocol is one datagram, and the crates for it add nothing to that. A failure is printed,
/// not fatal: the manager then times the start out and says so.
fn notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = addr.as_bytes();
        let to = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(&addr)?,
        };
        sock.send_to_addr(state.as_bytes(), &to).map(|_| ())
    })();
    if let Err(e) = sent {
        eprintln!("cowdisk: NOTIFY_SOCKET {}: cannot notify the service manager: {e}", addr.to_string_lossy());
    }
}

/// The foreground side of `--fork`: the exit code once the server is ready (0), or once it
/// has exited without getting there.
fn wait_for_server(r: OwnedFd, child: libc::pid_t) -> i32 {
    let mut byte = [0u8; 1];
    // read_exact retries an interrupted read; end of file is the server gone (or failed).
    if std::fs::File::from(r).read_exact(&mut byte).is_ok() && byte[0] == READY {
        return 0;
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid int.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            eprintln!("cowdisk: --fork: the server process stopped before serving");
            return 1;
        }
    }
    if libc::WIFEXITED(status) {
        // A server that exits 0 before it was ready cannot happen; 1 rather than a success.
        libc::WEXITSTATUS(status).max(1)
    } else {
        let sig = libc::WTERMSIG(status);
        eprintln!("cowdisk: --fork: the server process was killed by signal {sig} before it was serving");
        1
    }
}

/// Points stdin, stdout and stderr at /dev/null, stderr at `log` if given.
fn detach_stdio(log: Option<&std::fs::File>) -> Result<(), Failure> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Failure(format!("/dev/null: {e}"), 1))?;
    for fd in 0..3 {
        let from = match log {
            Some(l) if fd == 2 => l.as_raw_fd(),
            _ => null.as_raw_fd(),
        };
        // SAFETY: dup2 onto the standard descriptors from ones we hold open.
        if unsafe { libc::dup2(from, fd) } < 0 {
            return Err(os_error("--fork: dup2"));
        }
    }
    Ok(())
}

/// The pid file, held locked (flock) from the start to the exit of the server it names, as
/// qemu-nbd holds its own: a second server given the same file is refused at once, instead of
/// overwriting it and then removing it under the first. Removed on drop if the path still
/// names the file locked here; a pid file left by a server killed with -9 is not locked, and
/// is taken over.
pub struct PidFile {
    file: std::fs::File,
    path: PathBuf,
}

/// The (device, inode) of a file's metadata.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

impl PidFile {
    /// Creates (or takes over) and locks `path`, and empties it: a process id left in it by a
    /// server that was killed names no server any more. The process id is written once the
    /// server is ready ([`PidFile::write`]).
    fn lock(path: PathBuf) -> Result<PidFile, Failure> {
        let fail = |e: std::io::Error| Failure(format!("{}: pid file: {e}", path.display()), 1);
        // The server that held the file may remove it between our open and our lock: the lock
        // is then on a file nobody finds under the path, and the open is tried again.
        for _ in 0..16 {
            // Not truncated on open: the file may be another running server's, emptied only
            // once the lock says it is ours.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(fail)?;
            // SAFETY: flock on a descriptor this File owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(fail(e));
                }
                let holder = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
                let who = holder.map_or("another server".to_string(), |p| format!("the server of process {p}"));
                return Err(Failure(
                    format!("{}: pid file in use: {who} holds it; give another --pid-file", path.display()),
                    1,
                ));
            }
            let here = file.metadata().map_err(fail)?;
            if std::fs::symlink_metadata(&path).is_ok_and(|m| file_id(&m) == file_id(&here)) {
                file.set_len(0).map_err(fail)?;
                return Ok(PidFile { file, path });
            }
        }
        Err(fail(std::io::Error::other("the file keeps being replaced under its name")))
    }

    /// Writes "PID\n", in one write to the empty file: a reader sees it empty or whole.
    fn write(&self) -> Result<(), Failure> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
            .map_err(|e| Failure(format!("{}: write pid file: {e}", self.path.display()), 1))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only the file locked here: something may have replaced it under its name since.
        let ours = match (self.file.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(a), Ok(b)) => file_id(&a) == file_id(&b),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        // The lock goes with the descriptor, after the file is gone.
    }
}
