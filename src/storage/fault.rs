//! A store that fails on purpose: the Nth write, allocation, sync or punch after arming returns EIO or
//! ENOSPC, once or from then on. Fault-injection tests run the real format code on it.

use super::{Pipe, Storage};
use crate::error::{Error, Result};
use crate::sync::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Eio,
    NoSpace,
}

#[derive(Debug)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    /// Operations (writes, allocations, syncs, punches) counted since arming; the one numbered
    /// `fail_at` fails.
    count: AtomicU64,
    fail_at: AtomicU64,
    sticky: AtomicBool,
    kind: std::sync::Mutex<FaultKind>,
    failed: AtomicU64,
}

impl FaultStorage {
    pub fn new(inner: Arc<dyn Storage>) -> FaultStorage {
        FaultStorage {
            inner,
            count: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
            sticky: AtomicBool::new(false),
            kind: std::sync::Mutex::new(FaultKind::Eio),
            failed: AtomicU64::new(0),
        }
    }

    /// From now on, the `nth` (0-based) modifying operation fails with `kind`; with `sticky`,
    /// every one after it fails too.
    pub fn arm(&self, nth: u64, kind: FaultKind, sticky: bool) {
        *lock(&self.kind) = kind;
        self.sticky.store(sticky, Ordering::SeqCst);
        self.count.store(0, Ordering::SeqCst);
        self.failed.store(0, Ordering::SeqCst);
        self.fail_at.store(nth, Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        self.fail_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// How many operations have failed since arming.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Modifying operations seen since arming.
    pub fn operations(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn gate(&self, op: &'static str) -> Result<()> {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let at = self.fail_at.load(Ordering::SeqCst);
        if n == at || (n > at && self.sticky.load(Ordering::SeqCst)) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            let errno = match *lock(&self.kind) {
                FaultKind::Eio => libc::EIO,
                FaultKind::NoSpace => libc::ENOSPC,
            };
            return Err(Error::io(op, std::io::Error::from_raw_os_error(errno)));
        }
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.gate("write")?;
        self.inner.write_at(buf, offset)
    }

    /// Gated like a write; when it fails the bytes are still in the pipe, as when a splice
    /// into a file fails.
    fn write_from_pipe(&self, pipe: &Pipe, len: usize, offset: u64) -> Result<()> {
        self.gate("write")?;
        self.inner.write_from_pipe(pipe, len, offset)
    }

    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.gate("truncate")?;
        self.inner.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.gate("allocate")?;
        self.inner.allocate(offset, len)
    }

    fn sync(&self) -> Result<()> {
        self.gate("sync")?;
        self.inner.sync()
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.gate("punch")?;
        self.inner.punch(offset, len)
    }
}
