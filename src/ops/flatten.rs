//! Flatten: make an image independent of its parents, in place or as a new standalone file
//! (cowdisk or raw), keeping zero and unallocated ranges sparse (spec §5.7.2).

use super::{all_extents, Progress};
use crate::chain::DeviceRange;
use crate::device::{push_extent, DiskFlush, DiskRead, DiskWrite, Extent, ExtentKind};
use crate::error::{err, ErrorKind, Result};
use crate::format::Geometry;
use crate::layer::{new_uuid, Image};
use crate::storage::namespace::{publish_new, temp_name, Namespace, RealFs};
use crate::{Chain, ChainOptions};
use std::path::Path;

/// The byte ranges whose extents satisfy `keep`, with neighbours merged whatever layer serves
/// them: a copy then moves a few large pieces instead of one per layer boundary.
fn ranges(chain: &Chain, keep: impl Fn(ExtentKind) -> bool) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    for e in all_extents(chain)?.into_iter().filter(|e| keep(e.kind)) {
        push_extent(&mut out, e, |_, _| true);
    }
    Ok(out)
}

/// Bytes written between progress reports when flattening into a cowdisk image.
const PROGRESS_STEP: u64 = 64 << 20;

/// Writes extent `e` of `src`'s device into `dst` at the same offset, through `dst`'s write
/// path (whole chunks copied file to file where `src`'s layers allow), reporting bytes done.
pub(crate) fn copy_device(src: &Chain, dst: &Chain, e: &Extent, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let end = e.offset + e.length;
    let mut pos = e.offset;
    while pos < end {
        let n = (end - pos).min(PROGRESS_STEP);
        dst.write_from(&mut DeviceRange::new(src, pos, n), pos, n)?;
        pos += n;
        progress(n);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Cowdisk,
    Raw,
}

/// Copies into the top every block it reads from a parent, then drops the parent reference.
/// A crash before the final header write leaves the chain as it was (the top merely holds
/// copies of what its parents hold); after it, the top stands alone.
pub fn flatten_in_place(image: &Path, progress: Progress) -> Result<()> {
    let chain = Chain::open(image, ChainOptions { writable: true, ..Default::default() })?;
    flatten_chain(&chain, progress)?;
    chain.close()
}

/// The storage-level steps of [`flatten_in_place`] on an open, writable chain. Afterwards the
/// top has no parent reference; `chain` itself still holds its (now unused) lower layers.
pub fn flatten_chain(chain: &Chain, progress: Progress) -> Result<()> {
    if chain.depth() == 1 {
        return Ok(());
    }
    let below: Vec<_> = ranges(chain, |k| matches!(k, ExtentKind::Data { depth } if depth > 0))?;
    let total: u64 = below.iter().map(|e| e.length).sum();
    let mut done = 0;
    for e in below {
        // The ranges come from the layers below, which a write into the top never changes:
        // the chain can be the source of its own writes.
        copy_device(chain, chain, &e, &mut |n| {
            done += n;
            progress(done, total);
        })?;
    }
    chain.flush()?;
    chain.top().update_header(|h| h.parent = None)
}

/// Writes the merged contents of `image`'s chain to a new file `out` (which must not exist).
/// The file appears under its name only when complete.
pub fn flatten_to(image: &Path, out: &Path, format: OutputFormat, progress: Progress) -> Result<()> {
    if out.symlink_metadata().is_ok() {
        return Err(err(ErrorKind::InvalidArgument, "already exists").with_file(out).during("flatten"));
    }
    let chain = Chain::open(image, ChainOptions::default())?;
    flatten_chain_to(&RealFs, &chain, out, format, progress)
}

/// The steps of [`flatten_to`] on an open chain, with the new file made and named through
/// `ns`: built and synced under a temporary name, then renamed to `out` without replacing
/// anything, so `out` either does not exist or is complete (spec §5.7.2).
pub fn flatten_chain_to(
    ns: &dyn Namespace,
    chain: &Chain,
    out: &Path,
    format: OutputFormat,
    progress: Progress,
) -> Result<()> {
    let data = ranges(chain, |k| !k.reads_zero())?;
    let total: u64 = data.iter().map(|e| e.length).sum();
    let tmp = temp_name(out, "flatten");
    let file = ns.create(&tmp).map_err(|e| e.during("flatten"))?;
    let result = (|| -> Result<()> {
        let mut done = 0;
        match format {
            OutputFormat::Raw => {
                let mut buf = Vec::new();
                file.set_len(chain.size()).map_err(|e| e.with_file(&tmp))?;
                for e in &data {
                    chain.copy_to(e.offset, e.length, file.as_ref(), e.offset, &mut buf, |n| {
                        done += n;
                        progress(done, total);
                    })?;
                }
                file.sync().map_err(|e| e.with_file(&tmp))
            }
            OutputFormat::Cowdisk => {
                let tg = chain.top().geometry();
                let g = Geometry::new(chain.size(), tg.chunk_shift)?
                    .with_data_checksums(tg.data_checksums)?
                    .with_log(tg.log)?;
                let img = Image::create_on(file.clone(), &tmp, g, None, new_uuid()?)?;
                let dst = Chain::assemble(img, Vec::new(), None);
                for e in &data {
                    copy_device(chain, &dst, e, &mut |n| {
                        done += n;
                        progress(done, total);
                    })?;
                }
                dst.close()
            }
        }
    })()
    .and_then(|()| publish_new(ns, &tmp, out));
    if result.is_err() {
        ns.remove(&tmp);
    }
    // Locked until it has its final name (see `namespace`).
    drop(file);
    result.map_err(|e| e.during("flatten"))
}
