//! Snapshot: freeze an image's current contents under a new name and leave an empty overlay
//! on it under the old name, in constant time, with an intent record so that a crash at any
//! point resolves to "before" or "after" (spec §5.7.1). This file decides a snapshot (S1 to
//! S3); carrying out a decided one (S5 to S7) is the completion rule in `chain/pending.rs`,
//! which opening a chain also applies.
//!
//! Every file and name operation goes through a [`Namespace`], so the crash tests can run the
//! same code on a recording directory and rebuild every state a power cut could leave.

use crate::chain::pending::{complete, finish_pending};
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::header::{ParentFormat, ParentRef, PendingSnapshot, MAX_PENDING_NAME};
use crate::format::FLAG_FROZEN;
use crate::layer::{read_header_of, write_next_header, Image};
use crate::storage::namespace::{sweep_stale_temps, temp_name, Namespace, RealFs};
use crate::storage::LockMode;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
    if !ns.same_dir(image, snapshot) {
        return Err(ctx(err(ErrorKind::InvalidArgument, "the snapshot must be in the same directory as the image")
            .with_file(snapshot)));
    }
    let (live, snap) = (file_name(image)?, file_name(snapshot)?);
    // An earlier snapshot of this image decided but not carried out (the command was killed)
    // is finished first; when it is the snapshot asked for, that is the result. Checking the
    // name first would refuse it once linked, and going on would decide a second snapshot
    // under the name the first one now holds, which could never complete.
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
    // The image is locked and records no pending snapshot, so no temporary overlay of an
    // earlier snapshot of it is still needed: those of killed runs go.
    sweep_stale_temps(ns, image, "snapshot");
    let temp = temp_name(image, "snapshot");
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
