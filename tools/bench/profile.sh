#!/bin/bash
# Profiles `cowdisk serve` under one fio job with perf, and `cowdisk flatten` with callgrind.
# Usage: tools/bench/profile.sh DIR [randread|firstwrite|seqwrite|flatten]...
# DIR receives the images, perf.data files and reports (it needs about 2 GiB free).
# Needs perf, valgrind, fio and the release binary (cargo build --release -p cowdisk-tools;
# the release profile keeps debug info, so perf and callgrind can name our functions).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR [randread|firstwrite|seqwrite|flatten]..." >&2; exit 2; }
dir=$(mkdir -p "$1" && cd "$1" && pwd); shift
[ $# -ge 1 ] || set -- randread firstwrite seqwrite flatten
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${COWDISK:-$repo/target/release/cowdisk}
cd "$dir"
[ -f base.raw ] || head -c 1G /dev/urandom > base.raw
cat base.raw > /dev/null # in the page cache, as in the benchmark

serve_pid=
stop_server() { if [ -n "$serve_pid" ]; then kill -TERM "$serve_pid"; wait "$serve_pid" || true; serve_pid=; fi; }
trap stop_server EXIT

profile_fio() { # name, fio options...
  local name=$1; shift
  rm -f ov.cow s.sock
  "$bin" create ov.cow --backing base.raw >/dev/null
  "$bin" serve ov.cow --socket s.sock >/dev/null & serve_pid=$!
  while [ ! -S s.sock ]; do sleep 0.05; done
  sync
  perf record -q -F 999 --call-graph dwarf,16384 -o "$name.perf" -p "$serve_pid" &
  local perf_pid=$!
  sleep 0.5
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///ov?socket=$dir/s.sock" --output-format=terse "$@" \
    | awk -F';' '/;/ {printf "fio: read %s IOPS, write %s IOPS\n", $8, $49}'
  kill -INT "$perf_pid"; wait "$perf_pid" || true
  stop_server
  perf report -i "$name.perf" --no-children --sort dso,sym --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | head -25 > "$name.self.txt"
  perf report -i "$name.perf" --children --sort sym --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | grep -v '\[k\]' \
    | grep -vE '\] (std::|core::|alloc::|clone3|start_thread|<std::|<core::|<alloc::)' | head -25 > "$name.children.txt"
  echo "== $name: self time (top 25)"; cat "$name.self.txt"
  echo "== $name: our functions including callees (top 25)"; cat "$name.children.txt"
}

for what in "$@"; do
  case $what in
    randread) profile_fio randread --rw=randread --bs=4k --iodepth=16 --time_based --runtime=8 --norandommap --randrepeat=0 ;;
    firstwrite) profile_fio firstwrite --rw=randwrite --bs=4k --iodepth=16 --runtime=8 ;;
    seqwrite) profile_fio seqwrite --rw=write --bs=1M --iodepth=4 --runtime=8 ;;
    flatten)
      # A 16-deep chain over a 64 MiB base, 1% of the device written per layer, flattened to raw
      # under callgrind (which runs the program about 50x slower, so the chain is small).
      rm -rf chain && mkdir chain && head -c 64M base.raw > chain/base.raw
      "$bin" create chain/top.cow --backing chain/base.raw >/dev/null
      for i in $(seq -w 1 15); do
        "$bin" serve chain/top.cow --socket chain/s.sock >/dev/null & serve_pid=$!
        while [ ! -S chain/s.sock ]; do sleep 0.05; done
        fio --name=l --ioengine=nbd --uri="nbd+unix:///top?socket=$dir/chain/s.sock" --rw=randwrite --bs=4k \
          --number_ios=164 --randseed="$i" --output-format=terse >/dev/null
        stop_server
        "$bin" snapshot chain/top.cow "chain/layer$i.cow" >/dev/null
      done
      rm -f chain/out.raw callgrind.flatten
      valgrind --tool=callgrind --callgrind-out-file=callgrind.flatten -q \
        "$bin" flatten chain/top.cow --output chain/out.raw --format raw
      callgrind_annotate --inclusive=yes callgrind.flatten 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -30 > flatten.inclusive.txt
      callgrind_annotate callgrind.flatten 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -20 > flatten.self.txt
      echo "== flatten (callgrind): instructions including callees (top 30)"; cat flatten.inclusive.txt
      echo "== flatten (callgrind): self (top 20)"; cat flatten.self.txt ;;
    *) echo "unknown profile: $what" >&2; exit 2 ;;
  esac
done
