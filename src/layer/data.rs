//! The per-chunk metadata operations the merged device plans its I/O with: slots, block
//! states and their checksums, relocation before an overwrite, and verified reads.

use super::{read, write, Image};
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;
use std::sync::atomic::Ordering;

impl Image {
    /// The data slot of `chunk`, allocating one (and the entry) if it has none. Caller holds the chunk lock.
    pub fn ensure_slot(&self, chunk: u64) -> Result<u64> {
        self.slot_for_write(chunk).map(|(slot, _)| slot)
    }

    /// As [`Image::ensure_slot`], and whether the slot was allocated by this call (so nothing
    /// of it has been written yet).
    pub fn slot_for_write(&self, chunk: u64) -> Result<(u64, bool)> {
        self.require_writable()?;
        let mut guard = write(&self.state);
        let st = &mut *guard;
        if let Some(e) = st.map.get(chunk) {
            if e.data_offset != 0 {
                return Ok((e.data_offset, false));
            }
        }
        let alloc = &mut st.alloc;
        // The entry first: if the map cannot grow, no cluster has been taken yet.
        let epoch = st.map.epoch();
        let e = st.map.entry_mut(chunk, |len| alloc.alloc_fresh(len))?;
        let slot = alloc.alloc_slot()?;
        e.data_offset = slot;
        e.slot_epoch = epoch;
        Ok((slot, true))
    }

    /// Sets blocks `start..end` of `chunk` to `state`; for Data, `crcs` holds their checksums
    /// (empty without data checksums). Caller holds the chunk lock.
    ///
    /// Space of Data blocks that stop being Data is punched at once (they read as zero or fall
    /// through either way), and a slot left with no Data block is released, to be reused after
    /// the next flush. With data checksums nothing is punched before the map change is durable:
    /// a crash must not leave a durable checksum over a punched block.
    pub fn set_blocks(&self, chunk: u64, start: usize, end: usize, state: BlockState, crcs: &[u32]) -> Result<()> {
        self.require_writable()?;
        // Held until the punches are done: a flush cannot make a released slot reusable (and
        // another chunk cannot write into it) before this punch has landed.
        let _io = self.io_guard();
        let mut punches: Vec<(u64, u64)> = Vec::new();
        let checksums = self.geom.data_checksums;
        {
            let mut guard = write(&self.state);
            let st = &mut *guard;
            match st.map.get(chunk) {
                None if state == BlockState::Absent => return Ok(()),
                // Nothing changes (but Data with checksums: the checksums may).
                Some(e)
                    if (state != BlockState::Data || !checksums) && (start..end).all(|b| e.blocks.get(b) == state) =>
                {
                    return Ok(())
                }
                _ => {}
            }
            let alloc = &mut st.alloc;
            let e = st.map.entry_mut(chunk, |len| alloc.alloc_fresh(len))?;
            if state == BlockState::Data && e.data_offset == 0 {
                return Err(err(ErrorKind::InvalidArgument, "data blocks need a slot first"));
            }
            if state != BlockState::Data && e.data_offset != 0 && !checksums {
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
                if !checksums {
                    punches = vec![(e.data_offset, self.geom.chunk_size())];
                }
                alloc.release_later(e.data_offset);
                e.data_offset = 0;
            }
        }
        for (off, len) in punches {
            self.storage.punch(off, len).map_err(|e| e.with_file(&self.path))?;
        }
        Ok(())
    }

    /// The current flush epoch (see [`Entry::slot_epoch`]).
    pub fn epoch(&self) -> u64 {
        read(&self.state).map.epoch()
    }

    /// Moves `chunk` to a new slot of the current epoch, copying its Data blocks, and releases
    /// the old slot for reuse after the next flush. Used before overwriting a block in place
    /// when data checksums are on: the durable map keeps pointing at the old, intact copy until
    /// the new one is durable (spec §5.8). Caller holds the chunk lock. Returns the new slot.
    pub fn relocate(&self, chunk: u64) -> Result<u64> {
        self.require_writable()?;
        let Some((old, runs)) = self.with_entry(chunk, |e| {
            e.map(|e| {
                (
                    e.data_offset,
                    e.blocks.runs(0, e.blocks.len()).filter(|r| r.2 == BlockState::Data).collect::<Vec<_>>(),
                )
            })
        }) else {
            return self.ensure_slot(chunk);
        };
        let new = write(&self.state).alloc.alloc_slot()?;
        let mut buf = Vec::new();
        for (s, t, _) in runs {
            let (at, len) = (s as u64 * BLOCK_SIZE, (t - s) * BLOCK_SIZE as usize);
            buf.resize(len, 0);
            self.read_at(&mut buf, old + at)?;
            self.write_at(&buf, new + at)?;
        }
        let mut guard = write(&self.state);
        let st = &mut *guard;
        let epoch = st.map.epoch();
        let alloc = &mut st.alloc;
        let e = st.map.entry_mut(chunk, |len| alloc.alloc_fresh(len))?;
        if old != 0 {
            alloc.release_later(old);
        }
        e.data_offset = new;
        e.slot_epoch = epoch;
        Ok(new)
    }

    /// Reads bytes `start..start + buf.len()` of `chunk`'s slot (all Data blocks), verifying the
    /// checksum of every block it touches when the image has data checksums. A mismatch is an
    /// error, never data; it also marks the image corrupt at its next flush or close.
    pub fn read_data_verified(&self, chunk: u64, start: u64, buf: &mut [u8]) -> Result<()> {
        let first = (start / BLOCK_SIZE) as usize;
        let last = (start + buf.len() as u64).div_ceil(BLOCK_SIZE) as usize;
        let found = self.with_entry(chunk, |e| {
            e.filter(|e| e.data_offset != 0)
                .map(|e| (e.data_offset, e.crcs.get(first..last).map(<[u32]>::to_vec).unwrap_or_default()))
        });
        let Some((slot, crcs)) = found else {
            return Err(err(ErrorKind::Corrupt, format!("chunk {chunk} has no data slot")).with_file(&self.path));
        };
        if !self.geom.data_checksums {
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
        for (i, blk) in region.chunks(BLOCK_SIZE as usize).enumerate() {
            if crcs.get(i).copied() != Some(crc32fast::hash(blk)) {
                self.corrupt_found.store(true, Ordering::Release);
                return Err(err(
                    ErrorKind::Corrupt,
                    format!("data checksum mismatch in chunk {chunk} block {}", first + i),
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

    /// A cluster for a slot that the live map does not reference yet: commit fills such slots
    /// and then makes them live all at once with [`Image::replace_map`].
    pub fn alloc_detached_slot(&self) -> Result<u64> {
        self.require_writable()?;
        write(&self.state).alloc.alloc_slot()
    }
}
