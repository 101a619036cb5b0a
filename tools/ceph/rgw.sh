#!/usr/bin/env bash
# tools/ceph/rgw.sh: stops or starts only the radosgw (the S3 gateway) of the cluster that
# tools/ceph/start.sh started in DIR, leaving the mon and OSD running: for tests of a store that
# goes away and comes back. `start` waits until a signed S3 request to the bucket succeeds again.
#
# Usage: tools/ceph/rgw.sh DIR stop|start|status
#   stop     SIGTERM (SIGKILL after CEPH_STOP_TIMEOUT s); does nothing if radosgw is not running
#   start    refuses if radosgw runs or its port is taken, or if the mon or OSD is not running
#   status   prints the pid and exits 0 if radosgw runs, exits 3 if not
set -euo pipefail
set -E
. "$(dirname "$0")/lib.sh"

[ $# -eq 2 ] || die "usage: $PROG DIR stop|start|status"
ceph_dir "$1"
[ -f "$DIR/cluster.env" ] || die "$DIR holds no cluster made by tools/ceph/start.sh"
. "$DIR/cluster.env"
T0=$(now)

case $2 in
status)
    if pid=$(alive_pid rgw); then
        echo "ceph: radosgw runs (pid $pid), http://127.0.0.1:$RGW_PORT"
        exit 0
    fi
    echo "ceph: radosgw is not running"
    exit 3
    ;;
stop)
    stop_daemons rgw
    if [ ${#STOPPED[@]} -eq 0 ]; then
        echo "ceph: radosgw is not running"
    else
        echo "ceph: stopped ${STOPPED[*]} in $(since "$T0") s${KILLED:+ (killed after $CEPH_STOP_TIMEOUT s)}"
    fi
    ;;
start)
    if pid=$(alive_pid rgw); then
        die "radosgw of $DIR is running (pid $pid)"
    fi
    for name in mon osd; do
        alive_pid "$name" >/dev/null ||
            die "$(daemon_prog "$name") of $DIR is not running; start the cluster with tools/ceph/start.sh $DIR"
    done
    if port_in_use "$RGW_PORT"; then
        die "port 127.0.0.1:$RGW_PORT is in use"
    fi
    ok=0
    cleanup() {
        if [ "$ok" != 1 ]; then
            stop_daemons rgw >/dev/null 2>&1 || true
        fi
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    trap 'die "failed at line $LINENO: $BASH_COMMAND (see $LOGS/)"' ERR
    echo "--- rgw start $(date -Is)" >>"$LOGS/start.log"
    start_rgw existing
    ok=1
    echo "ceph: started radosgw (pid $(<"$PIDS/rgw")) in $(since "$T0") s; S3 answers at http://127.0.0.1:$RGW_PORT"
    ;;
*)
    die "usage: $PROG DIR stop|start|status"
    ;;
esac
