//! Regression tests for crash-safety defects found in review (issue 14): each reproduces the
//! defect exactly as it was found and asserts what a user would have noticed. Every one failed
//! on the code before its fix.

mod common;

use common::{pattern, PunchFaults};
use cowdisk::format::header::{ParentFormat, ParentRef};
use cowdisk::format::Geometry;
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::recording::{CrashImages, Journal, RecordingStorage};
use cowdisk::storage::{FaultKind, FaultStorage, MemStorage, Storage};
use cowdisk::{Chain, DiskFlush, DiskRead, DiskWrite, DiskZero, ErrorKind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const SIZE: u64 = 256 * 1024;
const BLOCK: usize = 4096;

fn raw_ref() -> ParentRef {
    ParentRef { format: ParentFormat::Raw, path: b"base.raw".to_vec(), uuid: [0; 16], size: SIZE, fingerprint: 0 }
}

/// A new overlay of geometry `g` on the raw base, created on `store` as `path`, as a chain.
fn overlay_chain(store: Arc<dyn Storage>, path: &Path, g: Geometry) -> Chain {
    Chain::assemble(Image::create_on(store, path, g, Some(raw_ref()), [1; 16]).unwrap(), Vec::new(), None)
}

/// A chain of a checksummed overlay (64 KiB chunks) on a recording store, over `base`.
fn checksummed_chain(journal: &Arc<Journal>, base: Arc<dyn Storage>) -> (Arc<RecordingStorage>, Chain) {
    let store = Arc::new(RecordingStorage::new(journal.clone(), 0));
    let g = Geometry::new(SIZE, 16).unwrap().with_data_checksums(true).unwrap();
    let top = Image::create_on(store.clone(), Path::new("top"), g, Some(raw_ref()), [1; 16]).unwrap();
    let chain = Chain::assemble(top, Vec::new(), Some(RawImage::on(base, Path::new("base.raw"), SIZE)));
    (store, chain)
}

/// The device a crash at the end of the journal leaves when every unsynced write landed (the
/// newest content of every sector), opened and read as a user would after reboot.
fn read_after_crash_with_every_write_landed(journal: &Journal, base: &[u8]) -> Result<Vec<u8>, String> {
    let crash = CrashImages::new(journal, 1);
    let bytes = crash.state(0, journal.len(), |n| n - 1);
    let top = Image::open_on(Arc::new(MemStorage::from_bytes(bytes)), Path::new("top"), OpenOptions::read_only())
        .map_err(|e| format!("does not open: {e}"))?;
    let base = RawImage::on(Arc::new(MemStorage::from_bytes(base.to_vec())), Path::new("base.raw"), SIZE);
    let chain = Chain::assemble(top, Vec::new(), Some(base));
    let mut dev = vec![0u8; SIZE as usize];
    chain.read_at(&mut dev, 0).map_err(|e| format!("read fails: {e}"))?;
    Ok(dev)
}

/// Block `b` of `dev` is one of `allowed`.
fn assert_block_is_one_of(dev: &[u8], b: usize, allowed: &[&[u8]], what: &str) {
    let got = &dev[b * BLOCK..(b + 1) * BLOCK];
    assert!(allowed.contains(&got), "{what}: block {b} reads a value that was never written there");
}

/// Scenario A: with data checksums, a block zeroed after a flush keeps its place in the slot
/// while the durable map still calls it Data with its old checksum. Writing it again in place
/// and crashing before the next flush left a block that reads as a checksum error, although it
/// was flushed (and then rewritten): it must read the flushed data, zeros or the new data.
#[test]
fn rewrite_of_a_zeroed_checksummed_block_never_reads_as_a_checksum_error_after_a_crash() {
    let journal = Journal::new();
    let base = pattern(1, SIZE as usize);
    let (_store, chain) = checksummed_chain(&journal, Arc::new(MemStorage::from_bytes(base.clone())));
    let flushed = pattern(2, 2 * BLOCK);
    chain.write_at(&flushed, 0).unwrap();
    chain.flush().unwrap();
    chain.write_zeroes(BLOCK as u64, BLOCK as u64, false).unwrap();
    let new = pattern(3, BLOCK);
    chain.write_at(&new, BLOCK as u64).unwrap();
    let dev = read_after_crash_with_every_write_landed(&journal, &base).unwrap_or_else(|e| panic!("{e}"));
    assert_block_is_one_of(&dev, 0, &[&flushed[..BLOCK]], "the untouched flushed block");
    assert_block_is_one_of(&dev, 1, &[&flushed[BLOCK..], &[0; BLOCK], &new], "the rewritten block");
}

/// A base that, while armed, holds its next read until released (or until a timeout: a fixed
/// write path may rightly make the releasing flush wait for the held write).
#[derive(Debug)]
struct HeldBase {
    inner: MemStorage,
    armed: AtomicBool,
    held: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl HeldBase {
    fn new(bytes: Vec<u8>) -> HeldBase {
        HeldBase {
            inner: MemStorage::from_bytes(bytes),
            armed: AtomicBool::new(false),
            held: Mutex::new((false, false)),
            cv: Condvar::new(),
        }
    }

    fn wait_until_held(&self) {
        let g = self.held.lock().unwrap();
        let (g, t) = self.cv.wait_timeout_while(g, Duration::from_secs(10), |s| !s.0).unwrap();
        assert!(!t.timed_out() && g.0, "the write never read from the base");
    }

    fn release(&self) {
        self.held.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

impl Storage for HeldBase {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> cowdisk::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let mut g = self.held.lock().unwrap();
            g.0 = true;
            self.cv.notify_all();
            let _ = self.cv.wait_timeout_while(g, Duration::from_millis(500), |s| !s.1).unwrap();
        }
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
        Ok(())
    }
    fn punch(&self, offset: u64, len: u64) -> cowdisk::Result<()> {
        self.inner.punch(offset, len)
    }
}

/// Scenario B: a write that overwrites a checksummed Data block and copies up part of the next
/// block from the base, while another connection's FLUSH lands between the write's decision to
/// overwrite in place and its data write. The flush made the old checksum durable; the write
/// then overwrote the block under it. After a crash the block read as a checksum error.
#[test]
fn flush_racing_a_copy_up_write_never_leaves_a_checksum_error() {
    let journal = Journal::new();
    let base_bytes = pattern(4, SIZE as usize);
    let base = Arc::new(HeldBase::new(base_bytes.clone()));
    let (_store, chain) = checksummed_chain(&journal, base.clone());
    let chain = Arc::new(chain);
    let first = pattern(5, BLOCK);
    chain.write_at(&first, 0).unwrap();
    // Block 0 is Data in a slot of the current epoch (never flushed): overwritable in place,
    // until a flush's snapshot makes its checksum durable.
    let second = pattern(6, BLOCK + 100);
    base.armed.store(true, Ordering::SeqCst);
    let writer = {
        let (chain, second) = (chain.clone(), second.clone());
        std::thread::spawn(move || chain.write_at(&second, 0))
    };
    base.wait_until_held();
    let flusher = {
        let chain = chain.clone();
        std::thread::spawn(move || chain.flush())
    };
    // Give the flush every chance to complete while the write is held.
    std::thread::sleep(Duration::from_millis(200));
    base.release();
    writer.join().unwrap().unwrap();
    flusher.join().unwrap().unwrap();
    let dev = read_after_crash_with_every_write_landed(&journal, &base_bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_block_is_one_of(&dev, 0, &[&first, &second[..BLOCK]], "the overwritten block");
}

/// A close whose final flush fails must keep failing until it really succeeds: reporting
/// success on a retry told the caller the image was cleanly closed when it was not.
#[test]
fn a_failed_close_is_not_reported_as_success_on_retry() {
    let mem = Arc::new(MemStorage::new());
    let faulty = Arc::new(FaultStorage::new(mem.clone()));
    let g = Geometry::new(SIZE, 16).unwrap();
    let img = Image::create_on(faulty.clone(), Path::new("img"), g, None, [3; 16]).unwrap();
    let chain = Chain::assemble(img, Vec::new(), None);
    chain.write_at(&pattern(7, 3 * BLOCK), 0).unwrap();
    // Operation 0 of the close is its flush's sync; 1 is the header that lists the new map
    // extent: a write that fails without poisoning the image.
    faulty.arm(1, FaultKind::Eio, false);
    let first = chain.close().expect_err("the close whose flush fails reports it");
    assert_eq!(first.kind(), ErrorKind::Io);
    // The fault was one-shot; a retry does the work for real, so it must really succeed...
    chain.close().expect("a retried close succeeds once its writes succeed");
    // ...and then the image is closed cleanly: the data is there and the dirty flag is clear.
    let again =
        Image::open_on(Arc::new(MemStorage::from_bytes(mem.snapshot())), Path::new("img"), OpenOptions::inspect())
            .unwrap();
    assert!(!again.header().has_flag(cowdisk::format::FLAG_DIRTY), "closed cleanly");
    let c = Chain::assemble(again, Vec::new(), None);
    let mut got = vec![0u8; 3 * BLOCK];
    c.read_at(&mut got, 0).unwrap();
    assert_eq!(got, pattern(7, 3 * BLOCK));
}

/// With a sync failure the close can never succeed: every retry says so.
#[test]
fn a_close_after_a_failed_sync_keeps_failing() {
    let mem = Arc::new(MemStorage::new());
    let faulty = Arc::new(FaultStorage::new(mem.clone()));
    let g = Geometry::new(SIZE, 16).unwrap();
    let img = Image::create_on(faulty.clone(), Path::new("img"), g, None, [3; 16]).unwrap();
    img.write_at(&[1; BLOCK], 65536).unwrap();
    // The first modifying operation of close is its flush's sync.
    faulty.arm(0, FaultKind::Eio, false);
    assert!(img.close().is_err());
    assert!(img.close().is_err(), "a retried close after a failed sync reported success");
}

/// `check --repair` worked out the leaked space from a look that held no lock, then punched it
/// after taking the exclusive lock, without looking again. A writer that opened the image in
/// between, wrote a new chunk into that space (the lowest free cluster) and closed, lost it.
#[test]
fn check_repair_never_punches_data_a_writer_put_into_leaked_space_meanwhile() {
    use cowdisk::chain::create::{create_image, CreateOptions};
    use cowdisk::ops::check::{check, CheckOptions};
    use cowdisk::ChainOptions;
    let dir = common::TempDir::new("repair-race");
    let p = dir.join("disk.cow");
    let opts = CreateOptions { size: Some(64 << 20), ..Default::default() };
    let img = create_image(&p, &opts).unwrap();
    let c = Chain::assemble(img, Vec::new(), None);
    // 16 MiB of data, so that a deep check reports progress (every 16 MiB) between its look
    // and its repair; then a leaked cluster at the end of the file, as a crash leaves one.
    let bulk = pattern(8, 16 << 20);
    c.write_at(&bulk, 0).unwrap();
    c.close().unwrap();
    drop(c);
    let end = std::fs::metadata(&p).unwrap().len().next_multiple_of(65536);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 65536], end).unwrap();
    drop(f);
    let fresh = pattern(9, 65536);
    let wrote = std::sync::atomic::AtomicBool::new(false);
    // Runs while check reads every block, after it has looked at the free space.
    let writer = |_: u64, _: u64| {
        if wrote.swap(true, Ordering::SeqCst) {
            return;
        }
        let w = Chain::open(&p, ChainOptions { writable: true, ..Default::default() }).unwrap();
        w.write_at(&fresh, 32 << 20).unwrap();
        w.close().unwrap();
    };
    let r = check(&p, &CheckOptions { repair: true, deep: true, ..Default::default() }, &writer);
    assert!(wrote.load(Ordering::SeqCst), "the writer never ran during the check");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    let c = Chain::open(&p, ChainOptions::default()).unwrap();
    let mut got = vec![0u8; 65536];
    c.read_at(&mut got, 32 << 20).unwrap();
    assert!(got == fresh, "the chunk written during the check was punched by the repair");
    c.read_at(&mut got, 0).unwrap();
    assert!(got[..] == bulk[..65536]);
}

/// A client that goes away in the middle of a large write (its payload ends early) leaves no
/// leaked space: the slots the write took are given back. Found when a server was stopped
/// with a large write on its way: `check` then reported leaked space (exit 3) after a clean
/// stop.
#[test]
fn a_write_whose_payload_is_cut_off_leaves_no_leaked_space() {
    use cowdisk::chain::create::{create_image, CreateOptions};
    use cowdisk::device::Payload;
    use cowdisk::ops::check::{check, CheckOptions};

    /// `n` bytes of a pattern, then an error, as a socket closed mid-request gives.
    struct CutOff(usize);
    impl Payload for CutOff {
        fn ready(&mut self, _min: usize, max: usize) -> cowdisk::Result<usize> {
            Ok(max.min(self.0))
        }
        fn take(&mut self, buf: &mut [u8]) -> cowdisk::Result<()> {
            if buf.len() > self.0 {
                return Err(cowdisk::Error::new(ErrorKind::Io, "the client went away"));
            }
            self.0 -= buf.len();
            buf.fill(0x3c);
            Ok(())
        }
        fn take_to(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> cowdisk::Result<()> {
            let n = len.min(self.0);
            storage.write_at(&vec![0x3c; n], offset)?;
            self.0 -= n;
            if n < len {
                return Err(cowdisk::Error::new(ErrorKind::Io, "the client went away"));
            }
            Ok(())
        }
    }

    for sums in [false, true] {
        let dir = common::TempDir::new("cutoff");
        let p = dir.join("disk.cow");
        let opts = CreateOptions { size: Some(16 << 20), data_checksums: Some(sums), ..Default::default() };
        let c = Chain::assemble(create_image(&p, &opts).unwrap(), Vec::new(), None);
        c.write_at(&pattern(1, 65536), 0).unwrap();
        // 4 MiB asked for, 1.5 MiB and 20,000 bytes sent: whole chunks into new slots, then
        // part of one more, then the cut.
        let e = c.write_from(&mut CutOff((3 << 19) + 20_000), 1 << 20, 4 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        c.close().unwrap();
        drop(c);
        let r = check(&p, &CheckOptions::default(), &|_, _| {});
        assert_eq!(r.exit_code(), 0, "checksums {sums}: {r:?}");
    }
}

/// Found by the crash explorer in the first version of the redo journal (format-spec §5.9,
/// pinned as concurrent seed 231): a cluster released by a journaled flush was given to another
/// chunk at once, while an older record in the journal still held a copy of a block of it. A
/// checkpoint cut short after its sectors were durable, before its record restarting the
/// journal, left the old chain, whose replay wrote that old copy into the new owner's block:
/// the new chunk read the old chunk's data. Released clusters now wait for the checkpoint.
#[test]
fn a_cluster_released_in_the_journal_is_not_reused_before_the_checkpoint() {
    let journal = Journal::new();
    let base = pattern(231, SIZE as usize);
    let store = Arc::new(RecordingStorage::new(journal.clone(), 0));
    // 4 KiB chunks: a map sector holds 15 entries, handed out in the order chunks are first
    // written, so chunk 40 below is described by the second sector, which no record logs.
    let g = Geometry::new(SIZE, 12).unwrap();
    let top = Image::create_on(store.clone(), Path::new("top"), g, Some(raw_ref()), [1; 16]).unwrap();
    let raw = RawImage::on(Arc::new(MemStorage::from_bytes(base.clone())), Path::new("base.raw"), SIZE);
    let chain = Chain::assemble(top, Vec::new(), Some(raw));
    // The journal and the map's first extent are made (a flush adding an extent is not
    // journaled); chunk 63 takes the first entry.
    chain.write_at(&[1u8; BLOCK], 63 * BLOCK as u64).unwrap();
    chain.flush().unwrap();
    let old = vec![0xaa; BLOCK];
    for c in 0..14u64 {
        chain.write_at(&old, c * BLOCK as u64).unwrap();
    }
    chain.flush().unwrap(); // a record holding copies of chunk 0's block (and the first sector)
    chain.discard(0, BLOCK as u64).unwrap();
    chain.flush().unwrap(); // a record releasing chunk 0's cluster
    let new = vec![0x55; BLOCK];
    chain.write_at(&new, 40 * BLOCK as u64).unwrap(); // chunk 40 takes a cluster
                                                      // A checkpoint, then a header write; the crash: just before the checkpoint's record,
                                                      // every write before it landed.
    chain.top().update_header(|_| {}).unwrap();
    let ops = journal.ops();
    let k = ops
        .iter()
        .rposition(|(_, op)| matches!(op, cowdisk::storage::recording::RecOp::DurableWrite { .. }))
        .expect("the checkpoint's record");
    let bytes = CrashImages::new(&journal, 1).state(0, k, |n| n - 1);
    let top = Image::open_on(Arc::new(MemStorage::from_bytes(bytes)), Path::new("top"), OpenOptions::writable())
        .expect("the crash state opens");
    let raw = RawImage::on(Arc::new(MemStorage::from_bytes(base.clone())), Path::new("base.raw"), SIZE);
    let chain = Chain::assemble(top, Vec::new(), Some(raw));
    let mut dev = vec![0u8; SIZE as usize];
    chain.read_at(&mut dev, 0).unwrap();
    // Chunk 40's block: what the base held there, or what was written; never chunk 0's data.
    let at = 40 * BLOCK;
    assert_block_is_one_of(&dev, 40, &[&base[at..at + BLOCK], &new], "chunk 40 after the crash");
    assert_block_is_one_of(&dev, 0, &[&[0u8; BLOCK], &old], "chunk 0 after the crash");
}

/// Found in review (2026-12-03): a write of whole chunks that failed part-way gave the new
/// slot of a chunk it had already written back at once, although that write was noted for the
/// next journaled flush, whose record then held a copy of what it put there. Handed to another
/// chunk before the checkpoint, the slot took that chunk's write; a checkpoint cut short after
/// its sectors were in place, before its record restarting the journal, left the old chain,
/// whose replay wrote the record's copy over the new owner's block: that chunk read bytes of a
/// write that had failed elsewhere. The slot of a failed write now waits like a released one
/// (format-spec §5.4, §5.9). The punch of the dropped slot fails here (a punch may fail, and
/// the slot is then still free to reuse): the record's copy is the failed write's bytes, not
/// zeros, so the block it lands in reads a value no request gave it.
#[test]
fn a_slot_of_a_failed_write_is_not_reused_before_the_checkpoint() {
    use cowdisk::device::Payload;

    /// Every byte ready at once, then the connection reset once `left` bytes were taken.
    struct ResetAfter {
        left: usize,
    }
    impl Payload for ResetAfter {
        fn ready(&mut self, _min: usize, max: usize) -> cowdisk::Result<usize> {
            Ok(max)
        }
        fn take(&mut self, buf: &mut [u8]) -> cowdisk::Result<()> {
            if buf.len() > self.left {
                return Err(cowdisk::Error::new(ErrorKind::Io, "connection reset"));
            }
            self.left -= buf.len();
            buf.fill(0x3c);
            Ok(())
        }
        fn take_to(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> cowdisk::Result<()> {
            if len > self.left {
                return Err(cowdisk::Error::new(ErrorKind::Io, "connection reset"));
            }
            storage.write_at(&vec![0x3c; len], offset)?;
            self.left -= len;
            Ok(())
        }
    }

    let journal = Journal::new();
    let base = pattern(78, SIZE as usize);
    let store = Arc::new(PunchFaults::new(Arc::new(RecordingStorage::new(journal.clone(), 0))));
    // 4 KiB chunks (one block each): a map sector holds 15 entries, handed out in the order
    // chunks first get one.
    let g = Geometry::new(SIZE, 12).unwrap();
    let top = Image::create_on(store.clone(), Path::new("top"), g, Some(raw_ref()), [1; 16]).unwrap();
    let raw = RawImage::on(Arc::new(MemStorage::from_bytes(base.clone())), Path::new("base.raw"), SIZE);
    let chain = Chain::assemble(top, Vec::new(), Some(raw));
    let at = |c: u64| c * BLOCK as u64;
    // The journal and the map's first extent (a flush adding an extent is not journaled).
    chain.write_at(&[1u8; BLOCK], at(63)).unwrap();
    chain.flush().unwrap();
    // Chunk 40 zeroed: an entry with no slot, in the first sector, which 13 more chunks fill;
    // then a checkpoint, so that no record logs that sector.
    chain.write_zeroes(at(40), BLOCK as u64, false).unwrap();
    for c in 0..13 {
        chain.write_at(&[2u8; BLOCK], at(c)).unwrap();
    }
    // Chunk 21 has a slot: a write of chunks 20 to 22 is three runs (a new slot, in place, a
    // new slot).
    chain.write_at(&[3u8; BLOCK], at(21)).unwrap();
    chain.top().update_header(|_| {}).unwrap();
    // The failed write: chunks 20 and 21 written, the connection reset before chunk 22's bytes.
    store.failing.store(true, Ordering::SeqCst);
    let e = chain.write_from(&mut ResetAfter { left: 2 * BLOCK }, at(20), 3 * BLOCK as u64).unwrap_err();
    store.failing.store(false, Ordering::SeqCst);
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    chain.flush().unwrap(); // journaled: its record holds a copy of chunk 20's dropped slot
    let new = vec![0x55; BLOCK];
    chain.write_at(&new, at(40)).unwrap(); // chunk 40 takes a slot
    chain.top().update_header(|_| {}).unwrap(); // a checkpoint, then a header write
                                                // The crash: just before the checkpoint's record, every write before it landed.
    let ops = journal.ops();
    let k = ops
        .iter()
        .rposition(|(_, op)| matches!(op, cowdisk::storage::recording::RecOp::DurableWrite { .. }))
        .expect("the checkpoint's record");
    let bytes = CrashImages::new(&journal, 1).state(0, k, |n| n - 1);
    let top = Image::open_on(Arc::new(MemStorage::from_bytes(bytes)), Path::new("top"), OpenOptions::writable())
        .expect("the crash state opens");
    let raw = RawImage::on(Arc::new(MemStorage::from_bytes(base.clone())), Path::new("base.raw"), SIZE);
    let chain = Chain::assemble(top, Vec::new(), Some(raw));
    let mut dev = vec![0u8; SIZE as usize];
    chain.read_at(&mut dev, 0).unwrap();
    // Chunk 40: zeros (durable since the first checkpoint) or what was written; never the
    // failed write's bytes. Chunk 20: the base (the write failed) or what it sent.
    assert_block_is_one_of(&dev, 40, &[&[0u8; BLOCK], &new], "chunk 40 after the crash");
    let b20 = &base[at(20) as usize..at(21) as usize];
    assert_block_is_one_of(&dev, 20, &[b20, &[0x3c; BLOCK]], "chunk 20 after the crash");
}

/// Found in review (2026-12-03): a header written through `update_header` that freezes the
/// image dropped the journal and punched its area, but synced the punch only with that header:
/// a crash could keep the frozen header and lose the punch, leaving the area's records as
/// space no map points at, in a layer nothing opens for writing again (format-spec §5.9: the
/// area is punched, and synced, before that header, as `freeze` already did).
#[test]
fn a_header_that_freezes_the_image_follows_the_punch_of_its_journal() {
    use cowdisk::format::FLAG_FROZEN;
    use cowdisk::ops::check::{check, CheckOptions};
    use cowdisk::storage::recording::RecOp;

    let journal = Journal::new();
    let store = Arc::new(RecordingStorage::new(journal.clone(), 0));
    let g = Geometry::new(SIZE, 16).unwrap();
    let img = Image::create_on(store, Path::new("top"), g, Some(raw_ref()), [1; 16]).unwrap();
    // The first flush makes the journal; the second writes a record into it.
    let chain = Chain::assemble(img, Vec::new(), None);
    chain.write_at(&[2u8; BLOCK], 0).unwrap();
    chain.flush().unwrap();
    chain.write_at(&[3u8; BLOCK], 4096).unwrap();
    chain.flush().unwrap();
    assert!(chain.top().header().journal.is_some(), "the image has a journal to drop");
    chain.top().update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();

    // The crash: just before the last sync, with the frozen header in place and every sector
    // the header did not write as it was at the sync before (the area not yet punched).
    let ops = journal.ops();
    let k = ops.iter().rposition(|(_, op)| matches!(op, RecOp::Sync)).expect("the header's sync");
    let header = ops[..k].iter().rev().find_map(|(_, op)| match op {
        RecOp::Write { offset, data } => Some((*offset, data.len())),
        _ => None,
    });
    let (h_off, h_len) = header.expect("the frozen header's write");
    // Candidates come sector by sector in order; the header's are the first unless something
    // before it in the file is also unsynced, which this image does not have below the header.
    let header_sectors = h_len.div_ceil(512);
    assert!(h_off < 65536, "the header is at the file's start");
    let mut calls = 0;
    let bytes = CrashImages::new(&journal, 1).state(0, k, |n| {
        calls += 1;
        if calls <= header_sectors {
            n
        } else {
            0
        }
    });
    let frozen =
        Image::open_on(Arc::new(MemStorage::from_bytes(bytes.clone())), Path::new("top"), OpenOptions::read_only())
            .expect("the crash state opens");
    assert!(frozen.header().has_flag(FLAG_FROZEN), "the state has the frozen header");
    let scratch = common::TempDir::new("frozen");
    let p = scratch.join("top.cow");
    common::write_sparse(&p, &bytes).unwrap();
    let r = check(&p, &CheckOptions::default(), &|_, _| {});
    assert_eq!(r.images[0].leaked_bytes, 0, "space leaked in the frozen layer: {r:?}");
}

/// Found in review (2026-12-04): a flush that punched the slots it released stopped at the
/// first punch that failed, with the whole batch already out of the queue: none of them went
/// back, so they were neither free nor queued. A slot a relocating rewrite left (data
/// checksums, spec §5.8) kept its old data, a later flush and close succeeded and marked the
/// image clean, and `check` found data in space no map points at (format-spec §5.5 forbids it
/// in a clean image). Slots whose punch failed now go back to the queue, for the next flush to
/// punch. (A discard punches its blocks when it runs: a slot it releases holds nothing, so the
/// rewrite is what shows the leak.)
#[test]
fn a_slot_whose_punch_failed_is_punched_by_a_later_flush() {
    use cowdisk::ops::check::{check, CheckOptions};

    let mem = Arc::new(MemStorage::new());
    let store = Arc::new(PunchFaults::new(mem.clone()));
    let g = Geometry::new(SIZE, 12).and_then(|g| g.with_data_checksums(true)).unwrap();
    let chain = overlay_chain(store.clone(), Path::new("top"), g);
    for c in 0..4u64 {
        chain.write_at(&[7u8; BLOCK], c * BLOCK as u64).unwrap();
    }
    chain.top().update_header(|_| {}).unwrap(); // the map durable: a rewrite must relocate
    for c in 1..3u64 {
        chain.write_at(&[8u8; BLOCK], c * BLOCK as u64).unwrap(); // releases the old slot
    }
    store.failing.store(true, Ordering::SeqCst);
    let failed = chain.top().update_header(|_| {});
    store.failing.store(false, Ordering::SeqCst);
    assert!(failed.is_err() && store.refused.load(Ordering::Relaxed) > 0, "a punch was refused ({failed:?})");
    chain.flush().unwrap();
    chain.close().unwrap();
    drop(chain);

    let scratch = common::TempDir::new("punch");
    let p = scratch.join("top.cow");
    common::write_sparse(&p, &mem.snapshot()).unwrap();
    let r = check(&p, &CheckOptions::default(), &|_, _| {});
    assert_eq!(r.images[0].leaked_bytes, 0, "space leaked after a failed punch: {r:?}");
    let img =
        Image::open_on(Arc::new(MemStorage::from_bytes(mem.snapshot())), Path::new("top"), OpenOptions::read_only())
            .unwrap();
    assert!(!img.header().has_flag(cowdisk::format::FLAG_DIRTY), "the image was closed clean");
    let chain = Chain::assemble(img, Vec::new(), None);
    for c in 0..4u64 {
        let mut buf = [0u8; BLOCK];
        chain.read_at(&mut buf, c * BLOCK as u64).unwrap();
        let want = if (1..3).contains(&c) { 8 } else { 7 };
        assert!(buf.iter().all(|&b| b == want), "chunk {c} reads back what was last written");
    }
}

/// Found in the same review: a map replacement (commit's last step) punched the space only the
/// old map used and stopped at the first punch that failed, with that space already out of
/// the allocator. The old map's sectors stayed in space no map points at, and a later close
/// marked the image clean (format-spec §5.5). The space now goes to the release queue, which
/// the next flush punches.
#[test]
fn old_map_space_whose_punch_failed_is_punched_by_a_later_flush() {
    use cowdisk::format::map::MapEntry;
    use cowdisk::ops::check::{check, CheckOptions};

    let mem = Arc::new(MemStorage::new());
    let store = Arc::new(PunchFaults::new(mem.clone()));
    let chain = overlay_chain(store.clone(), Path::new("top"), Geometry::new(SIZE, 12).unwrap());
    for c in 0..4u64 {
        chain.write_at(&[7u8; BLOCK], c * BLOCK as u64).unwrap();
    }
    chain.top().update_header(|_| {}).unwrap(); // the map in its extent on disk
    let entries: Vec<MapEntry> = chain
        .top()
        .entries()
        .into_iter()
        .map(|(chunk, e)| MapEntry { chunk, data_offset: e.data_offset, blocks: e.blocks, crcs: e.crcs.to_vec() })
        .collect();
    store.failing.store(true, Ordering::SeqCst);
    let replaced = chain.top().replace_map(entries);
    store.failing.store(false, Ordering::SeqCst);
    assert!(replaced.is_err() && store.refused.load(Ordering::Relaxed) > 0, "a punch was refused ({replaced:?})");
    chain.flush().unwrap();
    chain.close().unwrap();
    drop(chain);

    let scratch = common::TempDir::new("punch-map");
    let p = scratch.join("top.cow");
    common::write_sparse(&p, &mem.snapshot()).unwrap();
    let r = check(&p, &CheckOptions::default(), &|_, _| {});
    assert_eq!(r.images[0].leaked_bytes, 0, "the old map's space leaked after a failed punch: {r:?}");
    let img =
        Image::open_on(Arc::new(MemStorage::from_bytes(mem.snapshot())), Path::new("top"), OpenOptions::read_only())
            .unwrap();
    assert!(!img.header().has_flag(cowdisk::format::FLAG_DIRTY), "the image was closed clean");
    let chain = Chain::assemble(img, Vec::new(), None);
    let mut buf = vec![0u8; 4 * BLOCK];
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 7), "every chunk reads back what was written");
}

/// Found in the same review: a header update that freezes the image (what compaction writes
/// into its temporary) punches the journal area first; when the header write after that
/// failed, the image stayed writable with the old header, which still names the area, and a
/// journal state that went on writing records past the punched start. Recovery reads a hole
/// at the start of the area as an empty chain, so a flush that reported success lost its
/// data at reopen. Such a failure now poisons the image: later writes and flushes fail until
/// it is reopened. Every modifying operation of the update is failed in turn.
#[test]
fn a_flush_after_a_failed_freezing_header_update_keeps_its_promise() {
    use cowdisk::format::FLAG_FROZEN;

    let mut failed_updates = 0;
    for nth in 0..=8 {
        let mem = Arc::new(MemStorage::new());
        let fault = Arc::new(FaultStorage::new(mem.clone()));
        let chain = overlay_chain(fault.clone(), Path::new("top"), Geometry::new(SIZE, 12).unwrap());
        // Journaled flushes: the area exists and holds records.
        for c in 0..3u64 {
            chain.write_at(&[7u8; BLOCK], c * BLOCK as u64).unwrap();
            chain.flush().unwrap();
        }
        fault.arm(nth, FaultKind::Eio, false);
        let frozen = chain.top().update_header(|h| h.set_flag(FLAG_FROZEN, true));
        fault.arm(u64::MAX, FaultKind::Eio, false);
        if frozen.is_ok() {
            continue; // the fault fell after the update's last operation
        }
        failed_updates += 1;
        let wrote = chain.write_at(&[9u8; BLOCK], 4 * BLOCK as u64).and_then(|_| chain.flush());
        // A power cut right after the flush: what the file holds now (every write it made
        // was synced before it returned), not what a close would add.
        let after = mem.snapshot();
        drop(chain);
        let Ok(()) = wrote else { continue }; // refused: the caller knows, nothing was promised
        let img =
            Image::open_on(Arc::new(MemStorage::from_bytes(after)), Path::new("top"), OpenOptions::writable()).unwrap();
        let chain = Chain::assemble(img, Vec::new(), None);
        let mut buf = [0u8; BLOCK];
        chain.read_at(&mut buf, 4 * BLOCK as u64).unwrap();
        assert!(
            buf.iter().all(|&b| b == 9),
            "fault at operation {nth}: a flush reported success and its write is gone"
        );
    }
    assert!(failed_updates > 0, "some fault made the update fail");
}

/// A parent image (on `store`) holding 7s in chunks 0..4, flushed and still open, and a top
/// over it with 8s in chunks 1 and 5: what a commit of the top changes is chunk 1 (a slot of
/// the parent's given up, a new one taken) and chunk 5 (a new slot), and the map moves to a
/// new extent.
fn parent_and_top(store: Arc<dyn Storage>) -> (Image, Image) {
    let g = Geometry::new(SIZE, 12).unwrap();
    let parent = Image::create_on(store, Path::new("parent"), g, Some(raw_ref()), [3; 16]).unwrap();
    let c = Chain::assemble(parent, Vec::new(), None);
    for i in 0..4u64 {
        c.write_at(&[7u8; BLOCK], i * BLOCK as u64).unwrap();
    }
    c.flush().unwrap();
    let (parent, _, _) = c.into_layers();
    let pref = ParentRef {
        format: ParentFormat::Cowdisk,
        path: b"parent".to_vec(),
        uuid: [3; 16],
        size: SIZE,
        fingerprint: 0,
    };
    let top = Image::create_on(Arc::new(MemStorage::new()), Path::new("top"), g, Some(pref), [4; 16]).unwrap();
    let t = Chain::assemble(top, Vec::new(), None);
    for i in [1u64, 5] {
        t.write_at(&[8u8; BLOCK], i * BLOCK as u64).unwrap();
    }
    t.flush().unwrap();
    let (top, _, _) = t.into_layers();
    (parent, top)
}

/// What chunks 0..6 of the parent read, each as its first byte, once it is closed: closed as
/// it is, or (when the failure poisoned it) reopened for writing, which reclaims what a
/// failure left, and closed again. Also asserts that `check` finds no leaked space in it.
fn closed_parent_reads(parent: Image, mem: &Arc<MemStorage>, what: &str) -> Vec<u8> {
    if parent.close().is_err() {
        drop(parent);
        let again = Image::open_on(
            Arc::new(MemStorage::from_bytes(mem.snapshot())),
            Path::new("parent"),
            OpenOptions::writable(),
        );
        let again = again.unwrap_or_else(|e| panic!("{what}: the parent does not reopen: {e}"));
        again.close().unwrap();
        let bytes = again.storage().len().and_then(|n| {
            let mut b = vec![0u8; n as usize];
            again.storage().read_at(&mut b, 0).map(|()| b)
        });
        return reads_and_no_leak(&bytes.unwrap(), what);
    }
    drop(parent);
    reads_and_no_leak(&mem.snapshot(), what)
}

/// What chunks 0..6 of the image in `bytes` read (see [`closed_parent_reads`]), after
/// asserting that `check` finds it clean.
fn reads_and_no_leak(bytes: &[u8], what: &str) -> Vec<u8> {
    use cowdisk::ops::check::{check, CheckOptions};
    let scratch = common::TempDir::new("parent");
    let p = scratch.join("parent.cow");
    common::write_sparse(&p, bytes).unwrap();
    let r = check(&p, &CheckOptions::default(), &|_, _| {});
    assert_eq!(r.exit_code(), 0, "{what}: check finds the closed parent unclean (leaked space?): {r:?}");
    let img =
        Image::open_on(Arc::new(MemStorage::from_bytes(bytes.to_vec())), Path::new("parent"), OpenOptions::read_only())
            .unwrap();
    let c = Chain::assemble(img, Vec::new(), None);
    (0..6u64)
        .map(|i| {
            let mut b = [0u8; BLOCK];
            c.read_at(&mut b, i * BLOCK as u64).unwrap();
            assert!(b.iter().all(|&x| x == b[0]), "{what}: chunk {i} is torn");
            b[0]
        })
        .collect()
}

/// Found in review (2026-12-04): a commit whose map switch failed before its header write
/// dropped the prepared map, whose new extent and new slots (the top's data) no map named and
/// nothing gave back; a prepare that failed after taking its extents kept them too; a failed
/// header write let the image go on as if the old map were certain. Each left data in free
/// space of a parent that a later close marked clean (§5.5). Every modifying operation of the
/// commit is failed in turn: the parent then reads as before the commit or after it, and,
/// closed (reopened first if the failure poisoned it), has no leaked space.
#[test]
fn a_commit_that_fails_at_any_operation_leaves_no_space_behind_in_the_parent() {
    use cowdisk::ops::commit::commit_into;
    let before = vec![7, 7, 7, 7, 0, 0];
    let after = vec![7, 8, 7, 7, 0, 8];
    let mut failed = 0;
    for nth in 0..=40 {
        let mem = Arc::new(MemStorage::new());
        let fault = Arc::new(FaultStorage::new(mem.clone()));
        let (parent, top) = parent_and_top(fault.clone());
        fault.arm(nth, FaultKind::Eio, false);
        let res = commit_into(&top, &parent, &|_, _| {});
        fault.arm(u64::MAX, FaultKind::Eio, false);
        let what = format!("fault at operation {nth} ({res:?})");
        let reads = closed_parent_reads(parent, &mem, &what);
        if res.is_ok() {
            assert_eq!(reads, after, "{what}");
            break;
        }
        failed += 1;
        assert!(reads == before || reads == after, "{what}: the parent reads {reads:?}");
    }
    assert!(failed > 5, "the commit failed at only {failed} operations");
}

/// Found in the same review: the first flush makes the journal area; when a write
/// or sync of it failed before the header named it, the area (its checkpoint mark written)
/// was neither named nor free, and a later close left it in free space of a clean image.
/// Every modifying operation of that flush is failed in turn; then a flush and a close (a
/// reopen first if the failure poisoned the image) leave no leaked space, and the data a
/// flush that succeeded promised.
#[test]
fn a_journal_area_whose_making_failed_is_given_back() {
    let mut failed = 0;
    for nth in 0..=12 {
        let mem = Arc::new(MemStorage::new());
        let fault = Arc::new(FaultStorage::new(mem.clone()));
        let c = overlay_chain(fault.clone(), Path::new("parent"), Geometry::new(SIZE, 12).unwrap());
        c.write_at(&[7u8; BLOCK], 0).unwrap();
        c.write_at(&[8u8; BLOCK], BLOCK as u64).unwrap();
        assert!(c.top().header().journal.is_none(), "no journal before the first flush");
        fault.arm(nth, FaultKind::Eio, false);
        let res = c.flush();
        fault.arm(u64::MAX, FaultKind::Eio, false);
        let made = c.top().header().journal.is_some();
        if res.is_ok() && made {
            break;
        }
        failed += u32::from(res.is_err());
        // After a failed sync the image is poisoned and promises nothing it had not flushed.
        let promised = c.flush().is_ok();
        let (img, _, _) = c.into_layers();
        let what = format!("fault at operation {nth} ({res:?})");
        let reads = closed_parent_reads(img, &mem, &what);
        if promised {
            assert_eq!(reads[..2], [7, 8], "{what}");
        }
    }
    assert!(failed > 1, "the flush failed at only {failed} operations");
}

/// Found in the same review: when a layer taken up for writing (a live commit's parent)
/// failed to give writing up again (its close stopped at a punch that failed), the image
/// stayed writable and closing, and the next take-up returned at once: every later write
/// was refused as "image is closed" until the server restarted. Writing now resumes.
#[test]
fn writing_resumes_after_a_failed_end_of_writing() {
    let mem = Arc::new(MemStorage::new());
    let store = Arc::new(PunchFaults::new(mem.clone()));
    let (parent, _top) = parent_and_top(store.clone());
    parent.close().unwrap();
    drop(parent);
    let p = Image::open_on(store.clone(), Path::new("parent"), OpenOptions::read_only()).unwrap();
    p.begin_writing().unwrap();
    let c = Chain::assemble(p, Vec::new(), None);
    c.discard(BLOCK as u64, BLOCK as u64).unwrap(); // the slot goes to the release queue
    store.failing.store(true, Ordering::SeqCst);
    let ended = c.top().end_writing();
    store.failing.store(false, Ordering::SeqCst);
    assert!(ended.is_err() && store.refused.load(Ordering::Relaxed) > 0, "the punch at close failed ({ended:?})");
    c.top().begin_writing().unwrap();
    c.write_at(&[9u8; BLOCK], 2 * BLOCK as u64).expect("a write after writing was taken up again");
    c.top().end_writing().unwrap();
    let (p, _, _) = c.into_layers();
    assert!(!p.is_writable());
    drop(p);
    assert_eq!(reads_and_no_leak(&mem.snapshot(), "after the take-up")[..4], [7, 0, 9, 7]);
}

/// Found in the same review: a log-structured image gives its window of ready space up at
/// close, punched; when a punch failed, the space was made free all the same, and the close
/// retried (or the one at drop) marked the image clean with the window's written space in
/// its free space, which `check` on the file reports as leaked. The space now goes to the
/// release queue, which the retried close punches.
#[test]
fn a_log_window_whose_punch_failed_is_punched_by_the_retried_close() {
    use cowdisk::ops::check::{check, CheckOptions};
    use cowdisk::storage::FileStorage;

    let dir = common::TempDir::new("logwindow");
    let p = dir.join("top.cow");
    let store = Arc::new(PunchFaults::new(Arc::new(FileStorage::create(&p).unwrap())));
    let g = Geometry::new(SIZE, 13).and_then(|g| g.with_log(true)).unwrap();
    let c = overlay_chain(store.clone(), &p, g);
    for i in 0..3u64 {
        // Aligned single blocks with FUA into chunks with no slot: what takes the log's path.
        c.write_fua_from(&mut &[9u8; BLOCK][..], 4 * i * BLOCK as u64, BLOCK as u64).unwrap();
    }
    store.failing.store(true, Ordering::SeqCst);
    let closed = c.close();
    store.failing.store(false, Ordering::SeqCst);
    assert!(closed.is_err() && store.refused.load(Ordering::Relaxed) > 0, "a punch at close failed ({closed:?})");
    c.close().unwrap();
    drop((c, store)); // the file's lock goes with its last handle
    let r = check(&p, &CheckOptions::default(), &|_, _| {});
    assert_eq!(r.exit_code(), 0, "check finds the closed image unclean: {r:?}");
    let img = Image::open(&p, OpenOptions::read_only()).unwrap();
    let c = Chain::assemble(img, Vec::new(), None);
    let mut b = [0u8; BLOCK];
    c.read_at(&mut b, 4 * BLOCK as u64).unwrap();
    assert!(b.iter().all(|&x| x == 9), "a FUA write reads back");
}
