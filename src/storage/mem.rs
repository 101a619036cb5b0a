//! An in-memory storage backend: the same semantics as a sparse file, for tests and fuzzing.

use super::Storage;
use crate::error::{err, ErrorKind, Result};
use crate::sync::{read, write};
use std::sync::RwLock;

#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

/// Largest in-memory store: a guard so that a hostile offset cannot make a test allocate terabytes.
const MEM_LIMIT: u64 = 1 << 34;

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage { bytes: RwLock::new(bytes) }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        read(&self.bytes).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let b = read(&self.bytes);
        buf.fill(0);
        if offset < b.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(b.len() - start);
            buf[..n].copy_from_slice(&b[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= MEM_LIMIT)
            .ok_or_else(|| err(ErrorKind::NoSpace, "in-memory store limit reached"))?;
        let mut b = write(&self.bytes);
        if (b.len() as u64) < end {
            b.resize(end as usize, 0);
        }
        b[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(read(&self.bytes).len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len > MEM_LIMIT {
            return Err(err(ErrorKind::NoSpace, "in-memory store limit reached"));
        }
        write(&self.bytes).resize(len as usize, 0);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        let mut b = write(&self.bytes);
        let blen = b.len() as u64;
        let start = offset.min(blen) as usize;
        let end = offset.saturating_add(len).min(blen) as usize;
        b[start..end].fill(0);
        Ok(())
    }
}
