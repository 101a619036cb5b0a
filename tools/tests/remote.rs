//! Layers in an object store (issue 16), through the `cowdisk` binary against a real Ceph RGW:
//! push (with --chain, again, killed and resumed, deduplicated), ls, rm and gc, lazy overlays
//! served and read by real clients, the store misbehaving (bad settings, corrupt and truncated
//! objects), credentials and endpoints. The shared chunk cache and reads while the store or the
//! cache fail are in remote_cache.rs.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::remote::*;
use common::s3::s3;
use common::*;
use serde_json::Value;

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
    // An overlay made on the top first: this host's cache now holds its manifest.
    run(&mut repo.cow(&cache, &["create", p(&ws.join("on-top.cow")), "--backing", &top_url]));
    run(&mut repo.cow(&cache, &["rm", &top_url]));
    // The cache knows manifests by digest alone: an overlay on the removed layer, or on the
    // base's digest in a repository that never held it, is refused all the same (before
    // 2026-12-04 both were made, and their first read of the layer failed with EIO).
    let elsewhere = format!("s3://{}/{}-elsewhere/layers/{base_d}", repo.s3.bucket, repo.prefix);
    for url in [&top_url, &elsewhere] {
        let o = ws.join("o.cow");
        let err = failure(&repo.cow(&cache, &["create", p(&o), "--backing", url]).output().expect("run"));
        assert!(err.contains("no such layer"), "{url}: {err}");
        assert!(!o.exists(), "{url}: an overlay was made");
    }
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
    // A URL's scheme is case-insensitive (RFC 3986 §3.1): HTTP:// is plain HTTP too. Before
    // 2026-12-04 it passed the endpoint's check and failed every request ("builder error").
    if let Some(rest) = s3.endpoint.strip_prefix("http://") {
        let out = run(&mut bare(&["ls", &repo.url(), "--endpoint", &format!("HTTP://{rest}")], &env));
        assert!(stdout_of(&out).contains("1 layers"), "{}", stdout_of(&out));
    }
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
/// printed nowhere (the store client's errors name the URL they failed on); so is one spelt
/// with one slash, which the URL parser reads alike (the store client panicked on it before
/// 2026-12-04), and one with a query, which the client would drop.
#[test]
fn an_endpoint_with_credentials_in_it_is_refused_without_printing_them() {
    for (endpoint, said) in [
        ("http://user:SECRETPW@127.0.0.1:1", "credentials"),
        ("http:/user:SECRETPW@127.0.0.1:1", "credentials"),
        ("http://127.0.0.1:1/?token=SECRETPW", "query"),
    ] {
        for cmd in
            [&["ls", "s3://bucket/repo"][..], &["create", "/nonexistent/o.cow", "--backing", "s3://bucket/repo/t"]]
        {
            let out =
                Command::new(cowdisk_bin()).args(cmd).args(["--endpoint", endpoint]).output().expect("run cowdisk");
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.status.code(), Some(1), "{endpoint} {cmd:?}: {stdout}{stderr}");
            assert!(stderr.contains(said), "{endpoint} {cmd:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{endpoint} {cmd:?}: {stderr}");
            assert!(!stdout.contains("SECRETPW") && !stderr.contains("SECRETPW"), "{stdout}{stderr}");
        }
    }
}

/// A pack index that does not decode (damaged, or some other program's object under
/// `packs/`) is passed over by a push, which uploads those chunks again: before 2026-12-04 one
/// such object made every push to the repository fail with "count larger than the object",
/// naming nothing.
#[test]
fn a_damaged_pack_index_does_not_stop_pushes() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let name = "ab".repeat(32);
    let pack = format!("{}/packs/{name}", repo.prefix);
    repo.put(&pack, vec![0u8; 1000]);
    // A pack index's head (magic, version 1) that claims 5 records and holds none.
    let mut idx = b"CDPKIDX\0".to_vec();
    idx.extend_from_slice(&1u32.to_le_bytes());
    idx.extend_from_slice(&5u32.to_le_bytes());
    repo.put(&format!("{pack}.idx"), idx);
    assert_eq!(repo.keys("packs").len(), 2, "the damaged pack is not in the repository");
    let cache = ws.subdir("cache");
    repo.push_base(&ws, &cache, random_bytes(3 * CHUNK, 95), &[]);
    let top = ws.join("top.cow");
    run(&mut repo.cow(&ws.subdir("c2"), &["create", p(&top), "--backing", &repo.layer("b")]));
    run(&mut repo.cow(&ws.subdir("c2"), &["flatten", p(&top), "--output", p(&ws.join("out.raw")), "--format", "raw"]));
    assert_files_equal(&ws.join("out.raw"), &ws.join("base.raw"));
}

/// `compact` merges the local layers under an overlay, never layers in a repository (which are
/// never rewritten): on an overlay directly on a remote layer it is refused saying so (before
/// 2026-12-04: "open: No such file or directory" naming the layer's URL), and with local
/// snapshots above the remote layers it merges those, and the device reads the same.
#[test]
fn compact_merges_the_local_layers_above_remote_ones() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    let mut device = make_base(&ws.join("base.raw"), 2, 41);
    run(Command::new(cowdisk_bin()).args(["create", p(&ws.join("l.cow")), "--backing", p(&ws.join("base.raw"))]));
    write_into(&ws.join("l.cow"), &ws.join("w.sock"), &[(0, random_bytes(CHUNK, 42))], &mut device);
    run(Command::new(cowdisk_bin()).args(["snapshot", p(&ws.join("l.cow")), p(&ws.join("s.cow"))]));
    run(&mut repo.cow(&cache, &["push", p(&ws.join("s.cow")), &repo.url(), "--chain", "--tag", "s"]));
    let t = ws.join("t.cow");
    run(&mut repo.cow(&cache, &["create", p(&t), "--backing", &repo.layer("s")]));
    let refused = failure(&repo.cow(&cache, &["compact", p(&t), p(&ws.join("m.cow"))]).output().expect("run"));
    assert!(refused.contains("0 local cowdisk layers") && refused.contains("in a repository"), "{refused}");
    assert!(!ws.join("m.cow").exists());
    for (i, snap) in ["a1.cow", "a2.cow"].iter().enumerate() {
        let server = repo.server(&cache, &[p(&t), "--socket", p(&ws.join("t.sock"))]);
        let mut c = client(&server);
        let (at, data) = ((i + 1) * CHUNK, random_bytes(CHUNK, 43 + i as u64));
        c.write(at as u64, &data).expect("write");
        device[at..at + CHUNK].copy_from_slice(&data);
        drop(c);
        server.stop();
        run(&mut repo.cow(&cache, &["snapshot", p(&t), p(&ws.join(snap))]));
    }
    run(&mut repo.cow(&cache, &["compact", p(&t), p(&ws.join("m.cow"))]));
    let info = repo.json(&cache, &["info", p(&t), "--json"]);
    let layers = info["layers"].as_array().map(Vec::len);
    assert_eq!(layers, Some(4), "t, m, the remote layer and the remote base: {info}");
    run(&mut repo.cow(&cache, &["flatten", p(&t), "--output", p(&ws.join("out.raw")), "--format", "raw"]));
    assert_bytes_eq(&std::fs::read(ws.join("out.raw")).expect("read"), &device, "the device after the compaction");
}

/// An object under `layers/` that is no manifest this version reads (damaged, newer, or some
/// other program's) is listed as damaged, not a failure of `ls`; `rm` removes it; `gc` and
/// the removal of another layer, which cannot tell what it stands on or needs, refuse naming
/// it. Before 2026-12-04 one such object made `ls`, `rm` and `gc` fail for the whole
/// repository, and no cowdisk command could remove it.
#[test]
fn a_damaged_manifest_is_listed_and_can_be_removed() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    repo.push_base(&ws, &cache, random_bytes(CHUNK, 97), &[]);
    let bad = "cd".repeat(32);
    repo.put(&format!("{}/layers/{bad}", repo.prefix), b"garbage!".to_vec());
    let ls = repo.json(&cache, &["ls", &repo.url(), "--json"]);
    assert_eq!(ls["layers"].as_array().map(Vec::len), Some(1), "{ls}");
    assert_eq!(ls["damaged"][0]["digest"], bad.as_str(), "{ls}");
    let text = stdout_of(&run(&mut repo.cow(&cache, &["ls", &repo.url()])));
    assert!(text.contains(&format!("{bad}  damaged:")), "{text}");
    let refused = failure(&repo.cow(&cache, &["gc", &repo.url(), "--grace", "0"]).output().expect("run"));
    assert!(refused.contains(&bad) && refused.contains("remove it first"), "{refused}");
    run(&mut repo.cow(&cache, &["rm", &format!("{}/layers/{bad}", repo.url())]));
    let ls = repo.json(&cache, &["ls", &repo.url(), "--json"]);
    assert_eq!(ls["damaged"].as_array().map(Vec::len), Some(0), "{ls}");
    assert_eq!(ls["layers"].as_array().map(Vec::len), Some(1), "{ls}");
    run(&mut repo.cow(&cache, &["gc", &repo.url(), "--grace", "0"]));
}
