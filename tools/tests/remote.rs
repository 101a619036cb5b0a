//! Layers in an object store (issue 16), through the `cowdisk` binary against a real Ceph RGW:
//! push (with --chain, again, killed and resumed, deduplicated), ls, rm and gc, lazy overlays
//! served and read by real clients, pull, the shared cache's bound, two hosts on one layer, and
//! the store misbehaving (bad settings, corrupt and truncated objects, the gateway stopped).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::nbdclient::NbdClient;
use common::s3::{runtime, s3, test_prefix, Ceph, S3};
use common::*;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;

const CHUNK: usize = 64 * 1024;

/// A repository of this test in a store, and the commands that use it.
struct Repo {
    s3: S3,
    prefix: String,
}

impl Repo {
    fn new(s3: &S3) -> Repo {
        Repo { s3: s3.clone(), prefix: test_prefix() }
    }

    fn url(&self) -> String {
        format!("s3://{}/{}", self.s3.bucket, self.prefix)
    }

    fn layer(&self, name: &str) -> String {
        format!("{}/{name}", self.url())
    }

    /// `cowdisk ARGS` reaching this store, with the chunk cache at `cache`.
    fn cow(&self, cache: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(cowdisk_bin());
        c.args(args).env("COWDISK_CACHE_DIR", cache);
        c.envs(self.s3.env());
        c
    }

    /// Writes `data` as `ws/base.raw` and pushes it, tagged `b`, with `extra` options.
    fn push_base(&self, ws: &TempDir, cache: &Path, data: Vec<u8>, extra: &[&str]) -> Vec<u8> {
        let base = ws.join("base.raw");
        std::fs::write(&base, &data).expect("write base");
        let url = self.url();
        let mut args = vec!["push", p(&base), &url, "--tag", "b"];
        args.extend_from_slice(extra);
        run(&mut self.cow(cache, &args));
        data
    }

    fn json(&self, cache: &Path, args: &[&str]) -> Value {
        let out = run(&mut self.cow(cache, args));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("cowdisk {args:?} printed no JSON ({e}): {}", stdout_of(&out)))
    }

    fn server(&self, cache: &Path, args: &[&str]) -> Server {
        self.server_env(cache, args, &[])
    }

    /// [`Repo::server`] with `extra` variables in its environment too.
    fn server_env(&self, cache: &Path, args: &[&str], extra: &[(&'static str, &str)]) -> Server {
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
    fn keys(&self, dir: &str) -> Vec<String> {
        let store = self.s3.store();
        let prefix = ObjPath::from(format!("{}/{dir}", self.prefix));
        let mut keys: Vec<String> = runtime()
            .block_on(store.list(Some(&prefix)).map_ok(|m| m.location.to_string()).try_collect::<Vec<_>>())
            .expect("list");
        keys.sort();
        keys
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        runtime().block_on(self.s3.store().put(&ObjPath::from(key), PutPayload::from(bytes))).expect("put");
    }

    fn delete(&self, key: &str) {
        runtime().block_on(self.s3.store().delete(&ObjPath::from(key))).expect("delete");
    }

    fn get(&self, key: &str) -> Vec<u8> {
        runtime()
            .block_on(async { self.s3.store().get(&ObjPath::from(key)).await?.bytes().await })
            .expect("get")
            .to_vec()
    }
}

/// The failure of a command expected to fail: its one-line message.
fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure, got success: {}", stdout_of(out));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "the error is not one line: {err}");
    err
}

/// The bytes the files under `dir` take on disk (allocated blocks: the cache's chunk files are
/// sparse).
fn du(dir: &Path) -> u64 {
    du_of(dir, |_| true)
}

/// What the cache in `dir` holds that its bound is about: every file but its lock file and a
/// fill's temporary file (still being written, or cut off when its process exited).
fn cached_bytes(dir: &Path) -> u64 {
    du_of(dir, |name| name != ".lock" && !name.ends_with(".tmp"))
}

fn du_of(dir: &Path, counted: fn(&str) -> bool) -> u64 {
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
fn holed(mib: usize, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(mib << 20, seed);
    let q = data.len() / 4;
    data[q..2 * q].fill(0);
    data
}

/// A raw base of `data` at `path`.
fn make_base(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let data = holed(mib, seed);
    std::fs::write(path, &data).expect("write base");
    data
}

/// Writes `writes` into the cowdisk image `image` through a server (offline commands cannot
/// write data), and applies them to `expected`.
fn write_into(image: &Path, sock: &Path, writes: &[(u64, Vec<u8>)], expected: &mut [u8]) {
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
fn client(server: &Server) -> NbdClient<std::os::unix::net::UnixStream> {
    let mut c = server.connect();
    c.opt_go("", &[]).expect("NBD_OPT_GO");
    c
}

/// Reads the whole export with nbdcopy into `out`.
fn copy_out(server: &Server, out: &Path) {
    run(tool("nbdcopy").arg(server.uri("")).arg(out));
}

/// Bytes that `cowdisk map --json` printed as `map` says come from the layer at `depth`.
fn bytes_at_depth(map: &Value, depth: u64) -> u64 {
    map.as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["depth"] == depth)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn a_pushed_chain_is_served_lazily_and_reads_as_the_local_one() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let mut expected = make_base(&ws.join("base.raw"), 8, 1);
    run(Command::new(cowdisk_bin()).args(["create", p(&ws.join("l1.cow")), "--backing", p(&ws.join("base.raw"))]));
    let writes = vec![(0u64, random_bytes(3 * CHUNK, 2)), (5 << 20, random_bytes(CHUNK + 4096, 3))];
    write_into(&ws.join("l1.cow"), &ws.join("w.sock"), &writes, &mut expected);
    run(Command::new(cowdisk_bin()).args(["snapshot", p(&ws.join("l1.cow")), p(&ws.join("s1.cow"))]));

    // Its parent (the raw base) is not in the repository: refused, with the way out.
    let out = repo.cow(&cache, &["push", p(&ws.join("s1.cow")), &repo.url(), "--tag", "v1"]).output().expect("run");
    let err = failure(&out);
    assert!(err.contains("--chain"), "{err}");
    assert!(repo.keys("layers").is_empty() && repo.keys("tags").is_empty(), "a refused push left layers or tags");

    let pushed = repo.json(&cache, &["push", p(&ws.join("s1.cow")), &repo.url(), "--tag", "v1", "--chain", "--json"]);
    let layers = pushed["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2, "{pushed}");
    assert_eq!(layers[0]["kind"], "raw");
    assert_eq!(layers[1]["kind"], "cowdisk");
    assert!(layers.iter().all(|l| l["new-manifest"] == true), "{pushed}");
    // The hole is not stored: 6 of the base's 8 MiB have content.
    assert_eq!(layers[0]["content-bytes"], 6 << 20, "{pushed}");

    let ls = repo.json(&cache, &["ls", &repo.url(), "--json"]);
    let listed = ls["layers"].as_array().expect("layers");
    assert_eq!(listed.len(), 2, "{ls}");
    let top = listed.iter().find(|l| l["kind"] == "cowdisk").expect("the cowdisk layer");
    let bottom = listed.iter().find(|l| l["kind"] == "raw").expect("the raw layer");
    assert_eq!(top["tags"], serde_json::json!(["v1"]), "{ls}");
    assert_eq!(top["parent"], bottom["digest"], "{ls}");
    assert_eq!(top["digest"], layers[1]["digest"]);

    // An overlay on the tag, on another "host" (an empty cache).
    let cache2 = ws.subdir("cache2");
    let top_cow = ws.join("top.cow");
    run(&mut repo.cow(&cache2, &["create", p(&top_cow), "--backing", &repo.layer("v1")]));
    let info = repo.json(&cache2, &["info", p(&top_cow), "--json"]);
    let chain = info["layers"].as_array().expect("layers");
    assert_eq!(chain.len(), 3, "{info}");
    assert!(chain[1]["path"].as_str().is_some_and(|s| s.starts_with("s3://")), "{info}");
    run(&mut repo.cow(&cache2, &["check", "--chain", p(&top_cow)]));
    let map = repo.json(&cache2, &["map", p(&top_cow), "--json"]);
    let depth1 = bytes_at_depth(&map, 1);
    // The layer's writes, to the 4K block.
    assert_eq!(depth1, (3 * CHUNK + CHUNK + 4096) as u64, "the remote cowdisk layer's extents in {map}");
    // Only the manifests are fetched (kept in the cache too), no chunk.
    assert!(du(&cache2) < CHUNK as u64, "create, info, check and map left {} bytes in the cache", du(&cache2));

    let server = repo.server(&cache2, &[p(&top_cow), "--socket", p(&ws.join("s.sock"))]);
    copy_out(&server, &ws.join("read.raw"));
    assert_files_equal(&ws.join("read.raw"), &ws.join("expected.raw").tap_write(&expected));
    // The overlay is writable and keeps its own writes.
    let mut c = client(&server);
    let mine = random_bytes(2 * CHUNK, 9);
    c.write(3 << 20, &mine).expect("write to the overlay");
    assert_bytes_eq(&c.read(3 << 20, mine.len() as u32).expect("read back"), &mine, "own write");
    c.flush().expect("flush");
    c.disconnect().ok();
    server.stop();
    expected[3 << 20..(3 << 20) + mine.len()].copy_from_slice(&mine);
    let fetched = du(&cache2);
    assert!(fetched > 0 && fetched <= 8 << 20, "the cache holds {fetched} bytes after reading everything once");

    // Flatten to a raw file gives the merged device.
    run(&mut repo.cow(&cache2, &["flatten", p(&top_cow), "--output", p(&ws.join("flat.raw")), "--format", "raw"]));
    assert_files_equal(&ws.join("flat.raw"), &ws.join("expected2.raw").tap_write(&expected));

    // pull on a third host fills its cache with every chunk of both layers.
    let cache3 = ws.subdir("cache3");
    let out = run(&mut repo.cow(&cache3, &["pull", p(&top_cow)]));
    assert!(stdout_of(&out).contains("2 remote layers"), "{}", stdout_of(&out));
    // Both layers' content: the base's 6 MiB and the snapshot's written blocks.
    assert!(du(&cache3) >= (6 << 20) + (4 * CHUNK + 4096) as u64, "pull left {} bytes in the cache", du(&cache3));
}

/// Writing a file and returning its path, in one expression.
trait TapWrite {
    fn tap_write(self, data: &[u8]) -> PathBuf;
}

impl TapWrite for PathBuf {
    fn tap_write(self, data: &[u8]) -> PathBuf {
        std::fs::write(&self, data).expect("write");
        self
    }
}

#[test]
fn pushing_again_uploads_nothing_and_shared_chunks_are_stored_once() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let a = make_base(&ws.join("a.raw"), 4, 11);
    let first = repo.json(&cache, &["push", p(&ws.join("a.raw")), &repo.url(), "--json"]);
    assert_eq!(first["layers"][0]["uploaded-chunks"], first["layers"][0]["chunks"], "{first}");
    let packs = repo.keys("packs");

    let again = repo.json(&cache, &["push", p(&ws.join("a.raw")), &repo.url(), "--json"]);
    assert_eq!(again["layers"][0]["uploaded-chunks"], 0, "{again}");
    assert_eq!(again["layers"][0]["uploaded-bytes"], 0, "{again}");
    assert_eq!(again["layers"][0]["new-manifest"], false, "{again}");
    assert_eq!(repo.keys("packs"), packs, "a second push changed the packs");

    // Another image sharing all but its first 1 MiB with the first: only 16 chunks go up.
    let mut b = a.clone();
    b[..1 << 20].copy_from_slice(&random_bytes(1 << 20, 12));
    std::fs::write(ws.join("b.raw"), &b).expect("write b");
    let second = repo.json(&cache, &["push", p(&ws.join("b.raw")), &repo.url(), "--json"]);
    assert_eq!(second["layers"][0]["uploaded-chunks"], 16, "{second}");
    assert_eq!(repo.json(&cache, &["ls", &repo.url(), "--json"])["layers"].as_array().map(Vec::len), Some(2));
}

/// A pack index whose pack is gone or cut short (deleted by hand, or by a tool that went
/// wrong) is not trusted: a push uploads those chunks again, and the layer it makes reads
/// right. Trusted, the new layer named chunks no read could get.
#[test]
fn a_push_does_not_count_on_chunks_of_a_pack_that_is_gone_or_cut_short() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let data = repo.push_base(&ws, &cache, random_bytes(4 << 20, 61), &["--pack-size", "1M"]);
    let packs: Vec<String> = repo.keys("packs").into_iter().filter(|k| !k.ends_with(".idx")).collect();
    assert!(packs.len() >= 4, "{packs:?}");
    repo.delete(&packs[0]);
    let cut = repo.get(&packs[1]);
    repo.put(&packs[1], cut[..cut.len() / 2].to_vec());

    // The same content again, under another tag: its chunks are all "held", as far as the
    // indexes alone say.
    let again = ws.join("again.raw");
    std::fs::write(&again, &data).expect("write again.raw");
    let out = repo.json(&cache, &["push", p(&again), &repo.url(), "--tag", "again", "--json"]);
    assert_eq!(out["layers"][0]["uploaded-chunks"], 32, "the chunks of the two damaged packs: {out}");
    let top = ws.join("top.cow");
    run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("again")]));
    let server = repo.server(&cache, &[p(&top), "--socket", p(&ws.join("s.sock"))]);
    for (i, r) in read_chunks(&server, data.len()).iter().enumerate() {
        let b = r.as_ref().unwrap_or_else(|e| panic!("chunk {i}: {e}"));
        assert_bytes_eq(b, &data[i * CHUNK..(i + 1) * CHUNK], &format!("chunk {i}"));
    }
    server.stop();
}

#[test]
fn a_push_killed_half_way_is_invisible_and_a_rerun_uploads_only_what_is_missing() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let data = random_bytes(48 << 20, 21);
    std::fs::write(ws.join("big.raw"), &data).expect("write");
    // 1 MiB packs, one at a time: 48 uploads, so the kill lands in the middle.
    let mut child = repo
        .cow(&cache, &["push", p(&ws.join("big.raw")), &repo.url(), "--pack-size", "1M", "--parallel", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn push");
    let t = Instant::now();
    while repo.keys("packs").len() < 12 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the push finished before it was killed; make it bigger");
    let half = repo.keys("packs").len();
    assert!(half >= 12, "only {half} objects after {:?}", t.elapsed());
    assert!(repo.keys("layers").is_empty(), "a killed push left a manifest: {:?}", repo.keys("layers"));
    let ls = repo.json(&cache, &["ls", &repo.url(), "--json"]);
    assert_eq!(ls["layers"].as_array().map(Vec::len), Some(0), "{ls}");

    let rerun = repo.json(&cache, &["push", p(&ws.join("big.raw")), &repo.url(), "--pack-size", "1M", "--json"]);
    let l = &rerun["layers"][0];
    let (up, all) = (l["uploaded-chunks"].as_u64().unwrap_or(0), l["chunks"].as_u64().unwrap_or(0));
    assert_eq!(all, 768, "{rerun}");
    assert!(up > 0 && up + 5 * 16 <= all, "the rerun uploaded {up} of {all} chunks after {half} pack objects");

    // What is there reads back as the file.
    let top = ws.join("top.cow");
    let digest = l["digest"].as_str().expect("digest");
    run(&mut repo.cow(&ws.subdir("c2"), &["create", p(&top), "--backing", &repo.layer(digest)]));
    run(&mut repo.cow(&ws.subdir("c2"), &["flatten", p(&top), "--output", p(&ws.join("out.raw")), "--format", "raw"]));
    assert_files_equal(&ws.join("out.raw"), &ws.join("big.raw"));
}

#[test]
fn rm_refuses_what_is_named_and_gc_deletes_only_after_its_grace() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    make_base(&ws.join("base.raw"), 2, 31);
    run(Command::new(cowdisk_bin()).args(["create", p(&ws.join("l.cow")), "--backing", p(&ws.join("base.raw"))]));
    let mut scratch = vec![0u8; 2 << 20];
    write_into(&ws.join("l.cow"), &ws.join("w.sock"), &[(0, random_bytes(CHUNK, 32))], &mut scratch);
    run(Command::new(cowdisk_bin()).args(["snapshot", p(&ws.join("l.cow")), p(&ws.join("s.cow"))]));
    let pushed = repo.json(&cache, &["push", p(&ws.join("s.cow")), &repo.url(), "--chain", "--tag", "s", "--json"]);
    let base_d = pushed["layers"][0]["digest"].as_str().expect("digest").to_string();
    let top_d = pushed["layers"][1]["digest"].as_str().expect("digest").to_string();
    run(&mut repo.cow(&cache, &["push", p(&ws.join("base.raw")), &repo.url(), "--tag", "b"]));
    let base_url = format!("{}/layers/{base_d}", repo.url());
    let top_url = format!("{}/layers/{top_d}", repo.url());

    let err = failure(&repo.cow(&cache, &["rm", &base_url]).output().expect("run"));
    assert!(err.contains("tag b"), "{err}");
    run(&mut repo.cow(&cache, &["rm", &repo.layer("b")]));
    let err = failure(&repo.cow(&cache, &["rm", &base_url]).output().expect("run"));
    assert!(err.contains(&top_d[..12]), "the refusal should name the child layer: {err}");
    let err = failure(&repo.cow(&cache, &["rm", &repo.layer("nosuch")]).output().expect("run"));
    assert!(err.contains("nosuch"), "{err}");
    run(&mut repo.cow(&cache, &["rm", &repo.layer("s")]));
    run(&mut repo.cow(&cache, &["rm", &top_url]));
    let packs = repo.keys("packs").len();
    assert!(packs >= 2, "{packs} pack objects");

    // While the base is still there, gc leaves its packs alone but marks the top's.
    let gc = repo.json(&cache, &["gc", &repo.url(), "--grace", "0", "--json"]);
    assert!(gc["marked"].as_u64() >= Some(1), "{gc}");
    assert_eq!(gc["deleted"], 0, "a first pass deleted: {gc}");
    run(&mut repo.cow(&cache, &["rm", &base_url]));
    assert!(repo.keys("layers").is_empty());

    // A long grace period keeps marked packs; the unmarked base packs get marked now.
    let gc = repo.json(&cache, &["gc", &repo.url(), "--grace", "1h", "--json"]);
    assert_eq!(gc["deleted"], 0, "{gc}");
    assert!(gc["waiting"].as_u64() >= Some(1), "{gc}");
    let dry = repo.json(&cache, &["gc", &repo.url(), "--grace", "0", "--dry-run", "--json"]);
    assert_eq!(repo.keys("packs").len(), packs, "a dry run deleted: {dry}");

    // A push of the base after the mark passes over the marked packs (they may be going) and
    // writes its chunks into a pack of its own: the marked ones go, the layer stays whole.
    let before: Vec<String> = repo.keys("packs");
    let again = repo.json(&cache, &["push", p(&ws.join("base.raw")), &repo.url(), "--tag", "b", "--json"]);
    let again_url = again["layers"][0]["url"].as_str().expect("url").to_string();
    let new_packs: Vec<String> = repo.keys("packs").into_iter().filter(|k| !before.contains(k)).collect();
    assert_eq!(new_packs.len(), 2, "the push should add one pack and its index: {new_packs:?}");
    let gc = repo.json(&cache, &["gc", &repo.url(), "--grace", "0", "--json"]);
    assert!(gc["deleted"].as_u64() >= Some(2) && gc["referenced"] == 1, "{gc}");
    assert!(new_packs.iter().all(|k| repo.keys("packs").contains(k)), "gc deleted the new pack");
    let top = ws.join("again.cow");
    run(&mut repo.cow(&ws.subdir("c2"), &["create", p(&top), "--backing", &repo.layer("b")]));
    run(&mut repo.cow(&ws.subdir("c2"), &["flatten", p(&top), "--output", p(&ws.join("out.raw")), "--format", "raw"]));
    assert_files_equal(&ws.join("out.raw"), &ws.join("base.raw"));

    run(&mut repo.cow(&cache, &["rm", &repo.layer("b")]));
    run(&mut repo.cow(&cache, &["rm", &again_url]));
    repo.json(&cache, &["gc", &repo.url(), "--grace", "0", "--json"]);
    let gc = repo.json(&cache, &["gc", &repo.url(), "--grace", "0", "--json"]);
    assert_eq!(repo.keys("packs"), Vec::<String>::new(), "packs left after two passes: {gc}");
    let ls = repo.json(&cache, &["ls", &repo.url(), "--json"]);
    assert_eq!(ls["packs"], 0, "{ls}");
}

#[test]
fn bad_store_settings_and_missing_layers_fail_with_one_line() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    repo.push_base(&ws, &cache, holed(1, 41), &[]);
    let top = ws.join("top.cow");
    let t = Instant::now();
    let err =
        failure(&repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("nosuch")]).output().expect("run"));
    assert!(err.contains("nosuch") && err.contains("no such tag or layer"), "{err}");
    assert!(!top.exists(), "a failed create left {}", top.display());
    let err = failure(
        &repo.cow(&cache, &["create", p(&top), "--backing", "s3://no-such-bucket-cowdisk/x/b"]).output().expect("run"),
    );
    assert!(err.contains("no-such-bucket-cowdisk"), "{err}");
    let err = failure(
        &repo
            .cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")])
            .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-000000000000000000000000")
            .output()
            .expect("run"),
    );
    assert!(err.contains("b"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "the failures took {:?}", t.elapsed());

    // An overlay whose remote layer is removed after it was made: serve says so at start.
    run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
    let ls = repo.json(&cache, &["ls", &repo.url(), "--json"]);
    let url = ls["layers"][0]["url"].as_str().expect("url").to_string();
    run(&mut repo.cow(&cache, &["rm", &repo.layer("b")]));
    run(&mut repo.cow(&cache, &["rm", &url]));
    let fresh = ws.subdir("fresh-cache");
    let err =
        failure(&repo.cow(&fresh, &["serve", p(&top), "--socket", p(&ws.join("s.sock"))]).output().expect("run serve"));
    assert!(err.contains("no such layer"), "{err}");
}

/// Reads every chunk of the export one by one: Ok(bytes) or the error.
fn read_chunks(server: &Server, size: usize) -> Vec<Result<Vec<u8>, String>> {
    let mut c = client(server);
    (0..size / CHUNK).map(|i| c.read((i * CHUNK) as u64, CHUNK as u32).map_err(|e| e.to_string())).collect()
}

#[test]
fn corrupt_truncated_or_replaced_objects_are_never_served() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let data = repo.push_base(&ws, &cache, random_bytes(4 << 20, 51), &["--pack-size", "1M"]);
    let packs: Vec<String> = repo.keys("packs").into_iter().filter(|k| !k.ends_with(".idx")).collect();
    assert!(packs.len() >= 4, "{packs:?}");
    let originals: Vec<Vec<u8>> = packs[..3].iter().map(|k| repo.get(k)).collect();
    // One byte flipped, cut in half, replaced by another object's bytes.
    let mut flipped = originals[0].clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    repo.put(&packs[0], flipped);
    repo.put(&packs[1], originals[1][..originals[1].len() / 2].to_vec());
    repo.put(&packs[2], originals[0].clone());

    let top = ws.join("top.cow");
    run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
    let server = repo.server(&cache, &[p(&top), "--socket", p(&ws.join("s.sock"))]);
    let got = read_chunks(&server, data.len());
    let mut failed = Vec::new();
    for (i, r) in got.iter().enumerate() {
        match r {
            Ok(b) => assert_bytes_eq(b, &data[i * CHUNK..(i + 1) * CHUNK], &format!("chunk {i}")),
            Err(e) => {
                assert!(e.contains("EIO"), "chunk {i}: {e}");
                failed.push(i)
            }
        }
    }
    // A pack holds 16 records of 64 KiB and ends with 16 bytes no record covers, read by
    // range: the flipped byte spoils one record; the cut at the middle the 8 past it; the
    // replacement all 16 of its pack. Exactly those fail, however the reads happen to be
    // grouped into GETs (one that runs past the cut still brings the records before it);
    // every other read is right.
    assert_eq!(originals.iter().map(Vec::len).collect::<Vec<_>>(), [16 * CHUNK + 16; 3]);
    assert_eq!(failed.len(), 1 + 8 + 16, "chunks that failed: {failed:?}");

    // Repaired in the store, they read right without a restart: nothing bad was cached.
    for (k, o) in packs[..3].iter().zip(&originals) {
        repo.put(k, o.clone());
    }
    let again = read_chunks(&server, data.len());
    for (i, r) in again.iter().enumerate() {
        let b = r.as_ref().unwrap_or_else(|e| panic!("chunk {i} after the repair: {e}"));
        assert_bytes_eq(b, &data[i * CHUNK..(i + 1) * CHUNK], &format!("chunk {i} after the repair"));
    }
    server.stop();
}

/// `n` servers on one host (one cache, `cache`), each serving an overlay of its own on layer
/// `b`, with `extra` options.
fn overlay_servers(repo: &Repo, ws: &TempDir, cache: &Path, n: usize, extra: &[&str]) -> Vec<Server> {
    (0..n)
        .map(|i| {
            let top = ws.join(format!("top{i}.cow"));
            run(&mut repo.cow(cache, &["create", p(&top), "--backing", &repo.layer("b")]));
            let sock = ws.join(format!("s{i}.sock"));
            let mut args = vec![p(&top), "--socket", p(&sock)];
            args.extend_from_slice(extra);
            repo.server(cache, &args)
        })
        .collect()
}

/// Copies every server's export out at once (to `ws/readI.raw`), within scope `sc`.
fn copy_all_at_once<'s>(sc: &'s std::thread::Scope<'s, '_>, servers: &'s [Server], ws: &'s TempDir) {
    let copies: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| sc.spawn(move || copy_out(server, &ws.join(format!("read{i}.raw")))))
        .collect();
    for c in copies {
        c.join().expect("copy");
    }
}

#[test]
fn the_cache_stays_within_its_bound_while_two_processes_read_more_than_it_holds() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    repo.push_base(&ws, &cache, random_bytes(24 << 20, 61), &[]);
    // Two servers on one host (one cache), each reading an overlay of its own at once: the
    // bound is the cache's, not each process's.
    let reader = ws.subdir("reader-cache");
    let bound: u64 = 4 << 20;
    let servers = overlay_servers(&repo, &ws, &reader, 2, &["--cache-size", "4M"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let most = std::thread::scope(|sc| {
        let watcher = sc.spawn(|| {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(cached_bytes(&reader));
                std::thread::sleep(Duration::from_millis(5));
            }
            most.max(cached_bytes(&reader))
        });
        copy_all_at_once(sc, &servers, &ws);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().expect("watcher")
    });
    for server in servers {
        server.stop();
    }
    for i in 0..2 {
        assert_files_equal(&ws.join(format!("read{i}.raw")), &ws.join("base.raw"));
    }
    // Never past the bound, watched as allocated bytes every 5 ms (64 KiB of slack for the
    // `.usage` file's block). With a count per process it reached 5.1 to 7.0 MiB here.
    assert!(most <= bound + (64 << 10), "the cache reached {most} bytes with a bound of {bound}");
    let kept = cached_bytes(&reader);
    assert!(kept <= bound, "the cache holds {kept} bytes after the reads, bound {bound}");
    assert!(kept >= bound / 2, "the cache kept only {kept} bytes");
}

/// The bytes a stopped server said it fetched from object stores (it says nothing when it
/// fetched nothing).
fn fetched_bytes(log: &str) -> u64 {
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
fn cached_entries(dir: &Path) -> Vec<usize> {
    let Ok(rd) = std::fs::read_dir(dir.join("layers")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "index")) {
        let b = std::fs::read(e.path()).unwrap_or_default();
        let records = b.get(64..).unwrap_or_default().chunks_exact(32);
        out.extend(records.enumerate().filter(|(_, r)| r[..8] != [0u8; 8]).map(|(i, _)| i));
    }
    out
}

#[test]
fn a_warm_sequential_read_fetches_nothing_beyond_what_it_reads() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("cache"), random_bytes(8 << 20, 71), &[]);
    let cache = ws.subdir("reader-cache");
    // A first process reads the first 2 MiB in order: it fetches them, and ahead of them.
    let read_in_order = |server: &Server, chunks: usize| {
        let mut c = client(server);
        for i in 0..chunks {
            let got = c.read((i * CHUNK) as u64, CHUNK as u32).expect("read");
            assert_bytes_eq(&got, &data[i * CHUNK..(i + 1) * CHUNK], &format!("chunk {i}"));
        }
        c.disconnect().ok();
    };
    let mut lazy = overlay_servers(&repo, &ws, &cache, 1, &["--no-prefetch"]).remove(0);
    read_in_order(&lazy, 32);
    lazy.daemon().terminate(STOP_TIMEOUT);
    assert!(fetched_bytes(&lazy.log()) >= 2 << 20);
    let held = cached_entries(&cache);
    let prefix = held.iter().enumerate().take_while(|&(k, &i)| k == i).count();
    assert!(prefix >= 32, "the first reader's chunks are cached: {held:?}");
    // A second process reads everything the cache holds from the start, in order: all of it
    // is there, so it makes no request (reading ahead past it would fetch chunks nobody read).
    let ws2 = TempDir::for_test();
    let mut warm = overlay_servers(&repo, &ws2, &cache, 1, &["--no-prefetch"]).remove(0);
    read_in_order(&warm, prefix);
    warm.daemon().terminate(STOP_TIMEOUT);
    assert_eq!(fetched_bytes(&warm.log()), 0, "a warm read of {prefix} cached chunks fetched");
    assert_eq!(cached_entries(&cache), held);
}

#[test]
fn two_processes_reading_one_layer_at_once_fetch_it_once() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let layer_bytes = 24u64 << 20;
    repo.push_base(&ws, &ws.subdir("cache"), random_bytes(layer_bytes as usize, 67), &[]);
    let reader = ws.subdir("reader-cache");
    let servers = overlay_servers(&repo, &ws, &reader, 2, &[]);
    std::thread::scope(|sc| copy_all_at_once(sc, &servers, &ws));
    let mut fetched = 0;
    for mut server in servers {
        server.daemon().terminate(STOP_TIMEOUT);
        fetched += fetched_bytes(&server.log());
    }
    for i in 0..2 {
        assert_files_equal(&ws.join(format!("read{i}.raw")), &ws.join("base.raw"));
    }
    // Random data does not compress: the layer is about 24 MiB in the store. Each process
    // fetching for itself fetched most of it twice.
    assert!(fetched <= layer_bytes * 5 / 4, "two readers fetched {fetched} bytes of a {layer_bytes}-byte layer");
}

/// Breaks the cache at `cache` for every process using it: a directory where its lock file
/// goes, so that nothing can lock it (publish, a layer's first open) from now on.
fn break_cache_lock(cache: &Path) {
    let lock = cache.join(".lock");
    if lock.exists() {
        std::fs::remove_file(&lock).expect("remove the cache's lock file");
    }
    std::fs::create_dir(&lock).expect("a directory where the cache's lock file goes");
}

/// A process whose fills cannot be published (its cache directory broken: here the lock
/// file replaced by a directory) does not hold up another process reading the same chunks:
/// its claims end with the failed publish. Before, the other process waited out the 30 s
/// claim limit for every chunk.
#[test]
fn a_failing_publish_does_not_hold_another_process_reading_the_same_chunks() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 4, 81), &[]);
    let cache = ws.subdir("reader-cache");
    let servers = overlay_servers(&repo, &ws, &cache, 2, &["--no-prefetch"]);
    // Each server reads the last chunk, so both have the layer open in the cache; from then
    // on no publish can lock the cache.
    let (mut first, mut second) = (client(&servers[0]), client(&servers[1]));
    for c in [&mut first, &mut second] {
        assert_bytes_eq(&c.read((3 * CHUNK) as u64, CHUNK as u32).expect("read"), &data[3 * CHUNK..], "chunk 3");
    }
    std::thread::sleep(Duration::from_millis(200));
    break_cache_lock(&cache);
    for i in 0..3 {
        let got = first.read((i * CHUNK) as u64, CHUNK as u32).expect("first reader");
        assert_bytes_eq(&got, &data[i * CHUNK..(i + 1) * CHUNK], &format!("first reader, chunk {i}"));
    }
    // The first server's publisher has run and failed by now (it runs within 20 ms).
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    for i in 0..3 {
        let got = second.read((i * CHUNK) as u64, CHUNK as u32).expect("second reader");
        assert_bytes_eq(&got, &data[i * CHUNK..(i + 1) * CHUNK], &format!("second reader, chunk {i}"));
    }
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(15), "the second reader waited {waited:?} for claims of a failed publish");
    drop((first, second));
    for s in servers {
        s.stop();
    }
}

/// A cache that cannot take a layer (its directory broken before the first read: here the lock
/// file replaced by a directory) does not make the layer unreadable: reads go to the store,
/// uncached, and the server says so as it happens and when it stops (in its `--log` file,
/// where its messages after startup go). Before, every read failed with EIO. Once the
/// directory is mended, the next try (10 s on) takes the layer again.
#[test]
fn a_layer_reads_uncached_when_the_cache_cannot_take_it_and_cached_once_it_is_mended() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 8, 85), &[]);
    let cache = ws.subdir("reader-cache");
    break_cache_lock(&cache);
    let log = ws.join("server.log");
    let mut server = overlay_servers(&repo, &ws, &cache, 1, &["--log", p(&log)]).remove(0);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut c = client(&server);
    for round in 0..2 {
        assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &data, &format!("round {round}"));
    }
    c.write(1000, &[7u8; 5000]).expect("a write to the overlay");
    let mut want = data.clone();
    want[1000..6000].fill(7);
    assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &want, "after the write");
    let told = "the cache cannot take remote layers";
    assert_eq!(said().matches(told).count(), 1, "told once, while serving:\n{}", said());
    assert!(!cache.join("layers").exists() || du(&cache.join("layers")) == 0, "the broken cache kept chunks");

    std::fs::remove_dir(cache.join(".lock")).expect("mend the cache directory");
    std::thread::sleep(Duration::from_millis(10_500));
    assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &want, "after the mend");
    assert!(
        wait_until(Duration::from_secs(10), || cache.join("layers").exists() && du(&cache.join("layers")) > 0),
        "the mended cache keeps the chunks read"
    );
    assert!(said().contains("the cache takes remote layers again"), "{}", said());
    drop(c);
    server.daemon().terminate(STOP_TIMEOUT);
    assert!(said().contains("went to the store uncached: the cache failed"), "{}", said());
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|k| k.trim().parse::<u64>().ok()).expect("VmRSS") << 10
}

/// Fills that cannot be published (the cache directory broken, as above) are not held for
/// another try: reading a whole 48 MiB layer through such a cache grows the server by what
/// its reads need (16 MiB measured), not by the layer. Held, they piled up: 60 MiB measured.
#[test]
fn fills_a_broken_cache_cannot_keep_do_not_pile_up_in_memory() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let size = 48 << 20;
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(size, 83), &[]);
    let cache = ws.subdir("reader-cache");
    let top = ws.join("top.cow");
    run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
    // A bound of 8 MiB: fills are published once 1 MiB of them wait.
    let sock = ws.join("s.sock");
    let args = [p(&top), "--socket", p(&sock), "--no-prefetch"];
    let mut server = repo.server_env(&cache, &args, &[("COWDISK_CACHE_SIZE", "8M")]);
    let mut c = client(&server);
    assert_bytes_eq(&c.read(0, CHUNK as u32).expect("read"), &data[..CHUNK], "chunk 0");
    std::thread::sleep(Duration::from_millis(200));
    break_cache_lock(&cache);
    let pid = server.daemon().pid();
    let before = rss(pid);
    for off in (0..size).step_by(4 << 20) {
        let got = c.read(off as u64, 4 << 20).expect("read");
        assert_bytes_eq(&got, &data[off..off + (4 << 20)], &format!("at {off}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let grown = rss(pid).saturating_sub(before);
    assert!(grown < 32 << 20, "reading a {size}-byte layer through a broken cache grew the server by {grown} bytes");
    drop(c);
    server.stop();
}

#[test]
fn two_hosts_on_one_layer_each_read_their_own_writes() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), holed(4, 71), &[]);
    let hosts: Vec<(PathBuf, PathBuf, Vec<u8>)> = (0..2)
        .map(|h| {
            let cache = ws.subdir(format!("host{h}/cache"));
            let top = ws.join(format!("host{h}/top.cow"));
            run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
            (cache, top, random_bytes(3 * CHUNK, 72 + h))
        })
        .collect();
    let servers: Vec<Server> = hosts
        .iter()
        .enumerate()
        .map(|(h, (cache, top, _))| repo.server(cache, &[p(top), "--socket", p(&ws.join(format!("s{h}.sock")))]))
        .collect();
    let off = (1 << 20) + 1000;
    for (s, (_, _, mine)) in servers.iter().zip(&hosts) {
        client(s).write(off, mine).expect("write");
    }
    for (h, (s, (cache, _, mine))) in servers.iter().zip(&hosts).enumerate() {
        let mut c = client(s);
        assert_bytes_eq(&c.read(off, mine.len() as u32).expect("read"), mine, &format!("host {h}'s own write"));
        let whole = c.read(0, data.len() as u32).expect("read all");
        let mut want = data.clone();
        want[off as usize..off as usize + mine.len()].copy_from_slice(mine);
        assert_bytes_eq(&whole, &want, &format!("host {h}'s device"));
        assert!(du(cache) > 0, "host {h} fetched nothing into its cache");
    }
    for s in servers {
        s.stop();
    }
}

#[test]
fn a_stopped_gateway_gives_eio_then_reads_resume_without_a_restart() {
    let Some(ceph) = Ceph::start() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(ceph.s3());
    let cache = ws.subdir("cache");
    let data = repo.push_base(&ws, &cache, random_bytes(4 << 20, 81), &[]);
    let top = ws.join("top.cow");
    let host = ws.subdir("host");
    run(&mut repo.cow(&host, &["create", p(&top), "--backing", &repo.layer("b")]));
    let env: Vec<(&str, String)> = repo
        .s3
        .env()
        .into_iter()
        .chain([
            ("COWDISK_CACHE_DIR", host.display().to_string()),
            ("COWDISK_S3_RETRIES", "2".into()),
            ("COWDISK_S3_RETRY_TIMEOUT", "4".into()),
            ("COWDISK_S3_TIMEOUT", "2".into()),
        ])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with_env(&[p(&top), "--socket", p(&ws.join("s.sock"))], &env);
    let mut c = client(&server);
    let half = data.len() / 2;
    assert_bytes_eq(&c.read(0, half as u32).expect("read the first half"), &data[..half], "first half");

    let said = ceph.rgw_stop();
    assert!(said.contains("stopped rgw"), "{said}");
    // Far from the first half: read-ahead has not fetched it.
    let far = data.len() - CHUNK;
    let t = Instant::now();
    let r = c.read(far as u64, CHUNK as u32);
    let e = r.expect_err("a read of an uncached chunk with the gateway stopped succeeded");
    assert!(e.to_string().contains("EIO"), "the client saw {e}");
    assert!(t.elapsed() < Duration::from_secs(20), "the failed read took {:?}", t.elapsed());
    // Cached and local data keep being served, and the overlay takes writes.
    assert_bytes_eq(&c.read(0, half as u32).expect("cached read"), &data[..half], "cached half, gateway down");
    let mine = random_bytes(CHUNK, 82);
    c.write(0, &mine).expect("write with the gateway down");
    assert_bytes_eq(&c.read(0, CHUNK as u32).expect("read back"), &mine, "own write, gateway down");
    assert!(server.is_running(), "the server died with the gateway");

    let said = ceph.rgw_start();
    assert!(said.contains("S3 answers"), "{said}");
    let rest = c.read(half as u64, half as u32).expect("the second half once the gateway is back");
    assert_bytes_eq(&rest, &data[half..], "second half after the outage");
    c.disconnect().ok();
    server.stop();
}

/// How many chunks a cache directory holds (see [`cached_entries`]).
fn cached_chunks(dir: &Path) -> usize {
    cached_entries(dir).len()
}

#[test]
fn a_recorded_trace_is_stored_with_the_layer_and_fetched_first_by_the_next_server() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push"), random_bytes(8 << 20, 91), &[]);
    let out = repo.cow(&ws.subdir("push"), &["trace", "show", &repo.layer("b")]).output().expect("run");
    assert!(failure(&out).contains("no trace"));

    // A "boot" reads three chunks, out of order, on a server that records.
    let boot = [100u64, 7, 50];
    let host_a = ws.subdir("a");
    run(&mut repo.cow(&host_a, &["create", p(&ws.join("a.cow")), "--backing", &repo.layer("b")]));
    let ctl = ws.join("a-control.sock");
    let (top, sock) = (ws.join("a.cow"), ws.join("a.sock"));
    let server = repo.server(&host_a, &[p(&top), "--socket", p(&sock), "--record-trace", "--control", p(&ctl)]);
    let mut c = client(&server);
    let read = |c: &mut NbdClient<std::os::unix::net::UnixStream>, k: u64| {
        let got = c.read(k * CHUNK as u64, 4096).expect("read");
        assert_bytes_eq(&got, &data[k as usize * CHUNK..k as usize * CHUNK + 4096], &format!("chunk {k}"));
    };
    for &k in &boot[..2] {
        read(&mut c, k);
    }
    // `trace save` stores what was recorded so far while the server runs on and records on.
    let out = run(&mut repo.cow(&host_a, &["trace", "save", "--control", p(&ctl)]));
    assert!(stdout_of(&out).starts_with("saved a trace of 2 chunks as "), "{}", stdout_of(&out));
    let shown = repo.json(&host_a, &["trace", "show", &repo.layer("b"), "--json"]);
    assert_eq!(shown["chunks"], serde_json::json!(boot[..2]), "{shown}");
    read(&mut c, boot[2]);
    c.disconnect().ok();
    let log_before_stop = server.log();
    server.stop();
    assert!(!log_before_stop.contains("saved a trace"), "the server saved by itself before its stop");
    let shown = repo.json(&host_a, &["trace", "show", &repo.layer("b"), "--json"]);
    assert_eq!(shown["chunks"], serde_json::json!(boot), "the stop stores the whole trace: {shown}");

    // The next host's server fetches them before anyone asks; only them.
    let host_b = ws.subdir("b");
    run(&mut repo.cow(&host_b, &["create", p(&ws.join("b.cow")), "--backing", &repo.layer("b")]));
    let ctl_b = ws.join("b-control.sock");
    let server =
        repo.server(&host_b, &[p(&ws.join("b.cow")), "--socket", p(&ws.join("b.sock")), "--control", p(&ctl_b)]);
    let out = repo.cow(&host_b, &["trace", "save", "--control", p(&ctl_b)]).output().expect("run");
    assert!(failure(&out).contains("records no traces (start it with --record-trace)"), "{}", failure(&out));
    assert!(
        wait_until(Duration::from_secs(15), || cached_chunks(&host_b) >= boot.len()),
        "the traced chunks were not prefetched: {} in the cache",
        cached_chunks(&host_b)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cached_chunks(&host_b), boot.len(), "prefetch fetched more than the trace");
    server.stop();

    // --no-prefetch: nothing is fetched until read.
    let host_c = ws.subdir("c");
    run(&mut repo.cow(&host_c, &["create", p(&ws.join("c.cow")), "--backing", &repo.layer("b")]));
    let server = repo.server(&host_c, &[p(&ws.join("c.cow")), "--socket", p(&ws.join("c.sock")), "--no-prefetch"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(cached_chunks(&host_c), 0, "--no-prefetch fetched chunks");
    server.stop();

    run(&mut repo.cow(&host_c, &["trace", "rm", &repo.layer("b")]));
    assert!(repo.keys("traces").is_empty(), "{:?}", repo.keys("traces"));
}

#[test]
fn processes_share_one_cache_and_a_killed_reader_leaves_it_sound() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push"), random_bytes(16 << 20, 101), &[]);
    let shared = ws.subdir("host-cache");

    // A reader killed with -9 in the middle of filling the cache.
    run(&mut repo.cow(&shared, &["create", p(&ws.join("k.cow")), "--backing", &repo.layer("b")]));
    let mut killed = repo.server(&shared, &[p(&ws.join("k.cow")), "--socket", p(&ws.join("k.sock"))]);
    let uri = killed.uri("");
    let mut copy = tool("nbdcopy")
        .arg(&uri)
        .arg(ws.join("partial.raw"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nbdcopy");
    assert!(wait_until(Duration::from_secs(20), || cached_chunks(&shared) >= 40), "nothing was cached");
    killed.kill9();
    let _ = copy.wait();

    // Two servers of two overlays, one cache, reading everything at once.
    let servers: Vec<Server> = (0..2)
        .map(|i| {
            let top = ws.join(format!("t{i}.cow"));
            run(&mut repo.cow(&shared, &["create", p(&top), "--backing", &repo.layer("b")]));
            repo.server(&shared, &[p(&top), "--socket", p(&ws.join(format!("t{i}.sock")))])
        })
        .collect();
    let outs: Vec<PathBuf> = (0..2).map(|i| ws.join(format!("out{i}.raw"))).collect();
    std::thread::scope(|sc| {
        for (s, o) in servers.iter().zip(&outs) {
            sc.spawn(move || copy_out(s, o));
        }
    });
    for o in &outs {
        assert_files_equal(o, &ws.join("base.raw"));
    }
    // Each chunk is kept once, whoever fetched it.
    assert_eq!(cached_chunks(&shared), data.len() / CHUNK, "chunk files in the shared cache");
    for s in servers {
        s.stop();
    }
}

/// `cowdisk ARGS` with no store settings in its environment but `env`.
fn bare(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(cowdisk_bin());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("S3_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    c
}

#[test]
fn credentials_and_endpoint_come_from_the_aws_files_or_the_command_line() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    repo.push_base(&ws, &ws.subdir("c"), holed(1, 111), &[]);
    let creds = ws.join("credentials");
    let config = ws.join("config");
    std::fs::write(
        &creds,
        format!(
            "[other]\naws_access_key_id = NOPE\naws_secret_access_key = nope\n\n[cowdisk]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3.access_key, s3.secret_key
        ),
    )
    .expect("write credentials");
    std::fs::write(&config, format!("[profile cowdisk]\nregion = {}\nendpoint_url = {}\n", s3.region, s3.endpoint))
        .expect("write config");
    let files = |profile: &str| {
        vec![
            ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_PROFILE", profile.to_string()),
            ("COWDISK_CACHE_DIR", ws.join("c").display().to_string()),
        ]
    };
    let out = run(&mut bare(&["ls", &repo.url(), "--json"], &files("cowdisk")));
    let ls: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(ls["layers"][0]["tags"], serde_json::json!(["b"]), "{ls}");

    // The wrong profile: refused by the store, in one line.
    let err = failure(&bare(&["ls", &repo.url()], &files("other")).output().expect("run"));
    assert!(err.contains(&repo.url()), "{err}");

    // No endpoint in the files: --endpoint names it (credentials from the environment).
    let env = vec![
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("AWS_REGION", s3.region.clone()),
        ("AWS_CONFIG_FILE", ws.join("none").display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", ws.join("none").display().to_string()),
        ("COWDISK_CACHE_DIR", ws.join("c").display().to_string()),
    ];
    let out = run(&mut bare(&["ls", &repo.url(), "--endpoint", &s3.endpoint], &env));
    assert!(stdout_of(&out).contains("1 layers"), "{}", stdout_of(&out));
}

/// A layer written as a log-structured image (`create --log`, format-spec §5.10): FUA writes
/// whose blocks live where their log records were written, some still only in the log when
/// the server is killed. Reopened, frozen and pushed, it reads lazily as written: the store
/// holds the blocks, never the records' heads beside them.
#[test]
fn a_log_structured_layer_killed_with_records_in_its_log_pushes_and_reads_as_written() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let mut expected = make_base(&ws.join("base.raw"), 4, 131);
    let l1 = ws.join("l1.cow");
    run(Command::new(cowdisk_bin()).args(["create", "--log", p(&l1), "--backing", p(&ws.join("base.raw"))]));
    let mut server = Server::start(&[p(&l1), "--socket", p(&ws.join("w.sock"))]);
    let mut c = client(&server);
    let mut rng = XorShift::new(132);
    for i in 0..64u64 {
        // One aligned 4K block per FUA write, each in a chunk not written before: the kind
        // of write the log takes. Every eighth is followed by a partial rewrite and a flush.
        let off = (i * 7 % 512) * 8192 + (i % 2) * 4096;
        let data = random_bytes(4096, rng.next_u64());
        c.write_flags(off, &data, common::nbdclient::NBD_CMD_FLAG_FUA).expect("FUA write");
        expected[off as usize..off as usize + 4096].copy_from_slice(&data);
        if i % 8 == 5 {
            let part = random_bytes(1024, rng.next_u64());
            c.write(off + 1024, &part).expect("partial rewrite");
            c.flush().expect("flush");
            expected[off as usize + 1024..off as usize + 2048].copy_from_slice(&part);
        }
    }
    drop(c);
    server.kill9();

    run(Command::new(cowdisk_bin()).args(["snapshot", p(&l1), p(&ws.join("s1.cow"))]));
    let pushed = repo.json(&cache, &["push", p(&ws.join("s1.cow")), &repo.url(), "--tag", "log", "--chain", "--json"]);
    let layers = pushed["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2, "{pushed}");
    // One 8K chunk (a log-structured image's chunk size) for each of the 64 written blocks.
    assert_eq!((layers[1]["chunks"].as_u64(), layers[1]["content-bytes"].as_u64()), (Some(64), Some(64 * 8192)));

    let cache2 = ws.subdir("cache2");
    let top = ws.join("top.cow");
    run(&mut repo.cow(&cache2, &["create", p(&top), "--backing", &repo.layer("log")]));
    run(&mut repo.cow(&cache2, &["check", "--chain", p(&top)]));
    // The remote layer holds the written blocks and nothing else: a record's head, in the
    // other block of its chunk, is not data, and reads there fall through to the base.
    let map = repo.json(&cache2, &["map", p(&top), "--json"]);
    let depth1 = bytes_at_depth(&map, 1);
    assert_eq!(depth1, 64 * 4096, "the remote log-structured layer's extents in {map}");
    let server = repo.server(&cache2, &[p(&top), "--socket", p(&ws.join("s.sock"))]);
    copy_out(&server, &ws.join("read.raw"));
    server.stop();
    assert_files_equal(&ws.join("read.raw"), &ws.join("expected.raw").tap_write(&expected));
}

#[test]
fn an_overlay_on_a_remote_layer_flattens_in_place() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let data = repo.push_base(&ws, &cache, holed(2, 121), &[]);
    let top = ws.join("top.cow");
    run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
    run(&mut repo.cow(&cache, &["flatten", p(&top)]));
    let info = repo.json(&cache, &["info", p(&top), "--json"]);
    assert_eq!(info["layers"].as_array().map(Vec::len), Some(1), "{info}");
    // It no longer needs the store: removed there, it still reads as the base.
    run(&mut repo.cow(&cache, &["rm", &repo.layer("b")]));
    let url = repo.json(&cache, &["ls", &repo.url(), "--json"])["layers"][0]["url"].as_str().expect("url").to_string();
    run(&mut repo.cow(&cache, &["rm", &url]));
    run(&mut repo.cow(&cache, &["flatten", p(&top), "--output", p(&ws.join("out.raw")), "--format", "raw"]));
    assert_files_equal(&ws.join("out.raw"), &ws.join("want.raw").tap_write(&data));
}

#[test]
fn the_remote_demo_serves_an_overlay_on_the_pushed_base() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let dir = ws.subdir("demo");
    let mut demo = repo.cow(&ws.subdir("cache"), &["demo", "--dir", p(&dir), "--remote", &repo.url()]);
    demo.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = demo.spawn().expect("spawn demo");
    let sock = dir.join("nbd.sock");
    let up = wait_until(Duration::from_secs(60), || sock.exists());
    if up {
        run(tool("nbdcopy").arg(unix_uri(&sock, "overlay")).arg(ws.join("read.raw")));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("wait demo");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(up, "the demo did not serve: {said}");
    assert!(out.status.success(), "the demo exited with {}: {said}", out.status);
    assert!(said.contains("pushed the base to"), "{said}");
    assert_files_equal(&ws.join("read.raw"), &dir.join("base.raw"));
    let info = repo.json(&ws.join("cache"), &["info", p(&dir.join("remote-overlay.cow")), "--json"]);
    assert!(info["layers"][1]["path"].as_str().is_some_and(|s| s.starts_with("s3://")), "{info}");
}

/// An endpoint with credentials in it is refused before anything is sent, and the secret is
/// printed nowhere (the store client's errors name the URL they failed on).
#[test]
fn an_endpoint_with_credentials_in_it_is_refused_without_printing_them() {
    let out = Command::new(cowdisk_bin())
        .args(["ls", "s3://bucket/repo", "--endpoint", "http://user:SECRETPW@127.0.0.1:1"])
        .output()
        .expect("run cowdisk");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("credentials"), "{stderr}");
    assert!(!stdout.contains("SECRETPW") && !stderr.contains("SECRETPW"), "{stdout}{stderr}");
}
