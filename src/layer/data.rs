//! The per-chunk metadata operations the merged device plans its I/O with: typed write plans
//! (in place, new slot, relocate), decided against what a durable map may reference and
//! committed once the data is written; block states and their checksums; verified reads.

use super::{read, write, Image, State};
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;
use std::sync::atomic::Ordering;
use std::sync::RwLockReadGuard;

/// Where the blocks a write covers go in the file, decided under the metadata lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotPlan {
    /// Into the chunk's current slot: no map that is or may become durable records any of the
    /// covered blocks as Data there, or the image has no data checksums (spec §5.8).
    InPlace { slot: u64 },
    /// Into a slot just taken for a chunk that had none. The entry already names it (with no
    /// Data block yet, which readers and a reopen after a crash ignore).
    NewSlot { slot: u64 },
    /// Data checksums, and a covered block may be Data in a durable map: the chunk moves to the
    /// fresh slot `to`. The caller copies the `keep` block runs (Data blocks the write does not
    /// cover) from `from` to `to`, writes the covered blocks into `to`, and the commit points
    /// the entry at `to` and releases `from`. Until a flush makes that durable, the durable map
    /// keeps pointing at `from`, whose blocks nobody overwrites.
    Relocate { from: u64, to: u64, keep: Vec<(usize, usize)> },
}

/// A decided write into blocks `first..last` of one chunk. The caller holds the chunk lock
/// from [`Image::plan_write`] to [`Image::commit_write`] and does the data I/O in between,
/// with no metadata lock held.
///
/// With data checksums the plan also holds the image's snapshot gate shared: a flush takes it
/// exclusively for its snapshot (F1), so no snapshot falls between the decision and the
/// commit. One that did could make durable the checksum of a block this write is overwriting
/// in place. Dropped without a commit, the plan gives back a relocation target that no entry
/// ever named.
pub struct WritePlan<'a> {
    img: &'a Image,
    chunk: u64,
    first: usize,
    last: usize,
    slot: SlotPlan,
    committed: bool,
    _gate: Option<RwLockReadGuard<'a, ()>>,
}

impl WritePlan<'_> {
    pub fn slot(&self) -> &SlotPlan {
        &self.slot
    }

    /// The file offset of the slot the covered blocks are written to.
    pub fn target(&self) -> u64 {
        match self.slot {
            SlotPlan::InPlace { slot } | SlotPlan::NewSlot { slot } => slot,
            SlotPlan::Relocate { to, .. } => to,
        }
    }

    /// Whether the target slot was taken by this plan (nothing of it written yet).
    pub fn is_new_slot(&self) -> bool {
        !matches!(self.slot, SlotPlan::InPlace { .. })
    }
}

impl Drop for WritePlan<'_> {
    /// A write that failed part-way (a client gone in the middle of a large write, a full
    /// disk) gives back the slot it took, so that nothing of it is left as leaked space.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let freed = {
            let mut guard = write(&self.img.state);
            let st = &mut *guard;
            match self.slot {
                // Never named by any entry, in memory or on disk: free at once.
                SlotPlan::Relocate { to, .. } => Some(to),
                // Named by the entry, which holds no Data block in it: a map on disk that
                // names it too is one a reader drops at open (spec §5.5), so the slot is no
                // real reference and may be freed at once as well.
                SlotPlan::NewSlot { slot } => {
                    let unused = st
                        .map
                        .get(self.chunk)
                        .is_some_and(|e| e.data_offset == slot && e.blocks.count(BlockState::Data) == 0);
                    unused.then(|| {
                        let alloc = &mut st.alloc;
                        if let Ok(e) = st.map.entry_mut(self.chunk, |len| alloc.alloc_fresh(len)) {
                            e.data_offset = 0;
                            e.pinned = 0;
                        }
                        slot
                    })
                }
                SlotPlan::InPlace { .. } => None,
            }
        };
        if let Some(slot) = freed {
            // What the failed write put there is nobody's data: punched at once (a failed
            // punch only leaves it there a while longer; the release punches it again).
            let _ = self.img.storage.punch(slot, self.img.geom.chunk_size());
            // But not reusable at once: the write noted what it put there for the next
            // journaled flush, whose record copies it, and a crash before the checkpoint
            // replays that copy. A slot another chunk took meanwhile would read it (spec
            // §5.9: released clusters become reusable only after the next checkpoint). So
            // the slot waits like one a map change released; without a journal, until the
            // next flush.
            write(&self.img.state).alloc.release_later(slot);
        }
    }
}

/// The most the file is lengthened by at a time ahead of new slots.
const EXTEND_STEP_MAX: u64 = 64 << 20;

/// Bits `first..last` of a block mask ([`Entry::pinned`](super::Entry::pinned) has no others).
fn block_mask(first: usize, last: usize) -> u64 {
    (first.min(64)..last.min(64)).fold(0, |m, b| m | 1 << b)
}

impl Image {
    /// Lengthens the file ahead of the slots handed out, in steps of 1/16 of the disk (a chunk
    /// to 64 MiB), so that writing a new slot fills a hole inside the file instead of growing
    /// it. A write that grows a file changes its size, which a file system must make durable
    /// with the next sync of any range of it: with ext4, each journal record's durable write
    /// then also wrote the inode (measured in PROFILING.md). The tail reads as zeros, takes no
    /// space, and is cut off again at close. A file that cannot be lengthened fails the write
    /// that needed it, as a failed write would: the store is failing.
    fn extend_ahead(&self, st: &mut State) -> Result<()> {
        let end = st.alloc.end();
        if end <= st.extended_to {
            return Ok(());
        }
        let cs = self.geom.chunk_size();
        let step = (self.geom.virtual_size / 16).clamp(cs, EXTEND_STEP_MAX).next_multiple_of(cs);
        let to = end.saturating_add(step).min(crate::format::header::MAX_FILE_SIZE);
        // Nothing is written past `end` (every slot, map extent and journal area lies below
        // it), so lengthening to `to` can never cut anything off.
        if self.storage.len()? < to {
            self.storage.set_len(to)?;
        }
        st.extended_to = to;
        Ok(())
    }

    /// Decides where a write of blocks `first..last` of `chunk` goes (see [`SlotPlan`]), taking
    /// a slot if the chunk needs one. Caller holds the chunk lock until the plan is committed
    /// or dropped. With data checksums the caller writes every covered block whole.
    pub fn plan_write(&self, chunk: u64, first: usize, last: usize) -> Result<WritePlan<'_>> {
        self.require_writable()?;
        let gate = self.geom.data_checksums.then(|| read(&self.snapshot_gate));
        let mut guard = write(&self.state);
        let st = &mut *guard;
        let slot = match st.map.get(chunk) {
            Some(e) if e.data_offset != 0 && e.pinned & block_mask(first, last) == 0 => {
                SlotPlan::InPlace { slot: e.data_offset }
            }
            Some(e) if e.data_offset != 0 => {
                let n = e.blocks.len();
                let keep = e
                    .blocks
                    .runs(0, first)
                    .chain(e.blocks.runs(last, n))
                    .filter(|r| r.2 == BlockState::Data)
                    .map(|r| (r.0, r.1))
                    .collect();
                let from = e.data_offset;
                SlotPlan::Relocate { from, to: st.alloc.alloc_slot()?, keep }
            }
            _ => {
                let alloc = &mut st.alloc;
                // The entry first: if the map cannot grow, no cluster has been taken yet.
                let e = st.map.entry_mut(chunk, |len| alloc.alloc_fresh(len))?;
                let slot = alloc.alloc_slot()?;
                e.data_offset = slot;
                e.pinned = 0;
                SlotPlan::NewSlot { slot }
            }
        };
        let extended = if matches!(slot, SlotPlan::InPlace { .. }) { Ok(()) } else { self.extend_ahead(st) };
        drop(guard);
        // Made before the error is returned, so that dropping it gives the slot back (its drop
        // takes the state lock, released above).
        let plan = WritePlan { img: self, chunk, first, last, slot, committed: false, _gate: gate };
        extended.map_err(|e| e.with_file(&self.path))?;
        Ok(plan)
    }

    /// Records a planned write whose data has been written: the covered blocks become Data
    /// (with `crcs`, one per block, under data checksums), and a relocated chunk moves to its
    /// new slot, the old one released for reuse after the next flush (spec §5.4).
    pub fn commit_write(&self, mut plan: WritePlan<'_>, crcs: &[u32]) -> Result<()> {
        self.require_writable()?;
        let mut guard = write(&self.state);
        let st = &mut *guard;
        if let SlotPlan::Relocate { from, to, .. } = plan.slot {
            let alloc = &mut st.alloc;
            let e = st.map.entry_mut(plan.chunk, |len| alloc.alloc_fresh(len))?;
            e.data_offset = to;
            e.pinned = 0;
            alloc.release_later(from);
        }
        let punches = self.change_blocks(st, plan.chunk, plan.first, plan.last, BlockState::Data, crcs)?;
        plan.committed = true;
        debug_assert!(punches.is_empty(), "blocks becoming Data punch nothing");
        Ok(())
    }

    /// Sets blocks `start..end` of `chunk` to Zero or Absent (Data goes through a write plan).
    /// Caller holds the chunk lock.
    ///
    /// Space of Data blocks that stop being Data is punched at once (they read as zero or fall
    /// through either way), and a slot left with no Data block is released, to be reused after
    /// the next flush. With data checksums nothing is punched before the map change is durable:
    /// a crash must not leave a durable checksum over a punched block.
    pub fn clear_blocks(&self, chunk: u64, start: usize, end: usize, state: BlockState) -> Result<()> {
        self.require_writable()?;
        if state == BlockState::Data {
            return Err(err(ErrorKind::InvalidArgument, "data blocks are set by a write plan"));
        }
        // Held until the punches are done: a flush cannot make a released slot reusable (and
        // another chunk cannot write into it) before this punch has landed.
        let _io = self.io_guard();
        let punches = self.change_blocks(&mut write(&self.state), chunk, start, end, state, &[])?;
        for (off, len) in punches {
            self.storage.punch(off, len).map_err(|e| e.with_file(&self.path))?;
        }
        Ok(())
    }

    /// Sets blocks `start..end` of `chunk` to `state` in the map; returns the file ranges to
    /// punch (Data blocks that stopped being Data, without data checksums).
    fn change_blocks(
        &self,
        st: &mut State,
        chunk: u64,
        start: usize,
        end: usize,
        state: BlockState,
        crcs: &[u32],
    ) -> Result<Vec<(u64, u64)>> {
        let checksums = self.geom.data_checksums;
        match st.map.get(chunk) {
            None if state == BlockState::Absent => return Ok(Vec::new()),
            // Nothing changes (but Data with checksums: the checksums may).
            Some(e) if (state != BlockState::Data || !checksums) && (start..end).all(|b| e.blocks.get(b) == state) => {
                return Ok(Vec::new())
            }
            _ => {}
        }
        let alloc = &mut st.alloc;
        let e = st.map.entry_mut(chunk, |len| alloc.alloc_fresh(len))?;
        if state == BlockState::Data && e.data_offset == 0 {
            return Err(err(ErrorKind::InvalidArgument, "data blocks need a slot first"));
        }
        let mut punches = Vec::new();
        // A log record's home (spec §5.10) is under the record's CRC until the checkpoint:
        // punched only when its release is reusable, as with data checksums.
        let keep = checksums || e.pinned != 0;
        if state != BlockState::Data && e.data_offset != 0 && !keep {
            for (s, t, was) in e.blocks.runs(start, end) {
                if was == BlockState::Data {
                    punches.push((e.data_offset + s as u64 * BLOCK_SIZE, (t - s) as u64 * BLOCK_SIZE));
                }
            }
        }
        e.blocks.set_range(start, end, state);
        if checksums {
            for (i, c) in e.crcs[start..end].iter_mut().enumerate() {
                *c = if state == BlockState::Data { crcs.get(i).copied().unwrap_or(0) } else { 0 };
            }
        }
        if e.data_offset != 0 && e.blocks.count(BlockState::Data) == 0 {
            punches = if keep { Vec::new() } else { vec![(e.data_offset, self.geom.chunk_size())] };
            alloc.release_later(e.data_offset);
            e.data_offset = 0;
            e.pinned = 0;
        }
        Ok(punches)
    }

    /// Reads bytes `start..start + buf.len()` of `chunk`'s slot (all Data blocks), verifying the
    /// checksum of every block it touches when the image has data checksums. A mismatch is an
    /// error, never data; it also marks the image corrupt at its next flush or close. For
    /// callers that hold the chunk lock or read a layer nobody writes, where no writer can
    /// explain a mismatch.
    pub fn read_data_verified(&self, chunk: u64, start: u64, buf: &mut [u8]) -> Result<()> {
        self.read_data_checked(chunk, start, buf).inspect_err(|e| {
            if e.kind() == ErrorKind::BadChecksum {
                self.note_corrupt();
            }
        })
    }

    /// [`Image::read_data_verified`] without marking the image corrupt on a mismatch
    /// ([`ErrorKind::BadChecksum`]): for readers racing writers of the same block, which look
    /// again before calling a mismatch damage.
    ///
    /// Blocks are read as the map holds them now: a block that stopped being Data since the
    /// caller planned its read (a concurrent write-zeroes or discard of it in the top, whose
    /// result reads as zero) reads as zero, and a relocated chunk is read from its new slot.
    pub fn read_data_checked(&self, chunk: u64, start: u64, buf: &mut [u8]) -> Result<()> {
        let first = (start / BLOCK_SIZE) as usize;
        let last = (start + buf.len() as u64).div_ceil(BLOCK_SIZE) as usize;
        let found = self.with_entry(chunk, |e| {
            e.filter(|e| e.data_offset != 0).map(|e| {
                let data: Vec<bool> = (first..last).map(|b| e.blocks.get(b) == BlockState::Data).collect();
                (e.data_offset, data, e.crcs.get(first..last).map(<[u32]>::to_vec).unwrap_or_default())
            })
        });
        let Some((slot, data, crcs)) = found else {
            buf.fill(0);
            return Ok(());
        };
        if !self.geom.data_checksums && data.iter().all(|&d| d) {
            return self.read_at(buf, slot + start);
        }
        let aligned = start % BLOCK_SIZE == 0 && buf.len() as u64 % BLOCK_SIZE == 0;
        let mut tmp = Vec::new();
        let region: &mut [u8] = if aligned {
            buf
        } else {
            tmp.resize((last - first) * BLOCK_SIZE as usize, 0);
            &mut tmp
        };
        let at = slot + first as u64 * BLOCK_SIZE;
        self.read_at(region, at)?;
        for (i, blk) in region.chunks_mut(BLOCK_SIZE as usize).enumerate() {
            if !data[i] {
                blk.fill(0);
                continue;
            }
            if !self.geom.data_checksums {
                continue;
            }
            let (want, got) = (crcs.get(i).copied(), crc32fast::hash(blk));
            if want != Some(got) {
                return Err(err(
                    ErrorKind::BadChecksum,
                    format!(
                        "data checksum mismatch in chunk {chunk} block {} (crc {got:08x}, map says {:08x})",
                        first + i,
                        want.unwrap_or(0)
                    ),
                )
                .with_file(&self.path)
                .at(at + i as u64 * BLOCK_SIZE));
            }
        }
        if !aligned {
            let off = (start - first as u64 * BLOCK_SIZE) as usize;
            let n = buf.len();
            buf.copy_from_slice(&tmp[off..off + n]);
        }
        Ok(())
    }

    /// Records that a data checksum failed: the next flush or close sets the CORRUPT flag.
    pub fn note_corrupt(&self) {
        self.corrupt_found.store(true, Ordering::Release);
    }

    /// A cluster for a slot that the live map does not reference yet: commit fills such slots
    /// and then makes them live all at once with [`Image::replace_map`].
    pub fn alloc_detached_slot(&self) -> Result<u64> {
        self.require_writable()?;
        write(&self.state).alloc.alloc_slot()
    }

    /// Gives back slots of [`Image::alloc_detached_slot`] no map will refer to (a commit
    /// stopped before its map was prepared): punched, then free for new slots at once, since
    /// no map sector and no journal record ever named them.
    pub fn release_detached_slots(&self, slots: &[u64]) -> Result<()> {
        self.require_writable()?;
        let cluster = self.geom.chunk_size();
        self.punch_and_free(slots.iter().map(|&s| (s, s + cluster)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Geometry;
    use crate::storage::MemStorage;
    use std::path::Path;
    use std::sync::Arc;

    fn image(checksums: bool) -> Image {
        let g = Geometry::new(1 << 20, 16).unwrap().with_data_checksums(checksums).unwrap();
        Image::create_on(Arc::new(MemStorage::new()), Path::new("m"), g, None, [1; 16]).unwrap()
    }

    fn write_blocks(img: &Image, chunk: u64, first: usize, last: usize) -> SlotPlan {
        let plan = img.plan_write(chunk, first, last).unwrap();
        let slot = plan.slot().clone();
        let data = vec![7u8; (last - first) * BLOCK_SIZE as usize];
        img.write_at(&data, plan.target() + first as u64 * BLOCK_SIZE).unwrap();
        let crc = crc32fast::hash(&data[..BLOCK_SIZE as usize]);
        img.commit_write(plan, &vec![crc; last - first]).unwrap();
        slot
    }

    #[test]
    fn blocks_a_flush_may_have_made_durable_are_never_overwritten_in_place() {
        let img = image(true);
        assert!(matches!(write_blocks(&img, 0, 0, 2), SlotPlan::NewSlot { .. }));
        // Not yet in any flush's snapshot: in place.
        assert!(matches!(write_blocks(&img, 0, 1, 2), SlotPlan::InPlace { .. }));
        img.flush().unwrap();
        // Block 1 is Data in the durable map now, also once it is zeroed in memory.
        img.clear_blocks(0, 1, 2, BlockState::Zero).unwrap();
        match write_blocks(&img, 0, 1, 2) {
            SlotPlan::Relocate { keep, .. } => assert_eq!(keep, vec![(0, 1)]),
            other => panic!("expected a relocation, planned {other:?}"),
        }
        // The new slot is referenced by no durable map: in place again until the next flush.
        assert!(matches!(write_blocks(&img, 0, 0, 1), SlotPlan::InPlace { .. }));
        // A block never written as Data in a durable map may be written in place.
        img.flush().unwrap();
        assert!(matches!(write_blocks(&img, 0, 5, 6), SlotPlan::InPlace { .. }));
    }

    #[test]
    fn without_checksums_existing_slots_are_always_written_in_place() {
        let img = image(false);
        write_blocks(&img, 3, 0, 4);
        img.flush().unwrap();
        assert!(matches!(write_blocks(&img, 3, 0, 4), SlotPlan::InPlace { .. }));
    }

    /// Given back like a released slot: reusable once the next flush is done (with a journal,
    /// records written meanwhile may hold what the write put there, spec §5.4).
    #[test]
    fn an_abandoned_relocation_gives_its_slot_back_at_the_next_flush() {
        let img = image(true);
        write_blocks(&img, 0, 0, 1);
        img.flush().unwrap();
        let (free_before, end_before) = img.space();
        let plan = img.plan_write(0, 0, 1).unwrap();
        assert!(matches!(plan.slot(), SlotPlan::Relocate { .. }));
        drop(plan);
        let c = img.geometry().chunk_size();
        let (free_dropped, end_after) = img.space();
        assert_eq!(free_dropped + c, free_before + (end_after - end_before), "the target is not free before a flush");
        img.flush().unwrap();
        let (free_after, _) = img.space();
        assert_eq!(free_after, free_dropped + c, "the target is free again after it");
    }
}
