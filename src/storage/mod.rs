//! The I/O seam under all format code: a byte-addressed store with positional I/O, sync and hole punching.
//!
//! Everything above this trait (header, map, layer, chain) is written against it, so the
//! same format code runs on a real file, in memory, or on a recording store that lets the
//! crash tests rebuild what a power cut could leave behind.

// Stores for tests (in memory, failing on purpose, recording for crash states) are built only
// for the library's own tests and for tests and fuzzers that ask for the `testing` feature:
// the release library carries none of them.
#[cfg(any(test, feature = "testing"))]
mod fault;
mod file;
#[cfg(any(test, feature = "testing"))]
mod mem;
pub mod namespace;
mod pipe;
#[cfg(any(test, feature = "testing"))]
pub mod recording;

#[cfg(any(test, feature = "testing"))]
pub use fault::{FaultKind, FaultStorage};
pub use file::{flock_within, punches_holes, FileStorage, LockMode};
#[cfg(any(test, feature = "testing"))]
pub use mem::MemStorage;
pub(crate) use pipe::poll_one;
pub use pipe::Pipe;

use crate::error::{Error, Result};
use std::fmt;

/// A byte store. All methods take `&self`: implementations are safe to call from many threads
/// at once, and positional I/O never moves a shared cursor.
// `len` is a fallible query of the store's size, not a collection's length: no `is_empty`.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Fills `buf` from `offset`. Bytes at or beyond the end of the store read as zero, the way
    /// an unwritten stretch of a sparse file does.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, growing the store if needed. Not durable until [`Storage::sync`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes every completed write durable (fdatasync for files).
    fn sync(&self) -> Result<()>;
    /// Writes all of `buf` at `offset` and returns once those bytes are durable, saying
    /// nothing of other writes not yet synced (files: `pwritev2` with `RWF_DSYNC`, which
    /// writes back only this range; the one flush of a redo journal, format-spec §5.9). A store
    /// without a cheaper way writes and syncs everything.
    fn write_durable(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)?;
        self.sync()
    }
    /// Deallocates a range; it reads as zeros afterwards. The length of the store is unchanged.
    fn punch(&self, offset: u64, len: u64) -> Result<()>;
    /// Writes `len` bytes that `pipe` holds at `offset`, as [`Storage::write_at`] would. On
    /// error the pipe may still hold some of them. Stores that cannot take bytes from a pipe
    /// directly read them into memory first.
    fn write_from_pipe(&self, pipe: &Pipe, len: usize, offset: u64) -> Result<()> {
        through_memory(pipe, len, |buf| self.write_at(buf, offset))
    }
    /// Copies `len` bytes at `offset` of this store to `dst_offset` of `dst`, as a read and a
    /// write would (bytes past this store's end copy as zeros). Stores that cannot copy
    /// between files in the kernel move the bytes through memory.
    fn copy_to(&self, offset: u64, len: u64, dst: &dyn Storage, dst_offset: u64) -> Result<()> {
        copy_through_memory(self, offset, len, dst, dst_offset)
    }
    /// The file under this store when it is a plain file store (for copies between files in
    /// the kernel); `None` for every other store, whose writes must go through its methods.
    fn as_file(&self) -> Option<&FileStorage> {
        None
    }
    /// Allocates space for a range the caller is about to overwrite entirely, growing the
    /// store if the range ends past it. Contents are unspecified until written (the caller
    /// writes every byte before anything reads them). Only a hint: stores without a cheaper
    /// way to take new space do nothing, and so may a store whose medium refuses.
    fn allocate(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// The first offset at or after `offset` that may hold data (not a hole), or `None` if only
    /// holes follow. Stores that cannot tell say `Some(offset)`: everything may be data.
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// The first hole at or after `offset` (the end of the store counts as one).
    fn next_hole(&self, _offset: u64) -> Result<u64> {
        self.len()
    }
    /// Bytes actually allocated on the medium (st_blocks for files); `None` if unknown.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
}

/// Bytes moved per read and write when a copy goes through memory.
const COPY_PIECE: u64 = 1 << 20;

fn copy_through_memory<S: Storage + ?Sized>(
    src: &S,
    offset: u64,
    len: u64,
    dst: &dyn Storage,
    dst_offset: u64,
) -> Result<()> {
    let mut buf = vec![0u8; len.min(COPY_PIECE) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_PIECE) as usize;
        src.read_at(&mut buf[..n], offset + done)?;
        dst.write_at(&buf[..n], dst_offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Takes `len` bytes out of `pipe` into memory and hands them to `write`.
fn through_memory(pipe: &Pipe, len: usize, write: impl FnOnce(&[u8]) -> Result<()>) -> Result<()> {
    let mut buf = vec![0u8; len];
    pipe.read_exact(&mut buf).map_err(|e| Error::io("read from pipe", e))?;
    write(&buf)
}
