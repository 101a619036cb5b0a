//! Whether a connection's requests are stuck, as a service manager's watchdog needs to know:
//! the server withholds its keep-alives (WATCHDOG=1) while one is, so that a disk that stops
//! answering gets the server restarted instead of leaving its clients hanging behind a
//! process that still looks alive.
//!
//! A connection is stuck when a request of it runs outside a wait on its client (reading the
//! payload of a write, sending a reply) and the connection makes no step forward (answers no
//! request, ends no such wait, covers no further chunk of a long zeroing: progress.rs) for the
//! whole of the limit. A client that sends slowly, or does not read its replies, must not make
//! the server look stuck: that would let any client get the server killed. So waits on the
//! client do not count, and while any thread waits for a write's payload nothing is taken for
//! stuck, since that thread holds the locks of the device it writes to (the payload goes
//! straight into the image) and requests of every connection may be waiting for them.
//!
//! What is left is a request that makes no step: a disk that does not answer, or a request
//! legitimately slower than the limit (a flush of much dirty data on slow storage; requests
//! held while a live snapshot flushes). The limit is half of the watchdog's interval, so
//! `WatchdogSec=` must exceed twice the longest such request. Steps are counted per
//! connection, not per request: one request stuck beside others of its connection that are
//! answered is not seen until they stop too (a false negative, where the other way round the
//! server would be restarted under clients that are served).
//!
//! The check samples counts the connection's threads keep anyway ([`Winding::sample`]); it
//! adds no lock and no clock read to a request.
//!
//! [`Winding::sample`]: super::winding::Winding::sample

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One look at a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Steps made so far (requests answered, waits on the client ended).
    pub steps: u64,
    /// Some request runs outside a wait on the client.
    pub working: bool,
    /// Some thread waits for a write's payload, holding the device's locks.
    pub on_payload: bool,
}

/// The check over successive samples of every connection.
#[derive(Debug)]
pub struct Stalls {
    limit: Duration,
    /// Per connection that was working at its last sample: its steps then, and since when it
    /// has been working without a step.
    working: HashMap<u64, (u64, Instant)>,
}

impl Stalls {
    pub fn new(limit: Duration) -> Stalls {
        Stalls { limit, working: HashMap::new() }
    }

    /// Takes a sample of every connection at `now` and returns the longest time one of them
    /// has been stuck, if one has been for at least the limit. A connection not sampled (gone)
    /// is forgotten; while any waits for a payload, every count starts again.
    pub fn update(&mut self, samples: impl IntoIterator<Item = (u64, Sample)>, now: Instant) -> Option<Duration> {
        let samples: Vec<(u64, Sample)> = samples.into_iter().collect();
        if samples.iter().any(|(_, s)| s.on_payload) {
            self.working.clear();
            return None;
        }
        let mut next = HashMap::new();
        for (id, s) in samples {
            if !s.working {
                continue;
            }
            let since = match self.working.get(&id) {
                Some(&(steps, since)) if steps == s.steps => since,
                _ => now,
            };
            next.insert(id, (s.steps, since));
        }
        self.working = next;
        self.working.values().map(|&(_, since)| now.saturating_duration_since(since)).filter(|d| *d >= self.limit).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(2);

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_request_running_without_a_step_for_the_limit_is_stuck_until_a_step() {
        let mut st = Stalls::new(LIMIT);
        let t0 = Instant::now();
        let working = |steps| Sample { steps, working: true, on_payload: false };
        assert_eq!(st.update([(1, working(5))], t0), None);
        assert_eq!(st.update([(1, working(5))], at(t0, 1)), None, "stuck before the limit");
        assert_eq!(st.update([(1, working(5))], at(t0, 3)), Some(Duration::from_secs(3)));
        // A step (say, the request answered and another one running) starts the count again.
        assert_eq!(st.update([(1, working(6))], at(t0, 4)), None);
        assert_eq!(st.update([(1, working(6))], at(t0, 5)), None);
        assert_eq!(st.update([(1, working(6))], at(t0, 6)), Some(LIMIT));
    }

    #[test]
    fn idle_connections_and_waits_on_the_client_are_never_stuck() {
        let mut st = Stalls::new(LIMIT);
        let t0 = Instant::now();
        let idle = Sample { steps: 9, working: false, on_payload: false };
        for s in 0..10 {
            assert_eq!(st.update([(1, idle), (2, idle)], at(t0, s)), None);
        }
        // Working at two samples but idle (or waiting on the client) in between: not stuck.
        let working = Sample { steps: 9, working: true, on_payload: false };
        assert_eq!(st.update([(1, working)], at(t0, 10)), None);
        assert_eq!(st.update([(1, idle)], at(t0, 11)), None);
        assert_eq!(st.update([(1, working)], at(t0, 13)), None);
    }

    #[test]
    fn connections_are_told_apart_and_a_gone_one_is_forgotten() {
        let mut st = Stalls::new(LIMIT);
        let t0 = Instant::now();
        let w = |steps| Sample { steps, working: true, on_payload: false };
        st.update([(1, w(0)), (2, w(0))], t0);
        // Connection 2 steps on; connection 1 is the stuck one.
        assert_eq!(st.update([(1, w(0)), (2, w(1))], at(t0, 2)), Some(LIMIT));
        // Connection 1 is gone: nothing stuck, and a new connection 1 starts afresh.
        assert_eq!(st.update([(2, w(2))], at(t0, 3)), None);
        assert_eq!(st.update([(1, w(0))], at(t0, 4)), None);
    }

    #[test]
    fn a_wait_for_a_payload_anywhere_starts_every_count_again() {
        let mut st = Stalls::new(LIMIT);
        let t0 = Instant::now();
        let w = |steps| Sample { steps, working: true, on_payload: false };
        let payload = Sample { steps: 0, working: false, on_payload: true };
        st.update([(1, w(0))], t0);
        // Connection 1 waits for locks connection 2's payload holds: not stuck meanwhile...
        assert_eq!(st.update([(1, w(0)), (2, payload)], at(t0, 2)), None);
        assert_eq!(st.update([(1, w(0)), (2, payload)], at(t0, 5)), None);
        // ...and counted from when the payload has come.
        assert_eq!(st.update([(1, w(0)), (2, w(1))], at(t0, 6)), None);
        assert_eq!(st.update([(1, w(0)), (2, w(1))], at(t0, 8)), Some(LIMIT));
    }
}
