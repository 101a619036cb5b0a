//! The local cache of remote chunks that every cowdisk process on a host shares: one file per
//! chunk, named by its digest, so any process may use any other's fills.
//!
//! Invariants: what a read returns is exactly the content its name is the digest of (a fill
//! is verified, written to a temporary name and renamed, so two processes filling the same
//! chunk write the same bytes; a read verifies again, so a file a power cut left short or
//! wrong is dropped, never served);
//! the files together stay within the size bound, least recently used first out (a file's
//! modification time is its last use); concurrent reads of one chunk in one process make one
//! fetch.

use super::manifest::{hex, Digest};
use crate::error::{err, Error, ErrorKind, Result};
use crate::sync::lock;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// A use younger than this does not update a file's time (one syscall saved per read).
const TOUCH_AFTER: Duration = Duration::from_secs(60);

/// A fill in flight: set to true (and waiters woken) when the fetching thread is done.
type Fill = (Mutex<bool>, Condvar);

/// Most chunks a process remembers having checked (about 6 MiB of memory).
const MAX_VERIFIED: usize = 1 << 16;

/// A fill's temporary file older than this was left by a process that died.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

pub struct Cache {
    dir: PathBuf,
    limit: u64,
    /// This process's estimate of the bytes in the cache (other processes add to it too: a
    /// scan under the lock file corrects it).
    ///
    /// `None` until the first fill counts the files: a warm start (nothing to fill) should not
    /// pay a walk over thousands of files. A fill's rename and its count, and an eviction's
    /// scan, removals and new count, each happen under this lock, so no count of this
    /// process is lost between them.
    used: Mutex<Option<u64>>,
    inflight: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Chunk files this process has checked against their names (or written itself), with
    /// when it last marked each as used. A file, once checked, is read by range without
    /// hashing again: a file in the cache only ever changes by eviction (removal) and a new
    /// fill (checked by its filler), so it holds what was checked until it is gone. A new
    /// process checks again (a crash may have left a bad file).
    verified: Mutex<HashMap<Digest, Instant>>,
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

/// Runs `f` with the cache's lock file locked exclusively (eviction; fills need no lock).
fn with_lock<T>(dir: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let p = dir.join(".lock");
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(|e| io("open", &p, e))?;
    // SAFETY: flock on a descriptor we hold; released when the file closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("lock", &p, std::io::Error::last_os_error()));
    }
    Ok(f())
}

impl Cache {
    /// The cache in `dir` (made if missing), holding at most `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<Cache> {
        std::fs::create_dir_all(dir).map_err(|e| io("create cache directory", dir, e))?;
        let c = Cache {
            dir: dir.to_path_buf(),
            limit,
            used: Mutex::new(None),
            inflight: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
        };
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn file(&self, d: &Digest) -> PathBuf {
        let h = hex(d);
        self.dir.join(&h[..2]).join(&h)
    }

    /// Every chunk file: (path, size, last use).
    fn scan(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(subs) = std::fs::read_dir(&self.dir) else { return out };
        for sub in subs.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
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

    /// The bytes of all chunk files, counted now.
    pub fn size_on_disk(&self) -> u64 {
        self.scan().iter().map(|f| f.1).sum()
    }

    /// The content of chunk `d` if the cache holds it (a use: it moves to the back of the
    /// eviction order).
    ///
    /// A file holds the content and its CRC-32 (4 bytes, little-endian) after it. The content
    /// was checked against its digest before it was kept; what a read checks is that the file
    /// is whole: fills are not synced before their rename (a sync per fetched chunk would cost
    /// more than the fetch), so after a power cut a file may hold less or other than was
    /// written; such a file is removed and the chunk counts as not cached. A CRC finds a torn
    /// or garbled file as well as SHA-256 would and costs a tenth of it (a warm start reads
    /// every chunk it touches once through here). The cache is trusted as far as the files
    /// of its owner are: it guards against crashes, not against someone writing into it.
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
        self.mark_verified(d);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > TOUCH_AFTER) {
                let _ = std::fs::File::options().write(true).open(&p).and_then(|f| f.set_modified(SystemTime::now()));
            }
        }
        Some(bytes)
    }

    /// Notes that this process checked (or wrote) chunk `d`'s file. The set is bounded: past
    /// [`MAX_VERIFIED`] it starts again, which costs a CRC per file read next, not memory
    /// growing with everything a long-running server has read.
    fn mark_verified(&self, d: &Digest) {
        let mut v = lock(&self.verified);
        if v.len() >= MAX_VERIFIED {
            v.clear();
        }
        v.insert(*d, Instant::now());
    }

    /// Whether the cache has a file for chunk `d` (not checked).
    pub fn has(&self, d: &Digest) -> bool {
        self.file(d).exists()
    }

    /// Reads `buf.len()` bytes at `offset` of chunk `d` if this process has checked its file
    /// before and it is still there; false otherwise (the caller then takes the whole chunk
    /// through [`Cache::get_or_fetch`], which checks it).
    pub fn read_verified(&self, d: &Digest, offset: u64, buf: &mut [u8]) -> bool {
        use std::os::unix::fs::FileExt;
        let touch = {
            let mut v = lock(&self.verified);
            let Some(last) = v.get_mut(d) else { return false };
            let stale = last.elapsed() > TOUCH_AFTER;
            if stale {
                *last = Instant::now();
            }
            stale
        };
        let p = self.file(d);
        let Ok(f) = std::fs::File::open(&p) else {
            lock(&self.verified).remove(d);
            return false;
        };
        if f.read_exact_at(buf, offset).is_err() {
            return false;
        }
        if touch {
            let _ = std::fs::File::options().write(true).open(&p).and_then(|f| f.set_modified(SystemTime::now()));
        }
        true
    }

    /// The content of chunk `d`: from the cache, or from `fetch` (which must return content
    /// already checked against `d`), then kept. Concurrent calls for one chunk make one fetch.
    pub fn get_or_fetch(&self, d: &Digest, fetch: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
        if let Some(b) = self.get(d) {
            return Ok(b);
        }
        let (slot, first) = {
            let mut m = lock(&self.inflight);
            match m.get(d) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new((Mutex::new(false), Condvar::new()));
                    m.insert(*d, s.clone());
                    (s, true)
                }
            }
        };
        if !first {
            // Another thread fetches it: wait, then take what it kept (or fetch ourselves if
            // it failed).
            let mut done = lock(&slot.0);
            while !*done {
                done = slot.1.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            drop(done);
            if let Some(b) = self.get(d) {
                return Ok(b);
            }
            return fetch().inspect(|b| self.keep(d, b));
        }
        // Waiters are released however this ends, a panic in `fetch` included: otherwise
        // every later read of the chunk would wait for a fill that never comes.
        struct Release<'a>(&'a Cache, &'a Digest, &'a Fill);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                lock(&self.0.inflight).remove(self.1);
                *lock(&self.2 .0) = true;
                self.2 .1.notify_all();
            }
        }
        let _release = Release(self, d, &slot);
        let r = fetch();
        if let Ok(b) = &r {
            self.keep(d, b);
        }
        r
    }

    /// Stores verified content under its digest (best effort: a cache that cannot be written
    /// only costs fetches).
    pub(crate) fn keep(&self, d: &Digest, content: &[u8]) {
        let p = self.file(d);
        if p.exists() {
            return;
        }
        let Some(parent) = p.parent() else { return };
        if std::fs::create_dir_all(parent).is_err() {
            return;
        }
        // Named after the chunk and created exclusively: two processes that happen to share a
        // pid (containers on one cache) and a counter can never write one temporary file, and
        // so never publish one chunk's bytes under another's name.
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
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let over = {
            let mut used = lock(&self.used);
            if std::fs::rename(&tmp, &p).is_err() {
                let _ = std::fs::remove_file(&tmp);
                return;
            }
            let now = match *used {
                // The first fill counts what is there, itself included.
                None => self.scan().iter().map(|f| f.1).sum(),
                Some(u) => u + file.len() as u64,
            };
            *used = Some(now);
            now > self.limit
        };
        self.mark_verified(d);
        if over {
            let _ = self.evict();
        }
    }

    /// Brings the cache under 90% of its bound, least recently used first, under the lock
    /// file (so two processes do not evict twice over).
    pub fn evict(&self) -> Result<()> {
        let mut used = lock(&self.used);
        with_lock(&self.dir, || {
            let mut files = self.scan();
            let mut total: u64 = files.iter().map(|f| f.1).sum();
            let target = self.limit / 10 * 9;
            files.sort_by_key(|f| f.2);
            for (p, size, _) in files {
                if total <= target {
                    break;
                }
                if std::fs::remove_file(&p).is_ok() {
                    total -= size;
                }
            }
            *used = Some(total);
        })
    }
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
            let mut part = [0u8; 16];
            assert!(!again.read_verified(&digest, 0, &mut part), "read by range unchecked");
            assert_eq!(again.get_or_fetch(&digest, || Ok(content.clone())).unwrap(), content);
            assert!(again.read_verified(&digest, 100, &mut part));
            assert_eq!(part[..], content[100..116]);
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
