//! The budget that bounds how many payload bytes requests may have in flight (per connection and
//! for the whole server), and so how much memory clients can make the server hold.

use crate::sync::lock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// A connection's only request of at most this many payload bytes gets past the server-wide
/// budget whatever the other connections hold (see [`Budget::acquire_beside`]).
pub const RESERVED_BYTES: u64 = 4 * 1024 * 1024;

/// Counts requests and bytes in flight on one connection. A request always gets in when the
/// connection is idle, so one request of the largest allowed size never deadlocks.
pub struct Budget {
    state: Mutex<State>,
    cv: Condvar,
    max_requests: usize,
    max_bytes: u64,
    /// `state.requests`, readable without the lock (for [`Budget::in_flight`]).
    in_flight: AtomicUsize,
}

struct State {
    requests: usize,
    bytes: u64,
    /// Threads waiting on `cv`: a release wakes them only if there are some (a wake is a
    /// system call even with nobody waiting, and a release comes with every request).
    waiters: usize,
}

impl Budget {
    pub fn new(max_requests: usize, max_bytes: u64) -> Budget {
        Budget {
            state: Mutex::new(State { requests: 0, bytes: 0, waiters: 0 }),
            cv: Condvar::new(),
            max_requests,
            max_bytes,
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Requests in flight now, without taking the lock: a hint that may be stale by the
    /// time the caller acts on it.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Charges a request of `bytes`, waiting for room. Returns whether nothing was in flight
    /// before it (the caller's connection was idle).
    pub fn acquire(&self, bytes: u64) -> bool {
        self.acquire_beside(bytes, false)
    }

    /// As [`Budget::acquire`]; `reserved`: admitted at once whatever others hold. The server
    /// gives that to a connection's only request of at most [`RESERVED_BYTES`], so that
    /// connections which leave their replies unread (and so keep the budget full) cannot
    /// stall a connection that asks for little: every connection gets one such request in,
    /// which adds at most `RESERVED_BYTES` per connection to what the budget bounds. A
    /// request without payload bytes holds no memory and is admitted too.
    pub fn acquire_beside(&self, bytes: u64, reserved: bool) -> bool {
        let mut s = lock(&self.state);
        let idle = s.requests == 0;
        while !(s.requests == 0 || reserved || self.has_room(&s, bytes)) {
            s = self.wait(s);
        }
        s.requests += 1;
        s.bytes += bytes;
        self.in_flight.store(s.requests, Ordering::Relaxed);
        idle
    }

    fn has_room(&self, s: &State, bytes: u64) -> bool {
        s.requests < self.max_requests && (bytes == 0 || s.bytes + bytes <= self.max_bytes)
    }

    pub fn release(&self, bytes: u64) {
        let mut s = lock(&self.state);
        s.requests -= 1;
        s.bytes -= bytes;
        self.in_flight.store(s.requests, Ordering::Relaxed);
        if s.waiters > 0 {
            self.cv.notify_all();
        }
    }

    /// Blocks until nothing is in flight.
    pub fn wait_idle(&self) {
        let mut s = lock(&self.state);
        while s.requests > 0 {
            s = self.wait(s);
        }
    }

    fn wait<'a>(&self, mut s: std::sync::MutexGuard<'a, State>) -> std::sync::MutexGuard<'a, State> {
        s.waiters += 1;
        let mut s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        s.waiters -= 1;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn budget_admits_an_oversized_request_when_idle() {
        let b = Budget::new(4, 10);
        assert!(b.acquire(100), "nothing was in flight");
        assert_eq!(b.in_flight(), 1);
        b.release(100);
        assert_eq!(b.in_flight(), 0);
        b.wait_idle();
    }

    #[test]
    fn a_full_budget_still_admits_reserved_and_payload_free_requests() {
        let b = Budget::new(usize::MAX, 10);
        b.acquire(10);
        assert!(!b.acquire_beside(4, true), "reserved: in at once, although the budget is full");
        b.acquire(0);
        assert_eq!(b.in_flight(), 3);
        for n in [0, 4, 10] {
            b.release(n);
        }
        b.wait_idle();
    }

    #[test]
    fn budget_blocks_past_the_request_limit_until_a_release() {
        let b = Arc::new(Budget::new(2, 1000));
        b.acquire(1);
        b.acquire(1);
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            b2.acquire(1);
            b2.release(1);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished());
        b.release(1);
        t.join().unwrap();
        b.release(1);
        b.wait_idle();
    }
}
