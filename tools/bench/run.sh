#!/bin/sh
# Builds the release cowdisk binary and runs the side-by-side benchmark (tools/bench/bench.py).
# Usage: tools/bench/run.sh [--quick] [--size 1G] [--runtime 20] [--repeat 3] [--dir DIR] [--keep] [--output FILE]
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
# fio, the peers (qemu-nbd, nbdkit) and the ext4 row's tools, those that are missing.
tools/packages.sh bench
cargo build --release -p cowdisk-tools
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
COWDISK_BENCH_COMMAND="tools/bench/run.sh${*:+ $*}" exec python3 tools/bench/bench.py --cowdisk "$target/release/cowdisk" "$@"
