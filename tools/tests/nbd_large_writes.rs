//! Large NBD writes, whose payload `cowdisk serve` moves from the socket into the image while it arrives (splice): pipelined among small writes, at offsets that split chunks and blocks, over a raw base, with data checksums, over TCP, refused, and followed by a clean `cowdisk check`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::nbdclient::*;
use common::nbdtest::*;
use common::*;

const SIZE: u64 = 16 * MIB;
/// The raw base ends inside a chunk and inside a block.
const BASE_LEN: u64 = 6 * MIB + 12345;

/// Non-overlapping (offset, length) writes: whole chunks, chunks split at both ends, blocks
/// split at both ends, across the end of the base, up to the end of the device, and small
/// ones between them (which the server reads whole before running).
const WRITES: &[(u64, u64)] = &[
    (0, 128 * KIB),
    (200 * KIB + 17, 128 * KIB + 1),
    (512 * KIB - 100, 100),
    (MIB + 3 * 4096 + 5, MIB + 4095),
    (3 * MIB, 3 * MIB),
    (6 * MIB + 1000, 2 * MIB),
    (8 * MIB + 3 * 64 * KIB + 512, 4096),
    (9 * MIB - 1, 129 * KIB),
    (10 * MIB, 4 * MIB + 65536),
    (SIZE - 300 * KIB, 300 * KIB),
];

struct Rig {
    // Declared first so the server stops before the directory is removed.
    server: Option<Server>,
    base: Vec<u8>,
    images: Vec<PathBuf>,
    port: u16,
    dir: TempDir,
}

/// Two overlays on one raw base, served on a Unix socket and on TCP: "plain", and "sums"
/// with data checksums (every write assembled block by block in memory).
fn rig(extra: &[&str]) -> Rig {
    let dir = TempDir::for_test();
    let base_path = dir.join("base.raw");
    write_random_file(&base_path, BASE_LEN, 0xba5e);
    let base = std::fs::read(&base_path).expect("read base");
    let mut images = Vec::new();
    for (name, opts) in [("plain.cow", &[][..]), ("sums.cow", &["--data-checksums"][..])] {
        let p = dir.join(name);
        run(Command::new(cowdisk_bin())
            .arg("create")
            .arg(&p)
            .arg("--backing")
            .arg(&base_path)
            .args(["--backing-format", "raw", "--size", "16M"])
            .args(opts));
        images.push(p);
    }
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let listen = format!("127.0.0.1:{port}");
    let mut args: Vec<&str> = images.iter().map(|p| path_str(p)).collect();
    let sock = dir.join("nbd.sock");
    args.extend(["--socket", path_str(&sock), "--listen", &listen]);
    args.extend_from_slice(extra);
    let server = Some(Server::start(&args));
    Rig { server, base, images, port, dir }
}

impl Rig {
    fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    fn tcp_client(&self, name: &str) -> NbdClient<std::net::TcpStream> {
        let mut c = NbdClient::connect_tcp(("127.0.0.1", self.port)).expect("connect over TCP");
        c.opt_go(name, &[]).expect("NBD_OPT_GO over TCP");
        c
    }

    /// What the device read before any write: the base, then zeros.
    fn initial(&self) -> Vec<u8> {
        let mut m = self.base.clone();
        m.resize(SIZE as usize, 0);
        m
    }

    /// Stops the server and checks every image: a spliced write leaves consistent metadata.
    fn stop_and_check(mut self) {
        let status = self.server.take().expect("server running").stop();
        assert!(status.success(), "server exit: {status}");
        for img in &self.images {
            let out = run_status(Command::new(cowdisk_bin()).arg("check").arg("--deep").arg(img));
            assert!(out.status.success(), "cowdisk check --deep {}: {}", img.display(), stdout_of(&out));
        }
        drop(self.dir);
    }
}

fn payload(i: usize, len: u64) -> Vec<u8> {
    random_bytes(len as usize, 0x1a7e + i as u64)
}

/// Sends every write of WRITES in one pipelined batch, checks each is acknowledged once and
/// without error, and returns the device as it must now read.
fn write_batch<S: NbdStream + Send + 'static>(c: &mut NbdClient<S>, mut model: Vec<u8>, what: &str) -> Vec<u8> {
    let reqs = WRITES
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| Req::new(NBD_CMD_WRITE, 0x100 + i as u64, off, len as u32, payload(i, len)))
        .collect();
    let sender = send_batch(c, reqs);
    let mut seen = Vec::new();
    for _ in WRITES {
        let r = c.read_response().expect("reply");
        assert!(r.is_ok(), "{what}: write with cookie {:#x} failed: error {}", r.cookie, r.error);
        seen.push(r.cookie);
    }
    sender.join().expect("sender thread").expect("send the batch");
    seen.sort_unstable();
    assert_eq!(seen, (0..WRITES.len() as u64).map(|i| 0x100 + i).collect::<Vec<_>>(), "{what}: one reply per write");
    for (i, &(off, len)) in WRITES.iter().enumerate() {
        model[off as usize..(off + len) as usize].copy_from_slice(&payload(i, len));
    }
    model
}

fn assert_device_reads<S: NbdStream>(c: &mut NbdClient<S>, model: &[u8], what: &str) {
    let step = 4 * MIB;
    for at in (0..SIZE).step_by(step as usize) {
        let got = c.read(at, step as u32).expect("read back");
        assert_bytes_eq(&got, &model[at as usize..(at + step) as usize], &format!("{what}: 4 MiB at {at}"));
    }
}

#[test]
fn the_writes_do_not_overlap_and_stay_inside_the_device() {
    let mut sorted = WRITES.to_vec();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "{:?} overlaps {:?}", w[0], w[1]);
    }
    let last = sorted[sorted.len() - 1];
    assert!(last.0 + last.1 <= SIZE);
}

#[test]
fn pipelined_large_and_small_writes_read_back_exactly_over_unix_and_tcp_with_and_without_checksums() {
    let rig = rig(&[]);
    let mut model_plain = rig.initial();
    let mut model_sums = rig.initial();
    for name in ["plain", "sums"] {
        let model = if name == "plain" { &mut model_plain } else { &mut model_sums };
        let mut c = simple_client(rig.server(), name);
        assert_device_reads(&mut c, model, &format!("{name} before writing"));
        *model = write_batch(&mut c, std::mem::take(model), &format!("{name} over Unix"));
        assert_device_reads(&mut c, model, &format!("{name} after writes over Unix"));
        // The same ranges again over TCP: now rewrites of slots that exist.
        let mut t = rig.tcp_client(name);
        let again: Vec<u8> = model.iter().map(|b| b ^ 0x5a).collect();
        *model = write_batch(&mut t, again, &format!("{name} over TCP"));
        // Only the written ranges change; the XOR above survives nowhere else.
        let mut expect = model.clone();
        let before = rig.initial();
        let mut covered = vec![false; SIZE as usize];
        for &(off, len) in WRITES {
            covered[off as usize..(off + len) as usize].fill(true);
        }
        for (i, b) in expect.iter_mut().enumerate() {
            if !covered[i] {
                *b = before[i];
            }
        }
        *model = expect;
        assert_device_reads(&mut t, model, &format!("{name} after rewrites over TCP"));
        assert_device_reads(&mut c, model, &format!("{name} read over Unix after TCP rewrites"));
    }
    rig.stop_and_check();
}

#[test]
fn refused_large_writes_are_drained_and_the_requests_after_them_run() {
    let rig = rig(&[]);
    let mut c = structured_client(rig.server(), "plain");
    let good = random_bytes(MIB as usize + 7, 77);
    let small = random_bytes(5000, 78);
    let mut bad_flags = Req::new(NBD_CMD_WRITE, 2, 2 * MIB, MIB as u32, random_bytes(MIB as usize, 79));
    bad_flags.flags = NBD_CMD_FLAG_DF; // only valid on reads
    let reqs = vec![
        Req::new(NBD_CMD_WRITE, 1, SIZE - MIB / 2, MIB as u32, random_bytes(MIB as usize, 80)),
        bad_flags,
        Req::new(NBD_CMD_WRITE, 3, 5 * MIB + 3, good.len() as u32, good.clone()),
        Req::new(NBD_CMD_WRITE, 4, 100, small.len() as u32, small.clone()),
    ];
    let sender = send_batch(&mut c, reqs);
    let mut errors = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let r = c.read_response().expect("reply");
        errors.insert(r.cookie, r.error);
    }
    sender.join().expect("sender thread").expect("send the batch");
    assert_eq!(errors.get(&1), Some(&NBD_ENOSPC), "1 MiB write past the end: {errors:?}");
    assert_eq!(errors.get(&2), Some(&NBD_EINVAL), "1 MiB write with a read-only flag: {errors:?}");
    assert_eq!(errors.get(&3), Some(&0), "good large write after the refused ones: {errors:?}");
    assert_eq!(errors.get(&4), Some(&0), "small write after them: {errors:?}");
    let mut model = rig.initial();
    model[(5 * MIB + 3) as usize..(5 * MIB + 3) as usize + good.len()].copy_from_slice(&good);
    model[100..100 + small.len()].copy_from_slice(&small);
    assert_device_reads(&mut c, &model, "after refused and accepted large writes");
    drop(c);
    read_only_export_refuses_a_large_write_and_goes_on(rig);
}

/// Stops `rig`'s server and serves its "plain" image read-only: a large write gets EPERM and
/// the connection goes on.
fn read_only_export_refuses_a_large_write_and_goes_on(mut rig: Rig) {
    let status = rig.server.take().expect("server running").stop();
    assert!(status.success(), "server exit: {status}");
    let sock = rig.dir.join("ro.sock");
    let img: &Path = &rig.images[0];
    let ro = serve(&[img], &sock, &["--read-only"]);
    let mut c = simple_client(&ro, "plain");
    let before = c.read(0, 4096).expect("read");
    let big = random_bytes(2 * MIB as usize, 81);
    assert_nbd_error(c.write(0, &big), NBD_EPERM, "2 MiB write to a read-only export");
    assert_eq!(c.read(0, 4096).expect("read after the refused write"), before, "a refused write changes nothing");
    assert!(ro.stop().success());
}

#[test]
fn a_client_stalling_in_the_middle_of_a_large_write_does_not_hold_up_writes_of_another_client() {
    let rig = rig(&[]);
    // 12 MiB at 0: chunks 0..192, three in every lock stripe of the image. More is sent than
    // the server's pipe holds, so the server has had to write some of it before the stall.
    let big = random_bytes(12 * MIB as usize, 90);
    let sent = 10 * MIB as usize;
    let mut a = simple_client(rig.server(), "plain");
    a.send_request(0, NBD_CMD_WRITE, 7, 0, big.len() as u32, &big[..sent]).expect("header and part of the payload");
    // While A's client waits before sending the rest, B writes a chunk in every stripe and
    // flushes; each request must be answered (the client's read timeout would fail it).
    let mut b = simple_client(rig.server(), "plain");
    let mut model = rig.initial();
    for i in 0..64u64 {
        let at = 12 * MIB + i * 64 * KIB;
        let data = random_bytes(64 * KIB as usize, 100 + i);
        b.write(at, &data).unwrap_or_else(|e| panic!("write {i} of the other client while one stalls: {e}"));
        model[at as usize..(at + 64 * KIB) as usize].copy_from_slice(&data);
    }
    b.flush().expect("flush of the other client while one stalls");
    a.send_raw(&big[sent..]).expect("rest of the payload");
    let r = a.wait_response(7).expect("reply to the large write");
    assert!(r.is_ok(), "the large write, once all its bytes came: error {}", r.error);
    model[..big.len()].copy_from_slice(&big);
    assert_device_reads(&mut b, &model, "after both clients' writes");
    drop((a, b));
    rig.stop_and_check();
}

/// The same with chunks larger than the server's pipe holds (2 MiB chunks, the payload sent
/// in 4 KiB pieces, a pipe slot each): the stalled write's chunk waits in memory for its bytes, not under its lock. Until
/// 2026-12-04 it was written from the socket under its lock and the image's copy gate, so a
/// FLUSH on another connection waited for the stalled client, and every write of the export
/// behind the FLUSH (found by a review).
#[test]
fn a_client_stalling_in_a_write_of_chunks_larger_than_the_pipe_holds_up_no_other_client() {
    let dir = TempDir::for_test();
    let img = dir.join("big.cow");
    run(Command::new(cowdisk_bin()).arg("create").arg(&img).args(["--size", "64M", "--chunk-size", "2M"]));
    let server = serve(&[&img], &dir.join("nbd.sock"), &[]);
    let big = random_bytes(4 * MIB as usize, 91);
    // Sent 4 KiB at a time: each piece takes a slot of the server's pipe, so the pipe holds
    // less than a chunk of them.
    let sent = 1900 * KIB as usize;
    let mut a = simple_client(&server, "big");
    a.send_request(0, NBD_CMD_WRITE, 7, 0, big.len() as u32, &big[..4096]).expect("header and a first piece");
    for piece in big[4096..sent].chunks(4096) {
        a.send_raw(piece).expect("a piece of the payload");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut model = vec![0u8; 64 * MIB as usize];
    for (k, at) in [(0u64, 32 * MIB), (1, 6 * MIB + 4096), (2, 40 * MIB + 512)] {
        let mut c = simple_client(&server, "big");
        c.set_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let data = random_bytes(64 * KIB as usize, 200 + k);
        c.write(at, &data).unwrap_or_else(|e| panic!("write {k} of another client while one stalls: {e}"));
        c.flush().unwrap_or_else(|e| panic!("flush {k} of another client while one stalls: {e}"));
        model[at as usize..(at + 64 * KIB) as usize].copy_from_slice(&data);
    }
    a.send_raw(&big[sent..]).expect("rest of the payload");
    let r = a.wait_response(7).expect("reply to the large write");
    assert!(r.is_ok(), "the large write, once all its bytes came: error {}", r.error);
    model[..big.len()].copy_from_slice(&big);
    assert_device_reads(&mut a, &model, "after every client's writes");
    drop(a);
    assert!(server.stop().success());
    let out = run_status(Command::new(cowdisk_bin()).arg("check").arg("--deep").arg(&img));
    assert!(out.status.success(), "cowdisk check --deep: {}", stdout_of(&out));
}
