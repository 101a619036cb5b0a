//! Where image files live, as multi-file operations (snapshot) see it: opening and creating
//! files, links, renames and directory syncs. The real file system is one implementation; the
//! recording one in `recording.rs` lets crash tests see the order of directory changes too.

use super::{FileStorage, LockMode, Storage};
use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub trait Namespace {
    /// Opens an existing file.
    fn open(&self, path: &Path, writable: bool, lock: LockMode) -> Result<Arc<dyn Storage>>;
    /// Creates a new file (failing if the name exists), locked exclusively.
    fn create(&self, path: &Path) -> Result<Arc<dyn Storage>>;
    fn exists(&self, path: &Path) -> bool;
    /// Whether two names are the same file (both exist and share an inode).
    fn same_file(&self, a: &Path, b: &Path) -> bool;
    /// Whether two names are in the same directory.
    fn same_dir(&self, a: &Path, b: &Path) -> bool;
    /// Gives the file named `from` the additional name `to` (which must not exist).
    fn link(&self, from: &Path, to: &Path) -> Result<()>;
    /// Atomically moves `from` to `to`, replacing what `to` named.
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    /// Removes a name, ignoring a missing one.
    fn remove(&self, path: &Path);
    /// Makes the name changes in `path`'s directory durable.
    fn sync_dir(&self, path: &Path) -> Result<()>;
}

/// The real file system.
pub struct RealFs;

fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Namespace for RealFs {
    fn open(&self, path: &Path, writable: bool, lock: LockMode) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(path, writable, lock)?))
    }

    fn create(&self, path: &Path) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::create(path)?))
    }

    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn same_file(&self, a: &Path, b: &Path) -> bool {
        let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        matches!((id(a), id(b)), (Some(x), Some(y)) if x == y)
    }

    fn same_dir(&self, a: &Path, b: &Path) -> bool {
        let (x, y) = (dir_of(a).canonicalize(), dir_of(b).canonicalize());
        matches!((x, y), (Ok(x), Ok(y)) if x == y)
    }

    fn link(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::hard_link(from, to).map_err(|e| Error::io("link", e).with_file(to))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| Error::io("rename", e).with_file(to))
    }

    fn remove(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        let dir = dir_of(path);
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", e).with_file(&dir))
    }
}
