//! One remote layer's chunks in the shared cache, the way overlaybd caches a blob: a sparse
//! data file holding each cached chunk where the layer's image has it (chunk index times chunk
//! size), and an index with one record per manifest entry. A warm read is a read of one file,
//! which the kernel reads ahead like a local layer's (one file per chunk made a warm boot
//! 1.3x a local one: every chunk cost a lookup and a read of its own).
//!
//! Invariants (format-spec §9.5, informative):
//! - a record names content only once that content is durable: a fill stays in memory until
//!   a publish writes it, syncs the data file, and only then writes its record. A power cut
//!   so leaves records of whole chunks only, and a read needs no check of what it reads (a
//!   record itself carries a CRC, so a torn or garbled one reads as absent);
//! - the data file is written (a publish) and holes are punched in it (an eviction) only
//!   under the cache's lock file, and an eviction clears and syncs the records before it
//!   punches, so a record found after any crash still names its bytes;
//! - a read takes the record's tag before and after it reads the data and trusts the data
//!   only if the tag is the same: an eviction clears the tag before punching, and every
//!   publish writes a new one;
//! - a process fetching an entry holds a lock on that entry's record (an OFD byte-range lock
//!   on the index file) from before its request until the fill is published or dropped; a
//!   process missing the same entry waits for the lock and then looks in the cache again, so
//!   concurrent misses of one chunk by several processes make one fetch. Within a process
//!   the coalescer does this (one open file description holds the locks of all its threads).

use super::cache::Cache;
use super::coalesce::Coalescer;
use super::index::{footprint, index_header, now_secs, paths, record_offset, Record, HEADER, RECORD};
use super::manifest::{Digest, Manifest};
use crate::error::{err, Error, ErrorKind, Result};
use crate::storage::Storage;
use crate::storage::{FileStorage, LockMode};
use crate::sync::lock;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The longest a process waits for another's fetch of a chunk before fetching it itself:
/// longer than a fetch takes with its retries (COWDISK_S3_RETRY_TIMEOUT, 15 s by default).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// A use younger than this does not rewrite the record's time (a write saved per read).
const TOUCH_AFTER: u32 = 60;

pub struct LayerChunks {
    /// Entry `i`'s chunk index and content length (0: no content).
    entries: Vec<(u64, u32)>,
    shift: u32,
    index: FileStorage,
    data: FileStorage,
    /// For each entry, the tag of the record this process last saw naming it (0: none).
    known: Vec<AtomicU64>,
    /// Fills not yet published, which reads of this process take from here.
    pending: Mutex<HashMap<usize, Arc<Vec<u8>>>>,
    pending_bytes: AtomicU64,
    fetches: Coalescer<usize>,
    /// Entries whose record this process holds locked (fetching, or fetched and pending).
    claimed: Mutex<std::collections::HashSet<usize>>,
    /// Entries whose claim this process waited [`CLAIM_WAIT`] for in vain, while another
    /// process still holds them: that process is stopped or stuck, and no claim is waited
    /// for again until one of them is let go (a stopped process holds every entry it was
    /// fetching, and each wait would cost the whole limit again).
    given_up: Mutex<Vec<usize>>,
    /// Tags: a random start, counted up (a tag is never 0).
    next_tag: AtomicU64,
}

impl std::fmt::Debug for LayerChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerChunks({})", self.data.path().display())
    }
}

fn io(op: &'static str, p: &Path, e: std::io::Error) -> Error {
    Error::io(op, e).with_file(p)
}

impl LayerChunks {
    /// The chunks of layer `digest` (manifest `m`) in the cache in `dir`; the files are made
    /// (or made again, if they do not belong to this layer) under the cache's lock, which the
    /// caller holds.
    pub(super) fn open_locked(dir: &Path, digest: &Digest, m: &Manifest) -> Result<LayerChunks> {
        let name = super::manifest::hex(digest);
        let (ip, dp) = paths(dir, &name);
        if let Some(parent) = ip.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create cache directory", parent, e))?;
        }
        for p in [&ip, &dp] {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .map_err(|e| io("create", p, e))?;
        }
        let index = FileStorage::open(&ip, true, LockMode::None)?;
        let data = FileStorage::open(&dp, true, LockMode::None)?;
        let n = m.entries.len() as u64;
        let header = index_header(m.chunk_shift, n, digest);
        let mut found = [0u8; HEADER as usize];
        index.read_at(&mut found, 0)?;
        if found != header || index.len()? != HEADER + n * RECORD {
            // New, or not this layer's (a crash during a first open, or a foreign file):
            // start empty. Records go first, so no record outlives the bytes it names.
            index.set_len(0)?;
            data.set_len(0)?;
            index.set_len(HEADER + n * RECORD)?;
            index.write_at(&header, 0)?;
            index.sync()?;
        }
        let seed = u64::from_le_bytes(crate::layer::new_uuid()?[..8].try_into().unwrap_or([1; 8]));
        let entries: Vec<(u64, u32)> =
            m.entries.iter().map(|e| (e.chunk, e.content.map_or(0, |c| c.1.length))).collect();
        // The whole index, read once: the tags of what is cached now, and the index in the
        // page cache for the reads that check them (one read here, not one per first use).
        let mut all = vec![0u8; (n * RECORD) as usize];
        index.read_at(&mut all, HEADER)?;
        let known = all
            .chunks_exact(RECORD as usize)
            .zip(&entries)
            .map(|(b, e)| {
                let tag = Record::decode(b).filter(|r| r.chunk == e.0 && r.length == e.1).map_or(0, |r| r.tag);
                AtomicU64::new(tag)
            })
            .collect();
        Ok(LayerChunks {
            entries,
            shift: m.chunk_shift,
            index,
            data,
            known,
            pending: Mutex::new(HashMap::new()),
            pending_bytes: AtomicU64::new(0),
            fetches: Coalescer::new(),
            claimed: Mutex::new(std::collections::HashSet::new()),
            given_up: Mutex::new(Vec::new()),
            next_tag: AtomicU64::new(seed | 1),
        })
    }

    fn record(&self, i: usize) -> Option<Record> {
        let mut b = [0u8; RECORD as usize];
        self.index.read_at(&mut b, record_offset(i)).ok()?;
        Record::decode(&b).filter(|r| r.length == self.entries[i].1 && r.chunk == self.entries[i].0)
    }

    fn data_offset(&self, i: usize) -> u64 {
        self.entries[i].0 << self.shift
    }

    /// Fills `out` from entry `i`'s content at `at` if the cache holds it; false if not.
    pub fn read(&self, i: usize, at: usize, out: &mut [u8]) -> bool {
        let Some(&(_, length)) = self.entries.get(i) else { return false };
        if at + out.len() > length as usize {
            return false;
        }
        if self.pending_bytes.load(Ordering::Acquire) > 0 {
            if let Some(c) = lock(&self.pending).get(&i) {
                out.copy_from_slice(&c[at..at + out.len()]);
                return true;
            }
        }
        // Twice at most: once with the tag known, once more after a record seen anew.
        for _ in 0..2 {
            let k = self.known[i].load(Ordering::Acquire);
            if k != 0 {
                if self.data.read_at(out, self.data_offset(i) + at as u64).is_ok() {
                    if let Some(r) = self.record(i).filter(|r| r.tag == k) {
                        self.touch(i, r);
                        return true;
                    }
                }
                self.known[i].store(0, Ordering::Release);
            }
            match self.record(i) {
                Some(r) => self.known[i].store(r.tag, Ordering::Release),
                None => return false,
            }
        }
        false
    }

    /// Rewrites the record's time of last use when it is old (outside the record's CRC, so
    /// an eviction that clears the record meanwhile leaves it cleared).
    fn touch(&self, i: usize, r: Record) {
        let now = now_secs();
        if now.saturating_sub(r.last_use) > TOUCH_AFTER {
            let _ = self.index.write_at(&now.to_le_bytes(), record_offset(i) + 24);
        }
    }

    /// Whether the cache holds entry `i` (a pending fill counts).
    pub fn has(&self, i: usize) -> bool {
        lock(&self.pending).contains_key(&i) || self.record(i).is_some()
    }

    /// Entry `i`'s whole content: from the cache, or from `fetch`, which is given the entries
    /// to fetch (`i`, and those of `followers` up to the first one kept or being fetched) and
    /// returns checked content for them (a failure of any but `i` may leave it out). All is
    /// kept. Concurrent calls for one entry make one fetch.
    pub fn get_or_fetch(
        &self,
        cache: &Cache,
        i: usize,
        followers: &[usize],
        fetch: impl FnOnce(&[usize]) -> Result<Vec<(usize, Vec<u8>)>>,
    ) -> Result<Arc<Vec<u8>>> {
        let len = self.entries.get(i).map_or(0, |e| e.1 as usize);
        let cached = || {
            let mut b = vec![0u8; len];
            self.read(i, 0, &mut b).then(|| Arc::new(b))
        };
        self.fetches.run(
            i,
            followers,
            |j| self.has(j),
            cached,
            |run| {
                // Across processes: wait while another process fetches `i`; it may have
                // published `i` by then.
                let waited = self.claim_waiting(i);
                if waited {
                    if let Some(c) = cached() {
                        self.unclaim(&[i]);
                        return Ok(c);
                    }
                }
                // The followers another process is fetching are left to it.
                let mut mine: Vec<usize> = vec![i];
                mine.extend(run.iter().skip(1).copied().take_while(|&j| self.try_claim(j)));
                let got = fetch(&mine).inspect_err(|_| self.unclaim(&mine))?;
                let mut content = None;
                for (j, c) in got {
                    let c = Arc::new(c);
                    if j == i {
                        content = Some(c.clone());
                    }
                    self.keep(cache, j, c);
                }
                // Claims of entries not now waiting to be published end here; the others end
                // with their publish.
                let unkept: Vec<usize> = {
                    let p = lock(&self.pending);
                    mine.iter().copied().filter(|j| !p.contains_key(j)).collect()
                };
                self.unclaim(&unkept);
                content.ok_or_else(|| err(ErrorKind::Io, "a fetch did not return the chunk asked for"))
            },
        )
    }

    /// Takes the cross-process claim of entry `i` without waiting; false if another process
    /// holds it. A claim this process already holds counts as taken.
    fn try_claim(&self, i: usize) -> bool {
        let mut claimed = lock(&self.claimed);
        if claimed.contains(&i) {
            return true;
        }
        let ok = self.record_lock(i, libc::F_WRLCK);
        if ok {
            claimed.insert(i);
        }
        ok
    }

    /// Takes the claim of entry `i`, waiting (at most [`CLAIM_WAIT`]) while another process
    /// holds it. Returns whether it waited. Past the limit the fetch goes ahead unclaimed: a
    /// process stuck on a store that does not answer holds nobody else up for longer.
    ///
    /// While an earlier wait ran out on entries another process still holds, it does not wait
    /// at all (and counts as having waited: the caller looks in the cache, then fetches).
    fn claim_waiting(&self, i: usize) -> bool {
        if self.try_claim(i) {
            return false;
        }
        {
            let mut given_up = lock(&self.given_up);
            given_up.retain(|&j| self.held_elsewhere(j));
            if !given_up.is_empty() {
                given_up.push(i);
                return true;
            }
        }
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        while !self.try_claim(i) {
            if std::time::Instant::now() >= deadline {
                lock(&self.given_up).push(i);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }

    /// Whether another process holds entry `i`'s claim (a lock of this process's own open
    /// file description never conflicts with it, so this process's claims do not count).
    fn held_elsewhere(&self, i: usize) -> bool {
        // A failed look counts as held: the next wait is skipped, not doubled.
        self.record_fcntl(i, libc::F_OFD_GETLK, libc::F_WRLCK)
            .map_or(true, |fl| fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Ends this process's claims of `entries`.
    fn unclaim(&self, entries: &[usize]) {
        let mut claimed = lock(&self.claimed);
        for &j in entries {
            if claimed.remove(&j) {
                self.record_lock(j, libc::F_UNLCK);
            }
        }
    }

    /// One OFD lock call (never waiting) on entry `i`'s record; whether it succeeded.
    fn record_lock(&self, i: usize, l_type: libc::c_int) -> bool {
        self.record_fcntl(i, libc::F_OFD_SETLK, l_type).is_some()
    }

    /// `fcntl(cmd)` (F_OFD_SETLK or F_OFD_GETLK) with a lock of type `l_type` on entry `i`'s
    /// record: the lock as the call left it, or `None` if the call failed.
    fn record_fcntl(&self, i: usize, cmd: libc::c_int, l_type: libc::c_int) -> Option<libc::flock> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock is plain data; zeroed is a valid value for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = l_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = record_offset(i) as libc::off_t;
        fl.l_len = RECORD as libc::off_t;
        // SAFETY: the fd is the index file's, open for as long as self, and fl is a valid
        // flock for the OFD lock commands (F_OFD_GETLK only fills it in).
        let r = unsafe { libc::fcntl(self.index.file().as_raw_fd(), cmd, &mut fl) };
        (r == 0).then_some(fl)
    }

    /// Holds checked content of entry `j` for the next publish.
    fn keep(&self, cache: &Cache, j: usize, c: Arc<Vec<u8>>) {
        if self.entries.get(j).map_or(true, |e| e.1 as usize != c.len()) {
            return;
        }
        let n = c.len() as u64;
        if lock(&self.pending).insert(j, c).is_none() {
            self.pending_bytes.fetch_add(n, Ordering::AcqRel);
        }
        if self.pending_bytes.load(Ordering::Acquire) > cache.max_pending() {
            let _ = self.publish(cache);
        } else {
            cache.wake_publisher();
        }
    }

    /// Writes the pending fills to the data file, syncs it, then writes their records (all
    /// under the cache's lock file), and counts them.
    pub(super) fn publish(&self, cache: &Cache) -> Result<()> {
        let batch: Vec<(usize, Arc<Vec<u8>>)> = lock(&self.pending).iter().map(|(&j, c)| (j, c.clone())).collect();
        if batch.is_empty() {
            return Ok(());
        }
        let published = cache.with_lock(|| -> Result<()> {
            // No more than the bound can hold after eviction (90% of it, less the index files,
            // which are never evicted): the rest were served to their readers and are not
            // kept, rather than pushing the cache past its bound.
            let room = (cache.limit() / 10 * 9).saturating_sub(cache.index_bytes());
            let mut sum = 0;
            let fresh: Vec<_> = batch
                .iter()
                .filter(|(j, _)| self.record(*j).is_none())
                .take_while(|(_, c)| {
                    sum += footprint(c.len() as u64);
                    sum <= room
                })
                .collect();
            if fresh.is_empty() {
                return Ok(());
            }
            // Room first, under the lock: the bound holds for all processes together.
            cache.fill_locked(fresh.iter().map(|(_, c)| footprint(c.len() as u64)).sum(), || {
                for (j, c) in &fresh {
                    self.data.write_at(c, self.data_offset(*j))?;
                }
                self.data.sync()?;
                let now = now_secs();
                for (j, c) in &fresh {
                    let tag = self.next_tag.fetch_add(2, Ordering::Relaxed);
                    let r = Record { tag, chunk: self.entries[*j].0, length: c.len() as u32, last_use: now };
                    self.index.write_at(&r.encode(), record_offset(*j))?;
                    self.known[*j].store(tag, Ordering::Release);
                }
                Ok(())
            })
        });
        // Published, or not: either way the batch leaves memory and its claims end. A batch
        // that could not be published (a full or broken cache directory) was served to its
        // readers and is not kept: held for another try, the fills of a whole layer read
        // through a cache that keeps failing would pile up in memory. Its claims end so that
        // another process waiting for one of them fetches it itself instead of waiting out
        // CLAIM_WAIT for a publish that will not come; after a publish, it finds it cached.
        let mut p = lock(&self.pending);
        for (j, c) in &batch {
            if p.remove(j).is_some() {
                self.pending_bytes.fetch_sub(c.len() as u64, Ordering::AcqRel);
            }
        }
        drop(p);
        self.unclaim(&batch.iter().map(|(j, _)| *j).collect::<Vec<_>>());
        published.and_then(|r| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::manifest::{sha256, ChunkEntry, Codec, LayerKind, Location};
    use std::path::PathBuf;

    const SHIFT: u32 = 16;

    /// A raw layer of `n` chunks, each with content: chunk `i` is bytes `i + 1`.
    fn layer(n: u64) -> (Digest, Manifest, Vec<Vec<u8>>) {
        let contents: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 + 1; 1 << SHIFT]).collect();
        let entries = contents
            .iter()
            .enumerate()
            .map(|(i, c)| ChunkEntry {
                chunk: i as u64 * 3,
                blocks: None,
                content: Some((
                    sha256(c),
                    Location {
                        pack: [0; 32],
                        offset: 0,
                        stored: c.len() as u32,
                        length: c.len() as u32,
                        codec: Codec::Stored,
                    },
                )),
            })
            .collect();
        let m = Manifest {
            kind: LayerKind::Raw,
            uuid: [0; 16],
            virtual_size: (n * 3) << SHIFT,
            chunk_shift: SHIFT,
            parent: None,
            created: 0,
            entries,
        };
        (sha256(b"test layer"), m, contents)
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cowdisk-chunks-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn fill(c: &Cache, l: &LayerChunks, i: usize, contents: &[Vec<u8>]) {
        let got = l.get_or_fetch(c, i, &[], |_| Ok(vec![(i, contents[i].clone())])).unwrap();
        assert_eq!(*got, contents[i]);
    }

    #[test]
    fn a_fill_is_read_at_once_and_by_another_process_only_once_published() {
        let d = dir("publish");
        let (digest, m, contents) = layer(4);
        let a = Cache::open(&d, 1 << 30).unwrap();
        let la = a.layer(&digest, &m).unwrap();
        fill(&a, &la, 2, &contents);
        let mut part = [0u8; 100];
        assert!(la.read(2, 5, &mut part), "this process does not see its own fill");
        assert_eq!(part[..], contents[2][5..105]);
        // Another process (another open of the cache) sees nothing before the publish: what
        // a crash now would leave.
        let b = Cache::open(&d, 1 << 30).unwrap();
        let lb = b.layer(&digest, &m).unwrap();
        assert!(!lb.read(2, 0, &mut part));
        a.publish_all().unwrap();
        assert!(lb.read(2, 5, &mut part), "a published fill is not seen by another process");
        assert_eq!(part[..], contents[2][5..105]);
        // Where the image has the chunk: chunk index 6 (entry 2) at 6 << SHIFT.
        let data = std::fs::read(paths(&d, &crate::remote::manifest::hex(&digest)).1).unwrap();
        assert_eq!(data[6 << SHIFT..7 << SHIFT], contents[2][..]);
        assert!(!lb.read(1, 0, &mut part), "an entry never filled reads as cached");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_bound_counts_the_index_files_and_a_batch_never_passes_it() {
        let d = dir("bound");
        // 4096 entries: an index file of 128 KiB, a third of a bound of 6 chunks (384 KiB).
        let (digest, mut m, contents) = layer(4);
        let proto = m.entries[0].clone();
        m.entries = (0..4096u64).map(|i| ChunkEntry { chunk: i, ..proto.clone() }).collect();
        m.virtual_size = 4096 << SHIFT;
        let limit = 6 << SHIFT;
        let c = Cache::open(&d, limit).unwrap();
        // The cache in use already (its count kept, not recounted), when the layer comes.
        let (small, small_m, small_contents) = layer(2);
        let small = sha256(&[&small[..], b"small"].concat());
        fill(&c, &c.layer(&small, &small_m).unwrap(), 0, &small_contents);
        c.publish_all().unwrap();
        let l = c.layer(&digest, &m).unwrap();
        for i in 0..12 {
            // Kept without a publish in between: batches of several chunks.
            let got = l.get_or_fetch(&c, i, &[], |_| Ok(vec![(i, contents[0].clone())])).unwrap();
            assert_eq!(*got, contents[0]);
            if i % 5 == 4 {
                c.publish_all().unwrap();
            }
            assert!(c.size_on_disk() <= limit, "after {i}: {} bytes, bound {limit}", c.size_on_disk());
        }
        c.publish_all().unwrap();
        assert!(c.size_on_disk() <= limit, "{} bytes, bound {limit}", c.size_on_disk());
        let mut whole = vec![0u8; 1 << SHIFT];
        assert!((0..12).any(|i| l.read(i, 0, &mut whole)), "nothing kept");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_chunk_evicted_by_another_process_is_fetched_again_not_read_as_zeros() {
        let d = dir("evict");
        let (digest, m, contents) = layer(8);
        // Room for about four chunks.
        let a = Cache::open(&d, 5 << SHIFT).unwrap();
        let la = a.layer(&digest, &m).unwrap();
        fill(&a, &la, 0, &contents);
        a.publish_all().unwrap();
        let mut part = [0u8; 64];
        assert!(la.read(0, 0, &mut part));
        // Another process fills the rest, pushing the oldest out.
        let b = Cache::open(&d, 5 << SHIFT).unwrap();
        let lb = b.layer(&digest, &m).unwrap();
        for i in 1..8 {
            // Distinct times of last use, the first entry oldest.
            std::thread::sleep(std::time::Duration::from_millis(1));
            fill(&b, &lb, i, &contents);
            b.publish_all().unwrap();
        }
        assert!(b.size_on_disk() <= 5 << SHIFT, "{} bytes", b.size_on_disk());
        let mut whole = vec![0u8; 1 << SHIFT];
        let kept: Vec<usize> = (0..8).filter(|&i| la.read(i, 0, &mut whole) && whole == contents[i]).collect();
        assert!(!kept.is_empty() && kept.len() < 8, "kept {kept:?}");
        for i in 0..8 {
            if !kept.contains(&i) {
                assert!(!la.read(i, 0, &mut whole), "entry {i} was evicted but reads as cached");
            }
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn two_processes_missing_one_chunk_at_once_make_one_fetch() {
        let d = dir("two-fetch");
        let (digest, m, contents) = layer(4);
        let (a, b) = (Arc::new(Cache::open(&d, 1 << 30).unwrap()), Arc::new(Cache::open(&d, 1 << 30).unwrap()));
        a.start_publisher();
        b.start_publisher();
        let (la, lb) = (a.layer(&digest, &m).unwrap(), b.layer(&digest, &m).unwrap());
        let fetches = AtomicU64::new(0);
        let serve = |run: &[usize], wait: u64| {
            fetches.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(wait));
            Ok(run.iter().map(|&j| (j, contents[j].clone())).collect())
        };
        std::thread::scope(|sc| {
            // The first process's request takes 100 ms and brings entry 3 along.
            let first = sc.spawn(|| la.get_or_fetch(&a, 2, &[3], |run| serve(run, 100)).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(30));
            let second = lb.get_or_fetch(&b, 2, &[3], |run| serve(run, 0)).unwrap();
            assert!(*second == contents[2], "the second process read wrong content");
            assert!(*first.join().unwrap() == contents[2]);
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "both processes fetched the chunk");
        // What came along with the first fetch is the second's from the cache too.
        let mut whole = vec![0u8; 1 << SHIFT];
        assert!(lb.read(3, 0, &mut whole) && whole == contents[3]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn two_processes_filling_at_once_keep_the_one_bound() {
        let d = dir("two-bound");
        let (digest, m, contents) = layer(8);
        let other = sha256(b"another layer");
        let bound = 5u64 << SHIFT;
        // Both processes open the cache (and count what it holds) before either fills.
        let (a, b) = (Cache::open(&d, bound).unwrap(), Cache::open(&d, bound).unwrap());
        let (la, lb) = (a.layer(&digest, &m).unwrap(), b.layer(&other, &m).unwrap());
        for i in 0..8 {
            fill(&a, &la, i, &contents);
            a.publish_all().unwrap();
            fill(&b, &lb, i, &contents);
            b.publish_all().unwrap();
            let on_disk = a.size_on_disk();
            assert!(on_disk <= bound, "after {} fills of each: {on_disk} bytes, bound {bound}", i + 1);
        }
        // Eviction made room, it did not empty the cache; what reads as cached is right.
        let mut whole = vec![0u8; 1 << SHIFT];
        let mut kept = 0;
        for l in [&la, &lb] {
            for (i, content) in contents.iter().enumerate() {
                if l.read(i, 0, &mut whole) {
                    assert!(whole == *content, "entry {i} reads wrong content");
                    kept += 1;
                }
            }
        }
        assert!((3..=5).contains(&kept), "{kept} chunks kept under a bound of 5");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bytes_a_change_cut_short_left_without_a_record_are_punched_at_the_next_fill() {
        use std::os::unix::fs::MetadataExt;
        let d = dir("cut-short");
        let (digest, m, contents) = layer(4);
        let a = Cache::open(&d, 1 << 30).unwrap();
        let la = a.layer(&digest, &m).unwrap();
        for i in 0..3 {
            fill(&a, &la, i, &contents);
        }
        a.publish_all().unwrap();
        let (ip, dp) = paths(&d, &crate::remote::manifest::hex(&digest));
        let allocated = || std::fs::metadata(&dp).unwrap().blocks() * 512;
        assert_eq!(allocated(), 3 << SHIFT);
        // An eviction of entry 1 that ends after clearing its record, before the punch: what
        // a process killed there leaves (a failed change leaves the count unsettled the same way).
        let cut = a.with_lock(|| {
            a.fill_locked(0, || -> Result<()> {
                let index = FileStorage::open(&ip, true, LockMode::None)?;
                index.write_at(&[0u8; RECORD as usize], record_offset(1))?;
                index.sync()?;
                Err(err(ErrorKind::Io, "killed"))
            })
        });
        assert!(cut.unwrap().is_err());
        assert_eq!(allocated(), 3 << SHIFT, "the evicted bytes are still there");
        // The next fill, by another process, recounts: the stray bytes go, the kept ones stay.
        let b = Cache::open(&d, 1 << 30).unwrap();
        let lb = b.layer(&digest, &m).unwrap();
        fill(&b, &lb, 3, &contents);
        b.publish_all().unwrap();
        assert_eq!(allocated(), 3 << SHIFT, "entries 0, 2 and 3 hold the data file, entry 1 nothing");
        let mut whole = vec![0u8; 1 << SHIFT];
        for i in [0, 2, 3] {
            assert!(lb.read(i, 0, &mut whole) && whole == contents[i], "entry {i} reads back");
        }
        assert!(!lb.read(1, 0, &mut whole));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_garbled_record_or_a_foreign_index_reads_as_not_cached() {
        let d = dir("garbled");
        let (digest, m, contents) = layer(3);
        let a = Cache::open(&d, 1 << 30).unwrap();
        let la = a.layer(&digest, &m).unwrap();
        fill(&a, &la, 1, &contents);
        a.publish_all().unwrap();
        let (ip, _) = paths(&d, &crate::remote::manifest::hex(&digest));
        let mut index = std::fs::read(&ip).unwrap();
        index[(HEADER + RECORD + 3) as usize] ^= 0x10;
        std::fs::write(&ip, &index).unwrap();
        let b = Cache::open(&d, 1 << 30).unwrap();
        let mut part = [0u8; 8];
        assert!(!b.layer(&digest, &m).unwrap().read(1, 0, &mut part));
        // An index of another layer under this name starts empty.
        index[30] ^= 1;
        std::fs::write(&ip, &index).unwrap();
        let c = Cache::open(&d, 1 << 30).unwrap();
        let lc = c.layer(&digest, &m).unwrap();
        assert!(!lc.read(1, 0, &mut part));
        fill(&c, &lc, 1, &contents);
        c.publish_all().unwrap();
        assert!(Cache::open(&d, 1 << 30).unwrap().layer(&digest, &m).unwrap().read(1, 0, &mut part));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
