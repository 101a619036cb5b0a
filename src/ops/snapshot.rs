//! Snapshot: freeze an image's current contents under a new name and leave an empty overlay
//! on it under the old name, in constant time, with an intent record so that a crash at any
//! point resolves to "before" or "after" (spec §5.7.1).

use crate::chain::create::{sync_dir, temp_sibling};
use crate::error::{err, Error, ErrorKind, Result};
use crate::format::header::{Header, ParentFormat, ParentRef, PendingSnapshot, MAX_PENDING_NAME};
use crate::format::FLAG_FROZEN;
use crate::layer::{read_header_of, read_header_only, write_next_header, Image};
use crate::storage::{FileStorage, LockMode};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

fn file_name(p: &Path) -> Result<Vec<u8>> {
    match p.file_name() {
        Some(n) if n.len() <= MAX_PENDING_NAME => Ok(n.as_bytes().to_vec()),
        _ => Err(err(ErrorKind::InvalidArgument, "needs a file name of 1 to 255 bytes").with_file(p)),
    }
}

fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Freezes `image` as `snapshot` (a path in the same directory) and makes `image` a new empty
/// overlay on it.
pub fn snapshot(image: &Path, snapshot: &Path) -> Result<()> {
    let ctx = |e: Error| e.during("snapshot");
    let dir = dir_of(image);
    let same_dir = dir_of(snapshot).canonicalize().ok() == dir.canonicalize().ok();
    if !same_dir {
        return Err(ctx(err(ErrorKind::InvalidArgument, "the snapshot must be in the same directory as the image")
            .with_file(snapshot)));
    }
    if snapshot.symlink_metadata().is_ok() {
        return Err(ctx(err(ErrorKind::InvalidArgument, "already exists").with_file(snapshot)));
    }
    let (live, snap) = (file_name(image)?, file_name(snapshot)?);
    // Held to the end of the decision: nobody else may have the image open meanwhile. Only the
    // header is read and written; the map is never loaded, so this takes the same time for any
    // size of image.
    let locked = FileStorage::open(image, true, LockMode::Exclusive)?;
    let mut h = read_header_of(&locked).map_err(|e| e.with_file(image).during("snapshot"))?;
    if h.has_flag(FLAG_FROZEN) {
        return Err(ctx(
            err(ErrorKind::ReadOnly, "is frozen already (a parent layer); snapshot its overlay").with_file(image)
        ));
    }
    let temp = temp_sibling(image, "snapshot");
    let _ = std::fs::remove_file(&temp);
    // 1. The new overlay, complete, under a temporary name. It names the snapshot by its
    //    file name (same directory) and identifies it by this image's UUID.
    let parent = ParentRef {
        format: ParentFormat::Cowdisk,
        path: snap.clone(),
        uuid: h.uuid,
        size: h.geometry.virtual_size,
        fingerprint: 0,
    };
    Image::create_closed(&temp, h.geometry, Some(parent))?;
    sync_dir(&temp)?;
    // 2. The decision: frozen plus the intent record, in one durable header write.
    let pending = PendingSnapshot { live, snapshot: snap, temp: file_name(&temp)? };
    h.set_flag(FLAG_FROZEN, true);
    h.pending = Some(pending.clone());
    write_next_header(&locked, &mut h, true).map_err(|e| e.with_file(image).during("snapshot"))?;
    drop(locked);
    // 3. Carry it out: the names move; then the record is cleared.
    complete(&dir, &pending)
}

/// Completes a snapshot whose intent record is durable; idempotent, so it can run again after
/// a crash in the middle of it.
fn complete(dir: &Path, p: &PendingSnapshot) -> Result<()> {
    let live = dir.join(OsStr::from_bytes(&p.live));
    let snap = dir.join(OsStr::from_bytes(&p.snapshot));
    let temp = dir.join(OsStr::from_bytes(&p.temp));
    let ino = |q: &Path| std::fs::metadata(q).map(|m| (m.dev(), m.ino())).ok();
    if temp.exists() {
        match ino(&snap) {
            None => std::fs::hard_link(&live, &snap).map_err(|e| Error::io("link", e).with_file(&snap))?,
            Some(id) if Some(id) == ino(&live) => {}
            Some(_) => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    "a different file took the snapshot's name; the snapshot cannot complete",
                )
                .with_file(&snap))
            }
        }
        // The link must be durable before the rename: if the rename reached the disk alone,
        // the frozen image would have lost its only name.
        sync_dir(&snap)?;
        std::fs::rename(&temp, &live).map_err(|e| Error::io("rename", e).with_file(&live))?;
        sync_dir(&live)?;
    }
    // Clearing the record is tidiness, not correctness: the record is only acted on when found
    // under the live name, which now names the overlay. So it is not synced, and a busy
    // snapshot simply keeps it for now.
    match FileStorage::open(&snap, true, LockMode::Exclusive) {
        Ok(s) => {
            let mut h = read_header_of(&s).map_err(|e| e.with_file(&snap))?;
            if h.pending.is_some() {
                h.pending = None;
                write_next_header(&s, &mut h, false).map_err(|e| e.with_file(&snap))?;
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
    let Ok(h): Result<Header> = read_header_only(path) else {
        return Ok(false);
    };
    let Some(p) = &h.pending else {
        return Ok(false);
    };
    if !h.has_flag(FLAG_FROZEN) || path.file_name().map(|n| n.as_bytes()) != Some(&p.live[..]) {
        return Ok(false);
    }
    complete(&dir_of(path), p).map_err(|e| e.during("finish interrupted snapshot"))?;
    Ok(true)
}
