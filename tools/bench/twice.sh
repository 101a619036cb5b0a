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
# The report each run writes, as bench.py picks it: --output, else --quick's, else BENCHMARKS.md.
report=BENCHMARKS.md
output=
prev=
for a in "$@"; do
    case "$prev" in --output) output=$a ;; esac
    case "$a" in --output=*) output=${a#--output=} ;; --quick) report=target/bench-quick/BENCHMARKS.md ;; esac
    prev=$a
done
report=${output:-$report}
first=/var/tmp/cowdisk-bench-first-run.md
tools/bench/run.sh "$@"
cp "$report" "$first"
tools/bench/run.sh "$@"
python3 tools/bench/two_runs.py --insert "$first" "$report"
echo "both runs side by side in $report; the first run's file is $first"
