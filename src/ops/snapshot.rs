//! Snapshot: freeze an image's current contents under a new name and leave an empty overlay
//! on it under the old name, in constant time, with an intent record so that a crash at any
//! point resolves to "before" or "after" (spec §5.7.1). This file decides a snapshot (S1 to
//! S3); carrying out a decided one (S5 to S7) is the completion rule in `chain/pending.rs`,
//! which opening a chain also applies.
//!
//! Every file and name operation goes through a [`Namespace`], so the crash tests can run the
//! same code on a recording directory and rebuild every state a power cut could leave.

use crate::chain::pending::{complete, finish_pending};
use crate::chain::{resolve_parent_path, Chain};
use crate::device::DiskFlush;
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::header::{Header, ParentFormat, ParentRef, PendingSnapshot, MAX_PENDING_NAME};
use crate::format::{FLAG_DIRTY, FLAG_FROZEN, MAX_CHAIN_DEPTH};
use crate::layer::{read_header_of, write_next_header, Image, OpenOptions};
use crate::ops::commit::refuse_commit_layer_name;
use crate::storage::namespace::{already_exists, sweep_stale_temps, temp_name, DirLock, Namespace, RealFs};
use crate::storage::{LockMode, Storage};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

fn file_name(p: &Path) -> Result<Vec<u8>> {
    match p.file_name() {
        Some(n) if n.len() <= MAX_PENDING_NAME => Ok(n.as_bytes().to_vec()),
        _ => Err(err(ErrorKind::InvalidArgument, "needs a file name of 1 to 255 bytes").with_file(p)),
    }
}

/// Freezes `image` as `snapshot` (a path in the same directory) and makes `image` a new empty
/// overlay on it.
pub fn snapshot(image: &Path, snapshot: &Path) -> Result<()> {
    snapshot_in(&RealFs, image, snapshot)
}

/// [`snapshot`] with its file and name operations going through `ns`.
pub fn snapshot_in(ns: &dyn Namespace, image: &Path, snapshot: &Path) -> Result<()> {
    let ctx = |e: Error| e.during("snapshot");
    let names = names(ns, image, snapshot)?;
    refuse_commit_layer_name(snapshot).map_err(ctx)?;
    // An earlier snapshot of this image decided but not carried out (the command was killed)
    // is finished first; when it is the snapshot asked for, that is the result. Checking the
    // name first would refuse it once linked, and going on would decide a second snapshot
    // under the name the first one now holds, which could never complete.
    if finish_pending(ns, image)?.is_some_and(|p| p.snapshot == names.1) {
        return Ok(());
    }
    if ns.exists(snapshot) {
        return Err(ctx(already_exists(snapshot)));
    }
    // Held to the end of the decision: nobody else may have the image open meanwhile. Only the
    // header is read and written; the map is never loaded, so this takes the same time for any
    // size of image.
    let locked = ns.open(image, true, LockMode::Exclusive)?;
    let mut h = read_header_of(locked.as_ref()).map_err(|e| e.with_file(image).during("snapshot"))?;
    refuse_frozen(&h, image)?;
    if h.has_flag(FLAG_DIRTY) || journal_to_replay(locked.as_ref(), &h).map_err(ctx)? {
        // A crash left flushes in the journal that the map in the file lacks, or space no map
        // entry points at (data written after the last flush): a writable open replays the
        // one and punches the other, and its close leaves the map complete and the image
        // clean. Frozen, no open would give that space back (only `check --repair` does).
        // Only then is the map loaded.
        Image::open_on(locked.clone(), image, OpenOptions::writable()).and_then(|i| i.close()).map_err(ctx)?;
        h = read_header_of(locked.as_ref()).map_err(|e| e.with_file(image).during("snapshot"))?;
    }
    refuse_too_deep(depth_in(ns, image, &h)?, image)?;
    let _dir = claim_name(ns, image, snapshot).map_err(ctx)?;
    // 1. The new overlay, complete, under a temporary name.
    let (pending, new) = new_overlay(ns, image, names, &h)?;
    drop(new);
    // 2. The decision: frozen plus the intent record, in one durable header write.
    // A frozen layer has no journal (its map in the file is complete). The area is punched
    // first: its chain holds nothing to replay (above), so a crash before the header leaves the
    // live image with an area that reads as an empty chain, and none after it leaves it behind.
    h.set_flag(FLAG_FROZEN, true);
    h.pending = Some(pending.clone());
    if let Some(a) = h.journal.take() {
        // Durable before the header that freezes the image: in one sync with it, a crash could
        // keep FROZEN and lose the punch, leaving the old records in the frozen layer as
        // leaked space.
        crate::layer::journal::drop_area(locked.as_ref(), &a)
            .and_then(|()| locked.sync())
            .map_err(|e| e.with_file(image).during("snapshot"))?;
    }
    write_next_header(locked.as_ref(), &mut h, true).map_err(|e| e.with_file(image).during("snapshot"))?;
    drop(locked);
    // 3. Carry it out: the names move; then the record is cleared.
    complete(ns, image, &pending)
}

/// The directory of `image` locked ([`Namespace::lock_dir`]) once the snapshot's name is found
/// still free under the lock: held from here to the link that takes the name (`complete`),
/// so that no one else takes it in between.
fn claim_name(ns: &dyn Namespace, image: &Path, snapshot: &Path) -> Result<DirLock> {
    let dir = ns.lock_dir(image)?;
    if ns.exists(snapshot) {
        return Err(already_exists(snapshot));
    }
    Ok(dir)
}

/// The file names of the live image and the snapshot, checked: same directory, 1 to 255 bytes.
fn names(ns: &dyn Namespace, image: &Path, snapshot: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    if !ns.same_dir(image, snapshot) {
        return Err(err(ErrorKind::InvalidArgument, "the snapshot must be in the same directory as the image")
            .with_file(snapshot)
            .during("snapshot"));
    }
    Ok((file_name(image)?, file_name(snapshot)?))
}

/// How many images the chain of `image` (whose header is `h`) holds, counting it and a raw
/// base, from the headers alone; counting stops once past the limit.
fn depth_in(ns: &dyn Namespace, image: &Path, h: &Header) -> Result<usize> {
    let mut depth = 1;
    let mut child = image.to_path_buf();
    let mut next = h.parent.clone();
    while let Some(p) = next.take() {
        depth += 1;
        if p.format == ParentFormat::Raw || depth > MAX_CHAIN_DEPTH {
            break;
        }
        if p.format == ParentFormat::Remote {
            let (repo, d) = crate::remote::parent_layer(&p.path)?;
            return Ok(depth - 1 + crate::remote::chain_depth(&repo, &d, MAX_CHAIN_DEPTH + 1 - depth)?);
        }
        let path = resolve_parent_path(&child, &p);
        next = ns
            .open(&path, false, LockMode::None)
            .and_then(|s| read_header_of(s.as_ref()))
            .map_err(|e| e.with_file(&path))?
            .parent;
        child = path;
    }
    Ok(depth)
}

/// A snapshot adds a layer: refused where the chain would then be deeper than the format allows.
fn refuse_too_deep(depth: usize, image: &Path) -> Result<()> {
    if depth + 1 > MAX_CHAIN_DEPTH {
        return Err(err(
            ErrorKind::ChainTooDeep,
            format!("the chain holds {depth} images, and a snapshot would make it deeper than {MAX_CHAIN_DEPTH}; commit or flatten first"),
        )
        .with_file(image)
        .during("snapshot"));
    }
    Ok(())
}

fn refuse_frozen(h: &Header, image: &Path) -> Result<()> {
    if h.has_flag(FLAG_FROZEN) {
        return Err(err(ErrorKind::ReadOnly, "is frozen already (a parent layer); snapshot its overlay")
            .with_file(image)
            .during("snapshot"));
    }
    Ok(())
}

/// S2: the new overlay, complete and synced, under a temporary name next to `image`: it names
/// the snapshot by its file name (same directory) and identifies it by the image's UUID.
/// Returns the intent record naming it, and the new file, still locked.
fn new_overlay(
    ns: &dyn Namespace,
    image: &Path,
    (live, snap): (Vec<u8>, Vec<u8>),
    h: &Header,
) -> Result<(PendingSnapshot, Arc<dyn Storage>)> {
    // The image is locked and records no pending snapshot, so no temporary overlay of an
    // earlier snapshot of it is still needed: those of killed runs go.
    sweep_stale_temps(ns, image, "snapshot");
    let temp = temp_name(image, "snapshot");
    let parent = ParentRef {
        format: ParentFormat::Cowdisk,
        path: snap.clone(),
        uuid: h.uuid,
        size: h.geometry.virtual_size,
        fingerprint: 0,
    };
    let new = ns.create(&temp)?;
    ns.copy_owner_and_mode(image, &temp);
    let made = Image::create_closed_on(new.as_ref(), &temp, h.geometry, Some(parent))
        .and_then(|()| ns.sync_dir(&temp))
        .and_then(|()| links_work(ns, image, &temp));
    if let Err(e) = made {
        ns.remove(&temp);
        return Err(e.during("snapshot"));
    }
    Ok((PendingSnapshot { live, snapshot: snap, temp: file_name(&temp)? }, new))
}

/// Whether `temp` can be given a second name next to `image`. Carrying out a snapshot (S5)
/// gives the frozen image the snapshot's name by a hard link; on a file system without them
/// (FAT, exFAT, some FUSE and SMB mounts) that would fail after the decision, leaving an image
/// frozen with a snapshot no open can finish. So a link is tried first, on the new overlay,
/// and a refusal changes nothing. (Left behind by a crash, the extra name is a temporary
/// file of this snapshot, which the next one's sweep removes.)
fn links_work(ns: &dyn Namespace, image: &Path, temp: &Path) -> Result<()> {
    let probe = temp_name(image, "snapshot");
    let linked = ns.link(temp, &probe);
    ns.remove(&probe);
    linked.map_err(|e| {
        err(
            ErrorKind::Unsupported,
            format!("this file system refused a hard link ({}), which a snapshot needs; nothing changed", e.message()),
        )
        .with_file(image)
    })
}

/// A live snapshot that did not happen, or did not finish.
#[derive(Debug)]
pub struct LiveSnapshotError {
    pub error: Error,
    /// The chain as it was when nothing changed; `None` when the snapshot was decided but
    /// could not be carried out (the next open of the image finishes it).
    pub chain: Option<Box<Chain>>,
}

/// Snapshots the top of an open, writable chain without closing it (spec §5.7.1 on an image
/// in use): the same steps and intent record as [`snapshot_in`], with the chain's own open
/// files standing in for a second open (which its locks would refuse). Returns the chain on
/// the new, empty top over the frozen snapshot, whose files stay open throughout: the old
/// top becomes the first lower layer, its lock a reader's. The caller makes sure no request
/// runs on `chain` meanwhile.
pub fn snapshot_chain(
    ns: &dyn Namespace,
    chain: Chain,
    snapshot: &Path,
) -> std::result::Result<Chain, LiveSnapshotError> {
    let failed = |error: Error, chain| LiveSnapshotError { error: error.during("snapshot"), chain };
    let image = chain.top().path().to_path_buf();
    let prepared = (|| {
        if !chain.top().is_writable() {
            return Err(err(ErrorKind::ReadOnly, "is served read-only").with_file(&image));
        }
        let names = names(ns, &image, snapshot)?;
        if ns.exists(snapshot) {
            return Err(already_exists(snapshot));
        }
        let h = chain.top().header();
        refuse_frozen(&h, &image)?;
        refuse_too_deep(chain.depth(), &image)?;
        // Every write acknowledged so far goes into the snapshot.
        chain.flush()?;
        let dir = claim_name(ns, &image, snapshot)?;
        new_overlay(ns, &image, names, &h).map(|(p, n)| (p, n, dir))
    })();
    let (pending, new, _dir) = match prepared {
        Ok(p) => p,
        Err(e) => return Err(failed(e, Some(Box::new(chain)))),
    };
    // The decision. From its write on, the snapshot may be decided on disk whatever this call
    // reports: the chain is not given back, and the next open finishes it (or finds the image
    // as it was).
    if let Err(e) = chain.top().freeze(pending.clone()) {
        return Err(failed(e, None));
    }
    if let Err(e) = complete(ns, &image, &pending) {
        return Err(failed(e, None));
    }
    let (top, mut lowers, base) = chain.into_layers();
    // S7 through the open file (a second open would be refused by its lock). Tidiness only:
    // the record is inert now that the live name is the new overlay's.
    let _ = top.clear_pending();
    if let Some(f) = new.as_file() {
        f.renamed(&image);
    }
    let reopened = top.into_lower(snapshot).and_then(|frozen| {
        let new_top = Image::open_on(new, &image, OpenOptions::writable())?;
        lowers.insert(0, Arc::new(frozen));
        Ok(Chain::assemble_shared(new_top, lowers, base))
    });
    reopened.map_err(|e| failed(e, None))
}

/// Whether the journal of the image (header `h`) holds records a crash left to replay.
fn journal_to_replay(storage: &dyn crate::storage::Storage, h: &Header) -> Result<bool> {
    let Some(area) = h.journal else { return Ok(false) };
    let chain = crate::layer::journal::Chain::read(storage, &area, &h.uuid, h.geometry.log)?;
    Ok(!chain.to_replay().is_empty())
}
