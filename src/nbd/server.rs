//! The NBD server: its listeners (`listener.rs`: TCP, Unix, bound here or inherited), one
//! thread per connection for reading requests, a shared worker pool, the connection cap, the
//! handshake deadline, and orderly shutdown.

use super::budget::Budget;
use super::exports::{Export, Exports, RemoveError};
use super::handshake::{Negotiated, Outcome, Session, TlsMode};
pub use super::listener::bind_unix;
use super::listener::{inherit, Listener};
use super::meta::Offer;
use super::sock::Sock;
use super::stall::Stalls;
use super::tls::{Stream, TlsConfig};
use super::transmission;
use super::winding::{Why, Winding};
use crate::error::{err, Error, ErrorKind, Result};
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a shutdown waits for connections to answer their requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long the accept loop waits after accepting failed for a reason that lasts (no
/// descriptor or memory left) before it tries again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
    /// A socket another process bound and made listen before starting this one (socket
    /// activation: systemd, libnbd): its descriptor, which the server takes over and closes.
    /// TCP or Unix, told apart by its address; a Unix socket's file is left in place, since
    /// whoever bound it goes on listening there after this server exits.
    Inherited(RawFd),
}

pub struct ServerConfig {
    pub listen: Vec<ListenAddr>,
    pub max_connections: usize,
    /// How long a client may take to finish the handshake; zero: no limit (as qemu-nbd's
    /// `--handshake-limit 0`).
    pub handshake_timeout: Duration,
    /// Threads serving each connection (and so the most requests one connection runs at once).
    pub threads_per_connection: usize,
    /// Payload bytes all connections together may have in flight.
    pub max_in_flight_bytes: u64,
    pub tls: Option<TlsConfig>,
    pub tls_mode: TlsMode,
    /// Metadata contexts offered besides base:allocation.
    pub contexts: Offer,
    /// Called once when a shutdown begins, before the connections wind down (`serve` tells a
    /// service manager STOPPING=1).
    pub on_stopping: Option<fn()>,
    /// A service manager's watchdog, fed from the accept loop (`serve` sends WATCHDOG=1).
    pub heartbeat: Option<Heartbeat>,
    /// Told what an operator should know and no client can be told: connections that cannot
    /// be accepted (out of descriptors), and accepted again.
    pub notice: Option<fn(&str)>,
}

/// Keep-alives for a watchdog: `beat` is called from the accept loop at least every `every`
/// while no connection's requests are stuck (stall.rs: no step for `every` while a request
/// runs outside a wait on its client). So a call says that the loop admitting clients runs and
/// that the requests being served move. `notice` is told when keep-alives stop for a stuck
/// connection and when they go on again.
#[derive(Clone, Copy)]
pub struct Heartbeat {
    pub every: Duration,
    pub beat: fn(),
    pub notice: fn(&str),
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![ListenAddr::Tcp("127.0.0.1:10809".into())],
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            threads_per_connection: 16,
            max_in_flight_bytes: 256 * 1024 * 1024,
            tls: None,
            tls_mode: TlsMode::Off,
            contexts: Offer::default(),
            on_stopping: None,
            heartbeat: None,
            notice: None,
        }
    }
}

#[derive(Clone)]
enum Phase {
    Handshake(Instant),
    /// Serving requests of this export.
    Transmission(Arc<Export>),
}

/// A connection the server knows of: its raw socket (shutting it down is how the handshake
/// deadline and a wind-down reach it, TLS or not), its phase, and its wind-down notice.
struct Registered {
    sock: Sock,
    phase: Phase,
    winding: Arc<Winding>,
}

struct Shared {
    exports: Exports,
    budget: Budget,
    conns: Mutex<HashMap<u64, Registered>>,
    stopping: AtomicBool,
    cfg: ServerConfig,
}

/// Wakes a running server's accept loop to shut it down; safe to use from a signal handler
/// through [`install_signal_handlers`].
#[derive(Clone)]
pub struct ShutdownHandle {
    fd: RawFd,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let b = [1u8];
        // SAFETY: writing one byte from a valid buffer to a pipe we own.
        unsafe {
            libc::write(self.fd, b.as_ptr().cast(), 1);
        }
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: write(2) is async-signal-safe; fd is the server's shutdown pipe.
        unsafe {
            libc::write(fd, b.as_ptr().cast(), 1);
        }
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP shut the server down in order (finish in-flight
/// requests, flush): a hang-up of the terminal a server runs in must not kill it with images
/// half written. (`serve --log` then gives SIGHUP to reopening the log.)
pub fn install_signal_handlers(h: &ShutdownHandle) {
    SIGNAL_FD.store(h.fd, Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub struct Server {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    pipe: (RawFd, RawFd),
}

impl Server {
    /// Binds the listeners of `cfg` for `exports` (which may be empty: exports can be added
    /// while the server runs, see [`ServerControl`]).
    pub fn bind(cfg: ServerConfig, exports: Vec<Export>) -> Result<Server> {
        if cfg.tls_mode != TlsMode::Off && cfg.tls.is_none() {
            return Err(err(ErrorKind::InvalidArgument, "TLS enabled without a certificate and key"));
        }
        // Client certificates keep out only clients that have to use TLS: with TLS optional
        // (or off) anyone would get in by staying in plain text.
        if cfg.tls.as_ref().is_some_and(TlsConfig::verifies_clients) && cfg.tls_mode != TlsMode::Required {
            return Err(err(ErrorKind::InvalidArgument, "client certificates are checked only when TLS is required"));
        }
        let mut listeners = Vec::new();
        for l in &cfg.listen {
            let listener = match l {
                ListenAddr::Tcp(a) => Listener::bind_tcp(a)?,
                ListenAddr::Unix(p) => Listener::bind_unix(p)?,
                ListenAddr::Inherited(fd) => inherit(*fd)?,
            };
            match &listener {
                Listener::Tcp(t) => t.set_nonblocking(true),
                Listener::Unix(u, _) => u.set_nonblocking(true),
            }
            .map_err(|e| Error::io("listen", e))?;
            listeners.push(listener);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::io("pipe", io::Error::last_os_error()));
        }
        let shared = Arc::new(Shared {
            exports: Exports::new(exports)?,
            budget: Budget::new(usize::MAX, cfg.max_in_flight_bytes),
            conns: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            cfg,
        });
        Ok(Server { listeners, shared, pipe: (fds[0], fds[1]) })
    }

    /// TCP addresses actually bound (port 0 resolves to a real port).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(t) => t.local_addr().ok(),
                _ => None,
            })
            .collect()
    }

    /// Unix socket addresses listened on, bound or inherited (a path, or an abstract name).
    pub fn unix_addrs(&self) -> Vec<std::os::unix::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Unix(u, _) => u.local_addr().ok(),
                _ => None,
            })
            .collect()
    }

    /// A handle that adds and removes exports while the server runs.
    pub fn control(&self) -> ServerControl {
        ServerControl { shared: self.shared.clone() }
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { fd: self.pipe.1 }
    }

    /// Accepts and serves until shut down; then stops reading requests, answers those in
    /// flight, flushes every export and returns.
    pub fn run(self) -> Result<()> {
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let reaper = {
            let sh = self.shared.clone();
            std::thread::spawn(move || reap_stalled_handshakes(&sh))
        };
        // The poll wakes at least once a second, and as often as the heartbeat needs.
        let wake_ms = self.shared.cfg.heartbeat.map_or(1000, |h| h.every.as_millis().clamp(1, 1000)) as libc::c_int;
        let mut watch = self.shared.cfg.heartbeat.map(Watch::new);
        let notice = |m: &str| {
            if let Some(f) = self.shared.cfg.notice {
                f(m)
            }
        };
        // Accepting failed for want of descriptors or memory: the next poll waits on the
        // shutdown pipe alone for ACCEPT_PAUSE. The client waits in the listen backlog
        // meanwhile; retrying at once would spin a core for as long as the shortage lasts.
        let mut pause = false;
        // An accept failure was reported and no accept has succeeded since.
        let mut failing = false;
        'accept: loop {
            if let Some(w) = watch.as_mut() {
                w.tick(&self.shared);
            }
            let listening = if pause { 0 } else { self.listeners.len() };
            let wait = if pause { wake_ms.min(ACCEPT_PAUSE.as_millis() as libc::c_int) } else { wake_ms };
            pause = false;
            let mut pfds: Vec<libc::pollfd> = std::iter::once(self.pipe.0)
                .chain(self.listeners.iter().take(listening).map(Listener::fd))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: pfds is a valid slice of pollfd for the duration of the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("poll", e));
            }
            if pfds[0].revents != 0 {
                break 'accept;
            }
            threads.retain(|t| !t.is_finished());
            for (l, p) in self.listeners.iter().zip(&pfds[1..]) {
                if p.revents == 0 {
                    continue;
                }
                let sock = match l.accept() {
                    Ok(s) => s,
                    // Another wake-up took it, or the client gave up before we got to it.
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionAborted) => {
                        continue
                    }
                    Err(e) => {
                        if !failing {
                            notice(&format!(
                                "cannot accept a connection: {e}; clients wait until it can (retrying every {} ms)",
                                ACCEPT_PAUSE.as_millis()
                            ));
                            failing = true;
                        }
                        pause = true;
                        break;
                    }
                };
                if failing {
                    notice("accepting connections again");
                    failing = false;
                }
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let Some(winding) = admit(&self.shared, id, &sock) else {
                    sock.shutdown(Shutdown::Both);
                    continue;
                };
                let sh = self.shared.clone();
                threads.push(std::thread::spawn(move || connection(sh, id, sock, winding)));
            }
        }
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(f) = self.shared.cfg.on_stopping {
            f();
        }
        wind_down(&self.shared, Why::ServerStopping, |_| true, || threads.iter().all(|t| t.is_finished()));
        for t in threads {
            let _ = t.join();
        }
        let _ = reaper.join();
        let mut first_err = None;
        for e in &self.shared.exports.list() {
            if let Err(x) = e.disk.flush() {
                first_err.get_or_insert(x);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A signal from now on must not write into the pipe's number, which the process may
        // reuse for anything once it is closed below.
        let _ = SIGNAL_FD.compare_exchange(self.pipe.1, -1, Ordering::AcqRel, Ordering::Relaxed);
        // SAFETY: closing the pipe fds this server created.
        unsafe {
            libc::close(self.pipe.0);
            libc::close(self.pipe.1);
        }
    }
}

/// The accept loop's side of the watchdog: keep-alives while no connection is stuck.
struct Watch {
    hb: Heartbeat,
    stalls: Stalls,
    last_beat: Instant,
    /// Keep-alives are being withheld.
    withheld: bool,
}

impl Watch {
    fn new(hb: Heartbeat) -> Watch {
        Watch { hb, stalls: Stalls::new(hb.every), last_beat: Instant::now(), withheld: false }
    }

    /// Samples every connection; beats if none is stuck and a beat is due.
    fn tick(&mut self, sh: &Shared) {
        let now = Instant::now();
        let stuck = match sh.conns.lock() {
            Ok(c) => self.stalls.update(c.iter().map(|(&id, r)| (id, r.winding.sample())), now),
            // A poisoned registry: a connection thread panicked holding it; say nothing is
            // stuck rather than stop the keep-alives of a server that still admits clients.
            Err(_) => None,
        };
        match stuck {
            Some(d) if !self.withheld => {
                self.withheld = true;
                (self.hb.notice)(&format!(
                    "a request has made no progress for {:.1} s (a disk that does not answer?): \
                     watchdog keep-alives withheld until it does",
                    d.as_secs_f64()
                ));
            }
            Some(_) => {}
            None => {
                if self.withheld {
                    self.withheld = false;
                    (self.hb.notice)("requests make progress again: watchdog keep-alives resumed");
                }
                if now.duration_since(self.last_beat) >= self.hb.every {
                    (self.hb.beat)();
                    self.last_beat = now;
                }
            }
        }
    }
}

fn reap_stalled_handshakes(sh: &Shared) {
    while !sh.stopping.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(conns) = sh.conns.lock() {
            for r in conns.values() {
                if let Phase::Handshake(t) = r.phase {
                    if !sh.cfg.handshake_timeout.is_zero() && t.elapsed() > sh.cfg.handshake_timeout {
                        r.sock.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
}

/// Registers a new connection (in the handshake phase) unless the cap is reached, and returns
/// its wind-down notice. Counting and registering happen under one lock in the accept loop,
/// so a burst of connects cannot get past the cap before the connection threads have started.
fn admit(sh: &Shared, id: u64, sock: &Sock) -> Option<Arc<Winding>> {
    let mut c = sh.conns.lock().ok()?;
    if c.len() >= sh.cfg.max_connections {
        return None;
    }
    let winding = Arc::new(Winding::default());
    let sock = sock.try_clone().ok()?;
    c.insert(id, Registered { sock, phase: Phase::Handshake(Instant::now()), winding: winding.clone() });
    Some(winding)
}

/// Winds down the connections `mine` picks (spec: "On a server shutdown, the server SHOULD
/// wait for inflight requests to be serviced prior to initiating a hard disconnect [...] any
/// subsequently received requests SHOULD be NBD_ESHUTDOWN"): each refuses what it reads from
/// now on (see [`Winding`]); its read side is closed once its client has been quiet for
/// [`QUIET`](super::winding::QUIET) (or at the latest [`LONGEST`](super::winding::LONGEST)
/// after), so it answers what it has read and ends. Returns when `finished` says so, or after
/// [`SHUTDOWN_GRACE`], when the sockets are shut down whole: a client that stops reading its
/// replies cannot hold a shutdown hostage.
fn wind_down(sh: &Shared, why: Why, mine: impl Fn(&Phase) -> bool, finished: impl Fn() -> bool) {
    let each = |f: &dyn Fn(&Registered)| {
        if let Ok(conns) = sh.conns.lock() {
            conns.values().filter(|r| mine(&r.phase)).for_each(f);
        }
    };
    each(&|r| r.winding.start(why));
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while !finished() && Instant::now() < deadline {
        each(&|r| {
            if r.winding.take_cut() {
                r.sock.shutdown(Shutdown::Read);
            }
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    if !finished() {
        each(&|r| r.sock.shutdown(Shutdown::Both));
    }
}

/// Moves a registered connection to `phase`, or forgets it (`None`).
fn set_phase(sh: &Shared, id: u64, phase: Option<Phase>) {
    let Ok(mut c) = sh.conns.lock() else { return };
    match phase {
        Some(p) => {
            if let Some(e) = c.get_mut(&id) {
                e.phase = p;
            }
        }
        None => {
            c.remove(&id);
        }
    }
}

fn negotiate(sh: &Shared, slot: &mut Option<Stream>, winding: Arc<Winding>) -> io::Result<Option<Negotiated>> {
    let stream = slot.as_mut().ok_or_else(|| io::Error::other("no stream"))?;
    // The exports as they are when the client arrives; one removed meanwhile is refused below.
    let exports = sh.exports.list();
    let mut session = Session::start(stream, &exports, sh.cfg.tls_mode, winding)?;
    session.offer_contexts(sh.cfg.contexts);
    loop {
        let stream = slot.as_mut().ok_or_else(|| io::Error::other("no stream"))?;
        match session.options(stream)? {
            Outcome::Transmit(n) => return Ok(Some(n)),
            Outcome::Closed => return Ok(None),
            Outcome::StartTls => {
                let cfg = sh.cfg.tls.as_ref().ok_or_else(|| io::Error::other("TLS not configured"))?;
                let plain = slot.take().ok_or_else(|| io::Error::other("no stream"))?;
                *slot = Some(plain.upgrade(cfg)?);
                session.tls_started();
            }
        }
    }
}

fn connection(sh: Arc<Shared>, id: u64, sock: Sock, winding: Arc<Winding>) {
    sock.set_nodelay();
    // A connection accepted just before a shutdown began runs like any other: the wind-down
    // reached it through the registry, so it refuses what its client asks and then ends.
    // The registry keeps the raw socket, also after STARTTLS: shutting it down is how the
    // handshake deadline and the shutdown sweep reach a connection, TLS or not.
    let mut slot = Some(Stream::Plain(sock));
    let negotiated = negotiate(&sh, &mut slot, winding.clone());
    let pump = slot.as_mut().and_then(Stream::take_pump);
    if let Ok(Some(n)) = negotiated {
        let export = n.export.clone();
        set_phase(&sh, id, Some(Phase::Transmission(export.clone())));
        // An export removed while this client negotiated it is not served. One that
        // negotiated as a shutdown began is: it answers NBD_ESHUTDOWN (its wind-down began
        // while it negotiated) rather than hanging up on a client it just let in.
        if sh.exports.enter(&export) {
            if let Some(Ok((reader, writer, closer))) = slot.take().map(Stream::split) {
                let threads = sh.cfg.threads_per_connection;
                transmission::serve(reader, writer, n, threads, &sh.budget, closer, winding);
            }
            export.stats.connection(false);
        }
    }
    // Closing our end tells a TLS pump to send what is left and close_notify. Waiting for it
    // keeps the connection registered (so the shutdown sweep can still cut a client that
    // does not read) and keeps the server from exiting before the last replies are out.
    drop(slot);
    if let Some(p) = pump {
        p.join();
    }
    set_phase(&sh, id, None);
}

/// Changes the exports of a running server (the control channel's side of it).
#[derive(Clone)]
pub struct ServerControl {
    shared: Arc<Shared>,
}

impl ServerControl {
    pub fn exports(&self) -> &Exports {
        &self.shared.exports
    }

    /// Serves `e` to clients that connect from now on.
    pub fn add_export(&self, e: Export) -> Result<Arc<Export>> {
        self.shared.exports.add(e)
    }

    /// Serves `e` again at position `at` of the export list (see [`Exports::add_at`]).
    pub fn add_export_at(&self, at: usize, e: Export) -> Result<Arc<Export>> {
        self.shared.exports.add_at(at, e)
    }

    /// Stops serving `name`. Refused while clients use it, unless `force`: then their
    /// connections wind down as at shutdown (requests read from then on are refused with
    /// NBD_ESHUTDOWN) and close.
    /// Returns the export once no connection uses it any more.
    pub fn remove_export(&self, name: &str, force: bool) -> Result<Arc<Export>> {
        let e = match self.shared.exports.remove(name, !force) {
            Ok(e) => e,
            Err(RemoveError::Unknown) => {
                return Err(err(ErrorKind::InvalidArgument, format!("no export named {name:?}")))
            }
            // Refused: the export stays where it was in the list, nothing changed.
            Err(RemoveError::InUse(n)) => {
                return Err(err(
                    ErrorKind::InUse,
                    format!(
                        "export {name:?} has {n} client{} connected; --force disconnects them",
                        if n == 1 { "" } else { "s" }
                    ),
                ))
            }
        };
        let mine = |p: &Phase| matches!(p, Phase::Transmission(x) if Arc::ptr_eq(x, &e));
        // Gone once unregistered, not once served: a TLS connection stays registered until
        // its pump has sent the last replies, and a client that does not read them must still
        // be cut after the grace period.
        let gone = || self.shared.conns.lock().map_or(true, |c| !c.values().any(|r| mine(&r.phase)));
        wind_down(&self.shared, Why::ExportRemoved, mine, gone);
        // Past the grace period the sockets are shut down whole: the connections end now. (A
        // connection is counted in the export's stats only while registered with it.)
        while !gone() {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(e)
    }
}
