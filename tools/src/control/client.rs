//! The CLI side of the control channel: finding the server of an image (or the one server
//! running), refusing a socket that belongs to another user, and one request and its reply.

use super::{canonical, image_link, name_of, rundir};
use crate::Failure;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub struct Client {
    path: PathBuf,
    r: BufReader<UnixStream>,
    w: UnixStream,
    next_id: u64,
    /// The connection broke (the server closed it or died): no further call can succeed.
    lost: bool,
}

fn fail(path: &Path, what: impl std::fmt::Display) -> Failure {
    Failure(format!("{}: control: {what}", path.display()), 1)
}

impl Client {
    /// Connects to the control socket at `path` and reads the greeting. A socket another user
    /// owns is refused before anything is sent to it.
    pub fn connect(path: &Path) -> Result<Client, Failure> {
        let md = std::fs::metadata(path).map_err(|e| fail(path, e))?;
        // SAFETY: getuid has no failure mode.
        let me = unsafe { libc::getuid() };
        if md.uid() != me && me != 0 {
            return Err(fail(path, format!("the socket belongs to user {}, not to you; nothing was sent", md.uid())));
        }
        let s = UnixStream::connect(path).map_err(|e| fail(path, e))?;
        let w = s.try_clone().map_err(|e| fail(path, e))?;
        let mut c = Client { path: path.to_path_buf(), r: BufReader::new(s), w, next_id: 1, lost: false };
        let hello = c.line()?;
        if hello.get("cowdisk").is_none() {
            return Err(fail(path, "not a cowdisk control socket"));
        }
        Ok(c)
    }

    fn line(&mut self) -> Result<Value, Failure> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            // Nothing, or a line cut short by the server dying mid-write: a lost connection,
            // not a bad reply.
            Ok(_) if !l.ends_with('\n') => Err(self.broke("the server closed the connection")),
            Ok(_) => serde_json::from_str(&l).map_err(|e| fail(&self.path, format!("bad reply: {e}"))),
            Err(e) => Err(self.broke(e)),
        }
    }

    /// The failure of a connection that broke; no further call can succeed.
    fn broke(&mut self, what: impl std::fmt::Display) -> Failure {
        self.lost = true;
        fail(&self.path, what)
    }

    /// Whether the connection broke in a call: the server closed it, or is gone.
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Runs `command` with `arguments` on the server; its error is returned as the server's
    /// one line.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"execute": command, "arguments": arguments, "id": id});
        if let Err(e) = writeln!(self.w, "{req}") {
            return Err(self.broke(e));
        }
        let reply = self.line()?;
        if let Some(e) = reply.get("error") {
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("the server refused the request");
            return Err(Failure(desc.to_string(), 1));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}

/// The control socket of the server serving `image`, if one is running: `control` if given,
/// else the default link for the image when a server answers there: the one keyed by its
/// canonical path (a server links that of the file it opened), else by its name (a server
/// links that too, and after a snapshot through a symbolic link only that one names it).
pub fn for_image(image: &Path, control: Option<&Path>) -> Result<Option<Client>, Failure> {
    if let Some(c) = control {
        return Client::connect(c).map(Some);
    }
    let Ok(dir) = rundir() else { return Ok(None) };
    for key in [canonical(image), name_of(image)].into_iter().flatten() {
        let link = image_link(&dir, &key);
        // A link left by a server that is gone (killed) leads nowhere: the image is not served.
        if std::fs::metadata(&link).is_ok() && UnixStream::connect(&link).is_ok() {
            return Client::connect(&link).map(Some);
        }
    }
    Ok(None)
}

/// The server to manage exports of: `control` if given, else the one server of this user
/// that answers on its default socket (an error if there is none, or several).
pub fn server(control: Option<&Path>) -> Result<Client, Failure> {
    if let Some(c) = control {
        return Client::connect(c);
    }
    let dir = rundir().map_err(|e| Failure(format!("control: {e}"), 1))?;
    let mut live: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| fail(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("server-")))
        .filter(|p| UnixStream::connect(p).is_ok())
        .collect();
    match live.len() {
        0 => Err(Failure(
            "no cowdisk server is running for you (start `cowdisk serve`, or give --control PATH)".into(),
            1,
        )),
        1 => Client::connect(&live.remove(0)),
        n => Err(Failure(format!("{n} cowdisk servers are running; say which with --control PATH"), 1)),
    }
}

/// `path` made absolute against the current directory without resolving its last component
/// (which may not exist yet): what the server, whose directory may differ, is sent.
pub fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    name_of(path).map_err(|e| Failure(format!("{}: {e}", path.display()), 1))
}
