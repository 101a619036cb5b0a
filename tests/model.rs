//! Model-based property test: random operation sequences on real image chains (depth 1 to 8,
//! unaligned offsets, mixed chunk sizes) checked after every step against a plain byte array.

mod common;

use common::{pattern, TempDir};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::format::FLAG_FROZEN;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::{FileStorage, MemStorage, Storage};
use cowdisk::{Chain, ChainOptions, DiskExtents, DiskFlush, DiskRead, DiskWrite, DiskZero};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Zero { off: u64, len: u64, allocate: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: usize },
    Flush,
    Reopen,
    Stack { chunk_shift: u32 },
}

#[derive(Debug, Clone)]
struct Setup {
    size: u64,
    /// Raw base length (may be shorter than the device), or no base.
    base_len: Option<u64>,
    top_shift: u32,
    checksums: bool,
}

const MAX_DEPTH: usize = 8;
/// What read buffers hold before a read: a read must overwrite every byte of it.
const GARBAGE: u8 = 0xA5;

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop::sample::select(vec![256 * 1024u64, 512 * 1024 + 4096 + 512, 1 << 20]),
        prop::option::of(prop::sample::select(vec![100_000u64, 256 * 1024, 1 << 20, 2 << 20])),
        prop::sample::select(vec![12u32, 14, 16]),
        any::<bool>(),
    )
        .prop_map(|(size, base_len, top_shift, checksums)| Setup { size, base_len, top_shift, checksums })
}

fn span(size: u64) -> impl Strategy<Value = (u64, u64)> {
    let edge = prop::sample::select(vec![0u64, 1, 511, 512, 4095, 4096, 4097, 16384, 65535, 65536, 65537]);
    (
        prop_oneof![0..size, edge.clone().prop_map(move |e| e.min(size - 1)), (0..size / 4096).prop_map(|b| b * 4096)],
        prop_oneof![1u64..300_000, edge.prop_map(|e| e.max(1)), (1u64..40).prop_map(|b| b * 4096)],
    )
        .prop_map(move |(off, len)| (off, len.min(size - off)))
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (span(size), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
        2 => (span(size), any::<bool>()).prop_map(|((off, len), allocate)| Op::Zero { off, len, allocate }),
        2 => span(size).prop_map(|(off, len)| Op::Discard { off, len }),
        2 => span(size).prop_map(|(off, len)| Op::Read { off, len: len as usize }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => prop::sample::select(vec![12u32, 14, 16, 17]).prop_map(|chunk_shift| Op::Stack { chunk_shift }),
    ]
}

fn case() -> impl Strategy<Value = (Setup, Vec<Op>)> {
    setup().prop_flat_map(|s| {
        let size = s.size;
        (Just(s), prop::collection::vec(op(size), 1..60))
    })
}

fn open_rw(p: &Path) -> Chain {
    Chain::open(p, ChainOptions { writable: true, ..Default::default() }).expect("open chain")
}

struct World {
    dir: TempDir,
    top: PathBuf,
    chain: Option<Chain>,
    model: Vec<u8>,
    /// Files that must never change again (raw base, frozen layers) with their bytes.
    frozen: Vec<(PathBuf, Vec<u8>)>,
    depth: usize,
    layers_made: usize,
}

impl World {
    fn new(s: &Setup) -> World {
        let dir = TempDir::new("model");
        let mut model = vec![0u8; s.size as usize];
        let mut frozen = Vec::new();
        let top = dir.join("layer0.cow");
        let mut opts = CreateOptions {
            chunk_shift: Some(s.top_shift),
            size: Some(s.size),
            data_checksums: Some(s.checksums),
            ..Default::default()
        };
        let mut depth = 1;
        if let Some(bl) = s.base_len {
            let base = dir.join("base.raw");
            let bytes = pattern(bl, bl as usize);
            std::fs::write(&base, &bytes).unwrap();
            let n = bytes.len().min(model.len());
            model[..n].copy_from_slice(&bytes[..n]);
            frozen.push((base.clone(), bytes));
            opts.backing = Some(base);
            depth += 1;
        }
        create_image(&top, &opts).expect("create top").close().unwrap();
        let chain = Some(open_rw(&top));
        World { dir, top, chain, model, frozen, depth, layers_made: 1 }
    }

    fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("chain open")
    }

    fn check_all(&self, step: usize, op: &Op) {
        // Reads go into buffers full of garbage: the server reuses its reply buffers, so a
        // read must write every byte it returns (zeros of holes included), never rely on them.
        let mut buf = vec![GARBAGE; self.model.len()];
        self.chain().read_at(&mut buf, 0).unwrap();
        if buf != self.model {
            let first = buf.iter().zip(&self.model).position(|(a, b)| a != b).unwrap();
            panic!("device differs from model at byte {first} after step {step} ({op:?})");
        }
        self.check_extents(step, op);
        self.check_copies(step, op);
    }

    /// Block status covers the device in order, and what it calls zero reads as zero.
    fn check_extents(&self, step: usize, op: &Op) {
        let size = self.model.len() as u64;
        let mut pos = 0;
        while pos < size {
            let part = self.chain().extents(pos, size - pos, 7).unwrap();
            assert!(!part.is_empty() && part.len() <= 7, "step {step} ({op:?}): {} extents at {pos}", part.len());
            for e in part {
                assert_eq!(e.offset, pos, "step {step} ({op:?}): extents leave a gap or overlap");
                let bytes = &self.model[e.offset as usize..(e.offset + e.length) as usize];
                if e.kind.reads_zero() {
                    assert!(bytes.iter().all(|&b| b == 0), "step {step} ({op:?}): {e:?} is not zeros");
                }
                pos += e.length;
            }
        }
    }

    /// Copies of the device, file to file and through memory, hold what reads return.
    fn check_copies(&self, step: usize, op: &Op) {
        let size = self.model.len() as u64;
        let out = self.dir.join("copy.raw");
        let _ = std::fs::remove_file(&out);
        let f = FileStorage::create(&out).unwrap();
        let mut buf = Vec::new();
        self.chain().copy_to(0, size, &f, 1000, &mut buf, |_| {}).unwrap();
        drop(f);
        let got = std::fs::read(&out).unwrap();
        assert!(got[1000..] == self.model[..], "step {step} ({op:?}): file-to-file copy differs from the device");
        let (off, len) = (size / 3 + 1, size / 2);
        let mem = MemStorage::new();
        self.chain().copy_to(off, len, &mem, 0, &mut buf, |_| {}).unwrap();
        let mut got = vec![GARBAGE; len as usize];
        mem.read_at(&mut got, 0).unwrap();
        assert!(
            got[..] == self.model[off as usize..(off + len) as usize],
            "step {step} ({op:?}): copy through memory differs"
        );
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, seed } => {
                let data = pattern(seed, len);
                self.chain().write_at(&data, off).unwrap();
                self.model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Zero { off, len, allocate } => {
                self.chain().write_zeroes(off, len, allocate).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                self.chain().discard(off, len).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let mut buf = vec![GARBAGE; len];
                self.chain().read_at(&mut buf, off).unwrap();
                assert_eq!(&buf[..], &self.model[off as usize..off as usize + len], "read at {off}+{len}");
            }
            Op::Flush => self.chain().flush().unwrap(),
            Op::Reopen => {
                let c = self.chain.take().unwrap();
                c.close().unwrap();
                drop(c);
                self.chain = Some(open_rw(&self.top));
            }
            Op::Stack { chunk_shift } => {
                if self.depth >= MAX_DEPTH {
                    return;
                }
                let c = self.chain.take().unwrap();
                c.close().unwrap();
                drop(c);
                let img = Image::open(&self.top, OpenOptions::writable()).unwrap();
                img.update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
                img.close().unwrap();
                drop(img);
                self.frozen.push((self.top.clone(), std::fs::read(&self.top).unwrap()));
                let next = self.dir.join(&format!("layer{}.cow", self.layers_made));
                self.layers_made += 1;
                let opts = CreateOptions {
                    backing: Some(self.top.clone()),
                    chunk_shift: Some(chunk_shift),
                    ..Default::default()
                };
                create_image(&next, &opts).unwrap().close().unwrap();
                self.top = next;
                self.depth += 1;
                self.chain = Some(open_rw(&self.top));
                assert_eq!(self.chain().depth(), self.depth);
            }
        }
    }

    fn check_frozen_unchanged(&self) {
        for (p, bytes) in &self.frozen {
            assert!(std::fs::read(p).unwrap() == *bytes, "{} changed", p.display());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 4000, ..ProptestConfig::default() })]

    #[test]
    fn chain_matches_byte_model((s, ops) in case()) {
        let mut w = World::new(&s);
        for (i, op) in ops.iter().enumerate() {
            w.apply(op);
            w.check_all(i, op);
        }
        let c = w.chain.take().unwrap();
        c.close().unwrap();
        drop(c);
        w.check_frozen_unchanged();
        // Everything closed cleanly reads back the same after a fresh open.
        w.chain = Some(open_rw(&w.top));
        w.check_all(ops.len(), &Op::Reopen);
        let _ = w.dir.path();
    }
}
