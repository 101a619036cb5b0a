//! Space allocation inside one image file: chunk-sized clusters after the header area,
//! handed out as data slots or map extents, and the rule that freed space is reused only
//! once the map change that freed it is durable (spec §5.4).

use crate::error::{err, ErrorKind, Result};
use crate::format::header::MAX_FILE_SIZE;

/// What a referenced range of the file is used for; named in overlap errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    MapExtent,
    DataSlot {
        chunk: u64,
    },
    /// The redo journal's area (spec §5.9).
    Journal,
}

#[derive(Debug)]
pub struct Allocator {
    cluster: u64,
    start: u64,
    /// First offset never handed out: every byte at or past it reads as zero (sparse tail).
    end: u64,
    /// Free cluster ranges [start, end) below `end`, sorted, disjoint, coalesced.
    free: Vec<(u64, u64)>,
    /// Space [start, end) released by map changes not yet durable, or not yet punched: free
    /// only once a flush has made the change durable and punched it.
    pending: Vec<(u64, u64)>,
}

impl Allocator {
    /// An allocator for a new, empty image.
    pub fn empty(cluster: u64, start: u64) -> Allocator {
        Allocator { cluster, start, end: start, free: Vec::new(), pending: Vec::new() }
    }

    /// Rebuilds the free space of an existing image from everything its metadata references.
    /// Fails if two references overlap. `file_len` bounds the free ranges: space past the end of
    /// the file is not tracked, it is simply beyond `end`.
    pub fn rebuild(cluster: u64, start: u64, file_len: u64, mut used: Vec<(u64, u64, Use)>) -> Result<Allocator> {
        used.sort_unstable_by_key(|u| u.0);
        for w in used.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.0 + a.1 > b.0 {
                return Err(err(
                    ErrorKind::Corrupt,
                    format!("{} and {} overlap at offset {}", describe(a.2), describe(b.2), b.0),
                )
                .at(b.0));
            }
        }
        let file_end = file_len.min(MAX_FILE_SIZE).next_multiple_of(cluster).max(start);
        let used_end = used.last().map_or(start, |u| u.0 + u.1);
        let mut free = Vec::new();
        let mut pos = start;
        for (off, len, _) in &used {
            if *off > pos && pos < file_end {
                free.push((pos, (*off).min(file_end)));
            }
            pos = pos.max(off + len);
        }
        if pos < file_end {
            free.push((pos, file_end));
        }
        Ok(Allocator { cluster, start, end: file_end.max(used_end), free, pending: Vec::new() })
    }

    /// One cluster for a data slot: the lowest free one, else fresh space at the end.
    pub fn alloc_slot(&mut self) -> Result<u64> {
        if let Some(first) = self.free.first_mut() {
            let off = first.0;
            first.0 += self.cluster;
            if first.0 == first.1 {
                self.free.remove(0);
            }
            return Ok(off);
        }
        self.alloc_fresh(self.cluster)
    }

    /// `len` bytes that have never been written (past the end of everything), so they read as
    /// zero: what a new map extent needs, since stale bytes there would look like corrupt sectors.
    pub fn alloc_fresh(&mut self, len: u64) -> Result<u64> {
        let off = self.end;
        match off.checked_add(len) {
            Some(e) if e <= MAX_FILE_SIZE => {
                self.end = e;
                Ok(off)
            }
            _ => Err(err(ErrorKind::NoSpace, "image file would exceed the largest file size")),
        }
    }

    /// Queues a cluster to be freed once the map change that released it is durable.
    pub fn release_later(&mut self, off: u64) {
        self.pending.push((off, off + self.cluster));
    }

    /// Takes the queued releases; the caller punches them and passes them to
    /// [`Allocator::add_free`] after the map no longer referencing them has been synced.
    pub fn take_pending(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.pending)
    }

    /// Puts releases back in the queue: their map change failed to become durable, or their
    /// punch failed (space is free only once punched, since a clean image holds no data in
    /// free space, spec §5.5).
    pub fn requeue(&mut self, ranges: impl IntoIterator<Item = (u64, u64)>) {
        self.pending.extend(ranges);
    }

    /// Takes the free ranges out, so that none is handed out until [`Allocator::add_free`]
    /// gives them back (space still to be punched before reuse); new slots meanwhile come from
    /// fresh space at the end.
    pub fn take_free(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.free)
    }

    /// Makes ranges free: ones taken by [`Allocator::take_free`], or released ones, punched.
    pub fn add_free(&mut self, ranges: &[(u64, u64)]) {
        for &(s, e) in ranges {
            self.insert_free(s, e);
        }
    }

    fn insert_free(&mut self, s: u64, e: u64) {
        let i = self.free.partition_point(|r| r.1 < s);
        // Merge with neighbours that touch [s, e).
        let mut ns = s;
        let mut ne = e;
        let mut j = i;
        while j < self.free.len() && self.free[j].0 <= ne {
            ns = ns.min(self.free[j].0);
            ne = ne.max(self.free[j].1);
            j += 1;
        }
        self.free.splice(i..j, [(ns, ne)]);
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn free_ranges(&self) -> &[(u64, u64)] {
        &self.free
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|r| r.1 - r.0).sum()
    }
}

fn describe(u: Use) -> String {
    match u {
        Use::MapExtent => "a map extent".to_string(),
        Use::DataSlot { chunk } => format!("the data slot of chunk {chunk}"),
        Use::Journal => "the journal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 65536;

    #[test]
    fn fresh_image_allocates_consecutive_clusters() {
        let mut a = Allocator::empty(C, C);
        assert_eq!(a.alloc_slot().unwrap(), C);
        assert_eq!(a.alloc_slot().unwrap(), 2 * C);
        assert_eq!(a.alloc_fresh(2 * C).unwrap(), 3 * C);
        assert_eq!(a.end(), 5 * C);
    }

    #[test]
    fn rebuild_finds_holes_between_references_as_free() {
        let used = vec![(3 * C, C, Use::DataSlot { chunk: 0 }), (C, C, Use::MapExtent)];
        let mut a = Allocator::rebuild(C, C, 5 * C, used).unwrap();
        assert_eq!(a.free_ranges(), &[(2 * C, 3 * C), (4 * C, 5 * C)]);
        assert_eq!(a.alloc_slot().unwrap(), 2 * C);
        assert_eq!(a.alloc_slot().unwrap(), 4 * C);
        assert_eq!(a.alloc_slot().unwrap(), 5 * C);
    }

    #[test]
    fn rejects_two_entries_sharing_a_slot() {
        let used = vec![(2 * C, C, Use::DataSlot { chunk: 1 }), (2 * C, C, Use::DataSlot { chunk: 7 })];
        let e = Allocator::rebuild(C, C, 4 * C, used).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("chunk 1") && e.to_string().contains("chunk 7"));
    }

    #[test]
    fn rejects_data_slot_inside_a_map_extent() {
        let used = vec![(C, 2 * C, Use::MapExtent), (2 * C, C, Use::DataSlot { chunk: 3 })];
        assert_eq!(Allocator::rebuild(C, C, 4 * C, used).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn released_space_is_reused_only_after_add_free() {
        let mut a = Allocator::empty(C, C);
        let s = a.alloc_slot().unwrap();
        a.release_later(s);
        assert_ne!(a.alloc_slot().unwrap(), s);
        let p = a.take_pending();
        a.add_free(&p);
        assert_eq!(a.alloc_slot().unwrap(), s);
    }

    #[test]
    fn freed_neighbours_coalesce() {
        let mut a = Allocator::empty(C, C);
        for _ in 0..4 {
            a.alloc_slot().unwrap();
        }
        a.add_free(&[(3 * C, 4 * C), (C, 2 * C), (2 * C, 3 * C)]);
        assert_eq!(a.free_ranges(), &[(C, 4 * C)]);
    }

    #[test]
    fn huge_sparse_file_costs_one_free_range() {
        let a = Allocator::rebuild(C, C, 1 << 50, vec![]).unwrap();
        assert_eq!(a.free_ranges().len(), 1);
    }
}
