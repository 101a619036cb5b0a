//! Listing, removing and collecting garbage in a repository (format-spec §9.7), and hydrating
//! the remote layers of a chain into the cache.

use super::manifest::{hex, pack_key, parse_hex, Digest, LayerKind, Manifest};
use super::store::Store;
use super::{fetch_entry, fetch_manifest, store, LayerName, LayerUrl, RepoUrl};
use crate::error::{err, ErrorKind, Result};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One layer of a repository, as `ls` shows it.
#[derive(Debug, Clone)]
pub struct LayerListing {
    pub digest: Digest,
    pub kind: LayerKind,
    pub virtual_size: u64,
    pub parent: Option<Digest>,
    /// Chunks with content, and their content bytes.
    pub chunks: u64,
    pub content_bytes: u64,
    /// Tags naming it.
    pub tags: Vec<String>,
    pub created: u64,
}

/// What a repository holds: its layers (with their tags) and tags naming missing layers.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub layers: Vec<LayerListing>,
    pub dangling_tags: Vec<(String, String)>,
    /// Objects under `layers/` named like a layer that are not one this version can read
    /// (damaged, of a newer format, or some other program's): digest and why.
    pub damaged: Vec<(Digest, String)>,
    pub packs: u64,
    pub pack_bytes: u64,
}

/// Every tag: name to what it holds (a digest, or the text that is not one).
fn tags(s: &Store) -> Result<Vec<(String, std::result::Result<Digest, String>)>> {
    let mut out = Vec::new();
    for l in s.list("tags")? {
        let Some(name) = l.key.strip_prefix("tags/") else { continue };
        let body = match s.get(&l.key) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::ParentMissing => continue,
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&body).trim().to_string();
        out.push((name.to_string(), parse_hex(&text).ok_or(text)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The manifests of a repository: those that decode, by digest (fetched once per host:
/// manifests are kept in the cache), and the objects named like one that do not (why, in one
/// line), which a listing shows and a removal or a collection must not guess about.
struct Manifests {
    good: Vec<(Digest, Manifest)>,
    damaged: Vec<(Digest, String)>,
}

impl Manifests {
    /// Refuses `what` while a manifest does not decode: nothing can tell which layer it stands
    /// on or which packs it needs. Names the first, and how to remove it.
    fn refuse_damaged(&self, repo: &RepoUrl, what: &str) -> Result<()> {
        let Some((d, why)) = self.damaged.first() else { return Ok(()) };
        Err(err(
            ErrorKind::InvalidArgument,
            format!(
                "{}: {why}; {what} cannot tell what it stands on or needs: remove it first (cowdisk rm {})",
                repo.layer_url(d),
                repo.layer_url(d)
            ),
        ))
    }
}

fn manifests(repo: &RepoUrl, s: &Store) -> Result<Manifests> {
    let mut out = Manifests { good: Vec::new(), damaged: Vec::new() };
    for l in s.list("layers")? {
        let Some(d) = l.key.strip_prefix("layers/").and_then(parse_hex) else { continue };
        match fetch_manifest(repo, &d) {
            Ok(m) => out.good.push((d, m)),
            // Removed between the listing and now.
            Err(e) if e.kind() == ErrorKind::ParentMissing => continue,
            Err(e) if matches!(e.kind(), ErrorKind::BadChecksum | ErrorKind::Corrupt | ErrorKind::Unsupported) => {
                out.damaged.push((d, e.message().to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub fn list(repo: &RepoUrl) -> Result<Listing> {
    let s = store(repo)?;
    let Manifests { good: ms, damaged } = manifests(repo, &s)?;
    let mut by_digest: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut dangling = Vec::new();
    for (name, d) in tags(&s)? {
        match d {
            Ok(d) if ms.iter().any(|(x, _)| *x == d) => by_digest.entry(d).or_default().push(name),
            Ok(d) => dangling.push((name, hex(&d))),
            Err(text) => dangling.push((name, text)),
        }
    }
    let mut layers: Vec<LayerListing> = ms
        .into_iter()
        .map(|(d, m)| {
            let with: Vec<_> = m.entries.iter().filter_map(|e| e.content).collect();
            LayerListing {
                digest: d,
                kind: m.kind,
                virtual_size: m.virtual_size,
                parent: m.parent.map(|p| p.digest),
                chunks: with.len() as u64,
                content_bytes: with.iter().map(|c| u64::from(c.1.length)).sum(),
                tags: by_digest.remove(&d).unwrap_or_default(),
                created: m.created,
            }
        })
        .collect();
    layers.sort_by(|a, b| a.created.cmp(&b.created).then(a.digest.cmp(&b.digest)));
    let packs: Vec<_> =
        s.list("packs")?.into_iter().filter(|l| matches!(pack_key(&l.key), Some((_, _, false)))).collect();
    Ok(Listing {
        layers,
        dangling_tags: dangling,
        damaged,
        packs: packs.len() as u64,
        pack_bytes: packs.iter().map(|p| p.size).sum(),
    })
}

/// What `rm` removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    Tag(String),
    Layer(Digest),
}

/// Removes a tag (`s3://REPO/TAG`) or a layer (`s3://REPO/layers/DIGEST` or a bare digest).
/// A layer is refused while a tag or another layer's manifest names it; its packs stay until
/// [`gc`] finds them unreferenced.
pub fn remove(url: &LayerUrl) -> Result<Removed> {
    let s = super::batch_store(&url.repo)?;
    match &url.name {
        LayerName::Tag(t) => {
            if !s.exists(&format!("tags/{t}"))? {
                return Err(err(ErrorKind::ParentMissing, format!("{}/{t}: no such tag", url.repo)));
            }
            s.delete(&format!("tags/{t}"))?;
            Ok(Removed::Tag(t.clone()))
        }
        LayerName::Digest(d) => {
            let key = format!("layers/{}", hex(d));
            if !s.exists(&key)? {
                return Err(err(ErrorKind::ParentMissing, format!("{}: no such layer", url.repo.layer_url(d))));
            }
            let named: Vec<String> =
                tags(&s)?.into_iter().filter(|(_, t)| t.as_ref().is_ok_and(|x| x == d)).map(|(n, _)| n).collect();
            if !named.is_empty() {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("tag {} names it; remove the tag first", named.join(", ")),
                )
                .with_file(std::path::Path::new(&url.repo.layer_url(d))));
            }
            // The layer's own manifest may be what does not decode: removing it is the way out.
            let mut all = manifests(&url.repo, &s)?;
            all.damaged.retain(|(x, _)| x != d);
            all.refuse_damaged(&url.repo, "the removal")?;
            let children: Vec<String> = all
                .good
                .into_iter()
                .filter(|(_, m)| m.parent.is_some_and(|p| p.digest == *d))
                .map(|(c, _)| hex(&c)[..12].to_string())
                .collect();
            if !children.is_empty() {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("layer {} stands on it; remove those first", children.join(", ")),
                )
                .with_file(std::path::Path::new(&url.repo.layer_url(d))));
            }
            s.delete(&key)?;
            let _ = s.delete(&format!("traces/{}", hex(d)));
            Ok(Removed::Layer(*d))
        }
    }
}

/// What a garbage collection pass did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub packs: u64,
    pub referenced: u64,
    /// Unreferenced packs marked by this pass.
    pub marked: u64,
    /// Unreferenced packs whose mark is younger than the grace period.
    pub waiting: u64,
    /// Packs deleted, and their bytes.
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Marks removed because their pack is referenced again (or gone).
    pub unmarked: u64,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The store's time now: when it wrote a small object this pass writes.
fn store_now(s: &Store) -> Result<u64> {
    s.put("gc-clock", Vec::new())?;
    let t = s.modified("gc-clock")?.ok_or_else(|| err(ErrorKind::Io, "gc-clock: written, then not found"))?;
    Ok(secs(t))
}

/// One pass of garbage collection (format-spec §9.7): packs no manifest references are
/// marked; those marked at least `grace` ago by an earlier pass, and still unreferenced, are
/// deleted (index first, so no push learns of chunks in a pack about to go; then the pack;
/// then the mark). `dry_run` reports without changing anything.
pub fn gc(repo: &RepoUrl, grace: Duration, dry_run: bool) -> Result<GcReport> {
    let s = super::batch_store(repo)?;
    let mut r = GcReport::default();
    // A pack goes only if it was marked at least `grace` ago and no manifest listed now refers
    // to it. A push that counts on a pack's chunks learned of them before the mark (a push
    // passes over marked packs), so if it takes less than the grace period its manifest is
    // written, and listed here, before the pack can go.
    //
    // Times are the store's own (when it wrote each mark, and a clock object written now), so
    // that hosts whose clocks differ agree on a mark's age; a mark of unknown age never
    // counts as old.
    //
    // The clock is read before anything is listed (§9.7: the pass writes gc-clock first). A
    // mark `grace` old by it was then `grace` old before the manifests below were listed, so
    // the listing holds every manifest a push shorter than the grace wrote. Read after the
    // listing, a slow listing would age the marks past the manifests it missed.
    let now = if dry_run { secs(SystemTime::now()) } else { store_now(&s)? };
    let marks: HashMap<String, u64> = s
        .list("gc")?
        .into_iter()
        .filter_map(|l| l.key.strip_prefix("gc/").map(|k| (k.to_string(), secs(l.modified))))
        .collect();
    // Packs are named by their digest (§9.2); anything else under packs/ (an object put there
    // by hand, another repository whose prefix lies below this one's) is not this repository's
    // to collect (a review found gc deleting a nested repository's packs).
    let packs: Vec<(String, u64)> = s
        .list("packs")?
        .into_iter()
        .filter_map(|l| match pack_key(&l.key) {
            Some((name, _, false)) => Some((name.to_string(), l.size)),
            _ => None,
        })
        .collect();
    let all = manifests(repo, &s)?;
    // A manifest that does not decode may reference any pack: collecting now could delete
    // what a layer needs.
    all.refuse_damaged(repo, "garbage collection")?;
    let referenced: HashSet<String> =
        all.good.iter().flat_map(|(_, m)| m.entries.iter().filter_map(|e| e.content.map(|c| hex(&c.1.pack)))).collect();
    r.packs = packs.len() as u64;
    for (name, size) in &packs {
        if referenced.contains(name) {
            r.referenced += 1;
            continue;
        }
        match marks.get(name) {
            None => {
                r.marked += 1;
                if !dry_run {
                    s.put(&format!("gc/{name}"), now.to_string().into_bytes())?;
                }
            }
            Some(&t) if t > 0 && now.saturating_sub(t) >= grace.as_secs() => {
                // The mark must still be there, as old as listed (§9.7): a push that uploads
                // this pack again removes it first.
                let still = s.modified(&format!("gc/{name}"))?.map(secs) == Some(t);
                if !still {
                    r.waiting += 1;
                    continue;
                }
                r.deleted += 1;
                r.deleted_bytes += size;
                if !dry_run {
                    s.delete(&format!("packs/{name}.idx"))?;
                    s.delete(&format!("packs/{name}"))?;
                    s.delete(&format!("gc/{name}"))?;
                }
            }
            Some(_) => r.waiting += 1,
        }
    }
    let pack_names: HashSet<&String> = packs.iter().map(|p| &p.0).collect();
    for name in marks.keys() {
        if referenced.contains(name) || !pack_names.contains(name) {
            r.unmarked += 1;
            if !dry_run {
                s.delete(&format!("gc/{name}"))?;
            }
        }
    }
    // Indexes whose pack is gone (a pass cut off between the two deletes leaves none: the
    // index goes first; but a pack deleted by hand would). A pack missing from the first
    // listing may have been uploaded since (its index follows it): asked again, one by one.
    for l in s.list("packs")? {
        if let Some((name, _, true)) = pack_key(&l.key) {
            if !pack_names.contains(&name.to_string()) && !dry_run && !s.exists(&format!("packs/{name}"))? {
                s.delete(&l.key)?;
            }
        }
    }
    Ok(r)
}

/// What `pull` fetched.
#[derive(Debug, Clone, Default)]
pub struct PullReport {
    pub layers: u64,
    pub chunks: u64,
    /// The chunks' content bytes (what reads of them return; stored compressed, they take less).
    pub bytes: u64,
    /// The chunks the cache holds at the end: fewer than `chunks` when its bound is smaller
    /// than the layers.
    pub held: u64,
}

/// Fetches every chunk of the remote layer `d` and the remote layers below it into the
/// cache, `parallel` at a time.
pub fn hydrate(repo: &RepoUrl, d: &Digest, parallel: usize, progress: crate::ops::Progress) -> Result<PullReport> {
    let mut todo = Vec::new();
    let mut r = PullReport::default();
    let mut next = Some(*d);
    while let Some(d) = next.take() {
        let m = fetch_manifest(repo, &d)?;
        r.layers += 1;
        let chunks = super::shared_cache()?.layer(&d, &m)?;
        let m = std::sync::Arc::new(m);
        todo.extend(
            m.entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.content.map(|(_, loc)| (m.clone(), chunks.clone(), i, loc.length))),
        );
        next = m.parent.map(|p| p.digest);
    }
    let total: u64 = todo.iter().map(|c| u64::from(c.3)).sum();
    let done = AtomicU64::new(0);
    let at = AtomicUsize::new(0);
    let running = AtomicUsize::new(parallel.max(1));
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..parallel.max(1) {
            sc.spawn(|| {
                loop {
                    let i = at.fetch_add(1, Ordering::Relaxed);
                    let Some((m, chunks, j, length)) = todo.get(i) else { break };
                    if crate::sync::lock(&failed).is_some() {
                        break;
                    }
                    match fetch_entry(repo, m, chunks, *j, &[]) {
                        Ok(_) => {
                            done.fetch_add(u64::from(*length), Ordering::Relaxed);
                        }
                        Err(e) => {
                            crate::sync::lock(&failed).get_or_insert(e);
                            break;
                        }
                    }
                }
                running.fetch_sub(1, Ordering::Release);
            });
        }
        // The progress callback is not shared with the workers: this thread reports for them.
        while running.load(Ordering::Acquire) > 0 {
            progress(done.load(Ordering::Relaxed), total);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    progress(done.load(Ordering::Relaxed), total);
    if let Some(e) = crate::sync::lock(&failed).take() {
        return Err(e.during("pull"));
    }
    super::shared_cache()?.publish_all()?;
    r.chunks = todo.len() as u64;
    r.bytes = total;
    r.held = todo.iter().filter(|(_, chunks, j, _)| chunks.has(*j)).count() as u64;
    Ok(r)
}
