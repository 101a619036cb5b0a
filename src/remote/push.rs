//! Uploading layers to a repository (format-spec §9.6): what the repository holds is learned
//! from its pack indexes, every chunk it lacks is packed and uploaded (in parallel, a few
//! packs at a time), and each layer's manifest is written only after every pack it names is
//! complete, so a push cut off anywhere leaves no visible partial layer and a rerun uploads
//! only what is missing.
//!
//! A manifest depends only on the layer and on where the repository holds its chunks (the
//! pack chosen for a chunk held twice is the one with the smallest digest), and its `created`
//! field is the layer file's modification time: pushing a layer again writes the same
//! manifest, so "already pushed" is "its manifest is there".

use super::manifest::{
    decode_index, encode_index, hex, pack_key, parse_hex, sha256, ChunkEntry, Codec, Digest, LayerKind, Location,
    Manifest, ParentLayer, RAW_CHUNK_SHIFT,
};
use super::store::Store;
use super::{parent_layer, RepoUrl};
use crate::chain::{resolve_parent_path, Chain, ChainOptions};
use crate::error::{err, ErrorKind, Result};
use crate::format::blocks::BlockState;
use crate::format::header::ParentFormat;
use crate::format::FLAG_FROZEN;
use crate::layer::raw::RawImage;
use crate::layer::Image;
use crate::ops::Progress;
use crate::storage::LockMode;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// A pack is closed (and uploaded) once it holds this many bytes (format-spec §9.2).
pub const PACK_TARGET: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Write tag NAME naming the pushed image's layer.
    pub tag: Option<String>,
    /// Also push every layer below the image that the repository lacks (bottom first);
    /// without it, a layer whose parent is not in the repository is refused.
    pub chain: bool,
    /// Packs uploading at once.
    pub parallel: usize,
    /// zstd level for records.
    pub level: i32,
    /// A pack is sealed and uploaded once it holds this many bytes (default [`PACK_TARGET`]).
    pub pack_size: usize,
}

impl Default for PushOptions {
    fn default() -> PushOptions {
        PushOptions { tag: None, chain: false, parallel: 4, level: 3, pack_size: PACK_TARGET }
    }
}

/// What a push did for one layer.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub path: PathBuf,
    pub digest: Digest,
    pub url: String,
    pub kind: LayerKind,
    /// Chunks with content, and how many of them this push uploaded.
    pub chunks: u64,
    pub uploaded_chunks: u64,
    /// Content bytes of the layer's chunks, and bytes this push stored for it (records).
    pub content_bytes: u64,
    pub uploaded_bytes: u64,
    /// Whether this push wrote the manifest (false: the layer was there already).
    pub new_manifest: bool,
}

/// A local layer to push, bottom first.
enum Local<'a> {
    Raw(&'a RawImage),
    Cowdisk(&'a Image),
}

/// Pushes `image` (a frozen cowdisk layer or a raw file) to `repo`: the layers the repository
/// lacks below it too with `opts.chain`. Returns what was done per layer, bottom first.
pub fn push(image: &Path, repo: &RepoUrl, opts: &PushOptions, progress: Progress) -> Result<Vec<Pushed>> {
    // A bad tag is refused before anything is uploaded.
    if let Some(t) = &opts.tag {
        check_tag_name(t)?;
    }
    let fail = |e: crate::Error| e.during("push");
    let store = super::batch_store(repo)?;
    let format = crate::chain::create::probe_format(image).map_err(fail)?;
    let chain;
    let raw;
    // The local layers, top first, and what stands below the lowest of them in the repository.
    let mut layers: Vec<(Local, PathBuf)> = Vec::new();
    let mut below: Option<ParentLayer> = None;
    match format {
        ParentFormat::Raw => {
            raw = RawImage::open(image, false, LockMode::Shared).map_err(fail)?;
            if raw.size() == 0 {
                return Err(fail(err(ErrorKind::InvalidArgument, "is empty").with_file(image)));
            }
            layers.push((Local::Raw(&raw), image.to_path_buf()));
        }
        _ => {
            chain = Chain::open(image, ChainOptions::default()).map_err(fail)?;
            if !chain.top().header().has_flag(FLAG_FROZEN) {
                return Err(fail(err(
                    ErrorKind::InvalidArgument,
                    "is writable; push takes frozen layers (`cowdisk snapshot IMAGE LAYER` freezes its contents as LAYER)",
                )
                .with_file(image)));
            }
            let all: Vec<&Image> =
                std::iter::once(chain.top()).chain(chain.lowers().iter().map(|l| l.as_ref())).collect();
            let mut child = image.to_path_buf();
            for img in all {
                layers.push((Local::Cowdisk(img), child.clone()));
                match img.parent() {
                    None => break,
                    Some(p) if p.format == ParentFormat::Remote => {
                        let (r, d) = parent_layer(&p.path)?;
                        if &r != repo {
                            return Err(fail(
                                err(
                                    ErrorKind::InvalidArgument,
                                    format!(
                                        "stands on a layer of {r}; a layer is pushed to the repository of its parents"
                                    ),
                                )
                                .with_file(&child),
                            ));
                        }
                        // Opening the chain may have read its manifest from the local cache:
                        // the repository must still hold it, or the pushed child would stand
                        // on nothing.
                        if !store.exists(&format!("layers/{}", hex(&d)))? {
                            return Err(fail(
                                err(ErrorKind::ParentMissing, format!("its remote parent {} is gone", r.layer_url(&d)))
                                    .with_file(&child),
                            ));
                        }
                        below = Some(ParentLayer { digest: d, uuid: p.uuid, size: p.size });
                        break;
                    }
                    Some(p) if p.format == ParentFormat::Raw => {
                        let base = chain.base().ok_or_else(|| err(ErrorKind::Corrupt, "the chain lost its base"))?;
                        layers.push((Local::Raw(base), resolve_parent_path(&child, &p)));
                        break;
                    }
                    Some(p) => child = resolve_parent_path(&child, &p),
                }
            }
        }
    }
    layers.reverse();
    let mut known = Known::learn(&store)?;
    let total: u64 = layers.iter().map(|(l, _)| content_estimate(l)).sum();
    let mut done_bytes = 0u64;
    let mut out: Vec<Pushed> = Vec::new();
    let top = layers.len() - 1;
    for (i, (layer, path)) in layers.iter().enumerate() {
        let must_exist = i < top && !opts.chain;
        let mut uploader = Uploader::new(&store, opts, must_exist);
        let mut tick = |n: u64| {
            done_bytes += n;
            progress(done_bytes, total);
        };
        let m = build_manifest(layer, path, below, &mut known, &mut uploader, &mut tick)
            .map_err(|e| e.with_file(path))
            .map_err(fail)?;
        let (uploaded_chunks, uploaded_bytes) = uploader.finish(&mut known).map_err(fail)?;
        let bytes = m.encode();
        let digest = sha256(&bytes);
        let key = format!("layers/{}", hex(&digest));
        let new_manifest = if must_exist {
            if !store.exists(&key)? {
                return Err(fail(
                    err(
                        ErrorKind::InvalidArgument,
                        format!("its parent {} is not in {repo}; push with --chain to push it too", path.display()),
                    )
                    .with_file(image),
                ));
            }
            false
        } else {
            store.put_new(&key, bytes).map_err(fail)?
        };
        let with_content: Vec<&ChunkEntry> = m.entries.iter().filter(|e| e.content.is_some()).collect();
        out.push(Pushed {
            path: path.clone(),
            digest,
            url: repo.layer_url(&digest),
            kind: m.kind,
            chunks: with_content.len() as u64,
            uploaded_chunks,
            content_bytes: with_content.iter().filter_map(|e| e.content.map(|c| u64::from(c.1.length))).sum(),
            uploaded_bytes,
            new_manifest,
        });
        below = Some(ParentLayer { digest, uuid: m.uuid, size: m.virtual_size });
    }
    if let (Some(tag), Some(last)) = (&opts.tag, out.last()) {
        check_tag_name(tag)?;
        store.put(&format!("tags/{tag}"), hex(&last.digest).into_bytes()).map_err(fail)?;
    }
    Ok(out)
}

/// A tag is one path component of letters, digits and `._-`, not 64 hex digits (that would
/// read as a digest).
pub fn check_tag_name(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with('.')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && parse_hex(tag).is_none();
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorKind::InvalidArgument,
            format!("{tag:?} is not a tag name (letters, digits, '.', '_', '-'; not a digest)"),
        ))
    }
}

/// Bytes a layer's push reads, for the progress bar.
fn content_estimate(l: &Local) -> u64 {
    match l {
        Local::Raw(r) => r.size(),
        Local::Cowdisk(img) => img.entry_count() as u64 * img.geometry().chunk_size(),
    }
}

/// Where the repository holds each chunk, as far as its pack indexes say (P1), and what this
/// push has added since.
struct Known {
    at: HashMap<Digest, Location>,
}

impl Known {
    /// Every pack index, less those of packs marked for collection (format-spec §9.7: a
    /// marked pack may be deleted before this push ends, so its chunks are uploaded again),
    /// and less those whose pack the listing lacks or lists too short for the index's records
    /// (deleted or cut by hand, or by a tool that went wrong), or that do not decode (damaged,
    /// or some other program's object): a manifest that counted on them would name chunks no
    /// read can get, and one such object must not stop every push to the repository. Only
    /// digest-named keys count ([`pack_key`]). The listing gives the sizes at no cost; a pack's
    /// bytes are not read (a damaged record is found by the reader's digest check).
    fn learn(store: &Store) -> Result<Known> {
        let marked: HashSet<String> =
            store.list("gc")?.into_iter().filter_map(|l| l.key.strip_prefix("gc/").map(str::to_string)).collect();
        let listed = store.list("packs")?;
        let pack_size: HashMap<&str, u64> = listed
            .iter()
            .filter_map(|l| match pack_key(&l.key) {
                Some((name, _, false)) => Some((name, l.size)),
                _ => None,
            })
            .collect();
        let mut at: HashMap<Digest, Location> = HashMap::new();
        for l in &listed {
            let Some((name, pack, true)) = pack_key(&l.key) else { continue };
            if marked.contains(name) {
                continue;
            }
            let Some(&size) = pack_size.get(name) else { continue };
            let idx = match store.get(&l.key) {
                Ok(b) => b,
                // Collected between the listing and now.
                Err(e) if e.kind() == ErrorKind::ParentMissing => continue,
                Err(e) => return Err(e),
            };
            let Ok(records) = decode_index(pack, &idx) else { continue };
            if records.iter().any(|(_, loc)| loc.offset.saturating_add(u64::from(loc.stored)) > size) {
                continue;
            }
            for (d, loc) in records {
                at.entry(d)
                    .and_modify(|old| {
                        if loc.pack < old.pack {
                            *old = loc;
                        }
                    })
                    .or_insert(loc);
            }
        }
        Ok(Known { at })
    }
}

/// Packs records and uploads full packs, a few at once; each pack's index goes up after the
/// pack itself, in the same task.
struct Uploader<'a> {
    store: &'a Store,
    opts: &'a PushOptions,
    /// Checking that a parent is pushed: a chunk the repository lacks is an error, not an
    /// upload.
    dry: bool,
    pack: Vec<u8>,
    records: Vec<(Digest, Location)>,
    /// This push's chunks: digest to (pack number in `sealed`, or `None` for the open pack,
    /// and the record).
    pending: HashMap<Digest, (Option<usize>, Location)>,
    sealed: Vec<Digest>,
    running: VecDeque<tokio::task::JoinHandle<Result<()>>>,
    uploaded_chunks: u64,
    uploaded_bytes: u64,
}

impl<'a> Uploader<'a> {
    fn new(store: &'a Store, opts: &'a PushOptions, dry: bool) -> Uploader<'a> {
        Uploader {
            store,
            opts,
            dry,
            pack: Vec::new(),
            records: Vec::new(),
            pending: HashMap::new(),
            sealed: Vec::new(),
            running: VecDeque::new(),
            uploaded_chunks: 0,
            uploaded_bytes: 0,
        }
    }

    /// Where chunk `content` will be: held already, or added to the open pack. The pack field
    /// of a new record is settled by [`Uploader::finish`].
    fn place(&mut self, known: &Known, content: &[u8]) -> Result<(Digest, Location)> {
        let d = sha256(content);
        if let Some(loc) = known.at.get(&d) {
            return Ok((d, *loc));
        }
        if let Some((_, loc)) = self.pending.get(&d) {
            return Ok((d, *loc));
        }
        if self.dry {
            return Err(err(ErrorKind::InvalidArgument, "is not in the repository (push with --chain to push it too)"));
        }
        let z = zstd::bulk::compress(content, self.opts.level).map_err(|e| err(ErrorKind::Io, format!("zstd: {e}")))?;
        let (codec, stored): (Codec, &[u8]) =
            if z.len() < content.len() { (Codec::Zstd, &z) } else { (Codec::Stored, content) };
        let loc = Location {
            pack: [0; 32],
            offset: self.pack.len() as u64,
            stored: stored.len() as u32,
            length: content.len() as u32,
            codec,
        };
        self.pack.extend_from_slice(stored);
        self.records.push((d, loc));
        self.pending.insert(d, (None, loc));
        self.uploaded_chunks += 1;
        self.uploaded_bytes += stored.len() as u64;
        if self.pack.len() >= self.opts.pack_size.max(1) {
            self.seal()?;
        }
        Ok((d, loc))
    }

    /// Closes the open pack and starts its upload (waiting for the oldest upload first when
    /// as many as allowed are running).
    fn seal(&mut self) -> Result<()> {
        if self.records.is_empty() {
            return Ok(());
        }
        let mut bytes = std::mem::take(&mut self.pack);
        // 16 random bytes no record covers: a pack is never written twice under one name, so
        // a pack that gc has marked (and may be deleting) is never this push's (format-spec
        // §9.2, §9.7), however alike the records.
        bytes.extend_from_slice(&crate::layer::new_uuid()?);
        let digest = sha256(&bytes);
        let n = self.sealed.len();
        self.sealed.push(digest);
        let mut records = std::mem::take(&mut self.records);
        for (d, loc) in &mut records {
            loc.pack = digest;
            if let Some(p) = self.pending.get_mut(d) {
                *p = (Some(n), *loc);
            }
        }
        while self.running.len() >= self.opts.parallel.max(1) {
            if let Some(h) = self.running.pop_front() {
                self.store.wait(h)?;
            }
        }
        let key = format!("packs/{}", hex(&digest));
        let index = encode_index(&records);
        self.running.push_back(self.store.put_then(vec![(key.clone(), bytes), (format!("{key}.idx"), index)])?);
        Ok(())
    }

    /// Uploads the last pack, waits for every upload, and makes this push's chunks known.
    fn finish(mut self, known: &mut Known) -> Result<(u64, u64)> {
        self.seal()?;
        while let Some(h) = self.running.pop_front() {
            self.store.wait(h)?;
        }
        for (d, (_, loc)) in self.pending {
            known.at.insert(d, loc);
        }
        Ok((self.uploaded_chunks, self.uploaded_bytes))
    }

    /// The final location of a record placed earlier (its pack digest known once sealed).
    fn settle(&self, d: &Digest, loc: Location) -> Location {
        match self.pending.get(d) {
            Some((Some(n), l)) => Location { pack: self.sealed[*n], ..*l },
            _ => loc,
        }
    }
}

/// The manifest of one local layer, its chunks placed (uploaded as needed).
fn build_manifest(
    layer: &Local,
    path: &Path,
    parent: Option<ParentLayer>,
    known: &mut Known,
    up: &mut Uploader,
    tick: &mut dyn FnMut(u64),
) -> Result<Manifest> {
    let created = std::fs::metadata(path)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut m = match layer {
        Local::Raw(r) => Manifest {
            kind: LayerKind::Raw,
            uuid: [0; 16],
            virtual_size: r.size(),
            chunk_shift: RAW_CHUNK_SHIFT,
            parent: None,
            created,
            entries: Vec::new(),
        },
        Local::Cowdisk(img) => {
            let h = img.header();
            Manifest {
                kind: LayerKind::Cowdisk,
                uuid: h.uuid,
                virtual_size: h.geometry.virtual_size,
                chunk_shift: h.geometry.chunk_shift,
                parent,
                created,
                entries: Vec::new(),
            }
        }
    };
    if let (Local::Cowdisk(_), Some(p)) = (layer, &parent) {
        m.parent = Some(*p);
    }
    let mut buf = vec![0u8; m.chunk_size() as usize];
    match layer {
        Local::Raw(r) => {
            for c in 0..m.chunk_count() {
                let len = m.chunk_len(c) as usize;
                r.read_at(&mut buf[..len], c << RAW_CHUNK_SHIFT)?;
                tick(len as u64);
                if buf[..len].iter().all(|&b| b == 0) {
                    continue;
                }
                let content = up.place(known, &buf[..len])?;
                m.entries.push(ChunkEntry { chunk: c, blocks: None, content: Some(content) });
            }
        }
        Local::Cowdisk(img) => {
            let mut entries = img.entries();
            entries.sort_by_key(|e| e.0);
            for (c, e) in entries {
                if e.blocks.all(BlockState::Absent, e.blocks.len()) {
                    continue;
                }
                let content = if e.blocks.count(BlockState::Data) > 0 {
                    let len = m.chunk_len(c) as usize;
                    img.read_data_verified(c, 0, &mut buf[..len])?;
                    Some(up.place(known, &buf[..len])?)
                } else {
                    None
                };
                tick(m.chunk_size());
                m.entries.push(ChunkEntry { chunk: c, blocks: Some(e.blocks.clone()), content });
            }
        }
    }
    // Records placed in packs that were still open get their pack's digest now; the caller
    // finishes the uploads before the manifest is written.
    up.seal()?;
    for e in &mut m.entries {
        if let Some((d, loc)) = &mut e.content {
            *loc = up.settle(d, *loc);
        }
    }
    Ok(m)
}
