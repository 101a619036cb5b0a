//! A recording store for crash tests: keeps "what was written" apart from "what was synced",
//! and rebuilds any state a power cut could leave behind.
//!
//! Every store sharing one [`Journal`] logs its writes, punches, length changes and syncs in
//! one global order, so a crash point is a single index into that order for all files at
//! once. The state a crash at index `k` may leave for a file is: everything up to the file's
//! last sync before `k`, plus, for every 512-byte sector, either that synced content or the
//! content any later (unsynced) write or punch before `k` gave it, chosen independently per
//! sector, which covers lost, reordered and torn writes (format-spec §5.1); and a length that
//! is the synced one or any the file had after an unsynced length change (a write past the
//! end, set_len, allocate), bytes past it cut off and bytes up to it reading as zero where
//! nothing landed. Splices and copies between files reach the store as writes (the trait's
//! default methods), so they are recorded like any write. Directory changes of a
//! [`RecordingDir`] (create, link, rename, remove) are logged in the same order, each kept or
//! lost after the last directory sync.

use super::namespace::Namespace;
use super::{LockMode, MemStorage, Storage};
use crate::error::{err, ErrorKind, Result};
use crate::sync::lock;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SECTOR: usize = 512;

#[derive(Debug, Clone)]
pub enum RecOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Punch {
        offset: u64,
        len: u64,
    },
    SetLen(u64),
    /// Space taken for a range about to be written (fallocate mode 0): may extend the file.
    Allocate {
        offset: u64,
        len: u64,
    },
    Sync,
    /// A write durable when it returned, for its own sectors only (RWF_DSYNC): the sectors it
    /// covers hold its bytes in every crash state after it (until written again), whatever
    /// other unsynced writes do.
    DurableWrite {
        offset: u64,
        data: Vec<u8>,
    },
    /// Directory operations of a [`RecordingDir`] (logged under [`DIR`]).
    Name {
        name: PathBuf,
        file: usize,
    },
    Unname(PathBuf),
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    DirSync,
}

/// The pseudo-file id directory operations are logged under.
pub const DIR: usize = usize::MAX;

#[derive(Debug, Default)]
pub struct Journal {
    ops: Mutex<Vec<(usize, RecOp)>>,
}

impl Journal {
    pub fn new() -> Arc<Journal> {
        Arc::new(Journal::default())
    }

    /// Number of operations logged so far: a crash point.
    pub fn len(&self) -> usize {
        lock(&self.ops).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, file: usize, op: RecOp) {
        lock(&self.ops).push((file, op));
    }

    /// Every operation, for [`CrashImages`].
    pub fn ops(&self) -> Vec<(usize, RecOp)> {
        lock(&self.ops).clone()
    }
}

/// One file of a recorded world: reads see every write at once, like the page cache.
#[derive(Debug)]
pub struct RecordingStorage {
    file: usize,
    mem: MemStorage,
    journal: Arc<Journal>,
}

impl RecordingStorage {
    pub fn new(journal: Arc<Journal>, file: usize) -> RecordingStorage {
        RecordingStorage { file, mem: MemStorage::new(), journal }
    }

    /// A store that starts out holding `bytes`, durably (logged as one write and a sync): what
    /// a crash state looks like to the program that opens it next.
    pub fn with_contents(journal: Arc<Journal>, file: usize, bytes: Vec<u8>) -> RecordingStorage {
        journal.push(file, RecOp::Write { offset: 0, data: bytes.clone() });
        journal.push(file, RecOp::Sync);
        RecordingStorage { file, mem: MemStorage::from_bytes(bytes), journal }
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.mem.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.mem.write_at(buf, offset)?;
        self.journal.push(self.file, RecOp::Write { offset, data: buf.to_vec() });
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.mem.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.mem.set_len(len)?;
        self.journal.push(self.file, RecOp::SetLen(len));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.journal.push(self.file, RecOp::Sync);
        Ok(())
    }

    fn write_durable(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.mem.write_at(buf, offset)?;
        self.journal.push(self.file, RecOp::DurableWrite { offset, data: buf.to_vec() });
        Ok(())
    }

    /// Like fallocate mode 0 on a file: the file grows to cover the range, which reads as zero.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len);
        if end > self.mem.len()? {
            self.mem.set_len(end)?;
        }
        self.journal.push(self.file, RecOp::Allocate { offset, len });
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.mem.punch(offset, len)?;
        self.journal.push(self.file, RecOp::Punch { offset, len });
        Ok(())
    }
}

fn apply(img: &mut Vec<u8>, op: &RecOp) {
    match op {
        RecOp::Write { offset, data } | RecOp::DurableWrite { offset, data } => {
            let end = *offset as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*offset as usize..end].copy_from_slice(data);
        }
        RecOp::Punch { offset, len } => {
            let s = (*offset as usize).min(img.len());
            let e = (*offset + *len).min(img.len() as u64) as usize;
            img[s..e].fill(0);
        }
        RecOp::SetLen(l) => img.resize(*l as usize, 0),
        RecOp::Allocate { offset, len } => {
            let end = (*offset + *len) as usize;
            if img.len() < end {
                img.resize(end, 0);
            }
        }
        _ => {}
    }
}

/// The file length after `op`, from `len` before it.
fn length_after(len: u64, op: &RecOp) -> u64 {
    match op {
        RecOp::Write { offset, data } | RecOp::DurableWrite { offset, data } => len.max(offset + data.len() as u64),
        RecOp::SetLen(l) => *l,
        RecOp::Allocate { offset, len: n } => len.max(offset + n),
        _ => len,
    }
}

/// A directory whose files are [`RecordingStorage`]s of one journal, and whose name changes
/// (create, link, rename, remove) and syncs are logged there too, in the same order.
pub struct RecordingDir {
    journal: Arc<Journal>,
    state: Mutex<DirState>,
}

/// Names → file ids, and the files by id (every file ever created, also once unlinked).
type DirState = (BTreeMap<PathBuf, usize>, Vec<Arc<RecordingStorage>>);

impl RecordingDir {
    /// An empty directory; files get ids 0, 1, ... in the order they are created.
    pub fn new(journal: Arc<Journal>) -> RecordingDir {
        RecordingDir { journal, state: Mutex::new((BTreeMap::new(), Vec::new())) }
    }

    /// The id of the file `name` refers to now.
    pub fn file_of(&self, name: &Path) -> Option<usize> {
        lock(&self.state).0.get(name).copied()
    }

    /// Number of files created so far (their ids are 0..files()).
    pub fn files(&self) -> usize {
        lock(&self.state).1.len()
    }

    fn missing(name: &Path) -> crate::error::Error {
        err(ErrorKind::Io, "No such file or directory").with_file(name)
    }
}

impl Namespace for RecordingDir {
    fn open(&self, path: &Path, _writable: bool, _lock: LockMode) -> Result<Arc<dyn Storage>> {
        let st = lock(&self.state);
        let f = *st.0.get(path).ok_or_else(|| RecordingDir::missing(path))?;
        Ok(st.1[f].clone())
    }

    fn create(&self, path: &Path) -> Result<Arc<dyn Storage>> {
        let mut st = lock(&self.state);
        if st.0.contains_key(path) {
            return Err(err(ErrorKind::InvalidArgument, "already exists").with_file(path));
        }
        let id = st.1.len();
        let f = Arc::new(RecordingStorage::new(self.journal.clone(), id));
        st.1.push(f.clone());
        st.0.insert(path.to_path_buf(), id);
        self.journal.push(DIR, RecOp::Name { name: path.to_path_buf(), file: id });
        Ok(f)
    }

    fn exists(&self, path: &Path) -> bool {
        self.file_of(path).is_some()
    }

    fn same_file(&self, a: &Path, b: &Path) -> bool {
        matches!((self.file_of(a), self.file_of(b)), (Some(x), Some(y)) if x == y)
    }

    fn same_dir(&self, a: &Path, b: &Path) -> bool {
        a.parent() == b.parent()
    }

    fn link(&self, from: &Path, to: &Path) -> Result<()> {
        let mut st = lock(&self.state);
        let f = *st.0.get(from).ok_or_else(|| RecordingDir::missing(from))?;
        st.0.insert(to.to_path_buf(), f);
        self.journal.push(DIR, RecOp::Name { name: to.to_path_buf(), file: f });
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut st = lock(&self.state);
        let f = st.0.remove(from).ok_or_else(|| RecordingDir::missing(from))?;
        st.0.insert(to.to_path_buf(), f);
        // One atomic step on disk: a crash keeps all of it or none.
        self.journal.push(DIR, RecOp::Rename { from: from.to_path_buf(), to: to.to_path_buf() });
        Ok(())
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<()> {
        if self.exists(to) {
            return Err(err(ErrorKind::InvalidArgument, "already exists").with_file(to));
        }
        self.rename(from, to)
    }

    fn siblings(&self, path: &Path) -> Vec<std::ffi::OsString> {
        let st = lock(&self.state);
        st.0.keys()
            .filter(|k| k.parent() == path.parent())
            .filter_map(|k| k.file_name().map(|n| n.to_owned()))
            .collect()
    }

    /// Nothing here is locked: the crash tests run one writer at a time.
    fn is_locked(&self, _path: &Path) -> bool {
        false
    }

    fn remove(&self, path: &Path) {
        let mut st = lock(&self.state);
        if st.0.remove(path).is_some() {
            self.journal.push(DIR, RecOp::Unname(path.to_path_buf()));
        }
    }

    fn sync_dir(&self, _path: &Path) -> Result<()> {
        self.journal.push(DIR, RecOp::DirSync);
        Ok(())
    }
}

/// Builds crash states of the files of one journal.
pub struct CrashImages {
    ops: Vec<(usize, RecOp)>,
    /// Per file: (journal index just after a sync, the file's bytes as of that sync).
    synced: Vec<Vec<(usize, Arc<Vec<u8>>)>>,
}

impl CrashImages {
    pub fn new(journal: &Journal, files: usize) -> CrashImages {
        let ops = journal.ops();
        let mut current: Vec<Vec<u8>> = vec![Vec::new(); files];
        let mut synced: Vec<Vec<(usize, Arc<Vec<u8>>)>> = vec![vec![(0, Arc::new(Vec::new()))]; files];
        for (i, (f, op)) in ops.iter().enumerate() {
            if *f >= files {
                continue;
            }
            apply(&mut current[*f], op);
            if matches!(op, RecOp::Sync) {
                synced[*f].push((i + 1, Arc::new(current[*f].clone())));
            }
        }
        CrashImages { ops, synced }
    }

    /// The names the directory may hold after a crash just before journal index `k`: every name
    /// change up to the last directory sync, then each later one kept or lost by `keep`, in
    /// order (a rename is one change).
    pub fn names(&self, k: usize, mut keep: impl FnMut() -> bool) -> BTreeMap<PathBuf, usize> {
        let mut names = BTreeMap::new();
        let last_sync = self.ops[..k].iter().rposition(|(f, op)| *f == DIR && matches!(op, RecOp::DirSync));
        for (i, (f, op)) in self.ops[..k].iter().enumerate() {
            if *f != DIR || matches!(op, RecOp::DirSync) {
                continue;
            }
            if !(last_sync.is_some_and(|s| i < s) || keep()) {
                continue;
            }
            match op {
                RecOp::Name { name, file } => {
                    names.insert(name.clone(), *file);
                }
                RecOp::Unname(name) => {
                    names.remove(name);
                }
                RecOp::Rename { from, to } => {
                    if let Some(f) = names.remove(from) {
                        names.insert(to.clone(), f);
                    }
                }
                _ => {}
            }
        }
        names
    }

    /// The bytes `file` may hold after a crash just before journal index `k`, with each choice
    /// made by `pick(candidates)`: per unsynced sector, 0 keeps the synced content and `i`
    /// takes the content after the `i`-th unsynced change of it; then the length, 0 the synced
    /// one and `i` the one after the `i`-th unsynced length change.
    pub fn state(&self, file: usize, k: usize, pick: impl FnMut(usize) -> usize) -> Vec<u8> {
        self.state_with(file, k, false, pick)
    }

    /// As [`CrashImages::state`], with the operation at `k` in flight when it is a durable
    /// write of `file` (RWF_DSYNC): the power failed before it returned, so any of its
    /// sectors may have landed and any not, as an unsynced write's. A write is durable only
    /// once it returns; what its caller relies on before that (a record's CRC) is what such a
    /// state tests.
    pub fn state_torn(&self, file: usize, k: usize, pick: impl FnMut(usize) -> usize) -> Vec<u8> {
        self.state_with(file, k, true, pick)
    }

    /// Whether the operation at `k` is a durable write (of any file): a point where
    /// [`CrashImages::state_torn`] differs from [`CrashImages::state`].
    pub fn durable_write_at(&self, k: usize) -> bool {
        matches!(self.ops.get(k), Some((_, RecOp::DurableWrite { .. })))
    }

    fn state_with(&self, file: usize, k: usize, torn: bool, mut pick: impl FnMut(usize) -> usize) -> Vec<u8> {
        let snaps = &self.synced[file];
        let i = snaps.partition_point(|(at, _)| *at <= k) - 1;
        let (from, base) = &snaps[i];
        let mut img: Vec<u8> = base.as_ref().clone();
        // Candidate contents per sector from the unsynced operations, in order, and the
        // lengths the file had after each unsynced length change.
        let mut cands: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        let mut lengths = vec![img.len() as u64];
        let mut len = img.len() as u64;
        // The write in flight, as an unsynced one.
        let in_flight = match self.ops.get(k) {
            Some((f, RecOp::DurableWrite { offset, data })) if torn && *f == file => {
                Some((*f, RecOp::Write { offset: *offset, data: data.clone() }))
            }
            _ => None,
        };
        for (f, op) in self.ops[*from..k].iter().chain(in_flight.iter()) {
            if *f != file {
                continue;
            }
            let after = length_after(len, op);
            if let RecOp::DurableWrite { offset, data } = op {
                // Durable now: its sectors leave the undecided ones, with this content; so
                // does the length it needs (only the lengths that hold it stay possible).
                let end = *offset as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*offset as usize..end].copy_from_slice(data);
                for sec in *offset as usize / SECTOR..end.div_ceil(SECTOR) {
                    cands.remove(&sec);
                }
                lengths.retain(|&l| l >= end as u64);
                if after != len || lengths.is_empty() {
                    lengths.push(after);
                }
                len = after;
                continue;
            }
            let (off, bytes): (u64, std::borrow::Cow<[u8]>) = match op {
                RecOp::Write { offset, data } => (*offset, std::borrow::Cow::Borrowed(data)),
                RecOp::Punch { offset, len } => (*offset, std::borrow::Cow::Owned(vec![0u8; *len as usize])),
                // Cut off and grown again, the bytes past the cut read as zero.
                RecOp::SetLen(l) if *l < len => (*l, std::borrow::Cow::Owned(vec![0u8; (len - l) as usize])),
                _ => (0, std::borrow::Cow::Borrowed(&[][..])),
            };
            if after != len {
                lengths.push(after);
                len = after;
            }
            // Operations are sector-aligned in this format, except the odd unaligned data write;
            // an unaligned piece is merged onto the sector as it was just before that operation.
            let start = off as usize / SECTOR;
            let end = (off as usize + bytes.len()).div_ceil(SECTOR);
            for s in start..end {
                let sec_start = s * SECTOR;
                let prev = cands.get(&s).and_then(|c| c.last().cloned()).unwrap_or_else(|| {
                    let mut v = vec![0u8; SECTOR];
                    if let Some(have) = img.get(sec_start..) {
                        let n = have.len().min(SECTOR);
                        v[..n].copy_from_slice(&have[..n]);
                    }
                    v
                });
                let mut v = prev;
                let a = (off as usize).max(sec_start);
                let b = (off as usize + bytes.len()).min(sec_start + SECTOR);
                v[a - sec_start..b - sec_start].copy_from_slice(&bytes[a - off as usize..b - off as usize]);
                cands.entry(s).or_default().push(v);
            }
        }
        for (s, c) in cands {
            let choice = pick(c.len() + 1);
            if choice == 0 {
                continue;
            }
            let at = s * SECTOR;
            if img.len() < at + SECTOR {
                img.resize(at + SECTOR, 0);
            }
            img[at..at + SECTOR].copy_from_slice(&c[(choice - 1).min(c.len() - 1)]);
        }
        let chosen = lengths[pick(lengths.len()).min(lengths.len() - 1)];
        img.resize(chosen as usize, 0);
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_in_flight_may_land_in_part_and_is_whole_once_it_returned() {
        let j = Journal::new();
        let s = RecordingStorage::new(j.clone(), 0);
        s.write_at(&[1u8; 1024], 0).unwrap();
        s.sync().unwrap();
        let k = j.len();
        s.write_durable(&[2u8; 1024], 0).unwrap();
        let c = CrashImages::new(&j, 1);
        assert!(c.durable_write_at(k) && !c.durable_write_at(k - 1));
        // In flight: its first sector landed, its second not.
        let mut picks = [1usize, 0].into_iter();
        let torn = c.state_torn(0, k, |_| picks.next().unwrap_or(0));
        assert_eq!((&torn[..512], &torn[512..]), (&[2u8; 512][..], &[1u8; 512][..]));
        // Not in flight: none of it, whatever lands; once it returned: all of it.
        assert_eq!(c.state(0, k, |n| n - 1), vec![1u8; 1024]);
        assert_eq!(c.state(0, k + 1, |_| 0), vec![2u8; 1024]);
    }

    #[test]
    fn synced_writes_always_survive_and_unsynced_ones_may_not() {
        let j = Journal::new();
        let s = RecordingStorage::new(j.clone(), 0);
        s.write_at(&[1u8; 1024], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2u8; 1024], 0).unwrap();
        let c = CrashImages::new(&j, 1);
        let k = j.len();
        assert_eq!(c.state(0, k, |_| 0), vec![1u8; 1024]);
        assert_eq!(c.state(0, k, |n| n - 1), vec![2u8; 1024]);
        // Torn: first sector new, second old.
        let mut first = true;
        let torn = c.state(0, k, |n| {
            let r = if first { n - 1 } else { 0 };
            first = false;
            r
        });
        assert_eq!(&torn[..512], &[2u8; 512][..]);
        assert_eq!(&torn[512..], &[1u8; 512][..]);
    }

    #[test]
    fn a_durable_write_survives_every_crash_and_leaves_other_unsynced_writes_undecided() {
        let j = Journal::new();
        let s = RecordingStorage::new(j.clone(), 0);
        s.write_at(&[1u8; 2048], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2u8; 512], 0).unwrap(); // unsynced, before
        s.write_durable(&[3u8; 512], 1024).unwrap();
        s.write_at(&[4u8; 512], 1536).unwrap(); // unsynced, after
        let c = CrashImages::new(&j, 1);
        let k = j.len();
        for choice in [0usize, 1, 2] {
            let img = c.state(0, k, |n| choice.min(n - 1));
            assert_eq!(&img[1024..1536], &[3u8; 512][..], "the durable write is there (choice {choice})");
        }
        let none = c.state(0, k, |_| 0);
        assert_eq!((&none[..512], &none[1536..]), (&[1u8; 512][..], &[1u8; 512][..]), "the others may be lost");
        let all = c.state(0, k, |n| n - 1);
        assert_eq!((&all[..512], &all[1536..]), (&[2u8; 512][..], &[4u8; 512][..]), "or may have landed");
    }

    /// Every choice the state builder offers, enumerated: the distinct states it can build.
    fn all_states(c: &CrashImages, k: usize) -> std::collections::BTreeSet<Vec<u8>> {
        let mut out = std::collections::BTreeSet::new();
        for choice in 0..16 {
            out.insert(c.state(0, k, |n| choice % n));
            out.insert(c.state(0, k, |n| (choice / 2) % n));
        }
        out
    }

    #[test]
    fn an_unsynced_length_change_may_or_may_not_have_happened() {
        let j = Journal::new();
        let s = RecordingStorage::new(j.clone(), 0);
        s.write_at(&[1u8; 1024], 0).unwrap();
        s.sync().unwrap();
        s.set_len(4096).unwrap();
        s.allocate(8192, 4096).unwrap();
        let c = CrashImages::new(&j, 1);
        let lens: std::collections::BTreeSet<usize> = all_states(&c, j.len()).iter().map(Vec::len).collect();
        assert_eq!(lens, [1024, 4096, 12288].into_iter().collect());
        // A shrink that may not have happened, and whose cut-off bytes read as zero if it did
        // and the file grew again.
        s.set_len(512).unwrap();
        s.set_len(1024).unwrap();
        let c = CrashImages::new(&j, 1);
        let states = all_states(&c, j.len());
        assert!(states.iter().any(|st| st.len() == 1024 && st[512..].iter().all(|&b| b == 0)));
        assert!(states.iter().any(|st| st.len() == 1024 && st[512..].iter().all(|&b| b == 1)));
        assert!(states.iter().any(|st| st.len() == 512));
    }

    #[test]
    fn splices_and_copies_between_files_are_recorded_as_writes() {
        let j = Journal::new();
        let src = RecordingStorage::new(j.clone(), 0);
        let dst = RecordingStorage::new(j.clone(), 1);
        src.write_at(&[7u8; 2048], 0).unwrap();
        src.copy_to(0, 2048, &dst, 4096).unwrap();
        // A spliced NBD write: bytes from a socket, through a pipe, into the store.
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut tx, &[9u8; 512]).unwrap();
        let pipe = super::super::Pipe::new().unwrap();
        assert_eq!(pipe.fill_up(std::os::fd::AsRawFd::as_raw_fd(&rx), 512, 512).unwrap(), 512);
        dst.write_from_pipe(&pipe, 512, 0).unwrap();
        dst.sync().unwrap();
        let c = CrashImages::new(&j, 2);
        let d = c.state(1, j.len(), |_| 0);
        assert_eq!(&d[4096..6144], &[7u8; 2048][..]);
        assert_eq!(&d[..512], &[9u8; 512][..]);
    }

    #[test]
    fn crash_before_any_sync_leaves_an_empty_file() {
        let j = Journal::new();
        let s = RecordingStorage::new(j.clone(), 0);
        s.write_at(&[9u8; 512], 4096).unwrap();
        let c = CrashImages::new(&j, 1);
        assert!(c.state(0, j.len(), |_| 0).is_empty());
    }
}
