//! Helpers of the object-store tests (remote.rs, remote_cache.rs): a repository of one test in the store and the `cowdisk` commands that reach it, test data, and what a chunk cache holds on disk.

use std::path::Path;
use std::process::{Command, Output};

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;

use super::nbdclient::NbdClient;
use super::s3::{runtime, test_prefix, S3};
use super::*;

pub const CHUNK: usize = 64 * 1024;

/// A repository of this test in a store, and the commands that use it.
pub struct Repo {
    pub s3: S3,
    pub prefix: String,
}

impl Repo {
    pub fn new(s3: &S3) -> Repo {
        Repo { s3: s3.clone(), prefix: test_prefix() }
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.s3.bucket, self.prefix)
    }

    pub fn layer(&self, name: &str) -> String {
        format!("{}/{name}", self.url())
    }

    /// `cowdisk ARGS` reaching this store, with the chunk cache at `cache`.
    pub fn cow(&self, cache: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(cowdisk_bin());
        c.args(args).env("COWDISK_CACHE_DIR", cache);
        c.envs(self.s3.env());
        c
    }

    /// Writes `data` as `ws/base.raw` and pushes it, tagged `b`, with `extra` options.
    pub fn push_base(&self, ws: &TempDir, cache: &Path, data: Vec<u8>, extra: &[&str]) -> Vec<u8> {
        let base = ws.join("base.raw");
        std::fs::write(&base, &data).expect("write base");
        let url = self.url();
        let mut args = vec!["push", p(&base), &url, "--tag", "b"];
        args.extend_from_slice(extra);
        run(&mut self.cow(cache, &args));
        data
    }

    pub fn json(&self, cache: &Path, args: &[&str]) -> Value {
        let out = run(&mut self.cow(cache, args));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("cowdisk {args:?} printed no JSON ({e}): {}", stdout_of(&out)))
    }

    pub fn server(&self, cache: &Path, args: &[&str]) -> Server {
        self.server_env(cache, args, &[])
    }

    /// [`Repo::server`] with `extra` variables in its environment too.
    pub fn server_env(&self, cache: &Path, args: &[&str], extra: &[(&'static str, &str)]) -> Server {
        let env: Vec<(&str, String)> = self
            .s3
            .env()
            .into_iter()
            .chain([("COWDISK_CACHE_DIR", cache.display().to_string())])
            .chain(extra.iter().map(|&(k, v)| (k, v.to_string())))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start_with_env(args, &env)
    }

    /// The keys under `dir` of this repository.
    pub fn keys(&self, dir: &str) -> Vec<String> {
        let store = self.s3.store();
        let prefix = ObjPath::from(format!("{}/{dir}", self.prefix));
        let mut keys: Vec<String> = runtime()
            .block_on(store.list(Some(&prefix)).map_ok(|m| m.location.to_string()).try_collect::<Vec<_>>())
            .expect("list");
        keys.sort();
        keys
    }

    pub fn put(&self, key: &str, bytes: Vec<u8>) {
        runtime().block_on(self.s3.store().put(&ObjPath::from(key), PutPayload::from(bytes))).expect("put");
    }

    pub fn delete(&self, key: &str) {
        runtime().block_on(self.s3.store().delete(&ObjPath::from(key))).expect("delete");
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        runtime()
            .block_on(async { self.s3.store().get(&ObjPath::from(key)).await?.bytes().await })
            .expect("get")
            .to_vec()
    }
}

/// The failure of a command expected to fail: its one-line message.
pub fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure, got success: {}", stdout_of(out));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "the error is not one line: {err}");
    err
}

/// The bytes the files under `dir` take on disk (allocated blocks: the cache's chunk files are
/// sparse).
pub fn du(dir: &Path) -> u64 {
    du_of(dir, |_| true)
}

/// What the cache in `dir` holds that its bound is about: every file but its lock file and a
/// fill's temporary file (still being written, or cut off when its process exited).
pub fn cached_bytes(dir: &Path) -> u64 {
    du_of(dir, |name| name != ".lock" && !name.ends_with(".tmp"))
}

pub fn du_of(dir: &Path, counted: fn(&str) -> bool) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du_of(&e.path(), counted),
            Ok(_) if counted(&e.file_name().to_string_lossy()) => e.metadata().map_or(0, |m| m.blocks() * 512),
            _ => 0,
        })
        .sum()
}

/// Random data with a hole of zeros in the middle (zero chunks are not stored).
pub fn holed(mib: usize, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(mib << 20, seed);
    let q = data.len() / 4;
    data[q..2 * q].fill(0);
    data
}

/// A raw base of `data` at `path`.
pub fn make_base(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let data = holed(mib, seed);
    std::fs::write(path, &data).expect("write base");
    data
}

/// Writes `writes` into the cowdisk image `image` through a server (offline commands cannot
/// write data), and applies them to `expected`.
pub fn write_into(image: &Path, sock: &Path, writes: &[(u64, Vec<u8>)], expected: &mut [u8]) {
    let server = Server::start(&[image.to_str().expect("utf-8"), "--socket", sock.to_str().expect("utf-8")]);
    let mut c = client(&server);
    for (off, data) in writes {
        c.write(*off, data).expect("write");
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    c.flush().expect("flush");
    c.disconnect().ok();
    server.stop();
}

/// A client of the server's default export, past option haggling.
pub fn client(server: &Server) -> NbdClient<std::os::unix::net::UnixStream> {
    let mut c = server.connect();
    c.opt_go("", &[]).expect("NBD_OPT_GO");
    c
}

/// Reads the whole export with nbdcopy into `out`.
pub fn copy_out(server: &Server, out: &Path) {
    run(tool("nbdcopy").arg(server.uri("")).arg(out));
}

/// Bytes that `cowdisk map --json` printed as `map` says come from the layer at `depth`.
pub fn bytes_at_depth(map: &Value, depth: u64) -> u64 {
    map.as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["depth"] == depth)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The bytes a stopped server said it fetched from object stores (it says nothing when it
/// fetched nothing).
pub fn fetched_bytes(log: &str) -> u64 {
    log.lines()
        .find(|l| l.contains("from object stores"))
        .map(|l| {
            l.split_once('(')
                .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("a fetch count that does not parse: {l}"))
        })
        .unwrap_or(0)
}

/// Which entries of each layer the cache at `dir` holds, by entry number (format-spec §9.5,
/// informative: a record's tag is 0 for a chunk not held).
pub fn cached_entries(dir: &Path) -> Vec<usize> {
    let Ok(rd) = std::fs::read_dir(dir.join("layers")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "index")) {
        let b = std::fs::read(e.path()).unwrap_or_default();
        let records = b.get(64..).unwrap_or_default().chunks_exact(32);
        out.extend(records.enumerate().filter(|(_, r)| r[..8] != [0u8; 8]).map(|(i, _)| i));
    }
    out
}

/// How many chunks a cache directory holds (see [`cached_entries`]).
pub fn cached_chunks(dir: &Path) -> usize {
    cached_entries(dir).len()
}
