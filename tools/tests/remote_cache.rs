//! Remote layers read through the shared chunk cache (issue 16), through the `cowdisk` binary
//! against a real Ceph RGW: the cache's bound under two processes, warm and shared reads fetching
//! once, a broken cache (reads go on uncached, memory stays flat), two hosts on one layer, the
//! gateway stopped and back, a killed reader, a process stopped while it holds the cache's lock
//! or chunks' claims, a cache directory on a file system that cannot punch holes (traces:
//! remote_trace.rs).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nbdclient::NbdClient;
use common::remote::*;
use common::s3::{s3, Ceph};
use common::*;

fn overlay_servers(repo: &Repo, ws: &TempDir, cache: &Path, n: usize, extra: &[&str]) -> Vec<Server> {
    (0..n)
        .map(|i| {
            let top = ws.join(format!("top{i}.cow"));
            run(&mut repo.cow(cache, &["create", p(&top), "--backing", &repo.layer("b")]));
            let sock = ws.join(format!("s{i}.sock"));
            let mut args = vec![p(&top), "--socket", p(&sock)];
            args.extend_from_slice(extra);
            repo.server(cache, &args)
        })
        .collect()
}

/// Copies every server's export out at once (to `ws/readI.raw`), within scope `sc`.
fn copy_all_at_once<'s>(sc: &'s std::thread::Scope<'s, '_>, servers: &'s [Server], ws: &'s TempDir) {
    let copies: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| sc.spawn(move || copy_out(server, &ws.join(format!("read{i}.raw")))))
        .collect();
    for c in copies {
        c.join().expect("copy");
    }
}

#[test]
fn the_cache_stays_within_its_bound_while_two_processes_read_more_than_it_holds() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let cache = ws.subdir("cache");
    repo.push_base(&ws, &cache, random_bytes(24 << 20, 61), &[]);
    // Two servers on one host (one cache), each reading an overlay of its own at once: the
    // bound is the cache's, not each process's.
    let reader = ws.subdir("reader-cache");
    let bound: u64 = 4 << 20;
    let servers = overlay_servers(&repo, &ws, &reader, 2, &["--cache-size", "4M"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let most = std::thread::scope(|sc| {
        let watcher = sc.spawn(|| {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(cached_bytes(&reader));
                std::thread::sleep(Duration::from_millis(5));
            }
            most.max(cached_bytes(&reader))
        });
        copy_all_at_once(sc, &servers, &ws);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().expect("watcher")
    });
    for server in servers {
        server.stop();
    }
    for i in 0..2 {
        assert_files_equal(&ws.join(format!("read{i}.raw")), &ws.join("base.raw"));
    }
    // Never past the bound, watched as allocated bytes every 5 ms (64 KiB of slack for the
    // `.usage` file's block). With a count per process it reached 5.1 to 7.0 MiB here.
    assert!(most <= bound + (64 << 10), "the cache reached {most} bytes with a bound of {bound}");
    let kept = cached_bytes(&reader);
    assert!(kept <= bound, "the cache holds {kept} bytes after the reads, bound {bound}");
    assert!(kept >= bound / 2, "the cache kept only {kept} bytes");
}

/// A cache on a file system that cannot punch holes (exFAT, through FUSE: the kernel here has
/// no FAT or exFAT) keeps its bound: such a file system has no sparse files, so a layer's chunk
/// file would take the space up to its last chunk, and eviction (zeros written) would free
/// nothing. Before 2026-12-04 one read of a 24 MiB layer with a 4 MiB bound left 24 MiB there.
/// Now no layer is taken there: reads go to the store, every byte still right, and the server
/// says why.
#[test]
fn a_cache_on_a_file_system_without_hole_punching_keeps_its_bound() {
    let Some(s3) = s3() else { return };
    if !(require_tools(&["nbdcopy", "mkfs.exfat", "mount.exfat-fuse"]) && require_loop_mount()) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    repo.push_base(&ws, &ws.subdir("cache"), random_bytes(24 << 20, 67), &[]);
    let (mount, loopdev) = exfat_mount(ws.path(), 128 << 20);
    let cache = mount.path().join("cache");
    let bound: u64 = 4 << 20;
    let mut servers = overlay_servers(&repo, &ws, &cache, 1, &["--cache-size", "4M"]);
    std::thread::scope(|sc| copy_all_at_once(sc, &servers, &ws));
    let mut server = servers.remove(0);
    server.daemon().terminate(STOP_TIMEOUT);
    assert_files_equal(&ws.join("read0.raw"), &ws.join("base.raw"));
    let kept = cached_bytes(&cache);
    assert!(kept <= bound, "the cache on exFAT takes {kept} bytes with a bound of {bound}");
    let log = server.log();
    assert!(log.contains("cannot punch holes"), "the server does not say why it reads uncached:\n{log}");
    drop(server);
    drop(mount);
    drop(loopdev);
}

/// A cache bound of a few fetch windows or less: what a miss fetches beyond the read is kept
/// to an eighth of the bound, so what comes along is still cached when it is read. Before
/// 2026-12-04 each miss fetched a 512 KiB window, the fills that followed evicted it before it
/// was read, and one copy of a 16 MiB layer through a 64K cache fetched about 4 times the
/// layer (a review measured 171 MiB for a 40 MiB layer).
#[test]
fn a_small_cache_fetches_each_chunk_about_once() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let size: u64 = 16 << 20;
    repo.push_base(&ws, &ws.subdir("cache"), random_bytes(size as usize, 73), &[]);
    for bound in ["64K", "1M"] {
        let here = TempDir::for_test();
        let cache = here.subdir("cache");
        let mut servers = overlay_servers(&repo, &here, &cache, 1, &["--cache-size", bound]);
        std::thread::scope(|sc| copy_all_at_once(sc, &servers, &here));
        let mut server = servers.remove(0);
        server.daemon().terminate(STOP_TIMEOUT);
        assert_files_equal(&here.join("read0.raw"), &ws.join("base.raw"));
        let fetched = fetched_bytes(&server.log());
        assert!(fetched >= size, "{bound}: fetched {fetched} bytes of a {size}-byte layer");
        assert!(fetched <= size + size / 10, "{bound}: fetched {fetched} bytes for one read of a {size}-byte layer");
    }
}

#[test]
fn a_warm_sequential_read_fetches_nothing_beyond_what_it_reads() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("cache"), random_bytes(8 << 20, 71), &[]);
    let cache = ws.subdir("reader-cache");
    // A first process reads the first 2 MiB in order: it fetches them, and ahead of them.
    let read_in_order = |server: &Server, chunks: usize| {
        let mut c = client(server);
        for i in 0..chunks {
            let got = c.read((i * CHUNK) as u64, CHUNK as u32).expect("read");
            assert_bytes_eq(&got, &data[i * CHUNK..(i + 1) * CHUNK], &format!("chunk {i}"));
        }
        c.disconnect().ok();
    };
    let mut lazy = overlay_servers(&repo, &ws, &cache, 1, &["--no-prefetch"]).remove(0);
    read_in_order(&lazy, 32);
    lazy.daemon().terminate(STOP_TIMEOUT);
    assert!(fetched_bytes(&lazy.log()) >= 2 << 20);
    let held = cached_entries(&cache);
    let prefix = held.iter().enumerate().take_while(|&(k, &i)| k == i).count();
    assert!(prefix >= 32, "the first reader's chunks are cached: {held:?}");
    // A second process reads everything the cache holds from the start, in order: all of it
    // is there, so it makes no request (reading ahead past it would fetch chunks nobody read).
    let ws2 = TempDir::for_test();
    let mut warm = overlay_servers(&repo, &ws2, &cache, 1, &["--no-prefetch"]).remove(0);
    read_in_order(&warm, prefix);
    warm.daemon().terminate(STOP_TIMEOUT);
    assert_eq!(fetched_bytes(&warm.log()), 0, "a warm read of {prefix} cached chunks fetched");
    assert_eq!(cached_entries(&cache), held);
}

#[test]
fn two_processes_reading_one_layer_at_once_fetch_it_once() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let layer_bytes = 24u64 << 20;
    repo.push_base(&ws, &ws.subdir("cache"), random_bytes(layer_bytes as usize, 67), &[]);
    let reader = ws.subdir("reader-cache");
    let servers = overlay_servers(&repo, &ws, &reader, 2, &[]);
    std::thread::scope(|sc| copy_all_at_once(sc, &servers, &ws));
    let mut fetched = 0;
    for mut server in servers {
        server.daemon().terminate(STOP_TIMEOUT);
        fetched += fetched_bytes(&server.log());
    }
    for i in 0..2 {
        assert_files_equal(&ws.join(format!("read{i}.raw")), &ws.join("base.raw"));
    }
    // Random data does not compress: the layer is about 24 MiB in the store. Each process
    // fetching for itself fetched most of it twice.
    assert!(fetched <= layer_bytes * 5 / 4, "two readers fetched {fetched} bytes of a {layer_bytes}-byte layer");
}

/// Breaks the cache at `cache` for every process using it: a directory where its lock file
/// goes, so that nothing can lock it (publish, a layer's first open) from now on.
fn break_cache_lock(cache: &Path) {
    let lock = cache.join(".lock");
    if lock.exists() {
        std::fs::remove_file(&lock).expect("remove the cache's lock file");
    }
    std::fs::create_dir(&lock).expect("a directory where the cache's lock file goes");
}

/// A process whose fills cannot be published (its cache directory broken: here the lock
/// file replaced by a directory) does not hold up another process reading the same chunks:
/// its claims end with the failed publish. Before, the other process waited out the 30 s
/// claim limit for every chunk.
#[test]
fn a_failing_publish_does_not_hold_another_process_reading_the_same_chunks() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 4, 81), &[]);
    let cache = ws.subdir("reader-cache");
    let servers = overlay_servers(&repo, &ws, &cache, 2, &["--no-prefetch"]);
    // Each server reads the last chunk, so both have the layer open in the cache; from then
    // on no publish can lock the cache.
    let (mut first, mut second) = (client(&servers[0]), client(&servers[1]));
    for c in [&mut first, &mut second] {
        assert_bytes_eq(&c.read((3 * CHUNK) as u64, CHUNK as u32).expect("read"), &data[3 * CHUNK..], "chunk 3");
    }
    std::thread::sleep(Duration::from_millis(200));
    break_cache_lock(&cache);
    for i in 0..3 {
        let got = first.read((i * CHUNK) as u64, CHUNK as u32).expect("first reader");
        assert_bytes_eq(&got, &data[i * CHUNK..(i + 1) * CHUNK], &format!("first reader, chunk {i}"));
    }
    // The first server's publisher has run and failed by now (it runs within 20 ms).
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    for i in 0..3 {
        let got = second.read((i * CHUNK) as u64, CHUNK as u32).expect("second reader");
        assert_bytes_eq(&got, &data[i * CHUNK..(i + 1) * CHUNK], &format!("second reader, chunk {i}"));
    }
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(15), "the second reader waited {waited:?} for claims of a failed publish");
    drop((first, second));
    for s in servers {
        s.stop();
    }
}

/// Another process that holds the cache's lock file and does not let go (stopped with ^Z or
/// SIGSTOP in the middle of a publish, a frozen container) does not stop reads: a read that
/// needs the lock waits for it at most 5 s, then goes to the store uncached, and so do the
/// reads after it without waiting again. Before, every reader thread of every process on the
/// cache waited for the lock as long as it was held (a review found a server whose 16 threads
/// all waited on a stopped `cowdisk pull`).
#[test]
fn a_process_that_holds_the_cache_lock_and_stops_does_not_stop_reads() {
    use std::os::fd::AsRawFd;
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 8, 87), &[]);
    let cache = ws.subdir("reader-cache");
    let server = overlay_servers(&repo, &ws, &cache, 1, &["--no-prefetch"]).remove(0);
    // The lock as a stopped holder keeps it: taken by this test and held.
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(cache.join(".lock"));
    let lock = lock.expect("open the cache's lock file");
    // SAFETY: flock on a descriptor this test holds; released when the file closes.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0, "lock the cache");
    let waited = match read_in_turn(client(&server), 0..8, &data, Duration::from_secs(30)) {
        Ok(t) => t,
        Err(i) => {
            drop(lock);
            panic!("read {i} still waits for the cache's lock after 30 s");
        }
    };
    assert!(waited < Duration::from_secs(15), "eight reads took {waited:?} beside a stuck lock holder");
    drop(lock);
    server.stop();
}

/// Reads chunks `chunks` one at a time through `c`, in a thread of its own, each checked
/// against `data`: how long they took in all, or the first read that `each` passed without an
/// answer (which is left waiting).
fn read_in_turn(
    mut c: NbdClient<std::os::unix::net::UnixStream>,
    chunks: std::ops::Range<usize>,
    data: &[u8],
    each: Duration,
) -> Result<Duration, usize> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = chunks.clone();
    let reader = std::thread::spawn(move || {
        let t = Instant::now();
        for i in wanted {
            let got = c.read((i * CHUNK) as u64, CHUNK as u32);
            let _ = tx.send((i, got, t.elapsed()));
        }
    });
    let mut took = Duration::ZERO;
    for i in chunks {
        let Ok((j, got, at)) = rx.recv_timeout(each) else { return Err(i) };
        assert_bytes_eq(&got.expect("read"), &data[j * CHUNK..(j + 1) * CHUNK], &format!("chunk {j}"));
        took = at;
    }
    reader.join().expect("reader");
    Ok(took)
}

/// A process that stops while it fetches chunks (^Z, SIGSTOP, a frozen container) holds their
/// claims in the cache's index for as long as it is stopped. A reader in another process waits
/// for such a claim at most 30 s, then fetches the chunk itself; a review found it waited 30 s
/// again for every other chunk the stopped process held (a pull holds up to 64). Now it waits
/// once: later chunks that process still holds are fetched at once. (This test plays the
/// stopped process: it holds open file description locks on the chunks' records.)
#[test]
fn a_process_stopped_while_fetching_costs_a_reader_one_wait_not_one_per_chunk() {
    use std::os::fd::AsRawFd;
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 6, 93), &[]);
    let cache = ws.subdir("reader-cache");
    let server = overlay_servers(&repo, &ws, &cache, 1, &["--no-prefetch"]).remove(0);
    // A read of the last chunk makes the layer's index in the cache (and fetches no other).
    let mut c = client(&server);
    assert_bytes_eq(&c.read((5 * CHUNK) as u64, CHUNK as u32).expect("read"), &data[5 * CHUNK..], "chunk 5");
    let index: Vec<PathBuf> = std::fs::read_dir(cache.join("layers"))
        .expect("the cache's layers")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "index"))
        .collect();
    assert_eq!(index.len(), 1, "one layer's index in the cache: {index:?}");
    let held = std::fs::OpenOptions::new().read(true).write(true).open(&index[0]).expect("open the index");
    for i in 0..5i64 {
        // SAFETY: flock is plain data; zeroed is a valid value for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // The records: 32 bytes each after a 64-byte header (src/remote/index.rs).
        fl.l_start = 64 + i * 32;
        fl.l_len = 32;
        // SAFETY: a lock on a descriptor this test holds; released when it closes.
        assert_eq!(unsafe { libc::fcntl(held.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) }, 0, "claim entry {i}");
    }
    let took = match read_in_turn(c, 0..5, &data, Duration::from_secs(50)) {
        Ok(t) => t,
        Err(i) => {
            drop(held);
            panic!("read {i} still waits after 50 s: a wait for each chunk the stopped process holds");
        }
    };
    assert!(took < Duration::from_secs(45), "five reads took {took:?} beside a stopped process");
    drop(held);
    server.stop();
}

/// A cache directory that cannot be made (a read-only file system: here a path under /proc)
/// costs requests, not commands: `ls` lists the repository, an overlay on a layer is created
/// and served, and its reads go to the store uncached. Before, each of them failed with
/// "create cache directory", though the README promised reads uncached.
#[test]
fn a_cache_directory_that_cannot_be_made_costs_requests_not_commands() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 2, 89), &[]);
    let nowhere = Path::new("/proc/cowdisk-no-cache");
    assert!(std::fs::create_dir_all(nowhere).is_err(), "{} could be made", nowhere.display());
    let listed = stdout_of(&run(&mut repo.cow(nowhere, &["ls", &repo.url()])));
    assert!(listed.contains('b'), "the tag is not listed:\n{listed}");
    let server = overlay_servers(&repo, &ws, nowhere, 1, &["--no-prefetch"]).remove(0);
    let mut c = client(&server);
    assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &data, "the layer, read uncached");
    drop(c);
    server.stop();
}

/// A cache that cannot take a layer (its directory broken before the first read: here the lock
/// file replaced by a directory) does not make the layer unreadable: reads go to the store,
/// uncached, and the server says so as it happens and when it stops (in its `--log` file,
/// where its messages after startup go). Before, every read failed with EIO. Once the
/// directory is mended, the next try (10 s on) takes the layer again.
#[test]
fn a_layer_reads_uncached_when_the_cache_cannot_take_it_and_cached_once_it_is_mended() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(CHUNK * 8, 85), &[]);
    let cache = ws.subdir("reader-cache");
    break_cache_lock(&cache);
    let log = ws.join("server.log");
    let mut server = overlay_servers(&repo, &ws, &cache, 1, &["--log", p(&log)]).remove(0);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut c = client(&server);
    for round in 0..2 {
        assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &data, &format!("round {round}"));
    }
    c.write(1000, &[7u8; 5000]).expect("a write to the overlay");
    let mut want = data.clone();
    want[1000..6000].fill(7);
    assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &want, "after the write");
    let told = "the cache cannot take remote layers";
    assert_eq!(said().matches(told).count(), 1, "told once, while serving:\n{}", said());
    assert!(!cache.join("layers").exists() || du(&cache.join("layers")) == 0, "the broken cache kept chunks");

    std::fs::remove_dir(cache.join(".lock")).expect("mend the cache directory");
    std::thread::sleep(Duration::from_millis(10_500));
    assert_bytes_eq(&c.read(0, data.len() as u32).expect("read"), &want, "after the mend");
    assert!(
        wait_until(Duration::from_secs(10), || cache.join("layers").exists() && du(&cache.join("layers")) > 0),
        "the mended cache keeps the chunks read"
    );
    assert!(said().contains("the cache takes remote layers again"), "{}", said());
    drop(c);
    server.daemon().terminate(STOP_TIMEOUT);
    assert!(said().contains("went to the store uncached: the cache failed"), "{}", said());
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|k| k.trim().parse::<u64>().ok()).expect("VmRSS") << 10
}

/// Fills that cannot be published (the cache directory broken, as above) are not held for
/// another try: reading a whole 48 MiB layer through such a cache grows the server by what
/// its reads need (16 MiB measured), not by the layer. Held, they piled up: 60 MiB measured.
#[test]
fn fills_a_broken_cache_cannot_keep_do_not_pile_up_in_memory() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let size = 48 << 20;
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), random_bytes(size, 83), &[]);
    let cache = ws.subdir("reader-cache");
    let top = ws.join("top.cow");
    run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
    // A bound of 8 MiB: fills are published once 1 MiB of them wait.
    let sock = ws.join("s.sock");
    let args = [p(&top), "--socket", p(&sock), "--no-prefetch"];
    let mut server = repo.server_env(&cache, &args, &[("COWDISK_CACHE_SIZE", "8M")]);
    let mut c = client(&server);
    assert_bytes_eq(&c.read(0, CHUNK as u32).expect("read"), &data[..CHUNK], "chunk 0");
    std::thread::sleep(Duration::from_millis(200));
    break_cache_lock(&cache);
    let pid = server.daemon().pid();
    let before = rss(pid);
    for off in (0..size).step_by(4 << 20) {
        let got = c.read(off as u64, 4 << 20).expect("read");
        assert_bytes_eq(&got, &data[off..off + (4 << 20)], &format!("at {off}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let grown = rss(pid).saturating_sub(before);
    assert!(grown < 32 << 20, "reading a {size}-byte layer through a broken cache grew the server by {grown} bytes");
    drop(c);
    server.stop();
}

#[test]
fn two_hosts_on_one_layer_each_read_their_own_writes() {
    let Some(s3) = s3() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push-cache"), holed(4, 71), &[]);
    let hosts: Vec<(PathBuf, PathBuf, Vec<u8>)> = (0..2)
        .map(|h| {
            let cache = ws.subdir(format!("host{h}/cache"));
            let top = ws.join(format!("host{h}/top.cow"));
            run(&mut repo.cow(&cache, &["create", p(&top), "--backing", &repo.layer("b")]));
            (cache, top, random_bytes(3 * CHUNK, 72 + h))
        })
        .collect();
    let servers: Vec<Server> = hosts
        .iter()
        .enumerate()
        .map(|(h, (cache, top, _))| repo.server(cache, &[p(top), "--socket", p(&ws.join(format!("s{h}.sock")))]))
        .collect();
    let off = (1 << 20) + 1000;
    for (s, (_, _, mine)) in servers.iter().zip(&hosts) {
        client(s).write(off, mine).expect("write");
    }
    for (h, (s, (cache, _, mine))) in servers.iter().zip(&hosts).enumerate() {
        let mut c = client(s);
        assert_bytes_eq(&c.read(off, mine.len() as u32).expect("read"), mine, &format!("host {h}'s own write"));
        let whole = c.read(0, data.len() as u32).expect("read all");
        let mut want = data.clone();
        want[off as usize..off as usize + mine.len()].copy_from_slice(mine);
        assert_bytes_eq(&whole, &want, &format!("host {h}'s device"));
        assert!(du(cache) > 0, "host {h} fetched nothing into its cache");
    }
    for s in servers {
        s.stop();
    }
}

#[test]
fn a_stopped_gateway_gives_eio_then_reads_resume_without_a_restart() {
    let Some(ceph) = Ceph::start() else { return };
    let ws = TempDir::for_test();
    let repo = Repo::new(ceph.s3());
    let cache = ws.subdir("cache");
    let data = repo.push_base(&ws, &cache, random_bytes(4 << 20, 81), &[]);
    let top = ws.join("top.cow");
    let host = ws.subdir("host");
    run(&mut repo.cow(&host, &["create", p(&top), "--backing", &repo.layer("b")]));
    let env: Vec<(&str, String)> = repo
        .s3
        .env()
        .into_iter()
        .chain([
            ("COWDISK_CACHE_DIR", host.display().to_string()),
            ("COWDISK_S3_RETRIES", "2".into()),
            ("COWDISK_S3_RETRY_TIMEOUT", "4".into()),
            ("COWDISK_S3_TIMEOUT", "2".into()),
        ])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with_env(&[p(&top), "--socket", p(&ws.join("s.sock"))], &env);
    let mut c = client(&server);
    let half = data.len() / 2;
    assert_bytes_eq(&c.read(0, half as u32).expect("read the first half"), &data[..half], "first half");

    let said = ceph.rgw_stop();
    assert!(said.contains("stopped rgw"), "{said}");
    // Far from the first half: read-ahead has not fetched it.
    let far = data.len() - CHUNK;
    let t = Instant::now();
    let r = c.read(far as u64, CHUNK as u32);
    let e = r.expect_err("a read of an uncached chunk with the gateway stopped succeeded");
    assert!(e.to_string().contains("EIO"), "the client saw {e}");
    assert!(t.elapsed() < Duration::from_secs(20), "the failed read took {:?}", t.elapsed());
    // Cached and local data keep being served, and the overlay takes writes.
    assert_bytes_eq(&c.read(0, half as u32).expect("cached read"), &data[..half], "cached half, gateway down");
    let mine = random_bytes(CHUNK, 82);
    c.write(0, &mine).expect("write with the gateway down");
    assert_bytes_eq(&c.read(0, CHUNK as u32).expect("read back"), &mine, "own write, gateway down");
    assert!(server.is_running(), "the server died with the gateway");

    let said = ceph.rgw_start();
    assert!(said.contains("S3 answers"), "{said}");
    let rest = c.read(half as u64, half as u32).expect("the second half once the gateway is back");
    assert_bytes_eq(&rest, &data[half..], "second half after the outage");
    c.disconnect().ok();
    server.stop();
}

#[test]
fn processes_share_one_cache_and_a_killed_reader_leaves_it_sound() {
    let Some(s3) = s3() else { return };
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let ws = TempDir::for_test();
    let repo = Repo::new(s3);
    let data = repo.push_base(&ws, &ws.subdir("push"), random_bytes(16 << 20, 101), &[]);
    let shared = ws.subdir("host-cache");

    // A reader killed with -9 in the middle of filling the cache.
    run(&mut repo.cow(&shared, &["create", p(&ws.join("k.cow")), "--backing", &repo.layer("b")]));
    let mut killed = repo.server(&shared, &[p(&ws.join("k.cow")), "--socket", p(&ws.join("k.sock"))]);
    let uri = killed.uri("");
    let mut copy = tool("nbdcopy")
        .arg(&uri)
        .arg(ws.join("partial.raw"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nbdcopy");
    assert!(wait_until(Duration::from_secs(20), || cached_chunks(&shared) >= 40), "nothing was cached");
    killed.kill9();
    let _ = copy.wait();

    // Two servers of two overlays, one cache, reading everything at once.
    let servers: Vec<Server> = (0..2)
        .map(|i| {
            let top = ws.join(format!("t{i}.cow"));
            run(&mut repo.cow(&shared, &["create", p(&top), "--backing", &repo.layer("b")]));
            repo.server(&shared, &[p(&top), "--socket", p(&ws.join(format!("t{i}.sock")))])
        })
        .collect();
    let outs: Vec<PathBuf> = (0..2).map(|i| ws.join(format!("out{i}.raw"))).collect();
    std::thread::scope(|sc| {
        for (s, o) in servers.iter().zip(&outs) {
            sc.spawn(move || copy_out(s, o));
        }
    });
    for o in &outs {
        assert_files_equal(o, &ws.join("base.raw"));
    }
    // Each chunk is kept once, whoever fetched it.
    assert_eq!(cached_chunks(&shared), data.len() / CHUNK, "chunk files in the shared cache");
    for s in servers {
        s.stop();
    }
}
