//! The merged device: a writable (or read-only) top image over frozen cowdisk layers over an
//! optional raw base, with reads that fall through and copy-up on the first write of a block.
//!
//! Every operation works chunk by chunk of the top image: plan under the top's metadata lock
//! (which blocks are here, zero, or below), then do the data I/O with no metadata lock held.

mod copy;
pub mod create;
pub mod extents;
mod layers;
pub(crate) mod open;
pub mod pending;
mod plan;
mod populate;

pub use copy::DeviceRange;
pub use open::{resolve_parent_path, ChainOptions};

use crate::device::{
    push_extent, Disk, DiskExtents, DiskFlush, DiskLayers, DiskRead, DiskWrite, DiskZero, Extent, ExtentKind, Payload,
};
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;
use crate::layer::raw::RawImage;
use crate::layer::{Image, SlotPlan};
use extents::ExtentMap;
use plan::{Origin, Span};
use std::path::Path;
use std::sync::Arc;

pub struct Chain {
    top: Image,
    /// Shared: a job may hold a lower layer (to commit into it) while the chain it belongs to
    /// is replaced by another that keeps it.
    lowers: Vec<Arc<Image>>,
    base: Option<Arc<RawImage>>,
    lower_map: ExtentMap,
    size: u64,
    chunk_shift: u32,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("top", &self.top.path())
            .field("lowers", &self.lowers.len())
            .field("base", &self.base.as_ref().map(|b| b.path().to_path_buf()))
            .finish()
    }
}

/// One piece of a request inside one chunk of the top image.
#[derive(Debug, Clone, Copy)]
struct ChunkPiece {
    chunk: u64,
    /// Offset of the piece inside the chunk.
    start: u64,
    /// End of the piece inside the chunk.
    end: u64,
}

impl Chain {
    /// Opens the chain whose top image is at `path`, following its parents.
    pub fn open(path: &Path, opts: ChainOptions) -> Result<Chain> {
        let o = open::open_chain(path, opts)?;
        Ok(Chain::assemble(o.top, o.lowers, o.base))
    }

    /// Builds a chain from already opened layers (index 0 of `lowers` is directly under `top`).
    pub fn assemble(top: Image, lowers: Vec<Image>, base: Option<RawImage>) -> Chain {
        Chain::assemble_shared(top, lowers.into_iter().map(Arc::new).collect(), base.map(Arc::new))
    }

    /// [`Chain::assemble`] with lower layers another chain (or a job) may share.
    pub fn assemble_shared(top: Image, lowers: Vec<Arc<Image>>, base: Option<Arc<RawImage>>) -> Chain {
        let g = top.geometry();
        let lower_map = ExtentMap::build(&lowers, g.virtual_size);
        Chain { top, lowers, base, lower_map, size: g.virtual_size, chunk_shift: g.chunk_shift }
    }

    pub fn top(&self) -> &Image {
        &self.top
    }

    pub fn lowers(&self) -> &[Arc<Image>] {
        &self.lowers
    }

    pub fn base(&self) -> Option<&RawImage> {
        self.base.as_deref()
    }

    /// The raw base, to share with another chain over the same layers.
    pub fn shared_base(&self) -> Option<Arc<RawImage>> {
        self.base.clone()
    }

    /// Images in the chain, counting the top and the raw base.
    pub fn depth(&self) -> usize {
        1 + self.lowers.len() + usize::from(self.base.is_some())
    }

    /// Takes the chain apart (to reopen or replace its top).
    pub fn into_layers(self) -> (Image, Vec<Arc<Image>>, Option<Arc<RawImage>>) {
        (self.top, self.lowers, self.base)
    }

    pub fn close(&self) -> Result<()> {
        self.top.close()
    }

    fn check_range(&self, offset: u64, len: u64, op: &'static str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(err(
                ErrorKind::OutOfRange,
                format!("{op} of {len} bytes at {offset} is outside the {}-byte device", self.size),
            )),
        }
    }

    fn require_writable(&self) -> Result<()> {
        if self.top.is_writable() {
            Ok(())
        } else {
            Err(err(ErrorKind::ReadOnly, "device is read-only").with_file(self.top.path()))
        }
    }

    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = ChunkPiece> {
        let shift = self.chunk_shift;
        let cs = 1u64 << shift;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let chunk = pos >> shift;
            let start = pos & (cs - 1);
            let n = (cs - start).min(end - pos);
            let p = ChunkPiece { chunk, start, end: start + n };
            pos += n;
            Some(p)
        })
    }

    fn chunk_base(&self, chunk: u64) -> u64 {
        chunk << self.chunk_shift
    }

    /// Carries out `spans` (a plan of [offset, offset + buf.len())) into `buf`. The caller
    /// holds the top's I/O guard if the plan names the top.
    fn read_planned(&self, spans: &[Span], buf: &mut [u8], offset: u64) -> Result<()> {
        // A long range where a few blocks of the layers interrupt the base: one read of the
        // base for all of it, then the layers' blocks on top, instead of a read per piece.
        let base_first = plan::base_first(spans, buf.len() as u64);
        if base_first {
            self.read_base(buf, offset)?;
        }
        for s in spans {
            let sub = &mut buf[(s.start - offset) as usize..(s.end - offset) as usize];
            match s.from {
                Origin::Top { file_offset } => read_image(&self.top, s.start, file_offset, sub)?,
                Origin::Lower { layer, file_offset } => {
                    read_image(&self.lowers[layer as usize], s.start, file_offset, sub)?
                }
                Origin::Base if base_first => {}
                Origin::Base => self.read_base(sub, s.start)?,
                Origin::Zero { .. } | Origin::Unallocated => sub.fill(0),
            }
        }
        Ok(())
    }

    /// Reads what the layers under the top hold at `offset`.
    fn read_lower(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut spans = Vec::new();
        self.plan_lower(offset, offset + buf.len() as u64, &mut spans);
        self.read_planned(&spans, buf, offset)
    }

    fn read_base(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.base {
            Some(b) => b.read_at(buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Whether anything under the top could make [start, end) read other than zeros. A raw
    /// base's holes read as zeros: zeroing or trimming over them needs nothing in the top, so
    /// a client that zeroes a whole disk over a sparse base (qemu-img convert, nbdcopy) does
    /// not fill the top's map with a Zero entry per chunk (64 GiB of them took 350 MB of
    /// server memory; found by a review, 2026-12-04). SEEK_DATA may call a hole data, never
    /// data a hole; a base that cannot say counts as data.
    fn lower_visible(&self, start: u64, end: u64) -> bool {
        let mut spans = Vec::new();
        self.plan_lower(start, end, &mut spans);
        spans.iter().any(|s| match s.from {
            Origin::Lower { .. } => true,
            Origin::Base => self
                .base
                .as_ref()
                .map_or(true, |b| b.storage().next_data(s.start).map_or(true, |d| d.is_some_and(|d| d < s.end))),
            _ => false,
        })
    }

    /// Writes `data` at chunk-relative [p.start, p.end). The caller holds the chunk lock.
    /// Partial blocks not yet in the top are completed from what they read as now (copy-up of
    /// that block only); everything else is written as given. Where the bytes go (in place, a
    /// new slot, or a relocated chunk) is the top's write plan (spec §5.8).
    fn write_piece_locked(&self, p: ChunkPiece, data: &[u8]) -> Result<()> {
        let base = self.chunk_base(p.chunk);
        let first = (p.start / BLOCK_SIZE) as usize;
        let last = p.end.div_ceil(BLOCK_SIZE) as usize;
        let checksums = self.top.geometry().data_checksums;
        if !checksums {
            // An overwrite of blocks that are all Data already: in place, and the map does not
            // change (unless the slot is a log record's home: pinned, the plan moves it).
            let slot = self.top.with_entry(p.chunk, |e| {
                e.filter(|e| {
                    e.pinned == 0 && e.blocks.get(first) == BlockState::Data && e.blocks.run_end(first, last) == last
                })
                .map(|e| e.data_offset)
            });
            if let Some(slot) = slot.filter(|&s| s != 0) {
                return self.top.write_at(data, slot + p.start);
            }
        }
        let plan = self.top.plan_write(p.chunk, first, last)?;
        let (head_state, tail_state) = self.top.with_entry(p.chunk, |e| {
            e.map_or((BlockState::Absent, BlockState::Absent), |e| (e.blocks.get(first), e.blocks.get(last - 1)))
        });
        // With checksums every block is written whole: its checksum covers all of it. So is a
        // block of a chunk that moves to a new slot (a pinned one: checksums, or a log record's
        // home), where the rest of a Data block is not yet.
        let whole = checksums || matches!(plan.slot(), SlotPlan::Relocate { .. });
        let head_fill = p.start % BLOCK_SIZE != 0 && (whole || head_state != BlockState::Data);
        let tail_fill = p.end % BLOCK_SIZE != 0 && (whole || tail_state != BlockState::Data);
        if let SlotPlan::Relocate { from, to, keep } = plan.slot() {
            for &(s, t) in keep {
                let at = s as u64 * BLOCK_SIZE;
                self.top.copy_within(from + at, to + at, (t - s) as u64 * BLOCK_SIZE)?;
            }
        }
        let slot = plan.target();
        let ws = if head_fill { first as u64 * BLOCK_SIZE } else { p.start };
        let we = if tail_fill { last as u64 * BLOCK_SIZE } else { p.end };
        let mut tmp = Vec::new();
        let out: &[u8] = if ws == p.start && we == p.end {
            data
        } else {
            tmp.resize((we - ws) as usize, 0);
            // Data blocks are read from the slot the entry names until the commit: the old
            // one of a relocated chunk.
            let fill = |tmp: &mut [u8], block: usize, state: BlockState| -> Result<()> {
                let at = (block as u64 * BLOCK_SIZE - ws) as usize;
                let b = &mut tmp[at..at + BLOCK_SIZE as usize];
                match state {
                    BlockState::Absent => self.read_lower(b, base + block as u64 * BLOCK_SIZE),
                    BlockState::Data => self.top.read_data_verified(p.chunk, block as u64 * BLOCK_SIZE, b),
                    BlockState::Zero => Ok(()), // tmp is already zero
                }
            };
            if head_fill {
                fill(&mut tmp, first, head_state)?;
            }
            if tail_fill && !(head_fill && first == last - 1) {
                fill(&mut tmp, last - 1, tail_state)?;
            }
            let at = (p.start - ws) as usize;
            tmp[at..at + data.len()].copy_from_slice(data);
            &tmp
        };
        self.top.write_at(out, slot + ws)?;
        let crcs: Vec<u32> =
            if checksums { out.chunks(BLOCK_SIZE as usize).map(crc32fast::hash).collect() } else { Vec::new() };
        self.top.commit_write(plan, &crcs)
    }

    /// Writes pieces that each cover a whole chunk (consecutive chunks), in rounds over the
    /// chunks whose bytes `src` has ready: a client slow to send a large write is never waited
    /// for with a lock held. A round takes what has arrived, at least a chunk: its bytes are
    /// still in the CPU's caches when they are copied. When `src` cannot hold a whole chunk
    /// ahead (a pipe smaller than the chunk), that chunk's bytes are taken into memory first,
    /// and written from there. (Until 2026-12-04 the chunk was written straight from the
    /// source under its lock and the image's copy gate, so a client that stopped part-way
    /// held every request on that lock's stripe, a FLUSH, and behind the FLUSH every write of
    /// the export, for as long as it liked; found by a review.)
    fn write_whole_chunks(&self, run: &[ChunkPiece], src: &mut dyn Payload) -> Result<()> {
        let cs = self.chunk_base(1) as usize;
        let mut scratch = Vec::new();
        let mut i = 0;
        while i < run.len() {
            let ready = src.ready(cs, (run.len() - i) * cs)?;
            if ready < cs {
                let mut bytes: &[u8] = src.take_bytes(cs, &mut scratch)?;
                self.write_ready_chunks(&run[i..i + 1], &mut bytes)?;
                i += 1;
                continue;
            }
            let n = (ready / cs).min(run.len() - i);
            self.write_ready_chunks(&run[i..i + n], src)?;
            i += n;
        }
        Ok(())
    }

    /// One round of [`Chain::write_whole_chunks`], holding the locks of all its chunks: slots
    /// first, then one write per run of slots that lie back to back in the file, then the
    /// blocks become Data. Nothing is copied up: every block is covered.
    fn write_ready_chunks(&self, run: &[ChunkPiece], src: &mut dyn Payload) -> Result<()> {
        let (first, last) = (run[0].chunk, run[run.len() - 1].chunk);
        let _locks = self.top.lock_chunks(first, last);
        let cs = self.chunk_base(1);
        let blocks = (cs / BLOCK_SIZE) as usize;
        let plans = run.iter().map(|p| self.top.plan_write(p.chunk, 0, blocks)).collect::<Result<Vec<_>>>()?;
        let slot = |i: usize| plans[i].target();
        let mut j = 0;
        while j < run.len() {
            let mut k = j + 1;
            while k < run.len() && slot(k) == slot(k - 1) + cs && plans[k].is_new_slot() == plans[j].is_new_slot() {
                k += 1;
            }
            self.top.write_from(src, slot(j), (k - j) * cs as usize, plans[j].is_new_slot())?;
            j = k;
        }
        for plan in plans {
            self.top.commit_write(plan, &[])?;
        }
        Ok(())
    }

    fn zero_piece(&self, p: ChunkPiece) -> Result<()> {
        let base = self.chunk_base(p.chunk);
        let _g = self.top.lock_chunk(p.chunk);
        // The device's last block may be short: covering up to the device's end covers it whole.
        let at_device_end = base + p.end == self.size;
        let fb = p.start.div_ceil(BLOCK_SIZE);
        let lb = if at_device_end { p.end.div_ceil(BLOCK_SIZE) } else { p.end / BLOCK_SIZE };
        if fb >= lb {
            return self.write_zeros_locked(p);
        }
        let (fs, fe) = (fb * BLOCK_SIZE, (lb * BLOCK_SIZE).min(self.size - base));
        let state = if self.lower_visible(base + fs, base + fe) { BlockState::Zero } else { BlockState::Absent };
        self.top.clear_blocks(p.chunk, fb as usize, lb as usize, state)?;
        if p.start < fs {
            self.write_zeros_locked(ChunkPiece { end: fs, ..p })?;
        }
        if fe < p.end {
            self.write_zeros_locked(ChunkPiece { start: fe, ..p })?;
        }
        Ok(())
    }

    fn write_zeros_locked(&self, p: ChunkPiece) -> Result<()> {
        let zeros = vec![0u8; (p.end - p.start) as usize];
        self.write_piece_locked(p, &zeros)
    }
}

/// Reads what `img` holds at device offset `at` (file offset `file_offset`), verified against
/// its data checksums when it has them (chunk by chunk, in `img`'s own chunk size). A mismatch
/// is a [`ErrorKind::BadChecksum`] error that does not yet mark the image corrupt: see
/// [`DiskRead::read_at`] for `Chain`.
fn read_image(img: &Image, at: u64, file_offset: u64, buf: &mut [u8]) -> Result<()> {
    let g = img.geometry();
    if !g.data_checksums {
        return img.read_at(buf, file_offset);
    }
    let mut done = 0;
    while done < buf.len() {
        let pos = at + done as u64;
        let in_chunk = pos & (g.chunk_size() - 1);
        let n = ((g.chunk_size() - in_chunk) as usize).min(buf.len() - done);
        img.read_data_checked(pos >> g.chunk_shift, in_chunk, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

impl Chain {
    /// A data checksum mismatch no writer explains: marks the layer it was found in as corrupt (the
    /// top records it in its header at its next flush) and passes the error on.
    fn damaged(&self, e: crate::Error) -> crate::Error {
        let layers = std::iter::once(&self.top).chain(self.lowers.iter().map(|l| &**l));
        if let Some(img) = layers.into_iter().find(|l| e.file() == Some(l.path())) {
            img.note_corrupt();
        }
        e
    }
}

impl DiskRead for Chain {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len, "read")?;
        if len == 0 {
            return Ok(());
        }
        let mut spans = Vec::new();
        let first_look = {
            let _io = self.top.io_guard();
            self.plan(offset, len, &mut spans);
            self.read_planned(&spans, buf, offset)
        };
        match first_look {
            Err(e) if e.kind() == ErrorKind::BadChecksum => {}
            other => return other,
        }
        // A writer of the same block may be between its data write and its map update (an
        // overwrite in place of a block no flush has seen yet): look again once no writer of
        // these chunks is inside a write. Chunk locks before the I/O guard, the order writers
        // take them in. A mismatch now is damage.
        let (first, last) = (offset >> self.chunk_shift, (offset + len - 1) >> self.chunk_shift);
        let _writers = self.top.lock_chunks(first, last);
        let _io = self.top.io_guard();
        spans.clear();
        self.plan(offset, len, &mut spans);
        self.read_planned(&spans, buf, offset).map_err(|e| match e.kind() {
            ErrorKind::BadChecksum => self.damaged(e),
            _ => e,
        })
    }
}

impl DiskWrite for Chain {
    fn write_from(&self, src: &mut dyn Payload, offset: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        self.check_range(offset, len, "write")?;
        let pieces: Vec<ChunkPiece> = self.pieces(offset, len).collect();
        let whole =
            |p: &ChunkPiece| p.start == 0 && p.end == self.chunk_base(1) && self.chunk_base(p.chunk + 1) <= self.size;
        let mut scratch = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            // Runs of whole chunks (without data checksums) go from `src` to the file with one
            // write per run of contiguous slots, under the locks of all their chunks.
            let run_end = if self.top.geometry().data_checksums {
                i
            } else {
                i + pieces[i..].iter().take_while(|p| whole(p)).count()
            };
            if run_end - i >= 2 {
                self.write_whole_chunks(&pieces[i..run_end], src)?;
                i = run_end;
                continue;
            }
            // A piece that may need copy-up or checksums is assembled in memory.
            let p = pieces[i];
            let data = src.take_bytes((p.end - p.start) as usize, &mut scratch)?;
            let _g = self.top.lock_chunk(p.chunk);
            self.write_piece_locked(p, data)?;
            i += 1;
        }
        Ok(())
    }

    fn write_fua_from(&self, src: &mut dyn Payload, offset: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        self.check_range(offset, len, "write")?;
        if !self.top.geometry().log || len != BLOCK_SIZE || offset % BLOCK_SIZE != 0 {
            self.write_from(src, offset, len)?;
            return self.flush();
        }
        // A log-structured top takes a block of a chunk it has no slot for with one durable
        // record that becomes the slot (spec §5.10); where it cannot (the chunk has a slot
        // already, ...) the write and a flush, as any other image.
        let mut data = vec![0u8; BLOCK_SIZE as usize];
        src.take(&mut data)?;
        let chunk = offset >> self.chunk_shift;
        let block = ((offset - self.chunk_base(chunk)) / BLOCK_SIZE) as usize;
        let logged = {
            let _lock = self.top.lock_chunk(chunk);
            self.top.write_logged(chunk, block, &data)?
        };
        if !logged {
            self.write_from(&mut &data[..], offset, len)?;
            self.flush()?;
        }
        Ok(())
    }
}

impl DiskZero for Chain {
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool) -> Result<()> {
        self.require_writable()?;
        self.check_range(offset, len, "write zeroes")?;
        for p in self.pieces(offset, len) {
            // One request may cover terabytes: each chunk is a step (progress.rs).
            crate::progress::step();
            if allocate {
                let _g = self.top.lock_chunk(p.chunk);
                self.write_zeros_locked(p)?;
            } else {
                self.zero_piece(p)?;
            }
        }
        Ok(())
    }

    fn zeroing_is_fast(&self, offset: u64, len: u64, allocate: bool) -> bool {
        // Whole blocks become map entries; a block only partly covered is written as data
        // (copied up first when a lower layer holds it), which is what FAST_ZERO must avoid.
        // The device's short last block counts as whole when the range runs to the end.
        let end = offset + len;
        len == 0 || (!allocate && offset % BLOCK_SIZE == 0 && (end % BLOCK_SIZE == 0 || end == self.size))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, false)
    }
}

impl DiskFlush for Chain {
    fn flush(&self) -> Result<()> {
        self.top.flush()
    }
}

/// The most steps (runs of chunks planned alike) one [`DiskExtents::extents`] call takes: as
/// many as a 4 GiB range of 64 KiB chunks, the most a request of 32-bit length could ask for.
const MAX_EXTENT_STEPS: usize = 65_536;

impl Chain {
    /// The extents of [start, end), which the raw base shows, split at the base's holes
    /// (SEEK_DATA, SEEK_HOLE): a hole reads as zeros and is reported as zeros recorded at the
    /// base's depth (base:allocation HOLE|ZERO, as qemu reports a sparse backing file's
    /// holes), so that `map` says so and `flatten` and block-status-driven copies (qemu-img
    /// convert, nbdcopy) keep it sparse. (Until 2026-12-04 all of it was data: a 256 MiB
    /// sparse base with 4 KiB written flattened to 256 MiB; found by a review.) A base that
    /// cannot tell counts as data; stops once `out` holds more than `max` extents.
    fn base_extents(&self, start: u64, end: u64, max: usize, out: &mut Vec<Extent>) -> Result<()> {
        let data = ExtentKind::Data { depth: 1 + self.lowers.len() };
        let Some(st) = self.base.as_ref().map(|b| b.storage()) else {
            push_extent(out, Extent { offset: start, length: end - start, kind: data }, |a, b| a == b);
            return Ok(());
        };
        let zero = ExtentKind::Zero { depth: 1 + self.lowers.len() };
        let mut pos = start;
        while pos < end && out.len() <= max {
            let d = st.next_data(pos)?.map_or(end, |d| d.clamp(pos, end));
            push_extent(out, Extent { offset: pos, length: d - pos, kind: zero }, |a, b| a == b);
            if d >= end {
                break;
            }
            // At least one byte on: a hole reported at the data offset itself cannot stall us.
            let h = st.next_hole(d)?.clamp(d + 1, end);
            push_extent(out, Extent { offset: d, length: h - d, kind: data }, |a, b| a == b);
            pos = h;
        }
        Ok(())
    }
}

impl DiskExtents for Chain {
    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        self.check_range(offset, len, "block status")?;
        let max = max_extents.max(1);
        let end = offset + len;
        let mut out = Vec::new();
        let mut spans = Vec::new();
        let mut pos = offset;
        let mut steps = 0usize;
        while pos < end {
            spans.clear();
            pos = self.plan_step(pos, end, &mut spans);
            for sp in &spans {
                if sp.from == Origin::Base {
                    self.base_extents(sp.start, sp.end, max, &mut out)?;
                    continue;
                }
                let e = Extent { offset: sp.start, length: sp.end - sp.start, kind: self.kind_of(sp.from) };
                push_extent(&mut out, e, |a, b| a == b);
            }
            // Stop once enough is described: a reply may cover a prefix of the range.
            if out.len() > max {
                out.truncate(max);
                break;
            }
            // Or once this call has looked far enough: written chunks all merge into one
            // extent, so without this an NBD block status of 64-bit length (extended headers)
            // over a densely written disk would look at every chunk of it in one request.
            // A hole takes one step whatever its length.
            steps += 1;
            if steps >= MAX_EXTENT_STEPS {
                break;
            }
        }
        Ok(out)
    }
}

impl Disk for Chain {
    fn is_read_only(&self) -> bool {
        !self.top.is_writable()
    }

    fn layers(&self) -> Option<&dyn DiskLayers> {
        Some(self)
    }
}
