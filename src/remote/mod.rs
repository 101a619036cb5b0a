//! Layers in an object store (format-spec §9): repository URLs, the process's settings for
//! reaching stores and caching their chunks, and fetching a chunk (from the shared cache, or
//! by a ranged GET, decompressed and checked against its digest). `layer.rs` presents a remote
//! layer to a chain as a read-only file, `push.rs` uploads layers, `admin.rs` lists, removes
//! and collects garbage.

pub mod admin;
pub mod cache;
mod chunks;
mod coalesce;
mod index;
mod layer;
pub mod manifest;
pub mod push;
pub mod store;
pub mod trace;

pub use layer::{open_parent, Opened};

use crate::error::{err, ErrorKind, Result};
use crate::sync::lock;
use cache::Cache;
use chunks::LayerChunks;
use manifest::{hex, parse_hex, sha256, Codec, Digest, Location, Manifest};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use store::{Store, StoreConfig};

/// A repository: `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoUrl {
    pub bucket: String,
    /// Without leading, trailing or doubled `/`; may be empty.
    pub prefix: String,
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl RepoUrl {
    /// `s3://BUCKET[/PREFIX]`.
    pub fn parse(url: &str) -> Result<RepoUrl> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| err(ErrorKind::InvalidArgument, format!("{url}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(err(ErrorKind::InvalidArgument, format!("{url}: no bucket")));
        }
        Ok(RepoUrl { bucket: bucket.to_string(), prefix: collapse_slashes(prefix) })
    }

    /// The full key of `key` (relative to the repository).
    pub fn key(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{key}", self.prefix),
        }
    }

    /// The URL of layer `d` in this repository, as a parent reference records it.
    pub fn layer_url(&self, d: &Digest) -> String {
        format!("{self}/layers/{}", hex(d))
    }
}

/// `path` without empty segments, leading, trailing or doubled `/` (`p//q/` is `p/q`). The
/// store's paths collapse them too: a prefix that kept them would match none of the keys a
/// listing returns (so `rm` found no tag or child to refuse for, and push no chunk to reuse).
fn collapse_slashes(path: &str) -> String {
    path.split('/').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("/")
}

/// Whether a parent or backing name is a remote one.
pub fn is_remote(s: &[u8]) -> bool {
    s.starts_with(b"s3://")
}

/// A layer named by URL: `s3://BUCKET/PREFIX/layers/DIGEST`, or (to be resolved)
/// `s3://BUCKET/PREFIX/NAME` for a tag or a bare digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerUrl {
    pub repo: RepoUrl,
    pub name: LayerName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerName {
    Digest(Digest),
    Tag(String),
}

impl LayerUrl {
    pub fn parse(url: &str) -> Result<LayerUrl> {
        let bad =
            || err(ErrorKind::InvalidArgument, format!("{url}: not s3://BUCKET/PREFIX/LAYER (a tag or a digest)"));
        let url = format!("s3://{}", collapse_slashes(url.strip_prefix("s3://").ok_or_else(bad)?));
        let (head, last) = url.rsplit_once('/').ok_or_else(bad)?;
        if last.is_empty() || !head.starts_with("s3://") || head.len() <= "s3://".len() {
            return Err(bad());
        }
        if let (Some(repo), Some(d)) = (head.strip_suffix("/layers"), parse_hex(last)) {
            return Ok(LayerUrl { repo: RepoUrl::parse(repo)?, name: LayerName::Digest(d) });
        }
        let repo = RepoUrl::parse(head)?;
        Ok(LayerUrl { repo, name: parse_hex(last).map_or_else(|| LayerName::Tag(last.to_string()), LayerName::Digest) })
    }
}

/// How this process reaches stores and caches their chunks.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub store: StoreConfig,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    /// Chunks read ahead after two reads of consecutive chunks of a layer.
    pub read_ahead: usize,
}

impl RemoteOptions {
    /// The defaults and the environment (see `store::StoreConfig::from_env` and
    /// `COWDISK_CACHE_DIR`, `COWDISK_CACHE_SIZE`).
    pub fn from_env() -> Result<RemoteOptions> {
        Ok(RemoteOptions {
            store: StoreConfig::from_env(),
            cache_dir: std::env::var_os("COWDISK_CACHE_DIR").map(PathBuf::from).unwrap_or_else(cache::default_dir),
            cache_size: cache::limit_from_env()?,
            read_ahead: 4,
        })
    }
}

/// What a process uses to reach remote layers: settings, the open stores (one per
/// repository) and the cache. Chains opened after [`configure`] use its settings.
struct Context {
    opts: RemoteOptions,
    stores: Mutex<HashMap<RepoUrl, Arc<Store>>>,
    cache: OnceLock<Arc<Cache>>,
}

fn context() -> &'static RwLock<Option<Arc<Context>>> {
    static C: OnceLock<RwLock<Option<Arc<Context>>>> = OnceLock::new();
    C.get_or_init(|| RwLock::new(None))
}

/// Sets how this process reaches stores (`--endpoint`) and where and how big its cache is
/// (`--cache-dir`, `--cache-size`); otherwise the environment decides at first use.
pub fn configure(opts: RemoteOptions) {
    *crate::sync::write(context()) =
        Some(Arc::new(Context { opts, stores: Mutex::new(HashMap::new()), cache: OnceLock::new() }));
}

fn ctx() -> Result<Arc<Context>> {
    if let Some(c) = crate::sync::read(context()).as_ref() {
        return Ok(c.clone());
    }
    configure(RemoteOptions::from_env()?);
    crate::sync::read(context()).clone().ok_or_else(|| err(ErrorKind::Io, "remote settings"))
}

/// The open store of `repo` (one per repository and process).
pub fn store(repo: &RepoUrl) -> Result<Arc<Store>> {
    let c = ctx()?;
    let mut m = lock(&c.stores);
    if let Some(s) = m.get(repo) {
        return Ok(s.clone());
    }
    let s = Arc::new(Store::open(repo, &c.opts.store)?);
    m.insert(repo.clone(), s.clone());
    Ok(s)
}

/// A store of `repo` for batch work (push, gc, rm), more patient than the one reads use: a
/// read that waits long holds up a client, which would rather have EIO, but an upload of a
/// 16 MiB pack to a busy gateway may take tens of seconds (seen on the local RGW with a push
/// and the benchmark's other uploads at once), and failing it fails the whole push. At least
/// 60 s per attempt, 5 retries, none started later than 180 s after the first.
pub fn batch_store(repo: &RepoUrl) -> Result<Arc<Store>> {
    let c = ctx()?;
    let mut cfg = c.opts.store.clone();
    cfg.timeout = cfg.timeout.max(std::time::Duration::from_secs(60));
    cfg.retry_timeout = cfg.retry_timeout.max(std::time::Duration::from_secs(180));
    cfg.retries = cfg.retries.max(5);
    Ok(Arc::new(Store::open(repo, &cfg)?))
}

/// The process's chunk cache.
pub fn shared_cache() -> Result<Arc<Cache>> {
    let c = ctx()?;
    if let Some(cache) = c.cache.get() {
        return Ok(cache.clone());
    }
    let cache = Arc::new(Cache::open(&c.opts.cache_dir, c.opts.cache_size)?);
    let mut started = false;
    let cache = c
        .cache
        .get_or_init(|| {
            started = true;
            cache
        })
        .clone();
    if started {
        cache.start_publisher();
    }
    Ok(cache)
}

/// Background fetches running (read-ahead, trace prefetch), and whether the process is on its
/// way out (no new background fetch starts then).
static BACKGROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static CLOSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A background fetch in progress: counted while it lives, so that [`publish_cache`] can wait
/// for it. None once the process is closing.
pub(crate) struct Background(());

impl Background {
    pub(crate) fn start() -> Option<Background> {
        use std::sync::atomic::Ordering;
        BACKGROUND.fetch_add(1, Ordering::AcqRel);
        if CLOSING.load(Ordering::Acquire) {
            BACKGROUND.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Background(()))
    }

    /// Whether the work should stop (the process is closing).
    pub(crate) fn stopping(&self) -> bool {
        CLOSING.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        BACKGROUND.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Publishes the fills this process has not published yet (a process calls this before it
/// exits; fills still pending at a crash are simply fetched again). Background fetches stop
/// starting new requests, and the ones under way are waited for (at most a few seconds): a
/// chunk a read-ahead fetched is one the next process would otherwise fetch again.
pub fn publish_cache() -> Result<()> {
    use std::sync::atomic::Ordering;
    CLOSING.store(true, Ordering::Release);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while BACKGROUND.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let Some(c) = crate::sync::read(context()).clone() else { return Ok(()) };
    match c.cache.get() {
        Some(cache) => cache.publish_all(),
        None => Ok(()),
    }
}

/// Most stored bytes one ranged GET fetches for a read that misses the cache: the record
/// asked for and the records that follow it in its pack, which a push wrote in chunk order
/// (`COWDISK_FETCH_WINDOW`, default 512K; 0 fetches the record alone). An object store
/// answers a GET of 512 KiB in about the time of one of 32 KiB (the local RGW: 3.7 against
/// 2.3 ms), and what a workload reads next is most often close to what it read last. Measured
/// on the cold-start benchmark (tools/bench/remote.sh, 2026-11-30): a boot of whole
/// executables took 1.75 s with the record alone and 1.0-1.2 s with 512 KiB; a window that
/// started at 64 KiB and doubled while reads went on where the last fetch ended took 1.6 s
/// (three GETs per file instead of one). On files scattered over the whole image 512 KiB
/// fetches more bytes (171 against 115 MiB for the doubling window) in about the same time.
pub(crate) fn fetch_window() -> u64 {
    static W: OnceLock<u64> = OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("COWDISK_FETCH_WINDOW").ok().and_then(|v| cache::parse_size(&v)).unwrap_or(512 << 10)
    })
}

pub(crate) fn read_ahead() -> usize {
    ctx().map(|c| c.opts.read_ahead).unwrap_or(0)
}

/// The digest a layer URL names: itself, or what its tag holds now.
pub fn resolve(url: &LayerUrl) -> Result<Digest> {
    match &url.name {
        LayerName::Digest(d) => Ok(*d),
        LayerName::Tag(t) => {
            let s = store(&url.repo)?;
            let body = s.get(&format!("tags/{t}")).map_err(|e| match e.kind() {
                ErrorKind::ParentMissing => {
                    err(ErrorKind::ParentMissing, format!("{}/{t}: no such tag or layer", url.repo))
                }
                _ => e,
            })?;
            let text = String::from_utf8_lossy(&body);
            parse_hex(text.trim())
                .ok_or_else(|| err(ErrorKind::Corrupt, format!("{}/tags/{t}: not a layer digest", url.repo)))
        }
    }
}

/// The manifest of layer `d`, checked against its digest. A manifest never changes under its
/// name, so it is kept in the shared cache like a chunk (named by its digest, verified before
/// it is kept): a second open of the layer on this host needs no request.
pub fn fetch_manifest(repo: &RepoUrl, d: &Digest) -> Result<Manifest> {
    let fetch = || {
        let key = format!("layers/{}", hex(d));
        let bytes = store(repo)?.get(&key).map_err(|e| match e.kind() {
            ErrorKind::ParentMissing => err(ErrorKind::ParentMissing, format!("{}: no such layer", repo.layer_url(d))),
            _ => e,
        })?;
        if sha256(&bytes) != *d {
            return Err(err(
                ErrorKind::BadChecksum,
                format!("{}: the manifest does not match its name", repo.layer_url(d)),
            ));
        }
        Ok(bytes.to_vec())
    };
    // A cache that cannot be opened (its directory cannot be made: a read-only file system)
    // only costs the request; the layer's reads go uncached likewise (`RemoteLayer::chunks`).
    let bytes = match shared_cache() {
        Ok(c) => c.get_or_fetch(d, fetch)?,
        Err(_) => fetch()?,
    };
    Manifest::decode(&bytes).map_err(|e| e.with_file(Path::new(&repo.layer_url(d))))
}

/// How many layers the remote chain from layer `d` down holds (itself, its parents and a
/// raw base), counting stopped once past `limit`.
pub fn chain_depth(repo: &RepoUrl, d: &Digest, limit: usize) -> Result<usize> {
    let (mut depth, mut next) = (0, Some(*d));
    while let Some(d) = next.take() {
        depth += 1;
        if depth > limit {
            break;
        }
        next = fetch_manifest(repo, &d)?.parent.map(|p| p.digest);
    }
    Ok(depth)
}

/// The repository and digest a parent reference of format 3 names.
pub fn parent_layer(pref_path: &[u8]) -> Result<(RepoUrl, Digest)> {
    let text = String::from_utf8_lossy(pref_path);
    let url = LayerUrl::parse(&text)?;
    match url.name {
        LayerName::Digest(d) => Ok((url.repo, d)),
        LayerName::Tag(_) => {
            Err(err(ErrorKind::Corrupt, format!("{text}: a parent reference names a layer by digest")))
        }
    }
}

/// Entry `i` of layer `m` (whose chunks in the cache are `chunks`): from the cache, or fetched
/// with those of `followers` that one ranged GET can bring along (see
/// [`LayerChunks::get_or_fetch`]).
pub(crate) fn fetch_entry(
    repo: &RepoUrl,
    m: &Manifest,
    chunks: &LayerChunks,
    i: usize,
    followers: &[usize],
) -> Result<Arc<Vec<u8>>> {
    chunks.get_or_fetch(&*shared_cache()?, i, followers, |run| {
        let records: Vec<_> =
            run.iter().filter_map(|&j| m.entries.get(j).and_then(|e| e.content).map(|(d, loc)| (j, d, loc))).collect();
        fetch_records(repo, &records)
    })
}

/// The content of records `run` (entry number, digest, location), which lie one after the
/// other in one pack, fetched with one ranged GET and each checked. Only the first record's
/// failure is an error (the others are an economy: a bad one is left out).
pub(crate) fn fetch_records(repo: &RepoUrl, run: &[(usize, Digest, Location)]) -> Result<Vec<(usize, Vec<u8>)>> {
    let Some((_, _, floc)) = run.first() else {
        return Err(err(ErrorKind::InvalidArgument, "no chunk to fetch"));
    };
    let s = store(repo)?;
    let key = format!("packs/{}", hex(&floc.pack));
    let end = run.last().map_or(floc.offset + u64::from(floc.stored), |(_, _, l)| l.offset + u64::from(l.stored));
    let bytes = s.get_range(&key, floc.offset..end)?;
    let mut out = Vec::with_capacity(run.len());
    for (k, (i, d, loc)) in run.iter().enumerate() {
        let at = (loc.offset - floc.offset) as usize;
        let stored = bytes
            .get(at..at + loc.stored as usize)
            .ok_or_else(|| err(ErrorKind::Truncated, format!("{repo}/{key}: a record lies past the range fetched")));
        match stored.and_then(|b| decode_record(repo, &key, d, loc, b)) {
            Ok(c) => out.push((*i, c)),
            Err(e) if k == 0 => return Err(e),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// A record's content: decompressed and checked against its digest.
fn decode_record(repo: &RepoUrl, key: &str, digest: &Digest, loc: &Location, stored: &[u8]) -> Result<Vec<u8>> {
    let content = match loc.codec {
        Codec::Stored => stored.to_vec(),
        Codec::Zstd => zstd::bulk::decompress(stored, loc.length as usize)
            .map_err(|e| err(ErrorKind::Corrupt, format!("{repo}/{key}: a record does not decompress ({e})")))?,
    };
    if content.len() != loc.length as usize || sha256(&content) != *digest {
        return Err(err(
            ErrorKind::BadChecksum,
            format!("{repo}/{key}: chunk {} does not match its digest", hex(digest)),
        ));
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let r = RepoUrl::parse("s3://b/p/q/").unwrap();
        assert_eq!((r.bucket.as_str(), r.prefix.as_str()), ("b", "p/q"));
        assert_eq!(r.key("layers/x"), "p/q/layers/x");
        assert_eq!(RepoUrl::parse("s3://b").unwrap().key("tags/t"), "tags/t");
        assert!(RepoUrl::parse("http://b").is_err());
        let d = sha256(b"x");
        let u = LayerUrl::parse(&r.layer_url(&d)).unwrap();
        assert_eq!((u.repo.clone(), u.name), (r.clone(), LayerName::Digest(d)));
        let t = LayerUrl::parse("s3://b/p/q/base-v1").unwrap();
        assert_eq!((t.repo, t.name), (r.clone(), LayerName::Tag("base-v1".into())));
        assert!(LayerUrl::parse("s3://b").is_err());
        // Empty segments name the same repository.
        assert_eq!(RepoUrl::parse("s3://b//p//q//").unwrap(), r);
        for url in [format!("s3://b/p//q/layers/{}", hex(&d)), format!("s3://b/p/q/layers//{}/", hex(&d))] {
            let u = LayerUrl::parse(&url).unwrap();
            assert_eq!((u.repo, u.name), (r.clone(), LayerName::Digest(d)), "{url}");
        }
    }
}
