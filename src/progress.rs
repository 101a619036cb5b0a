//! Steps forward that one long request makes, counted for whoever watches the thread running
//! it: the NBD server's stall check (`nbd/stall.rs`) takes a request that makes no step for its
//! limit as stuck on its disk. A zeroing or trim of gigabytes is one request that may run for
//! minutes while it moves steadily; each chunk it covers is a step, so it is never taken for a
//! stuck one.
//!
//! The counter is the thread's own (a connection's threads attach theirs when they start), so
//! the device code that makes the steps needs no handle to the server; on a thread with none
//! attached a step costs a thread-local lookup and does nothing.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

thread_local! {
    static STEPS: RefCell<Option<Arc<AtomicU64>>> = const { RefCell::new(None) };
}

/// Counts this thread's steps in `steps` until the returned guard is dropped.
pub fn attach(steps: Arc<AtomicU64>) -> Attached {
    STEPS.with(|s| *s.borrow_mut() = Some(steps));
    Attached(())
}

/// While it lives, the thread's steps are counted.
pub struct Attached(());

impl Drop for Attached {
    fn drop(&mut self) {
        STEPS.with(|s| *s.borrow_mut() = None);
    }
}

/// One step forward of the request this thread runs.
pub fn step() {
    STEPS.with(|s| {
        if let Some(c) = s.borrow().as_ref() {
            c.fetch_add(1, Ordering::Release);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_count_only_while_attached_and_only_on_their_thread() {
        let steps = Arc::new(AtomicU64::new(0));
        step();
        {
            let _a = attach(steps.clone());
            step();
            step();
            std::thread::scope(|s| {
                s.spawn(step);
            });
        }
        step();
        assert_eq!(steps.load(Ordering::Acquire), 2);
    }
}
