//! Copying into the top what it reads from below, only where it still reads from below: what
//! a flatten running under live writers does. Each chunk is done under its lock, and only its
//! blocks that are still Absent in the top are filled, so a block a client wrote meanwhile is
//! never overwritten with older data from below.

use super::plan::Origin;
use super::{Chain, ChunkPiece};
use crate::error::Result;
use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;

impl Chain {
    /// Copies into the top every block of [offset, offset + len) that the top leaves Absent
    /// and that a layer below (or the raw base) makes visible. Returns the bytes copied. Once
    /// every range has been populated, the top reads the same without its parents: a write
    /// never makes a block Absent where something below is visible (spec §6).
    pub fn populate(&self, offset: u64, len: u64) -> Result<u64> {
        self.require_writable()?;
        self.check_range(offset, len, "populate")?;
        let mut copied = 0;
        let mut spans = Vec::new();
        let mut buf = Vec::new();
        for p in self.pieces(offset, len) {
            let base = self.chunk_base(p.chunk);
            let first = (p.start / BLOCK_SIZE) as usize;
            let last = p.end.div_ceil(BLOCK_SIZE) as usize;
            let _g = self.top.lock_chunk(p.chunk);
            let absent: Vec<(usize, usize)> = self.top.with_entry(p.chunk, |e| match e {
                None => vec![(first, last)],
                Some(e) => {
                    e.blocks.runs(first, last).filter(|r| r.2 == BlockState::Absent).map(|r| (r.0, r.1)).collect()
                }
            });
            for (s, t) in absent {
                let (start, end) = (base + s as u64 * BLOCK_SIZE, (base + t as u64 * BLOCK_SIZE).min(self.size));
                spans.clear();
                self.plan_lower(start, end, &mut spans);
                // The visible stretches, widened to whole blocks of this run (a block partly
                // visible is copied whole: what it reads as below, zeros included).
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for sp in spans.iter().filter(|sp| matches!(sp.from, Origin::Lower { .. } | Origin::Base)) {
                    let a = start + (sp.start - start) / BLOCK_SIZE * BLOCK_SIZE;
                    let b = (start + (sp.end - start).div_ceil(BLOCK_SIZE) * BLOCK_SIZE).min(end);
                    match runs.last_mut() {
                        Some(r) if r.1 >= a => r.1 = r.1.max(b),
                        _ => runs.push((a, b)),
                    }
                }
                for (a, b) in runs {
                    buf.resize((b - a) as usize, 0);
                    self.read_lower(&mut buf, a)?;
                    self.write_piece_locked(ChunkPiece { chunk: p.chunk, start: a - base, end: b - base }, &buf)?;
                    copied += b - a;
                }
            }
        }
        Ok(copied)
    }
}
