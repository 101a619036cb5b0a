//! The storage backend for real files: pread/pwrite, fdatasync, fallocate hole punching and OFD locks.

use super::{Pipe, Storage};
use crate::error::{err, Error, ErrorKind, Result};
use crate::sync::{read, write};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

/// How a file is locked against other processes (open file description locks, so that two
/// opens in one process conflict the same way two processes do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// No lock: inspection only; may observe a file another process is changing.
    None,
    /// Shared: the file is read and must not change underneath (a parent layer, a read-only export).
    Shared,
    /// Exclusive: the file is being written; no other reader or writer may hold it.
    Exclusive,
}

/// Lock bytes of QEMU's convention (see [`FileStorage::lock`]).
const PERM_READ: i64 = 100;
const PERM_WRITE: i64 = 101;
const UNSHARE_WRITE: i64 = 201;

#[derive(Debug)]
pub struct FileStorage {
    /// The open file; its open file description holds the locks.
    file: File,
    /// The name it is known by, for messages (and reopening): the file may be renamed while
    /// open (a snapshot's new top, a frozen layer), see [`FileStorage::renamed`].
    path: RwLock<PathBuf>,
    /// A second, writable open of the same file, for a file opened read-only that is then
    /// written after all (a lower layer a commit writes into: see
    /// [`FileStorage::enable_writes`]). Modifying calls go through it when there is one.
    writer: OnceLock<File>,
}

impl FileStorage {
    /// The identity (device, inode) of the open file.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// Opens an existing file, read-write or read-only, and takes `lock` on it.
    pub fn open(path: &Path, writable: bool, lock: LockMode) -> Result<FileStorage> {
        // Without O_NONBLOCK, opening a FIFO waits for a writer forever (`cowdisk info FIFO`
        // hung); with it, the open returns and the FIFO is refused below, as it has no
        // offsets to read at. The flag is cleared again for what is kept.
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| open_error(e, path))?;
        let kind = file.metadata().map_err(|e| Error::io("stat", e).with_file(path))?.file_type();
        {
            use std::os::unix::fs::FileTypeExt;
            if kind.is_fifo() || kind.is_socket() {
                return Err(err(ErrorKind::NotAnImage, "is a FIFO or socket, not a disk image").with_file(path));
            }
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        unsafe {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        let s = FileStorage { file, path: RwLock::new(path.to_path_buf()), writer: OnceLock::new() };
        s.lock(lock)?;
        Ok(s)
    }

    /// Creates a new file, failing if it exists, and locks it exclusively.
    pub fn create(path: &Path) -> Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io("create", e).with_file(path))?;
        let s = FileStorage { file, path: RwLock::new(path.to_path_buf()), writer: OnceLock::new() };
        s.lock(LockMode::Exclusive)?;
        Ok(s)
    }

    pub fn path(&self) -> PathBuf {
        read(&self.path).clone()
    }

    /// Records that the file is now named `to`.
    pub fn renamed(&self, to: &Path) {
        *write(&self.path) = to.to_path_buf();
    }

    /// Makes a store opened read-only writable: the file is opened again for writing (it must
    /// still be the same file, same device and inode) and modifying calls go through that.
    pub fn enable_writes(&self) -> Result<()> {
        if self.writer.get().is_some() {
            return Ok(());
        }
        // Through the open descriptor, which names this very file whatever it is called now;
        // the (device, inode) check below makes sure of it either way.
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        let open = |p: &Path| OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(p);
        let w = open(&by_fd).or_else(|_| open(&self.path())).map_err(|e| open_error(e, &self.path()))?;
        let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino()));
        match (id(&self.file), id(&w)) {
            (Ok(a), Ok(b)) if a == b => {}
            _ => {
                return Err(err(ErrorKind::InUse, "the file was replaced since it was opened").with_file(&self.path()));
            }
        }
        let _ = self.writer.set(w);
        Ok(())
    }

    /// The file modifying calls go through.
    fn out(&self) -> &File {
        self.writer.get().unwrap_or(&self.file)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Takes the locks of `mode`; a conflict with another process (or another open) is `InUse`.
    ///
    /// The byte layout is QEMU's image-locking convention, so that qemu-img, qemu-nbd and
    /// cowdisk respect each other: a shared lock on byte 100+i means "I use permission i", on
    /// byte 200+i "nobody else may use permission i" (i = 0 consistent read, 1 write). A
    /// reader holds 100 and 201 and refuses if anyone holds 101; a writer holds 100, 101 and
    /// 201 and refuses if anyone else holds 101 or 201. All locks are shared (F_RDLCK) so the
    /// test for a conflict is an explicit F_OFD_GETLK probe after taking them.
    pub fn lock(&self, mode: LockMode) -> Result<()> {
        let (take, probe): (&[i64], &[i64]) = match mode {
            LockMode::None => return Ok(()),
            LockMode::Shared => (&[PERM_READ, UNSHARE_WRITE], &[PERM_WRITE]),
            LockMode::Exclusive => (&[PERM_READ, PERM_WRITE, UNSHARE_WRITE], &[PERM_WRITE, UNSHARE_WRITE]),
        };
        for &b in take {
            self.fcntl_lock(libc::F_OFD_SETLK, libc::F_RDLCK, b)?;
        }
        for &b in probe {
            if self.fcntl_lock(libc::F_OFD_GETLK, libc::F_WRLCK, b)? != libc::F_UNLCK {
                for &t in take {
                    let _ = self.fcntl_lock(libc::F_OFD_SETLK, libc::F_UNLCK, t);
                }
                return Err(err(
                    ErrorKind::InUse,
                    match mode {
                        // Open file description locks conflict within one process too: the
                        // holder may be this server (another export on the same file).
                        LockMode::Exclusive => "in use: the image is open elsewhere (another process, or another export of the same server)",
                        _ => "in use: the image is open for writing elsewhere (another process, or another export of the same server)",
                    },
                )
                .with_file(&self.path()));
            }
        }
        Ok(())
    }

    /// Gives up the write permission of an exclusive lock, keeping a reader's: what a file
    /// that was written and is from now on only read (a top frozen by a live snapshot) holds.
    /// Never fails for want of permission: releasing a lock byte always succeeds.
    pub fn downgrade_to_shared(&self) -> Result<()> {
        self.fcntl_lock(libc::F_OFD_SETLK, libc::F_UNLCK, PERM_WRITE).map(|_| ())
    }

    /// One fcntl lock call on byte `byte`; returns the l_type the kernel reports back.
    fn fcntl_lock(&self, cmd: libc::c_int, l_type: libc::c_int, byte: i64) -> Result<libc::c_int> {
        // SAFETY: flock is plain data; zeroed is a valid value for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = l_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: the fd is owned by self.file and fl is a valid flock for this command.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &mut fl) };
        if rc == 0 {
            return Ok(libc::c_int::from(fl.l_type));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                Err(err(ErrorKind::InUse, "in use: another process holds a conflicting lock").with_file(&self.path()))
            }
            _ => Err(Error::io("lock", e).with_file(&self.path())),
        }
    }

    fn ctx(&self, e: io::Error, op: &'static str, offset: u64) -> Error {
        Error::io(op, e).with_file(&self.path()).at(offset)
    }

    /// fallocate(2) with `mode` over [offset, offset+len): `Ok(Ok(()))` when done (an empty
    /// range is done at once), `Ok(Err(e))` when the call failed, for the caller to judge.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64, op: &str) -> Result<io::Result<()>> {
        if len == 0 {
            return Ok(Ok(()));
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(err(ErrorKind::OutOfRange, format!("{op} range overflows")).with_file(&self.path()));
        };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::fallocate(self.out().as_raw_fd(), mode, off, l) } == 0 {
            return Ok(Ok(()));
        }
        Ok(Err(io::Error::last_os_error()))
    }
}

/// Whether the file system holding `file` punches holes: a punch of one page past its end
/// (which changes nothing there, the size kept) is tried. Where it is refused (exFAT, FAT,
/// some FUSE and network file systems), a punch can only write zeros, which keep their space.
pub fn punches_holes(file: &File) -> bool {
    let Ok(len) = file.metadata().map(|m| m.len()) else { return false };
    let Ok(at) = i64::try_from(len.div_ceil(4096).saturating_add(1).saturating_mul(4096)) else { return false };
    // SAFETY: plain syscall on a descriptor the caller holds.
    unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at, 4096) == 0 }
}

/// flock(2) `file` exclusively, trying every 2 ms for at most `wait`: `Ok(true)` once held
/// (until the file closes), `Ok(false)` when another holder kept it all that time, `Err` when
/// the file system refuses such locks. For locks whose holders keep them for milliseconds, so
/// that a stuck holder (stopped with SIGSTOP, a frozen container) costs a bounded wait.
pub fn flock_within(file: &File, wait: std::time::Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + wait;
    // SAFETY: flock on a descriptor the caller holds; released when it closes.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(true)
}

fn open_error(e: io::Error, path: &Path) -> Error {
    let base = Error::io("open", e);
    base.with_file(path)
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| err(ErrorKind::OutOfRange, "read offset overflows").with_file(&self.path()))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    // Past end of file: sparse semantics, the rest reads as zero.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.ctx(e, "read", pos)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.out().write_all_at(buf, offset).map_err(|e| self.ctx(e, "write", offset))
    }

    /// splice(2) straight from the pipe into the page cache: the bytes are copied once.
    /// A file system that cannot be spliced into (EINVAL, before anything moved) gets the
    /// bytes through memory instead.
    fn write_from_pipe(&self, pipe: &Pipe, len: usize, offset: u64) -> Result<()> {
        match pipe.drain_to(self.out().as_raw_fd(), offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                super::through_memory(pipe, len, |buf| self.write_at(buf, offset))
            }
            Err(e) => Err(self.ctx(e, "write", offset)),
        }
    }

    /// copy_file_range(2) when `dst` is a file too: the kernel moves the bytes (one copy
    /// between page caches, or none where the file system shares extents). A pair of files
    /// it cannot copy between (another file system, a special file) goes through memory.
    fn copy_to(&self, offset: u64, len: u64, dst: &dyn Storage, dst_offset: u64) -> Result<()> {
        let Some(out) = dst.as_file() else {
            return super::copy_through_memory(self, offset, len, dst, dst_offset);
        };
        let mut done = 0u64;
        while done < len {
            let mut src_off = (offset + done) as libc::loff_t;
            let mut dst_off = (dst_offset + done) as libc::loff_t;
            let want = (len - done).min(1 << 30) as usize;
            // SAFETY: both fds are open for the lifetime of `self` and `out`; the offsets are
            // ours, so neither file's cursor moves.
            let n = unsafe {
                libc::copy_file_range(self.file.as_raw_fd(), &mut src_off, out.out().as_raw_fd(), &mut dst_off, want, 0)
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {}
                    // The destination's file system is full or refuses the size: named as the
                    // file that failed (a copy error used to name the source, which is only read).
                    Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => {
                        return Err(out.ctx(e, "copy", dst_offset + done))
                    }
                    _ => return Err(self.ctx(e, "copy", offset + done)),
                }
            }
            // The source ends here (what is left reads, so copies, as zeros), or the kernel
            // cannot copy between these two files.
            return super::copy_through_memory(self, offset + done, len - done, dst, dst_offset + done);
        }
        Ok(())
    }

    fn as_file(&self) -> Option<&FileStorage> {
        Some(self)
    }

    fn len(&self) -> Result<u64> {
        let md = self.file.metadata().map_err(|e| self.ctx(e, "stat", 0))?;
        if md.is_file() {
            return Ok(md.len());
        }
        // A block device reports length 0 in its metadata; its end is where SEEK_END lands.
        // SAFETY: lseek on an fd we own; all I/O here is positional, so the cursor is unused.
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(self.ctx(io::Error::last_os_error(), "seek", 0));
        }
        Ok(end as u64)
    }

    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        let Ok(off) = i64::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on an fd we own; the cursor is unused by positional I/O.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
            _ => Err(self.ctx(e, "seek data", offset)),
        }
    }

    fn next_hole(&self, offset: u64) -> Result<u64> {
        let Ok(off) = i64::try_from(offset) else {
            return Ok(offset);
        };
        // SAFETY: as in next_data.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_HOLE) };
        if r >= 0 {
            return Ok(r as u64);
        }
        self.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.out().set_len(len).map_err(|e| self.ctx(e, "truncate", len))
    }

    fn sync(&self) -> Result<()> {
        self.out().sync_data().map_err(|e| self.ctx(e, "sync", 0))
    }

    /// pwritev2 with RWF_DSYNC: the kernel writes back this range alone and flushes the
    /// device's cache, so the file's other dirty pages (fills of holes, whose allocation would
    /// cost a file-system journal commit) stay out of it. Kernels without it (EOPNOTSUPP,
    /// EINVAL) get a write and a whole-file sync.
    fn write_durable(&self, buf: &[u8], offset: u64) -> Result<()> {
        let fd = self.out().as_raw_fd();
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
            let at = offset + done as u64;
            let Ok(pos) = i64::try_from(at) else {
                return Err(self.ctx(io::Error::from_raw_os_error(libc::EFBIG), "write", at));
            };
            // SAFETY: one iovec over `rest`, which outlives the call; positional, no cursor.
            let n = unsafe { libc::pwritev2(fd, &iov, 1, pos, libc::RWF_DSYNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) && done == 0 {
                    self.write_at(buf, offset)?;
                    return self.sync();
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.ctx(e, "write", at));
            }
            if n == 0 {
                return Err(self.ctx(io::Error::from(io::ErrorKind::WriteZero), "write", at));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// One fallocate for a run of whole chunks about to be written: the file system allocates
    /// the blocks as one unwritten extent up front, instead of reserving them page by page in
    /// the buffered writes (ext4 delayed allocation), which costs the server more CPU than the
    /// copy into the page cache saves elsewhere. Unsupported (tmpfs before 2.6.x, some FUSE
    /// file systems) is not an error; running out of space is, and is reported as such.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        match self.fallocate(0, offset, len, "allocate")? {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => {
                Err(self.ctx(e, "allocate", offset))
            }
            _ => Ok(()),
        }
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        let Err(e) = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len, "punch")?
        else {
            return Ok(());
        };
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // A filesystem without hole punching: write zeros instead, which keeps the
            // "reads as zeros" promise at the cost of space.
            let zeros = vec![0u8; 1 << 16];
            let end = offset.saturating_add(len).min(self.len()?);
            let mut pos = offset;
            while pos < end {
                let n = ((end - pos) as usize).min(zeros.len());
                self.write_at(&zeros[..n], pos)?;
                pos += n as u64;
            }
            return Ok(());
        }
        Err(self.ctx(e, "punch", offset))
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cowdisk-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn copy_between_files_lands_unchanged_and_copies_past_the_source_end_as_zeros() {
        let (a, b) = (tmp("copy-src"), tmp("copy-dst"));
        let src = FileStorage::create(&a).unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        src.write_at(&bytes, 0).unwrap();
        let dst = FileStorage::create(&b).unwrap();
        dst.write_at(&[0xee; 400_000], 0).unwrap();
        // Unaligned on both sides, running 5,000 bytes past the source's end.
        src.copy_to(1001, 304_000, &dst, 77).unwrap();
        let mut got = vec![0u8; 304_000];
        dst.read_at(&mut got, 77).unwrap();
        assert_eq!(&got[..298_999], &bytes[1001..]);
        assert!(got[298_999..].iter().all(|&x| x == 0), "bytes past the source's end must copy as zeros");
        let mut head = [0u8; 77];
        dst.read_at(&mut head, 0).unwrap();
        assert_eq!(head, [0xee; 77], "bytes before the destination offset must be left alone");
        let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    }

    #[test]
    fn copy_into_a_store_that_is_no_file_goes_through_memory() {
        let a = tmp("copy-mem");
        let src = FileStorage::create(&a).unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        src.write_at(&bytes, 0).unwrap();
        let dst = super::super::MemStorage::new();
        src.copy_to(5, 2_999_995, &dst, 0).unwrap();
        let mut got = vec![0u8; 2_999_995];
        dst.read_at(&mut got, 0).unwrap();
        assert!(got[..] == bytes[5..]);
        let _ = std::fs::remove_file(&a);
    }

    #[test]
    fn reads_past_end_of_file_as_zeros() {
        let p = tmp("eof");
        let s = FileStorage::create(&p).unwrap();
        s.write_at(b"abc", 0).unwrap();
        let mut buf = [0xffu8; 8];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc\0\0\0\0\0\0");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn punched_range_reads_zero_and_keeps_length() {
        let p = tmp("punch");
        let s = FileStorage::create(&p).unwrap();
        s.write_at(&vec![7u8; 3 * 4096], 0).unwrap();
        s.punch(4096, 4096).unwrap();
        let mut buf = vec![0u8; 3 * 4096];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 7));
        assert_eq!(s.len().unwrap(), 3 * 4096);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn allocated_range_extends_the_file_reads_zero_and_holds_its_space_before_any_write() {
        let p = tmp("alloc");
        let s = FileStorage::create(&p).unwrap();
        s.write_at(b"head", 0).unwrap();
        s.allocate(0, 0).unwrap();
        assert_eq!(s.len().unwrap(), 4, "an empty range changes nothing");
        s.allocate(1 << 20, 1 << 20).unwrap();
        assert_eq!(s.len().unwrap(), 2 << 20, "the file grows to the end of the range");
        let mut buf = vec![0xffu8; 1 << 20];
        s.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "allocated but never written reads as zeros");
        // The scratch directory is on ext4, xfs, btrfs or tmpfs, which all take the space now.
        let taken = s.allocated_bytes().unwrap();
        assert!(taken >= 1 << 20, "only {taken} bytes allocated after allocating 1 MiB");
        s.write_at(&[9u8; 4096], 1 << 20).unwrap();
        s.read_at(&mut buf[..4097], 1 << 20).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9) && buf[4096] == 0);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn second_exclusive_open_is_refused_as_in_use() {
        let p = tmp("lock");
        let a = FileStorage::create(&p).unwrap();
        let b = FileStorage::open(&p, true, LockMode::Exclusive).unwrap_err();
        assert_eq!(b.kind(), ErrorKind::InUse);
        assert!(b.to_string().contains("in use"));
        let c = FileStorage::open(&p, false, LockMode::Shared).unwrap_err();
        assert_eq!(c.kind(), ErrorKind::InUse);
        drop(a);
        FileStorage::open(&p, false, LockMode::Shared).unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn shared_locks_coexist_but_exclude_a_writer() {
        let p = tmp("shared");
        drop(FileStorage::create(&p).unwrap());
        let a = FileStorage::open(&p, false, LockMode::Shared).unwrap();
        let _b = FileStorage::open(&p, false, LockMode::Shared).unwrap();
        let w = FileStorage::open(&p, true, LockMode::Exclusive).unwrap_err();
        assert_eq!(w.kind(), ErrorKind::InUse);
        drop(a);
        std::fs::remove_file(&p).unwrap();
    }
}
