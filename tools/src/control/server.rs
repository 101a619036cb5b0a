//! The server side of the control channel: a Unix socket next to the NBD listeners, a thread
//! per control connection, and the commands: `snapshot` (live, see `cowdisk::live`),
//! `export-add`, `export-remove`, `export-list`, and the background jobs `job-start`
//! (commit, flatten, compact), `job-list` and `job-cancel`. Every command either does all it
//! says or changes nothing and answers with one line saying why.

use super::{image_links, name_of, names_image};
use cowdisk::live::jobs::{Job, JobSpec, Jobs};
use cowdisk::live::LiveChain;
use cowdisk::nbd::server::{bind_unix, ServerControl};
use cowdisk::nbd::{Export, ExportStats};
use cowdisk::storage::namespace::RealFs;
use cowdisk::{Chain, ChainOptions, Disk, Error, ErrorKind};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Longest request line read; anything longer ends the control connection.
const MAX_LINE: usize = 64 * 1024;
/// How long the accept loop waits after accepting failed before it tries again.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// One export as the control channel knows it: the live chain behind it and its image.
pub struct Served {
    pub name: String,
    /// The image's name (`name_of` the path its chain was opened by): requests name it by
    /// this or by any path to the same file (`names_image`).
    pub image: PathBuf,
    pub live: Arc<LiveChain>,
    /// The default control paths linked to this server for it (`State::link`), removed with
    /// it: made when it was added, as the image's canonical path may change under its name
    /// later (a snapshot through a symbolic link).
    pub links: Vec<PathBuf>,
}

struct State {
    server: ServerControl,
    exports: Mutex<Vec<Served>>,
    /// Where per-image links go (the default location), if there.
    rundir: Option<PathBuf>,
    socket: PathBuf,
    stopping: AtomicBool,
    jobs: Jobs,
    /// The link of the default name to a socket given with --control.
    alias: Option<PathBuf>,
    /// Held through an `export-add` or `export-remove`, each several steps (the NBD server's
    /// list, the links, `exports`): interleaved, a removal could find an export half added
    /// (and say it removed it, leaving the image open and locked under no export), or two
    /// removals of one export could find it claimed by each other for ever.
    export_changes: Mutex<()>,
}

/// The running control channel; dropping it removes its socket and links.
pub struct Control {
    state: Arc<State>,
    /// The listening socket's descriptor: shut down to end the accept loop.
    listener_fd: std::os::fd::RawFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    /// Listens on `socket` (mode 0600) for the server behind `server`, which serves `exports`;
    /// with `rundir`, links each image's default control path to it.
    pub fn start(
        socket: PathBuf,
        rundir: Option<PathBuf>,
        server: ServerControl,
        exports: Vec<Served>,
    ) -> Result<Control, Error> {
        let listener = bind(&socket)?;
        if let Some(d) = &rundir {
            sweep_dangling_links(d);
        }
        // A socket outside the runtime directory is found there through a link of the
        // default name.
        let alias = rundir.as_ref().map(|d| super::server_socket(d, std::process::id())).filter(|a| *a != socket);
        if let Some(a) = &alias {
            let _ = std::fs::remove_file(a);
            let _ = std::os::unix::fs::symlink(&socket, a);
        }
        let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let state = Arc::new(State {
            server,
            exports: Mutex::new(Vec::new()),
            rundir,
            socket,
            stopping: AtomicBool::new(false),
            jobs: Jobs::default(),
            alias,
            export_changes: Mutex::new(()),
        });
        for mut s in exports {
            s.links = state.link(&s.image);
            lock(&state.exports).push(s);
        }
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stopping.load(Ordering::Acquire) {
                    break;
                }
                let conn = match conn {
                    Ok(c) => c,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        continue
                    }
                    // Out of descriptors or memory: the client waits in the backlog; trying
                    // again at once would spin a core while the shortage lasts. (The NBD
                    // accept loop reports it; the control channel shares the shortage.)
                    Err(_) => {
                        std::thread::sleep(ACCEPT_PAUSE);
                        continue;
                    }
                };
                let st = st.clone();
                std::thread::spawn(move || session(&st, conn));
            }
        });
        Ok(Control { state, listener_fd, thread: Some(thread) })
    }

    pub fn socket(&self) -> &Path {
        &self.state.socket
    }

    /// Stops accepting control connections and closes every live chain, reporting the first
    /// error (after the NBD server has stopped: no request runs any more).
    pub fn close_all(&mut self) -> Result<(), Error> {
        self.stop();
        // Running jobs stop at their next safe point (see cowdisk::live::jobs for what each
        // leaves), before their chains close.
        self.state.jobs.stop_all();
        let mut first = Ok(());
        for s in lock(&self.state.exports).drain(..) {
            // Gone from the list, so Drop would not find it: its link goes now.
            self.state.unlink(&s);
            if let Err(e) = s.live.close() {
                first = first.and(Err(e));
            }
        }
        first
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.state.stopping.store(true, Ordering::Release);
            // Wakes the accept loop (accept fails on a shut-down listener), which then sees
            // `stopping`; unlike connecting to it, this works when the socket's name is gone.
            // SAFETY: the descriptor is the listener's, which the accept thread still owns.
            unsafe {
                libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
            }
            let _ = t.join();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.state.socket);
        if let Some(a) = &self.state.alias {
            let _ = std::fs::remove_file(a);
        }
        for s in lock(&self.state.exports).iter() {
            self.state.unlink(s);
        }
    }
}

/// Removes what servers that died without cleaning up (killed with -9) left in the runtime
/// directory: their `server-PID.sock` when no process PID runs, then links whose socket is
/// gone. A live server makes its socket before its links, so none of its links dangles.
fn sweep_dangling_links(rundir: &Path) {
    let Ok(entries) = std::fs::read_dir(rundir) else { return };
    let entries: Vec<_> = entries.flatten().collect();
    for e in &entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("server-").and_then(|n| n.strip_suffix(".sock")) else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
    for e in entries {
        let p = e.path();
        let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
        if is_link && !p.exists() && e.file_name().to_string_lossy().ends_with(".sock") {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Binds the control socket as the NBD server binds its own (`bind_unix`: a stale socket is
/// replaced, a live one refused, any other file refused and left alone), mode 0600.
fn bind(socket: &Path) -> Result<UnixListener, Error> {
    let l = bind_unix(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod control socket", e).with_file(socket))?;
    Ok(l)
}

impl State {
    /// Links the default control paths of the image known by `image` to this server; returns
    /// them, for [`State::unlink`].
    fn link(&self, image: &Path) -> Vec<PathBuf> {
        let Some(d) = &self.rundir else { return Vec::new() };
        let made = image_links(d, image);
        for l in &made {
            let _ = std::fs::remove_file(l);
            let _ = std::os::unix::fs::symlink(&self.socket, l);
        }
        made
    }

    fn unlink(&self, s: &Served) {
        for l in &s.links {
            // Only our own link: another server may serve the image by now.
            if std::fs::read_link(l).is_ok_and(|t| t == self.socket) {
                let _ = std::fs::remove_file(l);
            }
        }
    }
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given; the fd is the stream's.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn session(st: &State, conn: UnixStream) {
    // The socket's mode already keeps other users out; a peer of another uid (root aside)
    // got in by a mistake in its directory's permissions and is not served.
    // SAFETY: getuid has no failure mode.
    let me = unsafe { libc::getuid() };
    if !matches!(peer_uid(&conn), Some(u) if u == me || u == 0) {
        return;
    }
    let Ok(w) = conn.try_clone() else { return };
    let mut w = w;
    let greeting = json!({"cowdisk": {"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id()}});
    if writeln!(w, "{greeting}").is_err() {
        return;
    }
    let mut r = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = writeln!(w, "{}", error_reply(&Value::Null, "invalid-argument", "request line too long"));
                return;
            }
            Ok(_) => {}
        }
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(req) => {
                let id = req.get("id").cloned().unwrap_or(Value::Null);
                let cmd = req.get("execute").and_then(Value::as_str).unwrap_or("");
                let args = req.get("arguments").cloned().unwrap_or_else(|| json!({}));
                match dispatch(st, cmd, &args) {
                    Ok(v) => json!({"return": v, "id": id}),
                    Err(e) => error_reply(&id, e.kind().name(), &e.to_string()),
                }
            }
            Err(e) => error_reply(&Value::Null, "invalid-argument", &format!("not a JSON request: {e}")),
        };
        if writeln!(w, "{reply}").is_err() {
            return;
        }
    }
}

fn error_reply(id: &Value, class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}, "id": id})
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

fn arg_str<'a>(args: &'a Value, key: &str) -> Result<&'a str, Error> {
    args.get(key).and_then(Value::as_str).ok_or_else(|| bad(format!("argument {key:?} (a string) is missing")))
}

fn arg_bool(args: &Value, key: &str) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn dispatch(st: &State, cmd: &str, args: &Value) -> Result<Value, Error> {
    match cmd {
        "snapshot" => snapshot(st, args),
        "export-add" => export_add(st, args),
        "export-remove" => export_remove(st, args),
        "export-list" => Ok(export_list(st)),
        "job-start" => job_start(st, args),
        "job-list" => Ok(json!(st.jobs.list().iter().map(|j| job_json(j)).collect::<Vec<_>>())),
        "trace-save" => trace_save(),
        "job-cancel" => {
            let id = args.get("id").and_then(Value::as_u64).ok_or_else(|| bad("argument \"id\" (a number) is missing"))?;
            Ok(job_json(st.jobs.cancel(id)?.as_ref()))
        }
        _ => Err(bad(format!(
            "unknown command {cmd:?} (snapshot, export-add, export-remove, export-list, job-start, job-list, job-cancel, \
             trace-save)"
        ))),
    }
}

/// Stores what a `--record-trace` server recorded so far with each layer read, as its stop
/// would; recording goes on, and a later save (or the stop) stores the longer trace.
fn trace_save() -> Result<Value, Error> {
    if !cowdisk::remote::trace::recording() {
        return Err(bad("this server records no traces (start it with --record-trace)"));
    }
    let saved = cowdisk::remote::trace::save_recorded()?;
    Ok(json!(saved.iter().map(|t| json!({"url": t.url, "chunks": t.chunks})).collect::<Vec<_>>()))
}

/// The live chain serving the image at `path` (its name, or any path to its file).
fn live_of(st: &State, path: &str) -> Result<Arc<LiveChain>, Error> {
    let p = Path::new(path);
    if let Err(e) = p.symlink_metadata() {
        return Err(Error::io("resolve", e).with_file(p));
    }
    lock(&st.exports)
        .iter()
        .find(|s| names_image(p, &s.image))
        .map(|s| s.live.clone())
        .ok_or_else(|| bad(format!("{path} is not served by this server")))
}

fn snapshot(st: &State, args: &Value) -> Result<Value, Error> {
    let live = live_of(st, arg_str(args, "image")?)?;
    let snap = PathBuf::from(arg_str(args, "snapshot")?);
    let paused = live.snapshot(&RealFs, &snap)?;
    Ok(json!({"paused_ms": paused.as_secs_f64() * 1000.0}))
}

fn export_add(st: &State, args: &Value) -> Result<Value, Error> {
    let _changing = lock(&st.export_changes);
    let image = PathBuf::from(arg_str(args, "image")?);
    // Opened by its name, as `cowdisk serve` opens its images: relative parents are found
    // from the directory of that name (spec §3.3), and a snapshot replaces the file there.
    let named = name_of(&image).map_err(|e| Error::io("resolve", e).with_file(&image))?;
    if let Err(e) = std::fs::metadata(&named) {
        return Err(Error::io("open", e).with_file(&image));
    }
    let name = match args.get("name").and_then(Value::as_str) {
        Some(n) => n.to_string(),
        None => crate::serve::export_name(&image),
    };
    let description = args.get("description").and_then(Value::as_str).unwrap_or("");
    // Refused before the image is opened (a writable open may replay its journal).
    cowdisk::nbd::exports::check_strings(&name, description)?;
    if st.server.exports().get(&name).is_some() {
        return Err(bad(format!("an export named {name:?} exists already")));
    }
    if lock(&st.exports).iter().any(|s| names_image(&named, &s.image)) {
        return Err(bad(format!("{} is served already", image.display())));
    }
    let read_only = arg_bool(args, "read_only");
    let chain = Chain::open(&named, ChainOptions { writable: !read_only, ..Default::default() })?;
    if !read_only {
        // As `serve` does: what a server killed during a live snapshot of this image left.
        crate::ops::sweep_temps(&named, "snapshot");
    }
    let live = Arc::new(LiveChain::new(chain));
    st.server.add_export(Export::new(name.clone(), description, live.clone() as Arc<dyn Disk>))?;
    let links = st.link(&named);
    lock(&st.exports).push(Served { name: name.clone(), image: named, live, links });
    Ok(json!({"name": name, "read_only": read_only}))
}

fn export_remove(st: &State, args: &Value) -> Result<Value, Error> {
    let _changing = lock(&st.export_changes);
    let name = arg_str(args, "name")?;
    let force = arg_bool(args, "force");
    let live = lock(&st.exports).iter().find(|s| s.name == name).map(|s| s.live.clone());
    // Where it stands in the list, to put it back there if its flush fails (the first export
    // is the default one). No other change can move it meanwhile: they wait for
    // `export_changes`.
    let place = st.server.exports().list().iter().position(|e| e.name == name).unwrap_or(usize::MAX);
    // The chain is claimed for the removal, as a job claims it: a job or a snapshot running
    // on it is seen whatever path it was started by (the chain's own, not the export's
    // name), and none can start while the export goes. Never waited for unforced: refused.
    let claim = |force: bool| -> Result<(), Error> {
        let Some(live) = &live else { return Ok(()) };
        while let Err(e) = live.try_claim("export removal") {
            if !force {
                return Err(Error::new(e.kind(), format!("{}; --force cancels it", e.message())));
            }
            for j in st.jobs.list().iter().filter(|j| j.image == live.path()) {
                let _ = st.jobs.cancel(j.id);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    };
    let removed = if force {
        // Its clients are disconnected first: a snapshot, or a job's step, waiting for a
        // request that a client does not finish (a write whose payload never comes) ends
        // once that client is cut off, and only then can the chain be claimed.
        let removed = st.server.remove_export(name, true)?;
        claim(true)?;
        removed
    } else {
        claim(false)?;
        match st.server.remove_export(name, false) {
            Ok(e) => e,
            Err(e) => {
                if let Some(live) = &live {
                    live.release();
                }
                return Err(e);
            }
        }
    };
    // (An unusable chain, left so by a change that failed half-way, has nothing to flush and
    // is let go as it is: served again it could never be removed.)
    if let Some(live) = live.as_ref().filter(|l| l.is_usable()) {
        // Everything its clients wrote made durable while the export can still be put back:
        // a flush that fails (the file system full, an I/O error) would fail the close too,
        // which drops the chain and, with it, what was written since the last flush. Served
        // again instead, nothing is lost, and a removal once the cause is mended closes it.
        if let Err(e) = cowdisk::DiskFlush::flush(live.as_ref()) {
            let back = Export::new(removed.name.clone(), removed.description.clone(), live.clone() as Arc<dyn Disk>);
            if st.server.add_export_at(place, back).is_ok() {
                live.release();
                return Err(Error::new(
                    e.kind(),
                    format!(
                        "not removed: flushing it failed ({e}); it is served again (its clients were disconnected) and \
                         keeps what they wrote: mend the cause and remove it again"
                    ),
                ));
            }
        }
    }
    let served = {
        let mut l = lock(&st.exports);
        let i = l.iter().position(|s| s.name == name);
        i.map(|i| l.remove(i))
    };
    if let Some(s) = served {
        st.unlink(&s);
        // No connection uses it any more: flushed and closed cleanly, so that another
        // program may open the image at once.
        s.live.close()?;
    }
    Ok(json!({"name": name}))
}

fn export_list(st: &State) -> Value {
    let served = lock(&st.exports);
    let list: Vec<Value> = st
        .server
        .exports()
        .list()
        .iter()
        .map(|e| {
            let g = |c: &std::sync::atomic::AtomicU64| ExportStats::get(c);
            let s = &e.stats;
            let image = served.iter().find(|x| x.name == e.name).map(|x| x.image.display().to_string());
            json!({
                "name": e.name, "image": image, "description": e.description,
                "read_only": e.disk.is_read_only(), "size": e.disk.size(),
                "connections": g(&s.connections), "connections_total": g(&s.connections_total),
                "reads": g(&s.reads), "writes": g(&s.writes), "zeroes": g(&s.zeroes),
                "flushes": g(&s.flushes), "bytes_read": g(&s.bytes_read),
                "bytes_written": g(&s.bytes_written), "errors": g(&s.errors),
            })
        })
        .collect();
    json!(list)
}

fn job_start(st: &State, args: &Value) -> Result<Value, Error> {
    let live = live_of(st, arg_str(args, "image")?)?;
    let spec = match arg_str(args, "kind")? {
        "commit" => JobSpec::Commit,
        "flatten" => JobSpec::Flatten,
        "compact" => JobSpec::Compact {
            into: PathBuf::from(arg_str(args, "into")?),
            layers: args.get("layers").and_then(Value::as_u64).map(|n| n as usize),
        },
        other => return Err(bad(format!("unknown job kind {other:?} (commit, flatten, compact)"))),
    };
    let rate = args.get("rate").and_then(Value::as_u64);
    let job = st.jobs.start(live, spec, rate)?;
    Ok(job_json(&job))
}

/// A job as `job-list` shows it.
pub fn job_json(j: &Job) -> Value {
    let (done, total) = j.progress();
    let state = j.state();
    let error = match &state {
        cowdisk::live::jobs::JobState::Failed(e) => Some(e.clone()),
        _ => None,
    };
    json!({
        "id": j.id, "kind": j.spec.name(), "image": j.image.display().to_string(),
        "state": state.name(), "error": error, "done": done, "total": total,
        "rate": j.rate(), "elapsed_ms": j.elapsed().as_millis() as u64,
    })
}
