//! The steps of the background jobs (`jobs.rs`) on a live chain. Each does its long work
//! while clients go on reading and writing, and changes the chain's layers only in short
//! replacements with requests held back (`LiveChain::replace`), each one a single durable
//! header write away from the chain before it, which reads the same: so a crash or a kill at
//! any moment leaves a chain that opens and reads as every acknowledged write left it.

use super::jobs::Job;
use super::{Failed, LiveChain};
use crate::chain::create::stored_parent_path;
use crate::chain::Chain;
use crate::device::{push_extent, DiskFlush, Extent, ExtentKind};
use crate::error::{err, ErrorKind, Result};
use crate::format::header::{ParentFormat, ParentRef};
use crate::format::{Geometry, FLAG_FROZEN};
use crate::layer::{new_uuid, Image, OpenOptions};
use crate::ops::all_extents;
use crate::ops::commit::{check_committable, commit_prepare, is_commit_layer, refuse_commit_layer_name};
use crate::ops::flatten::copy_device;
use crate::storage::namespace::{
    behind_link, publish_new, remove_left_behind, sweep_stale_temps, temp_name, Namespace,
};
use crate::storage::LockMode;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// Device bytes populated per step of a flatten: one step holds the chain (shared) as long as
/// a request would, so a replacement never waits long for it.
const FLATTEN_WINDOW: u64 = 4 << 20;

/// The device ranges a chain reads from below its top, neighbours merged.
fn served_below(c: &Chain) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    for e in all_extents(c)?.into_iter().filter(|e| matches!(e.kind, ExtentKind::Data { depth } if depth > 0)) {
        push_extent(&mut out, e, |_, _| true);
    }
    Ok(out)
}

/// The chain rebuilt from its own layers: what readers need after a lower layer's map moved.
fn rebuilt(chain: Chain) -> Chain {
    let (top, lowers, base) = chain.into_layers();
    Chain::assemble_shared(top, lowers, base)
}

/// Runs `step` on `chain`; on failure gives the chain back with the error.
fn or_keep(chain: Chain, step: impl FnOnce(&Chain) -> Result<()>) -> std::result::Result<Chain, Failed> {
    match step(&chain) {
        Ok(()) => Ok(chain),
        Err(e) => Err((e, Some(Box::new(chain)))),
    }
}

/// Flatten: every block the top reads from below is copied into it (only where the top still
/// reads from below, chunk by chunk under the writers' locks), then one header write drops
/// the parent reference, with requests held back. Stopped early, the top keeps what was
/// copied, and a flatten run again copies only what is still below.
pub(super) fn flatten(live: &LiveChain, job: &Job) -> Result<()> {
    let ranges = live.with(served_below)?;
    job.set_total(ranges.iter().map(|e| e.length).sum());
    for e in &ranges {
        let mut pos = e.offset;
        while pos < e.end() {
            job.check()?;
            let n = (e.end() - pos).min(FLATTEN_WINDOW);
            live.with(|c| c.populate(pos, n))?;
            job.advance(n);
            pos += n;
        }
    }
    job.check()?;
    live.replace(|chain| {
        let chain = or_keep(chain, |c| {
            // Nothing should be left below; anything that is goes now.
            for e in served_below(c)? {
                c.populate(e.offset, e.length)?;
            }
            c.flush()?;
            c.top().update_header(|h| h.parent = None)
        })?;
        let (top, _, _) = chain.into_layers();
        Ok(Chain::assemble(top, Vec::new(), None))
    })?;
    Ok(())
}

/// Commit: the top is frozen (a live snapshot) into an intermediate layer X, so that what is
/// committed stops changing while new writes go to a new, empty top; X's blocks go into the
/// parent P (`commit_prepare`, P taken up for writing in place, its readers unaffected); then,
/// with requests held back, P's new map is switched in and the top is put on P directly (X's
/// blocks are now in P: the device reads the same), and X goes. A commit stopped before that
/// leaves X in the chain; the next commit starts from it, and then commits the top as asked
/// (what was written since), as the offline commit does. (Until 2026-12-04 a live commit
/// that found X committed X alone and said it had committed the image.)
pub(super) fn commit(live: &LiveChain, job: &Job, ns: &dyn Namespace) -> Result<()> {
    if commit_step(live, job, ns)? {
        commit_step(live, job, ns)?;
    }
    Ok(())
}

/// One commit of [`commit`]: of X if a stopped commit left it (returns true), else of the top.
fn commit_step(live: &LiveChain, job: &Job, ns: &dyn Namespace) -> Result<bool> {
    let image = live.path().to_path_buf();
    let resume = live.with(|c| match c.lowers() {
        [] => Err(err(
            ErrorKind::InvalidArgument,
            "has no cowdisk parent to commit into (a raw parent is never written; flatten makes a standalone image)",
        )
        .with_file(&image)),
        [x, _, ..] if is_commit_layer(x.path()) => Ok(true),
        _ => Ok(false),
    })?;
    // The parent is taken up for writing first: refused (another process has it open, such
    // as a server of another overlay on it), nothing has changed yet.
    let p = live.with(|c| Ok(c.lowers()[usize::from(resume)].clone()))?;
    p.begin_writing().map_err(|e| match e.kind() {
        ErrorKind::InUse => err(
            ErrorKind::InUse,
            format!(
                "in use: its parent {} is open elsewhere (other overlays on it, served by another process or by this one?); nothing changed",
                p.path().display()
            ),
        )
        .with_file(&image),
        _ => e,
    })?;
    let moved = move_down(live, job, ns, &p, resume);
    let ended = p.end_writing();
    let x = moved?;
    ended?;
    // The last handle on X: its file closes, and nothing refers to it any more. Through a
    // symbolic link (the image was served through one, and X took the link's name when the
    // top was frozen), the file it leads to goes first: the link, left alone by a crash, is
    // the small one.
    let x_path = x.path().to_path_buf();
    let behind = behind_link(ns, &x_path, x.storage().as_ref());
    drop(x);
    remove_left_behind(ns, behind)?;
    ns.remove(&x_path);
    ns.sync_dir(&x_path)?;
    Ok(resume)
}

/// The steps of [`commit`] while the parent `p` is taken up for writing: the top frozen into
/// X (unless X is there already), X's blocks into `p`, and the switch. Returns X, no longer
/// part of the chain.
fn move_down(live: &LiveChain, job: &Job, ns: &dyn Namespace, p: &Arc<Image>, resume: bool) -> Result<Arc<Image>> {
    let image = live.path().to_path_buf();
    if !resume {
        // A commit that must be refused is refused before the top is frozen, not after it
        // with the frozen layer left behind (writes meanwhile may still make it refused
        // below, as they would have a moment later).
        live.with(|c| check_committable(c.top(), p).map_err(|e| e.with_file(&image)))?;
        let name = image.file_name().map(OsStr::to_string_lossy).unwrap_or_default();
        let u = new_uuid()?;
        let tag = u32::from_le_bytes([u[0], u[1], u[2], u[3]]);
        live.snapshot_now(ns, &image.with_file_name(format!("{name}.commit-{tag:08x}")))?;
    }
    let x = live.with(|c| match c.lowers() {
        [x, q, ..] if Arc::ptr_eq(q, p) => Ok(x.clone()),
        _ => Err(err(ErrorKind::InvalidArgument, "the chain changed under the commit").with_file(&image)),
    })?;
    let pref =
        x.parent().ok_or_else(|| err(ErrorKind::Corrupt, "the frozen top names no parent").with_file(x.path()))?;
    let chunk = p.geometry().chunk_size();
    let progress = |done, total| {
        job.set_total(total * chunk);
        job.advance_to(done * chunk);
    };
    let prepared = commit_prepare(&x, p, &progress, &|| job.cancelled())?;
    live.replace(|chain| {
        let chain = or_keep(chain, |_| p.switch_map(prepared))?;
        // P's slots moved: whatever happens next, readers go on with a chain that knows it.
        let chain = rebuilt(chain);
        let chain = or_keep(chain, |c| c.top().update_header(|h| h.parent = Some(pref.clone())))?;
        let (top, mut lowers, base) = chain.into_layers();
        lowers.remove(0);
        Ok(Chain::assemble_shared(top, lowers, base))
    })?;
    Ok(x)
}

/// Compaction: the `layers` layers under the top (all its cowdisk layers if `None`) merged
/// into one new frozen layer at `into` (same directory as the top), built on the side from a
/// read-only view of them; then, with requests held back, the top is put on it in one header
/// write. The merged layers' files are left as they are (other overlays may use them).
/// Stopped early, the chain is as it was.
pub(super) fn compact(
    live: &LiveChain,
    job: &Job,
    ns: &dyn Namespace,
    into: &Path,
    layers: Option<usize>,
) -> Result<()> {
    let image = live.path().to_path_buf();
    if !ns.same_dir(&image, into) {
        return Err(err(ErrorKind::InvalidArgument, "the merged layer must be in the same directory as the image")
            .with_file(into));
    }
    if ns.exists(into) {
        return Err(err(ErrorKind::InvalidArgument, "already exists").with_file(into));
    }
    refuse_commit_layer_name(into)?;
    let (run, rest, base) = live.with(|c| {
        let l = c.lowers();
        // Layers in a repository are never rewritten, and a remote layer's parents are all
        // remote: only the local layers above the first remote one can be merged.
        let mut local = 0;
        let mut above = c.top().parent();
        while local < l.len() && above.as_ref().is_some_and(|p| p.format == ParentFormat::Cowdisk) {
            above = l[local].parent();
            local += 1;
        }
        let k = layers.unwrap_or(local);
        if k < 2 || k > local {
            let remote = if local < l.len() {
                format!(" (the {} below them are layers in a repository, which are never rewritten)", l.len() - local)
            } else {
                String::new()
            };
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("merges two or more of the {local} local cowdisk layers under the top{remote}"),
            )
            .with_file(&image));
        }
        Ok((l[..k].to_vec(), l[k..].to_vec(), c.shared_base()))
    })?;
    let last = &run[run.len() - 1];
    let below = last.parent();
    // M records what is below the run as the run's last layer does, by a path from its own
    // directory.
    let m_parent = match below {
        None => None,
        Some(r) if ns.same_dir(into, last.path()) || r.format == ParentFormat::Remote => Some(r),
        Some(r) => {
            let target = match (r.format, rest.first(), &base) {
                (ParentFormat::Cowdisk, Some(l), _) => l.path().to_path_buf(),
                (ParentFormat::Raw, _, Some(b)) => b.path().to_path_buf(),
                _ => {
                    return Err(
                        err(ErrorKind::Corrupt, "the chain does not match its parent references").with_file(&image)
                    )
                }
            };
            Some(ParentRef { path: stored_parent_path(into, &target, false)?, ..r })
        }
    };
    // A view of the run alone: new read-only handles of its files (readers' locks sit with
    // the chain's own).
    let opened = run
        .iter()
        .map(|l| {
            ns.open(l.path(), false, LockMode::Shared)
                .and_then(|s| Image::open_on(s, l.path(), OpenOptions::read_only()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut opened = opened.into_iter();
    let view_top = opened.next().ok_or_else(|| err(ErrorKind::InvalidArgument, "nothing to merge"))?;
    let view = Chain::assemble(view_top, opened.collect(), None);
    let todo: Vec<Extent> = all_extents(&view)?.into_iter().filter(|e| e.kind != ExtentKind::Unallocated).collect();
    job.set_total(todo.iter().map(|e| e.length).sum());
    let g = run[0].geometry();
    let geom = Geometry::new(g.virtual_size, g.chunk_shift)?.with_data_checksums(g.data_checksums)?;
    // What a compaction killed before its rename left (as big as the merged layer): gone
    // before this one makes its own.
    sweep_stale_temps(ns, into, "compact");
    let tmp = temp_name(into, "compact");
    let storage = ns.create(&tmp)?;
    // The merged layer holds the image's data: no more readers than the image has.
    ns.copy_owner_and_mode(&image, &tmp);
    let built = (|| -> Result<Image> {
        let m = Image::create_on(storage.clone(), &tmp, geom, m_parent, new_uuid()?)?;
        // Written through a chain over what is below the run, so a whiteout becomes Zero
        // where something below shows and Absent where nothing does: the same reads either way.
        let dst = Chain::assemble_shared(m, rest.clone(), base.clone());
        for e in &todo {
            job.check()?;
            if e.kind.reads_zero() {
                crate::device::DiskZero::write_zeroes(&dst, e.offset, e.length, false)?;
                job.advance(e.length);
            } else {
                copy_device(&view, &dst, e, &mut |n| job.advance(n))?;
            }
        }
        dst.flush()?;
        let (m, _, _) = dst.into_layers();
        m.update_header(|h| h.set_flag(FLAG_FROZEN, true))?;
        m.close()?;
        Ok(m)
    })();
    let published = built.and_then(|m| publish_new(ns, &tmp, into).map(|()| drop(m)));
    // The new file's lock goes with its last handle, before it is opened as a reader.
    drop(storage);
    if let Err(e) = published {
        ns.remove(&tmp);
        return Err(e);
    }
    let merged = Image::open_on(ns.open(into, false, LockMode::Shared)?, into, OpenOptions::read_only())?;
    let top_ref = ParentRef {
        format: ParentFormat::Cowdisk,
        path: into.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default(),
        uuid: merged.uuid(),
        size: merged.geometry().virtual_size,
        fingerprint: 0,
    };
    let k = run.len();
    drop(run);
    live.replace(|chain| {
        let chain = or_keep(chain, |c| c.top().update_header(|h| h.parent = Some(top_ref.clone())))?;
        let (top, lowers, base) = chain.into_layers();
        let mut new_lowers: Vec<Arc<Image>> = vec![Arc::new(merged)];
        new_lowers.extend(lowers.into_iter().skip(k));
        Ok(Chain::assemble_shared(top, new_lowers, base))
    })?;
    Ok(())
}
