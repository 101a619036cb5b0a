//! Crash-state explorer: random workloads (writes, zeroes, discards, flushes, then maybe a
//! flatten or a commit) run on recording stores; at many crash points we rebuild what a power
//! cut could leave (synced state plus any subset of unsynced sector writes, torn at 512 bytes)
//! and check each state: it opens (repairing a dirty image), every sector reads as its value
//! at the last completed flush or a value written since, lower layers are untouched, and the
//! image has no inconsistency (leaks allowed). Snapshots are explored the same way, with the
//! directory's name changes (create, link, rename) recorded and replayed as a crash may leave
//! them: every state opens as the state before the snapshot or the state after it.
//!
//! Seeded and reproducible. The normal run explores at least 1,000 states; set
//! COWDISK_CRASH_STATES to explore more (e.g. 100000).

mod common;

use common::pattern;
use cowdisk::format::header::{ParentFormat, ParentRef};
use cowdisk::format::{Geometry, FLAG_FROZEN};
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::ops::{commit::commit_into, flatten::flatten_chain};
use cowdisk::storage::recording::{CrashImages, Journal, RecordingStorage};
use cowdisk::storage::{LockMode, MemStorage, Storage};
use cowdisk::{Chain, DiskFlush, DiskRead, DiskWrite, DiskZero};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 192 * 1024;
const SECTORS: usize = (SIZE / 512) as usize;
const TOP: usize = 0;
const MID: usize = 1;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn hash(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &x in b {
        h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn sector_hashes(model: &[u8]) -> Vec<u64> {
    model.chunks(512).map(hash).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finale {
    None,
    Flatten,
    Commit,
}

/// What a workload did, with journal positions, to judge any crash state.
struct Run {
    journal: Arc<Journal>,
    base: Arc<Vec<u8>>,
    /// (journal index after it completed, sector hashes of the model then)
    flushes: Vec<(usize, Vec<u64>)>,
    /// (journal index when it started, sector, hash written)
    writes: Vec<(usize, usize, u64)>,
    /// Journal index from which the middle layer may change (a commit started), if any.
    mid_may_change_from: Option<usize>,
    mid_bytes_before: Vec<u8>,
    start: usize,
    end: usize,
}

fn raw_base(bytes: &Arc<Vec<u8>>) -> RawImage {
    RawImage::on(Arc::new(MemStorage::from_bytes(bytes.as_ref().clone())), Path::new("base.raw"), bytes.len() as u64)
}

fn workload(seed: u64, finale: Finale) -> Run {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let journal = Journal::new();
    let base = Arc::new(pattern(seed, SIZE as usize));
    let shift = [12u32, 14, 16][rng.below(3) as usize];

    // A frozen middle layer over the raw base, with some data of its own.
    let mid_store = Arc::new(RecordingStorage::new(journal.clone(), MID));
    let raw_ref =
        ParentRef { format: ParentFormat::Raw, path: b"base.raw".to_vec(), uuid: [0; 16], size: SIZE, fingerprint: 0 };
    let mid = Image::create_on(
        mid_store.clone(),
        Path::new("mid"),
        Geometry::new(SIZE, 16).unwrap().with_data_checksums(rng.below(2) == 0).unwrap(),
        Some(raw_ref),
        [2; 16],
    )
    .unwrap();
    let c = Chain::assemble(mid, Vec::new(), Some(raw_base(&base)));
    let mut model = base.as_ref().clone();
    for i in 0..6u64 {
        let off = rng.below(SIZE - 20_000);
        let d = pattern(seed ^ (i + 100), 15_000);
        c.write_at(&d, off).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    c.top().update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
    c.close().unwrap();
    drop(c);
    let mid_ro = Image::open_on(mid_store.clone(), Path::new("mid"), OpenOptions::read_only()).unwrap();

    let top_store = Arc::new(RecordingStorage::new(journal.clone(), TOP));
    let mid_ref =
        ParentRef { format: ParentFormat::Cowdisk, path: b"mid".to_vec(), uuid: [2; 16], size: SIZE, fingerprint: 0 };
    let top = Image::create_on(
        top_store.clone(),
        Path::new("top"),
        Geometry::new(SIZE, shift).unwrap().with_data_checksums(rng.below(2) == 0).unwrap(),
        Some(mid_ref),
        [1; 16],
    )
    .unwrap();
    top.flush().unwrap();
    let chain = Chain::assemble(top, vec![mid_ro], Some(raw_base(&base)));
    let start = journal.len();
    let mid_bytes_before = mid_store_bytes(&mid_store);

    let mut run = Run {
        journal: journal.clone(),
        base: base.clone(),
        flushes: vec![(start, sector_hashes(&model))],
        writes: Vec::new(),
        mid_may_change_from: None,
        mid_bytes_before,
        start,
        end: 0,
    };
    let ops = 20 + rng.below(30);
    for i in 0..ops {
        let at = journal.len();
        let r = rng.below(10);
        let off = if rng.below(3) == 0 { rng.below(SIZE / 4096) * 4096 } else { rng.below(SIZE) };
        let max_len = if rng.below(4) == 0 { 70_000 } else { 9_000 };
        let len = (1 + rng.below(max_len)).min(SIZE - off);
        let touched = match r {
            0..=4 => {
                let d = pattern(seed ^ (i << 20), len as usize);
                chain.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                true
            }
            5 => {
                chain.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                true
            }
            6 => {
                chain.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                true
            }
            _ => {
                chain.flush().unwrap();
                run.flushes.push((journal.len(), sector_hashes(&model)));
                false
            }
        };
        if touched {
            let (s0, s1) = ((off / 512) as usize, (off + len).div_ceil(512) as usize);
            for s in s0..s1 {
                run.writes.push((at, s, hash(&model[s * 512..(s + 1) * 512])));
            }
        }
    }
    match finale {
        Finale::None => {}
        Finale::Flatten => flatten_chain(&chain, &|_, _| {}).unwrap(),
        Finale::Commit => {
            run.mid_may_change_from = Some(journal.len());
            let opts = OpenOptions { write: true, lock: LockMode::None, allow_frozen: true, allow_corrupt: false };
            let mid_rw = Image::open_on(mid_store.clone(), Path::new("mid"), opts).unwrap();
            commit_into(chain.top(), &mid_rw, &|_, _| {}).unwrap();
            mid_rw.close().unwrap();
        }
    }
    run.end = journal.len();
    run
}

fn mid_store_bytes(s: &RecordingStorage) -> Vec<u8> {
    let mut b = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut b, 0).unwrap();
    b
}

/// Opens the crash state and reads its whole device, or says why it cannot.
fn open_state(top: Vec<u8>, mid: Vec<u8>, run: &Run) -> Result<Vec<u8>, String> {
    let top_img = Image::open_on(Arc::new(MemStorage::from_bytes(top)), Path::new("top"), OpenOptions::writable())
        .map_err(|e| format!("top does not open: {e}"))?;
    let chain = match top_img.parent() {
        None => Chain::assemble(top_img, Vec::new(), None),
        Some(p) => {
            let mid_img =
                Image::open_on(Arc::new(MemStorage::from_bytes(mid)), Path::new("mid"), OpenOptions::read_only())
                    .map_err(|e| format!("middle layer does not open: {e}"))?;
            if mid_img.uuid() != p.uuid {
                return Err("top names another parent".into());
            }
            Chain::assemble(top_img, vec![mid_img], Some(raw_base(&run.base)))
        }
    };
    let mut dev = vec![0u8; SIZE as usize];
    chain.read_at(&mut dev, 0).map_err(|e| format!("read fails: {e}"))?;
    // A repaired, reopened state must also flush and close cleanly.
    chain.flush().map_err(|e| format!("flush after recovery fails: {e}"))?;
    chain.close().map_err(|e| format!("close after recovery fails: {e}"))?;
    Ok(dev)
}

/// Runs `check` on each layer of the crash state as a power cut left it (before any repair):
/// leaked space is allowed, an inconsistency is not.
fn check_state(top: &[u8], mid: &[u8]) -> Result<(), String> {
    use cowdisk::ops::check::{check, CheckOptions};
    let scratch = common::TempDir::new("crashcheck");
    for (name, bytes) in [("top", top), ("mid", mid)] {
        let p = scratch.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("cannot write the crash state: {e}"))?;
        let r = check(&p, &CheckOptions::default(), &|_, _| {});
        if !matches!(r.exit_code(), 0 | 3) || r.images.iter().any(|i| i.unreadable.is_some()) {
            return Err(format!("check finds the {name} layer corrupt: {r:?}"));
        }
    }
    Ok(())
}

fn judge(run: &Run, crash: &CrashImages, k: usize, rng: &mut Rng) -> Result<(), String> {
    let top = crash.state(TOP, k, |n| rng.below(n as u64) as usize);
    let mid = crash.state(MID, k, |n| rng.below(n as u64) as usize);
    match run.mid_may_change_from {
        Some(from) if k > from => {}
        _ => {
            if mid != run.mid_bytes_before {
                return Err("the frozen middle layer changed".into());
            }
        }
    }
    check_state(&top, &mid)?;
    let dev = open_state(top, mid, run)?;
    let fi = run.flushes.partition_point(|(at, _)| *at <= k) - 1;
    let (flushed_at, durable) = &run.flushes[fi];
    let mut allowed: Vec<HashSet<u64>> = durable.iter().map(|&h| HashSet::from([h])).collect();
    for &(at, s, h) in &run.writes {
        if at >= *flushed_at && at < k {
            allowed[s].insert(h);
        }
    }
    for s in 0..SECTORS {
        let h = hash(&dev[s * 512..(s + 1) * 512]);
        if !allowed[s].contains(&h) {
            return Err(format!("sector {s} (byte {}) reads a value neither flushed nor written since", s * 512));
        }
    }
    Ok(())
}

fn explore(target_states: usize) -> usize {
    let finales = [Finale::None, Finale::Flatten, Finale::Commit];
    let per_run = 40;
    let mut states = 0;
    let mut seed = 1u64;
    while states < target_states {
        let finale = finales[(seed % 3) as usize];
        let run = workload(seed, finale);
        let crash = CrashImages::new(&run.journal, 2);
        let mut rng = Rng(seed * 7919 + 1);
        for i in 0..per_run {
            // Spread crash points over the run, including its very end.
            let k = if i == 0 { run.end } else { run.start + rng.below((run.end - run.start + 1) as u64) as usize };
            if let Err(e) = judge(&run, &crash, k, &mut rng) {
                panic!("seed {seed} ({finale:?}), crash at journal index {k} of {}..{}: {e}", run.start, run.end);
            }
            states += 1;
        }
        seed += 1;
    }
    states
}

#[test]
fn every_crash_state_opens_and_reads_flushed_or_newer_data() {
    let target = std::env::var("COWDISK_CRASH_STATES").ok().and_then(|v| v.parse().ok()).unwrap_or(1200);
    let n = explore(target);
    assert!(n >= 1000, "explored only {n} crash states");
    eprintln!("explored {n} crash states");
}

/// Every crash state of a snapshot (file contents and directory names as a power cut could
/// leave them) opens as the state before or the state after, with the same contents.
#[test]
fn every_crash_state_of_a_snapshot_is_before_or_after_it() {
    use cowdisk::ops::check::{check, CheckOptions};
    use cowdisk::ops::snapshot::snapshot_in;
    use cowdisk::storage::namespace::Namespace;
    use cowdisk::storage::recording::RecordingDir;
    use cowdisk::ChainOptions;
    let mut states = 0;
    for seed in 1..=6u64 {
        let journal = Journal::new();
        let dir = RecordingDir::new(journal.clone());
        let live = Path::new("disk.cow");
        let g = Geometry::new(SIZE, 14).unwrap().with_data_checksums(seed % 2 == 0).unwrap();
        let img = Image::create_on(dir.create(live).unwrap(), live, g, None, [seed as u8; 16]).unwrap();
        let c = Chain::assemble(img, Vec::new(), None);
        let model = pattern(seed, SIZE as usize);
        c.write_at(&model, 0).unwrap();
        c.close().unwrap();
        drop(c);
        dir.sync_dir(live).unwrap();
        let start = journal.len();
        snapshot_in(&dir, live, Path::new("snap.cow")).unwrap();
        let end = journal.len();
        let crash = CrashImages::new(&journal, dir.files());
        let mut rng = Rng(seed * 31 + 7);
        for k in start..=end {
            for _ in 0..4 {
                let names = crash.names(k, || rng.below(2) == 0);
                let scratch = common::TempDir::new("snapcrash");
                let mut made: Vec<(usize, std::path::PathBuf)> = Vec::new();
                for (name, file) in &names {
                    let p = scratch.join(name.to_str().unwrap());
                    match made.iter().find(|(f, _)| f == file) {
                        Some((_, first)) => std::fs::hard_link(first, &p).unwrap(),
                        None => std::fs::write(&p, crash.state(*file, k, |n| rng.below(n as u64) as usize)).unwrap(),
                    }
                    made.push((*file, p));
                }
                let top = scratch.join("disk.cow");
                let opened = Chain::open(&top, ChainOptions { writable: true, ..Default::default() });
                let c = opened.unwrap_or_else(|e| panic!("seed {seed}, crash at {k} of {start}..{end}: {e}"));
                let after = scratch.join("snap.cow").exists() && c.depth() == 2;
                assert!(
                    after || c.depth() == 1,
                    "seed {seed}, crash at {k}: a chain of depth {} is neither",
                    c.depth()
                );
                let mut got = vec![0u8; SIZE as usize];
                c.read_at(&mut got, 0).unwrap();
                assert!(got == model, "seed {seed}, crash at {k}: contents changed");
                drop(c);
                let r = check(&top, &CheckOptions { chain: true, ..Default::default() }, &|_, _| {});
                assert!(matches!(r.exit_code(), 0 | 3), "seed {seed}, crash at {k}: check says {r:?}");
                states += 1;
            }
        }
    }
    assert!(states >= 100, "explored only {states} snapshot crash states");
}
