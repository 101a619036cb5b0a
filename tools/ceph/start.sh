#!/usr/bin/env bash
# tools/ceph/start.sh: starts a single-node Ceph cluster for tests and demos in DIR, all on
# 127.0.0.1 and without systemd: 1 mon, 1 OSD (bluestore on a sparse file in DIR), 1 radosgw
# (S3 on http://127.0.0.1:RGW_PORT), no mgr; an S3 user with fixed test keys and one bucket.
# Writes DIR/s3.env and waits until a signed S3 request to the bucket succeeds.
# On a DIR whose cluster was started before and is stopped, it restarts that cluster (data kept).
# On any failure it stops what it started, keeps the logs in DIR/log and says why in one line.
#
# Usage: tools/ceph/start.sh DIR
# Environment (first start only; a restart uses what DIR was made with):
#   S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET   default COWDISKTESTACCESSKEY, ..., cowdisk-test
#   CEPH_MON_PORT (3300), RGW_PORT (7480)     ports on 127.0.0.1
#   CEPH_OSD_SIZE (20G)                       apparent size of the sparse bluestore file
#   CEPH_START_TIMEOUT (60)                   seconds each step may take
# Stop with tools/ceph/stop.sh DIR; radosgw alone with tools/ceph/rgw.sh DIR stop|start.
set -euo pipefail
set -E
. "$(dirname "$0")/lib.sh"

[ $# -eq 1 ] || die "usage: $PROG DIR"
T0=$(now)

for tool in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph curl setsid; do
    command -v "$tool" >/dev/null ||
        die "$tool is not installed (apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl)"
done

mkdir -p "$1"
ceph_dir "$1"
# The daemons' admin sockets live in DIR/run and a unix socket path has at most 107 bytes.
[ ${#DIR} -le 70 ] || die "DIR path is ${#DIR} characters long; at most 70 (admin socket paths): $DIR"
[[ $DIR =~ ^[A-Za-z0-9/._+-]+$ ]] || die "DIR path may hold only letters, digits and / . _ + -: $DIR"

# Fresh, or a restart of a cluster made here before?
if [ -f "$DIR/cluster.env" ]; then
    mode=restart
    declare -A asked=()
    for v in S3_ACCESS_KEY S3_SECRET_KEY S3_BUCKET CEPH_MON_PORT RGW_PORT; do
        [ -n "${!v:-}" ] && asked[$v]=${!v}
    done
    . "$DIR/cluster.env"
    for v in "${!asked[@]}"; do
        [ "${asked[$v]}" = "${!v}" ] ||
            die "$DIR was made with $v=${!v}, not ${asked[$v]}; unset $v or use a fresh DIR"
    done
elif [ -z "$(ls -A "$DIR")" ]; then
    mode=fresh
    S3_ACCESS_KEY=${S3_ACCESS_KEY:-$CEPH_DEFAULT_ACCESS_KEY}
    S3_SECRET_KEY=${S3_SECRET_KEY:-$CEPH_DEFAULT_SECRET_KEY}
    S3_BUCKET=${S3_BUCKET:-$CEPH_DEFAULT_BUCKET}
    CEPH_MON_PORT=${CEPH_MON_PORT:-$CEPH_DEFAULT_MON_PORT}
    RGW_PORT=${RGW_PORT:-$CEPH_DEFAULT_RGW_PORT}
elif [ -f "$CONF" ]; then
    die "$DIR holds a cluster whose first start did not finish (no cluster.env); remove DIR and start again"
else
    die "$DIR is neither empty nor a cluster made by $PROG"
fi

for name in mon osd rgw; do
    if pid=$(alive_pid "$name"); then
        die "$(daemon_prog "$name") of $DIR is running (pid $pid); stop it first (tools/ceph/stop.sh $DIR)"
    fi
done
for port in "$CEPH_MON_PORT" "$RGW_PORT"; do
    port_in_use "$port" && die "port 127.0.0.1:$port is in use (set CEPH_MON_PORT / RGW_PORT for a fresh DIR)"
done

# From here on, whatever fails stops the daemons this run started.
ok=0
cleanup() {
    [ "$ok" = 1 ] && return
    for name in rgw osd mon; do
        stop_daemons "$name" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'die "failed at line $LINENO: $BASH_COMMAND (see $LOGS/)"' ERR

mkdir -p "$LOGS" "$PIDS" "$DIR/run" "$DIR/crash"
echo "--- $mode $(date -Is)" >>"$LOGS/start.log"

if [ "$mode" = fresh ]; then
    # bluestore opens its block file with O_DIRECT, which tmpfs refuses (before Linux 6.6).
    dd if=/dev/zero of="$DIR/.o_direct" bs=4096 count=1 oflag=direct status=none 2>/dev/null ||
        { rm -f "$DIR/.o_direct"; die "$DIR does not take O_DIRECT writes (tmpfs?), which bluestore needs: use a DIR on a disk"; }
    rm -f "$DIR/.o_direct"
    mkdir -p "$DIR/mon/ceph-a" "$DIR/osd/ceph-0" "$DIR/rgw"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$CONF" <<CONF
# Made by tools/ceph/start.sh: a single-node test cluster on 127.0.0.1, everything in $DIR.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$CEPH_MON_PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
# No authentication (loopback only). radosgw would still insist on a secure mon connection,
# which needs cephx: crc lets it in.
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
run dir = $DIR/run
crash dir = $DIR/crash
log file = $DIR/log/\$cluster-\$name.log
mon cluster log file = $DIR/log/\$cluster.log
# One OSD: pools of size 1, few placement groups, no autoscaler (there is no mgr anyway).
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# Each pool creation waits for a paxos round: 1 s by default, about 12 s of radosgw's start.
paxos propose interval = 0.05

[mon]
mon data = $DIR/mon/\$cluster-\$id

[osd]
osd data = $DIR/osd/\$cluster-\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = ${CEPH_OSD_SIZE:-20G}
# A check of the store just made costs ~0.8 s of every fresh start and finds nothing.
bluestore fsck on mkfs = false
# rocksdb's option dumps make ~13,000 log lines per start.
debug rocksdb = 1/5
# The default (4 GiB) is sized for a storage server, not a test machine.
osd memory target = 1073741824

[client.rgw.a]
# tcp_nodelay: without it small GETs wait ~40 ms (Nagle against delayed ACKs).
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw data = $DIR/rgw
# No bucket lifecycle processing: its worker sleeps 5 s at a time and radosgw's shutdown waits
# for it (5 s for every stop, which tests of a store going away do often).
rgw enable lc threads = false
# Space of deleted objects goes back to the OSD within seconds, not after the default two
# hours: the benchmarks delete what each repetition stored, and a full OSD makes requests
# hang rather than fail (a --repeat 5 object-store run filled a fresh 20 GiB OSD).
rgw gc obj min wait = 0
rgw gc processor period = 5
CONF
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$CEPH_MON_PORT]" "$DIR/monmap" >>"$LOGS/cli.log" 2>&1
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" >>"$LOGS/cli.log" 2>&1 ||
        die "ceph-mon --mkfs failed (see $LOGS/cli.log)"
    step "mon made"
fi

start_daemon mon ceph-mon -c "$CONF" -f -i a
if [ "$mode" = fresh ]; then
    # `ceph osd new` below is the first question to it (and waits up to 5 s for an answer).
    wait_for mon "the mon listening on 127.0.0.1:$CEPH_MON_PORT" port_in_use "$CEPH_MON_PORT"
else
    wait_for mon "the mon answering on 127.0.0.1:$CEPH_MON_PORT" mon_answers
fi
step "mon answers"

if [ "$mode" = fresh ]; then
    id=$(ceph_cli osd new "$osd_uuid") || die "ceph osd new failed (see $LOGS/cli.log)"
    [ "$id" = 0 ] || die "ceph osd new gave osd.$id, expected osd.0"
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$LOGS/cli.log" 2>&1 ||
        die "ceph-osd --mkfs failed (see $LOGS/cli.log and $LOGS/ceph-osd.0.log)"
    step "osd made"
fi

start_daemon osd ceph-osd -c "$CONF" -f -i 0
wait_for osd "osd.0 active" osd_active
step "osd active"

# radosgw after the OSD is up: started earlier, the PGs of its first pool go active seconds late.
if [ "$mode" = fresh ]; then
    start_rgw create
else
    start_rgw existing
fi

cat >"$DIR/s3.env" <<ENV
S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
AWS_REGION=us-east-1
AWS_DEFAULT_REGION=us-east-1
S3_BUCKET=$S3_BUCKET
CEPH_CONF=$CONF
ENV
if [ "$mode" = fresh ]; then
    cat >"$DIR/cluster.env" <<ENV
S3_ACCESS_KEY=$S3_ACCESS_KEY
S3_SECRET_KEY=$S3_SECRET_KEY
S3_BUCKET=$S3_BUCKET
CEPH_MON_PORT=$CEPH_MON_PORT
RGW_PORT=$RGW_PORT
ENV
fi
ok=1
step "ready"
did=started
[ "$mode" = restart ] && did=restarted
echo "ceph: $did in $(since "$T0") s: mon 127.0.0.1:$CEPH_MON_PORT (pid $(<"$PIDS/mon")), osd.0 bluestore (pid $(<"$PIDS/osd")), radosgw http://127.0.0.1:$RGW_PORT (pid $(<"$PIDS/rgw")), bucket $S3_BUCKET; settings in $DIR/s3.env"
