//! What a crash state may read: the requests a workload issued, with when each was called and
//! returned (a logical clock shared by all threads) and where its effects lie in the journal,
//! and from them, for a crash at a journal index, the values each 512-byte sector may hold.
//!
//! The rule is the one format-spec §5.3 promises clients. A FLUSH that completed before the
//! crash (its last journal entry is before the crash point; one with nothing to make durable
//! has none) makes
//! durable every write, write-zeroes and discard that returned before the FLUSH was called.
//! So a sector may read the value of any write of it that could have reached the journal
//! before the crash, unless a write of it that must be durable began after that one returned
//! (the later value then replaced it for good). The initial contents count as a write that
//! returned before everything and is durable from the start.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub const SECTOR: usize = 512;

pub fn hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
}

#[derive(Debug, Clone)]
pub enum What {
    /// Sectors and the hashes of the values the request gave them.
    Write(Vec<(usize, u64)>),
    /// A write with FUA: durable itself once it returned, and a FLUSH called when it was
    /// (format-spec §5.3: the write followed by a flush, at most).
    WriteFua(Vec<(usize, u64)>),
    /// A FLUSH, or anything else that makes every earlier returned write durable once its
    /// journal entries are in (a commit, a close).
    Flush,
    /// A write that failed part-way, with the hashes its sectors read once it returned: each
    /// may hold that value or keep what it could hold before, also after later flushes (the
    /// parts that failed were never written where the map points; the parts that succeeded
    /// may be the only ones a crash keeps), until a durable write of the sector replaces it.
    Failed(Vec<(usize, u64)>),
}

#[derive(Debug, Clone)]
pub struct Req {
    pub called: u64,
    pub returned: u64,
    /// Journal length when it was called and when it returned: its entries lie in between.
    pub j_start: usize,
    pub j_end: usize,
    pub what: What,
}

/// The requests of one run, recorded from any number of threads.
#[derive(Debug, Default)]
pub struct History {
    clock: AtomicU64,
    reqs: Mutex<Vec<Req>>,
}

impl History {
    pub fn new() -> History {
        // Clock 0 is the initial contents.
        History { clock: AtomicU64::new(1), reqs: Mutex::new(Vec::new()) }
    }

    /// The clock reading for a request being called now.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    pub fn record(&self, r: Req) {
        self.reqs.lock().unwrap().push(r);
    }

    pub fn reqs(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }
}

/// The writes of one sector, as (called, returned, j_start, hash, durable from: the journal
/// index from which it is durable by itself, a FUA write's end, else none; failed: a write
/// that failed part-way, never durable); the initial value first.
type SectorWrites = Vec<(u64, u64, usize, u64, usize, bool)>;

/// The allowed values of every sector for any crash point of one run.
pub struct Oracle {
    sectors: Vec<SectorWrites>,
    /// (called, j_end) of every flush.
    flushes: Vec<(u64, usize)>,
}

impl Oracle {
    /// `initial`: the device before the first request; `reqs`: everything recorded.
    pub fn new(initial: &[u8], reqs: &[Req]) -> Oracle {
        let mut sectors: Vec<SectorWrites> =
            initial.chunks(SECTOR).map(|c| vec![(0, 0, 0, hash(c), usize::MAX, false)]).collect();
        let mut flushes = Vec::new();
        for r in reqs {
            match &r.what {
                What::Write(v) => {
                    for &(s, h) in v {
                        sectors[s].push((r.called, r.returned, r.j_start, h, usize::MAX, false));
                    }
                }
                What::Failed(v) => {
                    for &(s, h) in v {
                        sectors[s].push((r.called, r.returned, r.j_start, h, usize::MAX, true));
                    }
                }
                What::WriteFua(v) => {
                    for &(s, h) in v {
                        sectors[s].push((r.called, r.returned, r.j_start, h, r.j_end, false));
                    }
                    flushes.push((r.called, r.j_end));
                }
                What::Flush => flushes.push((r.called, r.j_end)),
            }
        }
        Oracle { sectors, flushes }
    }

    /// The clock reading before which every returned write is durable at a crash before `k`.
    fn durable_before(&self, k: usize) -> u64 {
        self.flushes.iter().filter(|f| f.1 <= k).map(|f| f.0).max().unwrap_or(0)
    }

    /// The hashes sector `s` may hold after a crash just before journal index `k`.
    pub fn allowed(&self, s: usize, k: usize) -> HashSet<u64> {
        self.allowed_reached(s, k, k)
    }

    /// As [`Oracle::allowed`], with the effects of requests whose entries start before
    /// `reached` possible (`k + 1` when the entry at `k` was in flight: its request had begun,
    /// and had not completed).
    fn allowed_reached(&self, s: usize, k: usize, reached: usize) -> HashSet<u64> {
        let d = self.durable_before(k);
        let w = &self.sectors[s];
        // Durable: the initial value, every write that returned before a completed flush was
        // called, and a FUA write that completed; never a write that failed.
        let durable = |x: &(u64, u64, usize, u64, usize, bool)| !x.5 && (x.0 == 0 || x.1 < d || x.4 <= k);
        // Possible: its effects may be in the journal before the crash, or it must be durable
        // anyway. A request that returned before a completed flush was called and left no entry
        // before that flush's last (zeros over zeros: nothing to write, and a flush with
        // nothing to make durable writes nothing, spec §5.9) found its value in place already.
        let possible = |x: &(u64, u64, usize, u64, usize, bool)| x.0 == 0 || x.2 < reached || durable(x);
        w.iter().filter(|x| possible(x)).filter(|x| !w.iter().any(|y| durable(y) && y.0 > x.1)).map(|x| x.3).collect()
    }

    /// Checks every sector of `dev`; the first that reads a value it may not hold, described.
    pub fn check(&self, dev: &[u8], k: usize) -> Result<(), String> {
        self.check_reached(dev, k, k)
    }

    /// As [`Oracle::check`], with the entry at `k` in flight.
    pub fn check_in_flight(&self, dev: &[u8], k: usize) -> Result<(), String> {
        self.check_reached(dev, k, k + 1)
    }

    fn check_reached(&self, dev: &[u8], k: usize, reached: usize) -> Result<(), String> {
        for (s, c) in dev.chunks(SECTOR).enumerate() {
            let allowed = self.allowed_reached(s, k, reached);
            if !allowed.contains(&hash(c)) {
                // What a reader of the failure needs: the sector's writes (called, returned,
                // first journal index, value) and the flushes that had completed.
                let writes: Vec<String> = self.sectors[s]
                    .iter()
                    .map(|w| {
                        format!(
                            "({}, {}, j{}, {:x}{}{})",
                            w.0,
                            w.1,
                            w.2,
                            w.3,
                            if w.5 { " failed" } else { "" },
                            if allowed.contains(&w.3) { " allowed" } else { "" }
                        )
                    })
                    .collect();
                let flushes: Vec<String> =
                    self.flushes.iter().filter(|f| f.1 <= k).map(|f| format!("called {} done j{}", f.0, f.1)).collect();
                // A value another sector was given says whose data leaked here.
                let elsewhere: Vec<String> = (self.sectors.iter().enumerate())
                    .flat_map(|(o, ws)| {
                        ws.iter().filter(|w| w.3 == hash(c)).map(move |w| format!("sector {o} by ({}, {})", w.0, w.1))
                    })
                    .collect();
                return Err(format!(
                    "sector {s} (byte {}) reads a value neither durable nor written since: read {:x}{}; its writes {}; flushes completed: {}",
                    s * SECTOR,
                    hash(c),
                    if elsewhere.is_empty() { String::new() } else { format!(" (written to {})", elsewhere.join(", ")) },
                    writes.join(" "),
                    flushes.join(", ")
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(called: u64, returned: u64, j_start: usize, h: u64) -> Req {
        Req { called, returned, j_start, j_end: j_start, what: What::Write(vec![(0, h)]) }
    }

    /// Concurrent seed 392: zeros written over zeros left no journal entry, returned, and a
    /// flush called after it completed without writing anything (nothing to make durable).
    /// At a crash after that flush, the sector holds that request's value, and nothing older.
    #[test]
    fn a_durable_request_that_left_no_entry_is_still_what_the_sector_holds() {
        let zeros = hash(&[0u8; SECTOR]);
        let reqs = [
            write(1, 2, 5, 11),
            write(3, 4, 6, zeros),
            Req { called: 5, returned: 6, j_start: 7, j_end: 9, what: What::Flush },
            write(7, 8, 9, zeros),
            Req { called: 9, returned: 10, j_start: 9, j_end: 9, what: What::Flush },
        ];
        let o = Oracle::new(&[1u8; SECTOR], &reqs);
        assert_eq!(o.allowed(0, 9), HashSet::from([zeros]));
        // Before the first flush completed, the older values are possible still.
        assert_eq!(o.allowed(0, 7), HashSet::from([hash(&[1u8; SECTOR]), 11, zeros]));
    }

    /// A write that failed part-way leaves the sector old or new also after a flush completed,
    /// until a later write of it is durable.
    #[test]
    fn a_failed_write_keeps_the_old_value_possible_until_a_durable_write_replaces_both() {
        let reqs = [
            write(1, 2, 5, 11),
            Req { called: 3, returned: 4, j_start: 6, j_end: 7, what: What::Flush },
            Req { called: 5, returned: 6, j_start: 7, j_end: 8, what: What::Failed(vec![(0, 22)]) },
            Req { called: 7, returned: 8, j_start: 8, j_end: 9, what: What::Flush },
            write(9, 10, 9, 33),
            Req { called: 11, returned: 12, j_start: 10, j_end: 11, what: What::Flush },
        ];
        let o = Oracle::new(&[1u8; SECTOR], &reqs);
        assert_eq!(o.allowed(0, 9), HashSet::from([11, 22]));
        assert_eq!(o.allowed(0, 10), HashSet::from([11, 22, 33]));
        assert_eq!(o.allowed(0, 11), HashSet::from([33]));
    }
}
