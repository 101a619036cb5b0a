//! Live snapshots of a chain under concurrent writers, on real files: every snapshot holds
//! each write acknowledged before it was asked for, none that began after it returned, and
//! the writers never see an error; the live chain goes on reading exactly what was written.

mod common;

use common::{pattern, TempDir};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::live::LiveChain;
use cowdisk::storage::namespace::RealFs;
use cowdisk::{Chain, ChainOptions, DiskFlush, DiskRead, DiskWrite};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const THREADS: u64 = 3;

/// One acknowledged write of one block: when it was called and when it returned (a clock
/// shared with the snapshots), and its bytes.
struct Wrote {
    called: u64,
    returned: u64,
    block: u64,
    data: Vec<u8>,
}

#[test]
fn live_snapshots_hold_exactly_the_acknowledged_writes_and_writers_see_no_error() {
    let dir = TempDir::new("live");
    let base = dir.join("base.raw");
    let initial = pattern(1, SIZE as usize);
    std::fs::write(&base, &initial).unwrap();
    let top = dir.join("disk.cow");
    let opts =
        CreateOptions { backing: Some(base), chunk_shift: Some(14), data_checksums: Some(true), ..Default::default() };
    create_image(&top, &opts).unwrap().close().unwrap();
    let live =
        Arc::new(LiveChain::new(Chain::open(&top, ChainOptions { writable: true, ..Default::default() }).unwrap()));
    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<Wrote>::new()));
    // Each thread owns the blocks b with b % THREADS == t, so the writes of one block are
    // ordered; writes are of one block, or of a block and a half (a partial block: copy-up).
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (live, clock, stop, log) = (live.clone(), clock.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = (i * 7919 + t) % (SIZE / BLOCK / THREADS) * THREADS + t;
                    let data = pattern(t << 32 | i, BLOCK as usize);
                    let called = clock.fetch_add(1, Ordering::SeqCst);
                    live.write_at(&data, block * BLOCK).expect("a write during live snapshots failed");
                    if i % 5 == 0 {
                        live.flush().expect("a flush during live snapshots failed");
                    }
                    let returned = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().push(Wrote { called, returned, block, data });
                    i += 1;
                }
            })
        })
        .collect();
    let mut snaps: Vec<(PathBuf, u64, u64)> = Vec::new();
    let mut longest = std::time::Duration::ZERO;
    for k in 0..12 {
        std::thread::sleep(std::time::Duration::from_millis(15));
        let snap = dir.join(&format!("snap{k}.cow"));
        let called = clock.fetch_add(1, Ordering::SeqCst);
        let paused = live.snapshot(&RealFs, &snap).unwrap_or_else(|e| panic!("snapshot {k}: {e}"));
        let returned = clock.fetch_add(1, Ordering::SeqCst);
        longest = longest.max(paused);
        snaps.push((snap, called, returned));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let log = log.lock().unwrap();
    assert!(log.len() > 100, "the writers wrote only {} blocks", log.len());
    eprintln!("{} writes, {} live snapshots, longest pause {longest:?}", log.len(), snaps.len());

    // Each snapshot, read as the chain below it: per block, the last write acknowledged before
    // the snapshot was asked for, or a write of it that began before the snapshot returned.
    for (snap, called, returned) in &snaps {
        let c = Chain::open(snap, ChainOptions::default()).unwrap();
        let mut got = vec![0u8; BLOCK as usize];
        for b in 0..SIZE / BLOCK {
            c.read_at(&mut got, b * BLOCK).unwrap();
            let writes: Vec<&Wrote> = log.iter().filter(|w| w.block == b).collect();
            let durable = writes.iter().rev().find(|w| w.returned < *called);
            let initial_block = &initial[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let mut allowed: Vec<&[u8]> = vec![durable.map_or(initial_block, |w| &w.data[..])];
            allowed
                .extend(writes.iter().filter(|w| w.called < *returned && w.returned >= *called).map(|w| &w.data[..]));
            assert!(
                allowed.contains(&&got[..]),
                "{}: block {b} holds a value that was neither acknowledged before the snapshot nor written during it",
                snap.display()
            );
        }
    }
    // The live chain reads the last write of every block.
    let mut got = vec![0u8; BLOCK as usize];
    for b in 0..SIZE / BLOCK {
        live.read_at(&mut got, b * BLOCK).unwrap();
        let want = log
            .iter()
            .rev()
            .find(|w| w.block == b)
            .map_or(&initial[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize], |w| &w.data[..]);
        assert!(got == want, "block {b} of the live chain");
    }
    live.close().unwrap();
    let r = cowdisk::ops::check::check(
        &top,
        &cowdisk::ops::check::CheckOptions { chain: true, ..Default::default() },
        &|_, _| {},
    );
    assert_eq!(r.exit_code(), 0, "{r:?}");
}

/// A snapshot adds a layer; where that would make the chain deeper than the format's 64
/// images, it is refused (offline and live) and nothing changes: before, the chain grew
/// past the limit and would no longer open.
#[test]
fn a_snapshot_that_would_make_the_chain_too_deep_is_refused() {
    use cowdisk::ops::snapshot::snapshot;
    use cowdisk::ErrorKind;
    let dir = TempDir::new("deep");
    let base = dir.join("base.raw");
    std::fs::write(&base, pattern(3, 65536)).unwrap();
    let top = dir.join("disk.cow");
    create_image(&top, &CreateOptions { backing: Some(base), ..Default::default() }).unwrap().close().unwrap();
    for i in 0..254 {
        snapshot(&top, &dir.join(&format!("s{i}.cow"))).unwrap();
    }
    let c = Chain::open(&top, ChainOptions { writable: true, ..Default::default() }).unwrap();
    assert_eq!(c.depth(), 256);
    let live = LiveChain::new(c);
    let e = live.snapshot(&RealFs, &dir.join("one-more.cow")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChainTooDeep, "{e}");
    live.write_at(&[5u8; 4096], 0).expect("the export goes on after the refusal");
    live.close().unwrap();
    let e = snapshot(&top, &dir.join("one-more.cow")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChainTooDeep, "{e}");
    assert!(!dir.join("one-more.cow").exists());
    let c = Chain::open(&top, ChainOptions::default()).unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![5u8; 4096]);
}

/// A chain base.raw <- mid.cow (frozen, with data) <- top (with data), on real files, and the
/// device's contents.
fn three_layers(dir: &TempDir, sums: bool) -> (PathBuf, Vec<u8>) {
    use cowdisk::ops::snapshot::snapshot;
    let base = dir.join("base.raw");
    let mut model = pattern(11, SIZE as usize);
    std::fs::write(&base, &model).unwrap();
    let top = dir.join("disk.cow");
    let opts =
        CreateOptions { backing: Some(base), chunk_shift: Some(15), data_checksums: Some(sums), ..Default::default() };
    let c = Chain::assemble(create_image(&top, &opts).unwrap(), Vec::new(), None);
    drop(c);
    let c = Chain::open(&top, ChainOptions { writable: true, ..Default::default() }).unwrap();
    for i in 0..40u64 {
        let off = (i * 193_013) % (SIZE - 70_000);
        let d = pattern(100 + i, 9000 + (i as usize * 1000) % 60_000);
        c.write_at(&d, off).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    c.close().unwrap();
    drop(c);
    snapshot(&top, &dir.join("mid.cow")).unwrap();
    let c = Chain::open(&top, ChainOptions { writable: true, ..Default::default() }).unwrap();
    for i in 0..40u64 {
        let off = (i * 377_111) % (SIZE - 70_000);
        let d = pattern(200 + i, 5000 + (i as usize * 3000) % 60_000);
        c.write_at(&d, off).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    c.close().unwrap();
    (top, model)
}

/// Runs `spec` as a job on the live chain of `top` while two threads write (disjoint 4 KiB
/// blocks, model kept), and returns the live chain and the final model.
fn job_under_writers(
    top: &std::path::Path,
    mut model: Vec<u8>,
    spec: cowdisk::live::jobs::JobSpec,
) -> (Arc<LiveChain>, Vec<u8>, cowdisk::live::jobs::JobState, std::collections::HashSet<u64>) {
    use cowdisk::live::jobs::Jobs;
    let live =
        Arc::new(LiveChain::new(Chain::open(top, ChainOptions { writable: true, ..Default::default() }).unwrap()));
    let jobs = Jobs::default();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Vec::<(u64, Vec<u8>)>::new()));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (live, stop, written) = (live.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = (i * 7919 + t * 3) % (SIZE / BLOCK / 2) * 2 + t;
                    let d = pattern(t << 40 | i, BLOCK as usize);
                    live.write_at(&d, block * BLOCK).expect("a write failed during a job");
                    written.lock().unwrap().push((block, d));
                    i += 1;
                }
            })
        })
        .collect();
    let job = jobs.start(live.clone(), spec, None).unwrap();
    while job.state() == cowdisk::live::jobs::JobState::Running {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let mut blocks = std::collections::HashSet::new();
    for (b, d) in written.lock().unwrap().iter() {
        model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(d);
        blocks.insert(*b);
    }
    (live, model, job.state(), blocks)
}

fn device_of(live: &LiveChain) -> Vec<u8> {
    let mut dev = vec![0u8; SIZE as usize];
    live.read_at(&mut dev, 0).unwrap();
    dev
}

#[test]
fn a_live_flatten_leaves_the_top_standing_alone_with_every_write() {
    use cowdisk::live::jobs::{JobSpec, JobState};
    for sums in [false, true] {
        let dir = TempDir::new("liveflatten");
        let (top, model) = three_layers(&dir, sums);
        let (live, model, state, _) = job_under_writers(&top, model, JobSpec::Flatten);
        assert_eq!(state, JobState::Completed);
        assert!(device_of(&live) == model, "the live device after the flatten (checksums {sums})");
        assert_eq!(live.current().unwrap().depth(), 1);
        live.close().unwrap();
        let c = Chain::open(&top, ChainOptions::default()).unwrap();
        assert_eq!(c.depth(), 1, "the top still names a parent");
        let mut dev = vec![0u8; SIZE as usize];
        c.read_at(&mut dev, 0).unwrap();
        assert!(dev == model, "reopened after the flatten");
    }
}

#[test]
fn a_live_commit_moves_the_top_into_its_parent_and_keeps_the_writes_made_meanwhile() {
    use cowdisk::live::jobs::{JobSpec, JobState};
    for sums in [false, true] {
        let dir = TempDir::new("livecommit");
        let (top, model) = three_layers(&dir, sums);
        let (live, model, state, written) = job_under_writers(&top, model, JobSpec::Commit);
        assert_eq!(state, JobState::Completed);
        assert!(device_of(&live) == model, "the live device after the commit (checksums {sums})");
        assert_eq!(live.current().unwrap().depth(), 3, "top, mid, base");
        live.close().unwrap();
        // No intermediate layer is left, and the top holds only what was written meanwhile.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains(".commit-")), "{names:?}");
        let c = Chain::open(&top, ChainOptions::default()).unwrap();
        let mut dev = vec![0u8; SIZE as usize];
        c.read_at(&mut dev, 0).unwrap();
        assert!(dev == model, "reopened after the commit");
        // The top holds only blocks written while the commit ran; what it held before is in
        // the parent now.
        assert!(c.top().data_bytes() <= written.len() as u64 * BLOCK, "the top's old blocks did not leave it");
        let r = cowdisk::ops::check::check(
            &top,
            &cowdisk::ops::check::CheckOptions { chain: true, deep: true, ..Default::default() },
            &|_, _| {},
        );
        assert_eq!(r.exit_code(), 0, "{r:?}");
    }
}

#[test]
fn a_live_compaction_merges_the_layers_below_the_top_into_one() {
    use cowdisk::live::jobs::{JobSpec, JobState};
    use cowdisk::ops::snapshot::snapshot;
    let dir = TempDir::new("livecompact");
    let (top, mut model) = three_layers(&dir, true);
    // Two more layers, one with a whiteout over data below.
    for k in 0..2u64 {
        let c = Chain::open(&top, ChainOptions { writable: true, ..Default::default() }).unwrap();
        let d = pattern(300 + k, 70_000);
        c.write_at(&d, 100_000 * (k + 1)).unwrap();
        model[(100_000 * (k + 1)) as usize..(100_000 * (k + 1)) as usize + d.len()].copy_from_slice(&d);
        cowdisk::DiskZero::write_zeroes(&c, 1 << 20, 65536, false).unwrap();
        model[1 << 20..(1 << 20) + 65536].fill(0);
        c.close().unwrap();
        drop(c);
        snapshot(&top, &dir.join(&format!("s{k}.cow"))).unwrap();
    }
    let merged = dir.join("merged.cow");
    let (live, model, state, _) =
        job_under_writers(&top, model, JobSpec::Compact { into: merged.clone(), layers: None });
    assert_eq!(state, JobState::Completed);
    assert!(device_of(&live) == model, "the live device after the compaction");
    assert_eq!(live.current().unwrap().depth(), 3, "top, merged, base");
    live.close().unwrap();
    let c = Chain::open(&top, ChainOptions::default()).unwrap();
    assert_eq!(c.depth(), 3);
    let mut dev = vec![0u8; SIZE as usize];
    c.read_at(&mut dev, 0).unwrap();
    assert!(dev == model, "reopened after the compaction");
    let r = cowdisk::ops::check::check(
        &top,
        &cowdisk::ops::check::CheckOptions { chain: true, deep: true, ..Default::default() },
        &|_, _| {},
    );
    assert_eq!(r.exit_code(), 0, "{r:?}");
}
