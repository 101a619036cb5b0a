//! Worker threads that run requests of every connection, and the per-connection budget that
//! bounds how much a client can have in flight (and so how much memory it can make us hold).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
                std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(j) => j(),
                            Err(_) => return,
                        }
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        Pool {
            tx: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
        }
    }

    /// Runs `f` on a worker; after [`Pool::stop`] it runs on the caller's thread instead.
    pub fn submit(&self, f: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(f);
        let rest = match self.tx.lock().ok().as_ref().and_then(|t| t.as_ref()) {
            Some(tx) => match tx.send(job) {
                Ok(()) => None,
                Err(e) => Some(e.0),
            },
            None => Some(job),
        };
        if let Some(job) = rest {
            job();
        }
    }

    /// Lets queued jobs finish and joins the workers.
    pub fn stop(&self) {
        if let Ok(mut t) = self.tx.lock() {
            t.take();
        }
        let handles: Vec<_> = self
            .workers
            .lock()
            .map(|mut w| w.drain(..).collect())
            .unwrap_or_default();
        for h in handles {
            let _ = h.join();
        }
    }
}

/// Counts requests and bytes in flight on one connection. A request always gets in when the
/// connection is idle, so one request of the largest allowed size never deadlocks.
pub struct Budget {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    max_requests: usize,
    max_bytes: u64,
}

impl Budget {
    pub fn new(max_requests: usize, max_bytes: u64) -> Budget {
        Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            max_requests,
            max_bytes,
        }
    }

    pub fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 > 0 && (s.0 >= self.max_requests || s.1 + bytes > self.max_bytes) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.0 += 1;
        s.1 += bytes;
    }

    pub fn release(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 -= 1;
        s.1 -= bytes;
        self.cv.notify_all();
    }

    /// Blocks until nothing is in flight.
    pub fn wait_idle(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 > 0 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn pool_runs_every_job_before_stop_returns() {
        let p = Pool::new(3);
        let n = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let n = n.clone();
            p.submit(move || {
                n.fetch_add(1, Ordering::SeqCst);
            });
        }
        p.stop();
        assert_eq!(n.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn budget_admits_an_oversized_request_when_idle() {
        let b = Budget::new(4, 10);
        b.acquire(100);
        b.release(100);
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
