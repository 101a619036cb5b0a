#!/usr/bin/env python3
"""Runs chosen jobs of bench.py against chosen peers, interleaved, and prints each run's main
figure: for measuring one change without the full run (a full `tools/bench/run.sh` is what
BENCHMARKS.md records).

Usage: tools/bench/jobs.py [--jobs job_syncwrite,job_syncrewrite] [--peers cowdisk,nbdkit]
                           [--rounds 2] [--runtime 10] [--dir /var/tmp/cowdisk-jobs]
Needs the release binary (cargo build --release) and the peers bench.py needs. A peer
`cowdisk=PATH` runs the cowdisk binary at PATH (copy a build aside to compare two builds:
`--peers cowdisk=/var/tmp/old,cowdisk,nbdkit`). With nbdkit among the peers, each cowdisk run
is also given as a ratio to nbdkit's run of the same job and round. `--jobs job_chain16,job_chain1
--peers cowdisk` measures rows 6a and 6b, `--jobs job_chaindeep,job_chain1x` rows 6d and 6e (the
chains are built first, as bench.py builds them).
"""
import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--jobs", default="job_syncwrite,job_syncrewrite,job_fuawrite,job_fuarewrite")
ap.add_argument("--peers", default="cowdisk,nbdkit")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--runtime", type=int, default=10)
ap.add_argument("--dir", default="/var/tmp/cowdisk-jobs")
a = ap.parse_args()
sys.argv = sys.argv[:1]
import bench as B  # noqa: E402  (after argv is cleared: bench.py parses none at import)


class Args:
    pass


B.ARGS = Args()
B.ARGS.runtime, B.ARGS.quick, B.ARGS.size_bytes, B.ARGS.repeat = a.runtime, False, B.GiB, 1
B.ARGS.big_chunks = 16384
B.ARGS.cowdisk = str(B.REPO / "target" / "release" / "cowdisk")
B.SCRATCH = Path(a.dir)
B.SCRATCH.mkdir(parents=True, exist_ok=True)
B.BASE, B.BASE_COPY = B.SCRATCH / "base.raw", B.SCRATCH / "base-copy.raw"
for p in B.SCRATCH.iterdir():
    if p.is_dir():
        shutil.rmtree(p)  # an earlier run's chains
    elif p not in (B.BASE, B.BASE_COPY):
        p.unlink()
if not B.BASE_COPY.exists():
    with open(B.BASE, "wb") as f:
        for _ in range(B.GiB // (8 << 20)):
            f.write(os.urandom(8 << 20))
    B.run(["cp", "--sparse=never", B.BASE, B.BASE_COPY])
    B.run(["sync"])
peers = a.peers.split(",")


def job(name):
    """bench.py's job `name`; `job_chain16` and `job_chain1` read the 16-deep chain and the
    1-deep overlay with the same data (rows 6a and 6b; peers cowdisk and qcow2), built once;
    `job_chaindeep` and `job_chain1x` the 256-image chain and its 1-deep twin (rows 6d, 6e)."""
    if name in ("job_chaindeep", "job_chain1x"):
        if ("cowdisk", "deep") not in B.CHAINS:
            B.build_deep_chain()
        which = name.removeprefix("job_chain")
        return lambda peer: B.job_chain(peer, which)
    if name.startswith("job_chain"):
        if ("cowdisk", 16) not in B.CHAINS:
            B.build_chains()
        depth = int(name.removeprefix("job_chain"))
        return lambda peer: B.job_chain(peer, depth)
    return getattr(B, name)


jobs = [job(j) for j in a.jobs.split(",")]
default_cowdisk = B.ARGS.cowdisk


def run_job(job, peer):
    """Runs one job for one peer; a `cowdisk=PATH` peer runs as cowdisk, recorded under its own name."""
    if not peer.startswith("cowdisk="):
        job(peer)
        return
    record = B.record
    B.ARGS.cowdisk = str(Path(peer.split("=", 1)[1]).resolve())
    B.record = lambda name, _peer, m: record(name, peer, m)
    try:
        job("cowdisk")
    finally:
        B.ARGS.cowdisk, B.record = default_cowdisk, record


for r in range(a.rounds):
    # Each job and each peer goes first in turn: a ratio of two jobs (6a ÷ 6b) is as exposed
    # to order as a ratio of two peers.
    for job in B.rotated(jobs, r):
        for peer in peers if r % 2 == 0 else peers[::-1]:
            run_job(job, peer)
for name, by_peer in B.RESULTS.items():
    print(name, {p: [round(m["value"]) for m in ms] for p, ms in by_peer.items()})
    if "nbdkit" in by_peer:
        kit = [m["value"] for m in by_peer["nbdkit"]]
        for p, ms in by_peer.items():
            if p != "nbdkit":
                ratios = [m["value"] / k for m, k in zip(ms, kit)]
                print(f"  {p} / nbdkit per round: {', '.join(f'{x:.3f}' for x in ratios)}; "
                      f"median {statistics.median(ratios):.3f}")
