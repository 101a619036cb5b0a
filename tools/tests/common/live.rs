//! A running `cowdisk serve` of an overlay on a random raw base, with its control socket at a
//! known path: what the tests of live operations (tools/tests/live*.rs) start from.

use super::cli::*;
use super::nbdclient::NbdClient;
use super::*;
use serde_json::Value;
use std::path::PathBuf;

/// A served overlay on a random raw base, with its control socket at a known path. The
/// server is stopped before its directory goes (fields drop in order).
pub struct Live {
    pub server: Server,
    pub ws: Ws,
    pub ctl: PathBuf,
    pub base: Vec<u8>,
}

impl Live {
    pub fn start(size: u64) -> Live {
        Self::start_naming(size, false)
    }

    /// The same, the server started in the workspace and told the image's relative path
    /// (`cowdisk serve disk.cow`, as the README does).
    pub fn start_relative(size: u64) -> Live {
        Self::start_naming(size, true)
    }

    fn start_naming(size: u64, relative: bool) -> Live {
        let ws = Ws::in_memory("live");
        write_random_file(&ws.p("base.raw"), size, 0x11fe);
        let base = std::fs::read(ws.p("base.raw")).unwrap();
        ws.create("disk.cow", &["--backing", "base.raw", "--chunk-size", "16K"]);
        let ctl = ws.p("ctl.sock");
        let image = if relative { PathBuf::from("disk.cow") } else { ws.p("disk.cow") };
        let sock = ws.p("nbd.sock");
        let args = [s(&image), "--socket", s(&sock), "--control", s(&ctl)];
        let server = if relative { Server::start_in(ws.dir(), &args) } else { Server::start(&args) };
        Live { server, ws, ctl, base }
    }

    pub fn uri(&self) -> String {
        self.server.uri("disk")
    }

    /// `cowdisk snapshot disk.cow NAME` through the control socket; the pause it reports.
    pub fn snapshot(&self, name: &str) -> f64 {
        let out = self.ws.ok(&["snapshot", "disk.cow", name, "--control", s(&self.ctl)]);
        let ms = out.split("clients paused ").nth(1).and_then(|t| t.split(' ').next()).and_then(|t| t.parse().ok());
        ms.unwrap_or_else(|| panic!("no pause reported: {out}"))
    }

    pub fn client(&self) -> NbdClient<std::os::unix::net::UnixStream> {
        let mut c = self.server.connect();
        c.opt_go("disk", &[]).expect("NBD_OPT_GO");
        c
    }

    /// The whole device of the frozen snapshot `name` (as flatten writes it).
    pub fn snapshot_bytes(&self, name: &str) -> Vec<u8> {
        let out = format!("{name}.raw");
        self.ws.ok(&["flatten", name, "--output", &out, "--format", "raw"]);
        let b = std::fs::read(self.ws.p(&out)).unwrap();
        std::fs::remove_file(self.ws.p(&out)).unwrap();
        b
    }

    /// fio writing random 4 KiB blocks with crc32c verification on two connections, one per
    /// half of the device, in a thread; its output once it passed (it panics otherwise).
    pub fn fio_on_two_connections(&self, name: &str) -> std::thread::JoinHandle<String> {
        let half = self.base.len() as u64 / 2;
        let args: Vec<String> = vec![
            format!("--name={name}"),
            "--ioengine=nbd".into(),
            format!("--uri={}", self.uri()),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=16".into(),
            "--numjobs=2".into(),
            format!("--size={half}"),
            format!("--offset_increment={half}"),
            "--verify=crc32c".into(),
        ];
        let dir = self.ws.dir().to_path_buf();
        std::thread::spawn(move || run_fio(&dir, &args, 2))
    }
}

/// One connection to a server's control socket, speaking its JSON lines directly (so that
/// requests from several threads meet in the server, without a process start between them).
pub struct Ctl {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl Ctl {
    pub fn connect(path: &Path) -> Ctl {
        use std::io::BufRead;
        let s = std::os::unix::net::UnixStream::connect(path).expect("connect to the control socket");
        s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut c = Ctl { r: std::io::BufReader::new(s.try_clone().unwrap()), w: s };
        let mut hello = String::new();
        c.r.read_line(&mut hello).expect("the greeting");
        c
    }

    /// The reply to `execute` with `arguments`; panics if none comes within 30 s.
    pub fn call(&mut self, execute: &str, arguments: Value) -> Value {
        use std::io::{BufRead, Write};
        let req = serde_json::json!({"execute": execute, "arguments": arguments, "id": 1});
        writeln!(self.w, "{req}").expect("send a control request");
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap_or_else(|e| panic!("no reply to {execute} within 30 s: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply to {execute} ({e}): {line}"))
    }

    /// Sends `calls` (command, arguments) at the same moment, each on a connection of its own
    /// (connected first, then released together): their replies, in order.
    pub fn at_once(path: &std::path::Path, calls: Vec<(&'static str, Value)>) -> Vec<Value> {
        let go = std::sync::Arc::new(std::sync::Barrier::new(calls.len()));
        let threads: Vec<_> = calls
            .into_iter()
            .map(|(execute, arguments)| {
                let mut c = Ctl::connect(path);
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    c.call(execute, arguments)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a control request's thread")).collect()
    }
}
