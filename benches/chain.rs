//! Criterion benchmarks of the library's hot paths: a 4 KiB read at chain depth 1, 16 and 64
//! (lookup alone and with the data copy), the first write of a block (plain and with copy-up),
//! and loading the map when an image is opened.

use cowdisk::format::header::{ParentFormat, ParentRef};
use cowdisk::format::{Geometry, FLAG_FROZEN};
use cowdisk::layer::raw::RawImage;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::storage::{FileStorage, LockMode, MemStorage, Storage};
use cowdisk::{Chain, DiskExtents, DiskRead, DiskWrite};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SIZE: u64 = 256 << 20;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn raw_base() -> RawImage {
    let mut bytes = vec![0u8; SIZE as usize];
    for (i, b) in bytes.iter_mut().enumerate().step_by(512) {
        *b = i as u8;
    }
    RawImage::on(Arc::new(MemStorage::from_bytes(bytes)), Path::new("base"), SIZE)
}

/// A chain of `depth` images in memory: a raw base, `depth - 2` frozen layers each holding 1%
/// of the disk in scattered 4 KiB blocks, and an empty writable top.
fn chain(depth: usize) -> Chain {
    let g = Geometry::new(SIZE, 16).unwrap();
    let mut lowers: Vec<Image> = Vec::new();
    let mut seed = 0x9e37_79b9u64;
    for i in 0..depth.saturating_sub(2) {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let img = Image::create_on(s.clone(), Path::new("layer"), g, None, [i as u8; 16]).unwrap();
        let c = Chain::assemble(img, Vec::new(), None);
        for _ in 0..(SIZE / 4096 / 100) {
            let block = rng(&mut seed) % (SIZE / 4096);
            c.write_at(&[i as u8; 4096], block * 4096).unwrap();
        }
        c.top().update_header(|h| h.set_flag(FLAG_FROZEN, true)).unwrap();
        c.close().unwrap();
        drop(c);
        lowers.insert(0, Image::open_on(s, Path::new("layer"), OpenOptions::read_only()).unwrap());
    }
    let top = Image::create_on(Arc::new(MemStorage::new()), Path::new("top"), g, None, [0xee; 16]).unwrap();
    Chain::assemble(top, lowers, Some(raw_base()))
}

fn read_by_depth(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_4k");
    g.throughput(Throughput::Bytes(4096));
    for depth in [2usize, 16, 64] {
        let ch = chain(depth);
        let mut buf = vec![0u8; 4096];
        let mut seed = 7u64;
        g.bench_with_input(BenchmarkId::new("depth", depth), &depth, |b, _| {
            b.iter(|| {
                let off = (rng(&mut seed) % (SIZE / 4096)) * 4096;
                ch.read_at(&mut buf, off).unwrap();
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("lookup_4k");
    for depth in [2usize, 16, 64] {
        let ch = chain(depth);
        let mut seed = 7u64;
        g.bench_with_input(BenchmarkId::new("depth", depth), &depth, |b, _| {
            b.iter(|| {
                let off = (rng(&mut seed) % (SIZE / 4096)) * 4096;
                ch.extents(off, 4096, 4).unwrap()
            })
        });
    }
    g.finish();
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("cowdisk-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn first_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("first_write");
    g.throughput(Throughput::Bytes(4096));
    for (name, len, offset_in_block) in [("4k_aligned", 4096usize, 0u64), ("1k_copy_up", 1024, 1000)] {
        let p = scratch(name);
        let geom = Geometry::new(1 << 40, 16).unwrap();
        let parent =
            ParentRef { format: ParentFormat::Raw, path: b"base".to_vec(), uuid: [0; 16], size: SIZE, fingerprint: 0 };
        let img =
            Image::create_on(Arc::new(FileStorage::create(&p).unwrap()), &p, geom, Some(parent), [1; 16]).unwrap();
        let ch = Chain::assemble(img, Vec::new(), Some(raw_base()));
        let data = vec![0x5au8; len];
        let mut chunk = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                // Every write lands in a chunk never written before (spread over a 1 TiB disk).
                ch.write_at(&data, chunk * 65536 * 7 + offset_in_block).unwrap();
                chunk += 1;
            })
        });
        drop(ch);
        let _ = std::fs::remove_file(&p);
    }
    g.finish();
}

fn map_load(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    for entries in [1024u64, 16384] {
        let p = scratch(&format!("open-{entries}"));
        let geom = Geometry::new(1 << 40, 16).unwrap();
        let img = Image::create_on(Arc::new(FileStorage::create(&p).unwrap()), &p, geom, None, [2; 16]).unwrap();
        let ch = Chain::assemble(img, Vec::new(), None);
        let stride = (1u64 << 40) / entries;
        for i in 0..entries {
            ch.write_at(&[1u8; 4096], i * stride).unwrap();
        }
        ch.close().unwrap();
        drop(ch);
        g.bench_with_input(BenchmarkId::new("entries", entries), &entries, |b, _| {
            b.iter(|| {
                let s = FileStorage::open(&p, false, LockMode::None).unwrap();
                Image::open_on(Arc::new(s), &p, OpenOptions::inspect()).unwrap().entry_count()
            })
        });
        let _ = std::fs::remove_file(&p);
    }
    g.finish();
}

criterion_group!(benches, read_by_depth, first_write, map_load);
criterion_main!(benches);
