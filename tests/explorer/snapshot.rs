//! Judging crash states of a snapshot: the files and names a power cut left, laid out in a
//! real directory, open as the chain before the snapshot or the chain after it, with the
//! same contents, and `check` finds nothing worse than leaked space. And the reverse: a crash
//! state loaded into a recording directory, to crash again what the next open does with it.

use super::{open_chain, state_at, write_and_flush, Files, Rng};
use crate::common::{pattern, TempDir};
use cowdisk::chain::pending::complete_pending_in;
use cowdisk::layer::OpenOptions;
use cowdisk::ops::check::{check, CheckOptions};
use cowdisk::storage::namespace::Namespace;
use cowdisk::storage::recording::{CrashImages, Journal, RecordingDir};
use cowdisk::{Chain, ChainOptions, DiskFlush, DiskRead, DiskWrite, DiskZero};
use std::path::{Path, PathBuf};

/// `files`: (name, file id, bytes) of every name in the directory; names of one file id are
/// hard links of one file. The live image is `disk.cow`, the snapshot `snap.cow`.
pub fn snapshot_state_is_before_or_after(files: &[(PathBuf, usize, Vec<u8>)], model: &[u8]) -> Result<(), String> {
    let scratch = TempDir::new("snapcrash");
    let mut made: Vec<(usize, PathBuf)> = Vec::new();
    for (name, file, bytes) in files {
        let p = scratch.join(name.to_str().ok_or("name is not UTF-8")?);
        match made.iter().find(|(f, _)| f == file) {
            Some((_, first)) => std::fs::hard_link(first, &p).map_err(|e| e.to_string())?,
            None => crate::common::write_sparse(&p, bytes).map_err(|e| e.to_string())?,
        }
        made.push((*file, p));
    }
    let top = scratch.join("disk.cow");
    let c = Chain::open(&top, ChainOptions { writable: true, ..Default::default() })
        .map_err(|e| format!("does not open: {e}"))?;
    let after = scratch.join("snap.cow").exists() && c.depth() == 2;
    if !(after || c.depth() == 1) {
        return Err(format!("a chain of depth {} is neither before nor after", c.depth()));
    }
    let mut got = vec![0u8; model.len()];
    c.read_at(&mut got, 0).map_err(|e| format!("read fails: {e}"))?;
    if got != model {
        return Err("contents changed".into());
    }
    drop(c);
    let r = check(&top, &CheckOptions { chain: true, ..Default::default() }, &|_, _| {});
    if !matches!(r.exit_code(), 0 | 3) {
        return Err(format!("check says {r:?}"));
    }
    // A frozen layer can never give space back: the snapshot repairs before it freezes.
    if after && r.images.iter().any(|i| i.path.ends_with("snap.cow") && i.leaked_bytes > 0) {
        return Err(format!("the snapshot froze leaked space: {r:?}"));
    }
    Ok(())
}

/// The session after a crash of a snapshot: the next open of the live image (finishing the
/// snapshot, or going on without it) takes writes and discards and flushes them, the power
/// fails just after the last flush, and what that leaves must still be the chain before or
/// after the snapshot, reading `model` with the session's requests applied.
///
/// With `rewrites` (the chunk size) the requests repeat the shape of the test's session
/// before the snapshot: a discard of chunk 5, flushed, then one to three one-block rewrites of
/// block 1, each flushed. Their journal records then end where one of the older ones lies:
/// a stale record left by a drop of the area cut short, numbered next, would join this chain
/// and be replayed over a newer block (format-spec §5.9 "Dropping the area"; the defect
/// `tests/journal_drop.rs` also pins, found by a review on 2026-12-05).
pub fn later_session(files: &Files, model: &[u8], rewrites: Option<usize>, rng: &mut Rng) -> Result<(), String> {
    let journal = Journal::new();
    let dir = RecordingDir::new(journal.clone());
    populate(&dir, files);
    let live = Path::new("disk.cow");
    complete_pending_in(&dir, live).map_err(|e| format!("finishing the snapshot fails: {e}"))?;
    let chain = open_chain(&dir, live, &[], OpenOptions::writable())?;
    let mut want = model.to_vec();
    match rewrites {
        None => write_and_flush(&chain, &mut want, rng)?,
        Some(chunk) => {
            let fail = |e: cowdisk::Error| format!("a request of the session fails: {e}");
            chain.discard(5 * chunk as u64, chunk as u64).map_err(fail)?;
            want[5 * chunk..6 * chunk].fill(0);
            chain.flush().map_err(fail)?;
            for _ in 0..1 + rng.below(3) {
                let d = pattern(rng.next(), 4096);
                chain.write_at(&d, 4096).map_err(fail)?;
                want[4096..8192].copy_from_slice(&d);
                chain.flush().map_err(fail)?;
            }
        }
    }
    let k = journal.len();
    drop(chain);
    let files = state_at(&CrashImages::new(&journal, dir.files()), k, rng);
    snapshot_state_is_before_or_after(&files, &want)
        .map_err(|e| format!("after requests, flushes and a crash in the next session: {e}"))
}

/// Puts `files` into `dir` durably (contents synced, names made and the directory synced).
pub fn populate(dir: &RecordingDir, files: &[(PathBuf, usize, Vec<u8>)]) {
    let mut made: Vec<(usize, PathBuf)> = Vec::new();
    for (name, file, bytes) in files {
        match made.iter().find(|(f, _)| f == file) {
            Some((_, first)) => dir.link(first, name).unwrap(),
            None => {
                let s = dir.create(name).unwrap();
                s.write_at(bytes, 0).unwrap();
                s.sync().unwrap();
            }
        }
        made.push((*file, name.clone()));
    }
    if let Some((_, p)) = made.first() {
        dir.sync_dir(Path::new(p)).unwrap();
    }
}
