#!/usr/bin/env bash
# Builds every fuzz target and runs each for a number of seconds, then prints a summary.
# Not part of .ci/run: fuzzing takes far longer than CI has. See FUZZING.md.
#
#   tools/fuzz/run.sh [SECONDS] [TARGET...]     (default 300 seconds, all targets)
#
# Environment:
#   FUZZ_SANITIZER  address (default) or none: what `cargo fuzz -s` gets
#   FUZZ_PARALLEL   1 to run the targets at the same time instead of one after another
#   FUZZ_NICE       niceness of the fuzzers (default 10: the machine is shared)
#   FUZZ_FORK       1 (default): libFuzzer's fork mode, which keeps fuzzing after a crash,
#                   timeout or OOM and saves each; 0: plain mode, which stops at the first
#
# Corpora grow in tools/fuzz/corpus/<target> (kept between runs), crashes land in
# tools/fuzz/artifacts/<target>, logs in tools/fuzz/logs/<target>.log. Minimize a crash with
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin -O -a <target> artifacts/<target>/<file>
# and save it under tests/fuzz_regressions/<target>/ (replayed by tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-300}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=(image_open image_ops nbd_server image_files nbd_tls nbd_multi ops_chain)
fi
san=${FUZZ_SANITIZER:-address}
nice_n=${FUZZ_NICE:-10}
fork=()
if [ "${FUZZ_FORK:-1}" = 1 ]; then
    fork=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
fi

# The machine has a stable toolchain only; cargo-fuzz needs -Z flags, which RUSTC_BOOTSTRAP allows.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

max_len() {
    case "$1" in
        image_open) echo 262144 ;;
        image_ops) echo 4096 ;;
        nbd_server) echo 16384 ;;
        ops_chain) echo 2048 ;;
        *) echo 4096 ;;
    esac
}

echo "== building (sanitizer: $san)"
nice -n "$nice_n" cargo fuzz build -O -a -s "$san"
echo "== seeds"
CARGO_TARGET_DIR=target/seeds nice -n "$nice_n" cargo run -q --release --example make_seeds -- seeds
mkdir -p logs

run_one() {
    local t=$1
    mkdir -p "corpus/$t" "artifacts/$t"
    local start=$SECONDS rc=0
    # The saved inputs seed the run too (libFuzzer adds new inputs to the first directory only).
    local saved=()
    [ -d "../../tests/fuzz_regressions/$t" ] && saved=("../../tests/fuzz_regressions/$t")
    nice -n "$nice_n" cargo fuzz run -O -a -s "$san" "$t" "corpus/$t" "seeds/$t" "${saved[@]}" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=25 \
        -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 "${fork[@]}" \
        >"logs/$t.log" 2>&1 || rc=$?
    echo "$rc $((SECONDS - start))" >"logs/$t.rc"
}

if [ "${FUZZ_PARALLEL:-0}" = 1 ]; then
    for t in "${targets[@]}"; do
        echo "== fuzzing $t for ${secs}s (in parallel)"
        run_one "$t" &
    done
    wait
else
    for t in "${targets[@]}"; do
        echo "== fuzzing $t for ${secs}s"
        run_one "$t"
    done
fi

echo
echo "== summary"
status=0
for t in "${targets[@]}"; do
    read -r rc took <"logs/$t.rc"
    last=$(grep -E '^#[0-9]+' "logs/$t.log" | tail -1 || true)
    execs=$(grep -E 'stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}' | tail -1 || true)
    [ -n "$execs" ] || execs=$(grep -E '^#[0-9]+' "logs/$t.log" | tail -1 | sed -E 's/^#([0-9]+).*/\1/' || true)
    crashes=$(find "artifacts/$t" -type f | wc -l)
    echo "$t: exit $rc after ${took}s, executions ${execs:-?}, artifacts $crashes"
    echo "    $last"
    if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
        status=1
        grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "logs/$t.log" | sed 's/^/    /' || true
        find "artifacts/$t" -type f | sed 's/^/    artifact: /'
    fi
done
exit $status
