#!/bin/sh
# Builds the release cowdisk binary and the S3 peer (tools/examples/s3bench.rs) and runs the
# object-store benchmark (tools/bench/remote.py) against a local Ceph: the one whose s3.env is
# in the environment (S3_ENDPOINT, ...), else one it starts in DIR/ceph and stops.
# Usage: tools/bench/remote.sh [--quick] [--size 1536M] [--boot-mib 48] [--repeat 3] [--dir DIR] [--keep] [--output FILE]
# Needs root (loop devices, mounts); installs what is missing of nbdfuse, nbdkit (curl plugin),
# qemu-io, e2fsprogs and Ceph.
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
tools/packages.sh remote
cargo build --release -p cowdisk-tools --bin cowdisk --example s3bench
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
COWDISK_BENCH_COMMAND="tools/bench/remote.sh${*:+ $*}" exec python3 tools/bench/remote.py \
    --cowdisk "$target/release/cowdisk" --s3bench "$target/release/examples/s3bench" "$@"
