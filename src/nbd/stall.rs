//! Whether a connection's requests are stuck, as a service manager's watchdog needs to know:
//! the server withholds its keep-alives (WATCHDOG=1) while one is, so that a disk that stops
//! answering gets the server restarted instead of leaving its clients hanging behind a
//! process that still looks alive.
//!
//! A connection is stuck when a request of it runs outside a wait on its client (reading the
//! payload of a write, sending a reply) and the connection makes no step forward (answers no
//! request, ends no such wait) for the whole of the limit. A client that sends slowly, or
//! does not read its replies, therefore never makes the server look stuck: that would let
//! any client get the server killed. A request that is legitimately slower than the limit (a
//! flush of much dirty data on slow storage) does: the limit is half of the watchdog's
//! interval, so `WatchdogSec=` must exceed twice the longest such request.
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
    /// is forgotten.
    pub fn update(&mut self, samples: impl IntoIterator<Item = (u64, Sample)>, now: Instant) -> Option<Duration> {
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
        let working = |steps| Sample { steps, working: true };
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
        let idle = Sample { steps: 9, working: false };
        for s in 0..10 {
            assert_eq!(st.update([(1, idle), (2, idle)], at(t0, s)), None);
        }
        // Working at two samples but idle (or waiting on the client) in between: not stuck.
        let working = Sample { steps: 9, working: true };
        assert_eq!(st.update([(1, working)], at(t0, 10)), None);
        assert_eq!(st.update([(1, idle)], at(t0, 11)), None);
        assert_eq!(st.update([(1, working)], at(t0, 13)), None);
    }

    #[test]
    fn connections_are_told_apart_and_a_gone_one_is_forgotten() {
        let mut st = Stalls::new(LIMIT);
        let t0 = Instant::now();
        let w = |steps| Sample { steps, working: true };
        st.update([(1, w(0)), (2, w(0))], t0);
        // Connection 2 steps on; connection 1 is the stuck one.
        assert_eq!(st.update([(1, w(0)), (2, w(1))], at(t0, 2)), Some(LIMIT));
        // Connection 1 is gone: nothing stuck, and a new connection 1 starts afresh.
        assert_eq!(st.update([(2, w(2))], at(t0, 3)), None);
        assert_eq!(st.update([(1, w(0))], at(t0, 4)), None);
    }
}
