#!/usr/bin/env python3
"""Row 8c's load by hand, for comparing chunk sizes: 10,000 first writes of 4K with FUA through
qemu-io (as bench.py's `fua_writes`) on a fresh cowdisk overlay of a 1 GiB random base, with
64 KiB and with 4 KiB chunks, and log-structured (`create --log`, format-spec §5.10), against
nbdkit on a `cp` copy of the base (synced), the order rotated each round. Prints IOPS and the
ratios to nbdkit per round (PROFILING.md).

Usage: [PEERS=cowdisk-64K,cowdisk-log,nbdkit] tools/bench/fuaprobe.py DIR [ROUNDS]
(DIR is made and holds the base; removed after; a peer cowdisk-KIND@BINARY runs that build)
Needs target/release/cowdisk, qemu-io and nbdkit.
"""
import os
import random
import shutil
import subprocess
import sys
import time

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cowdisk = os.path.join(root, "target", "release", "cowdisk")
work, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
os.makedirs(work)
os.chdir(work)
with open("base.raw", "wb") as f:
    for _ in range(1024):
        f.write(os.urandom(1 << 20))
    os.fsync(f.fileno())
blocks = random.Random(8).sample(range((1 << 30) // 4096), 10000)
cmds = "".join(f"write -f -q -P 0x5a {b * 4096} 4k\n" for b in blocks)


def run(peer):
    for f in ("o.cow", "o.raw", "s"):
        if os.path.exists(f):
            os.unlink(f)
    if peer.startswith("cowdisk"):
        # cowdisk-KIND, or cowdisk-KIND@BINARY to compare builds
        kind, _, binary = peer.split("-", 1)[1].partition("@")
        binary = binary or cowdisk
        opts = ["--log"] if kind == "log" else ["--chunk-size", kind]
        subprocess.run([binary, "create", "o.cow", "--backing", "base.raw"] + opts, check=True, capture_output=True)
        srv = subprocess.Popen([binary, "serve", "o.cow", "--socket", "s", "--name", "d"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        uri = "nbd+unix:///d?socket=s"
    else:
        subprocess.run(["cp", "--sparse=never", "base.raw", "o.raw"], check=True)
        fd = os.open("o.raw", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        srv = subprocess.Popen(["nbdkit", "-f", "-U", "s", "file", "o.raw"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        uri = "nbd+unix:///?socket=s"
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists("s"):
            if time.monotonic() > deadline:
                sys.exit(f"{peer}: no socket after 10 s")
            time.sleep(0.01)
        time.sleep(0.3)
        subprocess.run(["sync"], check=True)
        t = time.monotonic()
        r = subprocess.run(["qemu-io", "-f", "raw", uri], input=cmds, capture_output=True, text=True)
        took = time.monotonic() - t
        if r.returncode != 0 or "error" in (r.stdout + r.stderr).lower():
            sys.exit(f"{peer}: qemu-io failed: {r.stderr[-300:]}")
        return len(blocks) / took
    finally:
        srv.terminate()
        srv.wait()


peers = os.environ.get("PEERS", "cowdisk-64K,cowdisk-4K,cowdisk-log,nbdkit").split(",")
try:
    for rnd in range(rounds):
        order = peers[rnd % len(peers):] + peers[:rnd % len(peers)]
        res = {p: run(p) for p in order}
        ratios = ", ".join(f"{p.split('-', 1)[1]} {res[p] / res['nbdkit']:.2f}" for p in peers[:-1])
        print(f"round {rnd}: " + ", ".join(f"{p} {res[p]:,.0f} IOPS" for p in peers) + f"; ÷ nbdkit: {ratios}",
              flush=True)
finally:
    os.chdir("/")
    shutil.rmtree(work)
