//! Whole-image operations behind the CLI: snapshot, flatten, commit, check and the facts
//! `info` and `map` print. Each is crash-safe as spec §5.7 describes.

pub mod check;
pub mod commit;
pub mod flatten;
pub mod info;
pub mod snapshot;

use crate::device::{DiskExtents, DiskRead, Extent};
use crate::error::Result;
use crate::Chain;

/// Reports progress as (bytes done, bytes in all).
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// Every extent of the merged device, in order, describing the whole of it.
pub fn all_extents(chain: &Chain) -> Result<Vec<Extent>> {
    let size = chain.size();
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let part = chain.extents(pos, size - pos, 1 << 16)?;
        let Some(last) = part.last() else { break };
        pos = last.offset + last.length;
        for e in part {
            match out.last_mut() {
                Some(l) if l.kind == e.kind && l.offset + l.length == e.offset => l.length += e.length,
                _ => out.push(e),
            }
        }
    }
    Ok(out)
}
