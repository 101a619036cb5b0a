//! Read plans: for a range of the merged device, which layer serves each stretch and where in
//! that layer's file. Reads, block status and file-to-file copies all carry out the same plan,
//! so they cannot disagree about what the device holds.
//!
//! A plan that names file offsets in the top is valid only while the top's slots stay put:
//! whoever carries it out holds the top's I/O guard from planning until the data I/O is done.

use super::extents::Source;
use super::Chain;
use crate::device::ExtentKind;
use crate::format::blocks::BlockState;
use crate::format::BLOCK_SIZE;

/// Where one stretch of the merged device is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The top's data at `file_offset` of its file.
    Top { file_offset: u64 },
    /// Lower layer `layer` (0 = directly under the top) at `file_offset` of its file.
    Lower { layer: u8, file_offset: u64 },
    /// The raw base at the same offset; planned only below the base's end.
    Base,
    /// Zeros, because the layer at `depth` (0 = top) says so.
    Zero { depth: u8 },
    /// Zeros, because no layer holds anything here.
    Unallocated,
}

impl Origin {
    /// The same source `by` bytes further on.
    pub(crate) fn advanced(self, by: u64) -> Origin {
        match self {
            Origin::Top { file_offset } => Origin::Top { file_offset: file_offset + by },
            Origin::Lower { layer, file_offset } => Origin::Lower { layer, file_offset: file_offset + by },
            other => other,
        }
    }

    /// Whether `next` continues `self` seamlessly after `len` bytes (same layer, next bytes of
    /// its file).
    fn continues(self, len: u64, next: Origin) -> bool {
        self.advanced(len) == next
    }
}

/// Device bytes [start, end) come from `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: u64,
    pub end: u64,
    pub from: Origin,
}

impl Span {
    pub(crate) fn len(&self) -> u64 {
        self.end - self.start
    }

    /// The part of this span over device bytes [start, end) (which it must contain).
    pub(crate) fn part(&self, start: u64, end: u64) -> Span {
        Span { start, end, from: self.from.advanced(start - self.start) }
    }
}

/// Whether to carry out a plan of `len` bytes base first: one transfer of the base for all of
/// it, then the other spans over it, instead of one transfer per base span. Worth it where the
/// base serves at least half of the range in more than one span: the bytes the other spans
/// then write over are moved twice.
pub(crate) fn base_first(spans: &[Span], len: u64) -> bool {
    let (n, bytes) = spans.iter().filter(|s| s.from == Origin::Base).fold((0, 0), |(n, b), s| (n + 1, b + s.len()));
    n > 1 && bytes * 2 >= len
}

/// Appends a span, merged into the last one when it continues it.
fn push(out: &mut Vec<Span>, start: u64, end: u64, from: Origin) {
    if start >= end {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end == start && last.from.continues(last.len(), from) {
            last.end = end;
            return;
        }
    }
    out.push(Span { start, end, from });
}

impl Chain {
    /// Plans all of [offset, offset+len), which must lie inside the device.
    pub(crate) fn plan(&self, offset: u64, len: u64, out: &mut Vec<Span>) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            pos = self.plan_step(pos, end, out);
        }
    }

    /// Plans from `pos` to the end of its chunk if the top has an entry for it, else to the
    /// next chunk that has one (the whole gap is whatever lies below), never past `end`.
    /// Returns where it stopped.
    pub(crate) fn plan_step(&self, pos: u64, end: u64, out: &mut Vec<Span>) -> u64 {
        let chunk = pos >> self.chunk_shift;
        let chunk_end = self.chunk_base(chunk + 1).min(end);
        if chunk_end == end {
            // Within one chunk (the common small request): one map lookup.
            self.plan_chunk(chunk, pos, end, out);
            return end;
        }
        match self.top.next_chunk(chunk) {
            Some(c) if c == chunk => {
                self.plan_chunk(chunk, pos, chunk_end, out);
                chunk_end
            }
            next => {
                let gap_end = next.map_or(end, |c| self.chunk_base(c).min(end));
                self.plan_lower(pos, gap_end, out);
                gap_end
            }
        }
    }

    /// Plans [start, end) inside top chunk `chunk`.
    fn plan_chunk(&self, chunk: u64, start: u64, end: u64, out: &mut Vec<Span>) {
        let base = self.chunk_base(chunk);
        let first = ((start - base) / BLOCK_SIZE) as usize;
        let last = (end - base).div_ceil(BLOCK_SIZE) as usize;
        let found = self.top.with_entry(chunk, |e| {
            let Some(e) = e else { return false };
            for (s, t, state) in e.blocks.runs(first, last) {
                let rs = (base + s as u64 * BLOCK_SIZE).max(start);
                let re = (base + t as u64 * BLOCK_SIZE).min(end);
                match state {
                    // A chunk's bytes sit in its slot at their offset inside the chunk.
                    BlockState::Data => push(out, rs, re, Origin::Top { file_offset: e.data_offset + (rs - base) }),
                    BlockState::Zero => push(out, rs, re, Origin::Zero { depth: 0 }),
                    BlockState::Absent => self.plan_lower(rs, re, out),
                }
            }
            true
        });
        if !found {
            self.plan_lower(start, end, out);
        }
    }

    /// Plans [start, end) as the layers under the top show it.
    pub(crate) fn plan_lower(&self, start: u64, end: u64, out: &mut Vec<Span>) {
        if self.lowers.is_empty() {
            return self.plan_base(start, end, out);
        }
        self.lower_map.for_each_piece(start, end - start, |(s, e, src)| match src {
            Some(Source::Layer { layer, file_offset }) => push(out, s, e, Origin::Lower { layer, file_offset }),
            Some(Source::Zero { layer }) => push(out, s, e, Origin::Zero { depth: layer + 1 }),
            None => self.plan_base(s, e, out),
        });
    }

    fn plan_base(&self, start: u64, end: u64, out: &mut Vec<Span>) {
        match &self.base {
            Some(b) if b.size() > start => {
                let m = end.min(b.size());
                push(out, start, m, Origin::Base);
                push(out, m, end, Origin::Unallocated);
            }
            _ => push(out, start, end, Origin::Unallocated),
        }
    }

    /// What block status reports for a span.
    pub(crate) fn kind_of(&self, from: Origin) -> ExtentKind {
        match from {
            Origin::Top { .. } => ExtentKind::Data { depth: 0 },
            Origin::Lower { layer, .. } => ExtentKind::Data { depth: 1 + layer as usize },
            Origin::Base => ExtentKind::Data { depth: 1 + self.lowers.len() },
            Origin::Zero { depth } => ExtentKind::Zero { depth: depth as usize },
            Origin::Unallocated => ExtentKind::Unallocated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_merge_only_where_the_same_file_continues() {
        let mut v = Vec::new();
        push(&mut v, 0, 4096, Origin::Top { file_offset: 65536 });
        push(&mut v, 4096, 8192, Origin::Top { file_offset: 65536 + 4096 });
        push(&mut v, 8192, 12288, Origin::Top { file_offset: 200_000 });
        push(&mut v, 12288, 16384, Origin::Base);
        push(&mut v, 16384, 20480, Origin::Base);
        push(&mut v, 20480, 24576, Origin::Zero { depth: 1 });
        push(&mut v, 24576, 28672, Origin::Zero { depth: 2 });
        push(&mut v, 28672, 28672, Origin::Unallocated);
        assert_eq!(
            v,
            vec![
                Span { start: 0, end: 8192, from: Origin::Top { file_offset: 65536 } },
                Span { start: 8192, end: 12288, from: Origin::Top { file_offset: 200_000 } },
                Span { start: 12288, end: 20480, from: Origin::Base },
                Span { start: 20480, end: 24576, from: Origin::Zero { depth: 1 } },
                Span { start: 24576, end: 28672, from: Origin::Zero { depth: 2 } },
            ]
        );
    }

    #[test]
    fn base_first_only_where_the_base_serves_most_of_the_range_in_pieces() {
        let span = |start, end, from| Span { start, end, from };
        let top = Origin::Top { file_offset: 1 << 20 };
        let scattered = [span(0, 40, Origin::Base), span(40, 50, top), span(50, 100, Origin::Base)];
        assert!(base_first(&scattered, 100));
        let mostly_top = [span(0, 10, Origin::Base), span(10, 90, top), span(90, 100, Origin::Base)];
        assert!(!base_first(&mostly_top, 100));
        assert!(!base_first(&[span(0, 100, Origin::Base)], 100), "one span is one transfer already");
    }

    #[test]
    fn part_of_a_span_advances_its_file_offset() {
        let s = Span { start: 1000, end: 9000, from: Origin::Lower { layer: 3, file_offset: 70_000 } };
        assert_eq!(
            s.part(1500, 2000),
            Span { start: 1500, end: 2000, from: Origin::Lower { layer: 3, file_offset: 70_500 } }
        );
        let b = Span { start: 0, end: 10, from: Origin::Base };
        assert_eq!(b.part(4, 6).from, Origin::Base);
    }
}
