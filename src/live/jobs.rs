//! Background jobs on served chains: a commit, a flatten or a compaction running in a thread
//! of the server while clients go on reading and writing, with progress, cancellation at safe
//! points, an optional rate limit, and at most one job per chain.
//!
//! What a job leaves when it stops early (cancelled, failed, or the server stopped or killed)
//! is a valid chain that reads the same, and the same command run again carries on from it:
//! a flatten keeps what it copied (only what is still below is copied again); a commit keeps
//! the intermediate layer it froze the top into (`IMAGE.commit-XXXXXXXX`), and the next commit
//! commits that layer first; a compaction leaves the chain as it was.

use super::{steps, LiveChain};
use crate::device::Disk;
use crate::error::{err, Error, ErrorKind, Result};
use crate::storage::namespace::{Namespace, RealFs};
use crate::sync::lock;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a job does.
#[derive(Debug, Clone)]
pub enum JobSpec {
    /// Copy everything the top reads from below into it, then drop its parents.
    Flatten,
    /// Merge the top's blocks into its cowdisk parent; the top goes on holding only what was
    /// written since.
    Commit,
    /// Merge the `layers` layers below the top (all cowdisk layers if `None`) into one new
    /// frozen layer at `into`, and put the top on it.
    Compact { into: PathBuf, layers: Option<usize> },
}

impl JobSpec {
    pub fn name(&self) -> &'static str {
        match self {
            JobSpec::Flatten => "flatten",
            JobSpec::Commit => "commit",
            JobSpec::Compact { .. } => "compact",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Completed,
    Cancelled,
    Failed(String),
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed(_) => "failed",
        }
    }
}

/// One job and what it has done so far.
pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    /// The image of the chain it works on.
    pub image: PathBuf,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    /// Most bytes per second it moves, if limited.
    rate: Option<u64>,
    started: Instant,
    state: Mutex<(JobState, Option<Instant>)>,
}

impl Job {
    /// A job numbered `id` on the chain of `image`, not started.
    pub fn new(id: u64, spec: JobSpec, image: &Path, rate: Option<u64>) -> Job {
        Job {
            id,
            spec,
            image: image.to_path_buf(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            rate,
            started: Instant::now(),
            state: Mutex::new((JobState::Running, None)),
        }
    }

    /// Runs this job on `live` in the calling thread (a tool working on an image no server
    /// serves): what a server's job thread does. Refused if a job runs on the chain.
    pub fn run_here(&self, live: &LiveChain) -> Result<()> {
        self.run_here_in(live, &RealFs)
    }

    /// [`Job::run_here`] with the job's file and name operations going through `ns`.
    pub fn run_here_in(&self, live: &LiveChain, ns: &dyn Namespace) -> Result<()> {
        let r = live.claim(self.spec.name()).and_then(|()| {
            let r = run(live, self, ns);
            live.release();
            r
        });
        self.finish(&r);
        r
    }

    /// (bytes done, bytes in all) so far; the total may grow while a job learns its work.
    pub fn progress(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    pub fn state(&self) -> JobState {
        lock(&self.state).0.clone()
    }

    /// How long it ran (so far, if running).
    pub fn elapsed(&self) -> Duration {
        lock(&self.state).1.unwrap_or_else(Instant::now).duration_since(self.started)
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    pub(super) fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }

    /// Records `n` more bytes done, then waits as long as the rate limit asks.
    pub(super) fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(rate) = self.rate.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            // Short sleeps, so that a cancel is heard soon.
            let mut wait = due.saturating_sub(elapsed);
            while !wait.is_zero() && !self.cancelled() {
                let step = wait.min(Duration::from_millis(100));
                std::thread::sleep(step);
                wait -= step;
            }
        }
    }

    /// Records that `done` bytes are done in all (work measured from the start), then waits
    /// as long as the rate limit asks.
    pub(super) fn advance_to(&self, done: u64) {
        let before = self.done.load(Ordering::Relaxed);
        self.advance(done.saturating_sub(before));
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// An error if cancellation was asked: what a job checks at its safe points.
    pub(super) fn check(&self) -> Result<()> {
        if self.cancelled() {
            return Err(err(ErrorKind::Cancelled, "cancelled"));
        }
        Ok(())
    }

    fn finish(&self, r: &Result<()>) {
        let state = match r {
            Ok(()) => JobState::Completed,
            Err(e) if e.kind() == ErrorKind::Cancelled => JobState::Cancelled,
            Err(e) => JobState::Failed(e.to_string()),
        };
        *lock(&self.state) = (state, Some(Instant::now()));
    }
}

/// A job and the thread running it (taken when it is waited for).
type Running = (Arc<Job>, Option<std::thread::JoinHandle<()>>);

/// The jobs of a server, running and finished.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Mutex<Vec<Running>>,
}

impl Jobs {
    /// Starts `spec` on `live` in a thread of its own. Refused if a job runs on the chain.
    pub fn start(&self, live: Arc<LiveChain>, spec: JobSpec, rate: Option<u64>) -> Result<Arc<Job>> {
        if live.is_read_only() {
            return Err(err(ErrorKind::ReadOnly, "the image is served read-only").with_file(live.path()));
        }
        // Claimed here, before the thread starts: a second job is refused at once, not later.
        live.claim(spec.name())?;
        let job = Arc::new(Job::new(self.next.fetch_add(1, Ordering::Relaxed) + 1, spec, live.path(), rate));
        let j = job.clone();
        let thread = std::thread::spawn(move || {
            let r = run(&live, &j, &RealFs);
            live.release();
            j.finish(&r);
        });
        lock(&self.list).push((job.clone(), Some(thread)));
        Ok(job)
    }

    pub fn list(&self) -> Vec<Arc<Job>> {
        lock(&self.list).iter().map(|(j, _)| j.clone()).collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        lock(&self.list).iter().find(|(j, _)| j.id == id).map(|(j, _)| j.clone())
    }

    /// Asks job `id` to stop at its next safe point.
    pub fn cancel(&self, id: u64) -> Result<Arc<Job>> {
        let job = self.get(id).ok_or_else(|| err(ErrorKind::InvalidArgument, format!("no job {id}")))?;
        if job.state() != JobState::Running {
            return Err(err(ErrorKind::InvalidArgument, format!("job {id} is not running ({})", job.state().name())));
        }
        job.cancel.store(true, Ordering::Release);
        Ok(job)
    }

    /// Asks every running job to stop and waits until they have (server shutdown).
    pub fn stop_all(&self) {
        let handles: Vec<_> = {
            let mut l = lock(&self.list);
            l.iter_mut()
                .filter_map(|(j, h)| {
                    j.cancel.store(true, Ordering::Release);
                    h.take()
                })
                .collect()
        };
        for h in handles {
            let _ = h.join();
        }
    }
}

fn run(live: &LiveChain, job: &Job, ns: &dyn Namespace) -> Result<()> {
    match &job.spec {
        JobSpec::Flatten => steps::flatten(live, job),
        JobSpec::Commit => steps::commit(live, job, ns),
        JobSpec::Compact { into, layers } => steps::compact(live, job, ns, into, *layers),
    }
    .map_err(|e: Error| e.during(job.spec.name()))
}
