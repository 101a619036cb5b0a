//! The completion rule of a snapshot (spec §5.7.1, S5 to S7): an image found frozen under its
//! live name with a pending-snapshot record had a snapshot decided but perhaps not carried
//! out; whoever opens it for use carries it out first (idempotently, so again after a crash
//! in the middle). Deciding a snapshot is `ops::snapshot`.

use crate::error::{err, ErrorKind, Result};
use crate::format::header::{ParentFormat, PendingSnapshot};
use crate::format::FLAG_FROZEN;
use crate::layer::{read_header_of, write_next_header};
use crate::storage::namespace::{Namespace, RealFs};
use crate::storage::LockMode;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn sibling(p: &Path, name: &[u8]) -> PathBuf {
    p.with_file_name(OsStr::from_bytes(name))
}

/// Completes a snapshot whose intent record is durable; idempotent, so it can run again after
/// a crash in the middle of it. `at` is any path in the image's directory.
pub(crate) fn complete(ns: &dyn Namespace, at: &Path, p: &PendingSnapshot) -> Result<()> {
    let live = sibling(at, &p.live);
    let snap = sibling(at, &p.snapshot);
    let temp = sibling(at, &p.temp);
    if ns.exists(&temp) {
        // The record is the file's to say, so it is not trusted with the directory: the names
        // must be three different files' names, and T must be the overlay S2 made (§5.7.1),
        // or the rename would put some other file, or a new name over the frozen image's
        // only one, in the image's place.
        check_record(ns, &live, &temp, p).map_err(|e| e.with_file(&live))?;
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
    // under the live name, which now names the overlay, and a busy snapshot simply keeps it for
    // now. The header write is synced all the same: every header write is durable before the
    // next one starts (spec §2.4), or a later one could tear both slots.
    match ns.open(&snap, true, LockMode::Exclusive) {
        Ok(s) => {
            let mut h = read_header_of(s.as_ref()).map_err(|e| e.with_file(&snap))?;
            if h.pending.is_some() {
                h.pending = None;
                write_next_header(s.as_ref(), &mut h, true).map_err(|e| e.with_file(&snap))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::InUse => Ok(()),
        Err(e) => Err(e),
    }
}

/// Refuses as corrupt a record `p` of `live` whose three names are not different names of this
/// directory, or whose `temp` is not what step S2 made: an image whose parent is the cowdisk
/// layer named `p.snapshot` with `live`'s uuid.
fn check_record(ns: &dyn Namespace, live: &Path, temp: &Path, p: &PendingSnapshot) -> Result<()> {
    let corrupt =
        |why: &str| Err(err(ErrorKind::Corrupt, format!("its pending snapshot record {why}; it is not carried out")));
    let special = |n: &[u8]| n == b"." || n == b"..";
    if p.live == p.snapshot
        || p.live == p.temp
        || p.snapshot == p.temp
        || [&p.live, &p.snapshot, &p.temp].iter().any(|n| special(n))
    {
        return corrupt("names one file twice, or `.` or `..`");
    }
    let header = |path: &Path| ns.open(path, false, LockMode::None).and_then(|s| read_header_of(s.as_ref()));
    let uuid = header(live)?.uuid;
    let overlay = match header(temp) {
        Ok(h) => h,
        Err(_) => return corrupt("names as the new overlay a file that is not a cowdisk image"),
    };
    match overlay.parent {
        Some(r) if r.format == ParentFormat::Cowdisk && r.path == p.snapshot && r.uuid == uuid => Ok(()),
        _ => corrupt("names as the new overlay an image that is not an overlay on the snapshot"),
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
pub(crate) fn finish_pending(ns: &dyn Namespace, path: &Path) -> Result<Option<PendingSnapshot>> {
    let Ok(h) = ns.open(path, false, LockMode::None).and_then(|s| read_header_of(s.as_ref())) else {
        return Ok(None);
    };
    let frozen = h.has_flag(FLAG_FROZEN);
    let Some(p) = h.pending else { return Ok(None) };
    if !frozen || path.file_name().map(|n| n.as_bytes()) != Some(&p.live[..]) {
        return Ok(None);
    }
    // The link that takes the snapshot's name, under the directory's lock as a snapshot's own
    // (format-spec §5.7.1). No caller holds it here: a snapshot takes it after this.
    let _dir = ns.lock_dir(path)?;
    complete(ns, path, &p).map_err(|e| e.during("finish interrupted snapshot"))?;
    Ok(Some(p))
}
