//! Shared helpers for the library's integration tests: scratch directories, deterministic bytes
//! and a store whose punches fail on demand.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use cowdisk::storage::Storage;

/// Where scratch directories go: $COWDISK_TEST_DIR if set, else /dev/shm when it is there (a
/// real file system with hole punching and locks, whose fsync does not wait for a disk, so the
/// many syncs of the property tests do not make the suite's time depend on the machine's disk),
/// else the system temp directory.
fn scratch_root() -> PathBuf {
    if let Some(d) = std::env::var_os("COWDISK_TEST_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && std::fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A scratch directory removed (with its contents) when dropped, also when a test panics.
pub struct TempDir(PathBuf);

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = scratch_root().join(format!("cowdisk-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce from the seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A store passing every operation on, whose punches fail while `failing` is set: a slot a
/// failed write gives back then keeps what the write put there (the library's FaultStorage
/// fails the Nth modifying operation of any kind, not punches alone). `refused` counts them.
#[derive(Debug)]
pub struct PunchFaults {
    inner: Arc<dyn Storage>,
    pub failing: AtomicBool,
    pub refused: AtomicUsize,
}

impl PunchFaults {
    pub fn new(inner: Arc<dyn Storage>) -> PunchFaults {
        PunchFaults { inner, failing: AtomicBool::new(false), refused: AtomicUsize::new(0) }
    }
}

impl Storage for PunchFaults {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowdisk::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> cowdisk::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> cowdisk::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> cowdisk::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> cowdisk::Result<()> {
        self.inner.sync()
    }
    fn write_durable(&self, buf: &[u8], offset: u64) -> cowdisk::Result<()> {
        // Passed on, not left to the trait's write-and-sync: the crash model must see a
        // journal record as the one durable write it is (format-spec §5.9).
        self.inner.write_durable(buf, offset)
    }
    fn punch(&self, offset: u64, len: u64) -> cowdisk::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(cowdisk::Error::new(cowdisk::ErrorKind::Io, "the punch failed"));
        }
        self.inner.punch(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> cowdisk::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn next_data(&self, offset: u64) -> cowdisk::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> cowdisk::Result<u64> {
        self.inner.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
}

/// Writes `bytes` to a new file at `p`, leaving its all-zero 4 KiB blocks as holes: a crash
/// state holds punched space as zeros, and `check` counts free space that holds data (not
/// holes) as leaked.
pub fn write_sparse(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p)?;
    f.set_len(bytes.len() as u64)?;
    for (i, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096)?;
        }
    }
    Ok(())
}
