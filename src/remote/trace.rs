//! Trace-based prefetch (format-spec §9.8): recording the order in which a workload first reads
//! the chunks of each remote layer, storing it with the layer, and fetching those chunks first
//! when a layer that has a trace is opened to be served.
//!
//! Both are process-wide switches a server turns on ([`set_recording`], [`set_prefetch`]); an
//! `info` or `check` never records or prefetches.

use super::manifest::{decode_trace, encode_trace, hex, Digest, Location, Manifest};
use super::{fetch_entry, store, RepoUrl};
use crate::error::{ErrorKind, Result};
use crate::sync::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

static RECORDING: AtomicBool = AtomicBool::new(false);
static PREFETCH: AtomicBool = AtomicBool::new(false);

/// Record first reads of remote chunks from now on (layers opened later record).
pub fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

/// Whether first reads are being recorded (a `--record-trace` server).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Fetch the traced chunks of remote layers opened from now on, in the background.
pub fn set_prefetch(on: bool) {
    PREFETCH.store(on, Ordering::Relaxed);
}

/// The first-read order of one layer's chunks.
#[derive(Default)]
pub(crate) struct Recorder {
    order: Vec<u64>,
    seen: HashSet<u64>,
}

impl Recorder {
    pub(crate) fn saw(&mut self, chunk: u64) {
        if self.seen.insert(chunk) {
            self.order.push(chunk);
        }
    }
}

type Recorders = Mutex<HashMap<(RepoUrl, Digest), Arc<Mutex<Recorder>>>>;

fn recorders() -> &'static Recorders {
    static R: OnceLock<Recorders> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The recorder of layer `d` when recording is on (one per layer and process, however many
/// times the layer is opened).
pub(crate) fn recorder(repo: &RepoUrl, d: &Digest) -> Option<Arc<Mutex<Recorder>>> {
    if !RECORDING.load(Ordering::Relaxed) {
        return None;
    }
    Some(lock(recorders()).entry((repo.clone(), *d)).or_default().clone())
}

/// A trace written by [`save_recorded`].
#[derive(Debug, Clone)]
pub struct Saved {
    pub url: String,
    pub chunks: usize,
}

/// Uploads the trace of every layer read since recording began (replacing an earlier trace of
/// the layer); layers none of whose chunks were read get none.
pub fn save_recorded() -> Result<Vec<Saved>> {
    // One save at a time (`trace save` and a stop may meet): a save that copied a shorter
    // order must not upload it after a later one uploaded a longer.
    static SAVING: Mutex<()> = Mutex::new(());
    let _one = lock(&SAVING);
    let all: Vec<_> = lock(recorders()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut out = Vec::new();
    for ((repo, d), rec) in all {
        let order = lock(&rec).order.clone();
        if order.is_empty() {
            continue;
        }
        let key = format!("traces/{}", hex(&d));
        store(&repo)?.put(&key, encode_trace(&order)).map_err(|e| e.during("save trace"))?;
        out.push(Saved { url: format!("{repo}/{key}"), chunks: order.len() });
    }
    Ok(out)
}

/// The trace of layer `d`, if it has one.
pub fn fetch_trace(repo: &RepoUrl, d: &Digest) -> Result<Option<Vec<u64>>> {
    match store(repo)?.get(&format!("traces/{}", hex(d))) {
        Ok(b) => Ok(Some(decode_trace(&b)?)),
        Err(e) if e.kind() == ErrorKind::ParentMissing => Ok(None),
        Err(e) => Err(e),
    }
}

/// Chunks fetched by prefetching since the process started (for `serve`'s log and tests).
pub static PREFETCHED: AtomicUsize = AtomicUsize::new(0);

/// Records at most this far apart in a pack are fetched by one GET (the bytes between them
/// come along and are dropped).
const GAP: u64 = 64 << 10;

/// The traced records in trace order, grouped into runs that one ranged GET each fetches:
/// a record joins the run before it if it lies after that run's end in the same pack, at most
/// [`GAP`] bytes on, and the run stays within `window` bytes.
/// An entry of a manifest with content: its number, digest and record.
type Entry = (usize, Digest, Location);

fn runs_of(todo: &[Entry], window: u64) -> Vec<Vec<Entry>> {
    let mut runs: Vec<Vec<Entry>> = Vec::new();
    for &(i, d, loc) in todo {
        if let Some(run) = runs.last_mut() {
            let (first, last) = (run[0].2, run[run.len() - 1].2);
            let end = last.offset + u64::from(last.stored);
            if loc.pack == first.pack
                && loc.offset >= end
                && loc.offset - end <= GAP
                && loc.offset + u64::from(loc.stored) - first.offset <= window
            {
                run.push((i, d, loc));
                continue;
            }
        }
        runs.push(vec![(i, d, loc)]);
    }
    runs
}

/// Threads fetching one layer's traced chunks.
const PREFETCH_THREADS: usize = 4;

/// When prefetching is on: fetches the traced chunks of layer `d` (whose manifest is `m`) in
/// trace order in the background, a few at a time. Reads asking for a chunk being fetched
/// wait for that fetch (the cache coalesces them). Errors end the prefetch quietly: a read
/// that needs the chunk fetches it itself and reports what goes wrong.
pub(crate) fn start_prefetch(repo: &RepoUrl, d: &Digest, m: &Arc<Manifest>) {
    if !PREFETCH.load(Ordering::Relaxed) {
        return;
    }
    let Ok(cache) = super::shared_cache() else { return };
    let Ok(chunks) = cache.layer(d, m) else { return };
    // What a prefetch brings in must still be in the cache when the boot reads it: half the
    // cache's bound at most (the rest is the reads' own), in runs no longer than a read's
    // (an eighth of the bound, as `followers` keeps them). A longer trace is fetched in part,
    // its head first, as it was read. (A review found a trace larger than the cache fetched
    // whole: the cache kept its tail, and the boot, reading the head first, missed it all.)
    let (budget, run_bound) = (cache.limit() / 2, cache.ahead_bound());
    let Some(bg) = super::Background::start() else { return };
    let (repo, d, m) = (repo.clone(), *d, m.clone());
    std::thread::spawn(move || {
        let Ok(Some(trace)) = fetch_trace(&repo, &d) else { return };
        let by_chunk: HashMap<u64, usize> = m.entries.iter().enumerate().map(|(i, e)| (e.chunk, i)).collect();
        let todo: Vec<Entry> = trace
            .iter()
            .filter_map(|c| by_chunk.get(c))
            .filter_map(|&i| m.entries.get(i).and_then(|e| e.content).map(|(d, loc)| (i, d, loc)))
            .collect();
        let runs = runs_of(&todo, super::fetch_window().min(run_bound));
        let next = AtomicUsize::new(0);
        let taken = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for _ in 0..PREFETCH_THREADS {
                sc.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(run) = runs.get(i) else { break };
                    if bg.stopping() {
                        break;
                    }
                    // A fetch answers from the cache when the run's first record is there,
                    // and would then fetch none of the others.
                    let run: Vec<&Entry> = run.iter().filter(|e| !chunks.has(e.0)).collect();
                    let bytes: u64 = run.iter().map(|e| u64::from(e.2.length)).sum();
                    if taken.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes) > budget {
                        break;
                    }
                    let run: Vec<usize> = run.iter().map(|e| e.0).collect();
                    let Some((&first, followers)) = run.split_first() else { continue };
                    if fetch_entry(&repo, &m, &chunks, first, followers).is_err() {
                        break;
                    }
                    PREFETCHED.fetch_add(run.len(), Ordering::Relaxed);
                });
            }
        });
    });
}
