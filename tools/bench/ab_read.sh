#!/bin/bash
# A/B of 4K random reads (QD16, fio's nbd engine, 20 s each) through a fresh overlay on a 1 GiB
# random raw base in the page cache: two cowdisk binaries and nbdkit's file plugin, interleaved
# three times, to tell a build's regression from the host's noise (PROFILING.md).
# Usage: tools/bench/ab_read.sh OLD_COWDISK NEW_COWDISK [DIR]   (DIR: /var/tmp/ab by default)
set -eu
old=$1 new=$2 D=${3:-/var/tmp/ab}
mkdir -p "$D"
[ -f "$D/base.raw" ] || head -c 1G /dev/urandom > "$D/base.raw"
cat "$D/base.raw" > /dev/null
sock=$D/s.sock
one() { # NAME COMMAND...: serves on $sock, prints NAME and fio's IOPS
    local name=$1; shift
    rm -f "$sock"
    "$@" > /dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    local iops
    iops=$(fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randread --bs=4k --iodepth=16 \
        --runtime=20 --time_based 2>&1 | grep -oE "IOPS=[0-9.k]+" | head -1)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$name ${iops#IOPS=}"
}
for rep in 1 2 3; do
    for v in old new; do
        bin=$old; [ $v = new ] && bin=$new
        rm -f "$D/top.cow"
        "$bin" create "$D/top.cow" --backing "$D/base.raw" > /dev/null
        one "$v" "$bin" serve "$D/top.cow" --socket "$sock"
    done
    one nbdkit nbdkit --foreground -U "$sock" file "$D/base.raw"
done
rm -f "$D/top.cow" "$sock"
