//! The log-structured data home of an image with LOG (spec §5.10): windows of ready space in
//! the data area, and the durable write of a block into a chunk with no slot as one record
//! that is that chunk's new slot, its head in the slot's other block.
//!
//! Invariants: `JournalState::log_pos` is 0 or a cluster of the current window, and every
//! record written since it was set names it as the log's next place; a window is written with
//! zeros and synced before any record names it, so nothing stale there can pass for a record;
//! a chunk whose slot holds a record since the last checkpoint is pinned (its bytes are under
//! that record's CRC) until the checkpoint.

use super::journal::{Layout, Record, MAX_LOG_RECORDS};
use super::{lock, read, write, Image, JournalState};
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;
use std::sync::atomic::{AtomicBool, Ordering};

impl Image {
    /// Bytes of a window of ready space: 1/16 of the disk, 64 KiB to 16 MiB (each window costs
    /// a sync, so not much smaller than that). It is written with zeros once, so that a record
    /// landing there makes the file system allocate nothing (a durable write into a hole waits
    /// for the file system's journal, PROFILING.md).
    fn window_len(&self) -> u64 {
        (self.geom.virtual_size / 16).clamp(64 << 10, 16 << 20).next_multiple_of(self.geom.chunk_size())
    }

    /// A new window: never-written space at the allocation end, written with zeros and synced.
    /// `None` when it cannot be made (the file system full, a write refused): the space goes
    /// back, and the caller writes without the log. A failed sync is an error (and poisons).
    fn new_window(&self) -> Result<Option<(u64, u64)>> {
        let len = self.window_len();
        let at = write(&self.state).alloc.alloc_fresh(len)?;
        match make_ready(self.storage.as_ref(), at, at + len, &self.poisoned) {
            Ok(()) => Ok(Some((at, at + len))),
            Err(e) if self.poisoned.load(Ordering::Acquire) => {
                Err(e.with_file(&self.path).during("make log space ready"))
            }
            Err(_) => {
                // What was written of it (zeros) is punched, so that no clean image keeps it,
                // and free either way: the space holds nothing a record or a slot needs.
                let _ = self.storage.punch(at, len);
                write(&self.state).alloc.add_free(&[(at, at + len)]);
                Ok(None)
            }
        }
    }

    /// Makes sure the log has a place every record since names, and that the place after it
    /// is ready: when it has none, a new window, named by an empty record in the area (one
    /// durable write). False when that cannot be done now (no room in the area: the flush
    /// after the write checkpoints; no space for a window): nothing changed, and the write
    /// goes without the log.
    fn log_ready(&self, js: &mut JournalState) -> Result<bool> {
        if js.log_pos == 0 {
            let (area, uuid) = {
                let st = read(&self.state);
                (st.header.journal, st.header.uuid)
            };
            let Some(area) = area else { return Err(err(ErrorKind::Io, "a log with no journal area")) };
            let layout = self.area_layout();
            // Nothing but the window's start: no sector, no block, replay unchanged.
            let mut rec = Record {
                seq: js.next_seq,
                replay_from: js.replay_from,
                sectors: Vec::new(),
                blocks: Vec::new(),
                next: 0,
                before: 0,
            };
            if js.pos + rec.len(layout) as u64 > area.end() {
                return Ok(false);
            }
            let Some((start, end)) = self.new_window()? else { return Ok(false) };
            rec.next = start;
            self.write_durable_or_poison(&rec.encode(&uuid, layout), js.pos).map_err(|e| e.with_file(&self.path))?;
            js.pos += rec.len(layout) as u64;
            js.next_seq += 1;
            js.records += 1;
            js.log_pos = start;
            js.window_end = end;
        }
        // The place the record at `log_pos` will name: the next cluster of the window, or the
        // first of the next window, made ready now, before the record changes anything.
        if js.log_pos + self.geom.chunk_size() >= js.window_end && js.next_window.is_none() {
            match self.new_window()? {
                Some(w) => js.next_window = Some(w),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The place the record at `log_pos` names for the next (see [`Image::log_ready`]).
    fn log_next(&self, js: &JournalState) -> u64 {
        let end = js.log_pos + self.geom.chunk_size();
        match js.next_window {
            Some((start, _)) if end >= js.window_end => start,
            _ => end,
        }
    }

    /// After the record at `log_pos` is durable: the log's place moves to what it named.
    fn log_advance(&self, js: &mut JournalState, next: u64) {
        if let Some((_, end)) = js.next_window.filter(|w| w.0 == next) {
            js.window_end = end;
            js.next_window = None;
        }
        js.log_pos = next;
    }

    /// After a checkpoint's mark is durable no record is needed any more: homed chunks may be
    /// written in place again.
    pub(super) fn log_checkpointed(&self, js: &mut JournalState) {
        js.log_records = 0;
        if js.homed.is_empty() {
            return;
        }
        let mut st = write(&self.state);
        for c in std::mem::take(&mut js.homed) {
            if let Some(e) = st.map.get_mut_quiet(c) {
                e.pinned = 0;
            }
        }
    }

    /// Gives the window of ready space up (at close, before header changes and map switches):
    /// punched and free. No record waits for a checkpoint (one just ran), and the records
    /// that named the place will be followed there only by a reader looking for a record with
    /// a number that was never written.
    pub(super) fn log_give_up_window(&self, js: &mut JournalState) -> Result<()> {
        let mut give_up: Vec<(u64, u64)> = js.next_window.take().into_iter().collect();
        if js.log_pos != 0 {
            give_up.push((js.log_pos, js.window_end));
        }
        js.log_pos = 0;
        js.window_end = 0;
        // The space holds zeros or nothing, never a record. What a failed punch leaves goes
        // to the release queue, for the next flush to punch (a retried close finds nothing
        // left to give up, and written zeros count as data in a clean image's free space).
        self.punch_and_free(give_up)
    }

    /// Writes the 4 KiB `data` into block `block` of `chunk`, a chunk with no slot, durably,
    /// with one record at the log's place that becomes the chunk's slot: the block where the
    /// slot has it, the record's head in the slot's other block (spec §5.10). It also makes
    /// every earlier write durable, as a flush: the FUA write of a log-structured image.
    /// Returns false, having changed nothing a reader sees, when this write cannot go that way
    /// (not such an image, the chunk has a slot, writes since the last flush to copy, the map
    /// must grow, a checkpoint due): the caller then writes and flushes as usual. Caller holds
    /// the chunk lock.
    pub fn write_logged(&self, chunk: u64, block: usize, data: &[u8]) -> Result<bool> {
        let cs = self.geom.chunk_size();
        if !self.geom.log || data.len() != BLOCK_SIZE as usize || block >= self.geom.blocks_in_chunk(chunk) {
            return Ok(false);
        }
        self.require_writable()?;
        let _f = lock(&self.flush_lock);
        self.require_writable()?;
        let mut js = lock(&self.journal);
        if !self.journals(&read(&self.state)) {
            return Ok(false);
        }
        self.make_journal(&mut js)?;
        // A checkpoint is due after MAX_LOG_RECORDS records in the log: the flush after a plain
        // write makes it (a reader refuses a longer log).
        if js.log_records >= MAX_LOG_RECORDS || !self.log_ready(&mut js)? {
            return Ok(false);
        }
        let at = js.log_pos;
        // The record: its head first and the block after it when the block is the slot's
        // second, else the block first (spec §5.10). One cluster either way.
        let before = u32::from(block == 0);
        // F1 (spec §5.3), with the chunk's new entry in it as Data in the slot at `at`.
        // Readers must not see it so before the bytes are there: in memory it stays as it was
        // (naming the slot, which a chunk with no Data block ignores) until the record is
        // durable.
        let (snap, released) = {
            let _gate = write(&self.snapshot_gate);
            let mut guard = write(&self.state);
            let st = &mut *guard;
            let has_slot = st.map.get(chunk).is_some_and(|e| e.data_offset != 0);
            if st.map.extents_changed() || has_slot || lock(&self.written).bytes > 0 {
                return Ok(false);
            }
            let alloc = &mut st.alloc;
            let was = st.map.entry_mut(chunk, |len| alloc.alloc_fresh(len))?.blocks.clone();
            // A new entry that needed a new map extent stays (no slot, no Data: it reads as
            // before); the flush after the plain write makes it durable with the header.
            let sectors = st.map.dirty_sectors();
            if st.map.extents_changed() || Record::len_for(sectors, 1, Layout::LogHome) as u64 != cs {
                return Ok(false);
            }
            if let Some(e) = st.map.get_mut_quiet(chunk) {
                e.data_offset = at;
                e.blocks.set_range(block, block + 1, BlockState::Data);
            }
            let snap = st.map.take_dirty();
            if let Some(e) = st.map.get_mut_quiet(chunk) {
                e.blocks = was;
            }
            (snap, st.alloc.take_pending())
        };
        let home = at + block as u64 * BLOCK_SIZE;
        let next = self.log_next(&js);
        let rec = Record {
            seq: js.next_seq,
            replay_from: js.replay_from,
            sectors: snap.encoded.clone(),
            blocks: vec![(home, data.to_vec())],
            next,
            before,
        };
        let uuid = read(&self.state).header.uuid;
        let bytes = rec.encode(&uuid, Layout::LogHome);
        debug_assert_eq!(at + rec.image_at(0, Layout::LogHome), home);
        if let Err(e) = self.write_durable_or_poison(&bytes, at) {
            let mut st = write(&self.state);
            if let Some(e) = st.map.get_mut_quiet(chunk).filter(|e| e.data_offset == at) {
                e.data_offset = 0;
            }
            st.map.restore_dirty(snap);
            st.alloc.requeue(released);
            return Err(e.with_file(&self.path).during("flush"));
        }
        self.log_advance(&mut js, next);
        js.next_seq += 1;
        js.records += 1;
        js.log_records += 1;
        js.logged.extend(snap.sectors().iter().copied());
        js.homed.push(chunk);
        // Released space waits for the checkpoint, as after any journaled flush.
        js.deferred.extend(released);
        let mut st = write(&self.state);
        if let Some(e) = st.map.get_mut_quiet(chunk) {
            e.blocks.set_range(block, block + 1, BlockState::Data);
            // The whole slot: the other block holds the record's head.
            e.pinned = u64::MAX;
        }
        Ok(true)
    }
}

/// Writes zeros over `start..end` of `storage` and syncs: log space a record can land in with
/// one durable write (the file system has allocated it), holding nothing that could pass for
/// a record. A failed sync sets `poisoned`: the kernel may have dropped pages of records.
fn make_ready(storage: &dyn crate::storage::Storage, start: u64, end: u64, poisoned: &AtomicBool) -> Result<()> {
    let zeros = vec![0u8; (1 << 20).min(end - start) as usize];
    let mut z = start;
    while z < end {
        let n = (end - z).min(zeros.len() as u64);
        storage.write_at(&zeros[..n as usize], z)?;
        z += n;
    }
    storage.sync().inspect_err(|_| poisoned.store(true, Ordering::Release))
}
