//! Whole-image operations behind the CLI: snapshot, flatten, commit, check, diff and the facts
//! `info` and `map` print. Each is crash-safe as spec §5.7 describes.

pub mod check;
pub mod commit;
pub mod diff;
pub mod flatten;
pub mod info;
pub mod snapshot;

use crate::device::{extents_of, DiskRead, Extent};
use crate::error::Result;
use crate::Chain;

/// Reports progress as (bytes done, bytes in all).
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// Every extent of the merged device, in order, describing the whole of it.
pub fn all_extents(chain: &Chain) -> Result<Vec<Extent>> {
    extents_of(chain, 0, chain.size())
}
