//! `cowdisk diff OLD NEW`: the extents of NEW's device that may differ from OLD's, where OLD is
//! a layer below NEW in NEW's chain (a snapshot, or the raw base) and NEW a later snapshot or
//! the top. Decided from the maps alone (see `chain/layers.rs`); no data is read, so a block
//! rewritten with the bytes it held counts as changed.

use crate::chain::open::identity;
use crate::device::Change;
use crate::error::{err, Error, ErrorKind, Result};
use crate::{Chain, ChainOptions};
use std::path::Path;

/// Every extent of `new`'s device, in order, covering all of it, each saying whether it may
/// read differently from `old`'s device (adjacent extents that say the same merged). `new`'s
/// chain is opened for inspection: no locks, so `new` may be in use (a served top is seen as
/// its last flush left it).
pub fn diff(old: &Path, new: &Path) -> Result<Vec<Change>> {
    let ctx = |e: Error| e.during("diff");
    let chain = Chain::open(new, ChainOptions { inspect: true, ..Default::default() }).map_err(ctx)?;
    let old_id = identity(old).map_err(ctx)?;
    if old_id == identity(new).map_err(ctx)? {
        return Err(ctx(err(ErrorKind::InvalidArgument, "OLD and NEW are the same image").with_file(old)));
    }
    let Some(depth) = chain.depth_of_file(old).map_err(ctx)? else {
        return Err(ctx(not_below(old, new)));
    };
    chain.all_changes_since(depth).map_err(ctx)
}

/// Why `old` cannot be diffed against `new`: the two given the other way round, or unrelated.
fn not_below(old: &Path, new: &Path) -> Error {
    let reversed = Chain::open(old, ChainOptions { inspect: true, ..Default::default() })
        .and_then(|c| c.depth_of_file(new))
        .is_ok_and(|d| d.is_some());
    let msg = if reversed {
        format!(
            "is above {new} in its chain, not below it: give the older image first (cowdisk diff {new} {old})",
            new = new.display(),
            old = old.display()
        )
    } else {
        format!("is not in the chain of {} (see cowdisk info {})", new.display(), new.display())
    };
    err(ErrorKind::InvalidArgument, msg).with_file(old)
}
