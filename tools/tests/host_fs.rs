//! Images kept on host file systems other than ext4 (XFS and btrfs, each in a loop-mounted
//! file): the file operations the server relies on there (fallocate for new slots, hole
//! punching for discards, pwritev2 with RWF_DSYNC for the journal and the log, splice for large
//! writes) keep every byte a client wrote, through a live snapshot, a clean stop,
//! `check --chain --deep` and `flatten --output`. And exFAT (through FUSE), which has no hard
//! links: images are made and served there, and a snapshot, which needs one, is refused before
//! anything changes.

mod common;

use common::cli::*;
use common::nbdclient::{NbdClient, NBD_CMD_FLAG_FUA};
use common::*;
use std::os::unix::net::UnixStream;
use std::path::Path;

const SIZE: usize = 16 << 20;
const BLOCK: usize = 4096;

/// Random writes (aligned, unaligned, some of 256 KiB, spliced from the socket), discards,
/// zeroings and flushes through `c`, mirrored in `model`.
fn mixed_load(c: &mut NbdClient<UnixStream>, model: &mut [u8], rng: &mut XorShift, ops: usize) {
    for i in 0..ops {
        let pick = rng.next_u64() % 10;
        let len = match pick {
            0 => 256 << 10,
            1..=4 => BLOCK * (1 + (rng.next_u64() % 8) as usize),
            _ => 1 + (rng.next_u64() % 20_000) as usize,
        };
        let mut at = (rng.next_u64() % (SIZE - len) as u64) as usize;
        if pick <= 4 {
            at -= at % BLOCK;
        }
        match rng.next_u64() % 8 {
            0 => {
                c.trim(at as u64, len as u32).expect("trim");
                model[at..at + len].fill(0);
            }
            1 => {
                c.write_zeroes(at as u64, len as u32, 0).expect("write zeroes");
                model[at..at + len].fill(0);
            }
            k => {
                let data = random_bytes(len, rng.next_u64());
                let flags = if k == 2 { NBD_CMD_FLAG_FUA } else { 0 };
                c.write_flags(at as u64, &data, flags).expect("write");
                model[at..at + len].copy_from_slice(&data);
            }
        }
        if i % 16 == 15 {
            c.flush().expect("flush");
        }
    }
}

/// 4K first writes with FUA at scattered blocks: a `--log` image's records.
fn fua_blocks(c: &mut NbdClient<UnixStream>, model: &mut [u8], rng: &mut XorShift, n: usize) {
    for _ in 0..n {
        let at = (rng.next_u64() % (SIZE / BLOCK) as u64) as usize * BLOCK;
        let data = random_bytes(BLOCK, rng.next_u64());
        c.write_flags(at as u64, &data, NBD_CMD_FLAG_FUA).expect("FUA write");
        model[at..at + BLOCK].copy_from_slice(&data);
    }
}

fn read_all(c: &mut NbdClient<UnixStream>) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE);
    for at in (0..SIZE).step_by(1 << 20) {
        out.extend(c.read(at as u64, 1 << 20).expect("read"));
    }
    out
}

/// The whole workload in `dir`, a directory on the file system under test.
fn workload(dir: &Path) {
    write_random_file(&dir.join("base.raw"), SIZE as u64, 0xf5);
    let base = std::fs::read(dir.join("base.raw")).expect("read the base");
    ok_in(dir, &["create", "disk.cow", "--backing", "base.raw", "--backing-format", "raw"]);
    ok_in(dir, &["create", "log.cow", "--size", &SIZE.to_string(), "--log"]);
    let (sock, ctl) = (dir.join("nbd.sock"), dir.join("ctl.sock"));
    let server =
        Server::start(&[s(&dir.join("disk.cow")), s(&dir.join("log.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
    let mut rng = XorShift::new(0x5eed);
    let mut disk = base.clone();
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO disk");
    mixed_load(&mut c, &mut disk, &mut rng, 150);
    let out = ok_in(dir, &["snapshot", "disk.cow", "snap.cow", "--control", s(&ctl)]);
    assert!(out.contains("frozen as snap.cow"), "{out}");
    let at_snapshot = disk.clone();
    mixed_load(&mut c, &mut disk, &mut rng, 150);
    assert_bytes_eq(&read_all(&mut c), &disk, "disk, served");

    let mut l = server.connect();
    l.opt_go("log", &[]).expect("NBD_OPT_GO log");
    let mut log = vec![0u8; SIZE];
    fua_blocks(&mut l, &mut log, &mut rng, 3000);
    mixed_load(&mut l, &mut log, &mut rng, 100);
    assert_bytes_eq(&read_all(&mut l), &log, "log, served");
    drop((c, l));
    assert_eq!(server.stop().code(), Some(0));

    for image in ["disk.cow", "log.cow"] {
        ok_in(dir, &["check", image, "--chain", "--deep"]);
    }
    assert_bytes_eq(&device_in(dir, "disk.cow"), &disk, "disk.cow after the stop");
    assert_bytes_eq(&device_in(dir, "snap.cow"), &at_snapshot, "snap.cow");
    assert_bytes_eq(&device_in(dir, "log.cow"), &log, "log.cow after the stop");
    assert_eq!(std::fs::read(dir.join("base.raw")).expect("read the base"), base, "the base changed");
}

fn on(fs: &str, mkfs: &str, args: &[&str]) {
    if !(require_loop_mount() && require_tool(mkfs)) {
        return;
    }
    let dir = TempDir::for_test();
    let mnt = dir.join("mnt");
    // 1 GiB, sparse: btrfs wants more than 256 MiB for its defaults; nothing near it is used.
    let hostfs = FileFs::make(&dir.join(format!("{fs}.img")), 1 << 30, mkfs, args, &mnt);
    let kind = stdout_of(&run(tool("stat").args(["-f", "-c", "%T"]).arg(hostfs.path()))).trim().to_owned();
    assert_eq!(kind, fs, "the images' directory is on {kind}");
    workload(hostfs.path());
    drop(hostfs);
    assert!(mounts_under(dir.path()).is_empty(), "still mounted: {:?}", mounts_under(dir.path()));
}

#[test]
fn images_on_xfs_keep_every_byte_written() {
    on("xfs", "mkfs.xfs", &["-q", "-f"]);
}

#[test]
fn images_on_btrfs_keep_every_byte_written() {
    on("btrfs", "mkfs.btrfs", &["-q", "-f"]);
}

/// exFAT has no hard links (link(2) answers EPERM). New files are published there by a look
/// and a plain rename; a snapshot, which gives the frozen image its new name by a hard link,
/// is refused before its decision, live or offline, and the image goes on as it was: before
/// 2026-12-04 the decision was written first, and the image was left frozen with a snapshot
/// that no open could finish, so that it could be neither served nor snapshotted again.
#[test]
fn on_a_file_system_without_hard_links_a_snapshot_is_refused_and_changes_nothing() {
    if !(require_loop_mount() && require_tools(&["mkfs.exfat", "mount.exfat-fuse"])) {
        return;
    }
    let dir = TempDir::for_test();
    let (mount, loopdev) = exfat_mount(dir.path(), 256 << 20);
    let d = mount.path();
    std::fs::write(d.join("a"), b"x").expect("write on exFAT");
    assert!(std::fs::hard_link(d.join("a"), d.join("b")).is_err(), "exFAT took a hard link");
    std::fs::remove_file(d.join("a")).expect("remove");

    write_random_file(&d.join("base.raw"), SIZE as u64, 0xfa7);
    let mut disk = std::fs::read(d.join("base.raw")).expect("read the base");
    ok_in(d, &["create", "disk.cow", "--backing", "base.raw", "--backing-format", "raw"]);
    let (sock, ctl) = (dir.join("nbd.sock"), dir.join("ctl.sock"));
    let server = Server::start(&[s(&d.join("disk.cow")), "--socket", s(&sock), "--control", s(&ctl)]);
    let mut rng = XorShift::new(0xfa7);
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    mixed_load(&mut c, &mut disk, &mut rng, 100);
    let refused = run_in(d, &["snapshot", "disk.cow", "snap.cow", "--control", s(&ctl)]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    assert!(refused.error_line().contains("refused a hard link"), "{}", refused.describe());
    mixed_load(&mut c, &mut disk, &mut rng, 100);
    assert_bytes_eq(&read_all(&mut c), &disk, "served after the refused snapshot");
    drop(c);
    assert_eq!(server.stop().code(), Some(0));

    let refused = run_in(d, &["snapshot", "disk.cow", "snap.cow"]);
    assert!(refused.error_line().contains("refused a hard link"), "{}", refused.describe());
    let info: serde_json::Value =
        serde_json::from_str(&ok_in(d, &["info", "--json", "disk.cow"])).expect("info --json");
    assert_eq!(info["flags"], serde_json::json!([]), "the image changed: {info}");
    assert_eq!(info["layers"].as_array().map(Vec::len), Some(2), "{info}");
    // Sound; space the discards freed may be reported as leaked (exit 3): exFAT cannot punch
    // holes, so it stays the file's, and `--repair` says it cannot give it back.
    let checked = run_in(d, &["check", "disk.cow", "--chain", "--deep"]);
    let sound = checked.stdout.lines().all(|l| l.contains("checksums and invariants ok"));
    assert!(matches!(checked.code, Some(0) | Some(3)) && sound, "{}", checked.describe());
    if checked.code == Some(3) {
        let repaired = run_in(d, &["check", "disk.cow", "--repair"]);
        assert!(repaired.stdout.contains("not given back"), "{}", repaired.describe());
    }
    assert_bytes_eq(&device_in(d, "disk.cow"), &disk, "disk.cow after the stop");
    let mut names: Vec<String> = std::fs::read_dir(d)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["base.raw", "disk.cow"], "files left behind");
    drop(mount);
    drop(loopdev);
    assert!(mounts_under(dir.path()).is_empty(), "still mounted: {:?}", mounts_under(dir.path()));
}
