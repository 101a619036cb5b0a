//! Coalescing concurrent fetches of one thing in one process: the first caller fetches, the
//! others wait for it and then take what it kept, so a chunk many readers want at once costs
//! one request; and a fetch that brings several (a run of records) claims them all, so no
//! other thread fetches them again meanwhile.

use crate::error::Result;
use crate::sync::lock;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};

/// A fetch in flight: set to true (and waiters woken) when the fetching thread is done.
type Fill = (Mutex<bool>, Condvar);

#[derive(Debug, Default)]
pub struct Coalescer<K> {
    inflight: Mutex<HashMap<K, Arc<Fill>>>,
}

impl<K: Hash + Eq + Copy> Coalescer<K> {
    pub fn new() -> Coalescer<K> {
        Coalescer { inflight: Mutex::new(HashMap::new()) }
    }

    /// What `cached` finds for `key`, else what `fetch` returns (which keeps it where
    /// `cached` finds it). `fetch` is given the keys it is to fetch: `key`, and those of
    /// `followers` up to the first that another thread fetches or `held` says is kept, which
    /// one request can bring along (the records after a chunk in its pack). While one thread
    /// fetches a key, others asking for it wait and then look again; if the fetch failed, each
    /// fetches for itself.
    pub fn run<V>(
        &self,
        key: K,
        followers: &[K],
        held: impl Fn(K) -> bool,
        cached: impl Fn() -> Option<V>,
        fetch: impl FnOnce(&[K]) -> Result<V>,
    ) -> Result<V> {
        if let Some(v) = cached() {
            return Ok(v);
        }
        let (slot, claimed) = {
            let mut m = lock(&self.inflight);
            match m.get(&key) {
                Some(s) => (s.clone(), Vec::new()),
                None => {
                    let s = Arc::new((Mutex::new(false), Condvar::new()));
                    let mut run = vec![key];
                    run.extend(followers.iter().copied().take_while(|k| !m.contains_key(k) && !held(*k)));
                    for k in &run {
                        m.insert(*k, s.clone());
                    }
                    (s, run)
                }
            }
        };
        if claimed.is_empty() {
            let mut done = lock(&slot.0);
            while !*done {
                done = slot.1.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            drop(done);
            return match cached() {
                Some(v) => Ok(v),
                None => fetch(&[key]),
            };
        }
        // Waiters are released however this ends, a panic in `fetch` included: otherwise
        // every later read of these keys would wait for a fetch that never ends.
        struct Release<'a, K: Hash + Eq>(&'a Mutex<HashMap<K, Arc<Fill>>>, &'a [K], &'a Fill);
        impl<K: Hash + Eq> Drop for Release<'_, K> {
            fn drop(&mut self) {
                let mut m = lock(self.0);
                for k in self.1 {
                    m.remove(k);
                }
                drop(m);
                *lock(&self.2 .0) = true;
                self.2 .1.notify_all();
            }
        }
        let _release = Release(&self.inflight, &claimed, &slot);
        fetch(&claimed)
    }
}
