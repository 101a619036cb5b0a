//! Removing layers and collecting garbage, through the `cowdisk` binary against a real Ceph RGW.
//!
//! A repository whose prefix the store's keys spell percent-encoded (`~`, a non-ASCII
//! letter): a review found every listing of such a repository empty to cowdisk, so `rm`
//! deleted a layer a tag named, `ls` showed nothing and every push uploaded everything again.
//! Objects under `packs/` that are no packs, which gc must leave alone.
//!
//! Garbage collection racing a push, with
//! a proxy in front of the store that holds back one answer: the listing of manifests. A pass whose
//! listing is slow must not age a mark past a manifest that listing missed (format-spec §9.7:
//! the pass reads the store's clock before it lists). A review found gc reading the clock after
//! the listing and deleting a pack a new manifest used: that layer could no longer be read.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::s3::{runtime, s3, test_prefix, S3};
use common::*;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{json, Value};

/// A TCP proxy to `target` that holds back the answer to each request containing every one of
/// `needles` (in its first bytes) by `delay`, and says when it has seen one. The request itself
/// goes through at once, so the store answers it as things stand then; only the client learns
/// of that answer late. HTTP/1.1 clients (object_store's) do not pipeline, so the next bytes
/// from the store after such a request are its answer.
struct SlowAnswers {
    addr: SocketAddr,
    seen: Arc<AtomicBool>,
}

impl SlowAnswers {
    fn start(target: SocketAddr, needles: &'static [&'static str], delay: Duration) -> SlowAnswers {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seen = Arc::new(AtomicBool::new(false));
        let seen2 = seen.clone();
        // Serves until the test process exits.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(target)) else { continue };
                let hold = Arc::new(AtomicBool::new(false));
                let (c2, s2, hold2, seen) = (client.try_clone(), server.try_clone(), hold.clone(), seen2.clone());
                let (Ok(c2), Ok(s2)) = (c2, s2) else { continue };
                std::thread::spawn(move || {
                    pump(client, server, |buf| {
                        let text = String::from_utf8_lossy(&buf[..buf.len().min(2048)]);
                        if needles.iter().all(|n| text.contains(n)) {
                            hold.store(true, Ordering::SeqCst);
                            seen.store(true, Ordering::SeqCst);
                        }
                    })
                });
                std::thread::spawn(move || {
                    pump(s2, c2, |_| {
                        if hold2.swap(false, Ordering::SeqCst) {
                            std::thread::sleep(delay);
                        }
                    })
                });
            }
        });
        SlowAnswers { addr, seen }
    }
}

/// Copies `from` to `to` until either side closes, calling `look` on each read before it is
/// passed on.
fn pump(mut from: TcpStream, mut to: TcpStream, look: impl Fn(&[u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        look(&buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn cow(s3: &S3, cache: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut c = Command::new(cowdisk_bin());
    c.args(args).env("COWDISK_CACHE_DIR", cache).envs(s3.env());
    c.env("S3_ENDPOINT", endpoint).env("AWS_ENDPOINT_URL", endpoint);
    c
}

fn json(c: &mut Command) -> Value {
    let out = run(c);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {}", stdout_of(&out)))
}

/// A test's workspace, its cache, a repository prefix of its own and that repository's URL,
/// and `ws/base.raw`, 1 MiB of random data from `seed`, to push.
fn with_base(s3: &S3, seed: u64) -> (TempDir, std::path::PathBuf, String, String, Vec<u8>) {
    let ws = TempDir::for_test();
    let cache = ws.subdir("cache");
    let prefix = test_prefix();
    let url = format!("s3://{}/{prefix}", s3.bucket);
    let data = random_bytes(1 << 20, seed);
    std::fs::write(ws.join("base.raw"), &data).expect("write base.raw");
    (ws, cache, prefix, url, data)
}

/// What the user sees: `layer` reads as `data`, in full, through an overlay created on it and
/// flattened through a cache of its own (every chunk comes from the store).
fn assert_layer_reads(s3: &S3, ws: &TempDir, layer: &str, data: &[u8], what: &str) {
    let cache = ws.subdir("reader-cache");
    let (top, out) = (ws.join("top.cow"), ws.join("out.raw"));
    let direct = s3.endpoint.clone();
    run(&mut cow(s3, &cache, &direct, &["create", top.to_str().unwrap(), "--backing", layer]));
    let flatten = ["flatten", top.to_str().unwrap(), "--output", out.to_str().unwrap(), "--format", "raw"];
    run(&mut cow(s3, &cache, &direct, &flatten));
    assert!(std::fs::read(&out).expect("read out.raw") == data, "{what} does not read as pushed");
}

#[test]
fn a_slow_manifest_listing_does_not_let_gc_delete_a_pack_a_new_manifest_uses() {
    let Some(s3) = s3() else { return };
    let (ws, cache, prefix, url, data) = with_base(s3, 91);
    let direct = s3.endpoint.clone();
    let pushed = json(&mut cow(s3, &cache, &direct, &["push", ws.join("base.raw").to_str().unwrap(), &url, "--json"]));
    let digest = pushed["layers"][0]["digest"].as_str().expect("digest").to_string();
    let layer = format!("{url}/layers/{digest}");
    // The manifest, as a push that learned of these packs before they were marked writes it
    // at its end (P4); until then no manifest refers to them.
    let key = ObjPath::from(format!("{prefix}/layers/{digest}"));
    let store = s3.store();
    let rt = runtime();
    let manifest = rt.block_on(async { store.get(&key).await?.bytes().await }).expect("get the manifest");
    run(&mut cow(s3, &cache, &direct, &["rm", &layer]));

    const GRACE: u64 = 8;
    let grace = format!("{GRACE}s");
    let first = json(&mut cow(s3, &cache, &direct, &["gc", &url, "--grace", &grace, "--json"]));
    assert!(first["marked"].as_u64() >= Some(1), "{first}");
    let marked_at = Instant::now();

    // The second pass starts 3 s before the marks are GRACE old. Its listing of manifests is
    // answered as the store stands then, but reaches it 5 s later, past the grace.
    std::thread::sleep(Duration::from_secs(GRACE - 3).saturating_sub(marked_at.elapsed()));
    // Plain HTTP only: the proxy reads requests as they pass.
    let Some(host) = direct.strip_prefix("http://") else { return };
    let rgw: SocketAddr = host
        .trim_end_matches('/')
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve the store's address {direct}"));
    let proxy = SlowAnswers::start(rgw, &["list-type=2", "layers"], Duration::from_secs(5));
    let via_proxy = format!("http://{}", proxy.addr);
    let mut second = cow(s3, &cache, &via_proxy, &["gc", &url, "--grace", &grace, "--json"]);
    let second = std::thread::spawn(move || json(&mut second));
    let t = Instant::now();
    while !proxy.seen.load(Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(20), "gc never listed the manifests");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Within the grace period, after the listing: the push's manifest is written.
    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(store.put(&key, PutPayload::from(manifest))).expect("put the manifest back");
    let second = second.join().expect("second pass");
    assert_eq!(second["deleted"], 0, "gc deleted a pack the new manifest uses: {second}");

    assert_layer_reads(s3, &ws, &layer, &data, "the layer");
}

#[test]
fn a_repository_whose_prefix_the_store_spells_encoded_lists_and_guards_its_layers() {
    let Some(s3) = s3() else { return };
    let (ws, cache, prefix, _, data) = with_base(s3, 92);
    // `~` and `ö` are percent-encoded in the store's keys (object_store encodes each segment).
    let url = format!("s3://{}/{prefix}/~alice/bilder-för-ci", s3.bucket);
    let direct = s3.endpoint.clone();
    let base = ws.join("base.raw");
    let push = |cache: &Path| {
        json(&mut cow(s3, cache, &direct, &["push", base.to_str().unwrap(), &url, "--tag", "b", "--json"]))
    };
    let first = push(&cache);
    let digest = first["layers"][0]["digest"].as_str().expect("digest").to_string();
    assert!(first["layers"][0]["uploaded-chunks"].as_u64() > Some(0), "{first}");

    // Pushing the same image again (through a new cache) finds it there and uploads nothing.
    let again = push(&ws.subdir("cache2"));
    assert_eq!(again["layers"][0]["digest"], first["layers"][0]["digest"], "{again}");
    assert_eq!(again["layers"][0]["uploaded-chunks"], 0, "the second push uploaded chunks again: {again}");

    // `ls` lists the layer with its tag.
    let ls = json(&mut cow(s3, &cache, &direct, &["ls", &url, "--json"]));
    let layers = ls["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{ls}");
    assert_eq!(layers[0]["digest"], digest.as_str(), "{ls}");
    assert_eq!(layers[0]["tags"], serde_json::json!(["b"]), "{ls}");

    // `rm` of the tagged layer is refused and the layer still reads.
    let layer = format!("{url}/layers/{digest}");
    let out = cow(s3, &cache, &direct, &["rm", &layer]).output().expect("run cowdisk rm");
    assert!(!out.status.success(), "rm deleted a layer a tag names: {}", stdout_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tag b names it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_layer_reads(s3, &ws, &format!("{url}/b"), &data, "the layer");
}

/// gc collects packs only: an object under `packs/` whose name is no digest (put there by
/// hand, or a repository whose prefix lies below this one's `packs/`) is left alone. A review
/// found gc marking such objects and deleting them a grace period later; `ls` counted them as
/// this repository's packs (the nested repository's pack and the note, where there are none).
#[test]
fn gc_leaves_alone_what_lies_under_packs_and_is_no_pack() {
    let Some(s3) = s3() else { return };
    let (ws, cache, prefix, url, data) = with_base(s3, 95);
    let direct = s3.endpoint.clone();
    // A repository nested below this one's packs/, with a layer of its own, and a note.
    let nested = format!("{url}/packs/nested");
    run(&mut cow(s3, &cache, &direct, &["push", ws.join("base.raw").to_str().unwrap(), &nested, "--tag", "n"]));
    let note = ObjPath::from(format!("{prefix}/packs/notes.txt"));
    let store = s3.store();
    let rt = runtime();
    rt.block_on(store.put(&note, PutPayload::from(b"mine".to_vec()))).expect("put the note");

    // Two passes a grace period apart: the first would mark, the second delete.
    for pass in 0..2 {
        let r = json(&mut cow(s3, &cache, &direct, &["gc", &url, "--grace", "1s", "--json"]));
        assert_eq!(r["packs"], 0, "pass {pass} took objects that are no packs for packs: {r}");
        std::thread::sleep(Duration::from_millis(1500));
    }
    let kept = rt.block_on(async { store.get(&note).await?.bytes().await }).expect("the note is gone");
    assert_eq!(&kept[..], b"mine");
    let ls = json(&mut cow(s3, &cache, &direct, &["ls", &url, "--json"]));
    assert_eq!((&ls["packs"], &ls["pack-bytes"]), (&json!(0), &json!(0)), "ls counts what is no pack: {ls}");
    assert_layer_reads(s3, &ws, &format!("{nested}/n"), &data, "the nested repository's layer");
}
