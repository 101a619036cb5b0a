#!/usr/bin/env bash
# tools/ceph/stop.sh: stops the local Ceph cluster that tools/ceph/start.sh started in DIR, by
# the pids recorded in DIR/pid: SIGTERM to radosgw, then the OSD, then the mon, each waited for
# (radosgw and the OSD talk to the daemons below them as they go: stopped together, radosgw
# hangs), SIGKILL to one still alive after CEPH_STOP_TIMEOUT (15) seconds. A zombie
# counts as stopped. Running it again, or on a DIR with nothing running, does nothing and exits 0.
# DIR itself (data and logs) stays: start.sh DIR restarts the cluster; rm -rf DIR removes it.
#
# Usage: tools/ceph/stop.sh DIR
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 1 ] || die "usage: $PROG DIR"
if [ ! -d "$1/pid" ]; then
    echo "ceph: nothing running in $1"
    exit 0
fi
ceph_dir "$1"
T0=$(now)
# Not interrupted half-way: a second stop.sh would do the rest anyway, but a clean run is simpler.
trap '' INT
stopped=()
killed=()
for name in rgw osd mon; do
    stop_daemons "$name"
    stopped+=("${STOPPED[@]}")
    killed+=("${KILLED[@]}")
done
if [ ${#stopped[@]} -eq 0 ]; then
    echo "ceph: nothing running in $DIR"
    exit 0
fi
list=$(printf ', %s' "${stopped[@]}")
msg="ceph: stopped ${list:2} in $(since "$T0") s"
if [ ${#killed[@]} -gt 0 ]; then
    msg+=" (killed after ${CEPH_STOP_TIMEOUT} s: ${killed[*]})"
fi
echo "$msg"
