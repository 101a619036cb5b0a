//! The durability protocol of one image (spec §5.3): header writes, flush, whole-map
//! replacement and close, and what a failed sync means.

use super::alloc::Allocator;
use super::map::ChunkMap;
use super::{lock, write, Image, State};

/// A whole new map made durable by [`Image::prepare_map`], waiting for
/// [`Image::switch_map`].
pub struct PreparedMap {
    map: ChunkMap,
}
use crate::error::{Error, Result};
use crate::format::header::{Header, PendingSnapshot};
use crate::format::map::MapEntry;
use crate::format::{FLAG_CORRUPT, FLAG_DIRTY, FLAG_FROZEN};
use std::sync::atomic::Ordering;

impl Image {
    /// Writes `f(header)` with the next generation into the slot not holding the current header.
    /// The in-memory header changes only once the write succeeded, so after a failed write the
    /// next attempt goes to the same slot and the last good header is never overwritten.
    pub(super) fn write_header(&self, st: &mut State, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = st.header.clone();
        f(&mut h);
        h.generation += 1;
        h.map_extents = st.map.extents().to_vec();
        self.storage.write_at(&h.encode(), h.slot_offset())?;
        st.header = h;
        Ok(())
    }

    fn sync_or_poison(&self) -> Result<()> {
        self.storage.sync().inspect_err(|_| self.poisoned.store(true, Ordering::Release))
    }

    /// Makes every write completed before the call durable (spec §5.3): data first, then the
    /// header if the map grew, then the dirty map sectors, then released space becomes reusable.
    pub fn flush(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        let _f = lock(&self.flush_lock);
        self.flush_locked()
    }

    fn flush_locked(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return self.require_writable();
        }
        let (snap, released) = {
            // F1 waits for writes between plan and commit (data checksums): see data.rs.
            let _gate = write(&self.snapshot_gate);
            let mut st = write(&self.state);
            (st.map.take_dirty(), st.alloc.take_pending())
        };
        let res = (|| -> Result<()> {
            self.sync_or_poison()?;
            if !snap.is_empty() {
                if snap.extents_changed {
                    let mut st = write(&self.state);
                    self.write_header(&mut st, |_| {})?;
                }
                for (off, bytes) in &snap.encoded {
                    self.storage.write_at(bytes, *off)?;
                }
                self.sync_or_poison()?;
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                if !released.is_empty() {
                    // Released space is punched before anyone can reuse it (with data checksums
                    // this is the first moment it may be: the old map no longer points there).
                    // Only I/O planned before the release can still reach it, and such I/O
                    // holds the reclaim lock shared from its plan to its end: taking the lock
                    // once waits for it to end. No later plan names the space (the map does
                    // not, and the allocator hands it out only below), so the punches need no
                    // lock, and readers do not wait for them.
                    drop(write(&self.reclaim));
                    for &off in &released {
                        self.storage.punch(off, self.geom.chunk_size()).map_err(|e| e.with_file(&self.path))?;
                    }
                    write(&self.state).alloc.free_now(&released);
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
                let mut st = write(&self.state);
                st.map.restore_dirty(snap);
                st.alloc.requeue(released);
                Err(e.with_file(&self.path).during("flush"))
            }
        }
    }

    /// Rewrites the header through `f` and makes it durable (flushes data and map first).
    pub fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        self.require_writable()?;
        let _f = lock(&self.flush_lock);
        self.flush_locked()?;
        let mut st = write(&self.state);
        self.write_header(&mut st, f).map_err(|e| e.with_file(&self.path))?;
        drop(st);
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("update header"))
    }

    /// Freezes this writable image in place for a live snapshot (spec §5.7.1 S3): flushes,
    /// then writes one durable header with FROZEN and the pending-snapshot record set and
    /// DIRTY clear (everything is flushed and nothing will be written any more), and refuses
    /// every later write and header change but [`Image::clear_pending`]. On error nothing of
    /// it may be durable, or all of it: the caller reads the header back to know.
    pub fn freeze(&self, pending: PendingSnapshot) -> Result<()> {
        self.require_writable()?;
        let _f = lock(&self.flush_lock);
        self.flush_locked()?;
        let mut st = write(&self.state);
        self.write_header(&mut st, |h| {
            h.set_flag(FLAG_FROZEN, true);
            h.set_flag(FLAG_DIRTY, false);
            h.pending = Some(pending);
        })
        .map_err(|e| e.with_file(&self.path))?;
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
        self.flush_locked()?;
        let mut map = {
            let mut guard = write(&self.state);
            let alloc = &mut guard.alloc;
            ChunkMap::rebuilt(self.geom, entries, |len| alloc.alloc_fresh(len)).map_err(ctx)?
        };
        let snap = map.take_dirty();
        self.sync_or_poison().map_err(ctx)?;
        for (off, bytes) in &snap.encoded {
            self.storage.write_at(bytes, *off).map_err(ctx)?;
        }
        self.sync_or_poison().map_err(ctx)?;
        Ok(PreparedMap { map })
    }

    /// The second half of [`Image::replace_map`]: one durable header write puts the prepared
    /// map in force; then the space only the old map used is punched and becomes free. Waits
    /// for data I/O on the old slots to finish first (the reclaim lock).
    pub fn switch_map(&self, prepared: PreparedMap) -> Result<()> {
        self.require_writable()?;
        let ctx = |e: Error| e.with_file(&self.path).during("replace map");
        let _f = lock(&self.flush_lock);
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
            if let Err(e) = self.write_header(st, |_| {}) {
                st.map = old_map;
                return Err(ctx(e));
            }
            let file_len = self.storage.len().map_err(ctx)?;
            st.alloc =
                Allocator::rebuild(self.geom.chunk_size(), self.geom.data_start(), file_len, st.map.used_ranges())
                    .map_err(ctx)?;
            st.alloc.take_free()
        };
        self.sync_or_poison().map_err(ctx)?;
        for &(s, e) in &freed {
            self.storage.punch(s, e - s).map_err(ctx)?;
        }
        write(&self.state).alloc.add_free(&freed);
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
        self.flush_locked()?;
        let mut st = write(&self.state);
        self.write_header(&mut st, |h| h.set_flag(FLAG_DIRTY, false)).map_err(|e| e.with_file(&self.path))?;
        drop(st);
        self.sync_or_poison().map_err(|e| e.with_file(&self.path).during("close"))?;
        self.clean.store(true, Ordering::Release);
        Ok(())
    }
}
