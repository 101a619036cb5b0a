//! A remote layer as a chain sees it: a read-only store holding a cowdisk image made up from
//! the manifest (headers and map sectors encoded here, one data slot per chunk with content,
//! whose bytes are fetched when read), or the bytes of a raw base. So the chain reads a remote
//! layer through the same code as a local file, and every chunk it touches is fetched once,
//! through the shared cache.

use super::chunks::LayerChunks;
use super::manifest::{Digest, LayerKind, Manifest};
use super::trace::Recorder;
use super::{fetch_entry, fetch_manifest, parent_layer, read_ahead, RepoUrl};
use crate::error::{err, ErrorKind, Result};
use crate::format::header::{Header, MapExtent, ParentFormat, ParentRef};
use crate::format::map::{encode_sector, MapEntry};
use crate::format::{Geometry, FLAG_FROZEN, HEADER_SLOT_SIZE, SECTOR_SIZE};
use crate::layer::raw::RawImage;
use crate::layer::{Image, OpenOptions};
use crate::storage::Storage;
use crate::sync::lock;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A remote parent, opened: a cowdisk layer or a raw base.
pub enum Opened {
    Layer(Box<Image>),
    Raw(RawImage),
}

/// Opens the remote layer a parent reference names (format-spec §9.5): its manifest fetched
/// and checked, and its identity checked against the reference.
pub fn open_parent(pref: &ParentRef) -> Result<Opened> {
    let url_text = String::from_utf8_lossy(&pref.path).into_owned();
    let (repo, digest) = parent_layer(&pref.path)?;
    let m = fetch_manifest(&repo, &digest)?;
    let changed = |what: String| err(ErrorKind::ParentChanged, format!("remote parent {url_text} changed: {what}"));
    if m.virtual_size != pref.size {
        return Err(changed(format!("size is {}, the overlay was made on {}", m.virtual_size, pref.size)));
    }
    if m.kind == LayerKind::Cowdisk && m.uuid != pref.uuid {
        return Err(changed("another UUID".into()));
    }
    let path = Path::new(&url_text);
    let layer = RemoteLayer::new(repo, digest, m)?;
    Ok(match layer.manifest.kind {
        LayerKind::Cowdisk => Opened::Layer(Box::new(Image::open_on(Arc::new(layer), path, OpenOptions::read_only())?)),
        LayerKind::Raw => {
            let size = layer.manifest.virtual_size;
            Opened::Raw(RawImage::on(Arc::new(layer), path, size))
        }
    })
}

/// How long reads go uncached after the cache failed to take a layer before it is tried again.
const CACHE_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

struct RemoteLayer {
    repo: RepoUrl,
    digest: Digest,
    manifest: Arc<Manifest>,
    /// Its chunks in the shared cache, opened at the first read (opening makes files there,
    /// which `info` or `map` should not).
    chunks: OnceLock<Arc<LayerChunks>>,
    /// After the cache failed to take the layer: no new try before this time (a try may
    /// evict to make room, which a cache failing again and again should not repeat per read).
    cache_retry: Mutex<Option<std::time::Instant>>,
    /// Cowdisk: the header area (both header slots).
    header: Vec<u8>,
    data_start: u64,
    /// Cowdisk: the entry behind each data slot, in slot order.
    slots: Vec<usize>,
    /// Where the map extent starts (cowdisk), and its bytes.
    map_start: u64,
    map: Vec<u8>,
    /// Raw: the entry of each chunk with content.
    by_chunk: HashMap<u64, usize>,
    len: u64,
    /// The last chunk read (entry number + 1; 0 for none), to see sequential reads.
    last: AtomicU64,
    reading_ahead: Arc<AtomicBool>,
    /// The entries this process fetched (a bit each): a sequential reader among them is on
    /// the frontier of what the cache holds, and only there is reading ahead worth a request.
    fetched_here: Arc<EntryBits>,
    /// Where first reads are recorded, when this process records traces.
    recorder: Option<Arc<Mutex<Recorder>>>,
}

impl std::fmt::Debug for RemoteLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteLayer({})", self.repo)
    }
}

impl RemoteLayer {
    fn new(repo: RepoUrl, digest: Digest, manifest: Manifest) -> Result<RemoteLayer> {
        let manifest = Arc::new(manifest);
        super::trace::start_prefetch(&repo, &digest, &manifest);
        let mut l = RemoteLayer {
            recorder: super::trace::recorder(&repo, &digest),
            repo,
            digest,
            chunks: OnceLock::new(),
            cache_retry: Mutex::new(None),
            header: Vec::new(),
            data_start: 0,
            slots: Vec::new(),
            map_start: 0,
            map: Vec::new(),
            by_chunk: HashMap::new(),
            len: manifest.virtual_size,
            last: AtomicU64::new(0),
            reading_ahead: Arc::new(AtomicBool::new(false)),
            fetched_here: Arc::new(EntryBits::new(manifest.entries.len())),
            manifest,
        };
        match l.manifest.kind {
            LayerKind::Raw => {
                l.by_chunk = l.manifest.entries.iter().enumerate().map(|(i, e)| (e.chunk, i)).collect();
            }
            LayerKind::Cowdisk => l.make_image()?,
        }
        Ok(l)
    }

    /// The cowdisk image this layer reads as: both header slots valid, one data slot per
    /// chunk with content in chunk order, the map in one extent after the slots.
    fn make_image(&mut self) -> Result<()> {
        let m = &self.manifest;
        let geom = Geometry::new(m.virtual_size, m.chunk_shift)?;
        let cs = geom.chunk_size();
        self.data_start = geom.data_start();
        self.slots = m.entries.iter().enumerate().filter(|(_, e)| e.content.is_some()).map(|(i, _)| i).collect();
        self.map_start = self.data_start + self.slots.len() as u64 * cs;
        let eps = geom.entries_per_sector();
        let sectors = m.entries.len().div_ceil(eps);
        let mut slot_of = HashMap::new();
        for (k, &i) in self.slots.iter().enumerate() {
            slot_of.insert(i, self.data_start + k as u64 * cs);
        }
        self.map = Vec::with_capacity(sectors * SECTOR_SIZE);
        for s in 0..sectors {
            let off = self.map_start + (s * SECTOR_SIZE) as u64;
            let entries: Vec<MapEntry> = m.entries[s * eps..((s + 1) * eps).min(m.entries.len())]
                .iter()
                .enumerate()
                .map(|(j, e)| MapEntry {
                    chunk: e.chunk,
                    data_offset: slot_of.get(&(s * eps + j)).copied().unwrap_or(0),
                    blocks: e
                        .blocks
                        .clone()
                        .unwrap_or_else(|| crate::format::blocks::BlockStates::new(geom.blocks_per_chunk())),
                    crcs: Vec::new(),
                })
                .collect();
            let refs: Vec<Option<&MapEntry>> = (0..eps).map(|j| entries.get(j)).collect();
            self.map.extend_from_slice(&encode_sector(&geom, off, &refs));
        }
        let parent = m.parent.map(|p| ParentRef {
            format: ParentFormat::Remote,
            path: self.repo.layer_url(&p.digest).into_bytes(),
            uuid: p.uuid,
            size: p.size,
            fingerprint: 0,
        });
        let mut h = Header::new(geom, m.uuid, parent);
        h.set_flag(FLAG_FROZEN, true);
        if !self.map.is_empty() {
            let len = (self.map.len() as u64).next_multiple_of(cs);
            h.map_extents.push(MapExtent { offset: self.map_start, len });
        }
        self.header = vec![0u8; 2 * HEADER_SLOT_SIZE];
        h.generation = 0;
        self.header[..HEADER_SLOT_SIZE].copy_from_slice(&h.encode());
        h.generation = 1;
        self.header[HEADER_SLOT_SIZE..].copy_from_slice(&h.encode());
        self.len = self.map_start + self.map.len() as u64;
        Ok(())
    }

    /// The layer's chunks in the cache; `None` while the cache cannot take it (its directory
    /// full or broken): reads then go to the store, uncached, rather than fail.
    fn chunks(&self) -> Option<Arc<LayerChunks>> {
        if let Some(c) = self.chunks.get() {
            return Some(c.clone());
        }
        let mut retry = lock(&self.cache_retry);
        if retry.is_some_and(|t| std::time::Instant::now() < t) {
            return None;
        }
        let stats = &super::store::STATS;
        match super::shared_cache().and_then(|c| c.layer(&self.digest, &self.manifest)) {
            Ok(c) => {
                // Told once per outage, by whichever layer the cache takes first after it: every
                // layer fails alike while the cache is broken.
                if stats.cache_down.swap(false, Ordering::AcqRel) {
                    super::store::cache_notice("the cache takes remote layers again");
                }
                Some(self.chunks.get_or_init(|| c).clone())
            }
            Err(e) => {
                *retry = Some(std::time::Instant::now() + CACHE_RETRY);
                lock(&stats.cache_error).get_or_insert_with(|| e.to_string());
                if !stats.cache_down.swap(true, Ordering::AcqRel) {
                    super::store::cache_notice(&format!(
                        "the cache cannot take remote layers ({e}): their reads go to the store uncached, \
                         without read-ahead; it is tried again every {} s",
                        CACHE_RETRY.as_secs()
                    ));
                }
                None
            }
        }
    }

    /// Fills `out` from entry `i`'s content at `at` (zeros past its end): from the cache, or
    /// fetched with the records after it (see [`RemoteLayer::run_from`]). A read of the entry
    /// after the last one read starts fetching the few after it in the background.
    fn read_entry(&self, i: usize, at: usize, out: &mut [u8]) -> Result<()> {
        let e = &self.manifest.entries[i];
        let Some((digest, loc)) = &e.content else {
            out.fill(0);
            return Ok(());
        };
        if let Some(r) = &self.recorder {
            lock(r).saw(e.chunk);
        }
        let m = out.len().min((loc.length as usize).saturating_sub(at));
        let Some(chunks) = self.chunks() else {
            // No cache: this read's record alone, checked as any fetch is; nothing read ahead.
            super::store::STATS.uncached_reads.fetch_add(1, Ordering::Relaxed);
            let got = super::fetch_records(&self.repo, &[(i, *digest, *loc)])?;
            let content = got.first().map(|(_, c)| c).ok_or_else(|| err(ErrorKind::Io, "a fetch returned nothing"))?;
            out[..m].copy_from_slice(&content[at..at + m]);
            out[m..].fill(0);
            return Ok(());
        };
        let prev = self.last.swap(i as u64 + 1, Ordering::Relaxed);
        // Read ahead for a sequential reader on the frontier: reading what this process
        // fetched, or about to miss. One reading what the cache held before (a warm boot) is
        // not: ahead of it lie chunks nobody read last time, and fetching them only takes
        // the store's and the machine's time from the reads that matter.
        if prev == i as u64 && i > 0 && (self.fetched_here.get(i - 1) || self.fetched_here.get(i) || !chunks.has(i)) {
            self.read_ahead_from(&chunks, i + 1);
        }
        if !chunks.read(i, at, &mut out[..m]) {
            let followers = self.followers(i);
            let content = fetch_entry(&self.repo, &self.manifest, &chunks, i, &followers)?;
            for j in std::iter::once(i).chain(followers) {
                self.fetched_here.set(j);
            }
            out[..m].copy_from_slice(&content[at..at + m]);
        }
        out[m..].fill(0);
        Ok(())
    }

    /// The entries whose records follow entry `i`'s in its pack, one after the other, up to
    /// `fetch_window()` stored bytes with `i`'s: what one ranged GET can bring along for a
    /// read of `i` that missed (those kept already, or being fetched, cut the run short).
    fn followers(&self, i: usize) -> Vec<usize> {
        let window = super::fetch_window().min(self.ahead_bound());
        let mut run = Vec::new();
        let Some((_, first)) = self.manifest.entries.get(i).and_then(|e| e.content) else { return run };
        let mut end = first.offset + u64::from(first.stored);
        let mut total = u64::from(first.stored);
        for (j, e) in self.manifest.entries.iter().enumerate().skip(i + 1).take(64) {
            // Chunks without content have no record: the next record may still follow on.
            let Some((_, loc)) = e.content else { continue };
            if loc.pack != first.pack || loc.offset != end || total + u64::from(loc.stored) > window {
                break;
            }
            end += u64::from(loc.stored);
            total += u64::from(loc.stored);
            run.push(j);
        }
        run
    }

    /// The most bytes fetched beyond what a read asked for, at once (a miss's fetch window,
    /// or the read-ahead): an eighth of the cache's bound. What comes along is only worth its
    /// fetch if the cache still holds it when it is read; in a cache a few windows large the
    /// fills after it evict it first, and each later read of it fetches a window again (one
    /// read of a 40 MiB layer fetched 171 MiB with a 64K bound, 58 MiB with 1M; measured
    /// 2026-12-04).
    fn ahead_bound(&self) -> u64 {
        super::shared_cache().map_or(0, |c| c.ahead_bound())
    }

    fn read_ahead_from(&self, chunks: &Arc<LayerChunks>, first: usize) {
        let n = read_ahead();
        if n == 0 || self.reading_ahead.swap(true, Ordering::AcqRel) {
            return;
        }
        // Only chunks the cache lacks: reading ahead what it holds would only read the cache
        // file for nothing (a warm boot read 4 cached chunks ahead of every sequential read).
        let mut budget = self.ahead_bound();
        let todo: Vec<usize> = (first..self.manifest.entries.len())
            .filter(|&j| self.manifest.entries[j].content.is_some())
            .take(n)
            .filter(|&j| !chunks.has(j))
            .take_while(|&j| {
                let len = self.manifest.entries[j].content.map_or(0, |(_, l)| u64::from(l.length));
                let fits = len <= budget;
                budget = budget.saturating_sub(len);
                fits
            })
            .collect();
        let Some(bg) = (!todo.is_empty()).then(super::Background::start).flatten() else {
            self.reading_ahead.store(false, Ordering::Release);
            return;
        };
        let (repo, busy, chunks, m, ours) = (
            self.repo.clone(),
            self.reading_ahead.clone(),
            chunks.clone(),
            self.manifest.clone(),
            self.fetched_here.clone(),
        );
        std::thread::spawn(move || {
            for j in todo {
                if bg.stopping() || fetch_entry(&repo, &m, &chunks, j, &[]).is_err() {
                    break;
                }
                ours.set(j);
            }
            busy.store(false, Ordering::Release);
            drop(bg);
        });
    }
}

/// One bit per manifest entry, set from any thread.
struct EntryBits(Vec<AtomicU64>);

impl EntryBits {
    fn new(n: usize) -> EntryBits {
        EntryBits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn set(&self, i: usize) {
        if let Some(w) = self.0.get(i / 64) {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }
}

fn read_only() -> crate::Error {
    err(ErrorKind::ReadOnly, "a remote layer is never written")
}

impl Storage for RemoteLayer {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let out = &mut buf[done..];
            let n = match self.manifest.kind {
                LayerKind::Raw => {
                    let cs = self.manifest.chunk_size();
                    let (c, at) = (pos / cs, (pos % cs) as usize);
                    let n = out.len().min(cs as usize - at);
                    match self.by_chunk.get(&c) {
                        _ if pos >= self.len => out[..n].fill(0),
                        Some(&i) => self.read_entry(i, at, &mut out[..n])?,
                        None => out[..n].fill(0),
                    }
                    n
                }
                LayerKind::Cowdisk => {
                    let cs = self.manifest.chunk_size();
                    if pos < self.header.len() as u64 {
                        let n = out.len().min(self.header.len() - pos as usize);
                        out[..n].copy_from_slice(&self.header[pos as usize..pos as usize + n]);
                        n
                    } else if pos < self.data_start {
                        let n = out.len().min((self.data_start - pos) as usize);
                        out[..n].fill(0);
                        n
                    } else if pos < self.map_start {
                        let (k, at) =
                            (((pos - self.data_start) / cs) as usize, ((pos - self.data_start) % cs) as usize);
                        let n = out.len().min(cs as usize - at);
                        self.read_entry(self.slots[k], at, &mut out[..n])?;
                        n
                    } else if pos < self.len {
                        let at = (pos - self.map_start) as usize;
                        let n = out.len().min(self.map.len() - at);
                        out[..n].copy_from_slice(&self.map[at..at + n]);
                        n
                    } else {
                        out.fill(0);
                        out.len()
                    }
                }
            };
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn punch(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    fn allocated_bytes(&self) -> Option<u64> {
        Some(0)
    }
}
