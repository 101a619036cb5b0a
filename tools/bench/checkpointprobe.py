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
  log:  a log-structured data home: no block written in a slot; each 5 KiB record (head, map
        sector, block) appended with RWF_DSYNC to a log region written before the run; every
        12,800 records the whole 2 MiB map of 4K-block pointers written, fdatasync, a durable
        mark (the map points into the log, so nothing moves at a checkpoint);
  logfill: as log, but the log region made ready during the run: a thread keeps 16 MiB ahead
        of the log's head written with zeros and synced (so a record never waits on the file
        system for the blocks it lands in).
  log8k: as logfill, with 8 KiB records (a 4 KiB head cluster, then the block, 4 KiB
        aligned): the log home with 4 KiB chunks and no new kind of map entry.
It prints IOPS and the writes that took over 2 ms (the stalls): their number and total time.

Usage: tools/bench/checkpointprobe.py MODE SECONDS   (writes /var/tmp/cowdisk-ckprobe.img, removed after)
"""
import os
import random
import sys
import threading
import time

mode, secs = sys.argv[1], float(sys.argv[2])
MODES = ("sync", "bg", "raw", "none", "ready", "inplace", "log", "logfill", "log8k")
if mode not in MODES:
    sys.exit(f"unknown mode {mode}: {', '.join(MODES)}")
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
# The log's map (2 MiB), then the log region, after the journal and map areas. 512 MiB holds
# about 15 s of records at 6,000 a second; a run that fills it stops early and says so.
LMAP, LLEN = 2 << 20, 512 << 20
LBASE = GiB + 2 * HALF + MAP + LMAP
ready_to = [0]
if mode in ("log", "logfill", "log8k"):
    z = bytes(1 << 20)
    for i in range(LMAP >> 20): os.pwrite(fd, z, LBASE - LMAP + (i << 20))
    if mode == "log":
        for i in range(LLEN >> 20): os.pwrite(fd, z, LBASE + (i << 20))
        ready_to[0] = LLEN
os.fsync(fd)
def fill_ahead():
    # Zeros written and synced ahead of the log's head (16 MiB ahead, 4 MiB at a time).
    z = bytes(4 << 20)
    while not done[0] and ready_to[0] < LLEN:
        if ready_to[0] - lpos[0] < (16 << 20):
            os.pwrite(fd, z, LBASE + ready_to[0])
            os.fdatasync(fd)
            ready_to[0] += len(z)
        else:
            time.sleep(0.001)
done, lpos = [False], [0]
def checkpoint(half):
    os.fdatasync(fd)
    for _ in range(64):
        os.pwrite(fd, page, MBASE + random.randrange(MAP // 4096) * 4096)
    os.fdatasync(fd)
    os.pwritev(fd, [record[:512]], JBASE + half * HALF, os.RWF_DSYNC)
filler = threading.Thread(target=fill_ahead) if mode in ("logfill", "log8k") else None
rec = os.urandom(8192) if mode == "log8k" else record
if filler: filler.start()
n, half, jpos, bg, t0 = 0, 0, 512, None, time.monotonic()
stalls = []
while time.monotonic() - t0 < secs:
    t = time.monotonic()
    n += 1
    if mode in ("log", "logfill", "log8k"):
        if lpos[0] + len(rec) > LLEN:
            print("the log region is full: the run stopped early", file=sys.stderr)
            break
        while lpos[0] + len(rec) > ready_to[0]:
            time.sleep(0.0001)
        os.pwritev(fd, [rec], LBASE + lpos[0], os.RWF_DSYNC)
        lpos[0] += len(rec)
        if n % 12800 == 0:
            os.pwrite(fd, bytes(LMAP), LBASE - LMAP)
            os.fdatasync(fd)
            os.pwritev(fd, [record[:512]], JBASE, os.RWF_DSYNC)
        dt = time.monotonic() - t
        if dt > 0.002: stalls.append(dt)
        continue
    os.pwrite(fd, block, random.randrange(GiB // 4096) * 4096)
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
done[0] = True
if filler: filler.join()
print(f"{mode}: {n / took:,.0f} IOPS; {len(stalls)} writes over 2 ms, {sum(stalls) * 1000:.0f} ms of {took * 1000:,.0f}")
os.close(fd); os.unlink(path)
