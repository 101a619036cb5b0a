//! Shared harness for binary-level integration tests: locating `cowdisk`, tool checks, command runners, and guards (temp dirs, daemons, the `cowdisk serve` server; nbdfuse, loop devices and mounts in [`fsstack`]) that release what they took on drop, also when a test panics. Test data and comparisons are in [`data`]; helpers of one group of tests in [`cli`], [`daemon`], [`nbdtest`] and [`tls`]; the raw NBD client in [`nbdclient`]; what a device may read after a crash in [`oracle`]. The S3 store (a local Ceph RGW) and clusters of a test's own are in [`s3`]; the object-store tests' own helpers in [`remote`].
//!
//! Release order matters and follows from declaration order when guards are
//! plain locals (Rust drops locals in reverse): declare the `Server` first,
//! then `NbdFuse`, `LoopDev`, `Mount`; they are then released as umount ->
//! `losetup -d` -> `fusermount3 -u` -> server stop. [`FsOverNbd`] bundles the
//! middle three in the right order.
//!
//! Set `COWDISK_KEEP_TMP=1` to keep temp dirs (and daemon logs) for inspection.

#![allow(dead_code)]

pub mod cli;
pub mod daemon;
mod data;
mod fsstack;
pub mod live;
pub mod nbdclient;
pub mod nbdtest;
pub mod oracle;
pub mod remote;
pub mod s3;
pub mod tls;

pub use data::*;
pub use fsstack::*;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nbdclient::NbdClient;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// How long a daemon may take to become ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a daemon gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long unmounts / loop detaches may take to take effect.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

pub fn cowdisk_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cowdisk"))
}

/// The running test's name (libtest names each test thread after its test).
pub fn test_name() -> String {
    match thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => "unknown-test".to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Skipping when the environment lacks something
// ---------------------------------------------------------------------------

fn is_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Reports a missing prerequisite: fatal on CI, a loud skip elsewhere. Returns false.
pub fn missing(what: &str) -> bool {
    if is_ci() {
        panic!("CI=true and required {what} is missing");
    }
    eprintln!("SKIPPED: {} needs {what}, which is not installed", test_name());
    false
}

/// Full path of an executable, searching PATH and then the sbin directories
/// (which non-root PATHs often lack, yet hold losetup and mkfs.ext4).
pub fn tool_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// A `Command` for a tool found by [`tool_path`] (falls back to the bare name).
pub fn tool(name: &str) -> Command {
    Command::new(tool_path(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// True if `name` is installed; otherwise see [`missing`].
pub fn require_tool(name: &str) -> bool {
    tool_path(name).is_some() || missing(&format!("tool {name}"))
}

pub fn require_tools(names: &[&str]) -> bool {
    names.iter().all(|n| require_tool(n))
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root() -> bool {
    is_root() || missing("root privileges (loop devices and mount)")
}

/// Everything [`FsOverNbd`] needs: nbdfuse, FUSE, loop devices, ext4 tools, root.
pub fn require_fs_stack() -> bool {
    require_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"])
        && require_root()
        && (Path::new("/dev/fuse").exists() || missing("/dev/fuse"))
        && (Path::new("/dev/loop-control").exists() || missing("/dev/loop-control"))
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

fn describe_output(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs to completion; panics with full stdout/stderr unless it succeeded.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    if !out.status.success() {
        panic!("command failed\n{}", describe_output(cmd, &out));
    }
    out
}

/// Runs to completion and returns the output whatever the exit status, for
/// commands expected to fail. Panics only if the program cannot be started.
pub fn run_status(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Like [`run`] but returns the failure description instead of panicking.
pub fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(describe_output(cmd, &out))
    }
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

fn keep_tmp() -> bool {
    std::env::var_os("COWDISK_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A fresh directory under the system temp dir, removed recursively on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `tag` (usually the test name) only makes the path recognisable.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(48)
            .collect();
        let base = std::env::temp_dir();
        // Canonical, so paths compare equal to what /proc/mounts reports.
        let base = base.canonicalize().unwrap_or(base);
        let path = base.join(format!("cowdisk-test-{}-{n}-{tag}", std::process::id()));
        if path.exists() {
            // A leftover from a crashed run that had the same pid.
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// A temp dir tagged with the current test's name.
    pub fn for_test() -> TempDir {
        TempDir::new(&test_name())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates (if needed) and returns a subdirectory.
    pub fn subdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.path.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        p
    }

    /// Gives up ownership: the directory is left on disk.
    pub fn keep(self) -> PathBuf {
        let p = self.path.clone();
        std::mem::forget(self);
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if keep_tmp() {
            eprintln!("COWDISK_KEEP_TMP set: keeping {}", self.path.display());
            return;
        }
        // Recursing into a live mount would delete the mounted fs's contents
        // (or hang on a dead FUSE server), so leave such a dir alone.
        let live = mounts_under(&self.path);
        if !live.is_empty() {
            eprintln!("WARNING: not removing {}: still mounted below it: {live:?}", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("WARNING: cannot remove {}: {e}", self.path.display());
        }
    }
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

fn send_signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions. Callers only signal
    // children they have not reaped yet, so the pid cannot have been reused.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether any process (including a zombie) has this pid.
pub fn pid_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

// ---------------------------------------------------------------------------
// Daemons
// ---------------------------------------------------------------------------

/// How to tell that a freshly spawned daemon is ready.
#[derive(Debug, Clone)]
pub enum Ready {
    /// A Unix socket at this path accepts a connection.
    UnixSocket(PathBuf),
    /// This TCP address accepts a connection.
    Tcp(String),
    /// This file exists and is non-empty (e.g. a pid file written when ready).
    PidFile(PathBuf),
    /// Nothing to wait for.
    Immediately,
}

impl Ready {
    fn check(&self) -> bool {
        match self {
            Ready::UnixSocket(p) => UnixStream::connect(p).is_ok(),
            Ready::Tcp(addr) => TcpStream::connect(addr.as_str()).is_ok(),
            Ready::PidFile(p) => fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false),
            Ready::Immediately => true,
        }
    }
}

/// A child process with stdout+stderr captured to a log file, stopped on drop
/// (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]) and always reaped.
pub struct Daemon {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    // Declared last so the log outlives the process that writes it.
    log_dir: TempDir,
}

impl Daemon {
    /// Spawns `cmd` and waits up to [`STARTUP_TIMEOUT`] for `ready`; panics
    /// with the daemon's log if it exits first or never becomes ready.
    pub fn start(cmd: Command, ready: Ready) -> Daemon {
        Self::try_start(cmd, ready, STARTUP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Daemon::start`] but reports failure (log included) as `Err`,
    /// after making sure the process is gone.
    pub fn try_start(cmd: Command, ready: Ready, timeout: Duration) -> Result<Daemon, String> {
        let mut daemon = Self::spawn(cmd)?;
        daemon.wait_ready(&ready, timeout)?;
        Ok(daemon)
    }

    /// Spawns without waiting for readiness.
    pub fn spawn(mut cmd: Command) -> Result<Daemon, String> {
        let name =
            Path::new(cmd.get_program()).file_name().unwrap_or(OsStr::new("daemon")).to_string_lossy().into_owned();
        let log_dir = TempDir::new(&format!("log-{name}"));
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path).map_err(|e| format!("cannot create daemon log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("cannot dup daemon log: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd.spawn().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        Ok(Daemon { name, child, status: None, log_path, log_dir })
    }

    /// Waits until `ready` holds. On failure the process is stopped and the
    /// error carries its log.
    pub fn wait_ready(&mut self, ready: &Ready, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before becoming ready ({ready:?})\n--- {} log ---\n{}",
                    self.name,
                    self.name,
                    self.log()
                ));
            }
            if ready.check() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let status = self.terminate(Duration::from_secs(5));
                return Err(format!(
                    "{} not ready ({ready:?}) after {timeout:?}; stopped it ({status})\n--- {} log ---\n{}",
                    self.name,
                    self.name,
                    self.log()
                ));
            }
            thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read log {}: {e}>", self.log_path.display()))
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends `sig` unless the process has already been reaped.
    pub fn signal(&mut self, sig: libc::c_int) -> io::Result<()> {
        if self.try_wait().is_some() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "process already exited"));
        }
        send_signal(self.pid(), sig)
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_wait().is_some());
        self.status
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        let _ = send_signal(self.pid(), libc::SIGTERM);
        if let Some(s) = self.wait_exit(grace) {
            return s;
        }
        eprintln!("{} (pid {}) ignored SIGTERM for {grace:?}; sending SIGKILL", self.name, self.pid());
        self.kill9()
    }

    /// SIGKILL (a simulated crash) and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        let _ = self.child.kill();
        let status = self.child.wait().unwrap_or_else(|e| panic!("cannot reap {}: {e}", self.name));
        self.status = Some(status);
        status
    }

    /// Graceful stop: SIGTERM, SIGKILL after [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> ExitStatus {
        self.terminate(STOP_TIMEOUT)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let was_running = self.try_wait().is_none();
        if was_running {
            self.terminate(STOP_TIMEOUT);
        }
        if thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(64 * 1024);
            // Slicing inside a UTF-8 char would panic, and a panic while
            // already panicking aborts the whole test binary.
            while !log.is_char_boundary(start) {
                start += 1;
            }
            let tail = &log[start..];
            eprintln!(
                "--- {} (pid {}) log, {} at test failure ---\n{tail}\n--- end of {} log ---",
                self.name,
                self.pid(),
                if was_running { "running" } else { "already exited" },
                self.name
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The cowdisk server
// ---------------------------------------------------------------------------

/// `cowdisk serve <args>` as a [`Daemon`]; ready once the `--socket` path (or
/// `--listen` address) accepts connections.
pub struct Server {
    daemon: Daemon,
    socket: Option<PathBuf>,
    listen: Option<String>,
}

/// The value of `--name VALUE` or `--name=VALUE` in `args`.
fn flag_value(args: &[&str], name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == name {
            args.get(i + 1).map(|v| v.to_string())
        } else {
            a.strip_prefix(&prefix).map(str::to_owned)
        }
    })
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::try_start_with_env(args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(args: &[&str]) -> Result<Server, String> {
        Self::try_start_with_env(args, &[])
    }

    pub fn try_start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        Self::launch(args, env, None)
    }

    /// Started in `dir`, so that `args` may name images by paths relative to it (as a user
    /// in that directory would).
    pub fn start_in(dir: &Path, args: &[&str]) -> Server {
        Self::launch(args, &[], Some(dir)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn launch(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Result<Server, String> {
        let socket = flag_value(args, "--socket").map(PathBuf::from);
        let listen = flag_value(args, "--listen");
        let ready = match (&socket, &listen) {
            (Some(s), _) => Ready::UnixSocket(s.clone()),
            (None, Some(l)) => Ready::Tcp(l.clone()),
            (None, None) => {
                return Err(format!("Server::start needs --socket or --listen in {args:?} to know when it is ready"))
            }
        };
        let mut cmd = Command::new(cowdisk_bin());
        cmd.arg("serve").args(args);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let daemon = Daemon::try_start(cmd, ready, STARTUP_TIMEOUT)?;
        Ok(Server { daemon, socket, listen })
    }

    /// The Unix socket path; panics for a TCP server.
    pub fn socket(&self) -> &Path {
        self.socket.as_deref().expect("server was started with --listen, not --socket")
    }

    /// An NBD URI for `export_name` that libnbd tools (nbdinfo, nbdcopy,
    /// nbdfuse) and qemu understand.
    pub fn uri(&self, export_name: &str) -> String {
        match (&self.socket, &self.listen) {
            (Some(s), _) => unix_uri(s, export_name),
            (None, Some(l)) => {
                format!("nbd://{l}/{}", percent_encoding::utf8_percent_encode(export_name, URI_COMPONENT))
            }
            (None, None) => unreachable!("constructor requires one of them"),
        }
    }

    /// A connected client that has completed the greeting.
    pub fn connect(&self) -> NbdClient<UnixStream> {
        NbdClient::connect_unix(self.socket()).unwrap_or_else(|e| {
            panic!("cannot connect to {}: {e}\n--- server log ---\n{}", self.socket().display(), self.log())
        })
    }

    /// The `--listen` address, for [`NbdClient::connect_tcp`].
    pub fn listen_addr(&self) -> Option<&str> {
        self.listen.as_deref()
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; returns how it exited.
    pub fn stop(self) -> ExitStatus {
        self.daemon.stop()
    }

    /// SIGKILL, simulating a crash.
    pub fn kill9(&mut self) -> ExitStatus {
        self.daemon.kill9()
    }
}

/// What an NBD URI keeps unescaped (RFC 3986's unreserved characters), and with `/` for a
/// socket path in its query.
pub const URI_COMPONENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
pub const URI_PATH: &percent_encoding::AsciiSet = &URI_COMPONENT.remove(b'/');

/// `nbd+unix:///NAME?socket=PATH`.
pub fn unix_uri(socket: &Path, export_name: &str) -> String {
    let (name, socket) = (export_name, socket.to_string_lossy());
    use percent_encoding::utf8_percent_encode as enc;
    format!("nbd+unix:///{}?socket={}", enc(name, URI_COMPONENT), enc(&socket, URI_PATH))
}

/// Runs fio with `args` in `dir` (it leaves verify state files in its working directory);
/// panics unless it exits 0 with `jobs` jobs reporting `err= 0` and no verification
/// complaints. Returns its output.
pub fn run_fio(dir: &Path, args: &[String], jobs: usize) -> String {
    let out = run_status(tool("fio").current_dir(dir).args(args));
    let text = format!("{}{}", stdout_of(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fio {args:?} failed ({}):\n{text}", out.status);
    for bad in ["verify:", "bad magic", "crc32c mismatch", "fio: pid="] {
        assert!(!text.contains(bad), "fio reported {bad:?}:\n{text}");
    }
    let ok = text.matches("err= 0:").count();
    assert_eq!(ok, jobs, "expected {jobs} jobs with err= 0:\n{text}");
    text
}

/// A `kB` field of process `pid`'s /proc status (`VmRSS:`, `VmHWM:`), in KiB.
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}
