//! Guards for a file system on an NBD export (nbdfuse, loop devices, mounts) and the
//! /proc/mounts and losetup queries the tests use to prove each was released.

use super::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// /proc/mounts and loop device state
// ---------------------------------------------------------------------------

/// Undoes the octal escapes (`\040` etc.) /proc/mounts uses for blanks.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let is_octal = |c: u8| (b'0'..=b'7').contains(&c);
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|&c| is_octal(c)) {
            let v = b[i + 1..i + 4].iter().fold(0u32, |acc, &c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points currently listed in /proc/mounts, in mount order.
pub fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|f| PathBuf::from(unescape_mount_field(f)))
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_points().into_iter().filter(|m| m.starts_with(dir)).collect()
}

/// Whether a loop device (`/dev/loopN`) still has a backing file. The
/// `loop/` sysfs group exists exactly while it is bound.
pub fn loop_is_attached(dev: &Path) -> bool {
    let name = dev.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name).join("loop").exists()
}

/// Loop devices whose backing file is `file`, read from sysfs, which holds
/// the full path (the loop ioctl's name field is cut at 64 bytes).
pub fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .map(|b| Path::new(b.trim_end_matches('\n')) == file)
                .unwrap_or(false)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// `losetup -a` lines that mention `needle` (a device or backing file path).
pub fn losetup_lines_mentioning(needle: &Path) -> Vec<String> {
    let out = run_status(tool("losetup").arg("-a"));
    let needle = needle.to_string_lossy();
    stdout_of(&out).lines().filter(|l| l.contains(needle.as_ref())).map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------
// nbdfuse, loop devices, mounts
// ---------------------------------------------------------------------------

/// An NBD export exposed as the file `MOUNTPOINT/disk` by nbdfuse.
///
/// Drop: `fusermount3 -u` (retried while a loop device still holds the file,
/// then lazily), wait for nbdfuse to exit (SIGKILL as last resort), and wait
/// until the mount is gone from /proc/mounts.
pub struct NbdFuse {
    mountpoint: PathBuf,
    disk: PathBuf,
    daemon: Option<Daemon>,
}

impl NbdFuse {
    /// Mounts `uri` (e.g. from [`Server::uri`]) at `mountpoint`, creating it.
    pub fn mount(uri: &str, mountpoint: &Path) -> Result<NbdFuse, String> {
        Self::mount_with(uri, mountpoint, &[])
    }

    /// With extra nbdfuse options placed before the mountpoint, e.g. `["-r"]`.
    pub fn mount_with(uri: &str, mountpoint: &Path, extra: &[&str]) -> Result<NbdFuse, String> {
        fs::create_dir_all(mountpoint).map_err(|e| format!("cannot create {}: {e}", mountpoint.display()))?;
        // Canonicalize before mounting: on a dead FUSE mount it could hang.
        let mountpoint =
            mountpoint.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", mountpoint.display()))?;
        // nbdfuse writes its pid file only once it serves the mount; keep the
        // file outside the mountpoint, which the mount will cover.
        let pidfile = PathBuf::from(format!("{}.nbdfuse.pid", mountpoint.display()));
        let _ = fs::remove_file(&pidfile);
        let disk = mountpoint.join("disk");
        let mut cmd = tool("nbdfuse");
        cmd.arg("-P").arg(&pidfile).args(extra).arg(&disk).arg(uri);
        let daemon = Daemon::try_start(cmd, Ready::PidFile(pidfile), STARTUP_TIMEOUT)?;
        let fuse = NbdFuse { mountpoint, disk, daemon: Some(daemon) };
        if !fuse.disk.exists() {
            return Err(format!("nbdfuse is ready but {} does not exist", fuse.disk.display()));
        }
        Ok(fuse)
    }

    /// The file through which the export is read and written.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    pub fn unmount(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        let mut problems = Vec::new();
        // EBUSY while a loop device still references the file: give a
        // detaching loop device time before resorting to a lazy unmount.
        let mut last_err = String::new();
        let unmounted = wait_until(Duration::from_secs(5), || {
            !is_mounted(&self.mountpoint)
                || match try_run(tool("fusermount3").arg("-u").arg(&self.mountpoint)) {
                    Ok(_) => true,
                    Err(e) => {
                        last_err = e;
                        false
                    }
                }
        });
        if !unmounted {
            problems.push(format!("fusermount3 -u failed, unmounting lazily: {last_err}"));
            if let Err(e) = try_run(tool("fusermount3").arg("-u").arg("-z").arg(&self.mountpoint)) {
                problems.push(e);
            }
        }
        if daemon.wait_exit(STOP_TIMEOUT).is_none() {
            problems.push(format!("nbdfuse (pid {}) did not exit after unmount; killing it", daemon.pid()));
            daemon.kill9();
        }
        if !wait_until(RELEASE_TIMEOUT, || !is_mounted(&self.mountpoint)) {
            problems.push(format!("{} is still mounted", self.mountpoint.display()));
        }
        let _ = fs::remove_file(format!("{}.nbdfuse.pid", self.mountpoint.display()));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{}\n--- nbdfuse log ---\n{}", problems.join("\n"), daemon.log()))
        }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("WARNING: releasing nbdfuse at {}: {e}", self.mountpoint.display());
        }
    }
}

/// A loop device bound to a file (`losetup -f --show FILE`); detached on drop.
pub struct LoopDev {
    dev: PathBuf,
    backing: PathBuf,
    attached: bool,
    /// The request cap to put back before detaching: a loop device keeps it across
    /// bindings, and the next test to bind this device must not inherit it.
    cap_to_restore: Option<(PathBuf, String)>,
}

impl LoopDev {
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        Self::attach_with(file, &[])
    }

    /// With extra losetup options, e.g. `["-r"]` or `["--direct-io=on"]`.
    ///
    /// There are only a few loop devices and parallel tests compete for them,
    /// so "no free loop device" is retried for a while before giving up.
    pub fn attach_with(file: &Path, extra: &[&str]) -> Result<LoopDev, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut cmd = tool("losetup");
            cmd.args(extra).arg("-f").arg("--show").arg(file);
            match try_run(&mut cmd) {
                Ok(out) => {
                    let dev = PathBuf::from(stdout_of(&out).trim());
                    if !dev.starts_with("/dev") {
                        return Err(format!("losetup printed no device: {:?}", stdout_of(&out)));
                    }
                    return Ok(LoopDev { dev, backing: file.to_path_buf(), attached: true, cap_to_restore: None });
                }
                Err(e) if e.contains("free loop device") && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.dev
    }

    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Caps every request the block layer sends this device at `kib` KiB (queue
    /// max_sectors_kb), read back to make sure the kernel took it.
    pub fn cap_requests(&mut self, kib: u32) {
        let name = self.dev.file_name().expect("a loop device has a name").to_string_lossy().into_owned();
        let knob = PathBuf::from(format!("/sys/block/{name}/queue/max_sectors_kb"));
        let was = fs::read_to_string(&knob).unwrap_or_else(|e| panic!("read {}: {e}", knob.display()));
        self.cap_to_restore = Some((knob.clone(), was));
        fs::write(&knob, format!("{kib}\n")).unwrap_or_else(|e| panic!("write {}: {e}", knob.display()));
        let now = fs::read_to_string(&knob).unwrap_or_else(|e| panic!("read {}: {e}", knob.display()));
        assert_eq!(now.trim(), kib.to_string(), "{} did not take the request cap", knob.display());
    }

    pub fn detach(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.attached) {
            return Ok(());
        }
        let restored = match self.cap_to_restore.take() {
            Some((knob, was)) => fs::write(&knob, was).map_err(|e| format!("restore {}: {e}", knob.display())),
            None => Ok(()),
        };
        // On a busy device `losetup -d` only sets autoclear and still exits 0,
        // so success means nothing until the binding is actually gone.
        let result = try_run(tool("losetup").arg("-d").arg(&self.dev)).map(drop);
        if !wait_until(RELEASE_TIMEOUT, || !loop_is_attached(&self.dev)) {
            return Err(format!(
                "{} still bound after losetup -d ({:?}); losetup -a: {:?}",
                self.dev.display(),
                result,
                losetup_lines_mentioning(&self.dev)
            ));
        }
        restored
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("WARNING: detaching loop device: {e}");
        }
    }
}

/// `mount DEV DIR`; on drop `umount DIR`, falling back to `umount -l` if busy.
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(dev: &Path, target: &Path) -> Result<Mount, String> {
        Self::with_options(dev, target, &[])
    }

    /// With extra mount arguments, e.g. `["-o", "ro"]` or `["-t", "ext4"]`.
    pub fn with_options(dev: &Path, target: &Path, options: &[&str]) -> Result<Mount, String> {
        fs::create_dir_all(target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        let target = target.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", target.display()))?;
        try_run(tool("mount").args(options).arg(dev).arg(&target))?;
        Ok(Mount { target, mounted: true })
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    pub fn unmount(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        // EBUSY is often transient (a just-closed file, a lingering cwd in a
        // finished child), so retry briefly before detaching lazily.
        let mut last_err = String::new();
        let done = wait_until(Duration::from_secs(3), || {
            !is_mounted(&self.target)
                || match try_run(tool("umount").arg(&self.target)) {
                    Ok(_) => true,
                    Err(e) => {
                        last_err = e;
                        false
                    }
                }
        });
        if done {
            return Ok(());
        }
        let lazy = try_run(tool("umount").arg("-l").arg(&self.target));
        if !wait_until(RELEASE_TIMEOUT, || !is_mounted(&self.target)) {
            return Err(format!("{} still mounted; umount: {last_err}; umount -l: {lazy:?}", self.target.display()));
        }
        Err(format!("umount {} failed, used umount -l: {last_err}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("WARNING: unmounting: {e}");
        }
    }
}

pub fn mkfs_ext4(dev: &Path) {
    run(tool("mkfs.ext4").args(["-q", "-F"]).arg(dev));
}

/// Read-only forced fsck; the output's status is 0 for a clean filesystem.
pub fn fsck_ext4(dev: &Path) -> Output {
    run_status(tool("e2fsck").args(["-f", "-n"]).arg(dev))
}

/// An ext4 filesystem on an NBD export: nbdfuse -> loop device -> mount.
/// Fields drop in declaration order, i.e. umount, losetup -d, fusermount -u.
pub struct FsOverNbd {
    pub mount: Mount,
    pub loopdev: LoopDev,
    pub fuse: NbdFuse,
}

impl FsOverNbd {
    /// Formats the export with ext4 and mounts it; `workdir` receives the
    /// `fuse/` and `mnt/` directories.
    pub fn create(uri: &str, workdir: &Path) -> FsOverNbd {
        Self::setup(uri, workdir, true)
    }

    /// Mounts an export that already holds ext4.
    pub fn attach(uri: &str, workdir: &Path) -> FsOverNbd {
        Self::setup(uri, workdir, false)
    }

    fn setup(uri: &str, workdir: &Path, format: bool) -> FsOverNbd {
        let fuse = NbdFuse::mount(uri, &workdir.join("fuse")).unwrap_or_else(|e| panic!("nbdfuse {uri}: {e}"));
        let loopdev = LoopDev::attach(fuse.disk()).unwrap_or_else(|e| panic!("losetup: {e}"));
        if format {
            mkfs_ext4(loopdev.path());
        }
        let mount = Mount::new(loopdev.path(), &workdir.join("mnt")).unwrap_or_else(|e| panic!("mount: {e}"));
        FsOverNbd { mount, loopdev, fuse }
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Releases everything in order, reporting the first problem.
    pub fn release(self) -> Result<(), String> {
        let FsOverNbd { mount, loopdev, fuse } = self;
        let m = mount.unmount();
        let l = loopdev.detach();
        let f = fuse.unmount();
        m.and(l).and(f)
    }
}

/// An exFAT file system of `size` bytes (`dir/exfat.img` on a loop device), mounted through
/// FUSE at `dir/mnt`: the kernel here has none of its own. The mount drops first, then the
/// loop device. Needs [`require_loop_mount`], mkfs.exfat and mount.exfat-fuse.
pub fn exfat_mount(dir: &Path, size: u64) -> (Mount, LoopDev) {
    let img = dir.join("exfat.img");
    fs::File::create(&img).and_then(|f| f.set_len(size)).expect("make the exFAT file");
    run(tool("mkfs.exfat").arg(&img));
    let loopdev = LoopDev::attach(&img).unwrap_or_else(|e| panic!("losetup: {e}"));
    let mount = Mount::with_options(loopdev.path(), &dir.join("mnt"), &["-t", "exfat-fuse"])
        .unwrap_or_else(|e| panic!("mount: {e}"));
    (mount, loopdev)
}

/// Loop devices, mkfs.ext4 and mount, and root to use them: what [`FileFs`] needs.
pub fn require_loop_mount() -> bool {
    require_tools(&["losetup", "mkfs.ext4", "mount", "umount"]) && require_root()
}

/// A small ext4 file system in a file, loop-mounted: a disk that fills up. Fields drop in
/// declaration order, i.e. umount, then losetup -d.
pub struct FileFs {
    pub mount: Mount,
    pub loopdev: LoopDev,
}

impl FileFs {
    /// Makes `file` (`size` bytes, sparse) an ext4 file system with the extra mkfs.ext4
    /// options `mkfs` and mounts it at `mountpoint`.
    pub fn create(file: &Path, size: u64, mkfs: &[&str], mountpoint: &Path) -> FileFs {
        let mut args = vec!["-q", "-F"];
        args.extend_from_slice(mkfs);
        FileFs::make(file, size, "mkfs.ext4", &args, mountpoint)
    }

    /// The same with another file system: `mkfs` (mkfs.xfs, mkfs.btrfs) run with `args` and
    /// the file.
    pub fn make(file: &Path, size: u64, mkfs: &str, args: &[&str], mountpoint: &Path) -> FileFs {
        Self::make_on(file, size, mkfs, args, mountpoint, false)
    }

    /// As [`FileFs::create`] on a `file` whose own file system runs out of space before the
    /// ext4 does (a thin-provisioned disk: a tmpfs smaller than the file). The loop driver
    /// completes a short write to its backing file as a success (lo_complete_rq retries short
    /// reads only), and a tmpfs that fills up part-way through a request writes the pages it
    /// still has room for and returns that count: the rest of the request is dropped with
    /// no error, after the kernel told ext4 it was written, and a later fsync of data that
    /// never reached the medium succeeds. That is the medium lying, not a thin disk (which
    /// fails the write), so here every request is one 4 KiB page, aligned: 4 KiB blocks and
    /// sectors, and requests capped at 4 KiB. The tmpfs then has room for the whole
    /// request or fails it.
    pub fn create_on_thin_medium(file: &Path, size: u64, mkfs: &[&str], mountpoint: &Path) -> FileFs {
        let mut args = vec!["-q", "-F", "-b", "4096"];
        args.extend_from_slice(mkfs);
        FileFs::make_on(file, size, "mkfs.ext4", &args, mountpoint, true)
    }

    fn make_on(file: &Path, size: u64, mkfs: &str, args: &[&str], mountpoint: &Path, page_requests: bool) -> FileFs {
        let f = fs::File::create(file).unwrap_or_else(|e| panic!("cannot create {}: {e}", file.display()));
        f.set_len(size).unwrap_or_else(|e| panic!("cannot size {}: {e}", file.display()));
        drop(f);
        run(tool(mkfs).args(args).arg(file));
        let losetup: &[&str] = if page_requests { &["--sector-size", "4096"] } else { &[] };
        let mut loopdev = LoopDev::attach_with(file, losetup).unwrap_or_else(|e| panic!("losetup: {e}"));
        if page_requests {
            loopdev.cap_requests(4);
        }
        let mount = Mount::new(loopdev.path(), mountpoint).unwrap_or_else(|e| panic!("mount: {e}"));
        FileFs { mount, loopdev }
    }

    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Bytes an unprivileged writer can still allocate there (statvfs f_bavail).
    pub fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).expect("path has no NUL");
        // SAFETY: statvfs is plain data, zeroed is a valid value; c is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}: {}", self.path().display(), std::io::Error::last_os_error());
        st.f_bavail as u64 * st.f_frsize as u64
    }
}
