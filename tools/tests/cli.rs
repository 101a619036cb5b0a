//! End-to-end tests of every `cowdisk` command through the built binary (create, snapshot, flatten, commit, info, map, check, serve): what a user sees (stdout, one-line errors, exit codes, `--json` field by field), the disk contents that result, several overlays of one frozen base served at once, and kill -9 during flatten and commit leaving "before" or "after", never a broken chain.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// What one run of `cowdisk` produced.
struct Out {
    cmd: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }

    /// The one error line: stderr must be exactly one line starting "cowdisk: ".
    #[track_caller]
    fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{}", self.describe());
        assert!(lines[0].starts_with("cowdisk: "), "the error line must start with 'cowdisk: '\n{}", self.describe());
        lines[0]
    }
}

/// Never a panic, never a backtrace, never death by a signal.
#[track_caller]
fn assert_no_panic(o: &Out) {
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!o.stderr.contains(bad), "stderr contains {bad:?}\n{}", o.describe());
    }
    assert!(o.code.is_some(), "killed by a signal\n{}", o.describe());
    assert_ne!(o.code, Some(101), "exit code 101 is a panic\n{}", o.describe());
}

fn out_of(cmd: &Command, o: std::process::Output) -> Out {
    Out {
        cmd: format!("{cmd:?}"),
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A working directory in which `cowdisk` runs, so that paths (and messages) are short.
struct Ws {
    path: PathBuf,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl Ws {
    fn new() -> Ws {
        let dir = TempDir::for_test();
        Ws { path: dir.path().to_path_buf(), _guard: Box::new(dir) }
    }

    /// On tmpfs when there is one (see [`ShmDir`]).
    fn in_memory(tag: &str) -> Ws {
        match ShmDir::new(tag) {
            Some(d) => Ws { path: d.0.clone(), _guard: Box::new(d) },
            None => {
                let dir = TempDir::new(tag);
                Ws { path: dir.path().to_path_buf(), _guard: Box::new(dir) }
            }
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn dir(&self) -> &Path {
        &self.path
    }

    fn cmd(&self, args: &[&str]) -> Command {
        cowdisk_in(self.dir(), args)
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> Out {
        run_in(self.dir(), args)
    }

    /// Runs, asserts exit 0 and a silent stderr, returns stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        ok_in(self.dir(), args)
    }

    /// Runs, asserts a non-zero exit and one error line containing every needle.
    #[track_caller]
    fn fail(&self, args: &[&str], needles: &[&str]) -> Out {
        let o = self.run(args);
        assert_ne!(o.code, Some(0), "expected failure\n{}", o.describe());
        let line = o.error_line().to_owned();
        for n in needles {
            assert!(line.contains(n), "error line lacks {n:?}: {line}\n{}", o.describe());
        }
        o
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}):\n{out}"))
    }

    #[track_caller]
    fn info(&self, image: &str) -> Value {
        self.json(&["info", "--json", image])
    }

    /// The merged device of `image`, read back through `flatten --output X --format raw`.
    #[track_caller]
    fn device(&self, image: &str) -> Vec<u8> {
        device_in(self.dir(), image)
    }

    fn serve_write(&self, image: &str, ops: &[Op]) {
        serve_write(&self.p(image), ops)
    }

    fn create(&self, image: &str, extra: &[&str]) {
        let mut args = vec!["create", image];
        args.extend_from_slice(extra);
        self.ok(&args);
    }
}

/// A fresh directory on tmpfs (/dev/shm), removed on drop; `None` without a tmpfs there.
/// The crash tests move hundreds of MiB through files that cowdisk fsyncs; a kill -9 (unlike
/// a power cut) leaves the page cache intact, so its outcome does not depend on the file
/// system, and memory keeps those tests fast and their timing steady on a busy disk.
struct ShmDir(PathBuf);

impl ShmDir {
    fn new(tag: &str) -> Option<ShmDir> {
        let shm = Path::new("/dev/shm");
        let probe = shm.join(format!(".cowdisk-probe-{}", std::process::id()));
        fs::create_dir_all(&probe).ok()?;
        let _ = fs::remove_dir(&probe);
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let p = shm.join(format!("cowdisk-test-{}-{n}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).ok()?;
        Some(ShmDir(p))
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        if std::env::var_os("COWDISK_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("COWDISK_KEEP_TMP set: keeping {}", self.0.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("WARNING: cannot remove {}: {e}", self.0.display());
        }
    }
}

fn cowdisk_in(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(cowdisk_bin());
    c.args(args).current_dir(dir).env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    c
}

#[track_caller]
fn run_in(dir: &Path, args: &[&str]) -> Out {
    let mut cmd = cowdisk_in(dir, args);
    let o = run_status(&mut cmd);
    let o = out_of(&cmd, o);
    assert_no_panic(&o);
    o
}

#[track_caller]
fn ok_in(dir: &Path, args: &[&str]) -> String {
    let o = run_in(dir, args);
    assert_eq!(o.code, Some(0), "expected success\n{}", o.describe());
    assert!(o.stderr.is_empty(), "a successful command printed to stderr\n{}", o.describe());
    o.stdout
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique(stem: &str, ext: &str) -> String {
    format!("{stem}-{}.{ext}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

#[track_caller]
fn device_in(dir: &Path, image: &str) -> Vec<u8> {
    let out = unique(".device", "raw");
    ok_in(dir, &["flatten", image, "--output", &out, "--format", "raw"]);
    let p = dir.join(&out);
    let bytes = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    bytes
}

fn on_disk(p: &Path) -> u64 {
    fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).blocks() * 512
}

fn inode(p: &Path) -> (u64, u64) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.dev(), m.ino())
}

// ---------------------------------------------------------------------------
// Writing through `cowdisk serve`, and the model of what the disk must hold
// ---------------------------------------------------------------------------

#[derive(Clone)]
enum Op {
    Data(u64, Vec<u8>),
    /// NBD_CMD_WRITE_ZEROES without NO_HOLE (the server may record zeros without data).
    Zero(u64, u64),
}

fn data(offset: u64, len: u64, seed: u64) -> Op {
    Op::Data(offset, random_bytes(len as usize, seed))
}

fn apply(model: &mut [u8], ops: &[Op]) {
    for op in ops {
        match op {
            Op::Data(off, d) => model[*off as usize..*off as usize + d.len()].copy_from_slice(d),
            Op::Zero(off, len) => model[*off as usize..(*off + *len) as usize].fill(0),
        }
    }
}

/// `count` writes of 4 KiB-multiple lengths in `min..=max` at 4 KiB-aligned offsets.
fn scattered(seed: u64, count: usize, size: u64, min: u64, max: u64) -> Vec<Op> {
    let mut rng = XorShift::new(seed);
    (0..count)
        .map(|i| {
            let blocks = (min / 4096) + rng.next_u64() % ((max - min) / 4096 + 1);
            let len = blocks * 4096;
            let off = (rng.next_u64() % ((size - len) / 4096 + 1)) * 4096;
            data(off, len, seed.wrapping_mul(1_000_003) ^ i as u64)
        })
        .collect()
}

/// Serves `image` alone, applies `ops` over NBD, flushes and stops the server cleanly.
fn serve_write(image: &Path, ops: &[Op]) {
    let sock = image.with_file_name(unique(".w", "sock"));
    let mut server = Server::start(&[s(image), "--socket", s(&sock)]);
    let name = image.file_stem().unwrap().to_string_lossy().into_owned();
    {
        let mut c = server.connect();
        c.opt_go(&name, &[]).unwrap_or_else(|e| panic!("NBD_OPT_GO {name}: {e}\n{}", server.log()));
        for op in ops {
            let r = match op {
                Op::Data(off, d) => c.write(*off, d),
                Op::Zero(off, len) => c.write_zeroes(*off, *len as u32, 0),
            };
            r.unwrap_or_else(|e| panic!("write to {name}: {e}\n{}", server.log()));
        }
        c.flush().unwrap();
        c.disconnect().unwrap();
    }
    let status = server.daemon().terminate(STOP_TIMEOUT);
    assert!(status.success(), "cowdisk serve exited with {status}\n{}", server.log());
}

/// Bytes of 4 KiB blocks that some Data op wrote (what a sparse copy must allocate).
fn written_block_bytes(size: u64, ops: &[Op]) -> u64 {
    let mut blocks = vec![false; size.div_ceil(4096) as usize];
    for op in ops {
        match op {
            Op::Data(off, d) => {
                for b in off / 4096..(off + d.len() as u64).div_ceil(4096) {
                    blocks[b as usize] = true;
                }
            }
            Op::Zero(off, len) => {
                for b in off / 4096..(off + len) / 4096 {
                    blocks[b as usize] = false;
                }
            }
        }
    }
    blocks.iter().filter(|b| **b).count() as u64 * 4096
}

// ---------------------------------------------------------------------------
// Image files, byte by byte
// ---------------------------------------------------------------------------

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// File offset of the first map sector: the first map extent listed by the current header
/// slot (the one with the higher generation, u64 at byte 16; extents at byte 120).
fn first_map_sector(image: &Path) -> u64 {
    let mut hdr = vec![0u8; 8192];
    File::open(image).unwrap().read_exact(&mut hdr).unwrap();
    let slot = if le_u64(&hdr, 16) >= le_u64(&hdr, 4096 + 16) { 0 } else { 4096 };
    let off = le_u64(&hdr, slot + 120);
    let len = le_u64(&hdr, slot + 128);
    assert!(off >= 8192 && len > 0, "no map extent in {}", image.display());
    off
}

/// Flips one byte inside the first map entry of `image` (a checksum-covered byte).
fn corrupt_map_sector(image: &Path) {
    let at = first_map_sector(image) + 20;
    let f = open_rw(image);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    f.sync_all().unwrap();
}

/// Writes 64 KiB of non-zero bytes past everything the image refers to: data no map refers
/// to, i.e. a leak. They go at the end of the file, first rounded up (with a hole) to 2 MiB,
/// the largest chunk size: right at the end some would land in the image's own last cluster,
/// where they are meaningless bytes of an unused block, or unused map sectors, not a leak.
fn append_leak(image: &Path) {
    let f = open_rw(image);
    let end = f.metadata().unwrap().len().next_multiple_of(2 * MIB);
    f.write_all_at(&random_bytes(64 * KIB as usize, 0x1ea4), end).unwrap();
    f.sync_all().unwrap();
}

/// Copies `src` to `dst` keeping holes holes (SEEK_DATA / SEEK_HOLE).
fn copy_sparse(src: &Path, dst: &Path) {
    let from = File::open(src).unwrap();
    let to = File::create(dst).unwrap();
    let len = from.metadata().unwrap().len();
    to.set_len(len).unwrap();
    let fd = from.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    loop {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE failed on {}", src.display());
        let mut at = data as u64;
        while at < hole as u64 {
            let n = ((hole as u64 - at) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], at).unwrap();
            to.write_all_at(&buf[..n], at).unwrap();
            at += n as u64;
        }
        pos = hole;
    }
}

/// Whether two files hold the same bytes (fast: slice equality is memcmp).
fn same_file_bytes(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        if na == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..na]).unwrap();
        if ba[..na] != bb[..na] {
            return false;
        }
    }
}

// ---------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------

#[test]
fn create_accepts_human_sizes_and_shows_them_the_same_way() {
    let ws = Ws::new();
    for (arg, bytes, shown) in [
        ("10G", 10 * GIB, "10G"),
        ("512M", 512 * MIB, "512M"),
        ("4K", 4 * KIB, "4K"),
        ("1.5G", 3 * GIB / 2, "1.5G"),
        ("10GiB", 10 * GIB, "10G"),
    ] {
        let name = format!("disk-{arg}.cow");
        let out = ws.ok(&["create", &name, "--size", arg]);
        assert_eq!(out, format!("created {name} ({shown}, chunk size 64K)\n"));
        let v = ws.info(&name);
        assert_eq!(v["virtual_size"], json!(bytes), "{arg}");
        assert_eq!(v["chunk_size"], json!(65536), "{arg}");
        assert_eq!(v["data_bytes"], json!(0), "{arg}");
        let human = ws.ok(&["info", &name]);
        assert!(human.contains(&format!("virtual size: {shown} ({bytes} bytes)")), "{human}");
        // Sparse from the start: a 10G image is a few KiB on disk.
        assert!(on_disk(&ws.p(&name)) <= 64 * KIB, "{name} is not sparse");
    }
    // Not a size: clap reports it (usage error), without a panic and without a file.
    let o = ws.run(&["create", "bad.cow", "--size", "10X"]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.error_line().contains("invalid size '10X'"), "{}", o.describe());
    assert!(!ws.p("bad.cow").exists());
    // No size and no backing: refused, naming the file.
    ws.fail(&["create", "nosize.cow"], &["nosize.cow", "size"]);
    assert!(!ws.p("nosize.cow").exists());
}

#[test]
fn create_chunk_size_must_be_a_power_of_two_from_4k_to_2m() {
    let ws = Ws::new();
    for (arg, bytes) in [("4K", 4096u64), ("16K", 16384), ("2M", 2 * MIB)] {
        let name = format!("c{arg}.cow");
        let out = ws.ok(&["create", &name, "--size", "1G", "--chunk-size", arg]);
        assert_eq!(out, format!("created {name} (1G, chunk size {arg})\n"));
        assert_eq!(ws.info(&name)["chunk_size"], json!(bytes));
        assert!(ws.ok(&["info", &name]).contains(&format!("chunk size: {arg}\n")));
    }
    for arg in ["3K", "4M", "1K", "6K", "0"] {
        let name = format!("bad{arg}.cow");
        ws.fail(&["create", &name, "--size", "1G", "--chunk-size", arg], &["chunk size", "power of two", "4K", "2M"]);
        assert!(!ws.p(&name).exists(), "{name} created despite the error");
    }
}

/// The documented error form is `cowdisk: FILE: operation: cause`; a refused chunk size
/// is about the image being created, so it is named.
#[test]
fn create_with_a_refused_chunk_size_names_the_image_in_its_error() {
    let ws = Ws::new();
    ws.fail(&["create", "disk.cow", "--size", "1G", "--chunk-size", "3K"], &["disk.cow", "chunk size"]);
    assert!(!ws.p("disk.cow").exists());
}

#[test]
fn create_overlay_on_raw_file_and_on_frozen_image_probes_the_format_and_shows_the_parent() {
    let ws = Ws::new();
    write_random_file(&ws.p("base.raw"), 2 * MIB, 7);
    let base = fs::read(ws.p("base.raw")).unwrap();

    // A raw file is probed as raw; size and contents come from it.
    let out = ws.ok(&["create", "over-raw.cow", "--backing", "base.raw"]);
    assert_eq!(out, "created over-raw.cow (2M, chunk size 64K)\n");
    let v = ws.info("over-raw.cow");
    assert_eq!(v["virtual_size"], json!(2 * MIB));
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["layers"][0]["parent"], json!({"path": "base.raw", "format": "raw"}));
    assert_eq!(v["layers"][1]["format"], json!("raw"));
    assert_eq!(v["layers"][1]["path"], json!("base.raw"));
    assert_bytes_eq(&ws.device("over-raw.cow"), &base, "overlay on raw base");

    // A frozen cowdisk image (made by snapshot) is probed as cowdisk; size and chunk size
    // are inherited.
    ws.create("disk.cow", &["--size", "1M", "--chunk-size", "16K"]);
    ws.serve_write("disk.cow", &[data(0, 64 * KIB, 1)]);
    ws.ok(&["snapshot", "disk.cow", "frozen.cow"]);
    let frozen_dev = ws.device("frozen.cow");
    let out = ws.ok(&["create", "over-frozen.cow", "--backing", "frozen.cow"]);
    assert_eq!(out, "created over-frozen.cow (1M, chunk size 16K)\n");
    let v = ws.info("over-frozen.cow");
    assert_eq!(v["layers"][0]["parent"], json!({"path": "frozen.cow", "format": "cowdisk"}));
    assert_eq!(v["layers"][1]["format"], json!("cowdisk"));
    assert_eq!(v["layers"][1]["flags"], json!(["frozen"]));
    assert_eq!(v["chunk_size"], json!(16384));
    assert_bytes_eq(&ws.device("over-frozen.cow"), &frozen_dev, "overlay on frozen");

    // --backing-format raw forces raw even for a cowdisk file: the disk is its bytes.
    let file_bytes = fs::read(ws.p("frozen.cow")).unwrap();
    ws.ok(&["create", "over-bytes.cow", "--backing", "frozen.cow", "--backing-format", "raw"]);
    let v = ws.info("over-bytes.cow");
    assert_eq!(v["layers"][0]["parent"], json!({"path": "frozen.cow", "format": "raw"}));
    assert_eq!(v["layers"][1]["format"], json!("raw"));
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    let size = file_bytes.len().next_multiple_of(512);
    assert_eq!(v["virtual_size"], json!(size));
    let mut expect = file_bytes.clone();
    expect.resize(size, 0);
    assert_bytes_eq(&ws.device("over-bytes.cow"), &expect, "cowdisk file read as raw");
}

#[test]
fn create_refuses_a_writable_cowdisk_backing_and_an_existing_file() {
    let ws = Ws::new();
    ws.create("live.cow", &["--size", "1M"]);
    ws.serve_write("live.cow", &[data(0, 4096, 3)]);
    let o = ws.fail(&["create", "child.cow", "--backing", "live.cow"], &["live.cow", "writable", "snapshot"]);
    assert!(!ws.p("child.cow").exists(), "{}", o.describe());

    let crc = crc32_file(&ws.p("live.cow"));
    ws.fail(&["create", "live.cow", "--size", "2M"], &["live.cow", "already exists"]);
    assert_eq!(crc32_file(&ws.p("live.cow")), crc, "existing file was changed");
    write_random_file(&ws.p("some.raw"), 8192, 1);
    ws.fail(
        &["create", "some.raw", "--backing", "live.cow", "--backing-format", "raw"],
        &["some.raw", "already exists"],
    );
    // An empty raw file cannot be a parent; a missing one is named.
    File::create(ws.p("empty.raw")).unwrap();
    ws.fail(&["create", "e.cow", "--backing", "empty.raw"], &["empty.raw", "empty"]);
    ws.fail(&["create", "m.cow", "--backing", "missing.raw"], &["missing.raw"]);
    assert!(!ws.p("e.cow").exists() && !ws.p("m.cow").exists());
}

// ---------------------------------------------------------------------------
// snapshot
// ---------------------------------------------------------------------------

#[test]
fn snapshot_freezes_contents_under_the_new_name_and_leaves_an_empty_overlay_under_the_old() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "8M"]);
    let ops = vec![data(0, 64 * KIB, 1), data(3 * MIB + 4096, 12 * KIB, 2), data(8 * MIB - 4096, 4096, 3)];
    ws.serve_write("disk.cow", &ops);
    let mut model = vec![0u8; 8 * MIB as usize];
    apply(&mut model, &ops);
    let before = ws.info("disk.cow");
    let uuid = before["layers"][0]["uuid"].clone();
    assert_eq!(before["data_bytes"], json!(80 * KIB));

    let out = ws.ok(&["snapshot", "disk.cow", "snap.cow"]);
    assert_eq!(out, "disk.cow frozen as snap.cow; disk.cow is now an empty overlay on it\n");
    let v = ws.info("disk.cow");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{v:#}");
    assert_eq!(layers[0]["path"], json!("disk.cow"));
    assert_eq!(layers[0]["data_bytes"], json!(0));
    assert_eq!(layers[0]["flags"], json!([]));
    assert_eq!(layers[0]["parent"], json!({"path": "snap.cow", "format": "cowdisk"}));
    assert_eq!(layers[1]["path"], json!("snap.cow"));
    assert_eq!(layers[1]["flags"], json!(["frozen"]));
    assert_eq!(layers[1]["data_bytes"], json!(80 * KIB));
    assert_eq!(layers[1]["uuid"], uuid, "the snapshot is the old image itself");
    assert_ne!(layers[0]["uuid"], uuid);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "disk.cow after snapshot");
    assert_bytes_eq(&ws.device("snap.cow"), &model, "snap.cow");

    // New writes go to disk.cow only; the snapshot keeps the old contents.
    let more = vec![data(0, 4096, 9), Op::Zero(3 * MIB, 64 * KIB)];
    ws.serve_write("disk.cow", &more);
    let mut model2 = model.clone();
    apply(&mut model2, &more);
    assert_bytes_eq(&ws.device("disk.cow"), &model2, "disk.cow after writes");
    assert_bytes_eq(&ws.device("snap.cow"), &model, "snap.cow after writes");
    // A snapshot of a snapshot-overlay makes a 3-layer chain, still the same contents.
    ws.ok(&["snapshot", "disk.cow", "snap2.cow"]);
    let v = ws.info("disk.cow");
    let paths: Vec<&str> = v["layers"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["disk.cow", "snap2.cow", "snap.cow"]);
    assert_bytes_eq(&ws.device("disk.cow"), &model2, "after second snapshot");
    assert_eq!(ws.run(&["check", "--chain", "disk.cow"]).code, Some(0));
}

#[test]
fn snapshot_of_a_10g_image_copies_nothing() {
    let ws = Ws::new();
    ws.create("big.cow", &["--size", "10G"]);
    let ops = vec![data(0, 1 * MIB, 1), data(5 * GIB, 1 * MIB, 2), data(10 * GIB - MIB, 1 * MIB, 3)];
    ws.serve_write("big.cow", &ops);
    let id = inode(&ws.p("big.cow"));
    let blocks = on_disk(&ws.p("big.cow"));
    let t = Instant::now();
    ws.ok(&["snapshot", "big.cow", "big-snap.cow"]);
    let took = t.elapsed();
    // The snapshot is the very file that was the image (same inode, same blocks): nothing
    // was copied; the new overlay under the old name is a few KiB.
    assert_eq!(inode(&ws.p("big-snap.cow")), id);
    assert_eq!(on_disk(&ws.p("big-snap.cow")), blocks);
    assert!(on_disk(&ws.p("big.cow")) <= 64 * KIB, "new overlay occupies {} bytes", on_disk(&ws.p("big.cow")));
    let v = ws.info("big.cow");
    assert_eq!(v["virtual_size"], json!(10 * GIB));
    assert_eq!(v["layers"][1]["data_bytes"], json!(3 * MIB));
    eprintln!("snapshot of a 10G image took {took:?}");
}

#[test]
fn snapshot_failures_name_the_file_and_change_nothing() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "1M"]);
    ws.serve_write("disk.cow", &[data(0, 8192, 5)]);
    ws.create("other.cow", &["--size", "1M"]);
    let crc = |n: &str| crc32_file(&ws.p(n));
    let (c_disk, c_other) = (crc("disk.cow"), crc("other.cow"));

    ws.fail(&["snapshot", "missing.cow", "s.cow"], &["missing.cow"]);
    assert!(!ws.p("s.cow").exists());

    ws.fail(&["snapshot", "disk.cow", "other.cow"], &["other.cow", "already exists"]);
    fs::create_dir(ws.p("sub")).unwrap();
    ws.fail(&["snapshot", "disk.cow", "sub/s.cow"], &["sub/s.cow", "same directory"]);
    assert!(!ws.p("sub/s.cow").exists());
    assert_eq!((crc("disk.cow"), crc("other.cow")), (c_disk, c_other));
    // No temporary files are left behind.
    let mut names: Vec<String> =
        fs::read_dir(ws.dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["disk.cow", "other.cow", "sub"]);
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------
// flatten
// ---------------------------------------------------------------------------

/// raw base (4M random) <- disk-1.cow (frozen, 16K chunks) <- disk.cow; returns the model.
fn three_layer_chain(ws: &Ws) -> Vec<u8> {
    write_random_file(&ws.p("base.raw"), 4 * MIB, 0xba5e);
    let mut model = fs::read(ws.p("base.raw")).unwrap();
    ws.create("disk.cow", &["--backing", "base.raw", "--chunk-size", "16K"]);
    let mid = vec![data(MIB, 64 * KIB, 11), data(3 * MIB + 4 * KIB, 8 * KIB, 12)];
    ws.serve_write("disk.cow", &mid);
    apply(&mut model, &mid);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    let top = vec![data(0, 8 * KIB, 21), Op::Zero(2 * MIB, 64 * KIB), data(MIB + 16 * KIB, 4 * KIB, 22)];
    ws.serve_write("disk.cow", &top);
    apply(&mut model, &top);
    model
}

#[test]
fn flatten_in_place_drops_the_parents_keeps_contents_and_leaves_lower_layers_untouched() {
    let ws = Ws::new();
    let model = three_layer_chain(&ws);
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 3);
    let (c_base, c_mid) = (crc32_file(&ws.p("base.raw")), crc32_file(&ws.p("disk-1.cow")));

    let out = ws.ok(&["flatten", "disk.cow"]);
    assert_eq!(out, "disk.cow no longer depends on any parent\n");
    let v = ws.info("disk.cow");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{v:#}");
    assert_eq!(layers[0]["parent"], Value::Null);
    assert_eq!(layers[0]["flags"], json!([]));
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after flatten in place");
    assert_eq!(crc32_file(&ws.p("base.raw")), c_base, "base changed");
    assert_eq!(crc32_file(&ws.p("disk-1.cow")), c_mid, "frozen layer changed");
    assert_eq!(ws.run(&["check", "disk.cow"]).code, Some(0));
    // The zeros written over base data stay zeros without the base; deleting the old
    // layers does not matter any more.
    fs::remove_file(ws.p("base.raw")).unwrap();
    fs::remove_file(ws.p("disk-1.cow")).unwrap();
    assert_bytes_eq(&ws.device("disk.cow"), &model, "without the old parents");
    // Flattening a standalone image again is a no-op that still succeeds.
    ws.ok(&["flatten", "disk.cow"]);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "second flatten");
}

#[test]
fn flatten_to_output_writes_the_merged_device_raw_and_sparse_or_as_standalone_cowdisk() {
    let ws = Ws::new();
    let size = 64 * MIB;
    ws.create("disk.cow", &["--size", "64M"]);
    let lower = scattered(1, 40, size, 4 * KIB, 128 * KIB);
    ws.serve_write("disk.cow", &lower);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    let mut upper = scattered(2, 40, size, 4 * KIB, 64 * KIB);
    upper.push(Op::Zero(8 * MIB, MIB));
    upper.push(Op::Zero(40 * MIB, 256 * KIB));
    ws.serve_write("disk.cow", &upper);
    let all: Vec<Op> = lower.iter().chain(&upper).cloned().collect();
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &all);
    let c_top = crc32_file(&ws.p("disk.cow"));

    let out = ws.ok(&["flatten", "disk.cow", "--output", "out.raw", "--format", "raw"]);
    assert_eq!(out, "wrote the merged contents of disk.cow to out.raw (raw)\n");
    let raw = fs::read(ws.p("out.raw")).unwrap();
    assert_eq!(raw.len() as u64, size);
    assert_bytes_eq(&raw, &model, "out.raw");
    // Sparse: only the written blocks take space (zeros and never-written ranges are holes).
    let written = written_block_bytes(size, &all);
    let used = on_disk(&ws.p("out.raw"));
    assert!(
        used >= written * 9 / 10 && used <= written + 512 * KIB,
        "out.raw occupies {used} bytes for {written} bytes of written blocks"
    );
    assert_eq!(crc32_file(&ws.p("disk.cow")), c_top, "the source changed");

    let out = ws.ok(&["flatten", "disk.cow", "--output", "out.cow", "--format", "cowdisk"]);
    assert_eq!(out, "wrote the merged contents of disk.cow to out.cow (cowdisk)\n");
    let v = ws.info("out.cow");
    assert_eq!(v["layers"].as_array().unwrap().len(), 1);
    assert_eq!(v["layers"][0]["parent"], Value::Null);
    assert_eq!(v["virtual_size"], json!(size));
    assert_eq!(v["chunk_size"], json!(65536));
    assert_eq!(v["flags"], json!([]));
    assert_eq!(v["data_bytes"], json!(written));
    assert_bytes_eq(&ws.device("out.cow"), &model, "out.cow");
    assert_eq!(ws.run(&["check", "out.cow"]).code, Some(0));
    // Into another directory, too.
    fs::create_dir(ws.p("sub")).unwrap();
    ws.ok(&["flatten", "disk.cow", "--output", "sub/out.raw", "--format", "raw"]);
    assert!(same_file_bytes(&ws.p("sub/out.raw"), &ws.p("out.raw")));
    // The default format is cowdisk.
    ws.ok(&["flatten", "disk.cow", "--output", "default.cow"]);
    assert_eq!(ws.info("default.cow")["layers"][0]["format"], json!("cowdisk"));

    // An existing output is refused and kept.
    let c_out = crc32_file(&ws.p("out.raw"));
    ws.fail(&["flatten", "disk.cow", "--output", "out.raw", "--format", "raw"], &["out.raw", "already exists"]);
    assert_eq!(crc32_file(&ws.p("out.raw")), c_out);
}

// ---------------------------------------------------------------------------
// commit
// ---------------------------------------------------------------------------

/// disk-1.cow (frozen, standalone) <- disk.cow, both holding data; returns the model.
fn two_layer_chain(ws: &Ws) -> Vec<u8> {
    ws.create("disk.cow", &["--size", "8M"]);
    let lower = vec![data(0, MIB, 1), data(4 * MIB, 512 * KIB, 2)];
    ws.serve_write("disk.cow", &lower);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    let upper = vec![data(512 * KIB, MIB, 3), Op::Zero(4 * MIB + 64 * KIB, 128 * KIB), data(7 * MIB, 12 * KIB, 4)];
    ws.serve_write("disk.cow", &upper);
    let mut model = vec![0u8; 8 * MIB as usize];
    apply(&mut model, &lower);
    apply(&mut model, &upper);
    model
}

#[test]
fn commit_without_force_is_refused_with_the_reason_and_with_force_moves_the_data_down() {
    let ws = Ws::new();
    let model = two_layer_chain(&ws);
    let before = ws.info("disk.cow");
    let (c_top, c_parent) = (crc32_file(&ws.p("disk.cow")), crc32_file(&ws.p("disk-1.cow")));

    let o = ws.fail(&["commit", "disk.cow"], &["disk.cow", "disk-1.cow", "other overlays", "--force"]);
    assert_eq!(o.code, Some(1));
    assert_eq!(crc32_file(&ws.p("disk.cow")), c_top);
    assert_eq!(crc32_file(&ws.p("disk-1.cow")), c_parent);

    let out = ws.ok(&["commit", "disk.cow", "--force"]);
    assert_eq!(out, "committed disk.cow into its parent; it is now an empty overlay\n");
    let v = ws.info("disk.cow");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{v:#}");
    assert_eq!(layers[0]["data_bytes"], json!(0), "the image is empty now");
    assert_eq!(layers[0]["parent"], json!({"path": "disk-1.cow", "format": "cowdisk"}));
    assert_eq!(layers[1]["flags"], json!(["frozen"]), "the parent stays frozen");
    assert_eq!(layers[1]["uuid"], before["layers"][1]["uuid"]);
    // Parent data: 1M + 512K - 128K zeroed + the top's 512K beyond it + 12K.
    assert_eq!(layers[1]["data_bytes"], json!(MIB + 512 * KIB - 128 * KIB + 512 * KIB + 12 * KIB));
    assert_bytes_eq(&ws.device("disk.cow"), &model, "device after commit");
    assert_bytes_eq(&ws.device("disk-1.cow"), &model, "the parent holds it all");
    let map: Value = ws.json(&["map", "--json", "disk.cow"]);
    assert!(
        map.as_array().unwrap().iter().all(|e| e["depth"] != json!(0)),
        "nothing is served by the emptied image: {map:#}"
    );
    assert_eq!(ws.run(&["check", "--chain", "disk.cow"]).code, Some(0));
}

#[test]
fn commit_is_refused_into_a_raw_parent_without_a_parent_and_into_a_parent_another_server_uses() {
    let ws = Ws::new();
    write_random_file(&ws.p("base.raw"), MIB, 1);
    ws.create("on-raw.cow", &["--backing", "base.raw"]);
    ws.serve_write("on-raw.cow", &[data(0, 4096, 2)]);
    let c_base = crc32_file(&ws.p("base.raw"));
    ws.fail(&["commit", "on-raw.cow", "--force"], &["on-raw.cow", "raw"]);
    assert_eq!(crc32_file(&ws.p("base.raw")), c_base);
    ws.create("alone.cow", &["--size", "1M"]);
    ws.fail(&["commit", "alone.cow", "--force"], &["alone.cow", "no parent"]);
    ws.ok(&["snapshot", "alone.cow", "alone-0.cow"]);
    ws.create("bigger.cow", &["--backing", "alone-0.cow", "--size", "2M"]);
    ws.serve_write("bigger.cow", &[data(MIB + 4096, 4096, 3)]);
    let c_small = crc32_file(&ws.p("alone-0.cow"));
    ws.fail(&["commit", "bigger.cow", "--force"], &["bigger.cow", "larger than its parent"]);
    assert_eq!(crc32_file(&ws.p("alone-0.cow")), c_small);

    let model = two_layer_chain(&ws);
    ws.create("other.cow", &["--backing", "disk-1.cow"]);
    let c_parent = crc32_file(&ws.p("disk-1.cow"));
    let data_before = ws.info("disk.cow")["layers"][0]["data_bytes"].clone();
    {
        let sock = ws.p("other.sock");
        let _server = Server::start(&[s(&ws.p("other.cow")), "--socket", s(&sock)]);
        ws.fail(&["commit", "disk.cow", "--force"], &["disk-1.cow", "in use"]);
    }
    assert_eq!(crc32_file(&ws.p("disk-1.cow")), c_parent, "parent changed");
    assert_eq!(ws.info("disk.cow")["layers"][0]["data_bytes"], data_before);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after refused commit");
    // Once that server is gone the same commit works.
    ws.ok(&["commit", "disk.cow", "--force"]);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after commit");
}

// ---------------------------------------------------------------------------
// info and map
// ---------------------------------------------------------------------------

#[test]
fn info_shows_size_chunk_size_allocation_flags_and_every_layer() {
    let ws = Ws::new();
    three_layer_chain(&ws);
    let v = ws.info("disk.cow");
    assert_eq!(v["image"], json!("disk.cow"));
    assert_eq!(v["virtual_size"], json!(4 * MIB));
    assert_eq!(v["chunk_size"], json!(16384));
    assert_eq!(v["data_bytes"], json!(12 * KIB), "8K + 4K written; zeros hold no data");
    assert_eq!(v["flags"], json!([]));
    assert!(v["disk_bytes"].as_u64().unwrap() >= 12 * KIB);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(l["depth"], json!(i));
        assert_eq!(l["virtual_size"], json!(4 * MIB));
        assert!(l["disk_bytes"].as_u64().unwrap() >= l["data_bytes"].as_u64().unwrap() / 2);
    }
    let uuid_ok = |u: &Value| {
        let u = u.as_str().unwrap();
        u.len() == 36 && u.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
    };
    let l0 = &layers[0];
    assert_eq!(l0["path"], json!("disk.cow"));
    assert_eq!(l0["format"], json!("cowdisk"));
    assert_eq!(l0["chunk_size"], json!(16384));
    assert_eq!(l0["data_bytes"], json!(12 * KIB));
    assert_eq!(l0["flags"], json!([]));
    assert!(uuid_ok(&l0["uuid"]));
    assert_eq!(l0["parent"], json!({"path": "disk-1.cow", "format": "cowdisk"}));
    let l1 = &layers[1];
    assert_eq!(l1["path"], json!("disk-1.cow"));
    assert_eq!(l1["format"], json!("cowdisk"));
    assert_eq!(l1["chunk_size"], json!(16384));
    assert_eq!(l1["data_bytes"], json!(72 * KIB));
    assert_eq!(l1["flags"], json!(["frozen"]));
    assert!(uuid_ok(&l1["uuid"]));
    assert_ne!(l0["uuid"], l1["uuid"]);
    assert_eq!(l1["parent"], json!({"path": "base.raw", "format": "raw"}));
    let l2 = &layers[2];
    assert_eq!(l2["path"], json!("base.raw"));
    assert_eq!(l2["format"], json!("raw"));
    assert_eq!(l2["chunk_size"], Value::Null);
    assert_eq!(l2["data_bytes"], json!(4 * MIB));
    assert_eq!(l2["disk_bytes"], json!(4 * MIB));
    assert_eq!(l2["uuid"], Value::Null);
    assert_eq!(l2["flags"], json!([]));
    assert_eq!(l2["parent"], Value::Null);

    let human = ws.ok(&["info", "disk.cow"]);
    let lines: Vec<&str> = human.lines().collect();
    let line = |prefix: &str| -> &str {
        let found: Vec<&&str> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(found.len(), 1, "one line starting {prefix:?} in\n{human}");
        found[0]
    };
    assert_eq!(lines[0], "image: disk.cow");
    assert_eq!(line("virtual size: "), "virtual size: 4M (4194304 bytes)");
    assert_eq!(line("chunk size: "), "chunk size: 16K");
    assert!(line("allocated: ").starts_with("allocated: 12K of data, "), "{human}");
    assert_eq!(line("flags: "), "flags: none");
    assert_eq!(line("chain "), "chain (3 layers):");
    let l0 = line("  [0] ");
    assert!(l0.starts_with("  [0] disk.cow (cowdisk, 4M, chunk 16K, data 12K, on disk "), "{human}");
    assert!(l0.contains(" uuid ") && !l0.contains("[frozen]"), "{human}");
    let l1 = line("  [1] ");
    assert!(l1.starts_with("  [1] disk-1.cow (cowdisk, 4M, chunk 16K, data 72K, on disk "), "{human}");
    assert!(l1.contains("[frozen]") && l1.contains(" uuid "), "{human}");
    assert_eq!(line("  [2] "), "  [2] base.raw (raw, 4M, on disk 4M)");
    // The layers are the last lines, in order.
    assert_eq!(lines[lines.len() - 3..], [l0, l1, "  [2] base.raw (raw, 4M, on disk 4M)"]);

    // While a server has it open for writing, the flags say so (info needs no lock).
    let sock = ws.p("s.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock)]);
    assert_eq!(ws.info("disk.cow")["flags"], json!(["dirty"]));
    assert!(ws.ok(&["info", "disk.cow"]).contains("flags: dirty\n"));
    assert!(server.stop().success());
    assert_eq!(ws.info("disk.cow")["flags"], json!([]));
}

#[test]
fn map_merges_extents_into_runs_by_depth_and_zero_matching_what_was_written() {
    let ws = Ws::new();
    three_layer_chain(&ws);
    let d = |o: u64, l: u64, depth: u64| json!({"offset": o, "length": l, "data": true, "zero": false, "depth": depth});
    let expect = json!([
        d(0, 8 * KIB, 0),
        d(8 * KIB, MIB - 8 * KIB, 2),
        d(MIB, 16 * KIB, 1),
        d(MIB + 16 * KIB, 4 * KIB, 0),
        d(MIB + 20 * KIB, 44 * KIB, 1),
        d(MIB + 64 * KIB, MIB - 64 * KIB, 2),
        json!({"offset": 2 * MIB, "length": 64 * KIB, "data": false, "zero": true, "depth": 0}),
        d(2 * MIB + 64 * KIB, MIB - 60 * KIB, 2),
        d(3 * MIB + 4 * KIB, 8 * KIB, 1),
        d(3 * MIB + 12 * KIB, MIB - 12 * KIB, 2),
    ]);
    let map = ws.json(&["map", "--json", "disk.cow"]);
    assert_eq!(map, expect, "got {map:#}");

    let human = ws.ok(&["map", "disk.cow"]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 11, "{human}");
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(cols, ["offset", "length", "served", "by"]);
    let row = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(row(1), "0x0 0x2000 data, depth 0 (disk.cow)");
    assert_eq!(row(2), "0x2000 0xfe000 data, depth 2 (base.raw)");
    assert_eq!(row(3), "0x100000 0x4000 data, depth 1 (disk-1.cow)");
    assert_eq!(row(7), "0x200000 0x10000 zero, depth 0 (disk.cow)");

    // A standalone image: never-written ranges are zero and unallocated (no depth).
    ws.create("alone.cow", &["--size", "1M"]);
    ws.serve_write("alone.cow", &[data(64 * KIB, 4 * KIB, 1)]);
    let u = |o: u64, l: u64| json!({"offset": o, "length": l, "data": false, "zero": true, "depth": null});
    assert_eq!(
        ws.json(&["map", "--json", "alone.cow"]),
        json!([u(0, 64 * KIB), d(64 * KIB, 4 * KIB, 0), u(68 * KIB, MIB - 68 * KIB)])
    );
    let human = ws.ok(&["map", "alone.cow"]);
    assert!(human.contains("zero (unallocated)"), "{human}");
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[track_caller]
fn check_json(ws: &Ws, args: &[&str], code: i32) -> Value {
    let mut a = vec!["check", "--json"];
    a.extend_from_slice(args);
    let o = ws.run(&a);
    assert_eq!(o.code, Some(code), "{}", o.describe());
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e})\n{}", o.describe()))
}

#[test]
fn check_exits_0_clean_2_corrupt_naming_the_file_3_leaked_and_repair_reclaims_leaks() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "4M"]);
    let ops = vec![data(0, 256 * KIB, 1), data(2 * MIB, 64 * KIB, 2)];
    ws.serve_write("disk.cow", &ops);
    let mut model = vec![0u8; 4 * MIB as usize];
    apply(&mut model, &ops);

    // Clean.
    let o = ws.run(&["check", "disk.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.stdout, "disk.cow: checksums and invariants ok\n");
    let v = check_json(&ws, &["disk.cow"], 0);
    assert_eq!(v["status"], json!("clean"));
    assert_eq!(v["exit_code"], json!(0));
    assert_eq!(v["leaked_bytes"], json!(0));
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    let i0 = &v["images"][0];
    assert_eq!(i0["path"], json!("disk.cow"));
    assert_eq!(i0["errors"], json!([]));
    assert_eq!(i0["leaked_bytes"], json!(0));
    assert_eq!(i0["dirty"], json!(false));
    assert_eq!(i0["repaired"], json!(false));

    // Leaked: 64 KiB of data past everything the map refers to.
    fs::copy(ws.p("disk.cow"), ws.p("leaky.cow")).unwrap();
    append_leak(&ws.p("leaky.cow"));
    let o = ws.run(&["check", "leaky.cow"]);
    assert_eq!(o.code, Some(3), "{}", o.describe());
    assert!(o.stdout.starts_with("leaky.cow: checksums and invariants ok; 64K leaked"), "{}", o.describe());
    let v = check_json(&ws, &["leaky.cow"], 3);
    assert_eq!(v["status"], json!("leaks"));
    assert_eq!(v["exit_code"], json!(3));
    assert_eq!(v["leaked_bytes"], json!(64 * KIB));
    assert_eq!(v["images"][0]["leaked_bytes"], json!(64 * KIB));
    assert_eq!(v["images"][0]["errors"], json!([]));
    assert_eq!(v["images"][0]["repaired"], json!(false));
    let used = on_disk(&ws.p("leaky.cow"));
    let o = ws.run(&["check", "--repair", "leaky.cow"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("64K leaked (reclaimed)"), "{}", o.describe());
    assert!(on_disk(&ws.p("leaky.cow")) + 64 * KIB <= used, "the leak was not punched");
    let v = check_json(&ws, &["leaky.cow"], 0);
    assert_eq!(v["leaked_bytes"], json!(0));
    assert_eq!(v["status"], json!("clean"));
    assert_bytes_eq(&ws.device("leaky.cow"), &model, "after repair");
    // --repair --json reports what it did.
    fs::copy(ws.p("disk.cow"), ws.p("leaky2.cow")).unwrap();
    append_leak(&ws.p("leaky2.cow"));
    let v = check_json(&ws, &["--repair", "leaky2.cow"], 0);
    assert_eq!(v["images"][0]["repaired"], json!(true));
    assert_eq!(v["images"][0]["leaked_bytes"], json!(64 * KIB));
    assert_eq!(v["status"], json!("clean"));

    // Corrupt: one byte of a map sector flipped.
    fs::copy(ws.p("disk.cow"), ws.p("bad.cow")).unwrap();
    corrupt_map_sector(&ws.p("bad.cow"));
    let o = ws.run(&["check", "bad.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("bad.cow"), "{}", o.describe());
    assert!(o.stdout.contains("checksum"), "{}", o.describe());
    let v = check_json(&ws, &["bad.cow"], 2);
    assert_eq!(v["status"], json!("corrupt"));
    assert_eq!(v["exit_code"], json!(2));
    assert_eq!(v["images"][0]["path"], json!("bad.cow"));
    let errs = v["images"][0]["errors"].as_array().unwrap();
    assert!(!errs.is_empty());
    assert!(errs[0].as_str().unwrap().contains("bad.cow"), "{v:#}");
    // --repair does not "repair" corruption, and the other commands refuse the image.
    assert_eq!(ws.run(&["check", "--repair", "bad.cow"]).code, Some(2));
    ws.fail(&["info", "bad.cow"], &["bad.cow", "checksum"]);
    ws.fail(&["map", "bad.cow"], &["bad.cow", "checksum"]);
    ws.fail(&["flatten", "bad.cow", "--output", "x.raw", "--format", "raw"], &["bad.cow"]);
    assert!(!ws.p("x.raw").exists());
}

#[test]
fn check_chain_checks_every_layer_and_reports_a_swapped_raw_base() {
    let ws = Ws::new();
    three_layer_chain(&ws);
    let v = check_json(&ws, &["--chain", "disk.cow"], 0);
    let paths: Vec<&str> = v["images"].as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["disk.cow", "disk-1.cow"], "{v:#}");
    let o = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(o.stdout, "disk.cow: checksums and invariants ok\ndisk-1.cow: checksums and invariants ok\n");

    // A leak in a lower layer is found only with --chain.
    append_leak(&ws.p("disk-1.cow"));
    assert_eq!(ws.run(&["check", "disk.cow"]).code, Some(0));
    let v = check_json(&ws, &["--chain", "disk.cow"], 3);
    assert_eq!(v["images"][1]["leaked_bytes"], json!(64 * KIB));
    check_json(&ws, &["--chain", "--repair", "disk.cow"], 0);
    check_json(&ws, &["--chain", "disk.cow"], 0);

    // A corrupt lower layer: check of the top alone passes, --chain names the layer.
    copy_sparse(&ws.p("disk-1.cow"), &ws.p("good-mid"));
    corrupt_map_sector(&ws.p("disk-1.cow"));
    assert_eq!(ws.run(&["check", "disk.cow"]).code, Some(0));
    let o = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("disk-1.cow"), "{}", o.describe());
    copy_sparse(&ws.p("good-mid"), &ws.p("disk-1.cow"));
    assert_eq!(ws.run(&["check", "--chain", "disk.cow"]).code, Some(0));

    // The raw base swapped for another file of the same size.
    write_random_file(&ws.p("base.raw"), 4 * MIB, 0xd1ff);
    let o = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("base.raw"), "{}", o.describe());
    assert!(o.stdout.contains("changed"), "{}", o.describe());
    let v = check_json(&ws, &["--chain", "disk.cow"], 2);
    assert_eq!(v["status"], json!("corrupt"));
    let all_errors = v["images"].to_string();
    assert!(all_errors.contains("base.raw") && all_errors.contains("changed"), "{v:#}");
    // Reading the disk refuses the swapped base too.
    ws.fail(&["flatten", "disk.cow", "--output", "x.raw", "--format", "raw"], &["base.raw", "changed"]);
    let o = ws.run(&["serve", "disk.cow", "--socket", "x.sock"]);
    assert_ne!(o.code, Some(0));
    assert!(o.error_line().contains("base.raw"), "{}", o.describe());
}

#[test]
fn check_after_kill_9_of_serve_during_writes_finds_no_corruption_and_repair_leaves_it_clean() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "64M"]);
    let sock = ws.p("s.sock");
    let mut server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock)]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).unwrap();
    let writer = thread::spawn(move || {
        let mut rng = XorShift::new(77);
        let buf = random_bytes(256 * KIB as usize, 78);
        let mut n = 0u64;
        loop {
            let off = (rng.next_u64() % 255) * 256 * KIB;
            let r = if n % 16 == 15 { c.flush() } else { c.write(off, &buf) };
            if r.is_err() {
                return n;
            }
            n += 1;
        }
    });
    thread::sleep(Duration::from_millis(400));
    server.kill9();
    let requests = writer.join().unwrap();
    assert!(requests > 10, "only {requests} requests before the kill");

    let o = ws.run(&["check", "disk.cow"]);
    assert!(o.code == Some(0) || o.code == Some(3), "after kill -9: {}", o.describe());
    let v = check_json(&ws, &["disk.cow"], o.code.unwrap());
    assert_eq!(v["images"][0]["dirty"], json!(true), "not closed cleanly");
    check_json(&ws, &["--repair", "disk.cow"], 0);
    let v = check_json(&ws, &["disk.cow"], 0);
    assert_eq!(v["images"][0]["dirty"], json!(false));
    assert_eq!(v["leaked_bytes"], json!(0));
    assert_eq!(ws.info("disk.cow")["flags"], json!([]));
    // Still a usable disk.
    ws.serve_write("disk.cow", &[data(0, 4096, 1)]);
    assert_eq!(ws.device("disk.cow")[..4096], random_bytes(4096, 1)[..]);
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[test]
fn errors_are_one_line_naming_the_file_and_cause_and_never_a_panic() {
    let ws = Ws::new();
    write_random_file(&ws.p("plain.raw"), 64 * KIB, 1);
    let cases: &[(&[&str], &[&str])] = &[
        (&["info", "missing.cow"], &["missing.cow", "No such file"]),
        (&["info", "--json", "missing.cow"], &["missing.cow", "No such file"]),
        (&["map", "missing.cow"], &["missing.cow", "No such file"]),
        (&["info", "plain.raw"], &["plain.raw", "not a cowdisk image"]),
        (&["map", "plain.raw"], &["plain.raw", "not a cowdisk image"]),
        (&["flatten", "missing.cow"], &["missing.cow", "No such file"]),
        (&["flatten", "missing.cow", "--output", "o.raw", "--format", "raw"], &["missing.cow", "No such file"]),
        (&["commit", "missing.cow", "--force"], &["missing.cow", "No such file"]),
        (&["snapshot", "missing.cow", "snap.cow"], &["missing.cow", "No such file"]),
        (&["serve", "missing.cow", "--socket", "s.sock"], &["missing.cow", "No such file"]),
        (&["create", "x.cow", "--backing", "missing.raw"], &["missing.raw", "No such file"]),
        (&["create", "x.cow", "--size", "1000"], &["x.cow", "1000"]),
    ];
    for (args, needles) in cases {
        ws.fail(args, needles);
    }
    // A parent that went away is named, by every command that opens the chain.
    write_random_file(&ws.p("gone.raw"), 64 * KIB, 2);
    ws.create("orphan.cow", &["--backing", "gone.raw"]);
    fs::remove_file(ws.p("gone.raw")).unwrap();
    for args in [
        &["info", "orphan.cow"][..],
        &["map", "orphan.cow"],
        &["flatten", "orphan.cow"],
        &["flatten", "orphan.cow", "--output", "o.raw", "--format", "raw"],
        &["serve", "orphan.cow", "--socket", "s.sock"],
    ] {
        ws.fail(args, &["orphan.cow", "gone.raw", "missing"]);
    }
    assert!(!ws.p("x.cow").exists() && !ws.p("o.raw").exists() && !ws.p("snap.cow").exists());
}

/// `check` exits 2 for a corrupted image; a path that names no file is not a corrupted
/// image but an error like any other command's.
#[test]
fn check_of_a_missing_file_is_a_one_line_error_not_a_corrupt_verdict() {
    let ws = Ws::new();
    for args in [&["check", "missing.cow"][..], &["check", "--json", "missing.cow"]] {
        let o = ws.fail(args, &["missing.cow", "No such file"]);
        assert!(!o.stdout.contains("corrupt"), "{}", o.describe());
    }
}

#[test]
fn commands_that_write_an_image_a_server_holds_fail_with_in_use() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "4M"]);
    ws.serve_write("disk.cow", &[data(0, 64 * KIB, 1)]);
    ws.ok(&["snapshot", "disk.cow", "disk-1.cow"]);
    ws.serve_write("disk.cow", &[data(MIB, 64 * KIB, 2)]);
    let model = ws.device("disk.cow");
    let sock = ws.p("s.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&sock)]);
    ws.fail(&["snapshot", "disk.cow", "snap.cow"], &["disk.cow", "in use"]);
    ws.fail(&["commit", "disk.cow", "--force"], &["disk.cow", "in use"]);
    ws.fail(&["flatten", "disk.cow"], &["disk.cow", "in use"]);
    let o = ws.run(&["serve", "disk.cow", "--socket", "t.sock"]);
    assert_ne!(o.code, Some(0));
    assert!(o.error_line().contains("in use"), "{}", o.describe());
    // Looking is allowed while it is served.
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 2);
    ws.ok(&["map", "disk.cow"]);
    assert!(server.stop().success());
    assert!(!ws.p("snap.cow").exists());
    assert_eq!(ws.info("disk.cow")["layers"].as_array().unwrap().len(), 2);
    assert_bytes_eq(&ws.device("disk.cow"), &model, "after the refused commands");
}

/// Runs `cowdisk ARGS` with stdout a pipe whose reading end is already closed (like
/// `cowdisk map big.cow | head -1` after head has exited).
fn run_into_closed_pipe(ws: &Ws, args: &[&str]) -> Out {
    let mut fds = [0; 2];
    // SAFETY: pipe fills the two-element array with two new descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are fresh and owned only here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let mut cmd = ws.cmd(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::from(write_end)).stderr(Stdio::piped());
    let o = cmd.output().unwrap();
    out_of(&cmd, o)
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_without_a_panic() {
    let ws = Ws::new();
    ws.create("disk.cow", &["--size", "64M"]);
    ws.serve_write("disk.cow", &scattered(5, 200, 64 * MIB, 4 * KIB, 8 * KIB));
    let mut panics = Vec::new();
    for args in [
        &["map", "disk.cow"][..],
        &["map", "--json", "disk.cow"],
        &["info", "disk.cow"],
        &["info", "--json", "disk.cow"],
        &["check", "disk.cow"],
        &["check", "--json", "disk.cow"],
    ] {
        let o = run_into_closed_pipe(&ws, args);
        if o.stderr.contains("panicked") || o.code.is_none() || o.code == Some(101) {
            let why = o.stderr.lines().find(|l| l.contains("failed")).unwrap_or("");
            panics.push(format!("cowdisk {} (exit {:?}): {why}", args.join(" "), o.code));
        } else {
            assert!(o.stderr.lines().count() <= 1, "{}", o.describe());
        }
    }
    assert!(panics.is_empty(), "panicked writing to a closed pipe:\n{}", panics.join("\n"));
}

// ---------------------------------------------------------------------------
// Several overlays of one frozen base, served at once (the Docker case)
// ---------------------------------------------------------------------------

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = stdout_of(&run(&mut c));
    assert!(!out.contains("failed") && !out.contains("error"), "qemu-io {cmds:?}: {out}");
    out
}

fn export_bytes(ws: &Ws, uri: &str) -> Vec<u8> {
    let out = ws.p(&unique(".export", "raw"));
    run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw", uri]).arg(&out));
    let b = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    b
}

#[test]
fn overlays_of_one_frozen_base_served_together_never_see_each_others_writes() {
    if !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let ws = Ws::new();
    let size = 16 * MIB;
    ws.create("golden.cow", &["--size", "16M"]);
    let base_ops = scattered(3, 30, size, 4 * KIB, 256 * KIB);
    ws.serve_write("golden.cow", &base_ops);
    ws.ok(&["snapshot", "golden.cow", "base.cow"]);
    let mut base_model = vec![0u8; size as usize];
    apply(&mut base_model, &base_ops);
    for n in ["a", "b", "c"] {
        ws.create(&format!("{n}.cow"), &["--backing", "base.cow"]);
    }
    let base_file = fs::read(ws.p("base.cow")).unwrap();

    let sock = ws.p("s.sock");
    let server = Server::start(&[s(&ws.p("a.cow")), s(&ws.p("b.cow")), s(&ws.p("c.cow")), "--socket", s(&sock)]);
    let uri = |n: &str| server.uri(n);
    qemu_io(&uri("a"), &["write -P 0xaa 1M 256k", "write -P 0xa1 15M 1M"]);
    qemu_io(&uri("b"), &["write -P 0xbb 1152k 256k", "write -z -u 0 4M"]);
    let mut a = base_model.clone();
    a[MIB as usize..(MIB + 256 * KIB) as usize].fill(0xaa);
    a[(15 * MIB) as usize..].fill(0xa1);
    let mut b = base_model.clone();
    b[(1152 * KIB) as usize..(1408 * KIB) as usize].fill(0xbb);
    b[..(4 * MIB) as usize].fill(0);
    assert_bytes_eq(&export_bytes(&ws, &uri("a")), &a, "export a");
    assert_bytes_eq(&export_bytes(&ws, &uri("b")), &b, "export b");
    assert_bytes_eq(&export_bytes(&ws, &uri("c")), &base_model, "export c");
    // qemu-io reads the pattern back through one export and not the other.
    let out = qemu_io(&uri("a"), &["read -P 0xaa 1M 256k"]);
    assert!(out.contains("read 262144/262144"), "{out}");
    // While they run: new overlays can still be made on the base, info works, and the
    // base cannot be committed into.
    ws.create("d.cow", &["--backing", "base.cow"]);
    ws.ok(&["flatten", "d.cow", "--output", "d.raw", "--format", "raw"]);
    assert_bytes_eq(&fs::read(ws.p("d.raw")).unwrap(), &base_model, "d.raw");
    assert_eq!(ws.info("a.cow")["flags"], json!(["dirty"]));
    ws.fail(&["commit", "c.cow", "--force"], &["c.cow", "in use"]);
    assert!(server.stop().success());

    assert_eq!(fs::read(ws.p("base.cow")).unwrap(), base_file, "the base file changed");
    assert_bytes_eq(&ws.device("a.cow"), &a, "a.cow after stop");
    assert_bytes_eq(&ws.device("b.cow"), &b, "b.cow after stop");
    assert_bytes_eq(&ws.device("c.cow"), &base_model, "c.cow after stop");
    assert_bytes_eq(&ws.device("d.cow"), &base_model, "d.cow");
    assert_eq!(ws.info("a.cow")["data_bytes"], json!(256 * KIB + MIB));
    assert_eq!(ws.info("c.cow")["data_bytes"], json!(0));
    // Two exports cannot share a name.
    fs::create_dir(ws.p("x")).unwrap();
    ws.create("x/a.cow", &["--backing", "base.cow"]);
    let o = ws.run(&["serve", "a.cow", "x/a.cow", "--socket", "y.sock"]);
    assert_ne!(o.code, Some(0));
    assert!(o.error_line().contains("--name"), "{}", o.describe());
}

// ---------------------------------------------------------------------------
// Crash safety: kill -9 during flatten and commit
// ---------------------------------------------------------------------------

const CRASH_SIZE: u64 = 256 * MIB;
/// Kills per operation; `COWDISK_CLI_KILLS=N` runs more.
fn kills() -> usize {
    std::env::var("COWDISK_CLI_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

/// A pristine chain disk-0.cow (frozen, lots of scattered data) <- disk.cow (more scattered
/// data and zeros), and `ref.raw`, its merged device. Shared by the crash tests while any
/// of them runs, then removed.
struct CrashFixture {
    ws: Ws,
}

static CRASH_FIXTURE: Mutex<Weak<CrashFixture>> = Mutex::new(Weak::new());

fn crash_fixture() -> Arc<CrashFixture> {
    let mut slot = CRASH_FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = slot.upgrade() {
        return f;
    }
    let t = Instant::now();
    let ws = Ws::in_memory("crash-fixture");
    ws.create("disk.cow", &["--size", "256M"]);
    let lower = scattered(0xc0ffee, 14000, CRASH_SIZE, 4 * KIB, 12 * KIB);
    ws.serve_write("disk.cow", &lower);
    ws.ok(&["snapshot", "disk.cow", "disk-0.cow"]);
    let mut upper = scattered(0xbeef, 10000, CRASH_SIZE, 4 * KIB, 8 * KIB);
    let mut rng = XorShift::new(5);
    for _ in 0..80 {
        let off = (rng.next_u64() % (CRASH_SIZE / MIB)) * MIB;
        upper.push(Op::Zero(off, 64 * KIB));
    }
    ws.serve_write("disk.cow", &upper);
    ok_in(ws.dir(), &["flatten", "disk.cow", "--output", "ref.raw", "--format", "raw"]);
    {
        let mut model = vec![0u8; CRASH_SIZE as usize];
        apply(&mut model, &lower);
        apply(&mut model, &upper);
        let got = fs::read(ws.p("ref.raw")).unwrap();
        assert_bytes_eq(&got, &model, "crash fixture reference");
    }
    let v = ws.info("disk.cow");
    eprintln!(
        "crash fixture: parent {} data bytes, top {} data bytes, built in {:?}",
        v["layers"][1]["data_bytes"],
        v["layers"][0]["data_bytes"],
        t.elapsed()
    );
    let f = Arc::new(CrashFixture { ws });
    *slot = Arc::downgrade(&f);
    f
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum CrashOp {
    FlattenInPlace,
    FlattenOutput,
    Commit,
}

impl CrashOp {
    fn args(self, run: usize) -> Vec<&'static str> {
        match self {
            CrashOp::FlattenInPlace => vec!["flatten", "disk.cow"],
            CrashOp::FlattenOutput if run % 2 == 0 => {
                vec!["flatten", "disk.cow", "--output", "out.img", "--format", "raw"]
            }
            CrashOp::FlattenOutput => {
                vec!["flatten", "disk.cow", "--output", "out.img", "--format", "cowdisk"]
            }
            CrashOp::Commit => vec!["commit", "disk.cow", "--force"],
        }
    }
}

/// Copies the pristine chain into a fresh directory.
fn fresh_chain(fx: &CrashFixture, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for n in ["disk.cow", "disk-0.cow"] {
        copy_sparse(&fx.ws.p(n), &dir.join(n));
    }
}

/// Verifies what a user may rely on after the operation was killed (or finished): returns
/// "before" or "after".
fn verify_after_kill(fx: &CrashFixture, dir: &Path, op: CrashOp, run: usize) -> &'static str {
    let reference = fx.ws.p("ref.raw");
    // The chain opens.
    let info = run_in(dir, &["info", "--json", "disk.cow"]);
    assert_eq!(info.code, Some(0), "chain does not open\n{}", info.describe());
    let v: Value = serde_json::from_str(&info.stdout).unwrap();
    // No corruption anywhere in the chain (leaks allowed).
    let c = run_in(dir, &["check", "--chain", "disk.cow"]);
    assert!(c.code == Some(0) || c.code == Some(3), "check --chain after kill\n{}", c.describe());
    // The merged device is unchanged.
    let out = unique(".dev", "raw");
    ok_in(dir, &["flatten", "disk.cow", "--output", &out, "--format", "raw"]);
    assert!(same_file_bytes(&dir.join(&out), &reference), "{op:?} run {run}: merged device differs from before");
    fs::remove_file(dir.join(&out)).unwrap();
    let layers = v["layers"].as_array().unwrap().len();
    match op {
        CrashOp::FlattenInPlace => {
            assert!(
                same_file_bytes(&dir.join("disk-0.cow"), &fx.ws.p("disk-0.cow")),
                "flatten in place wrote into the frozen parent"
            );
            match layers {
                2 => "before",
                1 => "after",
                n => panic!("{n} layers after flatten"),
            }
        }
        CrashOp::FlattenOutput => {
            assert_eq!(layers, 2);
            let o = dir.join("out.img");
            if !o.exists() {
                return "before";
            }
            if run % 2 == 0 {
                assert!(same_file_bytes(&o, &reference), "out.img is incomplete");
            } else {
                let c = run_in(dir, &["check", "out.img"]);
                assert_eq!(c.code, Some(0), "{}", c.describe());
                let v = serde_json::from_str::<Value>(&ok_in(dir, &["info", "--json", "out.img"])).unwrap();
                assert_eq!(v["layers"].as_array().unwrap().len(), 1);
                ok_in(dir, &["flatten", "out.img", "--output", "out.raw", "--format", "raw"]);
                assert!(same_file_bytes(&dir.join("out.raw"), &reference), "out.img differs");
            }
            "after"
        }
        CrashOp::Commit => {
            assert_eq!(layers, 2);
            assert_eq!(v["layers"][1]["flags"][0], json!("frozen"));
            if v["layers"][0]["data_bytes"] == json!(0) {
                "after"
            } else {
                "before"
            }
        }
    }
}

fn crash_test(op: CrashOp) {
    let fx = crash_fixture();
    let ws = Ws::in_memory(&test_name());
    // One uncut run: that it succeeds, and roughly how long it takes here.
    let dir = ws.p("full");
    fresh_chain(&fx, &dir);
    let t = Instant::now();
    ok_in(&dir, &op.args(0));
    let mut full = t.elapsed();
    let first_full = full;
    assert_eq!(verify_after_kill(&fx, &dir, op, 0), "after");
    fs::remove_dir_all(&dir).unwrap();

    let mut rng = XorShift::new(op as u64 + 1);
    let mut states = Vec::new();
    let mut killed = 0;
    let kills = kills();
    for run in 0..kills {
        let dir = ws.p(&format!("run{run}"));
        fresh_chain(&fx, &dir);
        // Spread over the run: slot `run` of `kills`, at a pseudo-random point inside it.
        let frac = 0.02 + 0.88 * (run as f64 + (rng.next_u64() % 1000) as f64 / 1000.0) / kills as f64;
        let delay = full.mul_f64(frac);
        let start = Instant::now();
        let mut child = cowdisk_in(&dir, &op.args(run))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut finished = None;
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                finished = Some(start.elapsed());
                break;
            }
            thread::sleep(Duration::from_micros(500));
        }
        if finished.is_none() {
            child.kill().unwrap();
        }
        let o = child.wait_with_output().unwrap();
        match finished {
            Some(took) => {
                assert!(
                    o.status.success(),
                    "{op:?} failed on its own: {}\n{}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
                // It ran faster than the uncut run: aim the later kills at this duration.
                full = full.min(took);
            }
            None => {
                assert!(
                    o.status.code().is_none() || o.status.success(),
                    "{op:?}: {}\n{}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
                killed += 1;
            }
        }
        let state = verify_after_kill(&fx, &dir, op, run);
        // Every other time, the operation is run again after the crash: it completes, and
        // leaves a clean chain (what the crash leaked is reclaimed by the writable open).
        if state == "before" && run % 2 == 1 {
            ok_in(&dir, &op.args(run));
            assert_eq!(verify_after_kill(&fx, &dir, op, run), "after");
            let c = run_in(&dir, &["check", "--chain", "disk.cow"]);
            assert_eq!(c.code, Some(0), "after the re-run\n{}", c.describe());
        }
        states.push(format!("{:.0}ms:{state}", delay.as_secs_f64() * 1000.0));
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{op:?}: uncut run {first_full:?}; {killed}/{kills} killed mid-run; kill delay:state {states:?}");
    assert!(
        killed >= kills / 2,
        "{op:?}: only {killed} of {kills} runs were still running when killed (uncut run {first_full:?})"
    );
}

#[test]
fn kill_9_during_flatten_in_place_leaves_the_chain_before_or_after_never_broken() {
    crash_test(CrashOp::FlattenInPlace);
}

#[test]
fn kill_9_during_flatten_to_output_leaves_no_output_or_a_complete_one() {
    crash_test(CrashOp::FlattenOutput);
}

#[test]
fn kill_9_during_commit_leaves_the_device_unchanged_and_the_chain_intact() {
    crash_test(CrashOp::Commit);
}

// ---------------------------------------------------------------------------
// The main job: `cowdisk demo`
// ---------------------------------------------------------------------------

#[test]
fn demo_serves_an_overlay_on_a_base_holding_ext4_and_reuses_it_next_time() {
    let dir = TempDir::new("demo");
    let demo = dir.join("d");
    let sock = demo.join("nbd.sock");
    let mut cmd = Command::new(cowdisk_bin());
    cmd.arg("demo").arg("--dir").arg(&demo);
    let mut d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    assert!(d.log().contains("nbd+unix:///overlay?socket="), "{}", d.log());
    let mut c = common::nbdclient::NbdClient::connect_unix(&sock).unwrap();
    let info = c.opt_go("overlay", &[]).unwrap();
    assert_eq!(info.size, 64 << 20);
    if tool_path("mkfs.ext4").is_some() {
        // The ext4 superblock magic 0xEF53 at byte 1080: the base holds a real filesystem.
        let sb = c.read(1024, 1024).unwrap();
        assert_eq!(&sb[56..58], &[0x53, 0xef], "no ext4 superblock in the demo base");
    }
    drop(c);
    d.signal(libc::SIGINT).unwrap();
    assert_eq!(d.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0), "{}", d.log());
    // A second run reuses both images.
    let mut cmd = Command::new(cowdisk_bin());
    cmd.arg("demo").arg("--dir").arg(&demo);
    let mut d = Daemon::start(cmd, Ready::UnixSocket(sock.clone()));
    assert!(d.log().contains("reusing base") && d.log().contains("reusing overlay"), "{}", d.log());
    d.signal(libc::SIGTERM).unwrap();
    assert_eq!(d.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
}

#[test]
fn usage_errors_are_one_line_with_exit_code_2() {
    let ws = Ws::new();
    for (args, says) in [
        (&["frob"][..], "unrecognized subcommand 'frob'"),
        (&["create"][..], "<IMAGE>"),
        (&["create", "a.cow", "--size", "1G", "--chunk-size", "lots"][..], "invalid size 'lots'"),
        (&["info", "a.cow", "--colour"][..], "--colour"),
        (&["flatten", "a.cow", "--format", "raw"][..], "--output"),
    ] {
        let o = ws.run(args);
        assert_no_panic(&o);
        assert_eq!(o.code, Some(2), "{}", o.describe());
        let line = o.error_line();
        assert!(line.contains(says), "expected {says:?} in the error\n{}", o.describe());
        assert!(line.ends_with("(see 'cowdisk --help')"), "{}", o.describe());
    }
    // Help is still help: several lines on stdout, exit 0.
    let o = ws.run(&["create", "--help"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("--backing"), "{}", o.describe());
}
