#!/usr/bin/env python3
"""What a durable 4K write costs the file system under it, five ways (PROFILING.md, "The fact
it rests on"): a raw file's overwrite + fdatasync; the two-sync first write (hole fill,
fdatasync, map-sector overwrite, fdatasync); a hole fill past the end of the file left
unsynced plus a 5 KiB record written with RWF_DSYNC into an area written before (a redo
journal's flush); the same record synced with a whole-file fdatasync instead; and the first of
those with the hole inside the file's length (the file lengthened ahead, as cowdisk does). With --checkpoint N, also a longer journal
run on a 1 GiB disk of 64 KiB chunks, with three whole-file syncs every N records.

Usage: tools/bench/syncprobe.py [--dir /var/tmp] [--count 3000] [--checkpoint 2048 --long 60000]
"""
import argparse
import os
import random
import shutil
import tempfile
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--dir", default="/var/tmp")
ap.add_argument("--count", type=int, default=3000)
ap.add_argument("--checkpoint", type=int, default=0)
ap.add_argument("--long", type=int, default=60000)
a = ap.parse_args()
work = tempfile.mkdtemp(prefix="syncprobe-", dir=a.dir)
block, record = os.urandom(4096), os.urandom(5120)
MIB = 1 << 20


def fresh(name, prewrite_mib):
    fd = os.open(os.path.join(work, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    zeros = bytes(MIB)
    for i in range(prewrite_mib):
        os.pwrite(fd, zeros, i * MIB)
    os.fsync(fd)
    return fd


def timed(name, n, step):
    t = time.monotonic()
    for i in range(n):
        step(i)
    print(f"{name}: {n / (time.monotonic() - t):,.0f} IOPS")


try:
    raw = fresh("raw", 1024)
    timed("overwrite + fdatasync", a.count,
          lambda i: (os.pwrite(raw, block, random.randrange(1 << 18) * 4096), os.fdatasync(raw)))
    cow = fresh("cow", 1)
    slot = [2 * MIB]

    def today(i):
        os.pwrite(cow, block, slot[0])
        slot[0] += 65536
        os.fdatasync(cow)
        os.pwrite(cow, block[:512], 4096)
        os.fdatasync(cow)
    timed("hole fill, fdatasync, sector, fdatasync", a.count, today)
    cases = (("hole fill + record with RWF_DSYNC", True, False), ("hole fill + record + fdatasync", False, False),
             ("hole fill inside the file's length + record with RWF_DSYNC", True, True))
    for name, dsync, lengthened in cases:
        fd = fresh(name.replace(" ", "-").replace("'", ""), 64)
        end = [64 * MIB]
        if lengthened:
            # The file made long enough first (cowdisk lengthens an image ahead of its new
            # slots): a write into the hole then leaves the size alone, and a durable write
            # elsewhere in the file need not write the inode with it.
            os.ftruncate(fd, 64 * MIB + a.count * 65536)
            os.fsync(fd)

        def journal(i, fd=fd, end=end, dsync=dsync):
            os.pwrite(fd, block, end[0])
            end[0] += 65536
            at = (i * len(record)) % (60 * MIB)
            if dsync:
                os.pwritev(fd, [record], at, os.RWF_DSYNC)
            else:
                os.pwrite(fd, record, at)
                os.fdatasync(fd)
        timed(name, a.count, journal)
    if a.checkpoint:
        fd = fresh("long", 16)
        slots, end, worst = {}, [16 * MIB], [0.0]

        def long_run(i):
            t = time.monotonic()
            c = random.randrange(16384)
            if c not in slots:
                slots[c] = end[0]
                end[0] += 65536
            os.pwrite(fd, block, slots[c] + random.randrange(16) * 4096)
            os.pwritev(fd, [record], (i % a.checkpoint) * len(record), os.RWF_DSYNC)
            if i % a.checkpoint == a.checkpoint - 1:
                for at in (8192, 0, 4096):
                    os.fdatasync(fd)
                    os.pwrite(fd, block[:512], at)
            worst[0] = max(worst[0], time.monotonic() - t)
        timed(f"journal, checkpoint every {a.checkpoint} records", a.long, long_run)
        print(f"  slowest iteration {worst[0] * 1000:.1f} ms")
finally:
    shutil.rmtree(work, ignore_errors=True)
