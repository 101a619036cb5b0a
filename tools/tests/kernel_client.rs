//! The Linux kernel's own NBD client (nbd.ko; Debian's nbd-client does the handshake and hands
//! the sockets to the kernel) in front of `cowdisk serve`, with ext4 mounted on /dev/nbd0: this
//! machine has no nbd module, so a Debian kernel boots in qemu-system-x86_64 (software
//! emulation) from the kit `tools/kernel-client/build.py` makes, and reaches the server through
//! qemu's user-mode network. What is checked is what a user of the mounted disk would see:
//! files read back through copy-up, written, changed, deleted and trimmed; the kernel told it
//! must flush; a live snapshot of a frozen file system that e2fsck finds clean.

mod common;

use common::cli::*;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a guest may take from boot to power-off. It boots in about 10 s on an idle machine
/// under software emulation; beside the rest of the test suite, several times that.
const GUEST_DEADLINE: Duration = Duration::from_secs(420);

struct Kit {
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// The kernel and initramfs, built once per checkout (under target/) and reused.
fn kit() -> Option<Kit> {
    if !require_tools(&[
        "qemu-system-x86_64",
        "python3",
        "apt-get",
        "dpkg-deb",
        "ldd",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
    ]) {
        return None;
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tools.join("../target/kernel-client");
    // It downloads Debian packages the first time: without the mirror it cannot be made.
    if let Err(e) = try_run(Command::new("python3").arg(tools.join("kernel-client/build.py")).arg(&out)) {
        missing(&format!("the kernel-client kit, which tools/kernel-client/build.py could not make: {e}"));
        return None;
    }
    Some(Kit { vmlinuz: out.join("vmlinuz"), initrd: out.join("initrd.cpio.gz") })
}

/// Kills the guest if the test ends before it powered off.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What a guest printed, once it powered off after running its scenario to the end.
struct Transcript {
    lines: Vec<String>,
}

impl Transcript {
    /// The words after `tag` on the lines that start with it, in order.
    fn tagged(&self, tag: &str) -> Vec<Vec<String>> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(tag))
            .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// `SUM <md5> /mnt/<name>` lines: the guest's checksums, by name, in the order printed.
    fn sums(&self) -> Vec<(String, String)> {
        self.tagged("SUM ")
            .into_iter()
            .filter(|w| w.len() == 2)
            .map(|w| (w[1].trim_start_matches("/mnt/").to_owned(), w[0].clone()))
            .collect()
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Boots the kit with `scenario` (a busybox shell script, run with `sh -e`) as /scenario.sh,
/// calls `on_line` for every line the guest prints (a test acts on its cues there), and returns
/// what it printed once it has powered off. Panics, with the transcript, if the scenario did
/// not end with status 0.
fn boot(kit: &Kit, dir: &Path, scenario: &str, mut on_line: impl FnMut(&str)) -> Transcript {
    let sc = dir.join("scenario");
    std::fs::create_dir_all(&sc).expect("scenario dir");
    std::fs::write(sc.join("scenario.sh"), scenario).expect("write the scenario");
    let packed = dir.join("scenario.cpio.gz");
    let builder = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-client/build.py");
    run(Command::new("python3").arg(builder).arg("--pack").arg(&sc).arg(&packed));
    // The kernel takes concatenated cpio archives as one: the scenario lands beside /init.
    let mut initrd = std::fs::read(&kit.initrd).expect("read the initramfs");
    initrd.extend(std::fs::read(&packed).expect("read the scenario archive"));
    let initrd_path = dir.join("initrd.gz");
    std::fs::write(&initrd_path, initrd).expect("write the initrd");

    let child = Command::new(tool_path("qemu-system-x86_64").expect("qemu-system-x86_64"))
        .args(["-accel", "tcg", "-m", "512", "-smp", "1", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kit.vmlinuz)
        .arg("-initrd")
        .arg(&initrd_path)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        // No option ROM: the network card's PXE firmware only slows the boot.
        .args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("qemu.stderr")).expect("qemu's stderr file"))
        .spawn()
        .expect("start qemu-system-x86_64");
    let mut guest = Guest(child);
    let (tx, rx) = mpsc::channel();
    let stdout = guest.0.stdout.take().expect("qemu's stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + GUEST_DEADLINE;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("guest: {line}");
                on_line(&line);
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the guest did not power off within {GUEST_DEADLINE:?}; it printed:\n{}", lines.join("\n"))
            }
        }
    }
    let status = guest.0.wait().expect("wait for qemu");
    let t = Transcript { lines };
    let end = t.tagged("COWDISK-SCENARIO-EXIT ");
    assert_eq!(
        end.first().map(|w| w.join(" ")),
        Some("0".to_owned()),
        "the guest's scenario failed (qemu {status}: {}); it printed:\n{}",
        std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default(),
        t.text()
    );
    t
}

fn md5(path: &Path) -> String {
    let out = run(Command::new("md5sum").arg(path));
    stdout_of(&out).split_whitespace().next().unwrap_or_default().to_owned()
}

/// A raw ext4 file system of `size` holding the files of `src`, made without mounting anything.
fn mkfs_from(src: &Path, image: &Path, size: &str) {
    run(tool("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-d"]).arg(src).arg(image).arg(size));
}

/// The file system in `raw` is clean (e2fsck, forced, changing nothing) and its files are these
/// (name -> md5) and not those (`absent`); read with debugfs, nothing mounted.
fn check_fs(raw: &Path, files: &HashMap<String, String>, absent: &[&str]) {
    let fsck = run_status(tool("e2fsck").args(["-f", "-n"]).arg(raw));
    assert!(
        fsck.status.success(),
        "e2fsck -fn {} found problems:\n{}{}",
        raw.display(),
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let dir = raw.with_extension("files");
    std::fs::create_dir_all(&dir).expect("dump dir");
    for (name, sum) in files {
        let to = dir.join(name);
        run(tool("debugfs").arg("-R").arg(format!("dump /{name} {}", to.display())).arg(raw));
        assert!(to.exists(), "{name} is not in {}", raw.display());
        assert_eq!(&md5(&to), sum, "{name} in {} is not what the guest wrote or read", raw.display());
    }
    for name in absent {
        let o = run_status(tool("debugfs").arg("-R").arg(format!("stat /{name}")).arg(raw));
        let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(said.contains("File not found"), "{name} should be gone from {}: {said}", raw.display());
    }
}

/// An overlay `dir`/disk.cow on `dir`/base.raw, served on TCP (which the guest reaches through
/// qemu's user network) with its control channel `dir`/ctl.sock: the server and its port.
fn serve_overlay(dir: &Path) -> (Server, u16) {
    ok_in(dir, &["create", "disk.cow", "--backing", "base.raw", "--backing-format", "raw"]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start(&[s(&dir.join("disk.cow")), "--listen", &listen, "--control", s(&dir.join("ctl.sock"))]);
    (server, port)
}

fn data_bytes(dir: &Path, image: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok_in(dir, &["info", image, "--json"])).expect("info --json is JSON");
    v["data_bytes"].as_u64().expect("data_bytes")
}

/// ext4 on an overlay of a raw base, through the kernel client with two connections: the base's
/// files read back as they are (every read goes below the overlay), a part of one rewritten in
/// place (copy-up of those blocks), one deleted, a new one kept, a large one written, deleted
/// and trimmed. After the guest powered off and the server stopped: the image checks, its file
/// system is clean and holds exactly what the guest saw, the trim gave the large file's space
/// back, and the base is untouched.
#[test]
fn ext4_through_the_kernel_nbd_client() {
    let Some(kit) = kit() else { return };
    let tmp = TempDir::for_test();
    let dir = tmp.path();
    let src = tmp.subdir("src");
    write_random_file(&src.join("a.bin"), 3 << 20, 0xa1);
    write_random_file(&src.join("b.bin"), 2 << 20, 0xb2);
    std::fs::write(src.join("hello.txt"), "hello from the base\n").expect("write hello.txt");
    mkfs_from(&src, &dir.join("base.raw"), "64M");
    let base_sum = md5(&dir.join("base.raw"));
    let (mut server, port) = serve_overlay(dir);

    let scenario = format!(
        r#"
nbd-client 10.0.2.2 {port} /dev/nbd0 -N disk -C 2
echo "QUEUE $(cat /sys/block/nbd0/queue/write_cache | tr ' ' _) $(cat /sys/block/nbd0/queue/fua) $(cat /sys/block/nbd0/queue/discard_max_bytes)"
mount -t ext4 /dev/nbd0 /mnt
for f in a.bin b.bin hello.txt; do echo "SUM $(md5sum /mnt/$f)"; done
dd if=/dev/urandom of=/mnt/a.bin bs=4096 seek=100 count=3 conv=notrunc 2>/dev/null
rm /mnt/b.bin
dd if=/dev/urandom of=/mnt/keep.bin bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/mnt/big.bin bs=1M count=16 2>/dev/null
sync
rm /mnt/big.bin
sync
echo "TRIM $(fstrim -v /mnt)"
for f in a.bin keep.bin; do echo "SUM $(md5sum /mnt/$f)"; done
umount /mnt
nbd-client -d /dev/nbd0
"#
    );
    let t = boot(&kit, dir, &scenario, |_| {});
    let sums = t.sums();
    // Reads through the kernel: the base's files, as the base holds them.
    for (name, _) in [("a.bin", 0), ("b.bin", 0), ("hello.txt", 0)] {
        let first = sums.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
        assert_eq!(first, Some(md5(&src.join(name))), "the guest read {name} wrong:\n{}", t.text());
    }
    // The kernel was told the disk has a volatile cache and takes FUA (it will flush), and
    // that it takes discards.
    let queue = t.tagged("QUEUE ");
    assert_eq!(queue.len(), 1, "{}", t.text());
    assert_eq!(queue[0][0], "write_back", "the kernel does not flush: {:?}", queue[0]);
    assert_eq!(queue[0][1], "1", "the kernel sends no FUA: {:?}", queue[0]);
    assert_ne!(queue[0][2], "0", "the kernel sends no discards: {:?}", queue[0]);

    assert!(server.is_running(), "the server stopped under the kernel client:\n{}", server.log());
    let status = server.stop();
    assert!(status.success(), "the server did not stop cleanly: {status}");
    ok_in(dir, &["check", "disk.cow", "--chain", "--deep"]);
    // keep.bin (4 MiB), the rewritten blocks and the file system's own writes stay; the 16 MiB
    // of big.bin were trimmed away.
    let held = data_bytes(dir, "disk.cow");
    assert!(held >= 4 << 20, "the overlay holds {held} bytes, less than keep.bin");
    assert!(held < 16 << 20, "the overlay holds {held} bytes: the trim of big.bin's 16 MiB did not free them");
    ok_in(dir, &["flatten", "disk.cow", "--output", "merged.raw", "--format", "raw"]);
    let last: HashMap<String, String> = sums.iter().skip(3).cloned().collect();
    assert_eq!(last.len(), 2, "{}", t.text());
    assert_ne!(last["a.bin"], md5(&src.join("a.bin")), "the rewrite of a.bin changed nothing");
    let mut expect = last.clone();
    expect.insert("hello.txt".into(), md5(&src.join("hello.txt")));
    check_fs(&dir.join("merged.raw"), &expect, &["b.bin", "big.bin"]);
    assert_eq!(md5(&dir.join("base.raw")), base_sum, "the raw base was written to");
}

/// A live snapshot of a mounted file system, frozen (fsfreeze) by the guest while the server
/// takes it: the snapshot is a clean file system with what was written before it, and nothing
/// of what the guest wrote after thawing, which the live image holds.
#[test]
fn live_snapshot_under_the_kernel_nbd_client() {
    let Some(kit) = kit() else { return };
    let tmp = TempDir::for_test();
    let dir = tmp.path();
    let src = tmp.subdir("src");
    std::fs::write(src.join("hello.txt"), "hello from the base\n").expect("write hello.txt");
    mkfs_from(&src, &dir.join("base.raw"), "64M");
    let (mut server, port) = serve_overlay(dir);
    let ctl = dir.join("ctl.sock");
    // The guest waits for a connection to this port before it thaws: the snapshot is taken by then.
    let gate = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
    let gate_port = gate.local_addr().expect("gate address").port();

    let scenario = format!(
        r#"
nbd-client 10.0.2.2 {port} /dev/nbd0 -N disk
mount -t ext4 /dev/nbd0 /mnt
dd if=/dev/urandom of=/mnt/before.bin bs=1M count=2 2>/dev/null
echo "SUM $(md5sum /mnt/before.bin)"
fsfreeze --freeze /mnt
echo COWDISK-SNAPSHOT-NOW
until nc 10.0.2.2 {gate_port} </dev/null; do sleep 0.2; done
fsfreeze --unfreeze /mnt
dd if=/dev/urandom of=/mnt/before.bin bs=4096 seek=7 count=2 conv=notrunc 2>/dev/null
dd if=/dev/urandom of=/mnt/after.bin bs=1M count=2 2>/dev/null
sync
for f in before.bin after.bin; do echo "SUM $(md5sum /mnt/$f)"; done
umount /mnt
nbd-client -d /dev/nbd0
"#
    );
    let (dir_for_cue, ctl_for_cue) = (dir.to_path_buf(), ctl.clone());
    let mut snapped = false;
    let t = boot(&kit, dir, &scenario, |line| {
        if line.trim() == "COWDISK-SNAPSHOT-NOW" && !snapped {
            ok_in(&dir_for_cue, &["snapshot", "disk.cow", "snap.cow", "--control", s(&ctl_for_cue)]);
            snapped = true;
            // One connection tells the guest; busybox nc closes it at once.
            gate.set_nonblocking(true).expect("non-blocking gate");
            let knocked = wait_until(Duration::from_secs(120), || gate.accept().is_ok());
            assert!(knocked, "the guest did not knock within 120 s of the snapshot");
        }
    });
    assert!(snapped, "the guest never asked for the snapshot:\n{}", t.text());
    let sums = t.sums();
    assert_eq!(sums.len(), 3, "{}", t.text());
    assert!(server.is_running(), "the server stopped under the kernel client:\n{}", server.log());
    assert!(server.stop().success(), "the server did not stop cleanly");
    ok_in(dir, &["check", "disk.cow", "--chain", "--deep"]);

    ok_in(dir, &["flatten", "snap.cow", "--output", "snap.raw", "--format", "raw"]);
    let before: HashMap<String, String> = [sums[0].clone()].into_iter().collect();
    check_fs(&dir.join("snap.raw"), &before, &["after.bin"]);
    ok_in(dir, &["flatten", "disk.cow", "--output", "live.raw", "--format", "raw"]);
    let live: HashMap<String, String> = sums[1..].iter().cloned().collect();
    assert_ne!(live["before.bin"], sums[0].1, "the rewrite after the snapshot changed nothing");
    check_fs(&dir.join("live.raw"), &live, &[]);
}
