//! Where image files live, as operations that create, name and replace whole files see it:
//! opening and creating files, links, renames (replacing or not), removal, listing and
//! directory syncs, and the temporary names files are built under. The real file system is
//! one implementation; the recording one in `recording.rs` lets crash tests see the order of
//! directory changes too.
//!
//! Temporary files: a file that must appear complete or not at all is built under a temporary
//! name next to its final one and renamed when complete. Each name is unique to one run
//! (`.NAME.PURPOSE.PID-NONCE.tmp`), so a run killed half-way never blocks the next one, and
//! two runs never share a file. A temporary file is *stale* when the process named in it is
//! gone and nobody holds a lock on it; [`sweep_stale_temps`] removes those.

use super::{FileStorage, LockMode, Storage};
use crate::error::{err, Error, ErrorKind, Result};
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Atomically moves `from` to `to`, failing (InvalidArgument, "already exists") if `to`
    /// exists: never replaces a file that appeared meanwhile.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<()>;
    /// Removes a name, ignoring a missing one.
    fn remove(&self, path: &Path);
    /// Makes the name changes in `path`'s directory durable.
    fn sync_dir(&self, path: &Path) -> Result<()>;
    /// The names in the directory that holds `path` (file names only).
    fn siblings(&self, path: &Path) -> Vec<OsString>;
    /// Whether some open of the file holds a lock on it (someone is using it).
    fn is_locked(&self, path: &Path) -> bool;
    /// Gives the new file `to` the permission bits and owner of `from` (the file it will stand
    /// in for), as far as this process may: a snapshot's or a commit's new overlay takes the
    /// image's name, and with it must keep who may open it. Best effort: a process that may
    /// not give the file away (not root) leaves it its own, as before.
    fn copy_owner_and_mode(&self, _from: &Path, _to: &Path) {}
    /// When `path` is a symbolic link to a file that is no link itself: that file. A commit
    /// replaces the name it was given, which through a link is the link; the file behind it
    /// then holds nothing anyone refers to, and goes too. (Behind a chain of links, some other
    /// link still names it: it is left.)
    fn link_target(&self, _path: &Path) -> Option<PathBuf> {
        None
    }
    /// The identity (device, inode) of the file `path` names, links followed.
    fn file_id(&self, _path: &Path) -> Option<(u64, u64)> {
        None
    }
    /// Serialises the steps that find a name in `path`'s directory free and then take it,
    /// across threads and processes: a snapshot (from its look at the snapshot's name to the
    /// link that gives the frozen image that name) and [`publish_new`]. Without it two
    /// snapshots of two images to one name could both find it free and both decide; the one
    /// that links second could then never complete, and its image would open nowhere. The
    /// default takes no lock (a namespace only one caller uses, such as the crash tests').
    fn lock_dir(&self, _path: &Path) -> Result<DirLock> {
        Ok(DirLock { _held: None })
    }
}

/// A directory locked by [`Namespace::lock_dir`], until dropped.
pub struct DirLock {
    _held: Option<std::fs::File>,
}

/// The longest wait for [`Namespace::lock_dir`]: its holders keep it for a look, a header
/// write and a link (milliseconds); one that holds it longer is stuck, and a live snapshot
/// waiting on it holds its export's requests back.
const DIR_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The file behind `path` when `path` is a symbolic link ([`Namespace::link_target`]), with
/// the identity of the file `open` has open: what replacing `path` would leave behind. Asked
/// while the link is there, before it is replaced.
pub fn behind_link(ns: &dyn Namespace, path: &Path, open: &dyn Storage) -> Option<(PathBuf, (u64, u64))> {
    Some((ns.link_target(path)?, open.as_file()?.file_id()?))
}

/// Removes a file [`behind_link`] found, if its name still names the file that was open, and
/// makes the removal durable. For a file a commit has left behind: its blocks are in the
/// parent, and no name refers to it. A name that meanwhile names another file (the link
/// changed under the commit) is left alone.
pub fn remove_left_behind(ns: &dyn Namespace, behind: Option<(PathBuf, (u64, u64))>) -> Result<()> {
    match behind {
        Some((t, opened)) if ns.file_id(&t) == Some(opened) => {
            ns.remove(&t);
            ns.sync_dir(&t)
        }
        _ => Ok(()),
    }
}

/// The real file system.
pub struct RealFs;

/// The directory that holds `p` ("." for a bare file name).
pub fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsyncs the directory holding `path`, so that a create, link or rename in it survives a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = dir_of(path);
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", e).with_file(&dir))
}

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| err(ErrorKind::InvalidArgument, "path contains a zero byte").with_file(p))
}

/// Whether a failed link(2) says the file system has no hard links (EPERM is what FAT, exFAT
/// and FUSE file systems without a link operation answer, for a file of one's own).
fn no_hard_links(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
}

/// The refusal of a new name that is taken.
pub fn already_exists(to: &Path) -> Error {
    err(ErrorKind::InvalidArgument, "already exists").with_file(to)
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

    /// renameat2(RENAME_NOREPLACE); where the file system does not support it (EINVAL), a
    /// hard link (which never replaces) and the removal of the old name.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<()> {
        let (f, t) = (c_path(from)?, c_path(to)?);
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like rename(2).
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => Err(already_exists(to)),
            Some(libc::EINVAL) | Some(libc::ENOSYS) => match std::fs::hard_link(from, to) {
                Ok(()) => std::fs::remove_file(from).map_err(|e| Error::io("remove", e).with_file(from)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(already_exists(to)),
                // No hard links either (FAT, exFAT, some FUSE and SMB mounts): nothing there
                // refuses to replace atomically. A look, then a plain rename; a file created
                // under `to` between the two would be replaced, the one race left on such a
                // file system.
                Err(e) if no_hard_links(&e) => {
                    if to.symlink_metadata().is_ok() {
                        return Err(already_exists(to));
                    }
                    std::fs::rename(from, to).map_err(|e| Error::io("rename", e).with_file(to))
                }
                Err(e) => Err(Error::io("link", e).with_file(to)),
            },
            _ => Err(Error::io("rename", e).with_file(to)),
        }
    }

    fn remove(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        sync_dir(path)
    }

    fn siblings(&self, path: &Path) -> Vec<OsString> {
        let Ok(rd) = std::fs::read_dir(dir_of(path)) else { return Vec::new() };
        rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect()
    }

    fn is_locked(&self, path: &Path) -> bool {
        // Someone else's writer or reader lock makes an exclusive lock fail; a file that cannot
        // be opened at all is left alone too.
        FileStorage::open(path, false, LockMode::Exclusive).is_err()
    }

    fn copy_owner_and_mode(&self, from: &Path, to: &Path) {
        let Ok(md) = std::fs::metadata(from) else { return };
        // The owner first: chown clears set-user-ID bits, which the mode then restores.
        let _ = std::os::unix::fs::chown(to, Some(md.uid()), Some(md.gid()));
        let _ = std::fs::set_permissions(to, std::fs::Permissions::from_mode(md.mode() & 0o7777));
    }

    fn link_target(&self, path: &Path) -> Option<PathBuf> {
        if !path.symlink_metadata().ok()?.file_type().is_symlink() {
            return None;
        }
        // Relative to the link's own directory, as the kernel resolves it.
        let target = dir_of(path).join(std::fs::read_link(path).ok()?);
        target.symlink_metadata().ok()?.file_type().is_file().then_some(target)
    }

    fn file_id(&self, path: &Path) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    /// flock(2) on the directory. A file system that has no such locks (some FUSE and network
    /// ones) gets none: the race the lock closes is left open there, as before it.
    fn lock_dir(&self, path: &Path) -> Result<DirLock> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = dir_of(path);
        // A directory this process may not read (mode -wx) cannot be locked this way: no lock.
        let Ok(d) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(&dir)
        else {
            return Ok(DirLock { _held: None });
        };
        match super::flock_within(&d, DIR_LOCK_WAIT) {
            Ok(true) => Ok(DirLock { _held: Some(d) }),
            Ok(false) => Err(err(
                ErrorKind::InUse,
                format!(
                    "another snapshot or new image in this directory has been under way for over {} s; nothing changed",
                    DIR_LOCK_WAIT.as_secs()
                ),
            )
            .with_file(&dir)),
            Err(_) => Ok(DirLock { _held: None }),
        }
    }
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A temporary name next to `path` for a file being built for `purpose`, unique to this run:
/// `.NAME.PURPOSE.PID-NONCE.tmp`.
pub fn temp_name(path: &Path, purpose: &str) -> PathBuf {
    let mut t = b".".to_vec();
    t.extend_from_slice(path.file_name().map(OsStr::as_bytes).unwrap_or_default());
    let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
    t.extend_from_slice(format!(".{purpose}.{}-{nonce}.tmp", std::process::id()).as_bytes());
    path.with_file_name(OsString::from_vec(t))
}

/// The process id in a temporary name of `path` made for `purpose` by [`temp_name`], or `Some(None)`
/// for the fixed name `.NAME.PURPOSE.tmp` that versions before unique names used; `None` if
/// `name` is not such a temporary name.
pub fn temp_owner(path: &Path, purpose: &str, name: &OsStr) -> Option<Option<u32>> {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(path.file_name()?.as_bytes());
    prefix.extend_from_slice(format!(".{purpose}.").as_bytes());
    let rest = name.as_bytes().strip_prefix(&prefix[..])?.strip_suffix(b"tmp")?;
    if rest.is_empty() {
        return Some(None);
    }
    let rest = std::str::from_utf8(rest.strip_suffix(b".")?).ok()?;
    let (pid, nonce) = rest.split_once('-')?;
    nonce.parse::<u64>().ok()?;
    pid.parse().ok().map(Some)
}

/// Whether process `pid` exists (in this process's PID namespace).
fn process_exists(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks for existence and permission; it sends nothing.
    unsafe { libc::kill(p, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Removes the temporary files that runs of `purpose` for `path` left behind when they were
/// killed: those whose process is gone and that nobody holds a lock on. Returns their paths.
/// Never touches the files of a run in progress (it holds its temporary file locked).
pub fn sweep_stale_temps(ns: &dyn Namespace, path: &Path, purpose: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for name in ns.siblings(path) {
        let Some(owner) = temp_owner(path, purpose, &name) else { continue };
        if owner.is_some_and(process_exists) {
            continue;
        }
        let p = path.with_file_name(&name);
        if !ns.is_locked(&p) {
            ns.remove(&p);
            removed.push(p);
        }
    }
    removed
}

/// Gives the complete, synced file `tmp` the name `path`, which must not exist (it never
/// replaces one that appeared meanwhile), and makes the new name durable.
pub fn publish_new(ns: &dyn Namespace, tmp: &Path, path: &Path) -> Result<()> {
    let _dir = ns.lock_dir(path)?;
    ns.rename_noreplace(tmp, path)?;
    ns.sync_dir(path)
}

/// Gives the complete, synced file `tmp` the name `path` in place of the file it names, and
/// makes the change durable.
pub fn publish_replacing(ns: &dyn Namespace, tmp: &Path, path: &Path) -> Result<()> {
    ns.rename(tmp, path)?;
    ns.sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_hidden_siblings_unique_per_call() {
        let a = temp_name(Path::new("/x/y/disk.cow"), "create");
        let b = temp_name(Path::new("/x/y/disk.cow"), "create");
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x/y")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".disk.cow.create.") && name.ends_with(".tmp"), "{name}");
        assert_eq!(
            temp_owner(Path::new("/x/y/disk.cow"), "create", a.file_name().unwrap()),
            Some(Some(std::process::id()))
        );
    }

    #[test]
    fn temp_owner_recognises_only_its_own_names() {
        let p = Path::new("d/disk.cow");
        let own = |n: &str| temp_owner(p, "flatten", OsStr::new(n));
        assert_eq!(own(".disk.cow.flatten.tmp"), Some(None));
        assert_eq!(own(".disk.cow.flatten.123-4.tmp"), Some(Some(123)));
        assert_eq!(own(".disk.cow.create.123-4.tmp"), None);
        assert_eq!(own(".disk.cowx.flatten.123-4.tmp"), None);
        assert_eq!(own(".disk.cow.flatten.12x-4.tmp"), None);
        assert_eq!(own("disk.cow"), None);
    }

    #[test]
    fn a_temp_of_a_dead_process_is_swept_and_a_locked_one_is_kept() {
        let d = std::env::temp_dir().join(format!("cowdisk-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("disk.cow");
        // A pid that cannot exist (above the kernel's pid_max).
        let dead = d.join(".disk.cow.create.4194305-0.tmp");
        std::fs::write(&dead, b"x").unwrap();
        let legacy = d.join(".disk.cow.create.tmp");
        std::fs::write(&legacy, b"x").unwrap();
        let held = d.join(".disk.cow.create.4194305-1.tmp");
        std::fs::write(&held, b"x").unwrap();
        let _lock = FileStorage::open(&held, false, LockMode::Shared).unwrap();
        let mine = temp_name(&target, "create");
        std::fs::write(&mine, b"x").unwrap();
        let mut removed = sweep_stale_temps(&RealFs, &target, "create");
        removed.sort();
        assert_eq!(removed, vec![dead.clone(), legacy.clone()]);
        assert!(held.exists() && mine.exists() && !dead.exists() && !legacy.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let d = std::env::temp_dir().join(format!("cowdisk-noreplace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        let e = RealFs.rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        std::fs::remove_file(&b).unwrap();
        RealFs.rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
