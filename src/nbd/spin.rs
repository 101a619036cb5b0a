//! How long a quiet connection's thread busy-waits for the client's next request before it
//! sleeps in the read, adapted to how soon requests have been coming.
//!
//! Why: at queue depth 1 every request and every reply wakes a sleeping thread, and on a
//! virtual machine waking a thread whose CPU has halted costs tens of microseconds (an
//! interrupt to the halted vCPU and the host scheduling it again): on the 2-vCPU test machine
//! a request reached a sleeping server thread 14 to 19 µs after the client sent it, and the
//! whole durable-write pair paid several such wake-ups (PROFILING.md, "Halted CPUs"). A
//! thread that looks at the socket for a little while first sees a request that comes soon
//! without being woken, and its CPU does not halt in between. QEMU's event loop does the same
//! (adaptive polling, `poll-max-ns`), and so does Linux for network sockets (`busy_poll`).
//!
//! The rule, after QEMU's: a wait the spin did not cover but that was still short
//! (at most [`SPIN_MAX`]) doubles the spin for the next wait (from [`SPIN_START`]); a wait
//! longer than that halves it, down to none. So a client that answers quickly gets a thread
//! that waits for it awake, and an idle or slow one costs at most one short spin now and
//! then. Between looks the thread yields its CPU, so a client on the same CPU runs.
//!
//! A look gives way to other work: it does not start, and it ends, while other requests are
//! in flight anywhere in the server. Their threads need the CPUs, and a look beside them only
//! takes turns with them: with 2 connections reading at queue depth 4 while 2 others wrote
//! and flushed at 1,000 requests a second, looks on the writers' connections took the readers'
//! p99 from 455 to 659 µs, and giving way brought it back to 469 (medians of 8 rounds,
//! PROFILING.md). A server with nothing else to do is where a look pays: its CPU would
//! otherwise halt.

use crate::storage::poll_one;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The longest spin, and the longest wait that still makes the next spin longer.
const SPIN_MAX: Duration = Duration::from_micros(200);
/// The first spin a short wait earns.
const SPIN_START: Duration = Duration::from_micros(8);

/// One connection's spin budget; used only by the thread holding the request stream.
#[derive(Debug, Default)]
pub(crate) struct Spin {
    budget: Duration,
}

impl Spin {
    /// Looks at `fd` until it is readable, the budget is spent or `others_busy()` says other
    /// requests are in flight; returns when the wait began and whether the spin saw the socket
    /// readable, or `None` if it gave way to other work (a wait that tells nothing about this
    /// client's pace, so not one to adapt to).
    pub(crate) fn wait(&self, fd: RawFd, others_busy: impl Fn() -> bool) -> Option<(Instant, bool)> {
        let start = Instant::now();
        loop {
            if others_busy() {
                return None;
            }
            if self.budget.is_zero() {
                return Some((start, false));
            }
            // A failed poll counts as readable: the read that follows reports the error.
            if poll_one(fd, libc::POLLIN, 0).unwrap_or(true) {
                return Some((start, true));
            }
            if start.elapsed() >= self.budget {
                return Some((start, false));
            }
            // SAFETY: no arguments; gives this CPU to another runnable thread, if any.
            unsafe { libc::sched_yield() };
        }
    }

    /// Adapts the budget to a wait that took `waited` (from the start of the spin to a request
    /// read) and that the spin did or did not see end.
    pub(crate) fn adapt(&mut self, waited: Duration, caught: bool) {
        if caught {
            return;
        }
        self.budget = if waited <= SPIN_MAX {
            (self.budget * 2).clamp(SPIN_START, SPIN_MAX)
        } else if self.budget / 2 < SPIN_START {
            Duration::ZERO
        } else {
            self.budget / 2
        };
    }

    /// Back to no spin: the connection is no longer quiet.
    pub(crate) fn reset(&mut self) {
        self.budget = Duration::ZERO;
    }

    #[cfg(test)]
    fn budget(&self) -> Duration {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_waits_grow_the_spin_to_its_cap_and_long_ones_shrink_it_to_none() {
        let mut s = Spin::default();
        let mut want = SPIN_START;
        for _ in 0..10 {
            s.adapt(SPIN_MAX, false);
            assert_eq!(s.budget(), want, "after a wait of {SPIN_MAX:?} the spin did not survive");
            want = (want * 2).min(SPIN_MAX);
        }
        assert_eq!(s.budget(), SPIN_MAX);
        // A request the spin saw changes nothing.
        s.adapt(3 * US, true);
        assert_eq!(s.budget(), SPIN_MAX);
        let mut want = SPIN_MAX;
        while !want.is_zero() {
            want = if want / 2 < SPIN_START { Duration::ZERO } else { want / 2 };
            s.adapt(SPIN_MAX + US, false);
            assert_eq!(s.budget(), want);
        }
        s.adapt(Duration::from_millis(5), false);
        assert!(s.budget().is_zero(), "a long wait left a spin of {:?}", s.budget());
        s.adapt(10 * US, false);
        assert_eq!(s.budget(), SPIN_START);
        s.reset();
        assert!(s.budget().is_zero());
    }

    #[test]
    fn a_spin_ends_as_soon_as_the_socket_is_readable_and_not_later_than_its_budget() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let mut s = Spin::default();
        for _ in 0..6 {
            s.adapt(10 * US, false);
        }
        use std::os::fd::AsRawFd;
        let idle = || false;
        let (start, caught) = s.wait(a.as_raw_fd(), idle).unwrap_or_else(|| panic!("an idle server's spin gave way"));
        assert!(!caught, "nothing was sent");
        assert!(start.elapsed() >= SPIN_MAX, "the spin gave up after {:?}", start.elapsed());
        // Other work in flight: no spin at all, whether or not the socket is readable.
        let t = Instant::now();
        assert!(s.wait(a.as_raw_fd(), || true).is_none(), "a spin went on beside other requests");
        assert!(t.elapsed() < SPIN_MAX, "giving way took {:?}", t.elapsed());
        // Other work that starts during the spin ends it. It starts at the second look, after
        // one yield: a later one would let a loaded machine's yields (each may wait out a
        // time slice) spend the whole budget first, and the test would measure the load.
        let looks = std::cell::Cell::new(0);
        let busy_soon = || {
            looks.set(looks.get() + 1);
            looks.get() > 1
        };
        assert!(s.wait(a.as_raw_fd(), busy_soon).is_none(), "a spin did not give way to work that began");
        use std::io::Write;
        (&b).write_all(b"x").unwrap_or_else(|e| panic!("write: {e}"));
        let (_, caught) = s.wait(a.as_raw_fd(), idle).unwrap_or_else(|| panic!("an idle server's spin gave way"));
        assert!(caught, "a readable socket was not seen");
    }
}
