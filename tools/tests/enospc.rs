//! `cowdisk serve` on a file system that fills up: an overlay on a small loop-mounted ext4,
//! over a raw base that lives elsewhere and is larger than the free space, written through NBD
//! until it is full. Clients get ENOSPC (not EIO, not a dropped connection), reads go on,
//! nothing flushed is lost, `check` finds at worst leaked space, and writes work again once
//! space is freed (a file deleted next to the image, or ranges discarded through NBD) without
//! a restart. Space that runs out under the file system, at fsync time (thin provisioning),
//! is the exception the format spec (§5.3) makes: the server refuses writes until reopened.
//! An `export remove` whose flush fails on a full file system keeps the export and its data.

mod common;

use common::nbdclient::*;
use common::nbdtest::{assert_nbd_error, structured_client};
use common::oracle::{first_mixed_sector, sector_span, Oracle};
use common::*;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The device, and the raw base under it: larger than the ext4 the overlay lives on.
const SIZE: u64 = 96 * MIB;
/// The ext4 file system holding the overlay (about 51 MiB of it usable).
const FS_SIZE: u64 = 64 * MIB;
/// A file next to the image that an administrator can delete to make room.
const FILLER: u64 = 8 * MIB;

type Client = NbdClient<UnixStream>;

/// An overlay on a raw base, on a small file system, served on a Unix socket. Fields drop in
/// declaration order: the server stops, then the file system is unmounted and its loop
/// device detached, then the tmpfs under it goes, then the directory.
struct Rig {
    server: Option<Server>,
    fs: FileFs,
    tmpfs: Mount,
    base: Vec<u8>,
    image: PathBuf,
    sock: PathBuf,
    _dir: TempDir,
}

impl Rig {
    /// The file holding the ext4 lives on a tmpfs of its own, so that the many syncs cost no
    /// disk I/O (a kill -9 leaves the page cache, so durability is not at stake). `thin`: that
    /// tmpfs holds only so many bytes, fewer than the file system (a thin-provisioned disk):
    /// the file system believes it has room that the medium has not. Its ext4 is built so that
    /// every request is one page, which the tmpfs writes whole or refuses
    /// ([`FileFs::create_on_thin_medium`] says why).
    fn new(mkfs: &[&str], thin: Option<u64>) -> Rig {
        let dir = TempDir::for_test();
        let opts = format!("size={}", thin.unwrap_or(2 * FS_SIZE));
        let tmpfs = Mount::with_options(Path::new("tmpfs"), &dir.join("medium"), &["-t", "tmpfs", "-o", &opts])
            .unwrap_or_else(|e| panic!("mount tmpfs: {e}"));
        let fs_file = tmpfs.path().join("fs.ext4");
        let fs = match thin {
            Some(_) => FileFs::create_on_thin_medium(&fs_file, FS_SIZE, mkfs, &dir.join("mnt")),
            None => FileFs::create(&fs_file, FS_SIZE, mkfs, &dir.join("mnt")),
        };
        let base_path = dir.join("base.raw");
        write_random_file(&base_path, SIZE, 0xba5e);
        let base = std::fs::read(&base_path).expect("read base");
        let image = fs.path().join("disk.cow");
        run(Command::new(cowdisk_bin()).arg("create").arg(&image).arg("--backing").arg(&base_path));
        let sock = dir.join("nbd.sock");
        let mut rig = Rig { server: None, fs, tmpfs, base, image, sock, _dir: dir };
        rig.start();
        rig
    }

    fn start(&mut self) {
        let args = [self.image.to_str().unwrap(), "--socket", self.sock.to_str().unwrap()];
        self.server = Some(Server::start(&args));
    }

    /// A client, the device as it starts (the base: the overlay is empty), an oracle that
    /// knows it durable, and the test's random numbers.
    fn begin(&self, seed: u64) -> (Client, Vec<u8>, Oracle, XorShift) {
        (self.client(), self.base.clone(), Oracle::new(&self.base), XorShift::new(seed))
    }

    /// After a crash or a failed sync: `check` finds at worst leaked space, the server starts
    /// again, and every sector reads as the oracle allows. Returns a client and the device.
    fn reopen(&mut self, oracle: &Oracle, what: &str) -> (Client, Vec<u8>) {
        self.assert_check_ok(true, what);
        self.start();
        let mut c = self.client();
        let now = read_device(&mut c);
        oracle.check(&now, what);
        (c, now)
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    fn client(&self) -> Client {
        structured_client(self.server(), "disk")
    }

    /// SIGTERM; returns whether the server exited successfully (its close flushed).
    fn stop(&mut self) -> bool {
        self.server.take().expect("server running").stop().success()
    }

    fn kill9(&mut self) {
        self.server.take().expect("server running").kill9();
    }

    /// `cowdisk check`: clean, or (`leaks_allowed`, after a crash) leaked space only.
    #[track_caller]
    fn assert_check_ok(&self, leaks_allowed: bool, what: &str) {
        let out = run_status(Command::new(cowdisk_bin()).arg("check").arg(&self.image));
        assert!(
            out.status.code() == Some(0) || (leaks_allowed && out.status.code() == Some(3)),
            "{what}: check says {:?}\n{}{}",
            out.status.code(),
            stdout_of(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// After a completed FLUSH: the image file as its medium holds it (read with O_DIRECT, past
/// the page cache) is the file as cowdisk sees it. If not, the thin medium dropped data it
/// said it wrote, and any loss the oracle finds later would be the medium's, not cowdisk's.
fn assert_medium_holds(image: &Path) {
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BUF: usize = MIB as usize;
    let cached = std::fs::read(image).expect("read the image");
    let direct =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(image).expect("open O_DIRECT");
    let layout = Layout::from_size_align(BUF, 4096).expect("layout");
    // SAFETY: a non-zero size; freed below with the same layout.
    let ptr = unsafe { alloc_zeroed(layout) };
    assert!(!ptr.is_null(), "allocate an aligned buffer");
    // SAFETY: ptr is valid for BUF bytes until the dealloc below and nothing else aliases it.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, BUF) };
    let mut at = 0;
    while at < cached.len() {
        let n = direct.read_at(buf, at as u64).expect("O_DIRECT read of the image");
        assert!(n > 0, "O_DIRECT read of the image ended at {at} of {}", cached.len());
        let n = n.min(cached.len() - at);
        if let Some(i) = (0..n).find(|&i| buf[i] != cached[at + i]) {
            panic!(
                "the medium does not hold what the file system says it wrote: the image's byte {} \
                 differs (a short write the loop driver took for a whole one?)",
                at + i
            );
        }
        at += n;
    }
    // SAFETY: allocated above with this layout; buf is not used after this.
    unsafe { dealloc(ptr, layout) };
}

/// Drops the image file's clean pages from the page cache, as memory pressure may at any
/// time; after a failed writeback the pages the kernel could not write are clean.
fn evict(image: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image).expect("open the image to evict its pages");
    // SAFETY: an advisory call on an fd we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) on the image");
}

fn read_device(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(8 << 20) {
        out.extend(c.read(off, 8 << 20).unwrap_or_else(|e| panic!("read at {off}: {e}")));
    }
    out
}

/// The NBD error of a request that failed, panicking on a transport error: a full disk must
/// never cost the client its connection.
#[track_caller]
fn nbd_errno(e: &io::Error, what: &str) -> u32 {
    cmd_error(e).unwrap_or_else(|| panic!("{what}: the connection failed ({e}), expected an NBD error reply")).error
}

/// An error reply's message tells the client nothing of where the server keeps the image
/// (clients need not be the operator's).
#[track_caller]
fn assert_tells_no_path(e: &io::Error, image: &Path) {
    let dir = image.parent().expect("the image is in a directory").to_string_lossy().into_owned();
    let msg = cmd_error(e).map(|ce| ce.message.clone()).unwrap_or_default();
    assert!(!msg.contains(&dir), "the error message names the server's files: {msg:?}");
}

/// Random writes: unaligned small ones (copy-up from the base), block-sized, whole chunks,
/// and large ones that the server splices from the socket.
fn next_write(rng: &mut XorShift) -> (u64, Vec<u8>) {
    let len = [512, 4096, 6000, 64 * KIB, 200_000, MIB][(rng.next_u64() % 6) as usize];
    let off = rng.next_u64() % (SIZE - len);
    let off = if len.is_multiple_of(4096) { off / 4096 * 4096 } else { off };
    (off, random_bytes(len as usize, rng.next_u64()))
}

/// Writes `data` at `off` and keeps `model` (and the oracle, when there is one) in step. A
/// write may fail only with ENOSPC; the connection then still reads, and the range reads in
/// each sector as before the write or as after it, which becomes the model. Returns whether
/// the write succeeded.
fn write_tracked(c: &mut Client, model: &mut [u8], oracle: Option<&mut Oracle>, off: u64, data: &[u8]) -> bool {
    let (o, n) = (off as usize, data.len());
    let (start, end) = sector_span(off, n as u64);
    let span = start as usize..end as usize;
    let before = model[span.clone()].to_vec();
    model[o..o + n].copy_from_slice(data);
    if let Some(oracle) = oracle {
        oracle.written(model, o, n);
    }
    let Err(e) = c.write(off, data) else { return true };
    let errno = nbd_errno(&e, "write");
    assert_eq!(errno, NBD_ENOSPC, "a write on a full file system: {e}");
    let now = c.read(start, (end - start) as u32).unwrap_or_else(|e| panic!("read after ENOSPC: {e}"));
    if let Some(s) = first_mixed_sector(&now, &before, &model[span.clone()]) {
        panic!("after a failed write of {n} bytes at {off}, sector {s} of it reads neither as before nor as after it");
    }
    model[span].copy_from_slice(&now);
    false
}

/// Writes until `failures` writes have been refused with ENOSPC (or `max` writes); returns
/// how many were refused. With an oracle, a FLUSH every eighth write.
fn fill(
    c: &mut Client,
    model: &mut [u8],
    mut oracle: Option<&mut Oracle>,
    rng: &mut XorShift,
    failures: usize,
) -> usize {
    let mut failed = 0;
    for i in 0..4000u64 {
        if failed >= failures {
            break;
        }
        let (off, data) = next_write(rng);
        if !write_tracked(c, model, oracle.as_deref_mut(), off, &data) {
            failed += 1;
        }
        if let Some(o) = oracle.as_deref_mut() {
            if i % 8 == 7 {
                flush_tracked(c, model, o);
            }
        }
    }
    failed
}

/// A FLUSH that may fail only with ENOSPC (the map cannot grow on a full disk); a completed
/// one makes the model durable. Returns whether it completed.
fn flush_tracked(c: &mut Client, model: &[u8], oracle: &mut Oracle) -> bool {
    match c.flush() {
        Ok(()) => {
            oracle.flushed(model);
            true
        }
        Err(e) => {
            assert_eq!(nbd_errno(&e, "flush"), NBD_ENOSPC, "a flush on a full file system: {e}");
            false
        }
    }
}

/// Writes `count` MiB at fresh random places, every one of which must succeed.
#[track_caller]
fn must_write(c: &mut Client, model: &mut [u8], oracle: &mut Oracle, rng: &mut XorShift, count: u64, what: &str) {
    for _ in 0..count {
        let off = rng.next_u64() % (SIZE / MIB) * MIB;
        let data = random_bytes(MIB as usize, rng.next_u64());
        c.write(off, &data).unwrap_or_else(|e| panic!("{what}: write at {off}: {e}"));
        model[off as usize..(off + MIB) as usize].copy_from_slice(&data);
        oracle.written(model, off as usize, data.len());
    }
    c.flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
    oracle.flushed(model);
}

/// Discards `[off, off + len)` (it then reads as zeros, spec §6); a full disk must not
/// prevent it, since it is how a client gives space back.
fn discard(c: &mut Client, model: &mut [u8], oracle: &mut Oracle, off: u64, len: u64) {
    for at in (off..off + len).step_by(8 << 20) {
        let n = (off + len - at).min(8 << 20);
        c.trim(at, n as u32).unwrap_or_else(|e| panic!("discard at {at} on a full file system: {e}"));
    }
    model[off as usize..(off + len) as usize].fill(0);
    oracle.written(model, off as usize, len as usize);
}

#[test]
fn a_write_stream_on_a_full_file_system_gets_enospc_keeps_reading_and_writes_again_once_space_is_freed() {
    if !require_loop_mount() {
        return;
    }
    let mut rig = Rig::new(&[], None);
    let filler = rig.fs.path().join("filler");
    write_random_file(&filler, FILLER, 1);
    let (mut c, mut model, mut oracle, mut rng) = rig.begin(0x5eed);

    // No FLUSH until the disk is full: the write stream alone runs into ENOSPC.
    let failed = fill(&mut c, &mut model, None, &mut rng, 40);
    assert_eq!(failed, 40, "the file system never filled up ({} bytes free)", rig.fs.free_bytes());
    assert_bytes_eq(&read_device(&mut c), &model, "the whole device, read on the connection that got ENOSPC");
    oracle.written(&model, 0, model.len());
    flush_tracked(&mut c, &model, &mut oracle);

    // The administrator deletes a file next to the image: the same connection writes again.
    std::fs::remove_file(&filler).unwrap();
    must_write(&mut c, &mut model, &mut oracle, &mut rng, 4, "after deleting a file on the full file system");

    // Full again; this time the client discards a third of the device, which gives its
    // space back to the file system, and writes again.
    let failed = fill(&mut c, &mut model, None, &mut rng, 20);
    assert_eq!(failed, 20, "the file system did not fill up again");
    oracle.written(&model, 0, model.len());
    let free = rig.fs.free_bytes();
    discard(&mut c, &mut model, &mut oracle, 32 * MIB, 32 * MIB);
    assert!(rig.fs.free_bytes() >= free + 8 * MIB, "discarding 32 MiB freed only {} bytes", rig.fs.free_bytes() - free);
    must_write(&mut c, &mut model, &mut oracle, &mut rng, 4, "after discarding on the full file system");
    assert_bytes_eq(&read_device(&mut c), &model, "the whole device after space came back");
    drop(c);

    assert!(rig.stop(), "the server did not close the image cleanly\n");
    rig.assert_check_ok(false, "after a clean stop");
    rig.start();
    let mut c = rig.client();
    assert_bytes_eq(&read_device(&mut c), &model, "the whole device after a restart");
}

#[test]
fn writes_and_flushes_on_a_full_file_system_lose_nothing_flushed_across_kill_9() {
    if !require_loop_mount() {
        return;
    }
    let mut rig = Rig::new(&[], None);
    let (mut c, mut model, mut oracle, mut rng) = rig.begin(0xf105);

    // Writes with a FLUSH every eighth until the disk is full and stays full.
    let failed = fill(&mut c, &mut model, Some(&mut oracle), &mut rng, 60);
    assert_eq!(failed, 60, "the file system never filled up ({} bytes free)", rig.fs.free_bytes());
    assert_bytes_eq(&read_device(&mut c), &model, "the whole device, read on the connection that got ENOSPC");

    // Crash while full: every flushed sector is there after the restart, on the full disk.
    rig.kill9();
    drop(c);
    let (mut c, now) = rig.reopen(&oracle, "after kill -9 on a full file system");
    model = now;
    oracle.written(&model, 0, model.len());

    // The client discards to make room: writes and flushes work on the same connection.
    discard(&mut c, &mut model, &mut oracle, 0, 24 * MIB);
    must_write(&mut c, &mut model, &mut oracle, &mut rng, 4, "after discarding on the full file system");
    let failed = fill(&mut c, &mut model, Some(&mut oracle), &mut rng, 10);
    assert_eq!(failed, 10, "the file system did not fill up again");

    rig.kill9();
    drop(c);
    rig.reopen(&oracle, "after the second kill -9");
}

#[test]
fn enospc_at_fsync_on_thin_storage_fails_the_flush_and_refuses_writes_until_the_image_is_reopened() {
    if !require_loop_mount() {
        return;
    }
    // Without a journal: with one, ext4 aborts it on the first failed metadata write and goes
    // read-only, which is about ext4, not about cowdisk.
    let mut rig = Rig::new(&["-O", "^has_journal"], Some(40 * MIB));
    let filler = rig.tmpfs.path().join("filler");
    write_random_file(&filler, FILLER, 2);
    let (mut c, mut model, mut oracle, mut rng) = rig.begin(7);

    // ext4 takes every write into the page cache; the medium runs out when a FLUSH writes it
    // back, and fsync reports ENOSPC.
    let mut flushed = 0;
    let refused = loop {
        for _ in 0..4 {
            let off = rng.next_u64() % (SIZE / MIB) * MIB;
            let data = random_bytes(MIB as usize, rng.next_u64());
            assert!(write_tracked(&mut c, &mut model, Some(&mut oracle), off, &data), "write before any sync failed");
        }
        match c.flush() {
            Ok(()) => {
                oracle.flushed(&model);
                flushed += 1;
                assert_medium_holds(&rig.image);
            }
            Err(e) => break e,
        }
        assert!(flushed < 100, "the thin storage never filled up");
    };
    assert_eq!(nbd_errno(&refused, "flush"), NBD_ENOSPC, "fsync ran out of space: {refused}");
    assert_tells_no_path(&refused, &rig.image);
    // The kernel may drop the pages it could not write whenever memory runs short (it did on
    // a CI machine): evicting them here makes that case the one every run tests.
    evict(&rig.image);
    let seen = read_device(&mut c);
    oracle.check_after_failed_sync(&seen, "the device read on the connection whose flush failed");

    // Spec §5.3: once a sync failed the kernel may have dropped pages it could not write, so
    // the image refuses writes and flushes until it is reopened, also once space is back.
    std::fs::remove_file(&filler).unwrap();
    let refused = c.write(0, &[7; 4096]).expect_err("write after the failed sync");
    assert_eq!(nbd_errno(&refused, "write after the failed sync"), NBD_EIO, "{refused}");
    assert_tells_no_path(&refused, &rig.image);
    assert_nbd_error(c.flush(), NBD_EIO, "flush after the failed sync");
    assert_bytes_eq(&read_device(&mut c), &seen, "the device after writes were refused");
    drop(c);

    // Reopened (the server restarted): everything flushed is there, and writes work again.
    assert!(!rig.stop(), "the server's close cannot succeed on a poisoned image");
    let (mut c, now) = rig.reopen(&oracle, "after the failed sync, reopened");
    model = now;
    c.flush().expect("flush after reopening");
    oracle.flushed(&model);
    must_write(&mut c, &mut model, &mut oracle, &mut rng, 4, "after reopening with space back");
    drop(c);
    assert!(rig.stop(), "clean stop after reopening");
    rig.assert_check_ok(false, "at the end");
}

/// `export remove` of an image whose file system filled up after its clients wrote: the flush
/// before the close fails (the map and header have no room), and the export stays served with
/// everything its clients wrote, in its place in the export list (so still the default export);
/// once space is freed, a second removal closes it with all of it.
/// Before 2026-12-04 the first removal dropped the chain when the close failed: the export was
/// gone, the command said only "No space left on device", and the 6 MiB clients had written
/// (and read back) since their last flush were lost. Until 2026-12-04 (later) the export served
/// again went to the end of the list, so the default export changed.
#[test]
fn an_export_removal_whose_flush_fails_keeps_the_export_and_its_data() {
    if !require_root() {
        return;
    }
    let dir = TempDir::for_test();
    let tmpfs = Mount::with_options(Path::new("tmpfs"), &dir.join("small"), &["-t", "tmpfs", "-o", "size=6m"])
        .unwrap_or_else(|e| panic!("mount tmpfs: {e}"));
    let d = tmpfs.path();
    common::cli::ok_in(d, &["create", "d.cow", "--size", "64M"]);
    // A second export after it: d, the first, is the default export and must stay so.
    common::cli::ok_in(d, &["create", "e.cow", "--size", "1M"]);
    let (sock, ctl) = (dir.join("nbd.sock"), dir.join("ctl.sock"));
    let ctl = ctl.to_str().expect("a UTF-8 path");
    let images = [d.join("d.cow"), d.join("e.cow")].map(|p| p.to_str().expect("a UTF-8 path").to_owned());
    let server = Server::start(&[&images[0], &images[1], "--socket", sock.to_str().unwrap(), "--control", ctl]);
    let mut c = server.connect();
    c.opt_go("d", &[]).expect("NBD_OPT_GO");
    // 256 KiB blocks until the file system is full (no flush).
    let mut written = 0u64;
    while c.write(written, &random_bytes(256 << 10, written)).is_ok() {
        written += 256 << 10;
        assert!(written < 8 << 20, "a 6 MiB file system took 8 MiB");
    }
    assert!(written >= 2 << 20, "only {written} bytes written");
    let read_all = |c: &mut Client| {
        (0..8u64).flat_map(|i| c.read(i << 23, 8 << 20).expect("read the device")).collect::<Vec<u8>>()
    };
    let before = read_all(&mut c);
    drop(c);
    let refused = common::cli::run_in(d, &["export", "remove", "d", "--force", "--control", ctl]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    assert!(
        refused.error_line().contains("not removed") && refused.error_line().contains("No space"),
        "{}",
        refused.describe()
    );
    let listed = common::cli::ok_in(d, &["export", "list", "--control", ctl]);
    assert!(listed.starts_with("d "), "the export is not served again in its place: {listed}");
    // Asked for by the empty name (the default export), as before the refused removal.
    let mut c = server.connect();
    let info = c.opt_go("", &[]).expect("NBD_OPT_GO of the default export after the refused removal");
    assert_eq!(info.size, 64 << 20, "the default export is no longer d");
    assert_bytes_eq(&read_all(&mut c), &before, "served again after the refused removal");
    drop(c);
    run(tool("mount").args(["-o", "remount,size=16m"]).arg(d));
    common::cli::ok_in(d, &["export", "remove", "d", "--force", "--control", ctl]);
    assert_eq!(server.stop().code(), Some(0));
    let checked = common::cli::run_in(d, &["check", "d.cow"]);
    assert_eq!(checked.code, Some(0), "{}", checked.describe());
    assert_bytes_eq(&common::cli::device_in(d, "d.cow"), &before, "d.cow after the removal");
    drop(tmpfs);
}
