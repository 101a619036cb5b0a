//! Snapshot: freeze an image's current contents under a new name and leave an empty overlay
//! on it under the old name, in constant time, with an intent record so that a crash at any
//! point resolves to "before" or "after" (spec §5.7.1).
//!
//! Every file and name operation goes through a [`Namespace`], so the crash tests can run the
//! same code on a recording directory and rebuild every state a power cut could leave.

use crate::chain::create::temp_sibling;
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::header::{ParentFormat, ParentRef, PendingSnapshot, MAX_PENDING_NAME};
use crate::format::FLAG_FROZEN;
use crate::layer::{read_header_of, write_next_header, Image};
use crate::storage::namespace::{Namespace, RealFs};
use crate::storage::LockMode;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn file_name(p: &Path) -> Result<Vec<u8>> {
    match p.file_name() {
        Some(n) if n.len() <= MAX_PENDING_NAME => Ok(n.as_bytes().to_vec()),
        _ => Err(err(ErrorKind::InvalidArgument, "needs a file name of 1 to 255 bytes").with_file(p)),
    }
}

fn sibling(p: &Path, name: &[u8]) -> PathBuf {
    p.with_file_name(OsStr::from_bytes(name))
}

/// Freezes `image` as `snapshot` (a path in the same directory) and makes `image` a new empty
/// overlay on it.
pub fn snapshot(image: &Path, snapshot: &Path) -> Result<()> {
    snapshot_in(&RealFs, image, snapshot)
}

/// [`snapshot`] with its file and name operations going through `ns`.
pub fn snapshot_in(ns: &dyn Namespace, image: &Path, snapshot: &Path) -> Result<()> {
    let ctx = |e: Error| e.during("snapshot");
    if !ns.same_dir(image, snapshot) {
        return Err(ctx(err(ErrorKind::InvalidArgument, "the snapshot must be in the same directory as the image")
            .with_file(snapshot)));
    }
    let (live, snap) = (file_name(image)?, file_name(snapshot)?);
    // A snapshot of this image decided but cut short (the command killed) is finished first,
    // as every writer does (spec §5.7.1); when it is the snapshot asked for, that is the result.
    if finish_pending(ns, image)?.is_some_and(|p| p.snapshot == snap) {
        return Ok(());
    }
    if ns.exists(snapshot) {
        return Err(ctx(err(ErrorKind::InvalidArgument, "already exists").with_file(snapshot)));
    }
    // Held to the end of the decision: nobody else may have the image open meanwhile. Only the
    // header is read and written; the map is never loaded, so this takes the same time for any
    // size of image.
    let locked = ns.open(image, true, LockMode::Exclusive)?;
    let mut h = read_header_of(locked.as_ref()).map_err(|e| e.with_file(image).during("snapshot"))?;
    if h.has_flag(FLAG_FROZEN) {
        return Err(ctx(
            err(ErrorKind::ReadOnly, "is frozen already (a parent layer); snapshot its overlay").with_file(image)
        ));
    }
    let temp = temp_sibling(image, "snapshot");
    ns.remove(&temp);
    // 1. The new overlay, complete, under a temporary name. It names the snapshot by its
    //    file name (same directory) and identifies it by this image's UUID.
    let parent = ParentRef {
        format: ParentFormat::Cowdisk,
        path: snap.clone(),
        uuid: h.uuid,
        size: h.geometry.virtual_size,
        fingerprint: 0,
    };
    let new = ns.create(&temp)?;
    Image::create_closed_on(new.as_ref(), &temp, h.geometry, Some(parent))?;
    drop(new);
    ns.sync_dir(&temp)?;
    // 2. The decision: frozen plus the intent record, in one durable header write.
    let pending = PendingSnapshot { live, snapshot: snap, temp: file_name(&temp)? };
    h.set_flag(FLAG_FROZEN, true);
    h.pending = Some(pending.clone());
    write_next_header(locked.as_ref(), &mut h, true).map_err(|e| e.with_file(image).during("snapshot"))?;
    drop(locked);
    // 3. Carry it out: the names move; then the record is cleared.
    complete(ns, image, &pending)
}

/// Completes a snapshot whose intent record is durable; idempotent, so it can run again after
/// a crash in the middle of it. `at` is any path in the image's directory.
fn complete(ns: &dyn Namespace, at: &Path, p: &PendingSnapshot) -> Result<()> {
    let live = sibling(at, &p.live);
    let snap = sibling(at, &p.snapshot);
    let temp = sibling(at, &p.temp);
    if ns.exists(&temp) {
        if !ns.exists(&snap) {
            ns.link(&live, &snap)?;
        } else if !ns.same_file(&snap, &live) {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a different file took the snapshot's name; the snapshot cannot complete",
            )
            .with_file(&snap));
        }
        // The link must be durable before the rename: if the rename reached the disk alone,
        // the frozen image would have lost its only name.
        ns.sync_dir(&snap)?;
        ns.rename(&temp, &live)?;
        ns.sync_dir(&live)?;
    }
    // Clearing the record is tidiness, not correctness: the record is only acted on when found
    // under the live name, which now names the overlay. So it is not synced, and a busy
    // snapshot simply keeps it for now.
    match ns.open(&snap, true, LockMode::Exclusive) {
        Ok(s) => {
            let mut h = read_header_of(s.as_ref()).map_err(|e| e.with_file(&snap))?;
            if h.pending.is_some() {
                h.pending = None;
                write_next_header(s.as_ref(), &mut h, false).map_err(|e| e.with_file(&snap))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::InUse => Ok(()),
        Err(e) => Err(e),
    }
}

/// If `path` names a frozen image whose intent record says a snapshot of it under this name was
/// decided but not finished, finishes it. Returns whether anything was done.
pub fn complete_pending(path: &Path) -> Result<bool> {
    complete_pending_in(&RealFs, path)
}

/// [`complete_pending`] through `ns`.
pub fn complete_pending_in(ns: &dyn Namespace, path: &Path) -> Result<bool> {
    finish_pending(ns, path).map(|p| p.is_some())
}

/// As [`complete_pending_in`]; returns the intent record of the snapshot it finished.
fn finish_pending(ns: &dyn Namespace, path: &Path) -> Result<Option<PendingSnapshot>> {
    let Ok(h) = ns.open(path, false, LockMode::None).and_then(|s| read_header_of(s.as_ref())) else {
        return Ok(None);
    };
    let frozen = h.has_flag(FLAG_FROZEN);
    let Some(p) = h.pending else { return Ok(None) };
    if !frozen || path.file_name().map(|n| n.as_bytes()) != Some(&p.live[..]) {
        return Ok(None);
    }
    complete(ns, path, &p).map_err(|e| e.during("finish interrupted snapshot"))?;
    Ok(Some(p))
}
