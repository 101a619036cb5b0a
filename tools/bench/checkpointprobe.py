#!/usr/bin/env python3
"""Would a journal checkpoint that runs beside the flushes help (PROFILING.md, "What is left on
8a")? A model of 8a's I/O on one file: 4K hole fills at random places of a lengthened 1 GiB
region, each followed by a 5 KiB record written with RWF_DSYNC; every 800 records a checkpoint
(fdatasync, 64 map pages written, fdatasync, a durable mark). Modes:
  sync: the checkpoint in line, as cowdisk does it;
  bg:   the area in two halves, a full half's checkpoint in a thread while records go on in the
        other;
  raw:  a raw file's overwrite + fdatasync (nbdkit's I/O);
  none: the records alone, never a checkpoint: the most any change to the checkpoint can win;
  ready: as sync, but the 1 GiB region written and synced first, so that hole fills become
        overwrites (what slots written ahead of their first use would give, at the cost of
        sparse growth);
  inplace: no block in the record: the block stays where it was written, a 1 KiB record (head
        and one map sector) is written beside it without a sync, and one fdatasync makes both
        durable (data in place with a checksummed record; the region written first, as that
        design needs).
It prints IOPS and the writes that took over 2 ms (the stalls): their number and total time.

Usage: tools/bench/checkpointprobe.py MODE SECONDS   (writes /var/tmp/cowdisk-ckprobe.img, removed after)
"""
import os
import random
import sys
import threading
import time

mode, secs = sys.argv[1], float(sys.argv[2])
if mode not in ("sync", "bg", "raw", "none", "ready", "inplace"):
    sys.exit(f"unknown mode {mode}: sync, bg, raw, none, ready or inplace")
path = "/var/tmp/cowdisk-ckprobe.img"
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
GiB, HALF, MAP = 1 << 30, 4 << 20, 1 << 20
block, record, page = os.urandom(4096), os.urandom(5120), os.urandom(4096)
JBASE, MBASE = GiB, GiB + 2 * HALF
if mode in ("raw", "ready", "inplace"):
    z = bytes(1 << 20)
    for i in range(1024): os.pwrite(fd, z, i << 20)
if mode != "raw":
    os.pwrite(fd, bytes(2 * HALF + MAP), JBASE)
    os.ftruncate(fd, JBASE + 2 * HALF + MAP)
os.fsync(fd)
def checkpoint(half):
    os.fdatasync(fd)
    for _ in range(64):
        os.pwrite(fd, page, MBASE + random.randrange(MAP // 4096) * 4096)
    os.fdatasync(fd)
    os.pwritev(fd, [record[:512]], JBASE + half * HALF, os.RWF_DSYNC)
n, half, jpos, bg, t0 = 0, 0, 512, None, time.monotonic()
stalls = []
while time.monotonic() - t0 < secs:
    t = time.monotonic()
    os.pwrite(fd, block, random.randrange(GiB // 4096) * 4096)
    n += 1
    if mode == "raw":
        os.fdatasync(fd)
    elif mode == "inplace":
        if jpos + 1024 > HALF: jpos = 512
        os.pwrite(fd, record[:1024], JBASE + jpos)
        jpos += 1024
        os.fdatasync(fd)
    else:
        if jpos + 5120 > HALF:
            if mode in ("sync", "ready"):
                checkpoint(0)
            elif mode == "bg":
                if bg: bg.join()
                bg = threading.Thread(target=checkpoint, args=(half,)); bg.start()
                half = 1 - half
            jpos = 512
        os.pwritev(fd, [record], JBASE + half * HALF + jpos, os.RWF_DSYNC)
        jpos += 5120
    dt = time.monotonic() - t
    if dt > 0.002:
        stalls.append(dt)
if bg: bg.join()
took = time.monotonic() - t0
print(f"{mode}: {n / took:,.0f} IOPS; {len(stalls)} writes over 2 ms, {sum(stalls) * 1000:.0f} ms of {took * 1000:,.0f}")
os.close(fd); os.unlink(path)
