//! `cowdisk serve`: open each image's chain and export it over NBD until told to stop, with
//! the TLS and client-authentication policy and the descriptions the operator gave, and the
//! control channel through which the chains change while they are served (`control/`), on
//! sockets it binds or inherits (socket activation), in the foreground or forked (`daemon`).

use crate::control::server::{Control, Served as ControlServed};
use crate::control::{name_of, rundir, server_socket};
use crate::daemon::{inherited_sockets, Daemon};
use crate::Failure;
use cowdisk::live::LiveChain;
use cowdisk::nbd::handshake::TlsMode;
use cowdisk::nbd::meta::Offer;
use cowdisk::nbd::server::{install_signal_handlers, Heartbeat, ListenAddr, Server, ServerConfig};
use cowdisk::nbd::tls::TlsConfig;
use cowdisk::nbd::Export;
use cowdisk::{Chain, ChainOptions, Disk};
use percent_encoding::{percent_encode, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Images to export (each the top of a chain). May be none with --control: exports are
    /// then added with `cowdisk export add`.
    #[arg(required_unless_present = "control")]
    pub images: Vec<PathBuf>,
    /// The control channel's Unix socket (default: in the user's runtime directory, where
    /// `cowdisk snapshot IMAGE` and `cowdisk export` find it).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Listen on a Unix socket. A socket nobody listens on is replaced; any other file at
    /// the path is refused and left alone. Refused under socket activation (LISTEN_PID,
    /// LISTEN_FDS): the server then listens on the sockets it inherits.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (default 127.0.0.1:10809 when no --socket is given and no
    /// socket is inherited). Refused under socket activation.
    #[arg(long)]
    pub listen: Option<String>,
    /// Write the server's process id to FILE once its sockets accept connections; removed
    /// when it exits cleanly. Held locked while the server runs: a second server given the
    /// same FILE is refused.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Return once the sockets accept connections, leaving the server running in the
    /// background, on its own session, with stdin, stdout and stderr on /dev/null (stderr on
    /// the --log file if given). An error before that point is printed and makes this command
    /// fail.
    #[arg(long)]
    pub fork: bool,
    /// Once the server serves (after its startup lines), its messages (stderr) are appended
    /// to FILE, forked or not. Errors before that still go to the terminal.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Export names, in the order of the images (default: each file's name without extension).
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Export descriptions clients see (NBD_OPT_LIST, NBD_INFO_DESCRIPTION), in the order of
    /// the images; an export without one (or with "") is listed without a description.
    #[arg(long = "description", value_name = "TEXT")]
    pub descriptions: Vec<String>,
    /// Most connections at once; more are refused.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Seconds a client may take to finish the handshake before it is dropped; 0: no limit.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Threads per connection (the most requests one connection runs at once).
    #[arg(long, default_value_t = 16)]
    pub threads: usize,
    /// TLS server certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS policy: off, optional (clients choose), or require (every option but STARTTLS and
    /// ABORT refused in plain text). Default: require when --tls-cert is given, else off.
    #[arg(long, value_enum)]
    pub tls: Option<TlsArg>,
    /// CA certificate(s) (PEM) that must have signed a client's certificate; with
    /// --tls-verify-peer.
    #[arg(long, value_name = "FILE", requires = "tls_verify_peer")]
    pub tls_ca: Option<PathBuf>,
    /// Admit only clients that present a certificate signed by --tls-ca; others are refused in
    /// the TLS handshake. TLS must be required (refused with --tls optional).
    #[arg(long, requires = "tls_ca")]
    pub tls_verify_peer: bool,
    /// TLS-PSK keys (psktool's `username:hexkey` lines). Not supported: refused with an error.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Offer the NBD metadata context qemu:allocation-depth (tells clients how many layers
    /// the chain has).
    #[arg(long)]
    pub allocation_depth: bool,
    /// Offer a qemu:dirty-bitmap:NAME metadata context for each layer below the top, NAME its
    /// file name (tells clients those names).
    #[arg(long)]
    pub dirty_bitmaps: bool,
    /// Record the order in which clients first read the chunks of each remote layer, and
    /// store it with the layer (s3://.../traces/DIGEST) when the server stops: a later server
    /// of an overlay on the layer fetches those chunks first.
    #[arg(long)]
    pub record_trace: bool,
    /// Do not fetch the traced chunks of remote layers in the background at start.
    #[arg(long)]
    pub no_prefetch: bool,
}

/// The end of `cowdisk serve --help` and of cowdisk-serve(1): how it runs as a daemon.
pub const DAEMON_HELP: &str = "\
Stopping: SIGTERM or SIGINT (or SIGHUP without --log) stops accepting clients, answers the requests in flight, flushes \
and closes every image cleanly, removes the pid file and exits 0.

Socket activation: started with LISTEN_PID set to its process id and LISTEN_FDS=N (by systemd, \
systemd-socket-activate, or libnbd as in `nbdinfo -- [ cowdisk serve disk.cow ]`), the server \
serves on the listening sockets it inherits as descriptors 3 to 3+N-1, each TCP or Unix; \
--socket and --listen are then refused, the startup lines go to stderr, and the variables are \
removed from its environment. LISTEN_FDNAMES is ignored.

--fork: the command returns once the sockets accept connections, after printing the startup \
lines and a line with the server's process id; the server goes on in its own session with \
stdin, stdout and stderr on /dev/null, so its messages after startup are not seen unless \
--log FILE takes them. SIGHUP makes the server open the --log file again (logrotate's \
postrotate step: rename the file, then signal); without --log, SIGHUP stops the server as \
SIGTERM does.

Service managers: with NOTIFY_SOCKET set (systemd's Type=notify), the server sends READY=1 and \
MAINPID once its sockets accept connections, and STOPPING=1 when a shutdown begins. With \
WATCHDOG_USEC set too (systemd's WatchdogSec=), and WATCHDOG_PID unset or its own process id \
(or, with --fork, the id of the process it was forked from), \
it sends WATCHDOG=1 every half of that interval while it accepts clients and no request is stuck: \
a request that makes no step for half the interval (nothing of its connection answered: a disk that \
does not answer) stops the keep-alives until it moves again, so the service manager restarts the \
server. Waiting for a client (a slow payload, replies not read) is never taken for stuck. Keep \
WatchdogSec= above twice the longest a flush can take on the storage.";

/// Why `--tls-psk` is refused, as one line.
const PSK_UNSUPPORTED: &str = "--tls-psk: TLS-PSK is not supported (rustls, the TLS library cowdisk uses, has no \
     pre-shared-key cipher suites); authenticate clients with certificates instead: --tls-cert FILE --tls-key FILE \
     --tls-ca FILE --tls-verify-peer";

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsArg {
    Off,
    /// nbdkit spells this `on`.
    #[value(alias = "on")]
    Optional,
    #[value(alias = "required")]
    Require,
}

/// TLS settings for [`serve_exports`]: the loaded certificate (and client CA) and the policy.
pub struct Tls {
    pub config: TlsConfig,
    pub mode: TlsMode,
}

/// Loads the certificate, key and client CA and picks the policy, before any image is opened:
/// a typo in a path should not cost an image lock or a listening socket.
fn tls_from_args(a: &ServeArgs) -> Result<Option<Tls>, Failure> {
    if a.tls_psk.is_some() {
        return Err(Failure(PSK_UNSUPPORTED.into(), 1));
    }
    let mode = match (a.tls, &a.tls_cert) {
        (Some(TlsArg::Off), _) | (None, None) => TlsMode::Off,
        (Some(TlsArg::Optional), _) => TlsMode::Optional,
        (Some(TlsArg::Require), _) | (None, Some(_)) => TlsMode::Required,
    };
    // Refused rather than quietly made `require`: the operator asked for plain-text clients
    // too, and those would get in without a certificate.
    if a.tls_verify_peer && mode != TlsMode::Required {
        let msg = match (mode, &a.tls_cert) {
            (TlsMode::Optional, _) => {
                "--tls-verify-peer cannot be combined with --tls optional: plain-text clients would get in \
                 without a certificate; drop --tls optional (TLS is then required)"
            }
            (_, None) => "--tls-verify-peer needs --tls-cert FILE and --tls-key FILE",
            _ => "--tls-verify-peer cannot be combined with --tls off",
        };
        return Err(Failure(msg.into(), 1));
    }
    if mode == TlsMode::Off {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Err(Failure("--tls optional/require needs --tls-cert FILE and --tls-key FILE".into(), 1));
    };
    let ca = a.tls_ca.as_deref().filter(|_| a.tls_verify_peer);
    Ok(Some(Tls { config: TlsConfig::load(cert, key, ca)?, mode }))
}

pub fn export_name(path: &std::path::Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// One export: its name, the description clients see ("" for none) and the chain.
pub struct Served {
    pub name: String,
    pub description: String,
    pub chain: Chain,
}

/// Where and how to serve.
pub struct ServeOptions {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub threads: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub tls: Option<Tls>,
    /// The control socket; `None`: the default place.
    pub control: Option<PathBuf>,
    /// Listening sockets inherited through socket activation, served besides any above.
    pub inherited: Vec<RawFd>,
    /// The pid file and a waiting foreground process, told once the sockets accept.
    pub daemon: Daemon,
    /// Metadata contexts offered besides base:allocation.
    pub contexts: Offer,
}

/// Serves already opened chains without descriptions or TLS; shared by `serve` and `demo`.
pub fn serve_chains(
    chains: Vec<(String, Chain)>,
    socket: Option<PathBuf>,
    listen: Option<String>,
    threads: usize,
    max_connections: usize,
    handshake_timeout: Duration,
) -> Result<(), Failure> {
    let exports = chains.into_iter().map(|(name, chain)| Served { name, description: String::new(), chain }).collect();
    let contexts = Offer::default();
    serve_exports(
        exports,
        ServeOptions {
            socket,
            listen,
            threads,
            max_connections,
            handshake_timeout,
            tls: None,
            control: None,
            inherited: Vec::new(),
            daemon: Daemon::none(),
            contexts,
        },
    )
}

/// Serves the exports until SIGINT or SIGTERM, then closes every chain.
pub fn serve_exports(served: Vec<Served>, mut o: ServeOptions) -> Result<(), Failure> {
    let mut addrs: Vec<ListenAddr> = o.inherited.iter().map(|fd| ListenAddr::Inherited(*fd)).collect();
    if let Some(s) = &o.socket {
        addrs.push(ListenAddr::Unix(s.clone()));
    }
    if let Some(l) = &o.listen {
        addrs.push(ListenAddr::Tcp(l.clone()));
    }
    if addrs.is_empty() {
        addrs.push(ListenAddr::Tcp("127.0.0.1:10809".into()));
    }
    // Each chain is served live: the control channel may swap it (a snapshot) under clients.
    let mut lives = Vec::new();
    let mut exports = Vec::new();
    for e in served {
        let image = name_of(e.chain.top().path())
            .map_err(|x| Failure(format!("{}: {x}", e.chain.top().path().display()), 1))?;
        let live = Arc::new(LiveChain::new(e.chain));
        // The description is only what the operator wrote: anything derived from the image
        // (its path above all) would tell every client how the server's disk is laid out.
        exports.push(Export::new(e.name.clone(), e.description, live.clone() as Arc<dyn Disk>));
        lives.push(ControlServed { name: e.name, image, live, links: Vec::new() });
    }
    let verifies_clients = o.tls.as_ref().is_some_and(|t| t.config.verifies_clients());
    let cfg = ServerConfig {
        listen: addrs,
        max_connections: o.max_connections,
        threads_per_connection: o.threads,
        handshake_timeout: o.handshake_timeout,
        tls_mode: o.tls.as_ref().map_or(TlsMode::Off, |t| t.mode),
        tls: o.tls.map(|t| t.config),
        contexts: o.contexts,
        on_stopping: Some(crate::daemon::notify_stopping),
        heartbeat: crate::daemon::watchdog_interval().map(|every| Heartbeat {
            every,
            beat: crate::daemon::notify_watchdog,
            notice: crate::daemon::watchdog_notice,
        }),
        notice: Some(|m| eprintln!("cowdisk: {m}")),
        ..ServerConfig::default()
    };
    // nbds:// tells libnbd (and people) to insist on TLS; with --tls optional plain
    // nbd:// works too.
    let (tcp_scheme, unix_scheme) = if cfg.tls.is_some() { ("nbds", "nbds+unix") } else { ("nbd", "nbd+unix") };
    let server = Server::bind(cfg, exports)?;
    install_signal_handlers(&server.shutdown_handle());
    // The runtime directory holds the default socket, or a link to the one given, and a link
    // per served image: how the CLI finds the server of an image without being told. Without
    // a usable runtime directory, only --control reaches the server.
    let dir = rundir().ok();
    let socket = match (o.control, &dir) {
        (Some(p), _) => std::path::absolute(&p).unwrap_or(p),
        (None, Some(d)) => server_socket(d, std::process::id()),
        (None, None) => {
            let e = rundir().err().map(|e| e.to_string()).unwrap_or_default();
            return Err(Failure(format!("control: {e}; give --control PATH"), 1));
        }
    };
    let links = dir;
    let names: Vec<(String, bool)> = lives.iter().map(|l| (l.name.clone(), l.live.is_read_only())).collect();
    let mut control = Control::start(socket, links, server.control(), lives)?;
    let startup = Startup {
        names,
        unix: server.unix_addrs(),
        tcp: server.tcp_addrs(),
        schemes: (unix_scheme, tcp_scheme),
        verifies_clients,
        control: control.socket().to_path_buf(),
        // Socket-activated by libnbd (`nbdcopy -- [ cowdisk serve IMAGE ] -`), stdout may be
        // the caller's data stream: the startup lines go to stderr then (and so to the
        // journal, under systemd).
        to_stderr: !o.inherited.is_empty(),
        forked: o.daemon.is_forked(),
    };
    let started = o.daemon.write_pid_file().and_then(|pid_file| {
        startup.print();
        o.daemon.ready().map(|()| pid_file)
    });
    // A failure to start still closes every image cleanly before the error is reported.
    let pid_file = match started {
        Ok(p) => p,
        Err(e) => {
            let _ = control.close_all();
            return Err(e);
        }
    };
    let result = server.run();
    // No request runs any more: every chain is flushed and closed cleanly.
    let closed = control.close_all();
    result?;
    closed?;
    drop(pid_file);
    Ok(())
}

/// What a server prints once it serves: where each export is, the control channel, and the
/// process that went on in the background.
struct Startup {
    /// Each export's name and whether it is read-only.
    names: Vec<(String, bool)>,
    unix: Vec<std::os::unix::net::SocketAddr>,
    tcp: Vec<std::net::SocketAddr>,
    /// The URI schemes (with or without TLS) for Unix sockets and TCP.
    schemes: (&'static str, &'static str),
    verifies_clients: bool,
    control: PathBuf,
    to_stderr: bool,
    forked: bool,
}

/// What a URI component keeps as it is (RFC 3986's unreserved characters); every other byte is
/// percent-encoded. An export named `my disk#1` is `nbd+unix:///my%20disk%231?socket=...`;
/// unescaped, qemu and libnbd refuse the URI printed.
pub(crate) const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// The same for a socket path in a URI's query: `/` kept.
pub(crate) const URI_PATH: &AsciiSet = &URI_COMPONENT.remove(b'/');

impl Startup {
    fn print(&self) {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let mut out: Box<dyn Write> =
            if self.to_stderr { Box::new(std::io::stderr().lock()) } else { Box::new(std::io::stdout().lock()) };
        let (unix_scheme, tcp_scheme) = self.schemes;
        for (name, read_only) in &self.names {
            let ro = if *read_only { " (read-only)" } else { "" };
            for a in &self.unix {
                if let Some(p) = a.as_pathname() {
                    let (n, sock) =
                        (utf8_percent_encode(name, URI_COMPONENT), percent_encode(p.as_os_str().as_bytes(), URI_PATH));
                    let _ = writeln!(out, "serving {name}{ro} at {unix_scheme}:///{n}?socket={sock}");
                } else if let Some(n) = a.as_abstract_name() {
                    let n = String::from_utf8_lossy(n);
                    let _ = writeln!(out, "serving {name}{ro} on the abstract Unix socket @{n}");
                }
            }
            for a in &self.tcp {
                let _ = writeln!(
                    out,
                    "serving {name}{ro} at {tcp_scheme}://{a}/{}",
                    utf8_percent_encode(name, URI_COMPONENT)
                );
            }
        }
        if self.verifies_clients {
            let _ = writeln!(out, "clients must present a certificate signed by the --tls-ca CA");
        }
        let _ = writeln!(out, "control channel at {}", self.control.display());
        if self.forked {
            let _ = writeln!(out, "running in the background as process {}", std::process::id());
        }
        let _ = out.flush();
    }
}

pub fn run(a: ServeArgs) -> Result<(), Failure> {
    // First of all: LISTEN_PID names the process started, not one forked below.
    let inherited = inherited_sockets()?;
    // Refused, as nbdkit and qemu-nbd refuse them: which sockets to serve is the activating
    // side's to say, and quietly serving on others as well would surprise either side.
    if !inherited.is_empty() && (a.socket.is_some() || a.listen.is_some()) {
        let opt = if a.socket.is_some() { "--socket" } else { "--listen" };
        return Err(Failure(
            format!("{opt} cannot be used with socket activation (LISTEN_FDS): the server listens on the sockets it inherits"),
            1,
        ));
    }
    if a.names.len() > a.images.len() {
        return Err(Failure("more --name options than images".into(), 1));
    }
    // Before any chain opens: a cache that fails is reported when it fails, not only at exit.
    cowdisk::remote::store::on_cache_notice(|m| eprintln!("cowdisk: {m}"));
    if a.descriptions.len() > a.images.len() {
        return Err(Failure("more --description options than images".into(), 1));
    }
    let tls = tls_from_args(&a)?;
    // Forked before any image is opened or thread started; from here on, errors are the
    // server's, printed by it while the foreground process waits for it.
    let daemon = Daemon::start(a.pid_file.clone(), a.fork, a.log.clone())?;
    cowdisk::remote::trace::set_recording(a.record_trace);
    cowdisk::remote::trace::set_prefetch(!a.no_prefetch);
    let mut served: Vec<Served> = Vec::new();
    for (i, p) in a.images.iter().enumerate() {
        let chain = Chain::open(p, ChainOptions { writable: !a.read_only, ..Default::default() })?;
        if !a.read_only {
            // A server killed during a live snapshot left its new overlay's temporary file.
            crate::ops::sweep_temps(p, "snapshot");
        }
        let name = a.names.get(i).cloned().unwrap_or_else(|| export_name(p));
        if served.iter().any(|e| e.name == name) {
            return Err(Failure(format!("two exports would be named '{name}'; use --name"), 1));
        }
        let description = a.descriptions.get(i).cloned().unwrap_or_default();
        served.push(Served { name, description, chain });
    }
    let opts = ServeOptions {
        socket: a.socket,
        listen: a.listen,
        threads: a.threads,
        max_connections: a.max_connections,
        handshake_timeout: Duration::from_secs(a.handshake_timeout),
        tls,
        control: a.control,
        inherited,
        daemon,
        contexts: Offer { allocation_depth: a.allocation_depth, dirty_bitmaps: a.dirty_bitmaps },
    };
    serve_exports(served, opts)?;
    let st = &cowdisk::remote::store::STATS;
    let gets = st.ranged_gets.load(std::sync::atomic::Ordering::Relaxed);
    if gets > 0 {
        let bytes = st.ranged_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let ms = st.ranged_micros.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0;
        eprintln!(
            "cowdisk: fetched {} ({bytes} bytes) from object stores in {gets} ranged requests, {:.1} ms on average",
            crate::size::format_size(bytes),
            ms / gets as f64
        );
    }
    let uncached = st.uncached_reads.load(std::sync::atomic::Ordering::Relaxed);
    if uncached > 0 {
        let why = st.cache_error.lock().map(|e| e.clone().unwrap_or_default()).unwrap_or_default();
        eprintln!("cowdisk: {uncached} reads of remote layers went to the store uncached: the cache failed ({why})");
    }
    if a.record_trace {
        // After every export is closed: nothing reads any more.
        for t in cowdisk::remote::trace::save_recorded()? {
            eprintln!("cowdisk: saved a trace of {} chunks as {}", t.chunks, t.url);
        }
    }
    Ok(())
}
