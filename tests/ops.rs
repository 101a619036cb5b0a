//! Snapshot, flatten and commit on random chains of depth 1 to 16, checked against a byte
//! model: after every operation the merged device reads exactly as before, no frozen layer or
//! raw base changes (except the parent a commit writes into), and check finds nothing wrong.

mod common;

use common::{pattern, TempDir};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::ops::check::{check, CheckOptions};
use cowdisk::ops::flatten::{flatten_in_place, flatten_to, OutputFormat};
use cowdisk::ops::{commit, snapshot};
use cowdisk::{Chain, ChainOptions, DiskRead, DiskWrite, DiskZero, ErrorKind};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

const SIZE: u64 = 512 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Discard { off: u64, len: u64 },
    Snapshot,
    FlattenInPlace,
    FlattenTo { raw: bool },
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0..SIZE, 1u64..200_000).prop_map(|(o, l)| (o, l.min(SIZE - o)));
    prop_oneof![
        5 => (span.clone(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
        1 => span.prop_map(|(off, len)| Op::Discard { off, len }),
        3 => Just(Op::Snapshot),
        1 => Just(Op::FlattenInPlace),
        1 => any::<bool>().prop_map(|raw| Op::FlattenTo { raw }),
        1 => Just(Op::Commit),
    ]
}

struct World {
    dir: TempDir,
    top: PathBuf,
    model: Vec<u8>,
    /// Files that must not change, with their bytes.
    frozen: Vec<(PathBuf, Vec<u8>)>,
    snaps: usize,
    outputs: usize,
}

fn rw(p: &Path) -> Chain {
    Chain::open(p, ChainOptions { writable: true, ..Default::default() }).unwrap()
}

impl World {
    /// A fresh top, over a raw base of `base_len` bytes when given (shorter than the device:
    /// what lies past its end reads as zeros).
    fn new(base_len: Option<u64>, shift: u32, checksums: bool) -> World {
        let dir = TempDir::new("ops");
        let top = dir.join("disk.cow");
        let mut model = vec![0u8; SIZE as usize];
        let mut frozen = Vec::new();
        let mut o = CreateOptions {
            size: Some(SIZE),
            chunk_shift: Some(shift),
            data_checksums: Some(checksums),
            ..Default::default()
        };
        if let Some(len) = base_len {
            let b = dir.join("base.raw");
            let bytes = pattern(77, len as usize);
            model[..len as usize].copy_from_slice(&bytes);
            std::fs::write(&b, &bytes).unwrap();
            frozen.push((b.clone(), bytes));
            o.backing = Some(b);
        }
        create_image(&top, &o).unwrap().close().unwrap();
        World { dir, top, model, frozen, snaps: 0, outputs: 0 }
    }

    fn depth(&self) -> usize {
        Chain::open(&self.top, ChainOptions { inspect: true, ..Default::default() }).unwrap().depth()
    }

    fn verify(&self, what: &str) {
        let c = Chain::open(&self.top, ChainOptions::default()).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        c.read_at(&mut got, 0).unwrap();
        if got != self.model {
            let at = got.iter().zip(&self.model).position(|(a, b)| a != b).unwrap();
            panic!("after {what}: device differs from the model at byte {at}");
        }
        drop(c);
        for (p, bytes) in &self.frozen {
            assert!(std::fs::read(p).unwrap() == *bytes, "after {what}: {} changed", p.display());
        }
        let r = check(&self.top, &CheckOptions { chain: true, ..Default::default() }, &|_, _| {});
        assert_eq!(r.exit_code(), 0, "after {what}: check says {r:?}");
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, seed } => {
                let c = rw(&self.top);
                let d = pattern(seed, len);
                c.write_at(&d, off).unwrap();
                c.close().unwrap();
                self.model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            Op::Discard { off, len } => {
                let c = rw(&self.top);
                c.discard(off, len).unwrap();
                c.close().unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snapshot => {
                if self.depth() >= 16 {
                    return;
                }
                self.snaps += 1;
                let s = self.dir.join(&format!("snap{}.cow", self.snaps));
                snapshot::snapshot(&self.top, &s).unwrap();
                self.frozen.push((s.clone(), std::fs::read(&s).unwrap()));
            }
            Op::FlattenInPlace => {
                flatten_in_place(&self.top, &|_, _| {}).unwrap();
                assert_eq!(self.depth(), 1);
            }
            Op::FlattenTo { raw } => {
                self.outputs += 1;
                let out = self.dir.join(&format!("out{}", self.outputs));
                let f = if raw { OutputFormat::Raw } else { OutputFormat::Cowdisk };
                flatten_to(&self.top, &out, f, &|_, _| {}).unwrap();
                let got = if raw {
                    std::fs::read(&out).unwrap()
                } else {
                    let c = Chain::open(&out, ChainOptions::default()).unwrap();
                    assert_eq!(c.depth(), 1);
                    let mut v = vec![0u8; SIZE as usize];
                    c.read_at(&mut v, 0).unwrap();
                    v
                };
                assert!(got == self.model, "flatten --output differs from the device");
            }
            Op::Commit => {
                let h = cowdisk::layer::read_header_only(&self.top).unwrap();
                match h.parent {
                    Some(p) if p.format == cowdisk::format::header::ParentFormat::Cowdisk => {
                        let e = commit::commit(&self.top, false, &|_, _| {}).unwrap_err();
                        assert!(e.to_string().contains("--force"), "{e}");
                        commit::commit(&self.top, true, &|_, _| {}).unwrap();
                        let pp = cowdisk::chain::resolve_parent_path(&self.top, &p);
                        // The parent is the one file allowed to change; the top is empty now.
                        for f in self.frozen.iter_mut().filter(|f| f.0 == pp) {
                            f.1 = std::fs::read(&pp).unwrap();
                        }
                        let c = Chain::open(&self.top, ChainOptions { inspect: true, ..Default::default() }).unwrap();
                        assert_eq!(c.top().data_bytes(), 0);
                    }
                    _ => {
                        let e = commit::commit(&self.top, true, &|_, _| {}).unwrap_err();
                        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 500, ..ProptestConfig::default() })]

    #[test]
    fn operations_keep_the_device_and_the_frozen_layers(
        base_len in prop::option::of(prop::sample::select(vec![SIZE, SIZE - 12_345, SIZE / 3])),
        shift in prop::sample::select(vec![12u32, 16]),
        checksums in any::<bool>(),
        setup_depth in 0usize..15,
        ops in prop::collection::vec(op(), 1..25),
    ) {
        let mut w = World::new(base_len, shift, checksums);
        // Build a chain of the drawn depth first: a write and a snapshot per level.
        for i in 0..setup_depth {
            w.apply(&Op::Write { off: (i as u64 * 37_000) % SIZE, len: 30_000, seed: i as u64 });
            w.apply(&Op::Snapshot);
        }
        w.verify("setup");
        for op in &ops {
            w.apply(op);
            w.verify(&format!("{op:?}"));
        }
        let _ = w.dir.path();
    }
}

#[test]
fn snapshot_interrupted_after_its_decision_completes_on_next_open() {
    let d = TempDir::new("snapcrash");
    let top = d.join("disk.cow");
    create_image(&top, &CreateOptions { size: Some(SIZE), ..Default::default() }).unwrap().close().unwrap();
    let c = rw(&top);
    c.write_at(&pattern(1, 100_000), 5000).unwrap();
    c.close().unwrap();
    drop(c);
    let expect = {
        let c = Chain::open(&top, ChainOptions::default()).unwrap();
        let mut v = vec![0u8; SIZE as usize];
        c.read_at(&mut v, 0).unwrap();
        v
    };
    // Reproduce each intermediate state a crash can leave after the intent record is durable,
    // by running a real snapshot and then undoing the later steps on copies of the files.
    let snap = d.join("s.cow");
    snapshot::snapshot(&top, &snap).unwrap();
    let overlay = std::fs::read(&top).unwrap();
    let frozen = std::fs::read(&snap).unwrap();
    assert!(cowdisk::layer::read_header_only(&snap).unwrap().pending.is_none(), "record cleared after completion");
    for (stage, finish) in [("decided", "open"), ("linked", "open"), ("decided", "rerun"), ("linked", "rerun")] {
        let s = TempDir::new(stage);
        let (t, sn) = (s.join("disk.cow"), s.join("s.cow"));
        let temp = s.join(".disk.cow.snapshot-1.tmp");
        // The decision's state: the frozen image, carrying its intent record, under the live
        // name, and the complete new overlay under its temporary name.
        std::fs::write(&t, &frozen).unwrap();
        let opts = cowdisk::layer::OpenOptions {
            write: true,
            lock: cowdisk::storage::LockMode::Exclusive,
            allow_frozen: true,
            allow_corrupt: false,
        };
        let img = cowdisk::layer::Image::open(&t, opts).unwrap();
        img.update_header(|h| {
            h.pending = Some(cowdisk::format::header::PendingSnapshot {
                live: b"disk.cow".to_vec(),
                snapshot: b"s.cow".to_vec(),
                temp: b".disk.cow.snapshot-1.tmp".to_vec(),
            })
        })
        .unwrap();
        img.close().unwrap();
        drop(img);
        std::fs::write(&temp, &overlay).unwrap();
        if stage == "linked" {
            std::fs::hard_link(&t, &sn).unwrap();
        }
        // Inspection leaves it alone and sees the same contents through the frozen image.
        let c = Chain::open(&t, ChainOptions { inspect: true, ..Default::default() }).unwrap();
        let mut v = vec![0u8; SIZE as usize];
        c.read_at(&mut v, 0).unwrap();
        assert!(v == expect, "{stage}: contents differ before completion");
        drop(c);
        // A reader leaves it alone too (spec §5.7.1: writers complete it).
        let c = Chain::open(&t, ChainOptions::default()).unwrap();
        assert_eq!(c.depth(), 1, "{stage}: a read-only open completed the snapshot");
        drop(c);
        assert!(temp.exists(), "{stage}: a read-only open moved the new overlay");
        // A writer's open by the live name finishes the snapshot, and so does the same
        // snapshot run again (the command was killed: the user runs it again).
        if finish == "rerun" {
            snapshot::snapshot(&t, &sn).unwrap_or_else(|e| panic!("{stage}: snapshot run again: {e}"));
        }
        let c = Chain::open(&t, ChainOptions { writable: true, ..Default::default() }).unwrap();
        assert_eq!(c.depth(), 2, "{stage}: the live name is the overlay again");
        c.read_at(&mut v, 0).unwrap();
        assert!(v == expect, "{stage}: contents changed");
        drop(c);
        assert!(cowdisk::layer::read_header_only(&sn).unwrap().pending.is_none());
        assert!(!temp.exists());
    }
}

#[test]
fn snapshot_refuses_an_image_in_use_and_an_existing_name() {
    let d = TempDir::new("snapbusy");
    let top = d.join("disk.cow");
    create_image(&top, &CreateOptions { size: Some(SIZE), ..Default::default() }).unwrap().close().unwrap();
    std::fs::write(d.join("taken.cow"), b"x").unwrap();
    let e = snapshot::snapshot(&top, &d.join("taken.cow")).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let held = rw(&top);
    let e = snapshot::snapshot(&top, &d.join("s.cow")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    drop(held);
    assert!(!d.join("s.cow").exists());
}

/// Flatten of a chain whose stretches are long enough for file-to-file copies (from the base,
/// a lower layer and the top, across the 64 MiB copy windows, the base ending mid-block) and
/// short ones between them: every output holds what the device reads.
#[test]
fn flatten_of_long_and_short_stretches_across_copy_windows_matches_the_device() {
    const DEV: u64 = 70 << 20;
    for checksums in [false, true] {
        let dir = TempDir::new("flatten-long");
        let base = dir.join("base.raw");
        let base_len = (66 << 20) + 5;
        std::fs::write(&base, pattern(5, base_len as usize)).unwrap();
        let top = dir.join("disk.cow");
        let o = CreateOptions {
            size: Some(DEV),
            backing: Some(base),
            data_checksums: Some(checksums),
            ..Default::default()
        };
        create_image(&top, &o).unwrap().close().unwrap();
        let write = |off: u64, len: usize, seed: u64| {
            let c = rw(&top);
            c.write_at(&pattern(seed, len), off).unwrap();
            c.close().unwrap();
        };
        // Lower layer: a long run crossing the first window's end, scattered blocks, a hole.
        write((63 << 20) + 4096, 2 << 20, 1);
        for i in 0..200u64 {
            write(i * 311_296 + 8192, 4096, 100 + i);
        }
        let c = rw(&top);
        c.discard(10 << 20, 300_000).unwrap();
        c.close().unwrap();
        drop(c);
        snapshot::snapshot(&top, &dir.join("lower.cow")).unwrap();
        // Top: a long run, a short unaligned one, and data past the base's end.
        write(20 << 20, (1 << 20) + 12_288, 2);
        write(30_000, 5_000, 3);
        write((68 << 20) - 3, 400_000, 4);
        let chain = Chain::open(&top, ChainOptions::default()).unwrap();
        let mut want = vec![0u8; DEV as usize];
        chain.read_at(&mut want, 0).unwrap();
        drop(chain);
        let raw = dir.join("flat.raw");
        flatten_to(&top, &raw, OutputFormat::Raw, &|_, _| {}).unwrap();
        assert!(std::fs::read(&raw).unwrap() == want, "raw flatten differs (checksums {checksums})");
        let cow = dir.join("flat.cow");
        flatten_to(&top, &cow, OutputFormat::Cowdisk, &|_, _| {}).unwrap();
        flatten_in_place(&top, &|_, _| {}).unwrap();
        for p in [&cow, &top] {
            let c = Chain::open(p, ChainOptions::default()).unwrap();
            assert_eq!(c.depth(), 1);
            let mut got = vec![0u8; DEV as usize];
            c.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{} differs from the device (checksums {checksums})", p.display());
            drop(c);
            let r = check(p, &CheckOptions { deep: true, ..Default::default() }, &|_, _| {});
            assert_eq!(r.exit_code(), 0, "{}: {r:?}", p.display());
        }
    }
}

/// A commit of a top smaller than its parent, whose size ends inside a block: the parent's
/// bytes past the top's end are not the top's, and every other overlay on the parent must go
/// on reading them (a review found them overwritten with the zeros of the top's slot).
#[test]
fn commit_of_a_smaller_top_ending_inside_a_block_keeps_the_parent_bytes_past_its_end() {
    const P: usize = 12_288;
    const T: u64 = 10_240;
    // Each change in a writable open of its own, closed (and unlocked) before the next step.
    let edit = |image: &Path, f: &dyn Fn(&Chain)| {
        let c = rw(image);
        f(&c);
        c.close().unwrap();
    };
    let make = |d: &TempDir, base: bool, fill: usize| -> PathBuf {
        let (p0, p) = (d.join("p0.cow"), d.join("p.cow"));
        let mut o = CreateOptions { size: Some(P as u64), chunk_shift: Some(12), ..Default::default() };
        if base {
            std::fs::write(d.join("base.raw"), vec![0x77u8; P]).unwrap();
            o.backing = Some(d.join("base.raw"));
        }
        create_image(&p0, &o).unwrap().close().unwrap();
        edit(&p0, &|c| c.write_at(&vec![0x55u8; fill], 0).unwrap());
        snapshot::snapshot(&p0, &p).unwrap();
        p
    };
    let device = |image: &Path| -> Vec<u8> {
        let c = Chain::open(image, ChainOptions::default()).unwrap();
        let mut v = vec![0u8; c.size() as usize];
        c.read_at(&mut v, 0).unwrap();
        v
    };
    let top_on = |d: &TempDir, p: &Path, name: &str| -> PathBuf {
        let t = d.join(name);
        let o = CreateOptions { size: Some(T), backing: Some(p.to_path_buf()), ..Default::default() };
        create_image(&t, &o).unwrap().close().unwrap();
        t
    };
    // (what the top does, how much of the parent holds 0x55, what the parent shows after)
    let wrote = |v: &mut Vec<u8>| v[8192..9216].fill(0x66);
    let zeroed = |v: &mut Vec<u8>| v[8192..T as usize].fill(0);
    type Change = fn(&Chain);
    let write: Change = |c| c.write_at(&[0x66u8; 1024], 8192).unwrap();
    let discard: Change = |c| c.discard(8192, T - 8192).unwrap();
    for (what, change, fill) in [
        ("a write, the parent's block data", write, P),
        ("a discard, the parent's block data", discard, P),
        ("a write, the parent's block absent and nothing below it", write, 8192),
    ] {
        let d = TempDir::new("commit-tail");
        let p = make(&d, false, fill);
        let mut want = device(&p);
        let t = top_on(&d, &p, "t.cow");
        edit(&t, &change);
        if what.starts_with("a write") {
            wrote(&mut want);
        } else {
            zeroed(&mut want);
        }
        commit::commit(&t, true, &|_, _| {}).unwrap();
        // Another overlay on the parent, of the parent's size, reads all of it.
        let v = top_on(&d, &p, "v.cow");
        let o = CreateOptions { size: Some(P as u64), backing: Some(p.clone()), ..Default::default() };
        std::fs::remove_file(&v).unwrap();
        create_image(&v, &o).unwrap().close().unwrap();
        let got = device(&v);
        let at = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(at.is_none(), "{what}: the parent differs from what it should show at byte {at:?}");
        assert_eq!(device(&t), want[..T as usize], "{what}: the top after the commit");
        let r = check(&p, &CheckOptions::default(), &|_, _| {});
        assert_eq!(r.exit_code(), 0, "{what}: check of the parent says {r:?}");
    }

    // The parent does not hold the block and a raw base below it does: the commit would need
    // the base's bytes, so it is refused and nothing changes.
    let d = TempDir::new("commit-tail-below");
    let p = make(&d, true, 8192);
    let before = device(&p);
    let t = top_on(&d, &p, "t.cow");
    edit(&t, &write);
    let shown = device(&t);
    let e = commit::commit(&t, true, &|_, _| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(device(&p) == before, "the refused commit changed the parent's device");
    let r = check(&p, &CheckOptions::default(), &|_, _| {});
    assert_eq!(r.exit_code(), 0, "after the refused commit, check of the parent says {r:?}");
    assert_eq!(device(&t), shown, "the refused commit changed the top's device");
}
