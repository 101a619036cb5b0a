#!/bin/sh
# Two full runs back to back on one build, as issue 17 counts a target (met only where the
# median meets it in two full runs), and both side by side in BENCHMARKS.md.
# Usage: tools/bench/twice.sh [run.sh's options, e.g. --dir /var/tmp/bench-full]
# Takes two full runs' time (about 65 minutes each on the reference machine). Change nothing
# in between: the second run must use the first's binary, and two_runs.py heads the table "on
# one build" only where both runs' build lines (git HEAD, build time, md5) match. The first
# run's BENCHMARKS.md is kept at the path printed at the end, to commit or compare.
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
first=/var/tmp/cowdisk-bench-first-run.md
tools/bench/run.sh "$@"
cp BENCHMARKS.md "$first"
tools/bench/run.sh "$@"
python3 tools/bench/two_runs.py --insert "$first" BENCHMARKS.md
echo "both runs side by side in BENCHMARKS.md; the first run's file is $first"
