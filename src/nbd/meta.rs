//! Metadata contexts, as qemu-nbd offers them (qemu's docs/interop/nbd.rst): which contexts an
//! export offers, which ones a client's NBD_OPT_{LIST,SET}_META_CONTEXT queries name, and the
//! block status descriptors of each selected context for a range. Depends on the disk only
//! through the traits in `device.rs`.
//!
//! - `base:allocation` (NBD spec): flags HOLE and ZERO where the range reads as zeros without
//!   data (a whiteout, or nothing allocated); 0 for data.
//! - `qemu:allocation-depth`: the whole 32-bit value is the depth of the layer that decides
//!   what the range reads as: 0 none (unallocated), 1 the top, 2 and up the layers below
//!   ([`ExtentKind::allocation_depth`]).
//! - `qemu:dirty-bitmap:NAME`, NAME a layer below the top ([`DiskLayers::snapshots`]): flag
//!   [`STATE_DIRTY`] where the range may have changed since that layer was the top. The
//!   context is bound to the layer NAME meant when the client selected it (its [`LayerId`]),
//!   not to the name: a layer made later under that name is another layer.

use super::proto::{BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use crate::device::{Disk, DiskLayers, Extent, LayerId};
use crate::error::{err, ErrorKind, Result};

pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// The one flag of a `qemu:dirty-bitmap:` context: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// One metadata context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Context {
    BaseAllocation,
    AllocationDepth,
    /// Changed since this layer, by the name it had when offered.
    DirtyBitmap(String, LayerId),
}

impl Context {
    /// Its name on the wire.
    pub fn name(&self) -> String {
        match self {
            Context::BaseAllocation => BASE_ALLOCATION.to_string(),
            Context::AllocationDepth => ALLOCATION_DEPTH.to_string(),
            Context::DirtyBitmap(n, _) => format!("{DIRTY_BITMAP_PREFIX}{n}"),
        }
    }
}

/// Which contexts the server offers besides `base:allocation`. Both tell every client about
/// the server's chain (how many layers it has; the file names of the layers below the top),
/// which a server otherwise keeps to itself, so, as with qemu-nbd's `--allocation-depth` and
/// `--bitmap`, they are offered only when the operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offer {
    pub allocation_depth: bool,
    pub dirty_bitmaps: bool,
}

/// A context a client selected and the id its block status chunks carry.
pub type Selected = (u32, Context);

/// One block status chunk: the context id and its (length, flags) descriptors.
pub type StatusChunk = (u32, Vec<(u64, u32)>);

/// Every context offered for `disk`, in the order a listing reports them.
pub fn offered(disk: &dyn Disk, offer: Offer) -> Vec<Context> {
    let mut out = vec![Context::BaseAllocation];
    if offer.allocation_depth {
        out.push(Context::AllocationDepth);
    }
    if offer.dirty_bitmaps {
        let layers = disk.layers().map(DiskLayers::snapshots).unwrap_or_default();
        out.extend(layers.into_iter().map(|(name, id)| Context::DirtyBitmap(name, id)));
    }
    out
}

/// The contexts among `offered` that `queries` name, each once, in the order first named
/// (a dirty bitmap with the layer its name means now, which it stays bound to).
/// With `list` (NBD_OPT_LIST_META_CONTEXT) no query at all names every context, and a query
/// that ends where a name's last part would begin (`base:`, `qemu:`, `qemu:dirty-bitmap:`)
/// names every context under it; NBD_OPT_SET_META_CONTEXT selects by whole name only, as
/// qemu-nbd does. A query for something not offered names nothing.
pub fn select(queries: &[&str], list: bool, offered: &[Context]) -> Vec<Context> {
    if list && queries.is_empty() {
        return offered.to_vec();
    }
    let mut out: Vec<Context> = Vec::new();
    for q in queries {
        for c in offered {
            let name = c.name();
            let under = |prefix: &str| *q == prefix && name.starts_with(prefix);
            let named = name == *q || (list && (under("base:") || under("qemu:") || under(DIRTY_BITMAP_PREFIX)));
            if named && !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// One block status chunk per selected context, in the order selected: its id and descriptors
/// (length, flags) describing a prefix of [offset, offset+len) in at most `max` descriptors.
pub fn block_status(
    disk: &dyn Disk,
    selected: &[Selected],
    offset: u64,
    len: u64,
    max: usize,
) -> Result<Vec<StatusChunk>> {
    let max = max.max(1);
    // One look at the extents serves base:allocation and allocation-depth alike, so the two
    // describe the same moment.
    let mut extents: Option<Vec<Extent>> = None;
    let mut out = Vec::with_capacity(selected.len());
    for (id, ctx) in selected {
        let runs: Vec<(u64, u32)> = match ctx {
            Context::BaseAllocation | Context::AllocationDepth => {
                let ext = match &extents {
                    Some(e) => e,
                    None => extents.insert(disk.extents(offset, len, max)?),
                };
                let flags = |e: &Extent| match ctx {
                    Context::BaseAllocation if e.kind.reads_zero() => STATE_HOLE | STATE_ZERO,
                    Context::BaseAllocation => 0,
                    _ => e.kind.allocation_depth(),
                };
                ext.iter().map(|e| (e.length, flags(e))).collect()
            }
            Context::DirtyBitmap(_, layer) => {
                let Some(layers) = disk.layers() else {
                    return Err(err(ErrorKind::InvalidArgument, "this export has no layers to compare with"));
                };
                match layers.changed_since(*layer, offset, len, max)? {
                    Some(changes) => {
                        changes.iter().map(|c| (c.length, if c.changed { STATE_DIRTY } else { 0 })).collect()
                    }
                    // The layer was merged away (flatten, compact) since the client selected
                    // it: what changed since it can no longer be told, so all of it may have.
                    // Dirty is the answer that never makes a backup miss a change, and the
                    // spec's "a single block status descriptor with length matching the
                    // requested length" for a context that cannot answer; an error would also
                    // take the other contexts of the request with it.
                    None => vec![(len, STATE_DIRTY)],
                }
            }
        };
        out.push((*id, descriptors(runs, max)));
    }
    Ok(out)
}

/// At most `max` runs as descriptors, neighbours with the same flags merged. Every run lies
/// inside one request, so the sums do not overflow.
fn descriptors(runs: Vec<(u64, u32)>, max: usize) -> Vec<(u64, u32)> {
    let mut desc: Vec<(u64, u32)> = Vec::with_capacity(runs.len().min(max));
    for (length, flags) in runs.into_iter().take(max) {
        match desc.last_mut() {
            Some(last) if last.1 == flags => last.0 += length,
            _ => desc.push((length, flags)),
        }
    }
    desc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered_with(bitmaps: &[&str]) -> Vec<Context> {
        let mut v = vec![Context::BaseAllocation, Context::AllocationDepth];
        v.extend(
            bitmaps.iter().enumerate().map(|(i, b)| Context::DirtyBitmap(b.to_string(), LayerId::Layer([i as u8; 16]))),
        );
        v
    }

    fn names(v: &[Context]) -> Vec<String> {
        v.iter().map(Context::name).collect()
    }

    #[test]
    fn list_without_queries_names_everything_set_without_queries_nothing() {
        let o = offered_with(&["s1.cow"]);
        assert_eq!(
            names(&select(&[], true, &o)),
            ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:s1.cow"]
        );
        assert!(select(&[], false, &o).is_empty());
    }

    #[test]
    fn namespace_queries_list_but_never_select() {
        let o = offered_with(&["a.cow", "b.cow"]);
        assert_eq!(
            names(&select(&["qemu:"], true, &o)),
            [ALLOCATION_DEPTH, "qemu:dirty-bitmap:a.cow", "qemu:dirty-bitmap:b.cow"]
        );
        assert_eq!(
            names(&select(&["qemu:dirty-bitmap:"], true, &o)),
            ["qemu:dirty-bitmap:a.cow", "qemu:dirty-bitmap:b.cow"]
        );
        assert_eq!(names(&select(&["base:"], true, &o)), [BASE_ALLOCATION]);
        for q in ["qemu:", "qemu:dirty-bitmap:", "base:"] {
            assert!(select(&[q], false, &o).is_empty(), "SET {q}");
        }
    }

    #[test]
    fn set_selects_whole_names_once_in_the_order_asked_and_ignores_unknown_ones() {
        let o = offered_with(&["s1.cow"]);
        let q = [
            "qemu:dirty-bitmap:s1.cow",
            "qemu:dirty-bitmap:nosuch",
            BASE_ALLOCATION,
            "qemu:dirty-bitmap:s1.cow",
            "qemu:dirty-bitmap:s1",
        ];
        assert_eq!(names(&select(&q, false, &o)), ["qemu:dirty-bitmap:s1.cow", BASE_ALLOCATION]);
        assert_eq!(names(&select(&["qemu:allocation-depthx", "qemu:allocation-depth"], false, &o)), [ALLOCATION_DEPTH]);
    }

    #[test]
    fn descriptors_merge_equal_flags_after_taking_at_most_max_runs() {
        let runs = vec![(4096, 0), (4096, 0), (8192, 3), (4096, 0)];
        assert_eq!(descriptors(runs.clone(), 10), [(8192, 0), (8192, 3), (4096, 0)]);
        assert_eq!(descriptors(runs, 1), [(4096, 0)]);
    }
}
