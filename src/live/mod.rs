//! A served disk whose chain can change under its clients: requests run on the chain of the
//! moment, and an operation that replaces the chain (a live snapshot) waits for the requests
//! in flight, holds new ones back while it runs, and lets them go on on the new chain. Clients
//! see a pause, never an error or a disconnect.
//!
//! Invariant: a request runs entirely on one chain (it holds the chain shared from start to
//! reply); a replacement holds it exclusively. If an operation leaves no usable chain (a
//! snapshot decided on disk but not carried out), every later request fails with the reason,
//! and the next open of the image finishes what was decided.

use crate::chain::Chain;
use crate::device::{
    Change, Disk, DiskExtents, DiskFlush, DiskLayers, DiskRead, DiskWrite, DiskZero, Extent, LayerId, Payload,
};
use crate::error::{err, Error, ErrorKind, Result};
use crate::ops::snapshot::{snapshot_chain, LiveSnapshotError};
use crate::storage::namespace::Namespace;
use crate::sync::lock;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod jobs;
mod steps;

/// How long a replacement holds new requests back at a time while it waits for those in
/// flight (see [`LiveChain::hold`]): well over what requests take to finish on a loaded
/// machine, so a busy export is paused once, not in turns.
const HOLD: Duration = Duration::from_millis(100);

pub struct LiveChain {
    /// The top image's path, fixed: a snapshot gives the path a new file, not a new path.
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// The chain, or why there is none.
    chain: RwLock<std::result::Result<Chain, String>>,
    /// The job running on this chain, if any: one operation that changes the chain's layers
    /// at a time (a snapshot asked meanwhile is refused).
    busy: Mutex<Option<&'static str>>,
}

/// A replacement that failed: why, and the chain to go on with if it is unchanged.
pub type Failed = (Error, Option<Box<Chain>>);

impl LiveChain {
    pub fn new(chain: Chain) -> LiveChain {
        LiveChain {
            path: chain.top().path().to_path_buf(),
            size: chain.size(),
            read_only: chain.is_read_only(),
            chain: RwLock::new(Ok(chain)),
            busy: Mutex::new(None),
        }
    }

    /// The top image's path (the export's image).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chain of the moment, for reading facts about it (layers, maps). Held shared: a
    /// replacement waits until the guard is dropped.
    pub fn current(&self) -> Result<ChainGuard<'_>> {
        let g = self.chain.read();
        if let Err(reason) = &*g {
            return Err(unusable(&self.path, reason));
        }
        Ok(ChainGuard(g))
    }

    /// Takes a snapshot of the top as `snapshot` (spec §5.7.1) while clients stay connected:
    /// requests in flight finish, new ones wait, the chain is flushed, the snapshot steps run,
    /// and requests go on on the new top. The snapshot holds every write acknowledged before
    /// the call, and none that began after it returned. Returns how long requests waited.
    /// Refused while a job runs on the chain.
    pub fn snapshot(&self, ns: &dyn Namespace, snapshot: &Path) -> Result<Duration> {
        // Held across the snapshot: a job cannot start between the look and the snapshot (it
        // would find a layer it did not expect and fail). A job asked for meanwhile waits for
        // the snapshot (as QMP commands wait for one another); an export removal does not
        // (see [`LiveChain::try_claim`]).
        let busy = lock(&self.busy);
        if let Some(job) = *busy {
            return Err(self.busy_with(job));
        }
        // The name a commit's own snapshot takes (`snapshot_now`) is not the user's to take.
        crate::ops::commit::refuse_commit_layer_name(snapshot).map_err(|e| e.during("snapshot"))?;
        self.snapshot_now(ns, snapshot)
    }

    /// [`LiveChain::snapshot`] without asking whether a job runs (a job's own step).
    fn snapshot_now(&self, ns: &dyn Namespace, snapshot: &Path) -> Result<Duration> {
        self.replace(|chain| {
            snapshot_chain(ns, chain, snapshot).map_err(|LiveSnapshotError { error, chain }| (error, chain))
        })
    }

    /// Replaces the chain by what `f` makes of it, with every request held back meanwhile:
    /// requests in flight finish first, new ones wait and then run on the new chain. When `f`
    /// fails without giving the chain back, the export stops (every request fails with the
    /// reason). Returns how long requests waited.
    pub fn replace(&self, f: impl FnOnce(Chain) -> std::result::Result<Chain, Failed>) -> Result<Duration> {
        // Requests are held from the moment this waits for the lock (it is taken before any
        // new reader: writer first), not only once it has it: a request that takes long to
        // finish, such as a large write whose client is slow to send its payload, makes
        // every client of the export wait as long, and the pause reported says so.
        let paused = Instant::now();
        let mut g = self.hold();
        let chain = match std::mem::replace(&mut *g, Err("a change of the chain did not finish".into())) {
            Ok(c) => c,
            Err(reason) => {
                let e = unusable(&self.path, &reason);
                *g = Err(reason);
                return Err(e);
            }
        };
        match f(chain) {
            Ok(new) => {
                *g = Ok(new);
                Ok(paused.elapsed())
            }
            Err((error, Some(old))) => {
                *g = Ok(*old);
                Err(error)
            }
            Err((error, None)) => {
                // Requests tell clients this reason: no server paths in it.
                *g = Err(format!("the chain could not be changed ({}); restart to recover", error.for_client()));
                Err(error)
            }
        }
    }

    /// Marks the chain busy with a `job`; refused if one runs. [`LiveChain::release`] ends it.
    pub fn claim(&self, job: &'static str) -> Result<()> {
        self.claim_in(&mut lock(&self.busy), job)
    }

    /// [`LiveChain::claim`] without waiting for a snapshot being taken: refused at once then.
    /// A snapshot can wait as long as a client takes to finish a request in flight (a write
    /// whose payload is slow to come, or never comes); an export removal must not wait as
    /// long (a forced one disconnects the clients first, which ends that wait).
    pub fn try_claim(&self, job: &'static str) -> Result<()> {
        let mut b = match self.busy.try_lock() {
            Ok(b) => b,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(
                    err(ErrorKind::InUse, "in use: a snapshot of this chain is being taken").with_file(&self.path)
                )
            }
        };
        self.claim_in(&mut b, job)
    }

    /// Claims `busy` (held) for `job` unless a job has it.
    fn claim_in(&self, busy: &mut Option<&'static str>, job: &'static str) -> Result<()> {
        if let Some(other) = *busy {
            return Err(self.busy_with(other));
        }
        *busy = Some(job);
        Ok(())
    }

    /// The refusal while `job` runs on the chain.
    fn busy_with(&self, job: &str) -> Error {
        err(ErrorKind::InUse, format!("in use: a {job} job is running on this chain")).with_file(&self.path)
    }

    pub fn release(&self) {
        *lock(&self.busy) = None;
    }

    /// Flushes and closes the chain (the top cleanly, DIRTY cleared) and lets go of its files
    /// once requests in flight are done; later requests fail.
    pub fn close(&self) -> Result<()> {
        let mut g = self.hold();
        match std::mem::replace(&mut *g, Err("the export was closed".into())) {
            Ok(c) => c.close(),
            Err(reason) => {
                *g = Err(reason);
                Ok(())
            }
        }
    }

    /// The chain held exclusively. While this waits for the requests in flight, new ones are
    /// held back (the lock is task-fair: a busy export cannot starve a replacement), but for
    /// at most [`HOLD`] at a time: a request that does not finish (a large write runs as its
    /// payload arrives, and its client may stop sending) would otherwise keep every client of
    /// the export waiting with it. After each [`HOLD`] requests run as long again, and the
    /// wait starts over.
    fn hold(&self) -> RwLockWriteGuard<'_, std::result::Result<Chain, String>> {
        loop {
            if let Some(g) = self.chain.try_write_for(HOLD) {
                return g;
            }
            std::thread::sleep(HOLD);
        }
    }

    /// Whether the chain can still serve (a change of it that failed half-way leaves it
    /// unusable until a restart: every request then fails with the reason).
    pub fn is_usable(&self) -> bool {
        self.chain.read().is_ok()
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&Chain) -> Result<R>) -> Result<R> {
        match &*self.chain.read() {
            Ok(c) => f(c),
            Err(reason) => Err(unusable(&self.path, reason)),
        }
    }
}

fn unusable(path: &Path, reason: &str) -> Error {
    err(ErrorKind::Io, format!("export unavailable: {reason}")).with_file(path)
}

/// The chain of a [`LiveChain`] at one moment (see [`LiveChain::current`]).
pub struct ChainGuard<'a>(RwLockReadGuard<'a, std::result::Result<Chain, String>>);

impl std::ops::Deref for ChainGuard<'_> {
    type Target = Chain;
    fn deref(&self) -> &Chain {
        match &*self.0 {
            Ok(c) => c,
            // `current` hands out guards only over a chain, and nothing changes it while one
            // is held.
            Err(_) => unreachable!("a ChainGuard holds a chain"),
        }
    }
}

impl DiskRead for LiveChain {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.with(|c| c.read_at(buf, offset))
    }
}

impl DiskWrite for LiveChain {
    fn write_from(&self, src: &mut dyn Payload, offset: u64, len: u64) -> Result<()> {
        self.with(|c| c.write_from(src, offset, len))
    }

    fn write_fua_from(&self, src: &mut dyn Payload, offset: u64, len: u64) -> Result<()> {
        self.with(|c| c.write_fua_from(src, offset, len))
    }
}

impl DiskZero for LiveChain {
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool) -> Result<()> {
        self.with(|c| c.write_zeroes(offset, len, allocate))
    }

    fn zeroing_is_fast(&self, offset: u64, len: u64, allocate: bool) -> bool {
        // An unusable chain fails the zeroing itself, with its reason.
        self.with(|c| Ok(c.zeroing_is_fast(offset, len, allocate))).unwrap_or(true)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.with(|c| c.discard(offset, len))
    }
}

impl DiskFlush for LiveChain {
    fn flush(&self) -> Result<()> {
        self.with(|c| c.flush())
    }
}

impl DiskExtents for LiveChain {
    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        self.with(|c| c.extents(offset, len, max_extents))
    }
}

/// Each call on the chain of the moment: a layer is found and what changed since it is
/// computed under one hold of the chain, so a snapshot taken meanwhile cannot move it halfway.
impl DiskLayers for LiveChain {
    fn snapshots(&self) -> Vec<(String, LayerId)> {
        self.with(|c| Ok(c.snapshots())).unwrap_or_default()
    }

    fn changed_since(&self, id: LayerId, offset: u64, len: u64, max_extents: usize) -> Result<Option<Vec<Change>>> {
        self.with(|c| c.changed_since(id, offset, len, max_extents))
    }
}

impl Disk for LiveChain {
    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn layers(&self) -> Option<&dyn DiskLayers> {
        Some(self)
    }
}
