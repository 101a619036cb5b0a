//! The local cache that every cowdisk process on a host shares: its directory, its size bound
//! and eviction, the layers' chunk files (`chunks.rs` owns one layer's), and small blobs named
//! by their digest (manifests).
//!
//! Invariants: the cache's files together stay within the size bound, least recently used
//! first out (a blob's modification time and a chunk record's time of last use are their last
//! use); what a blob read returns is exactly the content its name is the digest of (a fill is
//! verified, written to a temporary name and renamed; a read checks the CRC stored after the
//! content, so a file a power cut left short or wrong is dropped, never served); chunk files
//! keep their own invariants (`chunks.rs`); concurrent fetches of one thing in one process
//! make one fetch.
//!
//! The bound is one for all processes: the bytes the cache holds are counted in one small file,
//! `.usage`, read and written under the lock file by every fill and eviction, and room is made
//! under that lock before a fill is written. A count a power cut may have left stale is
//! recounted: the file names the boot it was written in. So is one a killed process left in
//! the middle of a change (marked unsettled while the change runs), and the recount first
//! punches out the bytes such a change may have left that no record covers.

use super::chunks::LayerChunks;
use super::coalesce::Coalescer;
use super::index;
use super::manifest::{hex, Digest, Manifest};
use crate::error::{err, Error, ErrorKind, Result};
use crate::sync::lock;
use byteorder::{ByteOrder, LE};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime};

/// A use younger than this does not update a blob's time (one syscall saved per read).
const TOUCH_AFTER: Duration = Duration::from_secs(60);

/// A fill's temporary file older than this was left by a process that died.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// The longest wait for the cache's lock file. Its holders keep it for a publish, a fill or
/// an eviction (milliseconds); one that holds it longer is stuck (stopped with SIGSTOP or ^Z, a
/// frozen container, an fsync hung on a bad disk), and what the lock guards is best effort:
/// the waiter goes on without caching rather than with it.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// How long fills wait to be published together: one sync of a layer's data file covers all
/// the fills of this interval.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

pub struct Cache {
    dir: PathBuf,
    limit: u64,
    blob_fetches: Coalescer<Digest>,
    /// The layers whose chunks this process has opened (each opened once, shared by every
    /// chain, prefetch and pull of the process).
    layers: Mutex<HashMap<Digest, Arc<LayerChunks>>>,
    /// Set when fills wait to be published; the publisher thread waits on it.
    wake: (Mutex<bool>, Condvar),
    /// A wait for the lock file ran out and none has been taken since: later callers look
    /// once instead of waiting, so that a stuck holder costs one wait of [`LOCK_WAIT`], not one
    /// per read.
    lock_stuck: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache({}, {} bytes)", self.dir.display(), self.limit)
    }
}

/// The default place: `$XDG_CACHE_HOME/cowdisk`, `~/.cache/cowdisk`, or for root
/// `/var/cache/cowdisk`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("cowdisk");
    }
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/cache/cowdisk");
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache/cowdisk")
}

fn io(op: &'static str, p: &Path, e: std::io::Error) -> Error {
    Error::io(op, e).with_file(p)
}

/// Something eviction may remove.
enum Victim {
    Blob(PathBuf),
    /// A layer's index file and one of its records.
    Chunk(Arc<PathBuf>, usize, index::Record),
}

impl Cache {
    /// The cache in `dir` (made if missing), holding at most `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<Cache> {
        std::fs::create_dir_all(dir).map_err(|e| io("create cache directory", dir, e))?;
        let c = Cache {
            dir: dir.to_path_buf(),
            limit,
            blob_fetches: Coalescer::new(),
            layers: Mutex::new(HashMap::new()),
            wake: (Mutex::new(false), Condvar::new()),
            lock_stuck: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(c)
    }

    /// Starts the thread that publishes this process's fills (every [`PUBLISH_EVERY`] while
    /// there are any); it ends when the cache is dropped.
    pub fn start_publisher(self: &Arc<Self>) {
        let weak: Weak<Cache> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("cache-publish".into()).spawn(move || loop {
            {
                let Some(c) = weak.upgrade() else { return };
                let mut w = lock(&c.wake.0);
                if !*w {
                    w = c.wake.1.wait_timeout(w, Duration::from_secs(1)).map_or_else(|p| p.into_inner().0, |r| r.0);
                }
                if !*w {
                    continue;
                }
                *w = false;
            }
            std::thread::sleep(PUBLISH_EVERY);
            let Some(c) = weak.upgrade() else { return };
            let _ = c.publish_all();
        });
        // Without the thread, fills are published when MAX_PENDING of them wait, and at exit.
        drop(spawned);
    }

    pub(super) fn wake_publisher(&self) {
        *lock(&self.wake.0) = true;
        self.wake.1.notify_one();
    }

    /// Publishes every pending fill of this process (the publisher does this continually;
    /// call it before exiting so the last fills are kept).
    pub fn publish_all(&self) -> Result<()> {
        let layers: Vec<_> = lock(&self.layers).values().cloned().collect();
        let mut first_error = None;
        for l in layers {
            if let Err(e) = l.publish(self) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The most a read's miss fetches beyond what it asked for (read-ahead, its GET's window,
    /// a prefetch run): an eighth of the bound, so that it is still cached when read.
    pub(crate) fn ahead_bound(&self) -> u64 {
        self.limit / 8
    }

    /// The cache's lock file (made if missing), open for writing, and its path.
    fn lock_file(&self) -> Result<(std::fs::File, PathBuf)> {
        let p = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| io("open", &p, e))?;
        Ok((f, p))
    }

    /// Runs `f` with the cache's lock file locked exclusively (publishing chunks, eviction).
    /// Waits at most [`LOCK_WAIT`] for another holder (and not at all while an earlier wait
    /// ran out and no lock has been taken since); past that, fails with `InUse`.
    pub(super) fn with_lock<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let (file, p) = self.lock_file()?;
        let wait = if self.lock_stuck.load(Ordering::Acquire) { Duration::ZERO } else { LOCK_WAIT };
        if !crate::storage::flock_within(&file, wait).map_err(|e| io("lock", &p, e))? {
            self.lock_stuck.store(true, Ordering::Release);
            return Err(err(
                ErrorKind::InUse,
                format!("another process has held the cache's lock for over {} s", LOCK_WAIT.as_secs()),
            )
            .with_file(&p));
        }
        self.lock_stuck.store(false, Ordering::Release);
        Ok(f())
    }

    /// The chunks of layer `d` (manifest `m`) in this cache.
    pub(crate) fn layer(&self, d: &Digest, m: &Manifest) -> Result<Arc<LayerChunks>> {
        let mut layers = lock(&self.layers);
        if let Some(l) = layers.get(d) {
            return Ok(l.clone());
        }
        self.refuse_without_holes()?;
        let l = self.with_lock(|| {
            // A new index file is bytes of the cache like any fill: room made for it, and
            // counted, before it is made (so a scan meanwhile does not count it twice).
            let have = std::fs::metadata(index::paths(&self.dir, &hex(d)).0).map_or(0, |f| f.len());
            self.fill_locked(index::index_len(m).saturating_sub(have), || LayerChunks::open_locked(&self.dir, d, m))
        })??;
        let l = Arc::new(l);
        layers.insert(*d, l.clone());
        Ok(l)
    }

    /// A layer's chunks are kept at their offsets in a sparse file, and evicting one punches
    /// it out. On a file system that cannot punch holes (exFAT, FAT, some FUSE mounts) every
    /// file would take the space up to its last chunk, and eviction, writing zeros, would free
    /// none: the cache would pass its bound without limit (65 MiB on disk for an 8 MiB bound
    /// after one read of a 64 MiB layer, measured on exFAT). So no layer is taken there, and
    /// reads go to the store uncached, said once on stderr (manifests, whole small files, are
    /// still kept).
    fn refuse_without_holes(&self) -> Result<()> {
        if crate::storage::punches_holes(&self.lock_file()?.0) {
            return Ok(());
        }
        Err(err(
            ErrorKind::Unsupported,
            "its file system cannot punch holes, so evicted chunks would keep their space and the cache could not keep its bound",
        )
        .with_file(&self.dir))
    }

    fn file(&self, d: &Digest) -> PathBuf {
        let h = hex(d);
        self.dir.join(&h[..2]).join(&h)
    }

    /// Every blob file: (path, size, last use).
    fn scan_blobs(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(subs) = std::fs::read_dir(&self.dir) else { return out };
        for sub in subs.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name().len() == 2) {
            let Ok(files) = std::fs::read_dir(sub.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                if name.len() != 64 {
                    // A fill's temporary file, left by a process killed between its write and
                    // its rename: gone once it is older than any fill takes.
                    let stale = f.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                    if name.to_string_lossy().ends_with(".tmp") && stale.is_some_and(|a| a > STALE_TMP) {
                        let _ = std::fs::remove_file(f.path());
                    }
                    continue;
                }
                if let Ok(m) = f.metadata() {
                    out.push((f.path(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                }
            }
        }
        out
    }

    /// Everything the bound counts: the total, and what eviction may remove with its size
    /// and last use (seconds since 1970).
    fn scan(&self) -> (u64, Vec<(Victim, u64, u64)>) {
        let mut total = 0;
        let mut out = Vec::new();
        for (p, size, t) in self.scan_blobs() {
            total += size;
            let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            out.push((Victim::Blob(p), size, secs));
        }
        let Ok(files) = std::fs::read_dir(self.dir.join("layers")) else { return (total, out) };
        for f in files.flatten() {
            let p = f.path();
            if p.extension().map_or(true, |e| e != "index") {
                continue;
            }
            total += f.metadata().map_or(0, |m| m.len());
            let ip = Arc::new(p);
            for (i, r) in index::records_of(&ip) {
                let size = index::footprint(u64::from(r.length));
                total += size;
                out.push((Victim::Chunk(ip.clone(), i, r), size, u64::from(r.last_use)));
            }
        }
        (total, out)
    }

    /// The bytes of the layers' index files, which eviction never removes.
    pub(super) fn index_bytes(&self) -> u64 {
        let Ok(files) = std::fs::read_dir(self.dir.join("layers")) else { return 0 };
        files
            .flatten()
            .filter(|f| f.path().extension().is_some_and(|e| e == "index"))
            .map(|f| f.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    /// The bytes the bound counts, counted now.
    pub fn size_on_disk(&self) -> u64 {
        self.scan().0
    }

    /// Runs `write`, which adds `n` bytes to the cache, after making room for them (evicting
    /// first if they would pass the bound), and counts them once it succeeded. The caller holds
    /// the lock file.
    pub(super) fn fill_locked<T>(&self, n: u64, write: impl FnOnce() -> Result<T>) -> Result<T> {
        self.change_locked(|used| {
            let used =
                if used + n > self.limit { self.evict_locked((self.limit / 10 * 9).saturating_sub(n))? } else { used };
            Ok((write()?, used + n))
        })
    }

    /// Every change of what the cache holds, under the lock file (the caller holds it): `f` gets
    /// the bytes held and returns what it made of them. While it runs, `.usage` says the count
    /// is unsettled: a process killed in the middle (between a fill's data and its record, or
    /// an eviction's records and its punches) leaves it so, and the next holder of the lock
    /// recounts and punches out what no record covers (see [`Cache::usage_locked`]) instead of
    /// carrying those bytes uncounted. An `f` that fails leaves it unsettled too.
    fn change_locked<T>(&self, f: impl FnOnce(u64) -> Result<(T, u64)>) -> Result<T> {
        let used = self.usage_locked();
        self.set_usage_locked(UNSETTLED);
        let (out, total) = f(used)?;
        self.set_usage_locked(total);
        Ok(out)
    }

    /// The bytes the cache holds, from `.usage` (the caller holds the lock file). Counted
    /// afresh when the file is missing or damaged, from an earlier boot (a power cut may have
    /// lost its last writes, which are not synced), or unsettled (its writer died in a change);
    /// a recount first punches out every byte of a layer's data file that no record covers,
    /// which only a change cut short leaves (every fill is written and recorded under the lock).
    fn usage_locked(&self) -> u64 {
        let boot = boot_id();
        if let Ok(b) = std::fs::read(self.dir.join(".usage")) {
            if b.len() == USAGE_LEN && &b[..8] == USAGE_MAGIC && LE::read_u64(&b[8..16]) == boot {
                let n = LE::read_u64(&b[16..24]);
                if n != UNSETTLED {
                    return n;
                }
            }
        }
        self.sweep_locked();
        let total = self.scan().0;
        self.set_usage_locked(total);
        total
    }

    /// Punches what no record covers out of every layer's data file (best effort: a file that
    /// cannot be swept keeps its stray bytes until its chunks are fetched again).
    fn sweep_locked(&self) {
        let Ok(files) = std::fs::read_dir(self.dir.join("layers")) else { return };
        for f in files.flatten() {
            let ip = f.path();
            if ip.extension().is_some_and(|e| e == "index") {
                if let Some(shift) = index::shift_of(&ip) {
                    let _ = index::sweep_locked(&ip, &ip.with_extension("data"), shift);
                }
            }
        }
    }

    fn set_usage_locked(&self, total: u64) {
        let mut b = [0u8; USAGE_LEN];
        b[..8].copy_from_slice(USAGE_MAGIC);
        LE::write_u64(&mut b[8..16], boot_id());
        LE::write_u64(&mut b[16..24], total);
        // Not synced: a count lost to a power cut is recounted in the next boot (above).
        let _ = std::fs::write(self.dir.join(".usage"), b);
    }

    /// The most bytes of fills a layer holds for publishing: an eighth of the bound, so that
    /// what waits to be written stays small beside what the cache holds.
    pub(super) fn max_pending(&self) -> u64 {
        (self.limit / 8).clamp(64 << 10, 32 << 20)
    }

    /// The content of blob `d` if the cache holds it (a use: it moves to the back of the
    /// eviction order).
    ///
    /// A file holds the content and its CRC-32 (4 bytes, little-endian) after it. The content
    /// was checked against its digest before it was kept; what a read checks is that the file
    /// is whole: fills are not synced before their rename (blobs are small and rare, but a
    /// sync each would still cost more than checking them), so after a power cut a file may
    /// hold less or other than was written; such a file is removed and counts as not cached.
    /// The cache is trusted as far as the files of its owner are: it guards against crashes,
    /// not against someone writing into it.
    pub fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        let p = self.file(d);
        let mut bytes = std::fs::read(&p).ok()?;
        let whole = bytes.len() >= 4 && {
            let at = bytes.len() - 4;
            let crc = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            bytes.truncate(at);
            crc32fast::hash(&bytes) == crc
        };
        if !whole {
            let _ = std::fs::remove_file(&p);
            return None;
        }
        if let Ok(m) = std::fs::metadata(&p) {
            if m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > TOUCH_AFTER) {
                let _ = std::fs::File::options().write(true).open(&p).and_then(|f| f.set_modified(SystemTime::now()));
            }
        }
        Some(bytes)
    }

    /// The content of blob `d`: from the cache, or from `fetch` (which must return content
    /// already checked against `d`), then kept. Concurrent calls for one blob make one fetch.
    pub fn get_or_fetch(&self, d: &Digest, fetch: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
        self.blob_fetches.run(*d, &[], |_| false, || self.get(d), |_| fetch().inspect(|b| self.keep(d, b)))
    }

    /// Stores verified content under its digest (best effort: a cache that cannot be written
    /// only costs fetches).
    fn keep(&self, d: &Digest, content: &[u8]) {
        let p = self.file(d);
        if p.exists() {
            return;
        }
        let Some(parent) = p.parent() else { return };
        if std::fs::create_dir_all(parent).is_err() {
            return;
        }
        // Named after the blob and created exclusively: two processes that happen to share a
        // pid (containers on one cache) and a counter can never write one temporary file, and
        // so never publish one blob's bytes under another's name.
        static N: AtomicU64 = AtomicU64::new(0);
        let tmp = parent.join(format!(".{}.{}-{}.tmp", hex(d), std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let mut file = Vec::with_capacity(content.len() + 4);
        file.extend_from_slice(content);
        file.extend_from_slice(&crc32fast::hash(content).to_le_bytes());
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &file));
        let rename = || std::fs::rename(&tmp, &p).map_err(|e| io("rename", &p, e));
        let kept =
            written.is_ok() && self.with_lock(|| self.fill_locked(file.len() as u64, rename).is_ok()).unwrap_or(false);
        if !kept {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Brings the cache under 90% of its bound, least recently used first, under the lock
    /// file (so two processes do not evict twice over).
    pub fn evict(&self) -> Result<()> {
        self.with_lock(|| self.change_locked(|_| Ok(((), self.evict_locked(self.limit / 10 * 9)?))))?
    }

    /// Brings the cache down to `target` bytes, least recently used first, and returns what it
    /// then holds. The caller holds the lock file, inside [`Cache::change_locked`].
    fn evict_locked(&self, target: u64) -> Result<u64> {
        let (mut total, mut all) = self.scan();
        all.sort_by_key(|v| v.2);
        let mut chunks: HashMap<Arc<PathBuf>, Vec<(usize, index::Record)>> = HashMap::new();
        for (v, size, _) in all {
            if total <= target {
                break;
            }
            match v {
                Victim::Blob(p) => {
                    if std::fs::remove_file(&p).is_ok() {
                        total -= size;
                    }
                }
                Victim::Chunk(ip, i, r) => {
                    chunks.entry(ip).or_default().push((i, r));
                    total -= size;
                }
            }
        }
        for (ip, victims) in chunks {
            let Some(shift) = index::shift_of(&ip) else { continue };
            index::evict_locked(&ip, &ip.with_extension("data"), shift, &victims)?;
        }
        Ok(total)
    }
}

const USAGE_MAGIC: &[u8; 8] = b"CDUSAGE1";
/// `.usage`: magic, the boot it was written in (see [`boot_id`]), the bytes held; little-endian.
const USAGE_LEN: usize = 24;
/// The count while a change is under way (see [`Cache::change_locked`]): no cache holds this much.
const UNSETTLED: u64 = u64::MAX;

/// This boot of the machine, as a number: the first 8 bytes of the SHA-256 of the kernel's
/// boot id (0 where there is none, and then a count is trusted across a power cut).
fn boot_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        std::fs::read("/proc/sys/kernel/random/boot_id")
            .map_or(0, |b| LE::read_u64(&super::manifest::sha256(b.trim_ascii())[..8]))
    })
}

/// A size such as `10G` for the cache bound, from `COWDISK_CACHE_SIZE` (bytes or with a K, M,
/// G or T suffix), else 10 GiB.
pub fn limit_from_env() -> Result<u64> {
    match std::env::var("COWDISK_CACHE_SIZE") {
        Err(_) => Ok(10 << 30),
        Ok(v) => parse_size(&v)
            .ok_or_else(|| err(ErrorKind::InvalidArgument, format!("COWDISK_CACHE_SIZE={v} is not a size"))),
    }
}

pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::manifest::sha256;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cowdisk-cache-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_fill_is_kept_and_shared_with_another_open_of_the_cache() {
        let d = dir("share");
        let a = Cache::open(&d, 1 << 20).unwrap();
        let content = vec![7u8; 5000];
        let digest = sha256(&content);
        let got = a.get_or_fetch(&digest, || Ok(content.clone())).unwrap();
        assert_eq!(got, content);
        let b = Cache::open(&d, 1 << 20).unwrap();
        assert_eq!(b.get_or_fetch(&digest, || panic!("fetched again")).unwrap(), content);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_go_first() {
        let d = dir("bound");
        let c = Cache::open(&d, 40_000).unwrap();
        let chunks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 8000]).collect();
        for (i, ch) in chunks.iter().enumerate() {
            c.get_or_fetch(&sha256(ch), || Ok(ch.clone())).unwrap();
            // Distinct times for the order to be seen.
            let f = c.file(&sha256(ch));
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64);
            std::fs::File::options().write(true).open(&f).unwrap().set_modified(t).unwrap();
        }
        assert!(c.size_on_disk() <= 40_000, "{} bytes", c.size_on_disk());
        assert!(c.get(&sha256(&chunks[9])).is_some(), "the newest was evicted");
        assert!(c.get(&sha256(&chunks[0])).is_none(), "the oldest was kept");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_or_garbled_file_is_removed_and_fetched_again() {
        let d = dir("torn");
        let content: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        let digest = sha256(&content);
        let damage: [fn(&mut Vec<u8>); 3] = [|f| f.truncate(f.len() / 2), |f| f[100] ^= 1, |f| f.clear()];
        for hurt in damage {
            let c = Cache::open(&d, 1 << 20).unwrap();
            c.get_or_fetch(&digest, || Ok(content.clone())).unwrap();
            let f = c.file(&digest);
            let mut bytes = std::fs::read(&f).unwrap();
            hurt(&mut bytes);
            std::fs::write(&f, &bytes).unwrap();
            // A new process (a new open) checks the file before it trusts it.
            let again = Cache::open(&d, 1 << 20).unwrap();
            assert!(again.get(&digest).is_none(), "a damaged file was served");
            assert!(!f.exists(), "the damaged file was left");
            assert_eq!(again.get_or_fetch(&digest, || Ok(content.clone())).unwrap(), content);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_reads_of_one_chunk_make_one_fetch() {
        let d = dir("coalesce");
        let c = Arc::new(Cache::open(&d, 1 << 20).unwrap());
        let content = vec![3u8; 4096];
        let digest = sha256(&content);
        let fetches = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, content, fetches) = (c.clone(), content.clone(), fetches.clone());
                std::thread::spawn(move || {
                    c.get_or_fetch(&digest, || {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(content.clone())
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), content);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
    }
}
