//! A connection's notice that it is being wound down (the server stops, or its export is
//! removed by force), how long its client has been quiet since, and the counts of requests
//! running and steps made that the watchdog's stall check reads ([`super::stall`]).
//!
//! The NBD spec asks a server that shuts down to answer requests in flight, then requests it
//! receives afterwards with `NBD_ESHUTDOWN` (options with `NBD_REP_ERR_SHUTDOWN`), so that the
//! client learns why and disconnects softly. A connection's reader cannot be woken from a
//! blocking read without closing the socket's read side, after which a client's next request
//! is lost (a Unix socket refuses it with EPIPE). So the server keeps reading while the
//! client keeps sending, refusing each request, and closes the read side only once the
//! connection has been quiet for [`QUIET`] (no request running, none read and no reply sent
//! meanwhile), or [`LONGEST`] after winding began: a client gets an answer for every request
//! it sent, also one sent after a slow reply, an idle one costs the shutdown [`QUIET`], and one
//! that goes on sending after its refusals (the spec says it MUST disconnect) costs it
//! [`LONGEST`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a winding-down connection's client must send nothing before its read side is
/// closed. Longer than a pipelining client's gap between two requests even on a loaded
/// machine; short enough that an idle client barely delays a shutdown.
pub const QUIET: Duration = Duration::from_millis(200);
/// How long a winding-down connection is read from at most.
pub const LONGEST: Duration = Duration::from_secs(2);

/// Why a connection winds down; the reason goes into structured error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    ServerStopping = 1,
    ExportRemoved = 2,
}

#[derive(Debug)]
pub struct Winding {
    /// 0 while serving, else a [`Why`].
    why: AtomicU8,
    /// When winding began, in microseconds since `epoch`.
    began: AtomicU64,
    /// When a request or option was last read or a reply sent while winding down (or winding
    /// began), in microseconds since `epoch`.
    last: AtomicU64,
    /// Requests of the connection being run: the transmission phase's own count (it decides
    /// how many threads serve the connection), kept here so that a wind-down never closes the
    /// read side of a connection that still owes a reply.
    pub(crate) busy: AtomicUsize,
    /// Threads of `busy` waiting on the client in the middle of a request (a write's payload
    /// still arriving, a reply being sent): such a wait is the client's doing, never a stall.
    on_client: AtomicUsize,
    /// Of `on_client`, the threads waiting for a write's payload: they hold the device's locks
    /// meanwhile (the payload goes straight into the image), so requests waiting for those
    /// locks are the client's doing too.
    on_payload: AtomicUsize,
    /// Steps forward: requests answered, waits on the client that ended, and the steps a long
    /// request makes (progress.rs; the connection's threads count theirs here). A count that
    /// stands still while a request runs outside such a wait is what a stuck disk looks like.
    steps: Arc<AtomicU64>,
    /// The read side has been closed: set once, by whoever closes it.
    cut: AtomicBool,
    epoch: Instant,
}

/// A request being run: counted busy while it lives (see [`Winding::begin`]).
pub(crate) struct Running<'a> {
    w: &'a Winding,
    /// Requests of the connection running when this one began, itself included.
    pub(crate) now: usize,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.w.busy.fetch_sub(1, Ordering::AcqRel);
        self.w.steps.fetch_add(1, Ordering::Release);
    }
}

impl Default for Winding {
    fn default() -> Self {
        Winding {
            why: AtomicU8::new(0),
            began: AtomicU64::new(0),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            on_client: AtomicUsize::new(0),
            on_payload: AtomicUsize::new(0),
            steps: Arc::new(AtomicU64::new(0)),
            cut: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }
}

impl Winding {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Starts winding down, unless it already has (the first reason stays).
    pub fn start(&self, why: Why) {
        if self.started() {
            return;
        }
        // The times before the reason: whoever sees the reason sees them too. Two starting at
        // once both store about the same time; the first reason stays.
        let now = self.now();
        self.began.store(now, Ordering::Release);
        self.last.store(now, Ordering::Release);
        let _ = self.why.compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the connection is winding down.
    pub fn started(&self) -> bool {
        self.why.load(Ordering::Acquire) != 0
    }

    /// For a request or option just read: `None` while serving, so it runs; else the message
    /// to refuse it with. Either way one atomic load while serving; the clock is read only
    /// while winding down, to note that the client is not quiet.
    pub fn refusal(&self) -> Option<&'static str> {
        let why = match self.why.load(Ordering::Acquire) {
            0 => return None,
            w if w == Why::ExportRemoved as u8 => "the export is being removed from the server",
            _ => "the server is shutting down",
        };
        self.touch();
        Some(why)
    }

    /// Notes that the connection is not quiet now.
    fn touch(&self) {
        self.last.store(self.now(), Ordering::Release);
    }

    /// For a reply just sent: while winding down, the connection is not quiet (its client may
    /// send its next request, or NBD_CMD_DISC, only now).
    pub fn replied(&self) {
        if self.started() {
            self.touch();
        }
    }

    /// A request taken to be run (or a refusal being sent): counted busy until the guard is
    /// dropped, also by a panic, and then a step forward.
    pub(crate) fn begin(&self) -> Running<'_> {
        let now = self.busy.fetch_add(1, Ordering::AcqRel) + 1;
        Running { w: self, now }
    }

    /// The counter a connection's threads attach for the steps of long requests (progress.rs).
    pub(crate) fn steps(&self) -> Arc<AtomicU64> {
        self.steps.clone()
    }

    /// Runs `f`, a wait on the client in the middle of a request (sending its reply), as one:
    /// not a stall however long it takes, and a step when done. Only within [`Self::begin`].
    pub(crate) fn on_client<T>(&self, f: impl FnOnce() -> T) -> T {
        self.waiting(&[&self.on_client], f)
    }

    /// As [`Self::on_client`], for a wait for a write's payload, with the device's locks held.
    pub(crate) fn on_payload<T>(&self, f: impl FnOnce() -> T) -> T {
        self.waiting(&[&self.on_client, &self.on_payload], f)
    }

    fn waiting<T>(&self, counts: &[&AtomicUsize], f: impl FnOnce() -> T) -> T {
        struct Wait<'a>(&'a [&'a AtomicUsize], &'a AtomicU64);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                for c in self.0 {
                    c.fetch_sub(1, Ordering::AcqRel);
                }
                self.1.fetch_add(1, Ordering::Release);
            }
        }
        for c in counts {
            c.fetch_add(1, Ordering::AcqRel);
        }
        let _wait = Wait(counts, &self.steps);
        f()
    }

    /// What the stall check needs: the steps made so far, whether some request is running
    /// outside a wait on the client, and whether one waits for a payload. Steps are read
    /// first: a step between the reads is seen at the next sample.
    pub(crate) fn sample(&self) -> super::stall::Sample {
        let steps = self.steps.load(Ordering::Acquire);
        let busy = self.busy.load(Ordering::Acquire);
        let on_client = self.on_client.load(Ordering::Acquire);
        let on_payload = self.on_payload.load(Ordering::Acquire);
        super::stall::Sample { steps, working: busy > on_client, on_payload: on_payload > 0 }
    }

    /// Whether the read side should now be closed: winding down, not closed yet, and quiet
    /// (nothing running, read or sent) for [`QUIET`], or winding for [`LONGEST`]. True once:
    /// the caller closes it.
    pub fn take_cut(&self) -> bool {
        let now = self.now();
        let since =
            |at: &AtomicU64, d: Duration| now.saturating_sub(at.load(Ordering::Acquire)) >= d.as_micros() as u64;
        let quiet = self.busy.load(Ordering::Acquire) == 0 && since(&self.last, QUIET);
        self.started() && (quiet || since(&self.began, LONGEST)) && !self.cut.swap(true, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_after_start_and_cuts_once_after_a_quiet_spell() {
        let w = Winding::default();
        assert_eq!(w.refusal(), None);
        assert!(!w.take_cut(), "a serving connection is never cut");
        w.start(Why::ExportRemoved);
        w.start(Why::ServerStopping);
        assert_eq!(w.refusal(), Some("the export is being removed from the server"), "the first reason stays");
        assert!(!w.take_cut(), "just read a request: not quiet");
        // A request running keeps it open however long it takes; its reply starts the quiet.
        w.busy.fetch_add(1, Ordering::AcqRel);
        std::thread::sleep(QUIET + Duration::from_millis(20));
        assert!(!w.take_cut(), "cut while a request runs");
        w.busy.fetch_sub(1, Ordering::AcqRel);
        w.replied();
        assert!(!w.take_cut(), "cut right after a reply");
        std::thread::sleep(QUIET + Duration::from_millis(20));
        assert!(w.take_cut());
        assert!(!w.take_cut(), "cut once");
    }

    #[test]
    fn a_client_that_keeps_sending_is_cut_after_the_longest_wind_down() {
        let w = Winding::default();
        w.start(Why::ServerStopping);
        let t = Instant::now();
        while !w.take_cut() {
            assert!(w.refusal().is_some());
            assert!(t.elapsed() < LONGEST + QUIET, "never cut");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(t.elapsed() >= LONGEST, "cut while the client was sending, after {:?}", t.elapsed());
    }
}
