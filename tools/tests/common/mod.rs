//! Shared harness for binary-level integration tests: locating `cowdisk`, tool checks, command runners, and guards (temp dirs, daemons, the `cowdisk serve` server, nbdfuse, loop devices, mounts) that release what they took on drop, also when a test panics.
//!
//! Release order matters and follows from declaration order when guards are
//! plain locals (Rust drops locals in reverse): declare the `Server` first,
//! then `NbdFuse`, `LoopDev`, `Mount`; they are then released as umount ->
//! `losetup -d` -> `fusermount3 -u` -> server stop. [`FsOverNbd`] bundles the
//! middle three in the right order.
//!
//! Set `COWDISK_KEEP_TMP=1` to keep temp dirs (and daemon logs) for inspection.

#![allow(dead_code)]

pub mod nbdclient;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nbdclient::NbdClient;

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
// /proc/mounts and loop device state
// ---------------------------------------------------------------------------

/// Undoes the octal escapes (`\040` etc.) /proc/mounts uses for blanks.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let is_octal = |c: u8| (b'0'..=b'7').contains(&c);
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|&c| is_octal(c)) {
            let v = b[i + 1..i + 4].iter().fold(0u32, |acc, &c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points currently listed in /proc/mounts, in mount order.
pub fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|f| PathBuf::from(unescape_mount_field(f)))
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_points().into_iter().filter(|m| m.starts_with(dir)).collect()
}

/// Whether a loop device (`/dev/loopN`) still has a backing file. The
/// `loop/` sysfs group exists exactly while it is bound.
pub fn loop_is_attached(dev: &Path) -> bool {
    let name = dev.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name).join("loop").exists()
}

/// Loop devices whose backing file is `file`, read from sysfs, which holds
/// the full path (the loop ioctl's name field is cut at 64 bytes).
pub fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .map(|b| Path::new(b.trim_end_matches('\n')) == file)
                .unwrap_or(false)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// `losetup -a` lines that mention `needle` (a device or backing file path).
pub fn losetup_lines_mentioning(needle: &Path) -> Vec<String> {
    let out = run_status(tool("losetup").arg("-a"));
    let needle = needle.to_string_lossy();
    stdout_of(&out).lines().filter(|l| l.contains(needle.as_ref())).map(str::to_owned).collect()
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
            (None, Some(l)) => format!("nbd://{l}/{}", uri_escape(export_name, false)),
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

/// Percent-encodes for an NBD URI; `keep_slash` for socket paths.
fn uri_escape(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `nbd+unix:///NAME?socket=PATH`.
pub fn unix_uri(socket: &Path, export_name: &str) -> String {
    format!("nbd+unix:///{}?socket={}", uri_escape(export_name, false), uri_escape(&socket.to_string_lossy(), true))
}

// ---------------------------------------------------------------------------
// nbdfuse, loop devices, mounts
// ---------------------------------------------------------------------------

/// An NBD export exposed as the file `MOUNTPOINT/disk` by nbdfuse.
///
/// Drop: `fusermount3 -u` (retried while a loop device still holds the file,
/// then lazily), wait for nbdfuse to exit (SIGKILL as last resort), and wait
/// until the mount is gone from /proc/mounts.
pub struct NbdFuse {
    mountpoint: PathBuf,
    disk: PathBuf,
    daemon: Option<Daemon>,
}

impl NbdFuse {
    /// Mounts `uri` (e.g. from [`Server::uri`]) at `mountpoint`, creating it.
    pub fn mount(uri: &str, mountpoint: &Path) -> Result<NbdFuse, String> {
        Self::mount_with(uri, mountpoint, &[])
    }

    /// With extra nbdfuse options placed before the mountpoint, e.g. `["-r"]`.
    pub fn mount_with(uri: &str, mountpoint: &Path, extra: &[&str]) -> Result<NbdFuse, String> {
        fs::create_dir_all(mountpoint).map_err(|e| format!("cannot create {}: {e}", mountpoint.display()))?;
        // Canonicalize before mounting: on a dead FUSE mount it could hang.
        let mountpoint =
            mountpoint.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", mountpoint.display()))?;
        // nbdfuse writes its pid file only once it serves the mount; keep the
        // file outside the mountpoint, which the mount will cover.
        let pidfile = PathBuf::from(format!("{}.nbdfuse.pid", mountpoint.display()));
        let _ = fs::remove_file(&pidfile);
        let disk = mountpoint.join("disk");
        let mut cmd = tool("nbdfuse");
        cmd.arg("-P").arg(&pidfile).args(extra).arg(&disk).arg(uri);
        let daemon = Daemon::try_start(cmd, Ready::PidFile(pidfile), STARTUP_TIMEOUT)?;
        let fuse = NbdFuse { mountpoint, disk, daemon: Some(daemon) };
        if !fuse.disk.exists() {
            return Err(format!("nbdfuse is ready but {} does not exist", fuse.disk.display()));
        }
        Ok(fuse)
    }

    /// The file through which the export is read and written.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    pub fn unmount(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        let mut problems = Vec::new();
        // EBUSY while a loop device still references the file: give a
        // detaching loop device time before resorting to a lazy unmount.
        let mut last_err = String::new();
        let unmounted = wait_until(Duration::from_secs(5), || {
            !is_mounted(&self.mountpoint)
                || match try_run(tool("fusermount3").arg("-u").arg(&self.mountpoint)) {
                    Ok(_) => true,
                    Err(e) => {
                        last_err = e;
                        false
                    }
                }
        });
        if !unmounted {
            problems.push(format!("fusermount3 -u failed, unmounting lazily: {last_err}"));
            if let Err(e) = try_run(tool("fusermount3").arg("-u").arg("-z").arg(&self.mountpoint)) {
                problems.push(e);
            }
        }
        if daemon.wait_exit(STOP_TIMEOUT).is_none() {
            problems.push(format!("nbdfuse (pid {}) did not exit after unmount; killing it", daemon.pid()));
            daemon.kill9();
        }
        if !wait_until(RELEASE_TIMEOUT, || !is_mounted(&self.mountpoint)) {
            problems.push(format!("{} is still mounted", self.mountpoint.display()));
        }
        let _ = fs::remove_file(format!("{}.nbdfuse.pid", self.mountpoint.display()));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{}\n--- nbdfuse log ---\n{}", problems.join("\n"), daemon.log()))
        }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("WARNING: releasing nbdfuse at {}: {e}", self.mountpoint.display());
        }
    }
}

/// A loop device bound to a file (`losetup -f --show FILE`); detached on drop.
pub struct LoopDev {
    dev: PathBuf,
    backing: PathBuf,
    attached: bool,
}

impl LoopDev {
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        Self::attach_with(file, &[])
    }

    /// With extra losetup options, e.g. `["-r"]` or `["--direct-io=on"]`.
    ///
    /// There are only a few loop devices and parallel tests compete for them,
    /// so "no free loop device" is retried for a while before giving up.
    pub fn attach_with(file: &Path, extra: &[&str]) -> Result<LoopDev, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut cmd = tool("losetup");
            cmd.args(extra).arg("-f").arg("--show").arg(file);
            match try_run(&mut cmd) {
                Ok(out) => {
                    let dev = PathBuf::from(stdout_of(&out).trim());
                    if !dev.starts_with("/dev") {
                        return Err(format!("losetup printed no device: {:?}", stdout_of(&out)));
                    }
                    return Ok(LoopDev { dev, backing: file.to_path_buf(), attached: true });
                }
                Err(e) if e.contains("free loop device") && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.dev
    }

    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    pub fn detach(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.attached) {
            return Ok(());
        }
        // On a busy device `losetup -d` only sets autoclear and still exits 0,
        // so success means nothing until the binding is actually gone.
        let result = try_run(tool("losetup").arg("-d").arg(&self.dev)).map(drop);
        if !wait_until(RELEASE_TIMEOUT, || !loop_is_attached(&self.dev)) {
            return Err(format!(
                "{} still bound after losetup -d ({:?}); losetup -a: {:?}",
                self.dev.display(),
                result,
                losetup_lines_mentioning(&self.dev)
            ));
        }
        Ok(())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("WARNING: detaching loop device: {e}");
        }
    }
}

/// `mount DEV DIR`; on drop `umount DIR`, falling back to `umount -l` if busy.
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(dev: &Path, target: &Path) -> Result<Mount, String> {
        Self::with_options(dev, target, &[])
    }

    /// With extra mount arguments, e.g. `["-o", "ro"]` or `["-t", "ext4"]`.
    pub fn with_options(dev: &Path, target: &Path, options: &[&str]) -> Result<Mount, String> {
        fs::create_dir_all(target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        let target = target.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", target.display()))?;
        try_run(tool("mount").args(options).arg(dev).arg(&target))?;
        Ok(Mount { target, mounted: true })
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    pub fn unmount(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        // EBUSY is often transient (a just-closed file, a lingering cwd in a
        // finished child), so retry briefly before detaching lazily.
        let mut last_err = String::new();
        let done = wait_until(Duration::from_secs(3), || {
            !is_mounted(&self.target)
                || match try_run(tool("umount").arg(&self.target)) {
                    Ok(_) => true,
                    Err(e) => {
                        last_err = e;
                        false
                    }
                }
        });
        if done {
            return Ok(());
        }
        let lazy = try_run(tool("umount").arg("-l").arg(&self.target));
        if !wait_until(RELEASE_TIMEOUT, || !is_mounted(&self.target)) {
            return Err(format!("{} still mounted; umount: {last_err}; umount -l: {lazy:?}", self.target.display()));
        }
        Err(format!("umount {} failed, used umount -l: {last_err}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("WARNING: unmounting: {e}");
        }
    }
}

pub fn mkfs_ext4(dev: &Path) {
    run(tool("mkfs.ext4").args(["-q", "-F"]).arg(dev));
}

/// Read-only forced fsck; the output's status is 0 for a clean filesystem.
pub fn fsck_ext4(dev: &Path) -> Output {
    run_status(tool("e2fsck").args(["-f", "-n"]).arg(dev))
}

/// An ext4 filesystem on an NBD export: nbdfuse -> loop device -> mount.
/// Fields drop in declaration order, i.e. umount, losetup -d, fusermount -u.
pub struct FsOverNbd {
    pub mount: Mount,
    pub loopdev: LoopDev,
    pub fuse: NbdFuse,
}

impl FsOverNbd {
    /// Formats the export with ext4 and mounts it; `workdir` receives the
    /// `fuse/` and `mnt/` directories.
    pub fn create(uri: &str, workdir: &Path) -> FsOverNbd {
        Self::setup(uri, workdir, true)
    }

    /// Mounts an export that already holds ext4.
    pub fn attach(uri: &str, workdir: &Path) -> FsOverNbd {
        Self::setup(uri, workdir, false)
    }

    fn setup(uri: &str, workdir: &Path, format: bool) -> FsOverNbd {
        let fuse = NbdFuse::mount(uri, &workdir.join("fuse")).unwrap_or_else(|e| panic!("nbdfuse {uri}: {e}"));
        let loopdev = LoopDev::attach(fuse.disk()).unwrap_or_else(|e| panic!("losetup: {e}"));
        if format {
            mkfs_ext4(loopdev.path());
        }
        let mount = Mount::new(loopdev.path(), &workdir.join("mnt")).unwrap_or_else(|e| panic!("mount: {e}"));
        FsOverNbd { mount, loopdev, fuse }
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Releases everything in order, reporting the first problem.
    pub fn release(self) -> Result<(), String> {
        let FsOverNbd { mount, loopdev, fuse } = self;
        let m = mount.unmount();
        let l = loopdev.detach();
        let f = fuse.unmount();
        m.and(l).and(f)
    }
}

// ---------------------------------------------------------------------------
// Deterministic data and comparisons
// ---------------------------------------------------------------------------

/// xorshift64*: tiny, fast, deterministic; not for anything but test data.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero forever.
        XorShift(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Writes `size` pseudo-random bytes; same (size, seed) gives the same file,
/// and the first N bytes equal `random_bytes(N, seed)` whenever N % 8 == 0.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        left -= n as u64;
    }
    f.sync_all().unwrap_or_else(|e| panic!("cannot sync {}: {e}", path.display()));
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32_TABLE: [u32; 256] = crc32_table();

/// Incremental CRC-32 (IEEE, as zlib): start with 0, feed chunks in order.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

pub fn crc32_file(path: &Path) -> u32 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if n == 0 {
            return crc;
        }
        crc = crc32_update(crc, &buf[..n]);
    }
}

/// Offset of the first differing byte, or of the end of the shorter input.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

/// Like `assert_eq!` on byte slices, without dumping megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(i) = first_difference(actual, expected) {
        let show = |s: &[u8]| s.get(i..(i + 16).min(s.len())).map(|w| format!("{w:02x?}")).unwrap_or_default();
        panic!(
            "{what}: first difference at byte {i} (lengths {} vs {} expected)\n  actual:   {}\n  expected: {}",
            actual.len(),
            expected.len(),
            show(actual),
            show(expected)
        );
    }
}

/// Streams both files; the offset of the first difference (or of the end of
/// the shorter file), or `None` if they are identical.
pub fn files_first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let mut fa = File::open(a)?;
    let mut fb = File::open(b)?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if let Some(i) = first_difference(&ba[..na], &bb[..nb]) {
            return Ok(Some(pos + i as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        pos += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[track_caller]
pub fn assert_files_equal(a: &Path, b: &Path) {
    match files_first_difference(a, b) {
        Ok(None) => {}
        Ok(Some(off)) => panic!("{} and {} differ at byte {off}", a.display(), b.display()),
        Err(e) => panic!("cannot compare {} and {}: {e}", a.display(), b.display()),
    }
}

/// Opens a file for reading and writing without truncating (e.g. a disk image).
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}
