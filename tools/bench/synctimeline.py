#!/usr/bin/env python3
"""Where a write-and-FLUSH pair's time goes inside a server, from a low-overhead syscall
timeline (PROFILING.md, "What a first write costs"): for each request, from the read of its
header to the start of its reply; for a FLUSH, how much of that is the sync call (an
fdatasync, or cowdisk's journal record written with RWF_DSYNC; a checkpoint's syncs count
too); and from each reply to the next request's header read (the client and the socket).
Works for any server that reads a request header of 28 bytes (alone, or with a 4K payload).

Record 3 s of a server under fio's 4K write + FLUSH loop at queue depth 1, then read it:
  E=syscalls:sys_enter_pwritev2,syscalls:sys_exit_pwritev2,syscalls:sys_enter_fdatasync,\
syscalls:sys_exit_fdatasync,syscalls:sys_exit_recvfrom,syscalls:sys_exit_read,syscalls:sys_enter_sendto
  perf record -q -e "$E" -p PID -o srv.data -- sleep 3
  perf script -i srv.data | tools/bench/synctimeline.py NAME
"""
import re
import statistics
import sys

HEADER, HEADER_AND_BLOCK = "0x1c", "0x101c"
events = []
for line in sys.stdin:
    m = re.search(r"\s(\d+\.\d+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(\S*)", line)
    if m:
        events.append((float(m.group(1)) * 1e6, m.group(2), m.group(3), m.group(4)))

requests, cur = [], None
for t, edge, call, arg in events:
    if edge == "exit" and call in ("recvfrom", "read") and arg in (HEADER, HEADER_AND_BLOCK):
        cur = {"start": t, "sync": 0.0, "kind": "write" if arg == HEADER_AND_BLOCK else None}
    elif cur is None:
        continue
    elif edge == "enter" and call in ("pwritev2", "fdatasync"):
        cur["sync_from"] = t
    elif edge == "exit" and call in ("pwritev2", "fdatasync") and "sync_from" in cur:
        cur["sync"] += t - cur.pop("sync_from")
        cur["kind"] = "flush"
    elif edge == "exit" and call in ("recvfrom", "read") and arg == "0x1000":
        cur["kind"] = "write"
    elif edge == "enter" and call == "sendto":
        cur["end"] = t
        requests.append(cur)
        cur = None


def show(label, xs):
    if xs:
        print(f"  {label}: mean {statistics.mean(xs):.1f} µs, median {statistics.median(xs):.1f} µs")


name = sys.argv[1] if len(sys.argv) > 1 else "server"
writes = [r for r in requests if r["kind"] == "write"]
flushes = [r for r in requests if r["kind"] == "flush"]
print(f"{name}: {len(writes)} writes, {len(flushes)} flushes")
show("write, header read to reply", [r["end"] - r["start"] for r in writes])
show("FLUSH, header read to reply", [r["end"] - r["start"] for r in flushes])
show("  of it the sync calls", [r["sync"] for r in flushes])
show("  the rest", [r["end"] - r["start"] - r["sync"] for r in flushes])
show("reply to the next header read", [b["start"] - a["end"] for a, b in zip(requests, requests[1:])])
