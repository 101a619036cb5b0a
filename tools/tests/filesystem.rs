//! A real ext4 on `cowdisk serve` exports (nbdfuse + loop device + mount): files written through an overlay survive a server restart and pass e2fsck, two overlays on one ext4 base (the Docker case) see only their own writes, and the base never changes.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use common::*;

fn cowdisk(args: &[&str]) -> Output {
    run(Command::new(cowdisk_bin()).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// What a path in a tree is: a directory, or a file with its size and CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File { size: u64, crc: u64 },
}

type Tree = BTreeMap<PathBuf, Entry>;

/// Writes `data` to `root/rel` and records it in `tree`.
fn put_file(root: &Path, rel: &Path, data: &[u8], tree: &mut Tree) {
    let p = root.join(rel);
    fs::write(&p, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
    tree.insert(rel.to_path_buf(), Entry::File { size: data.len() as u64, crc: bytes_fingerprint(data) });
}

fn put_dir(root: &Path, rel: &Path, tree: &mut Tree) {
    let p = root.join(rel);
    fs::create_dir_all(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
    tree.insert(rel.to_path_buf(), Entry::Dir);
}

/// Writes a deterministic tree under `root/top`: nested directories (three
/// levels, one left empty), `small` small files of pseudo-random sizes
/// (some empty, most not a multiple of any block size) spread over them, and
/// one multi-MiB file per entry of `big`. Returns what it wrote, keyed by
/// path relative to `root`.
fn write_tree(root: &Path, top: &str, seed: u64, small: usize, big: &[u64]) -> Tree {
    let mut tree = Tree::new();
    let top = PathBuf::from(top);
    put_dir(root, &top, &mut tree);
    let mut dirs = vec![top.clone()];
    for i in 0..4 {
        let d = top.join(format!("dir{i}"));
        put_dir(root, &d, &mut tree);
        dirs.push(d.clone());
        for j in 0..3 {
            let sd = d.join(format!("sub{j}"));
            put_dir(root, &sd, &mut tree);
            dirs.push(sd.clone());
            for k in 0..2 {
                let leaf = sd.join(format!("leaf{k}"));
                put_dir(root, &leaf, &mut tree);
                dirs.push(leaf);
            }
        }
    }
    put_dir(root, &top.join("dir0/empty"), &mut tree);
    let mut rng = XorShift::new(seed);
    for n in 0..small {
        let dir = &dirs[(rng.next_u64() % dirs.len() as u64) as usize];
        let size = match n % 10 {
            0 => 0,
            1 => 4096,
            _ => rng.next_u64() % (24 * KIB),
        };
        let data = random_bytes(size as usize, seed ^ (n as u64 + 1) << 20);
        put_file(root, &dir.join(format!("f{n:03}.bin")), &data, &mut tree);
    }
    let bigdir = top.join("big");
    put_dir(root, &bigdir, &mut tree);
    for (k, &size) in big.iter().enumerate() {
        let data = random_bytes(size as usize, seed ^ 0xb16_0000 ^ k as u64);
        put_file(root, &bigdir.join(format!("big{k}.bin")), &data, &mut tree);
    }
    tree
}

/// Everything below `root` (except ext4's lost+found) as a [`Tree`].
fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &Path, tree: &mut Tree) {
        let dir = root.join(rel);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for e in entries {
            let e = e.unwrap();
            let rel = rel.join(e.file_name());
            if rel == Path::new("lost+found") {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                tree.insert(rel.clone(), Entry::Dir);
                walk(root, &rel, tree);
            } else {
                assert!(ft.is_file(), "unexpected {:?} at {}", ft, rel.display());
                let p = root.join(&rel);
                tree.insert(rel, Entry::File { size: fs::metadata(&p).unwrap().len(), crc: file_fingerprint(&p) });
            }
        }
    }
    let mut tree = Tree::new();
    walk(root, Path::new(""), &mut tree);
    tree
}

/// Panics with the differing paths (not the whole listing) unless equal.
#[track_caller]
fn assert_tree_eq(actual: &Tree, expected: &Tree, what: &str) {
    if actual == expected {
        return;
    }
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing {}: expected {e:?}", p.display())),
            Some(a) if a != e => diffs.push(format!("{}: got {a:?}, expected {e:?}", p.display())),
            _ => {}
        }
    }
    for (p, a) in actual {
        if !expected.contains_key(p) {
            diffs.push(format!("unexpected {}: {a:?}", p.display()));
        }
    }
    let n = diffs.len();
    diffs.truncate(20);
    panic!("{what}: {n} differences, first ones:\n  {}", diffs.join("\n  "));
}

/// Size, CRC-32 and modification time of a file: enough to tell it never changed.
fn fingerprint(p: &Path) -> (u64, u64, SystemTime) {
    let m = fs::metadata(p).unwrap();
    (m.len(), file_fingerprint(p), m.modified().unwrap())
}

/// `sync -f`: syncfs(2) on the filesystem holding `p`.
fn syncfs(p: &Path) {
    run(tool("sync").arg("-f").arg(p));
}

#[track_caller]
fn assert_fsck_clean(dev: &Path) {
    let out = fsck_ext4(dev);
    assert!(
        out.status.success(),
        "e2fsck -fn {} is not clean ({}):\n{}\n{}",
        dev.display(),
        out.status,
        stdout_of(&out),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts, checks the filesystem with `e2fsck -fn` on the still-attached
/// loop device, then detaches the loop device and unmounts nbdfuse.
fn unmount_fsck_release(fs: FsOverNbd) {
    fs.mount.unmount().expect("umount");
    assert_fsck_clean(fs.loopdev.path());
    fs.loopdev.detach().expect("losetup -d");
    fs.fuse.unmount().expect("fusermount3 -u");
}

#[test]
fn ext4_on_an_overlay_survives_server_restart_passes_fsck_and_leaves_base_unchanged() {
    if !require_fs_stack() {
        return;
    }
    let dir = TempDir::for_test();
    // A sparse 256 MiB raw base with a little data in it.
    let base = dir.join("base.raw");
    {
        let f = fs::File::create(&base).unwrap();
        f.set_len(256 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        for (off, len, seed) in [(0, MIB, 1), (100 * MIB, 3 * MIB, 2), (255 * MIB, MIB, 3)] {
            f.write_all_at(&random_bytes(len as usize, seed), off).unwrap();
        }
        f.sync_all().unwrap();
    }
    let base_before = fingerprint(&base);
    let overlay = dir.join("disk.cow");
    cowdisk(&["create", s(&overlay), "--backing", s(&base), "--backing-format", "raw"]);
    let sock = dir.join("nbd.sock");
    let serve_args = [s(&overlay), "--socket", s(&sock)];

    // First server: mkfs, mount, write the tree, sync, unmount, fsck, release.
    let server = Server::start(&serve_args);
    let uri = server.uri("disk");
    let fs1 = FsOverNbd::create(&uri, &dir.subdir("first"));
    let expected = write_tree(fs1.path(), "tree", 0x7ee, 300, &[2 * MIB + 1, 3 * MIB, 4 * MIB + 4095, 6 * MIB + 17]);
    assert!(expected.len() > 300, "{} entries", expected.len());
    syncfs(fs1.path());
    assert_tree_eq(&read_tree(fs1.path()), &expected, "tree before unmount");
    unmount_fsck_release(fs1);
    let status = server.stop();
    assert!(status.success(), "cowdisk serve exit after SIGTERM: {status}");

    // Second server on the same overlay: everything is back.
    let server = Server::start(&serve_args);
    let fs2 = FsOverNbd::attach(&server.uri("disk"), &dir.subdir("second"));
    assert_tree_eq(&read_tree(fs2.path()), &expected, "tree after server restart");
    unmount_fsck_release(fs2);
    let status = server.stop();
    assert!(status.success(), "cowdisk serve exit after SIGTERM: {status}");

    assert_eq!(fingerprint(&base), base_before, "the raw base under the overlay changed (size, crc32, mtime)");
}

#[test]
fn two_overlays_on_one_ext4_base_served_together_see_only_their_own_writes() {
    if !require_fs_stack() {
        return;
    }
    let dir = TempDir::for_test();
    // The "image": an ext4 base populated by mkfs.ext4 -d.
    let staging = dir.subdir("staging");
    let mut base_tree = Tree::new();
    put_dir(&staging, Path::new("etc"), &mut base_tree);
    put_file(&staging, Path::new("etc/hostname"), b"cowdisk-base\n", &mut base_tree);
    put_file(&staging, Path::new("README.txt"), b"Lives in the base.\n", &mut base_tree);
    base_tree.extend(write_tree(&staging, "usr", 0xba5e, 80, &[3 * MIB + 5]));
    let base = dir.join("base.raw");
    run(tool("mkfs.ext4").args(["-q", "-F", "-L", "cowbase", "-d"]).arg(&staging).arg(&base).arg("128M"));
    assert_fsck_clean(&base);
    let base_before = fingerprint(&base);

    let (a, b) = (dir.join("a.cow"), dir.join("b.cow"));
    for o in [&a, &b] {
        cowdisk(&["create", s(o), "--backing", s(&base), "--backing-format", "raw"]);
    }
    let sock = dir.join("nbd.sock");
    let serve_args = [s(&a), s(&b), "--socket", s(&sock)];
    let server = Server::start(&serve_args);
    let fs_a = FsOverNbd::attach(&server.uri("a"), &dir.subdir("mnt-a"));
    let fs_b = FsOverNbd::attach(&server.uri("b"), &dir.subdir("mnt-b"));
    assert_tree_eq(&read_tree(fs_a.path()), &base_tree, "overlay a as mounted");
    assert_tree_eq(&read_tree(fs_b.path()), &base_tree, "overlay b as mounted");

    // Different changes in each: new trees, a base file rewritten in a,
    // a base file deleted in b, a base directory removed in b.
    let mut want_a = base_tree.clone();
    want_a.extend(write_tree(fs_a.path(), "only-a", 0xa, 120, &[2 * MIB + 3]));
    put_file(fs_a.path(), Path::new("README.txt"), &random_bytes(100_000, 0xaa), &mut want_a);
    let mut want_b = base_tree.clone();
    want_b.extend(write_tree(fs_b.path(), "only-b", 0xb, 120, &[MIB + 7]));
    fs::remove_file(fs_b.path().join("etc/hostname")).unwrap();
    want_b.remove(Path::new("etc/hostname"));
    fs::remove_dir_all(fs_b.path().join("usr/dir3")).unwrap();
    want_b.retain(|p, _| !p.starts_with("usr/dir3"));
    syncfs(fs_a.path());
    syncfs(fs_b.path());

    assert_tree_eq(&read_tree(fs_a.path()), &want_a, "overlay a after writes");
    assert_tree_eq(&read_tree(fs_b.path()), &want_b, "overlay b after writes");

    // Remount both through fresh nbdfuse/loop devices (no page cache left):
    // each device holds only its own changes.
    unmount_fsck_release(fs_a);
    unmount_fsck_release(fs_b);
    let fs_a = FsOverNbd::attach(&server.uri("a"), &dir.subdir("mnt-a2"));
    let fs_b = FsOverNbd::attach(&server.uri("b"), &dir.subdir("mnt-b2"));
    assert_tree_eq(&read_tree(fs_a.path()), &want_a, "overlay a remounted");
    assert_tree_eq(&read_tree(fs_b.path()), &want_b, "overlay b remounted");
    fs_a.release().expect("release a");
    fs_b.release().expect("release b");
    let status = server.stop();
    assert!(status.success(), "cowdisk serve exit after SIGTERM: {status}");

    assert_eq!(fingerprint(&base), base_before, "the shared ext4 base changed (size, crc32, mtime)");
    assert_fsck_clean(&base);
}
