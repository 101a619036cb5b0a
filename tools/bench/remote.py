#!/usr/bin/env python3
"""The object-store benchmark (issue 16): cold start of an ext4 overlay on a layer in a local
Ceph RGW, and push throughput and deduplication, side by side with their peers in one run.

Cold start: an ext4 base (a real file tree: copies of /usr/share and /usr/bin) is pushed; a
fixed "boot set" of files spread over the tree is read through a mounted overlay (nbdfuse +
loop + mount) with the page cache dropped, for:
  local       cowdisk overlay on the local base file (the reference)
  download    the raw image downloaded whole (same S3 client library), then a local overlay
  nbdkit      nbdkit curl plugin on the image in RGW (public-read object), cache + cow filters
  lazy        cowdisk overlay on the remote layer, empty cache, no prefetch
  trace       the same with the boot's trace recorded beforehand and prefetched at serve start
  warm        cowdisk overlay on the remote layer with the cache the lazy run left
Time runs from starting the server (or the download) to the last byte of the boot set read.
Bytes fetched: the object for download; what the curl plugin read (nbdkit's stats filter);
the chunk bytes that entered cowdisk's cache.

Push: `cowdisk push` of the base to a fresh prefix against one multipart upload of the same
file with the same client library (16 MiB parts, 4 in flight); then ten successive snapshots
of an evolving image, each with 12 MiB of new random data, pushed one after the other: the
bytes they add to the store against the new data they hold.

Writes its section of BENCHMARKS.md (between the remote.sh markers).
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BEGIN = "<!-- remote.sh: begin -->"
END = "<!-- remote.sh: end -->"
MIB = 1 << 20


def sh(*args, **kw):
    """Runs a command, failing loudly; returns its stdout."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, args))}\n{r.stdout}{r.stderr}")
    return r.stdout


def du_bytes(d):
    """The bytes the files under `d` take on disk (the cache's chunk files are sparse)."""
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def drop_caches():
    subprocess.run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_for(cond, timeout, what):
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        # Polled often: the wait is inside the timed start of every variant.
        time.sleep(0.002)


class Mounted:
    """An NBD export mounted as ext4: nbdfuse file, loop device, mount; undone on exit."""

    def __init__(self, uri, work):
        self.work = Path(work)
        self.fuse = self.work / "fuse"
        self.mnt = self.work / "mnt"
        self.fuse.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.loop = None
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(["nbdfuse", str(self.fuse / "disk"), self.uri],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (self.fuse / "disk").exists(), 20, "nbdfuse")
        self.loop = sh("losetup", "-f", "--show", self.fuse / "disk").strip()
        sh("mount", "-o", "noatime", self.loop, self.mnt)
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.mnt)], capture_output=True)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(self.fuse)], capture_output=True)
        if self.proc:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return False


def read_files(root, files):
    n = 0
    for f in files:
        with open(root / f, "rb", buffering=0) as fh:
            while True:
                b = fh.read(1 << 20)
                if not b:
                    break
                n += len(b)
    return n


class Server:
    """A server process on a Unix socket, stopped with SIGTERM."""

    def __init__(self, argv, sock, env=None, log=None):
        self.sock = Path(sock)
        if self.sock.exists():
            self.sock.unlink()
        self.log = open(log or os.devnull, "w")
        self.p = subprocess.Popen([str(a) for a in argv], env=env, stdout=self.log, stderr=self.log)
        wait_for(lambda: self.sock.exists() or self.p.poll() is not None, 30, f"{argv[0]} socket")
        if self.p.poll() is not None:
            self.log.close()
            said = Path(log).read_text() if log else ""
            raise SystemExit(f"{' '.join(map(str, argv))} exited with {self.p.returncode}: {said}")

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


def stats(xs):
    return min(xs), statistics.median(xs), max(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cowdisk", required=True)
    ap.add_argument("--s3bench", required=True)
    ap.add_argument("--dir", default="/var/tmp/cowdisk-bench-remote")
    ap.add_argument("--size", default="1536M", help="ext4 base size (default 1536M)")
    ap.add_argument("--boot-mib", type=int, default=48, help="bytes of files the boot set reads")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pair-rounds", type=int, default=3,
                    help="local/warm pairs measured in each repetition (the warm target's samples)")
    ap.add_argument("--quick", action="store_true", help="a small base, one repetition")
    ap.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.size, a.boot_mib, a.repeat = "384M", 12, 1
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mounts, drop_caches)")
    for t in ["nbdfuse", "losetup", "mkfs.ext4", "nbdkit", "qemu-io", "fusermount3"]:
        if not shutil.which(t):
            raise SystemExit(f"needs {t}")

    work = Path(a.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cow = a.cowdisk
    s3b = a.s3bench
    env = dict(os.environ)
    ceph_dir = None
    if not env.get("S3_ENDPOINT"):
        ceph_dir = work / "ceph"
        sh("bash", REPO / "tools/ceph/start.sh", ceph_dir)
        for line in (ceph_dir / "s3.env").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k] = v
    bucket = env["S3_BUCKET"]
    run_id = f"bench-{int(time.time())}"
    repo = f"s3://{bucket}/{run_id}"
    t_start = time.time()
    rows = {}
    try:
        base, sets, tree_bytes, nfiles = make_base(a, work)
        rows["setup"] = dict(tree_bytes=tree_bytes, files=nfiles, base_bytes=base.stat().st_size,
                             sets={k: (len(v[0]), v[1]) for k, v in sets.items()})
        cold = {k: cold_start(a, work / k, cow, s3b, env, repo, base, files, nbytes)
                for k, (files, nbytes) in sets.items()}
        push = push_bench(a, work, cow, s3b, env, repo, base)
        elapsed = time.time() - t_start
        write_report(a, rows["setup"], cold, push, elapsed, env)
    finally:
        run_key = repo.split("/", 3)[3]
        for suffix in ["", "-image", "-snaps"] + [f"-push{r}" for r in range(a.repeat)] + [f"-up{r}" for r in range(a.repeat)]:
            subprocess.run([s3b, "rm", run_key + suffix], env=env, capture_output=True)
        if ceph_dir:
            subprocess.run(["bash", str(REPO / "tools/ceph/stop.sh"), str(ceph_dir)], capture_output=True)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def make_base(a, work):
    """An ext4 image of a real file tree, and the boot set."""
    tree = work / "tree"
    tree.mkdir()
    sources = ["/usr/share/doc", "/usr/share/locale"] if a.quick else ["/usr/share", "/usr/bin"]
    for src in sources:
        dst = tree / src.strip("/").replace("/", "_")
        # Hard links where /usr is on the same file system (fast, no space); else a copy.
        if subprocess.run(["cp", "-al", src, str(dst)], capture_output=True).returncode != 0:
            shutil.rmtree(dst, ignore_errors=True)
            sh("cp", "-a", src, dst)
    base = work / "base.raw"
    sh("mkfs.ext4", "-q", "-F", "-d", tree, base, a.size)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.stat().st_size > 0)
    sizes = {f: (tree / f).stat().st_size for f in files}
    # The boot set: every 7th file in name order until boot_mib MiB (executables of /usr/bin,
    # read whole, as a start reads its programs and libraries).
    boot, boot_bytes = [], 0
    for f in files[::7]:
        if boot_bytes >= a.boot_mib * MIB:
            break
        boot.append(f)
        boot_bytes += sizes[f]
    # The scattered set: every k-th file of the whole tree, k such that they add up to about
    # boot_mib MiB: mostly small files far apart, the hardest case for lazy reads.
    k = max(1, round(sum(sizes.values()) / (a.boot_mib * MIB)))
    scattered = files[::k]
    sets = {"boot": (boot, boot_bytes), "scattered": (scattered, sum(sizes[f] for f in scattered))}
    shutil.rmtree(tree)
    return base, sets, sum(sizes.values()), len(files)


def parse_nbdkit_read_bytes(stats_file):
    """The bytes the curl plugin read, from the stats filter's `read:` line (e.g. `12.50 MiB`)."""
    units = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for line in Path(stats_file).read_text().splitlines():
        line = line.strip()
        if line.startswith("read:"):
            parts = [p.strip() for p in line[5:].split(",")]
            num, unit = parts[2].split()[:2]
            return int(float(num) * units.get(unit, 1))
    return 0


def fetched_bytes(log):
    """The bytes a cowdisk server fetched from the store, from the line it prints at exit."""
    for line in Path(log).read_text().splitlines():
        if "from object stores" in line and "(" in line:
            return int(line.split("(", 1)[1].split()[0])
    return 0


def cold_start(a, work, cow, s3b, env, repo, base, boot, boot_bytes):
    bucket = env["S3_BUCKET"]
    run_key = repo.split("/", 3)[3]
    key = f"{run_key}-image/base.raw"
    work.mkdir()
    if sh(cow, "ls", repo, "--json", env=env).count('"base"') == 0:
        sh(cow, "push", base, repo, "--tag", "base", env=env)
        sh(s3b, "upload", base, key, "public", env=env)
    url = f"{env['S3_ENDPOINT']}/{bucket}/{key}"
    layer = f"{repo}/base"

    def cache_env(cache):
        e = dict(env)
        e["COWDISK_CACHE_DIR"] = str(cache)
        return e

    def through(server_argv, sock, e, mwork, log):
        """Starts a server, mounts its export, reads the boot set; seconds from the start."""
        t0 = time.time()
        srv = Server(server_argv, sock, env=e, log=log)
        try:
            with Mounted(f"nbd+unix:///?socket={sock}", mwork) as mnt:
                n = read_files(mnt, boot)
            t = time.time() - t0
        finally:
            srv.stop()
        if n != boot_bytes:
            raise SystemExit(f"read {n} bytes of the boot set, expected {boot_bytes}")
        return t

    # The boot's trace, recorded once on a host of its own.
    rec = work / "record"
    rec.mkdir()
    sh(cow, "create", rec / "top.cow", "--backing", layer, env=cache_env(rec / "cache"))
    drop_caches()
    through([cow, "serve", rec / "top.cow", "--socket", rec / "s.sock", "--record-trace"], rec / "s.sock",
            cache_env(rec / "cache"), rec, rec / "serve.log")
    traced = json.loads(sh(cow, "trace", "show", layer, "--json", env=env))["chunks"]

    results = {k: [] for k in ["local", "download", "nbdkit", "lazy", "trace", "warm"]}
    for r in range(a.repeat):
        d = work / f"rep{r}"
        d.mkdir()
        sock = d / "s.sock"
        # download, then a local overlay
        drop_caches()
        t0 = time.time()
        sh(s3b, "download", key, d / "dl.raw", env=env)
        sh(cow, "create", d / "dl.cow", "--backing", d / "dl.raw")
        t = (time.time() - t0) + through([cow, "serve", d / "dl.cow", "--socket", sock], sock, env, d,
                                          d / "dl.log")
        results["download"].append((t, base.stat().st_size, base.stat().st_size))
        (d / "dl.raw").unlink()
        # nbdkit curl + cache + cow
        tmp = d / "nbdkit-tmp"
        tmp.mkdir()
        e = dict(env)
        e["TMPDIR"] = str(tmp)
        sf = d / "nbdkit.stats"
        drop_caches()
        t = through(["nbdkit", "-f", "-U", sock, "--filter=cow", "--filter=cache", "--filter=stats", "curl",
                     f"url={url}", f"statsfile={sf}"], sock, e, d, d / "nbdkit.log")
        nb = parse_nbdkit_read_bytes(sf)
        results["nbdkit"].append((t, nb, nb))
        # cowdisk lazy, no prefetch; then with the trace; then, back to back in alternating
        # order, the local chain and warm (the lazy run's cache): the scratch file system may
        # be mounted with online discard (this machine's is), so the runs just after the
        # download's 1.5 GiB file is deleted share the device with its discards; the two runs
        # compared with each other see the same conditions. Their target is 10%, closer than
        # single runs of one variant repeat here (up to 20% apart), so each repetition
        # measures --pair-rounds pairs, the order alternating from pair to pair, and every
        # run counts.
        pair = [("local", None, []), ("warm", d / "cache-lazy", ["--no-prefetch"])]
        pairs = [x for p in range(a.pair_rounds) for x in (pair if (r + p) % 2 == 0 else pair[::-1])]
        for kind, cache, extra in [("lazy", d / "cache-lazy", ["--no-prefetch"]),
                                   ("trace", d / "cache-trace", [])] + pairs:
            if kind == "local":
                (d / "local.cow").unlink(missing_ok=True)
                sh(cow, "create", d / "local.cow", "--backing", base)
                drop_caches()
                t = through([cow, "serve", d / "local.cow", "--socket", sock], sock, env, d, d / "local.log")
                results["local"].append((t, 0, 0))
                continue
            top = d / f"{kind}.cow"
            top.unlink(missing_ok=True)
            sh(cow, "create", top, "--backing", layer, env=cache_env(cache))
            before = du_bytes(cache)
            drop_caches()
            log = d / f"{kind}.log"
            t = through([cow, "serve", top, "--socket", sock] + extra, sock, cache_env(cache), d, log)
            results[kind].append((t, fetched_bytes(log), du_bytes(cache) - before))
        print(f"cold start, repetition {r + 1}: "
              + ", ".join(f"{k} {v[-1][0]:.2f} s {v[-1][1] / MIB:.1f} MiB" for k, v in results.items()),
              flush=True)
    return dict(results=results, traced_chunks=len(traced))


def push_bench(a, work, cow, s3b, env, repo, base):
    run_key = repo.split("/", 3)[3]
    size = base.stat().st_size
    rows = {"push": [], "upload": []}
    stored = []
    for r in range(a.repeat):
        order = ["push", "upload"] if r % 2 == 0 else ["upload", "push"]
        for kind in order:
            drop_caches()
            t0 = time.time()
            if kind == "push":
                sh(cow, "push", base, f"{repo}-push{r}", env=env)
            else:
                sh(s3b, "upload", base, f"{run_key}-up{r}/base.raw", env=env)
            rows[kind].append(time.time() - t0)
            if kind == "push":
                stored.append(int(sh(s3b, "du", f"{run_key}-push{r}", env=env)))
        # What a repetition stored goes at once: a test cluster's OSD is small, and a full one
        # makes requests hang rather than fail.
        sh(s3b, "rm", f"{run_key}-push{r}", env=env)
        sh(s3b, "rm", f"{run_key}-up{r}", env=env)
        print(f"push, repetition {r + 1}: push {rows['push'][-1]:.2f} s, upload {rows['upload'][-1]:.2f} s",
              flush=True)

    # Ten snapshots of an evolving image.
    ev = work / "evolve"
    ev.mkdir()
    snaps_repo = f"{repo}-snaps"
    sh(cow, "push", base, snaps_repo, env=env)
    top = ev / "top.cow"
    sh(cow, "create", top, "--backing", base)
    rnd = random.Random(16)
    region = 4 * MIB
    added, unique, push_s = [], [], []
    for i in range(1, 11):
        sock = ev / "s.sock"
        srv = Server([cow, "serve", top, "--socket", sock], sock, env=env)
        written = []
        try:
            for _ in range(3):
                f = ev / "rand.bin"
                f.write_bytes(os.urandom(region))
                off = rnd.randrange(0, (size - region) // 4096) * 4096
                sh("qemu-io", "-f", "raw", "-c", f"write -s {f} {off} {region}", f"nbd+unix:///?socket={sock}")
                written.append((off, off + region))
        finally:
            srv.stop()
        # The snapshot's unique data: the union of what was written into it.
        written.sort()
        union, end = 0, 0
        for lo, hi in written:
            lo = max(lo, end)
            if hi > lo:
                union += hi - lo
            end = max(end, hi)
        snap = ev / f"snap{i}.cow"
        sh(cow, "snapshot", top, snap)
        before = int(sh(s3b, "du", f"{run_key}-snaps", env=env))
        t0 = time.time()
        sh(cow, "push", snap, snaps_repo, "--chain", env=env)
        push_s.append(time.time() - t0)
        added.append(int(sh(s3b, "du", f"{run_key}-snaps", env=env)) - before)
        unique.append(union)
    return dict(size=size, rows=rows, stored=stored, added=added, unique=unique, snap_push_s=push_s)


def fmt_s(xs):
    lo, med, hi = stats(xs)
    return f"{lo:.2f} / **{med:.2f}** / {hi:.2f}"


def human(n):
    for unit, f in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]:
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


NAMES = {
    "local": "local chain (overlay on the base file)",
    "download": "full download, then a local overlay",
    "nbdkit": "nbdkit curl plugin + cache + cow filters",
    "lazy": "cowdisk lazy (empty cache, no prefetch)",
    "trace": "cowdisk lazy with trace prefetch",
    "warm": "cowdisk, warm cache",
}


def cold_table(res, boot):
    """The rows of one cold-start table, and the medians: time, bytes fetched, cache growth."""
    med = {k: statistics.median([r[0] for r in v]) for k, v in res.items()}
    fetched = {k: statistics.median([r[1] for r in v]) for k, v in res.items()}
    cached = {k: statistics.median([r[2] for r in v]) for k, v in res.items()}
    lines = []
    for k in NAMES:
        b = "-" if k == "local" else f"{human(fetched[k])} ({fetched[k] / boot:.2f}x the set)"
        c = human(cached[k]) if k in ("lazy", "trace", "warm") else "-"
        lines.append(f"| {NAMES[k]} | {fmt_s([r[0] for r in res[k]])} | {b} | {c} |")
    return lines, med, fetched, cached


def cold_targets(med, fetched, cached, boot, target):
    return [
        target("lazy at least 3x faster than full download", med["download"] / med["lazy"] >= 3,
               f"{med['download'] / med['lazy']:.2f}x"),
        target("lazy at least 1.5x faster than the nbdkit stack", med["nbdkit"] / med["lazy"] >= 1.5,
               f"{med['nbdkit'] / med['lazy']:.2f}x"),
        target("bytes fetched at most 2x the boot set", fetched["lazy"] <= 2 * boot,
               f"{fetched['lazy'] / boot:.2f}x as fetched ({cached['lazy'] / boot:.2f}x as chunk content)"),
        target("warm cache within 10% of a local chain", med["warm"] <= 1.1 * med["local"],
               f"{med['warm'] / med['local']:.2f}x the local time"),
        target("prefetch faster than plain lazy", med["trace"] < med["lazy"],
               f"{med['trace'] / med['lazy']:.2f}x the lazy time"),
    ]


def write_report(a, setup, cold, push, elapsed, env):
    def target(name, ok, detail):
        return f"| {name} | {detail} | {'met' if ok else '**not met**'} |"

    def info(name, ok, detail):
        return f"| {name} | {detail} | {'as on the boot set' if ok else 'not as on the boot set'} |"

    boot = setup["sets"]["boot"][1]
    lines, med, fetched, cached = cold_table(cold["boot"]["results"], boot)
    targets = cold_targets(med, fetched, cached, boot, target)
    sc_bytes = setup["sets"]["scattered"][1]
    sc_lines, sc_med, sc_fetched, sc_cached = cold_table(cold["scattered"]["results"], sc_bytes)
    sc_rows = cold_targets(sc_med, sc_fetched, sc_cached, sc_bytes, info)
    p = push["rows"]
    size = push["size"]
    tp = {k: statistics.median(v) for k, v in p.items()}
    ratio = tp["upload"] / tp["push"]
    dedup = sum(push["added"]) / sum(push["unique"])
    targets += [
        target("push throughput at least 0.8x one multipart upload", ratio >= 0.8,
               f"{ratio:.2f}x ({size / tp['push'] / MIB:.0f} MiB/s against {size / tp['upload'] / MIB:.0f} MiB/s)"),
        target("10 successive snapshots store at most 1.05x their unique data", dedup <= 1.05,
               f"{dedup:.3f}x ({human(sum(push['added']))} for {human(sum(push['unique']))})"),
    ]
    versions = []
    for cmd in [["ceph", "--version"], ["nbdkit", "--version"], ["nbdfuse", "--version"]]:
        r = subprocess.run(cmd, capture_output=True, text=True)
        out = (r.stdout or r.stderr).strip()
        versions.append(out.splitlines()[0] if out else cmd[0])
    cmdline = os.environ.get("COWDISK_BENCH_COMMAND", "tools/bench/remote.sh")
    source = "copies of /usr/share/doc and /usr/share/locale" if a.quick else "copies of /usr/share and /usr/bin"
    text = f"""{BEGIN}
## Layers in an object store (`{cmdline}`)

Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed / 60:.1f} minutes, against a single-node
Ceph RGW on this machine (`tools/ceph/start.sh`; {os.cpu_count()} cores). {'; '.join(versions)}.
Medians in bold, min / median / max over {a.repeat} repetition(s), the variants interleaved;
the local chain and the warm cache over {a.repeat * a.pair_rounds} runs each ({a.pair_rounds} pairs per repetition).

**The base**: ext4, {human(setup['base_bytes'])}, holding {setup['files']:,} files ({human(setup['tree_bytes'])}:
{source}). **The boot set**: {setup['sets']['boot'][0]:,} files, {human(boot)}: every 7th file in name
order until {a.boot_mib} MiB (executables, read whole, as a start reads its programs). **The
scattered set**: {setup['sets']['scattered'][0]:,} files, {human(sc_bytes)}: every k-th file of the
whole tree, k chosen for about {a.boot_mib} MiB (mostly small files far apart: the hardest case
for lazy reads, shown for what it costs; the targets are the boot set's). The traces recorded
list {cold['boot']['traced_chunks']:,} and {cold['scattered']['traced_chunks']:,} chunks.

### Cold start: mount the overlay and read the boot set

| Variant | Seconds | Bytes fetched from the store (median) | Chunk content added to the cache |
|---|---|---|---|
""" + "\n".join(lines) + f"""

### Cold start: the scattered set

| Variant | Seconds | Bytes fetched from the store (median) | Chunk content added to the cache |
|---|---|---|---|
""" + "\n".join(sc_lines) + f"""

| The boot set's targets, on the scattered set | Measured (medians) | |
|---|---|---|
""" + "\n".join(sc_rows) + f"""

### Push

| | Seconds | Throughput (median, bytes of the file per second) |
|---|---|---|
| `cowdisk push` of the base (fresh prefix; stored {human(statistics.median(push['stored']))}) | {fmt_s(p['push'])} | {size / tp['push'] / MIB:.0f} MiB/s |
| one multipart upload of the same file (object_store, 16 MiB parts, 4 in flight) | {fmt_s(p['upload'])} | {size / tp['upload'] / MIB:.0f} MiB/s |

Ten successive snapshots of an evolving image (each adds 3 regions of 4 MiB of new random
data at random 4K-aligned offsets, written through `cowdisk serve` with qemu-io; its unique
data is the union of the regions), each pushed with `--chain` after the one before: the store
grew by
{', '.join(human(x) for x in push['added'])} (pushes took {', '.join(f'{x:.2f}' for x in push['snap_push_s'])} s).

### Targets

| Target | Measured (medians) | |
|---|---|---|
""" + "\n".join(targets) + f"""

Method: before every variant the page cache is dropped; each runs its server (`cowdisk serve`,
or `nbdkit -f`) on a Unix socket, `nbdfuse` exposes the export as a file, `losetup` and
`mount -o noatime` put ext4 on it, and the boot set's files are read whole, in order, one
at a time; the time runs from the server's start (for the download variant: from the start
of the download) until the last byte is read. Bytes fetched are the object's size (download),
what the curl plugin read according to nbdkit's stats filter (nbdkit), and what the cowdisk
server says it fetched at exit (the stored records' bytes of its ranged GETs: zstd-compressed
where that was smaller); the last column is the growth of cowdisk's chunk cache (content
bytes as allocated on disk, with read-ahead and the records a GET brought along). The variants run in the order download, nbdkit, lazy, trace, then
{a.pair_rounds} pairs of the local chain and the warm cache back to back (which of the two goes first alternates from
pair to pair; every run counts, since single runs of one variant here differ by up to 20% and the
warm target is 10%): the scratch file system here is mounted with online discard, so the runs just
after the download's file is deleted share the device with its discards, and the two runs the
warm target compares see the same conditions. The nbdkit variant reads a public-read copy of the raw image (its
curl plugin sends a HEAD, which a presigned GET URL does not allow). The store, the servers
and the clients share the machine's {os.cpu_count()} cores: a remote store adds network latency
that these figures do not include.
{END}
"""
    out = Path(a.output)
    old = out.read_text() if out.exists() else ""
    b, e = old.find(BEGIN), old.find(END)
    if 0 <= b < e:
        new = old[:b] + text.strip() + old[e + len(END):]
    else:
        new = old.rstrip() + "\n\n" + text.strip() + "\n"
    out.write_text(new)
    print(f"wrote {out}")
    print("\n".join(targets))


if __name__ == "__main__":
    main()
