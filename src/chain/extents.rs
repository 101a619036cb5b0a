//! The merged map of the frozen layers under the top: for every byte range, which lower layer
//! serves it (and where in that layer's file), or that it reads as zero, or that nothing below
//! the top covers it (ask the raw base).
//!
//! Lower layers never change while a chain is open, so this map is built once at open and
//! read without locks. A lookup costs one B-tree search whatever the chain's depth, which is
//! what keeps a 16-deep chain as fast to read as a 1-deep one.

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

#[derive(Debug, Default)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
}

/// A piece of a looked-up range: `None` means no lower layer covers it.
pub type Piece = (u64, u64, Option<Source>);

impl ExtentMap {
    /// Merges `lowers` (index 0 = nearest the top) over a device of `size` bytes.
    pub fn build(lowers: &[Arc<Image>], size: u64) -> ExtentMap {
        let mut m = ExtentMap::default();
        for (i, layer) in lowers.iter().enumerate() {
            let li = i as u8;
            let g = layer.geometry();
            let layer_end = g.virtual_size.min(size);
            for (chunk, e) in layer.entries() {
                let base = chunk << g.chunk_shift;
                if base >= layer_end {
                    continue;
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
            }
            // What lies past a lower layer's end reads as zero through it: layers further down
            // are not visible there.
            if layer_end < size {
                m.fill_gaps(layer_end, size, Source::Zero { layer: li });
            }
        }
        m
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
        let covered: Vec<(u64, u64)> = self.map.range(pos..end).map(|(&k, x)| (k, x.end)).collect();
        for (ks, ke) in covered {
            if ks > pos {
                self.insert(pos, ks, source.advanced(pos - start));
            }
            pos = pos.max(ke);
        }
        if pos < end {
            self.insert(pos, end, source.advanced(pos - start));
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

    /// Hands [off, off+len) to `f` in pieces by source, in order, covering the whole range.
    pub fn for_each_piece(&self, off: u64, len: u64, mut f: impl FnMut(Piece)) {
        let end = off + len;
        let mut pos = off;
        if let Some((&ks, x)) = self.map.range(..=off).next_back() {
            if x.end > off {
                let e = x.end.min(end);
                f((off, e, Some(x.source.advanced(off - ks))));
                pos = e;
            }
        }
        if pos >= end {
            return;
        }
        for (&ks, x) in self.map.range(pos..end) {
            if ks > pos {
                f((pos, ks, None));
            }
            let e = x.end.min(end);
            f((ks, e, Some(x.source)));
            pos = e;
        }
        if pos < end {
            f((pos, end, None));
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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
        let mut m = ExtentMap::default();
        let a = Source::Layer { layer: 0, file_offset: 1000 };
        let b = Source::Layer { layer: 1, file_offset: 5000 };
        m.fill_gaps(100, 200, a);
        m.fill_gaps(0, 300, b);
        assert_eq!(
            pieces(&m, 0, 400),
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
        let mut m = ExtentMap::default();
        m.fill_gaps(4096, 8192, Source::Layer { layer: 2, file_offset: 65536 });
        assert_eq!(
            pieces(&m, 5000, 10),
            vec![(5000, 5010, Some(Source::Layer { layer: 2, file_offset: 65536 + 904 }))]
        );
    }

    #[test]
    fn contiguous_runs_coalesce_into_one_extent() {
        let mut m = ExtentMap::default();
        m.fill_gaps(0, 4096, Source::Layer { layer: 0, file_offset: 65536 });
        m.fill_gaps(4096, 8192, Source::Layer { layer: 0, file_offset: 65536 + 4096 });
        m.fill_gaps(8192, 12288, Source::Zero { layer: 0 });
        m.fill_gaps(12288, 16384, Source::Zero { layer: 0 });
        assert_eq!(m.len(), 2);
    }
}
