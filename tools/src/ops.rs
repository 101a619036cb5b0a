//! The image-management commands: snapshot, flatten, commit, info, map, diff and check, with
//! their human and `--json` output (the JSON shapes are documented in the README).

use crate::jobs::{self, Start};
use crate::progress::Bar;
use crate::size::format_size;
use crate::Failure;
use crate::JobArgs;
use cowdisk::live::jobs::JobSpec;
use cowdisk::ops::check::{check, CheckOptions, CheckReport};
use cowdisk::ops::flatten::{flatten_in_place, flatten_to, OutputFormat};
use cowdisk::ops::info::{info, LayerInfo};
use cowdisk::ops::{all_extents, commit, diff, snapshot};
use cowdisk::storage::namespace::{sweep_stale_temps, RealFs};
use cowdisk::{Chain, ChainOptions, ExtentKind};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Removes the temporary files that killed runs of `purpose` for `target` left behind, and
/// says so on stderr (they are hidden files the user never made).
pub fn sweep_temps(target: &Path, purpose: &str) {
    for p in sweep_stale_temps(&RealFs, target, purpose) {
        eprintln!("cowdisk: removed {}, left by an interrupted {purpose}", p.display());
    }
}

pub fn snapshot_cmd(image: &Path, snap: &Path, control: Option<&Path>) -> Result<(), Failure> {
    // A served image is snapshotted by its server, live; any other offline.
    if let Some(mut c) = crate::control::client::for_image(image, control)? {
        let abs = |p: &Path| crate::control::client::absolute(p);
        let args = json!({"image": abs(image)?, "snapshot": abs(snap)?});
        let r = c.call("snapshot", args)?;
        let ms = r.get("paused_ms").and_then(Value::as_f64).unwrap_or(0.0);
        say!(
            "{} frozen as {}; {} is now an empty overlay on it (live: clients paused {ms:.1} ms)",
            image.display(),
            snap.display(),
            image.display()
        );
        return Ok(());
    }
    snapshot::snapshot(image, snap)?;
    say!("{} frozen as {}; {} is now an empty overlay on it", image.display(), snap.display(), image.display());
    Ok(())
}

pub fn flatten_cmd(image: &Path, output: Option<PathBuf>, format: &str, job: &JobArgs) -> Result<(), Failure> {
    let bar = Bar::new("flatten");
    let progress = |d, t| bar.update(d, t);
    match output {
        None => {
            let start = Start { kind: "flatten", image, args: json!({}), rate: job.rate, detach: job.detach };
            if jobs::on_server(start, job.control.as_deref())?.is_some() {
                if !job.detach {
                    say!("{} no longer depends on any parent (live)", image.display());
                }
                return Ok(());
            }
            if job.rate.is_some() {
                // `--rate` is kept by the job machinery: the flatten runs here as a live one
                // does, with the same result. (Until 2026-12-04 it was ignored here.)
                jobs::here(image, JobSpec::Flatten, job.rate)?;
            } else {
                flatten_in_place(image, &progress)?;
            }
            say!("{} no longer depends on any parent", image.display());
        }
        Some(out) => {
            let f = if format == "raw" { OutputFormat::Raw } else { OutputFormat::Cowdisk };
            sweep_temps(&out, "flatten");
            crate::interrupt::remove_temps_on_signal(&out, "flatten");
            flatten_to(image, &out, f, &progress).map_err(|e| match e.kind() {
                // The server holds the top: point at the ways that work on a served image.
                cowdisk::ErrorKind::InUse if matches!(crate::control::client::for_image(image, None), Ok(Some(_))) => Failure(
                    format!(
                        "{e}; {} is served: take a live snapshot (cowdisk snapshot) and flatten the snapshot, or copy the export (nbdcopy)",
                        image.display()
                    ),
                    1,
                ),
                _ => Failure::from(e),
            })?;
            say!("wrote the merged contents of {} to {} ({format})", image.display(), out.display());
        }
    }
    Ok(())
}

pub fn commit_cmd(image: &Path, force: bool, job: &JobArgs) -> Result<(), Failure> {
    let bar = Bar::new("commit");
    // Refused the same way whether or not a server serves it.
    commit::commit_target(image, force)?;
    let start = Start { kind: "commit", image, args: json!({}), rate: job.rate, detach: job.detach };
    if jobs::on_server(start, job.control.as_deref())?.is_some() {
        if !job.detach {
            say!("committed {} into its parent (live); it holds only what was written meanwhile", image.display());
        }
        return Ok(());
    }
    sweep_temps(image, "commit");
    // Ctrl-C while the new empty overlay is being made removes it (the commit itself is
    // crash-safe: run again, it finishes).
    crate::interrupt::remove_temps_on_signal(image, "commit");
    if job.rate.is_some() || commit::interrupted(image)? {
        // Run here as a live commit runs: a stopped commit's intermediate layer first, then
        // the top (what was written since), at `--rate` if given; the same result as the
        // offline commit, which keeps no rate and knows no intermediate layer. (Until
        // 2026-12-04 the offline commit ignored --rate, and after an interrupted live commit
        // it left what was written since in the image; both found by reviews.)
        jobs::here(image, JobSpec::Commit, job.rate)?;
    } else {
        commit::commit(image, force, &|d, t| bar.update(d, t))?;
    }
    say!("committed {} into its parent; it is now an empty overlay", image.display());
    Ok(())
}

pub fn compact_cmd(image: &Path, merged: &Path, layers: Option<usize>, job: &JobArgs) -> Result<(), Failure> {
    // Said here; the compaction sweeps too (a server's, which says nothing, among them).
    sweep_temps(merged, "compact");
    let into = crate::control::client::absolute(merged)?;
    let args = json!({"into": into, "layers": layers});
    let start = Start { kind: "compact", image, args, rate: job.rate, detach: job.detach };
    let live = jobs::on_server(start, job.control.as_deref())?;
    if live.is_none() {
        crate::interrupt::remove_temps_on_signal(merged, "compact");
        jobs::here(image, JobSpec::Compact { into: merged.to_path_buf(), layers }, job.rate)?;
    }
    if !job.detach || live.is_none() {
        say!(
            "merged the layers under {} into {}; {} now stands on it",
            image.display(),
            merged.display(),
            image.display()
        );
    }
    Ok(())
}

fn layer_json(l: &LayerInfo, depth: usize) -> Value {
    json!({
        "depth": depth,
        "path": l.path.display().to_string(),
        "format": l.format,
        "virtual_size": l.virtual_size,
        "chunk_size": l.chunk_size,
        "data_checksums": l.data_checksums,
        "log": l.log,
        "data_bytes": l.data_bytes,
        "disk_bytes": l.disk_bytes,
        "uuid": l.uuid,
        "flags": l.flags,
        "parent": l.parent.as_ref().map(|(p, f)| json!({"path": p, "format": f})),
    })
}

pub fn info_cmd(image: &Path, as_json: bool) -> Result<(), Failure> {
    let layers = info(image)?;
    let Some(top) = layers.first() else {
        return Err(Failure("empty chain".into(), 1));
    };
    if as_json {
        let v = json!({
            "image": image.display().to_string(),
            "virtual_size": top.virtual_size,
            "chunk_size": top.chunk_size,
            "data_bytes": top.data_bytes,
            "disk_bytes": top.disk_bytes,
            "flags": top.flags,
            "layers": layers.iter().enumerate().map(|(i, l)| layer_json(l, i)).collect::<Vec<_>>(),
        });
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    say!("image: {}", image.display());
    say!("virtual size: {} ({} bytes)", format_size(top.virtual_size), top.virtual_size);
    if let Some(c) = top.chunk_size {
        say!("chunk size: {}", format_size(c));
    }
    say!("data checksums: {}", if top.data_checksums { "on" } else { "off" });
    if top.log {
        say!("log-structured: on (new blocks' durable writes go to a log in the data area)");
    }
    say!("allocated: {} of data, {} on disk", format_size(top.data_bytes), format_size(top.disk_bytes));
    say!("flags: {}", if top.flags.is_empty() { "none".to_string() } else { top.flags.join(", ") });
    say!("chain ({} layer{}):", layers.len(), if layers.len() == 1 { "" } else { "s" });
    for (i, l) in layers.iter().enumerate() {
        let mut line = format!("  [{i}] {} ({}, {}", l.path.display(), l.format, format_size(l.virtual_size));
        if let Some(c) = l.chunk_size {
            line += &format!(", chunk {}, data {}", format_size(c), format_size(l.data_bytes));
        }
        line += &format!(", on disk {})", format_size(l.disk_bytes));
        if !l.flags.is_empty() {
            line += &format!(" [{}]", l.flags.join(", "));
        }
        if let Some(u) = &l.uuid {
            line += &format!(" uuid {u}");
        }
        say!("{line}");
    }
    Ok(())
}

pub fn map_cmd(image: &Path, as_json: bool) -> Result<(), Failure> {
    let chain = Chain::open(image, ChainOptions { inspect: true, ..Default::default() })?;
    let extents = all_extents(&chain)?;
    if as_json {
        let v: Vec<Value> = extents
            .iter()
            .map(|e| {
                let (data, zero, depth) = match e.kind {
                    ExtentKind::Data { depth } => (true, false, Some(depth)),
                    ExtentKind::Zero { depth } => (false, true, Some(depth)),
                    ExtentKind::Unallocated => (false, true, None),
                };
                json!({"offset": e.offset, "length": e.length, "data": data, "zero": zero, "depth": depth})
            })
            .collect();
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let names: Vec<String> = std::iter::once(chain.top())
        .chain(chain.lowers().iter().map(|l| &**l))
        .map(|i| i.path().display().to_string())
        .chain(chain.base().map(|b| b.path().display().to_string()))
        .collect();
    say!("{:>18} {:>18}  {}", "offset", "length", "served by");
    for e in &extents {
        let what = match e.kind {
            ExtentKind::Data { depth } => {
                format!("data, depth {depth} ({})", names.get(depth).map_or("?", |s| s.as_str()))
            }
            ExtentKind::Zero { depth } => {
                format!("zero, depth {depth} ({})", names.get(depth).map_or("?", |s| s.as_str()))
            }
            ExtentKind::Unallocated => "zero (unallocated)".to_string(),
        };
        say!("{:>#18x} {:>#18x}  {what}", e.offset, e.length);
    }
    Ok(())
}

pub fn diff_cmd(old: &Path, new: &Path, as_json: bool) -> Result<(), Failure> {
    let changes = diff::diff(old, new)?;
    if as_json {
        let v: Vec<Value> =
            changes.iter().map(|c| json!({"offset": c.offset, "length": c.length, "changed": c.changed})).collect();
        say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    say!("{:>18} {:>18}  since {}", "offset", "length", old.display());
    for c in &changes {
        say!("{:>#18x} {:>#18x}  {}", c.offset, c.length, if c.changed { "changed" } else { "unchanged" });
    }
    let changed: Vec<_> = changes.iter().filter(|c| c.changed).collect();
    let bytes: u64 = changed.iter().map(|c| c.length).sum();
    let size = changes.last().map_or(0, |c| c.end());
    let n = changed.len();
    say!("{} of {} may differ, in {n} extent{}", format_size(bytes), format_size(size), if n == 1 { "" } else { "s" });
    Ok(())
}

fn report_json(r: &CheckReport) -> Value {
    let status = match r.exit_code() {
        0 => "clean",
        3 => "leaks",
        _ => "corrupt",
    };
    json!({
        "status": status,
        "exit_code": r.exit_code(),
        "leaked_bytes": r.leaked_bytes(),
        "images": r.images.iter().map(|i| json!({
            "path": i.path.display().to_string(),
            "errors": i.errors,
            "leaked_bytes": i.leaked_bytes,
            "dirty": i.dirty,
            "in_use": i.in_use,
            "unflushed_bytes": i.unflushed_bytes,
            "repaired": i.repaired,
            "unreclaimable_bytes": i.unreclaimable_bytes,
            "header_slot_damaged": i.header_slot_damaged,
            "damaged_blocks": i.damaged_blocks,
        })).collect::<Vec<_>>(),
    })
}

pub fn check_cmd(image: &Path, opts: CheckOptions, as_json: bool) -> Result<(), Failure> {
    let bar = Bar::new("check");
    let r = check(image, &opts, &|d, t| bar.update(d, t));
    drop(bar);
    if let Some(e) = r.unreadable() {
        return Err(Failure(e.to_string(), 1));
    }
    let code = r.exit_code();
    if as_json {
        say!("{}", serde_json::to_string_pretty(&report_json(&r)).unwrap_or_default());
    } else {
        for i in &r.images {
            let mut state = Vec::new();
            if i.errors.is_empty() {
                state.push("checksums and invariants ok".to_string());
            }
            if i.leaked_bytes > 0 {
                let how = match (i.repaired, i.unreclaimable_bytes) {
                    (false, _) => String::new(),
                    (true, 0) => " (reclaimed)".into(),
                    (true, n) => format!(
                        " ({} of it not given back: this file system does not punch holes; new data reuses it)",
                        format_size(n)
                    ),
                };
                state.push(format!("{} leaked{how}", format_size(i.leaked_bytes)));
            }
            if i.header_slot_damaged {
                state.push(if i.repaired {
                    "a damaged header slot was rewritten".into()
                } else {
                    "one header slot is unreadable (torn write or damage)".into()
                });
            }
            if i.damaged_blocks > 0 {
                state.push(format!("{} damaged data blocks", i.damaged_blocks));
            }
            if i.in_use {
                state.push(format!(
                    "open for writing in another process: {} written since its last flush, not in its durable map yet",
                    format_size(i.unflushed_bytes)
                ));
            } else if i.dirty {
                state.push(if i.repaired {
                    "was not closed cleanly (flag cleared)".into()
                } else {
                    "not closed cleanly (or open now)".into()
                });
            }
            if !i.errors.is_empty() {
                state.insert(0, "corrupt".to_string());
            }
            say!("{}: {}", i.path.display(), state.join("; "));
            for e in &i.errors {
                say!("  corrupt: {e}");
            }
        }
    }
    match code {
        0 => Ok(()),
        c => Err(Failure(String::new(), c)),
    }
}
