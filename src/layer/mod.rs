//! One cowdisk image file: its header and chunk map in memory, and the locks that guard
//! them. Creating and opening live in `open.rs`, the metadata operations of the I/O paths in
//! `data.rs`, the flush protocol (spec §5) in `durability.rs`.
//!
//! Locking: `state` (header, map, allocator) is held only to read or change metadata, never
//! across data I/O. `stripes` serialize writers of one chunk (copy-up and read-modify-write
//! must not interleave). `reclaim` is held shared by anyone doing data I/O on a slot and taken
//! exclusively before freed slots become reusable, so no I/O ever lands in a slot that has
//! changed owner underneath it. `snapshot_gate` (data checksums only) is held shared by a
//! write from its plan to its commit and exclusively by a flush while it takes its snapshot of
//! the map, so a snapshot never falls inside a write (see `data.rs`).
//!
//! Lock order: chunk stripe, then snapshot gate, then reclaim, then state; `flush_lock` before
//! the snapshot gate and reclaim.

pub mod alloc;
mod data;
mod durability;
pub mod journal;
mod log;
mod open;

pub use data::{SlotPlan, WritePlan};
pub use durability::PreparedMap;
pub(crate) use open::next_generation;
pub use open::{format_uuid, new_uuid, read_header_of, read_header_only, read_header_slots, write_next_header};
pub mod map;
pub mod raw;

use crate::device::Payload;
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::header::{Header, ParentRef};
use crate::format::{Geometry, BLOCK_SIZE, FLAG_CORRUPT, FLAG_DIRTY, FLAG_FROZEN};
use crate::storage::{LockMode, Storage};
pub(crate) use crate::sync::{lock, read, write};
use alloc::Allocator;
use map::ChunkMap;
pub use map::Entry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// How an image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    pub write: bool,
    pub lock: LockMode,
    /// Allow opening a frozen image for writing (commit into a shared parent, `check --repair`).
    pub allow_frozen: bool,
    /// Allow opening an image flagged corrupt for writing (only `check --repair`).
    pub allow_corrupt: bool,
}

impl OpenOptions {
    /// Writable top layer: exclusive lock, refuses frozen and corrupt images.
    pub fn writable() -> OpenOptions {
        OpenOptions { write: true, lock: LockMode::Exclusive, allow_frozen: false, allow_corrupt: false }
    }

    /// A layer that must not change while it is read (parent, read-only export): shared lock.
    pub fn read_only() -> OpenOptions {
        OpenOptions { write: false, lock: LockMode::Shared, allow_frozen: true, allow_corrupt: true }
    }

    /// Inspection (info, check): no lock, so it works on an image a server is using.
    pub fn inspect() -> OpenOptions {
        OpenOptions { write: false, lock: LockMode::None, allow_frozen: true, allow_corrupt: true }
    }
}

pub(crate) struct State {
    header: Header,
    map: ChunkMap,
    alloc: Allocator,
    /// The file length this process made sure of ahead of the slots it hands out (see
    /// [`Image::extend_ahead`]); 0 when it has made sure of none.
    extended_to: u64,
}

/// Where the redo journal (spec §5.9) stands; changed only by flushes (under `flush_lock`).
#[derive(Debug, Default)]
struct JournalState {
    /// File offset of the next record in the area.
    pos: u64,
    /// LOG (spec §5.10): the place in the data area every record names for the log's next, a
    /// cluster of ready space in the window; 0 for none.
    log_pos: u64,
    /// LOG: the end of the window of ready space (written with zeros and synced) `log_pos` is in.
    window_end: u64,
    /// LOG: chunks whose slot holds a record since the last checkpoint (its block and its
    /// head). Those bytes are under the record's CRC, so they are not overwritten in place nor
    /// punched until the checkpoint: such a chunk is pinned, and a write moves it.
    homed: Vec<u64>,
    /// LOG: records in the data area since the last checkpoint.
    log_records: u64,
    /// LOG: the window after the current one, made ready because `log_pos` is the current
    /// one's last cluster (the record there names its start).
    next_window: Option<(u64, u64)>,

    next_seq: u64,
    /// The first record after the last checkpoint: what a crash now would replay from.
    replay_from: u64,
    /// Records written since the last checkpoint (0: the map in the file is complete).
    records: usize,
    /// Map sectors (by number) logged since the last checkpoint, written in place at the next.
    logged: std::collections::BTreeSet<u64>,
    /// Space released by journaled flushes: reusable only after the next checkpoint.
    deferred: Vec<(u64, u64)>,
}

impl JournalState {
    /// The state after a chain read from the area (its last record a checkpoint's, or none).
    /// A log has no window yet: what the last record names was given up at close.
    fn after(chain: &journal::Chain) -> JournalState {
        let next = chain.next_seq();
        JournalState { pos: chain.end, next_seq: next, replay_from: next, ..Default::default() }
    }
}

/// Data written since the last flush (file ranges), for the journal's copy of it.
#[derive(Debug, Default)]
struct Written {
    ranges: Vec<(u64, u64)>,
    bytes: u64,
}

impl Written {
    /// The 4 KiB blocks the ranges touch, in order, each once: what a record copies.
    fn blocks(&self) -> Vec<u64> {
        let mut offs: Vec<u64> = self
            .ranges
            .iter()
            .flat_map(|&(off, len)| (off / BLOCK_SIZE..(off + len).div_ceil(BLOCK_SIZE)).map(|b| b * BLOCK_SIZE))
            .collect();
        offs.sort_unstable();
        offs.dedup();
        offs
    }

    /// Puts ranges taken by a flush back (its record was not written).
    fn put_back(into: &Mutex<Written>, w: Written) {
        let mut now = lock(into);
        now.ranges.extend(w.ranges);
        now.bytes = now.bytes.saturating_add(w.bytes);
    }
}

/// Every range the image's file uses: the map's and the journal's.
fn used_ranges(map: &ChunkMap, header: &Header) -> Vec<(u64, u64, alloc::Use)> {
    let mut v = map.used_ranges();
    v.extend(header.journal.map(|j| (j.offset, j.len, alloc::Use::Journal)));
    v
}

const STRIPES: usize = 64;

pub struct Image {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    geom: Geometry,
    /// Open for writing. Only a frozen lower layer changes this while open: a job that
    /// commits into it takes it up ([`Image::begin_writing`]) and gives it back.
    writable: AtomicBool,
    state: RwLock<State>,
    flush_lock: Mutex<()>,
    reclaim: RwLock<()>,
    snapshot_gate: RwLock<()>,
    stripes: Box<[Mutex<()>]>,
    /// Set when a close begins: writes are refused from then on. The close itself may fail and
    /// be retried; `clean` says whether one completed.
    closing: AtomicBool,
    /// A close completed: flushed, and the header with DIRTY clear is durable.
    clean: AtomicBool,
    /// Set when a sync failed: the kernel may have dropped dirty pages, so nothing written
    /// since the last good flush can be trusted to reach the disk; every later write and flush
    /// fails until the image is reopened (a retried fsync could report success for lost data).
    /// Also set when a header that freezes the image failed after its journal area was
    /// punched (the in-memory journal no longer matches the file).
    poisoned: AtomicBool,
    /// A data checksum failed: the next flush or close records FLAG_CORRUPT in the header.
    corrupt_found: AtomicBool,
    /// Slots dropped at open because they held no data (see [`ChunkMap::drop_empty_slots`]).
    repaired_on_open: usize,
    journal: Mutex<JournalState>,
    /// Data written since the last flush (noted only while a journal record could hold it).
    written: Mutex<Written>,
    /// Held shared by every data write and exclusively while a flush copies what was written
    /// for its journal record: no copy catches a block in the middle of a write.
    copy_gate: RwLock<()>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("path", &self.path).field("writable", &self.is_writable()).finish()
    }
}

impl Image {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This image, frozen (by [`Image::freeze`]) and now named `path`, as a read-only lower
    /// layer of a chain: its lock becomes a reader's where the file system has one. Its map
    /// in memory is what it was at the freeze, which is what the file holds.
    pub fn into_lower(mut self, path: &Path) -> Result<Image> {
        if !read(&self.state).header.has_flag(FLAG_FROZEN) {
            return Err(
                err(ErrorKind::InvalidArgument, "only a frozen image becomes a lower layer").with_file(&self.path)
            );
        }
        if let Some(f) = self.storage.as_file() {
            f.downgrade_to_shared()?;
            f.renamed(path);
        }
        self.writable.store(false, Ordering::Release);
        self.path = path.to_path_buf();
        Ok(self)
    }

    pub fn geometry(&self) -> Geometry {
        self.geom
    }

    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Takes up writing on this image, opened read-only as a frozen lower layer of a chain, in
    /// place (its readers keep reading through this same object): the writer's lock, refused
    /// (in use) if another process has the file open; leaked space reclaimed if it was not
    /// closed cleanly; DIRTY set durably, as a writable open does (spec §5.5).
    pub fn begin_writing(&self) -> Result<()> {
        // A failed end_writing leaves the image writable and closing (its close stopped
        // part-way, DIRTY cleared in the file or not): writing resumes below, with the lock
        // it still holds, and DIRTY set durably again.
        let resumed = self.is_writable();
        if self.poisoned.load(Ordering::Acquire) {
            // A sync or header write failed: the next header must not follow one whose
            // durability is unknown (spec §2.4). Only a reopen reads the file afresh.
            return Err(err(ErrorKind::Io, "an earlier sync or header write failed; reopen the image")
                .with_file(&self.path)
                .during("open for writing"));
        }
        if resumed && !self.closing.load(Ordering::Acquire) {
            return Ok(());
        }
        let ctx = |e: Error| e.with_file(&self.path).during("open for writing");
        if let (Some(f), false) = (self.storage.as_file(), resumed) {
            f.enable_writes().map_err(ctx)?;
            if let Err(e) = f.lock(LockMode::Exclusive) {
                // A refused upgrade lets go of every lock byte: take the reader's back.
                let _ = f.lock(LockMode::Shared);
                return Err(ctx(e));
            }
        }
        let mut st = write(&self.state);
        if st.header.has_flag(FLAG_CORRUPT) {
            return Err(ctx(err(ErrorKind::Corrupt, "image is marked corrupt; run `cowdisk check --repair` first")));
        }
        if st.header.has_flag(FLAG_DIRTY) {
            for &(s, e) in st.alloc.free_ranges() {
                self.storage.punch(s, e - s).map_err(ctx)?;
            }
        }
        self.closing.store(false, Ordering::Release);
        self.clean.store(false, Ordering::Release);
        self.write_header(&mut st, |h| h.set_flag(FLAG_DIRTY, true)).map_err(ctx)?;
        drop(st);
        self.storage.sync().map_err(ctx)?;
        self.writable.store(true, Ordering::Release);
        Ok(())
    }

    /// Gives writing up again after [`Image::begin_writing`]: flushed, DIRTY cleared durably,
    /// the lock a reader's again.
    pub fn end_writing(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        self.close()?;
        self.writable.store(false, Ordering::Release);
        if let Some(f) = self.storage.as_file() {
            f.downgrade_to_shared()?;
        }
        Ok(())
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn header(&self) -> Header {
        read(&self.state).header.clone()
    }

    pub fn uuid(&self) -> [u8; 16] {
        read(&self.state).header.uuid
    }

    pub fn parent(&self) -> Option<ParentRef> {
        read(&self.state).header.parent.clone()
    }

    /// Number of empty slots dropped while opening (evidence of an interrupted write).
    pub fn repaired_on_open(&self) -> usize {
        self.repaired_on_open
    }

    /// Runs `f` on the entry of `chunk` under the metadata read lock (keep `f` short: no I/O).
    pub fn with_entry<R>(&self, chunk: u64, f: impl FnOnce(Option<&Entry>) -> R) -> R {
        f(read(&self.state).map.get(chunk))
    }

    /// Every entry, sorted by chunk (for merging lower layers, listing and checking).
    pub fn entries(&self) -> Vec<(u64, Entry)> {
        let mut v = Vec::new();
        self.for_each_entry(|c, e| v.push((c, e.clone())));
        v
    }

    /// Hands every entry to `f`, sorted by chunk, without copying them (as [`Image::entries`]
    /// does), under the map's read lock: `f` must not call back into this image.
    pub fn for_each_entry(&self, mut f: impl FnMut(u64, &Entry)) {
        let st = read(&self.state);
        for (c, e) in st.map.sorted_entries() {
            f(c, e);
        }
    }

    /// The first chunk at or after `chunk` that has an entry in this image.
    pub fn next_chunk(&self, chunk: u64) -> Option<u64> {
        read(&self.state).map.next_chunk(chunk)
    }

    pub fn entry_count(&self) -> usize {
        read(&self.state).map.len()
    }

    /// Bytes of data blocks this layer holds.
    pub fn data_bytes(&self) -> u64 {
        let st = read(&self.state);
        st.map.iter().map(|(_, e)| e.blocks.count(BlockState::Data) as u64 * BLOCK_SIZE).sum()
    }

    /// Unreferenced cluster ranges inside the file (free space, or leaks after a crash).
    pub fn free_ranges(&self) -> Vec<(u64, u64)> {
        read(&self.state).alloc.free_ranges().to_vec()
    }

    /// Free (reusable) bytes inside the file and the allocation end.
    pub fn space(&self) -> (u64, u64) {
        let st = read(&self.state);
        (st.alloc.free_bytes(), st.alloc.end())
    }

    /// Held by writers of one chunk for the whole copy-up / write / zero sequence.
    pub fn lock_chunk(&self, chunk: u64) -> MutexGuard<'_, ()> {
        lock(&self.stripes[(chunk as usize) % STRIPES])
    }

    /// The chunk locks of every chunk in `first..=last`, taken in stripe order (the one order
    /// every multi-chunk writer uses, so two of them never wait on each other in a cycle).
    pub fn lock_chunks(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let span = (last - first + 1).min(STRIPES as u64);
        let mut stripes: Vec<usize> = (first..first + span).map(|c| (c as usize) % STRIPES).collect();
        stripes.sort_unstable();
        stripes.into_iter().map(|i| lock(&self.stripes[i])).collect()
    }

    /// Held shared across data I/O on this image's slots.
    pub fn io_guard(&self) -> RwLockReadGuard<'_, ()> {
        read(&self.reclaim)
    }

    fn require_writable(&self) -> Result<()> {
        if !self.is_writable() {
            return Err(err(ErrorKind::ReadOnly, "image is open read-only").with_file(&self.path));
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(err(
                ErrorKind::Io,
                "an earlier sync or header write failed; writes since the last flush may be lost; reopen the image",
            )
            .with_file(&self.path));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(err(ErrorKind::ReadOnly, "image is closed").with_file(&self.path));
        }
        Ok(())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage.read_at(buf, offset).map_err(|e| e.with_file(&self.path))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.require_writable()?;
        let _g = read(&self.copy_gate);
        self.storage.write_at(buf, offset).map_err(|e| e.with_file(&self.path))?;
        self.note_written(offset, buf.len() as u64);
        Ok(())
    }

    /// Copies `len` bytes of this image's file from `from` to `to` (ranges that do not overlap):
    /// a relocated chunk's blocks to its new slot.
    pub fn copy_within(&self, from: u64, to: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        let _g = read(&self.copy_gate);
        self.storage.copy_to(from, len, self.storage.as_ref(), to).map_err(|e| e.with_file(&self.path))?;
        self.note_written(to, len);
        Ok(())
    }

    /// Writes the next `len` bytes of `src` at `offset`. With `fresh` (whole chunks going into
    /// new slots) their space is taken first, in one piece (see [`Storage::allocate`]).
    pub fn write_from(&self, src: &mut dyn Payload, offset: u64, len: usize, fresh: bool) -> Result<()> {
        self.require_writable()?;
        if fresh {
            self.storage.allocate(offset, len as u64).map_err(|e| e.with_file(&self.path))?;
        }
        let _g = read(&self.copy_gate);
        src.take_to(self.storage.as_ref(), offset, len).map_err(|e| e.with_file(&self.path))?;
        self.note_written(offset, len as u64);
        Ok(())
    }

    /// Notes a data write for the next flush's journal record; past what one record holds it
    /// only counts (that flush then writes the map in place instead).
    fn note_written(&self, offset: u64, len: u64) {
        let mut w = lock(&self.written);
        w.bytes = w.bytes.saturating_add(len);
        if w.bytes <= journal::MAX_RECORD_DATA {
            w.ranges.push((offset, len));
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort: an explicit close() reports errors; a drop can only try.
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn mem_image() -> (Arc<MemStorage>, Image) {
        let s = Arc::new(MemStorage::new());
        let g = Geometry::new(16 << 20, 16).unwrap();
        let img = Image::create_on(s.clone(), Path::new("mem"), g, None, [1; 16]).unwrap();
        (s, img)
    }

    fn reopen(s: &Arc<MemStorage>, opts: OpenOptions) -> Result<Image> {
        Image::open_on(Arc::new(MemStorage::from_bytes(s.snapshot())), Path::new("mem"), opts)
    }

    /// Writes `fill` into blocks `first..last` of `chunk` through a write plan; returns the slot.
    fn write_blocks(img: &Image, chunk: u64, first: usize, last: usize, fill: u8) -> u64 {
        let plan = img.plan_write(chunk, first, last).unwrap();
        let slot = plan.target();
        img.write_at(&vec![fill; (last - first) * 4096], slot + first as u64 * 4096).unwrap();
        img.commit_write(plan, &[]).unwrap();
        slot
    }

    #[test]
    fn flushed_blocks_survive_reopen() {
        let (s, img) = mem_image();
        let slot = write_blocks(&img, 3, 1, 2, 0xab);
        img.flush().unwrap();
        let again = reopen(&s, OpenOptions::read_only()).unwrap();
        let (off, st) = again.with_entry(3, |e| {
            let e = e.unwrap();
            (e.data_offset, e.blocks.get(1))
        });
        assert_eq!((off, st), (slot, BlockState::Data));
        let mut b = [0u8; 4096];
        again.read_at(&mut b, slot + 4096).unwrap();
        assert_eq!(b, [0xab; 4096]);
    }

    #[test]
    fn unflushed_map_change_is_not_visible_after_crash() {
        let (s, img) = mem_image();
        write_blocks(&img, 0, 0, 1, 1);
        let crashed = reopen(&s, OpenOptions::read_only()).unwrap();
        assert!(crashed.with_entry(0, |e| e.is_none()));
        drop(img);
    }

    #[test]
    fn open_for_write_sets_dirty_and_close_clears_it() {
        let (s, img) = mem_image();
        drop(img);
        let w = Image::open_on(s.clone(), Path::new("mem"), OpenOptions::writable()).unwrap();
        assert!(reopen(&s, OpenOptions::inspect()).unwrap().header().has_flag(FLAG_DIRTY));
        w.close().unwrap();
        assert!(!reopen(&s, OpenOptions::inspect()).unwrap().header().has_flag(FLAG_DIRTY));
    }

    #[test]
    fn refuses_to_open_frozen_image_for_writing() {
        let (s, img) = mem_image();
        img.update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
        drop(img);
        let e = reopen(&s, OpenOptions::writable()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(e.to_string().contains("frozen"));
    }

    #[test]
    fn a_header_that_freezes_the_image_drops_its_journal_and_punches_the_area() {
        let (s, img) = mem_image();
        write_blocks(&img, 0, 0, 1, 1);
        img.flush().unwrap();
        let area = img.header().journal.expect("a first flush gives a writable image its journal");
        let mut b = vec![0u8; 512];
        s.read_at(&mut b, area.offset).unwrap();
        assert_ne!(b, vec![0u8; 512], "the area starts with a checkpoint record");
        img.update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
        drop(img);
        let frozen = reopen(&s, OpenOptions::read_only()).unwrap();
        assert_eq!(frozen.header().journal, None);
        s.read_at(&mut b, area.offset).unwrap();
        assert_eq!(b, vec![0u8; 512], "the area is punched");
        assert!(frozen.with_entry(0, |e| e.is_some()), "the flushed write is in the map");
    }

    #[test]
    fn refuses_to_open_corrupt_flagged_image_for_writing() {
        let (s, img) = mem_image();
        img.update_header(|h| h.set_flag(FLAG_CORRUPT, true)).unwrap();
        drop(img);
        assert_eq!(reopen(&s, OpenOptions::writable()).unwrap_err().kind(), ErrorKind::Corrupt);
        assert!(reopen(&s, OpenOptions::read_only()).is_ok());
    }

    #[test]
    fn zeroing_every_data_block_releases_the_slot_after_flush() {
        let (_s, img) = mem_image();
        let slot = write_blocks(&img, 2, 0, 1, 9);
        img.clear_blocks(2, 0, 16, BlockState::Zero).unwrap();
        assert_eq!(img.with_entry(2, |e| e.unwrap().data_offset), 0);
        // Not reusable before the flush that makes the release durable...
        assert_ne!(write_blocks(&img, 5, 0, 1, 5), slot);
        img.flush().unwrap();
        // ...and reusable after it.
        assert_eq!(write_blocks(&img, 6, 0, 1, 6), slot);
    }

    #[test]
    fn rejects_truncated_header_area() {
        let s = Arc::new(MemStorage::from_bytes(b"COWDISK\0short".to_vec()));
        let e = Image::open_on(s, Path::new("t"), OpenOptions::inspect()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated);
        assert!(e.to_string().starts_with("t: open: "));
    }

    #[test]
    fn rejects_file_that_is_not_an_image() {
        let s = Arc::new(MemStorage::from_bytes(vec![0x55; 20000]));
        let e = Image::open_on(s, Path::new("x"), OpenOptions::inspect()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAnImage);
    }

    #[test]
    fn rejects_map_entry_past_end_of_file() {
        let (s, img) = mem_image();
        // A zero entry first, so the map extent sits before the data slot that gets cut off.
        img.clear_blocks(0, 0, 16, BlockState::Zero).unwrap();
        let slot = write_blocks(&img, 1, 0, 1, 1);
        img.flush().unwrap();
        drop(img);
        let mut bytes = s.snapshot();
        bytes.truncate((slot + 100) as usize);
        let e = Image::open_on(Arc::new(MemStorage::from_bytes(bytes)), Path::new("m"), OpenOptions::inspect())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("past the end of the file"));
    }

    #[test]
    fn header_write_alternates_slots() {
        let (s, img) = mem_image();
        let g1 = img.header().generation;
        img.update_header(|_| {}).unwrap();
        let g2 = img.header().generation;
        assert_eq!(g2, g1 + 1);
        let bytes = s.snapshot();
        let a = Header::decode(&bytes[..4096]).unwrap();
        let b = Header::decode(&bytes[4096..8192]).unwrap();
        assert_eq!(a.generation.max(b.generation), g2);
        assert_eq!(a.generation.min(b.generation), g1);
    }
}
