//! The durability protocol of one image (spec §5.3): header writes, flush, whole-map
//! replacement and close, and what a failed sync means.

use super::alloc::Allocator;
use super::journal::{self, Record};
use super::map::{ChunkMap, DirtySnapshot};
use super::{lock, read, used_ranges, write, Image, JournalState, State, Written};

/// A whole new map made durable by [`Image::prepare_map`], waiting for
/// [`Image::switch_map`].
pub struct PreparedMap {
    map: ChunkMap,
    /// What only the new map uses: its extents (fresh space) and the slots no map in force
    /// names (a commit's detached slots). A switch that fails before its header write gives
    /// them back, punched: nothing else would, and a later close would leave them, with their
    /// data, in free space of a clean image (§5.5).
    own: Vec<(u64, u64)>,
}
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::header::{Header, MapExtent, PendingSnapshot};
use crate::format::map::MapEntry;
use crate::format::{BLOCK_SIZE, FLAG_CORRUPT, FLAG_DIRTY, FLAG_FROZEN};
use std::sync::atomic::Ordering;

impl Image {
    /// Writes `f(header)` with the next generation into the slot not holding the current header.
    /// The in-memory header changes only once the write succeeded, so after a failed write the
    /// next attempt goes to the same slot and the last good header is never overwritten.
    pub(super) fn write_header(&self, st: &mut State, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = st.header.clone();
        f(&mut h);
        h.generation = super::next_generation(h.generation).map_err(|e| e.with_file(&self.path))?;
        h.map_extents = st.map.extents().to_vec();
        self.storage.write_at(&h.encode(), h.slot_offset())?;
        st.header = h;
        Ok(())
    }

    /// `r`, having poisoned the image if it is an error: for steps after which the file may
    /// not be what memory says (a failed sync, a header write that may or may not be in it).
    pub(super) fn poisoning<T>(&self, r: Result<T>) -> Result<T> {
        r.inspect_err(|_| self.poisoned.store(true, Ordering::Release))
    }

    pub(super) fn sync_or_poison(&self) -> Result<()> {
        self.poisoning(self.storage.sync())
    }

    /// One durable write (a journal record): durable on return, or the image is poisoned, as
    /// after a failed sync (the kernel may have dropped what it could not write).
    pub(super) fn write_durable_or_poison(&self, bytes: &[u8], at: u64) -> Result<()> {
        self.poisoning(self.storage.write_durable(bytes, at))
    }

    /// Makes every write completed before the call durable: with one durable write of a
    /// journal record where the image journals and the flush is small (spec §5.9), else in
    /// place (spec §5.3): data first, then the header if the map grew, then the dirty map
    /// sectors. Then released space becomes reusable.
    pub fn flush(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        let _f = lock(&self.flush_lock);
        self.flush_locked(true)
    }

    /// Whether flushes of this image may go to a journal: a writable top (a frozen layer being
    /// written by a commit, and images with data checksums, keep to §5.3 alone).
    pub(super) fn journals(&self, st: &State) -> bool {
        self.is_writable() && !self.geom.data_checksums && !st.header.has_flag(FLAG_FROZEN)
    }

    /// The flush. `may_journal` false (closing, header changes, map switches) leaves the map in
    /// the file complete: a checkpoint if records were written since the last one.
    fn flush_locked(&self, may_journal: bool) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return self.require_writable();
        }
        let mut js = lock(&self.journal);
        if may_journal {
            self.make_journal(&mut js)?;
        }
        let (snap, released, journaled, written) = {
            // F1 waits for writes between plan and commit (data checksums): see data.rs.
            let _gate = write(&self.snapshot_gate);
            let mut st = write(&self.state);
            // What was written before this instant is this flush's to copy; later writes
            // are the next one's.
            let written = std::mem::take(&mut *lock(&self.written));
            // A flush that changed no map sector, with no record since the last checkpoint,
            // is one sync in place already (rewrites of written blocks): a record would only
            // copy the blocks.
            let changed = st.map.dirty_sectors() > 0 || js.records > 0;
            let journaled =
                may_journal && changed && self.journals(&st) && record_fits(&st, &js, &written, self.area_layout());
            if !journaled && js.records > 0 {
                // A checkpoint: the sectors logged since the last one go to their places too.
                st.map.mark_sectors_dirty(js.logged.iter().copied());
            }
            (st.map.take_dirty(), st.alloc.take_pending(), journaled, written)
        };
        let res = if journaled && snap.is_empty() && written.bytes == 0 {
            // Nothing written or changed since the last flush: nothing to make durable.
            Ok(())
        } else if journaled {
            self.flush_to_journal(&mut js, &snap, written)
        } else {
            self.flush_in_place(&mut js, &snap, may_journal)
        };
        match res {
            Ok(()) => {
                // Space a journaled flush released waits for the next checkpoint: until then a
                // crash replays records that may hold blocks of it, written there after its new
                // owner's (whose map sector a checkpoint cut short may have put in place).
                let released = if journaled {
                    js.deferred.extend(released);
                    Vec::new()
                } else if js.records == 0 {
                    let mut all = std::mem::take(&mut js.deferred);
                    all.extend(released);
                    all
                } else {
                    released
                };
                drop(js);
                if !released.is_empty() {
                    // Released space is punched before anyone can reuse it (with data checksums
                    // this is the first moment it may be: the old map no longer points there).
                    // Only I/O planned before the release can still reach it, and such I/O
                    // holds the reclaim lock shared from its plan to its end: taking the lock
                    // once waits for it to end. No later plan names the space (the map does
                    // not, and the allocator hands it out only below), so the punches need no
                    // lock, and readers do not wait for them.
                    drop(write(&self.reclaim));
                    self.punch_and_free(released).map_err(|e| e.during("flush"))?;
                }
                if self.corrupt_found.load(Ordering::Acquire) {
                    let mut st = write(&self.state);
                    if !st.header.has_flag(FLAG_CORRUPT) {
                        self.write_header(&mut st, |h| h.set_flag(FLAG_CORRUPT, true))
                            .map_err(|e| e.with_file(&self.path))?;
                        drop(st);
                        self.sync_or_poison().map_err(|e| e.with_file(&self.path))?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                drop(js);
                let mut st = write(&self.state);
                st.map.restore_dirty(snap);
                st.alloc.requeue(released);
                Err(e.with_file(&self.path).during("flush"))
            }
        }
    }

    /// One journal record: the dirty sectors and a copy of every block written since the last
    /// flush, written durably in one write (spec §5.9). The sectors stay logged until the next
    /// checkpoint writes them in place.
    fn flush_to_journal(&self, js: &mut JournalState, snap: &DirtySnapshot, written: Written) -> Result<()> {
        let restore = |w: Written| Written::put_back(&self.written, w);
        let blocks = match self.copy_written(&written.blocks()) {
            Ok(b) => b,
            Err(e) => {
                restore(written);
                return Err(e);
            }
        };
        // With LOG the record names the log's place, where the record after it may be.
        let rec = Record {
            seq: js.next_seq,
            replay_from: js.replay_from,
            sectors: snap.encoded.clone(),
            blocks,
            next: js.log_pos,
            before: 0,
        };
        let (area_end, uuid) = {
            let st = read(&self.state);
            (st.header.journal.map_or(0, |a| a.end()), st.header.uuid)
        };
        let bytes = rec.encode(&uuid, self.area_layout());
        if js.pos + bytes.len() as u64 > area_end {
            // record_fits planned for at least this much.
            restore(written);
            return Err(err(ErrorKind::Io, "a journal record outgrew the room planned for it"));
        }
        self.write_durable_or_poison(&bytes, js.pos)?;
        js.pos += bytes.len() as u64;
        js.next_seq += 1;
        js.records += 1;
        js.logged.extend(snap.sectors().iter().copied());
        Ok(())
    }

    /// A copy of the blocks at `offs`, each read whole: a block being written meanwhile is
    /// copied old or new, never torn (data writes hold the copy gate shared).
    pub(super) fn copy_written(&self, offs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>> {
        let _copying = write(&self.copy_gate);
        offs.iter()
            .map(|&off| {
                let mut b = vec![0u8; BLOCK_SIZE as usize];
                self.storage.read_at(&mut b, off)?;
                Ok((off, b))
            })
            .collect()
    }

    /// Spec §5.3, and the checkpoint of a journal with records since the last one (the
    /// snapshot then holds the sectors they logged): sync, header, sectors, sync; then a
    /// record at the start of the area that says nothing before it needs replaying.
    ///
    /// `keep_window` false (a flush that leaves the map in the file complete: close, header
    /// changes, map switches) also gives a log's window of ready space up.
    fn flush_in_place(&self, js: &mut JournalState, snap: &DirtySnapshot, keep_window: bool) -> Result<()> {
        // Everything written so far is durable after this sync: no record needs to copy it.
        // (Writes noted between here and the sync are copied by no record either, but are
        // also covered by the sync.)
        *lock(&self.written) = Written::default();
        self.sync_or_poison()?;
        if !snap.is_empty() {
            if snap.extents_changed {
                let st = write(&self.state);
                let listed = st.header.map_extents.clone();
                let new: Vec<MapExtent> = st.map.extents().iter().filter(|e| !listed.contains(e)).copied().collect();
                drop(st);
                self.fill_holes(&new)?;
                let mut st = write(&self.state);
                self.write_header(&mut st, |_| {})?;
            }
            for (off, bytes) in &snap.encoded {
                self.storage.write_at(bytes, *off)?;
            }
            self.sync_or_poison()?;
        }
        if js.records > 0 {
            let (area, uuid) = {
                let st = read(&self.state);
                (st.header.journal, st.header.uuid)
            };
            if let Some(area) = area {
                // With LOG the mark names the log's place, where one is kept.
                let next = if keep_window { js.log_pos } else { 0 };
                let layout = self.area_layout();
                let mark = Record::checkpoint(js.next_seq, next);
                self.write_durable_or_poison(&mark.encode(&uuid, layout), area.offset)?;
                js.pos = area.offset + mark.len(layout) as u64;
                js.next_seq += 1;
                js.replay_from = js.next_seq;
            }
            js.records = 0;
            js.logged.clear();
            self.log_checkpointed(js);
        }
        if self.geom.log && !keep_window {
            self.log_give_up_window(js)?;
        }
        Ok(())
    }

    /// How this image's records in the area are laid out.
    pub(super) fn area_layout(&self) -> journal::Layout {
        if self.geom.log {
            journal::Layout::LogArea
        } else {
            journal::Layout::Area
        }
    }

    /// Writes zeros into the holes of map extents (all of a new one): a journaling image keeps
    /// its map's space allocated, so that writing a sector in place later (a checkpoint, a
    /// replay after a crash, spec §5.9) never needs space a full file system may not have.
    /// Holes read as zeros already, so no sector changes. Stores that cannot tell holes from
    /// data have none to fill.
    fn fill_holes(&self, extents: &[MapExtent]) -> Result<()> {
        let zeros = vec![0u8; 1 << 20];
        for e in extents {
            let mut at = e.offset;
            while at < e.end() {
                let hole = self.storage.next_hole(at)?.clamp(at, e.end());
                if hole >= e.end() {
                    break;
                }
                let data = self.storage.next_data(hole)?.map_or(e.end(), |d| d.clamp(hole, e.end()));
                let data = if data == hole { e.end() } else { data };
                let mut z = hole;
                while z < data {
                    let n = (data - z).min(zeros.len() as u64);
                    self.storage.write_at(&zeros[..n as usize], z)?;
                    z += n;
                }
                at = data;
            }
        }
        Ok(())
    }

    /// Gives a journaling image its journal area at its first flush (spec §5.9): fresh space
    /// written with a checkpoint record and zeros, synced, then a header naming it, synced.
    pub(super) fn make_journal(&self, js: &mut JournalState) -> Result<()> {
        let area = {
            let mut st = write(&self.state);
            if st.header.journal.is_some() || !self.journals(&st) {
                return Ok(());
            }
            let cs = self.geom.chunk_size();
            let len = (self.geom.virtual_size / 256).clamp(256 << 10, journal::AREA).next_multiple_of(cs);
            MapExtent { offset: st.alloc.alloc_fresh(len)?, len }
        };
        let ctx = |e: Error| e.with_file(&self.path).during("make the journal");
        let mark = Record::checkpoint(1, 0);
        let m = mark.encode(&read(&self.state).header.uuid, self.area_layout());
        let written = (|| {
            let extents = read(&self.state).map.extents().to_vec();
            self.fill_holes(&extents)?;
            let mut bytes = vec![0u8; area.len as usize];
            bytes[..m.len()].copy_from_slice(&m);
            self.storage.write_at(&bytes, area.offset)?;
            self.sync_or_poison()
        })();
        if let Err(e) = written {
            // No header names the area yet: given back, punched (a later close would leave
            // its mark in free space of a clean image, §5.5).
            let _ = self.punch_and_free(vec![(area.offset, area.end())]);
            return Err(ctx(e));
        }
        {
            let mut st = write(&self.state);
            // The header may be in the file or not: the area is neither given back nor used,
            // and the image is poisoned (it stays DIRTY; a writable open reclaims the area if
            // the header that won does not name it).
            self.poisoning(self.write_header(&mut st, |h| h.journal = Some(area))).map_err(ctx)?;
        }
        self.sync_or_poison().map_err(ctx)?;
        *js = JournalState { pos: area.offset + m.len() as u64, next_seq: 2, replay_from: 2, ..Default::default() };
        Ok(())
    }

    /// Rewrites the header through `f` and makes it durable (flushes data and map first).
    pub fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        self.require_writable()?;
        let _f = lock(&self.flush_lock);
        self.flush_locked(false)?;
        let mut st = write(&self.state);
        let mut h = st.header.clone();
        f(&mut h);
        if h.has_flag(FLAG_FROZEN) {
            // A header that freezes the image drops its journal (spec §5.9), as freeze does.
            self.write_freezing_header(&mut st, h, false).map_err(|e| e.during("update header"))?;
        } else {
            self.write_header(&mut st, |next| *next = h).map_err(|e| e.with_file(&self.path))?;
        }
        drop(st);
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("update header"))
    }

    /// Cuts off what [`Image::extend_ahead`] lengthened the file by and no slot took: space
    /// past the end of everything handed out, which holds nothing. The header write that
    /// follows is synced with it.
    fn trim_tail(&self, st: &State) -> Result<()> {
        let end = st.alloc.end();
        if st.extended_to > end && self.storage.len()? > end {
            self.storage.set_len(end)?;
        }
        Ok(())
    }

    /// Writes `h`, a header that freezes the image, after what must be durable before it:
    /// the punch of its journal area, which `h` no longer names (a checkpoint just ran, so the
    /// area holds nothing to replay; a crash before the header leaves a live image whose empty
    /// area reads as an empty chain), and with `trim` the cut tail. A frozen layer is never
    /// opened for writing, so nothing would reclaim what a crash left unpunched. The header
    /// write is not synced here.
    ///
    /// Any failure poisons the image: the area may be punched while the header in force still
    /// names it, and a record the image went on writing after the punched checkpoint would
    /// follow a hole, which recovery reads as the end of the chain (a flush that reported
    /// success would be lost to a crash). Only a reopen, which reads both afresh, may write.
    fn write_freezing_header(&self, st: &mut State, mut h: Header, trim: bool) -> Result<()> {
        let res = (|| {
            if let Some(a) = h.journal.take() {
                journal::drop_area(self.storage.as_ref(), &a)?;
            }
            if trim {
                self.trim_tail(st)?;
            }
            self.storage.sync()?;
            self.write_header(st, |next| *next = h)
        })();
        self.poisoning(res).map_err(|e| e.with_file(&self.path))
    }

    /// Freezes this writable image in place for a live snapshot (spec §5.7.1 S3): flushes,
    /// then writes one durable header with FROZEN and the pending-snapshot record set and
    /// DIRTY clear (everything is flushed and nothing will be written any more), and refuses
    /// every later write and header change but [`Image::clear_pending`]. On error nothing of
    /// it may be durable, or all of it: the caller reads the header back to know.
    pub fn freeze(&self, pending: PendingSnapshot) -> Result<()> {
        self.require_writable()?;
        let _f = lock(&self.flush_lock);
        self.flush_locked(false)?;
        let mut st = write(&self.state);
        // A frozen layer has no journal: its map in the file is complete (the flush above made
        // it so), and readers of layers (a push among them) need no more.
        let mut h = st.header.clone();
        h.set_flag(FLAG_FROZEN, true);
        h.set_flag(FLAG_DIRTY, false);
        h.pending = Some(pending);
        self.write_freezing_header(&mut st, h, true).map_err(|e| e.during("freeze"))?;
        drop(st);
        self.closing.store(true, Ordering::Release);
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("freeze"))?;
        // Closed cleanly by this header: nothing more to write at close or drop.
        self.clean.store(true, Ordering::Release);
        Ok(())
    }

    /// Clears the pending-snapshot record of an image frozen by [`Image::freeze`], once the
    /// snapshot is carried out (S7), in one durable header write.
    pub fn clear_pending(&self) -> Result<()> {
        let _f = lock(&self.flush_lock);
        let mut st = write(&self.state);
        if st.header.pending.is_none() {
            return Ok(());
        }
        self.write_header(&mut st, |h| h.pending = None).map_err(|e| e.with_file(&self.path))?;
        drop(st);
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("clear pending snapshot"))
    }

    /// Replaces the whole map with `entries` in one durable step (spec §5.7): the new map is
    /// written to fresh extents and synced together with the data it points at, then a single
    /// header write switches to it. A crash before that write leaves the old map in force (the
    /// new extents and slots are leaked space); after it, the new one. Space only the old map
    /// used is then punched and reused.
    pub fn replace_map(&self, entries: Vec<MapEntry>) -> Result<()> {
        let prepared = self.prepare_map(entries)?;
        self.switch_map(prepared)
    }

    /// The first half of [`Image::replace_map`]: the new map, in fresh extents, durable with
    /// the data it points at, and not yet in force. Readers go on with the old map meanwhile.
    pub fn prepare_map(&self, entries: Vec<MapEntry>) -> Result<PreparedMap> {
        self.require_writable()?;
        let ctx = |e: Error| e.with_file(&self.path).during("replace map");
        let _f = lock(&self.flush_lock);
        self.flush_locked(false)?;
        let (mut map, own) = {
            let mut guard = write(&self.state);
            let st = &mut *guard;
            let alloc = &mut st.alloc;
            let map = ChunkMap::rebuilt(self.geom, entries, |len| alloc.alloc_fresh(len)).map_err(ctx)?;
            let in_force: std::collections::HashSet<u64> = st.map.used_ranges().iter().map(|u| u.0).collect();
            let own: Vec<(u64, u64)> =
                map.used_ranges().iter().filter(|u| !in_force.contains(&u.0)).map(|u| (u.0, u.0 + u.1)).collect();
            (map, own)
        };
        let snap = map.take_dirty();
        let written = (|| {
            self.fill_holes(map.extents())?;
            self.sync_or_poison()?;
            for (off, bytes) in &snap.encoded {
                self.storage.write_at(bytes, *off)?;
            }
            self.sync_or_poison()
        })();
        if let Err(e) = written {
            // The new extents hold zeros and sectors no header names: given back, punched.
            // The slots are the caller's to give back (it took them).
            let extents = map.extents().iter().map(|x| (x.offset, x.end())).collect();
            let _ = self.punch_and_free(extents);
            return Err(ctx(e));
        }
        Ok(PreparedMap { map, own })
    }

    /// The second half of [`Image::replace_map`]: one durable header write puts the prepared
    /// map in force; then the space only the old map used is punched and becomes free. Waits
    /// for data I/O on the old slots to finish first (the reclaim lock).
    pub fn switch_map(&self, prepared: PreparedMap) -> Result<()> {
        let ctx = |e: Error| e.with_file(&self.path).during("replace map");
        let _f = lock(&self.flush_lock);
        // No journal record may name a sector of the old map once it is gone (its space is
        // reused): what was logged goes in place first.
        if let Err(e) = self.require_writable().and_then(|()| self.flush_locked(false)) {
            // Nothing switched: what only the new map uses goes back, punched.
            let _ = self.punch_and_free(prepared.own);
            return Err(ctx(e));
        }
        // The switch itself, under the locks readers and writers need, is memory and one header
        // write; its sync and the punches of what only the old map used run without them.
        // Taking the reclaim lock waits for I/O planned against the old map; plans made after
        // it use the new one. The space only the old map used is kept out of the allocator
        // until it is punched (fresh space at the end serves new slots meanwhile).
        let freed = {
            let _drain = write(&self.reclaim);
            let mut guard = write(&self.state);
            let st = &mut *guard;
            let old_map = std::mem::replace(&mut st.map, prepared.map);
            // From the header write on, a failure poisons the image: the header may be in the
            // file or not, so neither map's own space may be given back (and after it, the
            // allocator would not match the map in force). The image then stays DIRTY, and
            // the next writable open reclaims what the map that won does not use.
            if let Err(e) = self.poisoning(self.write_header(st, |_| {})) {
                st.map = old_map;
                return Err(ctx(e));
            }
            let file_len = self.poisoning(self.storage.len()).map_err(ctx)?;
            st.alloc = self
                .poisoning(Allocator::rebuild(
                    self.geom.chunk_size(),
                    self.geom.data_start(),
                    file_len,
                    used_ranges(&st.map, &st.header),
                ))
                .map_err(ctx)?;
            st.alloc.take_free()
        };
        self.sync_or_poison().map_err(ctx)?;
        self.punch_and_free(freed).map_err(ctx)
    }

    /// Punches released space no durable map references any more, then makes it free, in
    /// that order: a clean image holds no data in free space (spec §5.5), and only a DIRTY
    /// one's is reclaimed at open. A punch that fails leaves its range, and the ones after it,
    /// holding what they held: they go back to the release queue, for the next flush to punch
    /// (dropped from both they would be space no map points at, with old data in it, in an
    /// image a later close marks clean).
    pub(super) fn punch_and_free(&self, ranges: Vec<(u64, u64)>) -> Result<()> {
        for (i, &(s, e)) in ranges.iter().enumerate() {
            if let Err(err) = self.storage.punch(s, e - s) {
                let mut st = write(&self.state);
                st.alloc.add_free(&ranges[..i]);
                st.alloc.requeue(ranges[i..].iter().copied());
                return Err(err.with_file(&self.path));
            }
        }
        write(&self.state).alloc.add_free(&ranges);
        Ok(())
    }

    /// Flushes, clears the dirty flag and makes that durable. Writes are refused from the start
    /// of the first call on. Succeeds only once all of it has succeeded: after a failure, a
    /// retry does the work again (and fails for good after a failed sync, see `poisoned`).
    /// Also run on drop.
    pub fn close(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        self.closing.store(true, Ordering::Release);
        let _f = lock(&self.flush_lock);
        if self.clean.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_locked(false)?;
        let mut st = write(&self.state);
        self.trim_tail(&st).map_err(|e| e.with_file(&self.path).during("close"))?;
        // The flush punched what it released after its last sync, and the tail was just cut:
        // made durable before the header that says the image is clean. In one sync with it, a
        // crash could keep the clean header and lose a punch, leaving old data in free space
        // of a clean image, which no open reclaims (only a DIRTY image's is, §5.5).
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("close"))?;
        self.write_header(&mut st, |h| h.set_flag(FLAG_DIRTY, false)).map_err(|e| e.with_file(&self.path))?;
        drop(st);
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("close"))?;
        self.clean.store(true, Ordering::Release);
        Ok(())
    }
}

/// Whether a flush fits one journal record: no new map extent (that needs a header), the data
/// written since the last flush small enough to copy, and room left in the area.
fn record_fits(st: &State, js: &JournalState, w: &Written, layout: journal::Layout) -> bool {
    let Some(area) = st.header.journal else { return false };
    if st.map.extents_changed() || w.bytes > journal::MAX_RECORD_DATA {
        return false;
    }
    // Each range may straddle a block boundary at both ends.
    let blocks = (w.bytes / BLOCK_SIZE) as usize + 2 * w.ranges.len();
    let len = Record::len_for(st.map.dirty_sectors(), blocks, layout) as u64;
    js.pos >= area.offset && js.pos + len <= area.end() && js.log_records < journal::MAX_LOG_RECORDS
}
