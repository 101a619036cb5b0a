//! `ops_chain`: sequences of whole-image operations on a chain of real files in a scratch
//! directory (tmpfs), checked against a byte model, in the spirit of tests/ops.rs. The input
//! picks a raw base (none, as long as the device, shorter), the chunk size and data checksums,
//! then up to 40 steps:
//!
//! - write, discard, write zeroes (allocating or not), flush: on the writable chain, kept open
//!   between these steps (opened with `Chain::open` when needed);
//! - snapshot (`ops::snapshot`, up to a depth of 16), flatten in place, flatten --output raw
//!   or cowdisk, commit --force (refused without a cowdisk parent): on the paths, after a clean
//!   close, exactly as the CLI runs them;
//! - kill: the directory is copied as it is (what the files hold when a process dies: every
//!   completed write is in the page cache, metadata the process kept in memory is not), the
//!   open chain is dropped without close on the old copy, and the chain is opened again from
//!   the new copy (the dirty-open recovery runs); or a clean close and reopen.
//!
//! Checks: after every step the device reads as the model (after a kill: every 4 KiB block
//! holds its content at the last flush or one it was given since, and the model becomes what
//! was recovered); frozen layers and the raw base never change (but the parent a commit
//! writes into); flatten --output files read as the device; commit leaves the overlay empty;
//! `check --chain` finds nothing wrong (only leaked space after a kill).

use super::{pattern, span, Bytes, History, ScratchDir};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::format::header::ParentFormat;
use cowdisk::ops::check::{check, CheckOptions};
use cowdisk::ops::flatten::{flatten_in_place, flatten_to, OutputFormat};
use cowdisk::ops::{commit, snapshot};
use cowdisk::{Chain, ChainOptions, DiskFlush, DiskRead, DiskWrite, DiskZero, ErrorKind};
use std::path::{Path, PathBuf};

const SIZES: [u64; 3] = [512 * 1024, 300 * 1024 + 512, 64 * 1024];
const MAX_STEPS: usize = 40;
const MAX_IO: u64 = 200_000;
const MAX_DEPTH: usize = 16;
const TOP: &str = "disk.cow";

struct World {
    dir: ScratchDir,
    size: u64,
    chunk: u64,
    /// The writable chain while write steps run; closed for the operations on paths.
    chain: Option<Chain>,
    model: Vec<u8>,
    history: History,
    /// Files (by name) that must not change, with their bytes.
    frozen: Vec<(String, Vec<u8>)>,
    snaps: usize,
    outputs: usize,
    kills: usize,
}

impl World {
    fn top(&self) -> PathBuf {
        self.dir.join(TOP)
    }

    fn chain(&mut self, what: &str) -> &Chain {
        if self.chain.is_none() {
            let c = Chain::open(&self.top(), ChainOptions { writable: true, ..Default::default() })
                .unwrap_or_else(|e| panic!("{what}: open the chain: {e}"));
            self.chain = Some(c);
        }
        self.chain.as_ref().expect("open")
    }

    /// Closes the chain cleanly (everything durable).
    fn close(&mut self, what: &str) {
        if let Some(c) = self.chain.take() {
            c.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
        }
        self.history.flushed();
    }

    fn depth(&self) -> usize {
        Chain::open(&self.top(), ChainOptions { inspect: true, ..Default::default() }).expect("inspect").depth()
    }

    fn read_device(&self, path: &Path, what: &str) -> Vec<u8> {
        let c = Chain::open(path, ChainOptions::default()).unwrap_or_else(|e| panic!("{what}: open read-only: {e}"));
        let mut got = vec![0u8; c.size() as usize];
        c.read_at(&mut got, 0).unwrap_or_else(|e| panic!("{what}: read: {e}"));
        got
    }

    fn assert_model(&self, got: &[u8], what: &str) {
        assert_eq!(got.len(), self.model.len(), "{what}: size");
        if got != self.model {
            let at = got.iter().zip(&self.model).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{what}: device differs from the model at byte {at}: {:#04x}, want {:#04x}",
                got[at], self.model[at]
            );
        }
    }

    /// With the chain closed: contents, frozen files, check.
    fn verify(&self, what: &str) {
        assert!(self.chain.is_none());
        let got = self.read_device(&self.top(), what);
        self.assert_model(&got, what);
        for (name, bytes) in &self.frozen {
            let now = std::fs::read(self.dir.join(name)).unwrap_or_else(|e| panic!("{what}: read {name}: {e}"));
            assert!(now == *bytes, "{what}: {name} changed");
        }
        let r = check(&self.top(), &CheckOptions { chain: true, ..Default::default() }, &|_, _| {});
        assert!(r.unreadable().is_none() && !r.corrupt(), "{what}: check says {r:?}");
        if self.kills == 0 {
            assert_eq!(r.exit_code(), 0, "{what}: check says {r:?}");
        }
    }

    fn step(&mut self, b: &mut Bytes, step: usize) {
        let op = b.u8();
        let what = format!("step {step} (op {})", op % 12);
        let size = self.size;
        match op % 12 {
            0..=3 => {
                let (off, len) = span(b, size, self.chunk, MAX_IO);
                let d = pattern(u64::from(b.u32()), len as usize);
                self.chain(&what).write_at(&d, off).unwrap_or_else(|e| panic!("{what}: write {off}+{len}: {e}"));
                self.history
                    .change(&mut self.model, off, len, |m| m[off as usize..(off + len) as usize].copy_from_slice(&d));
            }
            4 | 5 => {
                let (off, len) = span(b, size, self.chunk, size);
                let allocate = op & 0x80 != 0;
                let len = if allocate { len.min(MAX_IO) } else { len };
                let c = self.chain(&what);
                if op % 12 == 4 { c.discard(off, len) } else { c.write_zeroes(off, len, allocate) }
                    .unwrap_or_else(|e| panic!("{what}: zero {off}+{len}: {e}"));
                self.history.change(&mut self.model, off, len, |m| m[off as usize..(off + len) as usize].fill(0));
            }
            6 => {
                self.chain(&what).flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
                self.history.flushed();
            }
            7 => {
                self.close(&what);
                if self.depth() >= MAX_DEPTH {
                    return;
                }
                self.snaps += 1;
                let name = format!("snap{}.cow", self.snaps);
                snapshot::snapshot(&self.top(), &self.dir.join(&name))
                    .unwrap_or_else(|e| panic!("{what}: snapshot: {e}"));
                let bytes = std::fs::read(self.dir.join(&name)).expect("read snapshot");
                self.frozen.push((name, bytes));
                self.verify(&format!("{what}: after snapshot"));
            }
            8 => {
                self.close(&what);
                flatten_in_place(&self.top(), &|_, _| {}).unwrap_or_else(|e| panic!("{what}: flatten: {e}"));
                assert_eq!(self.depth(), 1, "{what}: flatten left parents");
                self.verify(&format!("{what}: after flatten in place"));
            }
            9 => {
                self.close(&what);
                self.outputs += 1;
                let raw = op & 0x80 != 0;
                let out = self.dir.join(&format!("out{}", self.outputs));
                let f = if raw { OutputFormat::Raw } else { OutputFormat::Cowdisk };
                flatten_to(&self.top(), &out, f, &|_, _| {})
                    .unwrap_or_else(|e| panic!("{what}: flatten --output: {e}"));
                let got = if raw {
                    std::fs::read(&out).expect("read output")
                } else {
                    let c = Chain::open(&out, ChainOptions::default()).expect("open output");
                    assert_eq!(c.depth(), 1, "{what}: flatten --output cowdisk has parents");
                    drop(c);
                    self.read_device(&out, &what)
                };
                self.assert_model(&got, &format!("{what}: flatten --output {f:?}"));
                let _ = std::fs::remove_file(&out);
                self.verify(&format!("{what}: after flatten --output"));
            }
            10 => {
                self.close(&what);
                let h = cowdisk::layer::read_header_only(&self.top()).expect("header");
                match h.parent {
                    Some(p) if p.format == ParentFormat::Cowdisk => {
                        commit::commit(&self.top(), true, &|_, _| {}).unwrap_or_else(|e| panic!("{what}: commit: {e}"));
                        let pp = cowdisk::chain::resolve_parent_path(&self.top(), &p);
                        for f in self.frozen.iter_mut().filter(|f| self.dir.join(&f.0) == pp) {
                            f.1 = std::fs::read(&pp).expect("read parent");
                        }
                        let c = Chain::open(&self.top(), ChainOptions { inspect: true, ..Default::default() })
                            .expect("open");
                        assert_eq!(c.top().data_bytes(), 0, "{what}: commit left data in the overlay");
                    }
                    _ => {
                        let e =
                            commit::commit(&self.top(), true, &|_, _| {}).expect_err("commit without a cowdisk parent");
                        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{what}: {e}");
                    }
                }
                self.verify(&format!("{what}: after commit"));
            }
            _ if op & 0x80 != 0 => {
                // Clean close, reopen and verify.
                self.close(&what);
                self.verify(&format!("{what}: after close"));
            }
            _ => self.kill(&what),
        }
    }

    /// The process dies: the files are what they are now; the next process opens them.
    fn kill(&mut self, what: &str) {
        let next = ScratchDir::new("ops");
        for e in std::fs::read_dir(self.dir.path()).expect("list").flatten() {
            std::fs::copy(e.path(), next.path().join(e.file_name())).expect("copy file");
        }
        // The dead process's chain goes (its drop writes only to the old directory).
        drop(self.chain.take());
        self.dir = next;
        self.kills += 1;
        let got = {
            let c = self.chain(what);
            let mut got = vec![0u8; c.size() as usize];
            c.read_at(&mut got, 0).unwrap_or_else(|e| panic!("{what}: read after the kill: {e}"));
            got
        };
        self.history.check_crash(&self.model, &got, &format!("{what}: after a kill"));
        self.model = got;
        self.history.flushed();
    }
}

/// What the fuzz target runs.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let setup = b.u8();
    let size = SIZES[usize::from(setup & 3) % SIZES.len()];
    let shift = if setup & 4 != 0 { 16 } else { 12 };
    let checksums = setup & 8 != 0;
    let dir = ScratchDir::new("ops");
    let mut model = vec![0u8; size as usize];
    let mut frozen = Vec::new();
    let mut o = CreateOptions {
        size: Some(size),
        chunk_shift: Some(shift),
        data_checksums: Some(checksums),
        ..Default::default()
    };
    let base_len = match (setup >> 4) & 3 {
        0 => None,
        1 => Some(size),
        2 => Some(size - 12_345),
        _ => Some(size / 3),
    };
    if let Some(len) = base_len {
        let p = dir.join("base.raw");
        let bytes = pattern(77, len as usize);
        model[..len as usize].copy_from_slice(&bytes);
        std::fs::write(&p, &bytes).expect("write base");
        frozen.push(("base.raw".to_string(), bytes));
        o.backing = Some(p);
    }
    create_image(&dir.join(TOP), &o).expect("create").close().expect("close new image");
    let mut w = World {
        dir,
        size,
        chunk: 1 << shift,
        chain: None,
        model,
        history: History::default(),
        frozen,
        snaps: 0,
        outputs: 0,
        kills: 0,
    };
    for step in 0..MAX_STEPS {
        if b.is_empty() {
            break;
        }
        w.step(&mut b, step);
    }
    w.close("end");
    w.verify("end");
}
