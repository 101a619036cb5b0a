#!/usr/bin/env python3
"""Where a queue-depth-1 request's time goes between fio and a server, CPU placement included
(PROFILING.md, "Halted CPUs"): for each write and each FLUSH, from fio sending its header to
the server reading it ("deliver"), the server's work up to its reply ("serve"; for a FLUSH the
sync call too, split at the device: to the write's issue, the write, the cache flush and the
wake-up), and from the reply to fio seeing it ("reply"), with how often both ends of a hand-off
ran on one CPU. Also, for the replies, how long the wake-up of fio took when it was on the
other CPU and when on the same.

Record about 1.5 s of the whole machine while fio runs 4K writes with a FLUSH after each
(fio's nbd engine, queue depth 1), then read it:
  E=syscalls:sys_enter_sendto,syscalls:sys_exit_sendto,syscalls:sys_exit_recvfrom,\\
syscalls:sys_exit_read,syscalls:sys_enter_pwritev2,syscalls:sys_exit_pwritev2,\\
syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,syscalls:sys_enter_pwrite64,\\
syscalls:sys_exit_poll,block:block_rq_issue,sched:sched_wakeup,sched:sched_switch
  perf record -q -a -e "$E" -o srv.data -- sleep 1.5
  perf script -i srv.data | tools/bench/handoffs.py COMM
COMM is the server's command name as perf shows it (cowdisk, nbdkit).
"""
import re
import statistics
import sys

LINE = re.compile(r"\s*(\S+)\s+(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):\s*(.*)")
SYNC_ENTER = ("syscalls:sys_enter_pwritev2", "syscalls:sys_enter_fdatasync")
SYNC_EXIT = ("syscalls:sys_exit_pwritev2", "syscalls:sys_exit_fdatasync")


def parse(stream):
    for line in stream:
        m = LINE.match(line)
        if m:
            yield m.group(1), int(m.group(3)), float(m.group(4)) * 1e6, m.group(5), m.group(6)


def requests(events, srv):
    """One dict per request fio sent and saw answered, with the times and CPUs of each step."""
    cur = None
    for comm, cpu, t, name, arg in events:
        if comm == "fio" and name == "syscalls:sys_enter_sendto" and "len: 0x0000001c" in arg:
            cur = {"send": t, "fio_cpu": cpu, "kind": None}
        elif cur is None:
            continue
        elif comm == srv and name in ("syscalls:sys_exit_recvfrom", "syscalls:sys_exit_read") \
                and "recv" not in cur and arg.startswith("0x1"):
            cur.update(recv=t, srv_cpu=cpu, kind="write" if arg == "0x101c" else None)
        elif comm == srv and name == "syscalls:sys_enter_pwrite64" and "recv" in cur:
            cur["kind"] = "write"
        elif comm == srv and name in SYNC_ENTER and "recv" in cur:
            cur["kind"] = "flush"
            cur.setdefault("sync0", t)
        elif name == "block:block_rq_issue" and "sync0" in cur and "sync1" not in cur:
            kind = arg.split()[1] if len(arg.split()) > 1 else ""
            if kind.startswith("W") and "wr" not in cur:
                cur["wr"] = t
            elif kind.startswith("FF") and "wr" in cur and "ff" not in cur:
                cur["ff"] = t
        elif comm == srv and name in SYNC_EXIT and "sync0" in cur:
            cur["sync1"] = t
        elif comm == srv and name == "syscalls:sys_enter_sendto" and "recv" in cur and "reply" not in cur:
            cur.update(reply=t, reply_cpu=cpu)
        elif name == "sched:sched_wakeup" and "comm=fio" in arg and "reply" in cur and "woken" not in cur:
            cur.update(woken=t, woken_cpu=int(arg.split("target_cpu=")[1].split()[0]))
        elif comm == "fio" and name == "syscalls:sys_exit_poll" and "reply" in cur:
            cur.update(done=t, done_cpu=cpu)
            yield cur
            cur = None


def show(label, xs):
    return f"{label} {statistics.mean(xs):6.1f}/{statistics.median(xs):6.1f}" if xs else f"{label} -"


def main():
    srv = sys.argv[1] if len(sys.argv) > 1 else "cowdisk"
    rs = list(requests(parse(sys.stdin), srv))
    print(f"{srv}: mean/median µs")
    for kind in ("write", "flush"):
        k = [r for r in rs if r["kind"] == kind]
        if not k:
            continue
        same_req = statistics.mean(r["fio_cpu"] == r["srv_cpu"] for r in k)
        same_rep = statistics.mean(r["reply_cpu"] == r["done_cpu"] for r in k)
        print(f"  {kind:5} {len(k):5}:", show("deliver", [r["recv"] - r["send"] for r in k]),
              show("| serve", [r["reply"] - r["recv"] for r in k]),
              show("| reply", [r["done"] - r["reply"] for r in k]),
              show("| total", [r["done"] - r["send"] for r in k]),
              f"| same CPU: request {same_req:.2f}, reply {same_rep:.2f}")
        d = [r for r in k if {"sync0", "wr", "ff", "sync1"} <= r.keys()]
        if d:
            print("        sync:", show("to the write's issue", [r["wr"] - r["sync0"] for r in d]),
                  show("| write", [r["ff"] - r["wr"] for r in d]),
                  show("| cache flush and wake-up", [r["sync1"] - r["ff"] for r in d]))
    for same in (True, False):
        k = [r for r in rs if "woken" in r and (r["reply_cpu"] == r["woken_cpu"]) == same]
        print(f"  replies waking fio on {'the same' if same else 'the other'} CPU: {len(k)};",
              show("reply to wake-up", [r["woken"] - r["reply"] for r in k]),
              show("| wake-up to fio seeing it", [r["done"] - r["woken"] for r in k]))


if __name__ == "__main__":
    main()
