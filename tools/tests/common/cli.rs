//! Helpers for the tests of the `cowdisk` commands (cli*.rs): running the binary in a working
//! directory and checking what a user sees, writing through `cowdisk serve` with a byte model of
//! what the disk must hold, and reading and damaging image files byte by byte.

use super::*;
use serde_json::Value;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// What one run of `cowdisk` produced.
pub struct Out {
    pub cmd: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }

    /// The one error line: stderr must be exactly one line starting "cowdisk: ".
    #[track_caller]
    pub fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{}", self.describe());
        assert!(lines[0].starts_with("cowdisk: "), "the error line must start with 'cowdisk: '\n{}", self.describe());
        lines[0]
    }
}

/// Never a panic, never a backtrace, never death by a signal.
#[track_caller]
pub fn assert_no_panic(o: &Out) {
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!o.stderr.contains(bad), "stderr contains {bad:?}\n{}", o.describe());
    }
    assert!(o.code.is_some(), "killed by a signal\n{}", o.describe());
    assert_ne!(o.code, Some(101), "exit code 101 is a panic\n{}", o.describe());
}

pub fn out_of(cmd: &Command, o: std::process::Output) -> Out {
    Out {
        cmd: format!("{cmd:?}"),
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A working directory in which `cowdisk` runs, so that paths (and messages) are short.
pub struct Ws {
    pub path: PathBuf,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl Ws {
    pub fn new() -> Ws {
        let dir = TempDir::for_test();
        Ws { path: dir.path().to_path_buf(), _guard: Box::new(dir) }
    }

    /// On tmpfs when there is one (see [`ShmDir`]).
    pub fn in_memory(tag: &str) -> Ws {
        match ShmDir::new(tag) {
            Some(d) => Ws { path: d.0.clone(), _guard: Box::new(d) },
            None => {
                let dir = TempDir::new(tag);
                Ws { path: dir.path().to_path_buf(), _guard: Box::new(dir) }
            }
        }
    }

    pub fn p(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        cowdisk_in(self.dir(), args)
    }

    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Out {
        run_in(self.dir(), args)
    }

    /// Runs, asserts exit 0 and a silent stderr, returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        ok_in(self.dir(), args)
    }

    /// Runs, asserts a non-zero exit and one error line containing every needle.
    #[track_caller]
    pub fn fail(&self, args: &[&str], needles: &[&str]) -> Out {
        let o = self.run(args);
        assert_ne!(o.code, Some(0), "expected failure\n{}", o.describe());
        let line = o.error_line().to_owned();
        for n in needles {
            assert!(line.contains(n), "error line lacks {n:?}: {line}\n{}", o.describe());
        }
        o
    }

    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}):\n{out}"))
    }

    #[track_caller]
    pub fn info(&self, image: &str) -> Value {
        self.json(&["info", "--json", image])
    }

    /// The merged device of `image`, read back through `flatten --output X --format raw`.
    #[track_caller]
    pub fn device(&self, image: &str) -> Vec<u8> {
        device_in(self.dir(), image)
    }

    pub fn serve_write(&self, image: &str, ops: &[Op]) {
        serve_write(&self.p(image), ops)
    }

    pub fn create(&self, image: &str, extra: &[&str]) {
        let mut args = vec!["create", image];
        args.extend_from_slice(extra);
        self.ok(&args);
    }
}

/// A fresh directory on tmpfs (/dev/shm), removed on drop; `None` without a tmpfs there.
/// The crash tests move hundreds of MiB through files that cowdisk fsyncs; a kill -9 (unlike
/// a power cut) leaves the page cache intact, so its outcome does not depend on the file
/// system, and memory keeps those tests fast and their timing steady on a busy disk.
pub struct ShmDir(pub PathBuf);

impl ShmDir {
    pub fn new(tag: &str) -> Option<ShmDir> {
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

pub fn cowdisk_in(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(cowdisk_bin());
    c.args(args).current_dir(dir).env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    c
}

#[track_caller]
pub fn run_in(dir: &Path, args: &[&str]) -> Out {
    let mut cmd = cowdisk_in(dir, args);
    let o = run_status(&mut cmd);
    let o = out_of(&cmd, o);
    assert_no_panic(&o);
    o
}

#[track_caller]
pub fn ok_in(dir: &Path, args: &[&str]) -> String {
    let o = run_in(dir, args);
    assert_eq!(o.code, Some(0), "expected success\n{}", o.describe());
    assert!(o.stderr.is_empty(), "a successful command printed to stderr\n{}", o.describe());
    o.stdout
}

pub static UNIQUE: AtomicU64 = AtomicU64::new(0);

pub fn unique(stem: &str, ext: &str) -> String {
    format!("{stem}-{}.{ext}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

#[track_caller]
pub fn device_in(dir: &Path, image: &str) -> Vec<u8> {
    let out = unique(".device", "raw");
    ok_in(dir, &["flatten", image, "--output", &out, "--format", "raw"]);
    let p = dir.join(&out);
    let bytes = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    bytes
}

pub fn on_disk(p: &Path) -> u64 {
    fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).blocks() * 512
}

pub fn inode(p: &Path) -> (u64, u64) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.dev(), m.ino())
}

// ---------------------------------------------------------------------------
// Writing through `cowdisk serve`, and the model of what the disk must hold
// ---------------------------------------------------------------------------

#[derive(Clone)]
pub enum Op {
    Data(u64, Vec<u8>),
    /// NBD_CMD_WRITE_ZEROES without NO_HOLE (the server may record zeros without data).
    Zero(u64, u64),
}

pub fn data(offset: u64, len: u64, seed: u64) -> Op {
    Op::Data(offset, random_bytes(len as usize, seed))
}

pub fn apply(model: &mut [u8], ops: &[Op]) {
    for op in ops {
        match op {
            Op::Data(off, d) => model[*off as usize..*off as usize + d.len()].copy_from_slice(d),
            Op::Zero(off, len) => model[*off as usize..(*off + *len) as usize].fill(0),
        }
    }
}

/// `count` writes of 4 KiB-multiple lengths in `min..=max` at 4 KiB-aligned offsets.
pub fn scattered(seed: u64, count: usize, size: u64, min: u64, max: u64) -> Vec<Op> {
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
pub fn serve_write(image: &Path, ops: &[Op]) {
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
pub fn written_block_bytes(size: u64, ops: &[Op]) -> u64 {
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

pub fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// File offset of the first map sector: the first map extent listed by the current header
/// slot (the one with the higher generation, u64 at byte 16; extents at byte 120).
pub fn first_map_sector(image: &Path) -> u64 {
    let mut hdr = vec![0u8; 8192];
    File::open(image).unwrap().read_exact(&mut hdr).unwrap();
    let slot = if le_u64(&hdr, 16) >= le_u64(&hdr, 4096 + 16) { 0 } else { 4096 };
    let off = le_u64(&hdr, slot + 120);
    let len = le_u64(&hdr, slot + 128);
    assert!(off >= 8192 && len > 0, "no map extent in {}", image.display());
    off
}

/// Flips one byte inside the first map entry of `image` (a checksum-covered byte).
pub fn corrupt_map_sector(image: &Path) {
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
pub fn append_leak(image: &Path) {
    let f = open_rw(image);
    let end = f.metadata().unwrap().len().next_multiple_of(2 * MIB);
    f.write_all_at(&random_bytes(64 * KIB as usize, 0x1ea4), end).unwrap();
    f.sync_all().unwrap();
}

/// Copies `src` to `dst` keeping holes holes (SEEK_DATA / SEEK_HOLE).
pub fn copy_sparse(src: &Path, dst: &Path) {
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
pub fn same_file_bytes(a: &Path, b: &Path) -> bool {
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
// Fixtures
// ---------------------------------------------------------------------------

/// raw base (4M random) <- disk-1.cow (frozen, 16K chunks) <- disk.cow; returns the model.
pub fn three_layer_chain(ws: &Ws) -> Vec<u8> {
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
