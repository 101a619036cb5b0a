//! Background jobs from the command line: `commit`, `flatten` and `compact` of an image a
//! server serves start a job in that server and follow its progress (or return at once with
//! `--detach`); `cowdisk jobs` lists them and `cowdisk jobs cancel ID` stops one. An image no
//! server serves gets the same work done here, by the same code.

use crate::control::client::{absolute, for_image, server, Client};
use crate::progress::Bar;
use crate::Failure;
use cowdisk::live::jobs::{Job, JobSpec};
use cowdisk::live::LiveChain;
use cowdisk::{Chain, ChainOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum JobsCmd {
    /// Ask running job ID to stop at its next safe point.
    Cancel {
        id: u64,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

/// `cowdisk jobs [--json]`: the jobs of the running server.
pub fn list(as_json: bool, control: Option<&Path>) -> Result<(), Failure> {
    let jobs = server(control)?.call("job-list", json!({}))?;
    if as_json {
        say!("{}", serde_json::to_string_pretty(&jobs).unwrap_or_default());
        return Ok(());
    }
    let rows = jobs.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        say!("no jobs");
    }
    for j in &rows {
        let n = |k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
        let s = |k: &str| j.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let pct = if n("total") > 0 { 100.0 * n("done") as f64 / n("total") as f64 } else { 0.0 };
        let err = j.get("error").and_then(Value::as_str).map(|e| format!(": {e}")).unwrap_or_default();
        say!(
            "{} {} {} {} {pct:.0}% ({} of {} bytes) {:.1}s{err}",
            n("id"),
            s("kind"),
            s("image"),
            s("state"),
            n("done"),
            n("total"),
            n("elapsed_ms") as f64 / 1000.0
        );
    }
    Ok(())
}

pub fn run(cmd: JobsCmd) -> Result<(), Failure> {
    match cmd {
        JobsCmd::Cancel { id, control } => {
            server(control.as_deref())?.call("job-cancel", json!({"id": id}))?;
            say!("job {id} asked to stop");
        }
    }
    Ok(())
}

/// How a job on a served image is started and followed.
pub struct Start<'a> {
    pub kind: &'static str,
    pub image: &'a Path,
    pub args: Value,
    pub rate: Option<u64>,
    pub detach: bool,
}

/// Starts the job in the server of `image` if one serves it: `Ok(None)` if none does.
/// Follows its progress to the end unless detached; a job that fails or is cancelled is an
/// error. Returns the job's last state.
pub fn on_server(start: Start, control: Option<&Path>) -> Result<Option<Value>, Failure> {
    let Some(mut c) = for_image(start.image, control)? else { return Ok(None) };
    let mut args = start.args;
    args["kind"] = json!(start.kind);
    args["image"] = json!(absolute(start.image)?);
    args["rate"] = json!(start.rate);
    let job = c.call("job-start", args)?;
    let id = job.get("id").and_then(Value::as_u64).unwrap_or(0);
    if start.detach {
        say!("job {id} started: {} of {}; follow it with `cowdisk jobs`", start.kind, start.image.display());
        return Ok(Some(job));
    }
    follow(&mut c, id, start.kind, start.image).map(Some)
}

fn follow(c: &mut Client, id: u64, kind: &str, image: &Path) -> Result<Value, Failure> {
    let bar = Bar::new(kind);
    loop {
        let list = match c.call("job-list", json!({})) {
            Ok(l) => l,
            // The server was killed or stopped under the job: say so, not just that a socket
            // broke. Jobs are crash-safe: stopped anywhere, the disk reads as before
            // (tests/live_jobs.rs kills the server under each kind).
            Err(_) if c.lost() => {
                return Err(Failure(
                    format!(
                        "{}: the server stopped while job {id} ({kind}) was running, so the job may not \
                         have finished; the disk reads as before, and running the command again finishes it",
                        image.display()
                    ),
                    1,
                ))
            }
            Err(e) => return Err(e),
        };
        let job = list
            .as_array()
            .and_then(|l| l.iter().find(|j| j.get("id").and_then(Value::as_u64) == Some(id)).cloned())
            .ok_or_else(|| Failure(format!("job {id} vanished from the server"), 1))?;
        let n = |k: &str| job.get(k).and_then(Value::as_u64).unwrap_or(0);
        bar.update(n("done"), n("total"));
        match job.get("state").and_then(Value::as_str).unwrap_or("") {
            "running" => std::thread::sleep(Duration::from_millis(100)),
            "completed" => return Ok(job),
            "cancelled" => {
                return Err(Failure(
                    format!(
                        "job {id} ({kind}) was cancelled (by `cowdisk jobs cancel`, or by its server stopping); \
                         running the command again finishes it"
                    ),
                    1,
                ))
            }
            _ => {
                let e = job.get("error").and_then(Value::as_str).unwrap_or("failed");
                return Err(Failure(e.to_string(), 1));
            }
        }
    }
}

/// Runs `spec` on the chain of `image` here (no server serves it), with a progress bar.
pub fn here(image: &Path, spec: JobSpec, rate: Option<u64>) -> Result<(), Failure> {
    let chain = Chain::open(image, ChainOptions { writable: true, ..Default::default() })?;
    let live = LiveChain::new(chain);
    let job = Job::new(1, spec, image, rate);
    let bar = Bar::new(job.spec.name());
    let r = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            while job.state() == cowdisk::live::jobs::JobState::Running {
                let (d, t) = job.progress();
                bar.update(d, t);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = job.run_here(&live);
        let _ = watcher.join();
        r
    });
    let closed = live.close();
    r?;
    closed?;
    Ok(())
}
