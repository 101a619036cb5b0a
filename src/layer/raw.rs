//! A raw image: a plain file whose bytes are the disk, used as the read-only base of a chain.

use crate::error::{err, Error, ErrorKind, Result};
use crate::storage::{FileStorage, LockMode, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    size: u64,
}

impl RawImage {
    /// Opens a raw file read-only with `lock` (shared to keep writers away while it is a base). Devices, FIFOs and other special files
    /// are refused unless `allow_special` (spec §3.4): their size and content are not stable.
    pub fn open(path: &Path, allow_special: bool, lock: LockMode) -> Result<RawImage> {
        let md = std::fs::metadata(path).map_err(|e| Error::io("open", e).with_file(path))?;
        if !md.is_file() && !allow_special {
            return Err(err(
                ErrorKind::InvalidArgument,
                "is not a regular file (devices and special files are refused as parents)",
            )
            .with_file(path));
        }
        let storage = FileStorage::open(path, false, lock)?;
        let size = storage.len()?;
        Ok(RawImage::on(Arc::new(storage), path, size))
    }

    pub fn on(storage: Arc<dyn Storage>, path: &Path, size: u64) -> RawImage {
        RawImage { path: path.to_path_buf(), storage, size }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Reads `buf` at `offset`; bytes past the file's end read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset >= self.size {
            buf.fill(0);
            return Ok(());
        }
        let n = ((self.size - offset).min(buf.len() as u64)) as usize;
        self.storage.read_at(&mut buf[..n], offset).map_err(|e| e.with_file(&self.path))?;
        buf[n..].fill(0);
        Ok(())
    }
}
