//! Commit: merge an overlay's own blocks down into its cowdisk parent, then leave the overlay
//! empty. The parent changes in one step (a whole-map rewrite switched in by one header
//! write, spec §5.7.3); until the overlay is emptied it still shows the same disk.

use super::Progress;
use crate::chain::resolve_parent_path;
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::header::{ParentFormat, ParentRef};
use crate::format::map::MapEntry;
use crate::format::BLOCK_SIZE;
use crate::layer::{format_uuid, read_header_only, Image, OpenOptions, PreparedMap};
use crate::storage::namespace::{behind_link, publish_replacing, remove_left_behind, temp_name, Namespace, RealFs};
use crate::storage::LockMode;
use std::collections::BTreeMap;
use std::path::Path;

/// What one parent block becomes: the top's data (block `.1` of top chunk `.0`) or zero.
#[derive(Clone, Copy)]
enum Update {
    Data(u64, usize),
    Zero,
}

/// Where a block of a rebuilt parent chunk comes from.
#[derive(Clone, Copy)]
enum Src {
    Parent(usize),
    Top(u64, usize),
    /// The block the top's end falls inside: its first `keep` bytes from the top (its data,
    /// or zeros), the rest from the parent's own block (its data, or zeros).
    Tail {
        top: Option<(u64, usize)>,
        parent: Option<usize>,
        keep: usize,
    },
}

/// The parent a commit of `image` writes into, from its header alone (no lock: the image may
/// be served): refused if there is none, if it is raw, or without `force` (other overlays
/// built on it would see their disk change).
pub fn commit_target(image: &Path, force: bool) -> Result<(ParentRef, std::path::PathBuf)> {
    let refuse = |kind, msg: String| Err(err(kind, msg).with_file(image).during("commit"));
    let Some(pref) = read_header_only(image)?.parent else {
        return refuse(ErrorKind::InvalidArgument, "has no parent to commit into".into());
    };
    if pref.format == ParentFormat::Raw {
        return refuse(ErrorKind::InvalidArgument, "its parent is a raw file; commit writes only into a cowdisk layer (flatten makes a standalone copy instead)".into());
    }
    if pref.format == ParentFormat::Remote {
        return refuse(
            ErrorKind::InvalidArgument,
            "its parent is a layer in a repository, which is never written (flatten makes a standalone copy instead)"
                .into(),
        );
    }
    let ppath = resolve_parent_path(image, &pref);
    if !force {
        return refuse(
            ErrorKind::InvalidArgument,
            format!(
                "{} is a frozen layer: other overlays built on it would see their disk change underneath them; pass --force if this image is its only user",
                ppath.display()
            ),
        );
    }
    Ok((pref, ppath))
}

/// Whether `path` names the intermediate layer a live commit freezes its top into
/// (`IMAGE.commit-XXXXXXXX`).
pub fn is_commit_layer(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let name = path.file_name().map(std::ffi::OsStr::as_bytes).unwrap_or_default();
    let Some(at) = name.windows(8).rposition(|w| w == b".commit-") else { return false };
    let hex = &name[at + 8..];
    at > 0 && hex.len() == 8 && hex.iter().all(u8::is_ascii_hexdigit)
}

/// Refuses `path` as the name of a layer the user makes (a snapshot, a compaction's merged
/// layer) when it is named like a commit's intermediate layer: the next commit of the image
/// on it would take it for one, merge it into its parent and delete it.
pub fn refuse_commit_layer_name(path: &Path) -> Result<()> {
    if is_commit_layer(path) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "names ending in .commit- and eight hex digits are kept for the intermediate layer of a live commit \
             (the next commit would merge such a layer into its parent and delete it); choose another name",
        )
        .with_file(path));
    }
    Ok(())
}

/// Whether `image`'s parent is the intermediate layer of a live commit that stopped half-way
/// (the next commit finishes it: see `cowdisk::live::jobs`).
pub fn interrupted(image: &Path) -> Result<bool> {
    Ok(read_header_only(image)?.parent.is_some_and(|p| is_commit_layer(&resolve_parent_path(image, &p))))
}

pub fn commit(image: &Path, force: bool, progress: Progress) -> Result<()> {
    let (pref, ppath) = commit_target(image, force)?;
    // The refusals first, from opens that write nothing: a writable open writes a header (the
    // dirty flag), so a commit refused after it had changed both files. (What these opens
    // cannot read is left to the writable opens below to report.)
    if let (Ok(t), Ok(p)) = (Image::open(image, OpenOptions::inspect()), Image::open(&ppath, OpenOptions::inspect())) {
        check_committable(&t, &p).map_err(|e| e.with_file(image).during("commit"))?;
    }
    let top = Image::open(image, OpenOptions::writable())?;
    let refuse = |kind, msg: String| Err(err(kind, msg).with_file(image).during("commit"));
    if top.parent().as_ref() != Some(&pref) {
        return refuse(ErrorKind::ParentChanged, "changed while the commit began".into());
    }
    let parent = Image::open(
        &ppath,
        OpenOptions { write: true, lock: LockMode::Exclusive, allow_frozen: true, allow_corrupt: false },
    )?;
    if parent.uuid() != pref.uuid || parent.geometry().virtual_size != pref.size {
        return refuse(
            ErrorKind::ParentChanged,
            format!(
                "parent {} changed: has UUID {}, the overlay was made on {}",
                ppath.display(),
                format_uuid(&parent.uuid()),
                format_uuid(&pref.uuid)
            ),
        );
    }
    commit_into(&top, &parent, progress).map_err(|e| e.with_file(image).during("commit"))?;
    parent.close()?;
    drop(parent);
    empty_top_in(&RealFs, &top, pref)
}

/// The last step of a commit (C6 of spec §5.7.3): `top`, whose blocks its parent now holds,
/// is replaced by an empty overlay with the same parent reference, made and named through
/// `ns`. `top` stays open (and locked) until the new file has its name, so nobody writes to
/// the old file meanwhile: such writes would vanish with it. When `top` was opened through a
/// symbolic link, the new overlay replaces the link (as a snapshot's does: format-spec §3.3
/// finds relative parents from the name an image is opened by), and the file the link led to
/// is removed after it, as the rename removes the old file otherwise. (A crash between the
/// two leaves that file behind: the image reads the same, it only takes space.)
pub fn empty_top_in(ns: &dyn Namespace, top: &Image, pref: ParentRef) -> Result<()> {
    let image = top.path();
    let behind = behind_link(ns, image, top.storage().as_ref());
    top.close()?;
    let tmp = temp_name(image, "commit");
    let fresh = ns.create(&tmp).map_err(|e| e.during("commit"))?;
    ns.copy_owner_and_mode(image, &tmp);
    let done = Image::create_closed_on(fresh.as_ref(), &tmp, top.geometry(), Some(pref))
        .and_then(|()| publish_replacing(ns, &tmp, image));
    if done.is_err() {
        ns.remove(&tmp);
    }
    drop(fresh);
    done.and_then(|()| remove_left_behind(ns, behind)).map_err(|e| e.during("commit"))
}

/// The storage-level steps of [`commit`] (C2 to C5 of spec §5.7.3): `top`'s Data and Zero
/// blocks go into `parent` (open for writing), which switches to its new map in one header
/// write. `top` is not changed.
pub fn commit_into(top: &Image, parent: &Image, progress: Progress) -> Result<()> {
    let prepared = commit_prepare(top, parent, progress, &|| false)?;
    parent.switch_map(prepared)
}

/// C2 and C3 of [`commit_into`]: every block `top` holds, copied into fresh slots of `parent`
/// (open for writing), and `parent`'s new map written and made durable, not yet in force
/// (the switch is [`Image::switch_map`]). Readers of `parent` see its old map meanwhile.
/// `stop` is asked between chunks: when it says so, the commit stops with an error and
/// `parent` is unchanged (the slots copied into are punched and free again; after a crash,
/// unreferenced space its next writable open reclaims).
pub fn commit_prepare(top: &Image, parent: &Image, progress: Progress, stop: &dyn Fn() -> bool) -> Result<PreparedMap> {
    check_committable(top, parent)?;
    let (tg, pg) = (top.geometry(), parent.geometry());

    // The top's data and zero blocks, regrouped by the parent's chunks (sizes may differ).
    let mut updates: BTreeMap<u64, Vec<(usize, usize, Update)>> = BTreeMap::new();
    for (chunk, e) in top.entries() {
        let cbase = chunk << tg.chunk_shift;
        for (s, t, st) in e.blocks.runs(0, tg.blocks_per_chunk()) {
            if st == BlockState::Absent {
                continue;
            }
            let (vs, ve) = (cbase + s as u64 * BLOCK_SIZE, cbase + t as u64 * BLOCK_SIZE);
            let mut v = vs;
            while v < ve {
                let pc = v >> pg.chunk_shift;
                let pbase = pc << pg.chunk_shift;
                let pend = (pbase + pg.chunk_size()).min(ve);
                let upd = match st {
                    BlockState::Data => Update::Data(chunk, ((v - cbase) / BLOCK_SIZE) as usize),
                    _ => Update::Zero,
                };
                let (b0, b1) = (((v - pbase) / BLOCK_SIZE) as usize, (pend - pbase).div_ceil(BLOCK_SIZE) as usize);
                updates.entry(pc).or_default().push((b0, b1, upd));
                v = pend;
            }
        }
    }

    // The parent block a smaller top ends inside, if the top changes it (see [`Tail::of`]).
    let tail = Tail::of(top, parent);
    // Slots taken so far: given back if the commit stops before its map is prepared, so that
    // a cancelled or failed commit leaves no unreferenced space behind in the parent.
    let mut taken: Vec<u64> = Vec::new();
    let built = copy_down(top, parent, updates, tail, progress, stop, &mut taken).and_then(|e| parent.prepare_map(e));
    if built.is_err() && !taken.is_empty() {
        // The error that stopped the commit is the one to report; a failed release leaves
        // the space to the next writable open's reclaim, as before.
        let _ = parent.release_detached_slots(&taken);
    }
    built
}

/// Why `top` cannot be committed into `parent`, if it cannot; asked before anything is
/// written (a live commit asks before it freezes the top, so a refusal leaves no layer
/// behind). A top larger than its parent would grow it. Where a smaller top ends inside a
/// parent block ([`Tail`]) that the parent does not hold itself, what the parent shows after
/// the top's end comes from the layers below it, which a commit does not read.
pub fn check_committable(top: &Image, parent: &Image) -> Result<()> {
    let (tg, pg) = (top.geometry(), parent.geometry());
    if tg.virtual_size > pg.virtual_size {
        return Err(err(ErrorKind::InvalidArgument, "is larger than its parent; commit cannot grow the parent"));
    }
    match Tail::of(top, parent) {
        Some(t) if !holds(parent, t.chunk, t.block) && parent.parent().is_some() => Err(err(
            ErrorKind::Unsupported,
            format!(
                "ends {} bytes into a block its parent does not hold (the parent's parent does): \
                 committing it would need the layers below the parent; nothing changed",
                t.keep
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether `img` itself holds block `block` of chunk `chunk` (data or zeros).
fn holds(img: &Image, chunk: u64, block: usize) -> bool {
    img.with_entry(chunk, |e| e.is_some_and(|e| e.blocks.get(block) != BlockState::Absent))
}

/// The block of the parent in which a smaller top ends (see [`commit_prepare`]).
#[derive(Clone, Copy)]
struct Tail {
    chunk: u64,
    block: usize,
    keep: usize,
}

impl Tail {
    /// A top smaller than its parent whose size is not a whole number of blocks ends inside a
    /// parent block. The top shows only that block's first `keep` bytes (the rest of its slot
    /// reads as zeros, the layers below being cut off at the top's size), and the parent's
    /// bytes after them are not the top's to change: they stay what the parent shows. `None`
    /// unless the top ends so and holds that block itself: only a block the top changes
    /// matters.
    fn of(top: &Image, parent: &Image) -> Option<Tail> {
        let (tg, pg) = (top.geometry(), parent.geometry());
        if tg.virtual_size % BLOCK_SIZE == 0 || tg.virtual_size >= pg.virtual_size {
            return None;
        }
        let off = tg.virtual_size / BLOCK_SIZE * BLOCK_SIZE;
        let at = |shift: u32| {
            let chunk = off >> shift;
            (chunk, ((off - (chunk << shift)) / BLOCK_SIZE) as usize)
        };
        let (tc, tb) = at(tg.chunk_shift);
        let (chunk, block) = at(pg.chunk_shift);
        holds(top, tc, tb).then_some(Tail { chunk, block, keep: (tg.virtual_size % BLOCK_SIZE) as usize })
    }
}

/// C2 of [`commit_prepare`]: each parent chunk in `updates` rebuilt in a fresh slot (pushed
/// to `taken`); returns the parent's whole new map.
fn copy_down(
    top: &Image,
    parent: &Image,
    updates: BTreeMap<u64, Vec<(usize, usize, Update)>>,
    tail: Option<Tail>,
    progress: Progress,
    stop: &dyn Fn() -> bool,
    taken: &mut Vec<u64>,
) -> Result<Vec<MapEntry>> {
    let pg = parent.geometry();
    let total = updates.len() as u64;
    let mut entries: Vec<MapEntry> = parent
        .entries()
        .into_iter()
        .filter(|(c, _)| !updates.contains_key(c))
        .map(|(chunk, e)| MapEntry { chunk, data_offset: e.data_offset, blocks: e.blocks, crcs: e.crcs.to_vec() })
        .collect();
    let bpc = pg.blocks_per_chunk();
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    for (done, (pc, ups)) in updates.into_iter().enumerate() {
        let mut blocks = parent
            .with_entry(pc, |e| e.map(|e| e.blocks.clone()))
            .unwrap_or_else(|| crate::format::blocks::BlockStates::new(bpc));
        let mut source: Vec<Option<Src>> =
            (0..bpc).map(|b| (blocks.get(b) == BlockState::Data).then_some(Src::Parent(b))).collect();
        let tail_here = tail.filter(|t| t.chunk == pc);
        let tail_parent = tail_here.and_then(|t| (blocks.get(t.block) == BlockState::Data).then_some(t.block));
        for (b0, b1, u) in ups {
            for (k, s) in source[b0..b1].iter_mut().enumerate() {
                *s = match u {
                    Update::Data(tc, tb) => Some(Src::Top(tc, tb + k)),
                    Update::Zero => None,
                };
            }
            let st = if matches!(u, Update::Data(..)) { BlockState::Data } else { BlockState::Zero };
            blocks.set_range(b0, b1, st);
        }
        if let Some(Tail { block: b, keep, .. }) = tail_here {
            let top = match source[b] {
                Some(Src::Top(tc, tb)) => Some((tc, tb)),
                _ => None,
            };
            // Zeros from both sides are the Zero the update already made.
            if top.is_some() || tail_parent.is_some() {
                source[b] = Some(Src::Tail { top, parent: tail_parent, keep });
                blocks.set_range(b, b + 1, BlockState::Data);
            }
        }
        // Never write into the old slot: the durable map points there until the switch.
        let data_offset = if blocks.count(BlockState::Data) > 0 { parent.alloc_detached_slot()? } else { 0 };
        if data_offset != 0 {
            taken.push(data_offset);
        }
        let mut crcs = vec![0u32; pg.checksum_bytes() / 4];
        for (b, src) in source.iter().enumerate() {
            // Copies are verified against the source's checksums, so a damaged block is never
            // laundered into the parent under a fresh, valid checksum.
            match *src {
                None => continue,
                Some(Src::Parent(pb)) => parent.read_data_verified(pc, pb as u64 * BLOCK_SIZE, &mut block)?,
                Some(Src::Top(tc, tb)) => top.read_data_verified(tc, tb as u64 * BLOCK_SIZE, &mut block)?,
                Some(Src::Tail { top: from_top, parent: from_parent, keep }) => {
                    match from_top {
                        Some((tc, tb)) => top.read_data_verified(tc, tb as u64 * BLOCK_SIZE, &mut block)?,
                        None => block.fill(0),
                    }
                    match from_parent {
                        Some(pb) => {
                            let mut own = vec![0u8; BLOCK_SIZE as usize];
                            parent.read_data_verified(pc, pb as u64 * BLOCK_SIZE, &mut own)?;
                            block[keep..].copy_from_slice(&own[keep..]);
                        }
                        None => block[keep..].fill(0),
                    }
                }
            }
            parent.write_at(&block, data_offset + b as u64 * BLOCK_SIZE)?;
            if let Some(c) = crcs.get_mut(b) {
                *c = crc32fast::hash(&block);
            }
        }
        entries.push(MapEntry { chunk: pc, data_offset, blocks, crcs });
        progress(done as u64 + 1, total);
        if stop() {
            return Err(err(ErrorKind::Cancelled, "cancelled; the parent is unchanged"));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_layers_are_recognised_by_name() {
        assert!(is_commit_layer(Path::new("/d/disk.cow.commit-0a1b2c3d")));
        assert!(!is_commit_layer(Path::new("/d/disk.cow.commit-0a1b2c3")));
        assert!(!is_commit_layer(Path::new("/d/disk.cow")));
        assert!(!is_commit_layer(Path::new("/d/.commit-0a1b2c3d")));
        assert!(!is_commit_layer(Path::new("/d/disk.cow.commit-0a1b2c3g")));
    }
}
