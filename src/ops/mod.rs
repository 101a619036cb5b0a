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

/// Bytes moved per read/write when copying data between layers or files.
pub const COPY_UNIT: u64 = 256 << 10;

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

/// Copies [offset, offset+len) of `chain` to `sink` in [`COPY_UNIT`] pieces.
pub(crate) fn copy_range(
    chain: &Chain,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
    mut sink: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(COPY_UNIT) as usize;
        buf.resize(n, 0);
        chain.read_at(&mut buf[..n], pos)?;
        sink(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
