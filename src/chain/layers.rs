//! What a chain tells about its layers: their names, and which extents of the device may have
//! changed since one of them was the top (changed-block tracking, for `cowdisk diff` and the
//! NBD server's dirty bitmaps). All of it comes from the maps: no data is read.
//!
//! The rule (spec §6): a layer records each block as Data, Zero or Absent, and an Absent block
//! reads as the layer below shows it. So a block that every layer above an earlier layer L
//! leaves Absent reads now exactly as it read when L was the top, and a block some layer above
//! L records (as data or as zeros) may read differently. The read plan already names, for each
//! extent, the topmost layer that records it (its depth in [`ExtentKind`]): the extent changed
//! since L exactly when that depth is less than L's. Two more cases make a layer above L hide
//! L without recording blocks, and the plan covers both as records of that layer: the range
//! past the end of a lower layer that is shorter than the device reads as zeros through it
//! (`extents.rs`). And bytes past L's own end did not exist when L was the top: they count as
//! changed.

use super::open::identity;
use super::Chain;
use crate::device::{push_change, Change, DiskExtents, DiskLayers, DiskRead, ExtentKind, LayerId};
use crate::error::{err, ErrorKind, Result};
use std::path::Path;

impl Chain {
    /// The layers below the top, nearest first, as (depth, path, virtual size): the frozen
    /// cowdisk layers, then the raw base.
    fn below_top(&self) -> impl Iterator<Item = (usize, &Path, u64)> {
        self.below_top_ids().map(|(depth, p, size, _)| (depth, p, size))
    }

    /// [`Chain::below_top`] with each layer's identity.
    fn below_top_ids(&self) -> impl Iterator<Item = (usize, &Path, u64, LayerId)> {
        let lowers = self.lowers.iter().map(|l| (l.path(), l.geometry().virtual_size, LayerId::Layer(l.uuid())));
        let base = self.base.iter().map(|b| (b.path(), b.size(), LayerId::Base));
        lowers.chain(base).enumerate().map(|(i, (p, size, id))| (i + 1, p, size, id))
    }

    /// The depth of the one layer below the top that is `id`: `None` if none is, or several
    /// are (copies of one file, sharing its uuid: answering for one could let a backup skip
    /// what changed since the other).
    fn depth_of_id(&self, id: LayerId) -> Option<usize> {
        let mut found = self.below_top_ids().filter(|l| l.3 == id);
        match (found.next(), found.next()) {
            (Some((depth, ..)), None) => Some(depth),
            _ => None,
        }
    }

    /// The depth (1 = directly under the top) of the layer below the top that is the file at
    /// `path` (the same file, however its path is spelled), if there is one.
    pub fn depth_of_file(&self, path: &Path) -> Result<Option<usize>> {
        let want = identity(path)?;
        for (depth, p, _) in self.below_top() {
            if identity(p)? == want {
                return Ok(Some(depth));
            }
        }
        Ok(None)
    }

    /// Each layer below the top with its name and identity, nearest first: the name is the
    /// last component of the path the layer above it records (a snapshot names its frozen
    /// layer by file name alone), if that is UTF-8.
    fn named_layers(&self) -> Vec<(&str, LayerId)> {
        self.below_top_ids().filter_map(|(_, p, _, id)| Some((p.file_name()?.to_str()?, id))).collect()
    }

    /// Describes a prefix of [offset, offset+len) (at most `max_extents` changes) by whether
    /// it may read differently now from the way it read when the layer at `depth` (1 =
    /// directly under the top, up to the raw base) was the top.
    pub fn changes_since(&self, depth: usize, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Change>> {
        let Some((_, _, layer_size)) = self.below_top().find(|(d, _, _)| *d == depth) else {
            return Err(err(ErrorKind::InvalidArgument, format!("no layer at depth {depth} below the top")));
        };
        let max = max_extents.max(1);
        let mut out = Vec::new();
        for e in self.extents(offset, len, max)? {
            let recorded_above = match e.kind {
                ExtentKind::Data { depth: d } | ExtentKind::Zero { depth: d } => d < depth,
                ExtentKind::Unallocated => false,
            };
            let split = layer_size.clamp(e.offset, e.end());
            push_change(&mut out, Change { offset: e.offset, length: split - e.offset, changed: recorded_above });
            push_change(&mut out, Change { offset: split, length: e.end() - split, changed: true });
        }
        // Splitting at the layer's end may have added one: a reply may describe a prefix.
        out.truncate(max);
        Ok(out)
    }

    /// Every change since the layer at `depth`, covering the whole device, in order.
    pub fn all_changes_since(&self, depth: usize) -> Result<Vec<Change>> {
        let size = self.size();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < size {
            let part = self.changes_since(depth, pos, size - pos, 1 << 16)?;
            let Some(last) = part.last() else { break };
            pos = last.end();
            for c in part {
                push_change(&mut out, c);
            }
        }
        Ok(out)
    }
}

impl DiskLayers for Chain {
    /// A commit's intermediate layer is left out: it is the commit's own, no snapshot anyone
    /// took, and gone when the commit ends (a client that selected it would be told from then
    /// on that everything changed).
    fn snapshots(&self) -> Vec<(String, LayerId)> {
        let named = self.named_layers();
        let unique = |name: &str| named.iter().filter(|(n, _)| *n == name).count() == 1;
        let offered = |name: &str| unique(name) && !crate::ops::commit::is_commit_layer(Path::new(name));
        named.iter().filter(|(n, _)| offered(n)).map(|(n, id)| (n.to_string(), *id)).collect()
    }

    fn changed_since(&self, id: LayerId, offset: u64, len: u64, max_extents: usize) -> Result<Option<Vec<Change>>> {
        match self.depth_of_id(id) {
            Some(depth) => self.changes_since(depth, offset, len, max_extents).map(Some),
            None => Ok(None),
        }
    }
}
