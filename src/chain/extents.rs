//! The merged map of the frozen layers under the top: for every byte range, which lower layer
//! serves it (and where in that layer's file), or that it reads as zero, or that nothing below
//! the top covers it (ask the raw base).
//!
//! Lower layers never change while a chain is open, so this map is built once at open and
//! read without locks. It is built in a B-tree (upper layers fill only the gaps the layers
//! above left), then frozen into a sorted array with a directory: for each bucket of the
//! device, the first extent that ends past the bucket's start. A lookup reads two directory
//! entries and searches only the extents between them (most buckets hold one or none),
//! whatever the chain's depth, which is what keeps a 256-deep chain as fast to read as a
//! 1-deep one; the B-tree it replaced cost two descents of several nodes per request over
//! a deep chain's tens of thousands of extents. The directory has at most about two buckets
//! per extent, so memory grows with the layers' data, not with the device's size.

use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;
use crate::layer::Image;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Lower layer `layer` (0 = directly under the top) holds the bytes at `file_offset`.
    Layer { layer: u8, file_offset: u64 },
    /// Reads as zeros (a zero block in a lower layer, or past a lower layer's end).
    Zero { layer: u8 },
}

impl Source {
    fn advanced(self, by: u64) -> Source {
        match self {
            Source::Layer { layer, file_offset } => Source::Layer { layer, file_offset: file_offset + by },
            z => z,
        }
    }

    /// Whether `next` continues `self` seamlessly after `len` bytes.
    fn continues(self, len: u64, next: Source) -> bool {
        match (self, next) {
            (Source::Zero { layer: a }, Source::Zero { layer: b }) => a == b,
            (Source::Layer { layer: a, file_offset: o }, Source::Layer { layer: b, file_offset: p }) => {
                a == b && o + len == p
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    end: u64,
    source: Source,
}

/// The merge in progress: extents by start.
#[derive(Debug, Default)]
struct Builder {
    map: BTreeMap<u64, Extent>,
}

/// The frozen map. Invariants: `starts` is strictly increasing, extent `i` covers
/// `[starts[i], extents[i].end)` and ends at or before `starts[i + 1]`; `dir[b]` is the index
/// of the first extent whose end lies past `b << shift` (`starts.len()` if none does).
#[derive(Debug, Default)]
pub struct ExtentMap {
    starts: Vec<u64>,
    extents: Vec<Extent>,
    dir: Vec<usize>,
    shift: u32,
}

/// The smallest bucket: a 64 KiB chunk, the default chunk size.
const MIN_BUCKET_SHIFT: u32 = 16;

/// A piece of a looked-up range: `None` means no lower layer covers it.
pub type Piece = (u64, u64, Option<Source>);

impl ExtentMap {
    /// Merges `lowers` (index 0 = nearest the top) over a device of `size` bytes.
    pub fn build(lowers: &[Arc<Image>], size: u64) -> ExtentMap {
        let mut m = Builder::default();
        for (i, layer) in lowers.iter().enumerate() {
            let li = i as u8;
            let g = layer.geometry();
            let layer_end = g.virtual_size.min(size);
            layer.for_each_entry(|chunk, e| {
                let base = chunk << g.chunk_shift;
                if base >= layer_end {
                    return;
                }
                for (s, t, st) in e.blocks.runs(0, g.blocks_per_chunk()) {
                    let start = base + s as u64 * BLOCK_SIZE;
                    let end = (base + t as u64 * BLOCK_SIZE).min(layer_end);
                    if start >= end {
                        continue;
                    }
                    let source = match st {
                        BlockState::Absent => continue,
                        BlockState::Zero => Source::Zero { layer: li },
                        BlockState::Data => {
                            Source::Layer { layer: li, file_offset: e.data_offset + s as u64 * BLOCK_SIZE }
                        }
                    };
                    m.fill_gaps(start, end, source);
                }
            });
            // What lies past a lower layer's end reads as zero through it: layers further down
            // are not visible there.
            if layer_end < size {
                m.fill_gaps(layer_end, size, Source::Zero { layer: li });
            }
        }
        m.freeze(size)
    }

    /// Hands [off, off+len) to `f` in pieces by source, in order, covering the whole range.
    pub fn for_each_piece(&self, off: u64, len: u64, mut f: impl FnMut(Piece)) {
        let end = off + len;
        let mut pos = off;
        // The first extent ending past `off` lies between the first ending past this
        // bucket's start and the first ending past the next bucket's (which ends past `off`
        // too). A binary search there: extents may bunch up in a few buckets.
        let n = self.starts.len();
        let bucket = usize::try_from(off >> self.shift).unwrap_or(usize::MAX);
        let lo = self.dir.get(bucket).copied().unwrap_or(n);
        let hi = bucket.checked_add(1).and_then(|b| self.dir.get(b)).copied().unwrap_or(n);
        let mut i = lo + self.extents[lo..hi].partition_point(|x| x.end <= off);
        while i < n && self.starts[i] < end {
            let (ks, x) = (self.starts[i], self.extents[i]);
            if ks > pos {
                f((pos, ks, None));
                pos = ks;
            }
            let e = x.end.min(end);
            f((pos, e, Some(x.source.advanced(pos - ks))));
            pos = e;
            i += 1;
        }
        if pos < end {
            f((pos, end, None));
        }
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }
}

impl Builder {
    /// The frozen map of a device of `size` bytes, with buckets just large enough that there
    /// are at most about two per extent (and at least 64 KiB).
    fn freeze(self, size: u64) -> ExtentMap {
        let n = self.map.len() as u64;
        let mut shift = MIN_BUCKET_SHIFT;
        while shift < 63 && (size >> shift) > 2 * n.max(1) {
            shift += 1;
        }
        let (starts, extents): (Vec<u64>, Vec<Extent>) = self.map.into_iter().unzip();
        let buckets = size.div_ceil(1 << shift) as usize;
        let mut dir = Vec::with_capacity(buckets);
        let mut i = 0;
        for b in 0..buckets as u64 {
            let at = b << shift;
            while i < extents.len() && extents[i].end <= at {
                i += 1;
            }
            dir.push(i);
        }
        ExtentMap { starts, extents, dir, shift }
    }

    /// Inserts `source` over the parts of [start, end) not yet covered (upper layers win).
    fn fill_gaps(&mut self, start: u64, end: u64, source: Source) {
        let mut pos = start;
        if let Some((_, x)) = self.map.range(..=pos).next_back() {
            pos = pos.max(x.end);
        }
        if pos >= end {
            return;
        }
        // One covered extent at a time, found afresh after each insert (which only adds below
        // it): no list gathered, and one descent when nothing covers the range, the usual case.
        while pos < end {
            let Some((ks, ke)) = self.map.range(pos..end).next().map(|(&k, x)| (k, x.end)) else {
                self.insert(pos, end, source.advanced(pos - start));
                return;
            };
            if ks > pos {
                self.insert(pos, ks, source.advanced(pos - start));
            }
            pos = pos.max(ke);
        }
    }

    fn insert(&mut self, start: u64, end: u64, source: Source) {
        if let Some((&ps, prev)) = self.map.range_mut(..start).next_back() {
            if prev.end == start && prev.source.continues(start - ps, source) {
                prev.end = end;
                return;
            }
        }
        self.map.insert(start, Extent { end, source });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(m: &ExtentMap, off: u64, len: u64) -> Vec<Piece> {
        let mut v = Vec::new();
        m.for_each_piece(off, len, |p| v.push(p));
        v
    }

    #[test]
    fn upper_layer_wins_and_gaps_show_through() {
        let mut m = Builder::default();
        let a = Source::Layer { layer: 0, file_offset: 1000 };
        let b = Source::Layer { layer: 1, file_offset: 5000 };
        m.fill_gaps(100, 200, a);
        m.fill_gaps(0, 300, b);
        assert_eq!(
            pieces(&m.freeze(1 << 20), 0, 400),
            vec![
                (0, 100, Some(b)),
                (100, 200, Some(a)),
                (200, 300, Some(Source::Layer { layer: 1, file_offset: 5200 })),
                (300, 400, None),
            ]
        );
    }

    #[test]
    fn lookup_inside_an_extent_advances_the_file_offset() {
        let mut m = Builder::default();
        m.fill_gaps(4096, 8192, Source::Layer { layer: 2, file_offset: 65536 });
        assert_eq!(
            pieces(&m.freeze(1 << 20), 5000, 10),
            vec![(5000, 5010, Some(Source::Layer { layer: 2, file_offset: 65536 + 904 }))]
        );
    }

    #[test]
    fn contiguous_runs_coalesce_into_one_extent() {
        let mut m = Builder::default();
        m.fill_gaps(0, 4096, Source::Layer { layer: 0, file_offset: 65536 });
        m.fill_gaps(4096, 8192, Source::Layer { layer: 0, file_offset: 65536 + 4096 });
        m.fill_gaps(8192, 12288, Source::Zero { layer: 0 });
        m.fill_gaps(12288, 16384, Source::Zero { layer: 0 });
        assert_eq!(m.freeze(1 << 20).len(), 2);
    }

    /// The pieces of [off, off + len) read straight from the builder's B-tree: the lookup
    /// the directory replaced, kept as the reference it must agree with.
    fn reference(b: &Builder, off: u64, len: u64) -> Vec<Piece> {
        let (end, mut pos, mut v) = (off + len, off, Vec::new());
        if let Some((&ks, x)) = b.map.range(..=off).next_back() {
            if x.end > off {
                let e = x.end.min(end);
                v.push((off, e, Some(x.source.advanced(off - ks))));
                pos = e;
            }
        }
        for (&ks, x) in b.map.range(pos..end) {
            if ks > pos {
                v.push((pos, ks, None));
            }
            let e = x.end.min(end);
            v.push((ks, e, Some(x.source)));
            pos = e;
        }
        if pos < end {
            v.push((pos, end, None));
        }
        v
    }

    proptest::proptest! {
        /// Layers of scattered runs (a few long ones, many of one block) over devices whose
        /// buckets hold from well under one extent to many: every lookup, inside extents,
        /// across them and across bucket boundaries, agrees with the B-tree's.
        #[test]
        fn the_directory_agrees_with_the_b_tree(
            size_blocks in 1u64..4096,
            bunched in 1u64..64,
            runs in proptest::collection::vec((0u64..4096, 1u64..64, 0u8..4, proptest::bool::ANY), 0..300),
            lookups in proptest::collection::vec((0u64..1 << 40, 1u64..300_000), 1..40),
        ) {
            // Runs confined to the first 1/bunched of the device: buckets sized for extents
            // spread evenly then hold many.
            let size = size_blocks * bunched * BLOCK_SIZE;
            let mut b = Builder::default();
            for (i, &(start, n, layer, zero)) in runs.iter().enumerate() {
                let start = (start % size_blocks) * BLOCK_SIZE;
                let end = (start + n * BLOCK_SIZE).min(size);
                let source = if zero {
                    Source::Zero { layer }
                } else {
                    Source::Layer { layer, file_offset: (i as u64 + 1) << 30 }
                };
                b.fill_gaps(start, end, source);
            }
            let want: Vec<Vec<Piece>> = lookups
                .iter()
                .map(|&(off, len)| {
                    let off = off % size;
                    reference(&b, off, len.min(size - off))
                })
                .collect();
            let m = b.freeze(size);
            proptest::prop_assert!(m.dir.len() as u64 <= 2 * (m.len() as u64).max(1) + 1 || m.shift == MIN_BUCKET_SHIFT);
            proptest::prop_assert!(pieces(&m, size, 0).is_empty());
            for (&(off, len), want) in lookups.iter().zip(&want) {
                let off = off % size;
                proptest::prop_assert_eq!(&pieces(&m, off, len.min(size - off)), want, "at {} for {}", off, len);
            }
        }
    }
}
