//! The object-store commands (push, ls, rm, gc, pull) and the options every command shares for
//! reaching a store and the local chunk cache (--endpoint, --cache-dir, --cache-size).

use crate::progress::Bar;
use crate::size::{format_size, parse_size};
use crate::Failure;
use cowdisk::remote::admin::{self, Removed};
use cowdisk::remote::manifest::{hex, LayerKind};
use cowdisk::remote::push::{push, PushOptions};
use cowdisk::remote::{self, LayerUrl, RemoteOptions, RepoUrl};
use cowdisk::{Chain, ChainOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How this process reaches object stores and caches their chunks; given before or after the
/// command, for every command that may touch a remote layer.
#[derive(clap::Args, Default)]
pub struct RemoteArgs {
    /// The S3 endpoint (Ceph RGW: http://HOST:7480); default AWS_ENDPOINT_URL or the AWS
    /// config file's endpoint_url, else AWS.
    #[arg(long, global = true, value_name = "URL")]
    endpoint: Option<String>,
    /// The chunk cache every cowdisk process of the host shares (default $COWDISK_CACHE_DIR,
    /// else $XDG_CACHE_HOME/cowdisk, ~/.cache/cowdisk, or /var/cache/cowdisk for root).
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Most bytes the cache keeps; least recently used chunks go first (default 10G or
    /// $COWDISK_CACHE_SIZE).
    #[arg(long, global = true, value_parser = parse_size, value_name = "SIZE")]
    cache_size: Option<u64>,
}

impl RemoteArgs {
    /// Makes these settings the process's: the environment for what is not given.
    pub fn apply(&self) -> Result<(), Failure> {
        let mut o = RemoteOptions::from_env()?;
        if let Some(e) = &self.endpoint {
            o.store.endpoint = Some(e.clone());
        }
        if let Some(d) = &self.cache_dir {
            o.cache_dir = d.clone();
        }
        if let Some(s) = self.cache_size {
            o.cache_size = s;
        }
        remote::configure(o);
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// A frozen cowdisk layer (a snapshot) or a raw file.
    image: PathBuf,
    /// Where: s3://BUCKET[/PREFIX].
    repo: String,
    /// Name the pushed layer NAME in the repository (s3://BUCKET/PREFIX/NAME).
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
    /// Also push every layer below IMAGE that the repository lacks.
    #[arg(long)]
    chain: bool,
    /// Packs uploading at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Size of the objects chunks are packed into (format-spec §9.2); 1M to 1G.
    #[arg(long, default_value = "16M", value_parser = parse_size, value_name = "SIZE")]
    pack_size: u64,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct GcArgs {
    /// s3://BUCKET[/PREFIX].
    repo: String,
    /// Delete an unreferenced pack only once an earlier pass marked it at least this long ago
    /// (e.g. 30m, 1h, 0): longer than any push takes (format-spec §9.7).
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
    /// Say what would be marked and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// An overlay with remote layers below it, or a remote layer (s3://BUCKET/PREFIX/TAG).
    target: String,
    /// Chunks fetched at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
}

/// `30`, `30s`, `15m`, `1h`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (like 30s, 15m, 1h, 2d)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

fn kind_name(k: LayerKind) -> &'static str {
    match k {
        LayerKind::Cowdisk => "cowdisk",
        LayerKind::Raw => "raw",
    }
}

pub fn push_cmd(a: PushArgs) -> Result<(), Failure> {
    let repo = RepoUrl::parse(&a.repo)?;
    if !(1 << 20..=1 << 30).contains(&a.pack_size) {
        return Err(Failure(format!("push: --pack-size {} is not from 1M to 1G", format_size(a.pack_size)), 2));
    }
    let opts = PushOptions {
        tag: a.tag.clone(),
        chain: a.chain,
        parallel: a.parallel as usize,
        pack_size: a.pack_size as usize,
        ..Default::default()
    };
    let bar = Bar::new("push");
    let progress = |d, t| bar.update(d, t);
    let pushed = push(&a.image, &repo, &opts, &progress)?;
    drop(bar);
    if a.json {
        let layers: Vec<Value> = pushed
            .iter()
            .map(|p| {
                json!({
                    "path": p.path, "digest": hex(&p.digest), "url": p.url, "kind": kind_name(p.kind),
                    "chunks": p.chunks, "uploaded-chunks": p.uploaded_chunks,
                    "content-bytes": p.content_bytes, "uploaded-bytes": p.uploaded_bytes,
                    "new-manifest": p.new_manifest,
                })
            })
            .collect();
        say!("{}", json!({"layers": layers, "tag": a.tag}));
        return Ok(());
    }
    for p in &pushed {
        let what = if p.new_manifest { "pushed" } else { "already there" };
        say!(
            "{}: {what} as {} ({} chunks, {}; uploaded {} chunks, {})",
            p.path.display(),
            p.url,
            p.chunks,
            format_size(p.content_bytes),
            p.uploaded_chunks,
            format_size(p.uploaded_bytes)
        );
    }
    if let (Some(t), Some(top)) = (&a.tag, pushed.last()) {
        say!("tagged {} as {}", hex(&top.digest), format!("{repo}/{t}"));
    }
    Ok(())
}

pub fn ls_cmd(repo: &str, as_json: bool) -> Result<(), Failure> {
    let repo = RepoUrl::parse(repo)?;
    let l = admin::list(&repo)?;
    if as_json {
        let layers: Vec<Value> = l
            .layers
            .iter()
            .map(|x| {
                json!({
                    "digest": hex(&x.digest), "url": repo.layer_url(&x.digest), "kind": kind_name(x.kind),
                    "virtual-size": x.virtual_size, "parent": x.parent.as_ref().map(hex),
                    "chunks": x.chunks, "content-bytes": x.content_bytes, "tags": x.tags, "created": x.created,
                })
            })
            .collect();
        let dangling: Vec<Value> = l.dangling_tags.iter().map(|(t, d)| json!({"tag": t, "names": d})).collect();
        let damaged: Vec<Value> = l
            .damaged
            .iter()
            .map(|(d, why)| json!({"digest": hex(d), "url": repo.layer_url(d), "error": why}))
            .collect();
        say!(
            "{}",
            json!({"layers": layers, "dangling-tags": dangling, "damaged": damaged, "packs": l.packs, "pack-bytes": l.pack_bytes})
        );
        return Ok(());
    }
    for x in &l.layers {
        let parent = x.parent.as_ref().map_or_else(|| "-".to_string(), |p| hex(p)[..12].to_string());
        let tags = if x.tags.is_empty() { String::new() } else { format!("  tags: {}", x.tags.join(", ")) };
        say!(
            "{}  {:7}  {:>8}  {:>6} chunks {:>8}  parent {parent}{tags}",
            hex(&x.digest),
            kind_name(x.kind),
            format_size(x.virtual_size),
            x.chunks,
            format_size(x.content_bytes)
        );
    }
    for (t, d) in &l.dangling_tags {
        say!("tag {t} names {d}, which is not in the repository");
    }
    for (d, why) in &l.damaged {
        say!("{}  damaged: {why} (cowdisk rm removes it)", hex(d));
    }
    say!("{} layers, {} packs ({})", l.layers.len(), l.packs, format_size(l.pack_bytes));
    Ok(())
}

pub fn rm_cmd(url: &str) -> Result<(), Failure> {
    let u = LayerUrl::parse(url)?;
    match admin::remove(&u)? {
        Removed::Tag(t) => say!("removed tag {t}"),
        Removed::Layer(d) => say!("removed layer {} (its packs go at the next gc past the grace period)", hex(&d)),
    }
    Ok(())
}

pub fn gc_cmd(a: GcArgs) -> Result<(), Failure> {
    let repo = RepoUrl::parse(&a.repo)?;
    let r = admin::gc(&repo, a.grace, a.dry_run)?;
    if a.json {
        say!(
            "{}",
            json!({
                "packs": r.packs, "referenced": r.referenced, "marked": r.marked, "waiting": r.waiting,
                "deleted": r.deleted, "deleted-bytes": r.deleted_bytes, "unmarked": r.unmarked,
                "dry-run": a.dry_run,
            })
        );
        return Ok(());
    }
    let would = if a.dry_run { "would be " } else { "" };
    say!(
        "{} packs, {} referenced; {} {would}marked, {} waiting out the grace period, {} {would}deleted ({}), {} unmarked",
        r.packs,
        r.referenced,
        r.marked,
        r.waiting,
        r.deleted,
        format_size(r.deleted_bytes),
        r.unmarked
    );
    Ok(())
}

/// The remote layer at the top of the remote part of `image`'s chain.
fn first_remote(image: &Path) -> Result<(RepoUrl, cowdisk::remote::manifest::Digest), Failure> {
    let chain = Chain::open(image, ChainOptions { inspect: true, ..Default::default() })?;
    let paths = std::iter::once(chain.top().path().to_path_buf())
        .chain(chain.lowers().iter().map(|l| l.path().to_path_buf()))
        .chain(chain.base().map(|b| b.path().to_path_buf()));
    for p in paths {
        let bytes = p.as_os_str().as_encoded_bytes();
        if remote::is_remote(bytes) {
            return Ok(remote::parent_layer(bytes)?);
        }
    }
    Err(Failure(format!("{}: pull: no layer of its chain is remote", image.display()), 1))
}

pub fn pull_cmd(a: PullArgs) -> Result<(), Failure> {
    let (repo, digest) = if remote::is_remote(a.target.as_bytes()) {
        let u = LayerUrl::parse(&a.target)?;
        let d = remote::resolve(&u)?;
        (u.repo, d)
    } else {
        first_remote(Path::new(&a.target))?
    };
    let bar = Bar::new("pull");
    let progress = |d, t| bar.update(d, t);
    let r = admin::hydrate(&repo, &digest, a.parallel as usize, &progress)?;
    drop(bar);
    if r.held == r.chunks {
        say!("{} remote layers: all {} chunks in the cache ({} of content)", r.layers, r.chunks, format_size(r.bytes));
    } else {
        say!(
            "{} remote layers: {} chunks fetched ({} of content), {} of them kept: the cache's bound is smaller than the layers",
            r.layers,
            r.chunks,
            format_size(r.bytes),
            r.held
        );
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum TraceCmd {
    /// Show the trace stored with a remote layer (s3://BUCKET/PREFIX/TAG or .../layers/DIGEST):
    /// its chunks in the order they were first read.
    Show {
        layer: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete the trace stored with a remote layer.
    Rm { layer: String },
    /// Store what a running `serve --record-trace` has recorded so far with each remote layer
    /// it read (as its stop would), without stopping it; it goes on recording.
    Save {
        /// The server's control socket (default: the one server of this user).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn trace_cmd(c: TraceCmd) -> Result<(), Failure> {
    use cowdisk::remote::trace::fetch_trace;
    match c {
        TraceCmd::Show { layer, json: as_json } => {
            let u = LayerUrl::parse(&layer)?;
            let d = remote::resolve(&u)?;
            let Some(t) = fetch_trace(&u.repo, &d)? else {
                return Err(Failure(format!("{}: no trace (record one with serve --record-trace)", layer), 1));
            };
            let m = remote::fetch_manifest(&u.repo, &d)?;
            let cs = m.chunk_size();
            if as_json {
                say!("{}", json!({"layer": u.repo.layer_url(&d), "chunk-size": cs, "chunks": t}));
            } else {
                say!("{}: {} chunks of {} in first-read order", u.repo.layer_url(&d), t.len(), format_size(cs));
                for c in &t {
                    say!("{c:>10}  offset {:#x}", c.saturating_mul(cs));
                }
            }
            Ok(())
        }
        TraceCmd::Save { control, json: as_json } => {
            let saved = crate::control::client::server(control.as_deref())?.call("trace-save", json!({}))?;
            let rows = saved.as_array().cloned().unwrap_or_default();
            if as_json {
                say!("{}", serde_json::to_string_pretty(&saved).unwrap_or_default());
            } else if rows.is_empty() {
                say!("no remote layer has been read since recording began: no trace saved");
            }
            for t in rows.iter().filter(|_| !as_json) {
                let n = t.get("chunks").and_then(Value::as_u64).unwrap_or(0);
                say!("saved a trace of {n} chunks as {}", t.get("url").and_then(Value::as_str).unwrap_or(""));
            }
            Ok(())
        }
        TraceCmd::Rm { layer } => {
            let u = LayerUrl::parse(&layer)?;
            let d = remote::resolve(&u)?;
            let (store, key) = (remote::store(&u.repo)?, format!("traces/{}", hex(&d)));
            if !store.exists(&key)? {
                return Err(Failure(format!("{}: has no trace", u.repo.layer_url(&d)), 1));
            }
            store.delete(&key)?;
            say!("removed the trace of {}", u.repo.layer_url(&d));
            Ok(())
        }
    }
}
