# tools/ceph/lib.sh: what start.sh, stop.sh and rgw.sh share about a local Ceph directory (DIR):
# its layout, the recorded pids and whether they are alive, starting and stopping a daemon by its
# pid, port checks, and the signed S3 request that tells whether the gateway answers.
# Sourced by those scripts, never run on its own.
# shellcheck shell=bash
#
# DIR holds everything of one cluster:
#   ceph.conf      the cluster's configuration (every path in it points into DIR)
#   cluster.env    ports, keys and bucket it was made with; written when a first start succeeded
#   s3.env         what a client needs: S3_ENDPOINT, AWS_* variables, S3_BUCKET, CEPH_CONF
#   pid/NAME       the pid of each daemon (mon, osd, rgw) as started
#   log/           the daemons' logs (NAME.out: their stdout and stderr), start.log: the steps
#   mon/ osd/ rgw/ run/ crash/   daemon data (osd/ceph-0/block: the sparse bluestore file), sockets

# shellcheck disable=SC2034 # (start.sh uses these)
# Defaults: fixed test keys (not secrets: the gateway listens on 127.0.0.1 only) and ports.
CEPH_DEFAULT_ACCESS_KEY=COWDISKTESTACCESSKEY
CEPH_DEFAULT_SECRET_KEY=cowdisk-test-secret-key-0000000000000000
CEPH_DEFAULT_BUCKET=cowdisk-test
CEPH_DEFAULT_MON_PORT=3300
CEPH_DEFAULT_RGW_PORT=7480
# The sha256 of an empty body, which a signed request without one carries.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
# How long each step may take to come up, and a daemon between SIGTERM and SIGKILL.
CEPH_START_TIMEOUT=${CEPH_START_TIMEOUT:-60}
CEPH_STOP_TIMEOUT=${CEPH_STOP_TIMEOUT:-15}

PROG=$(basename "$0")

# One line on stderr, then exit 1 (the callers' EXIT traps clean up).
die() {
    echo "$PROG: $*" >&2
    exit 1
}

# Sets DIR (absolute, no trailing slash) and the paths inside it; DIR must exist.
ceph_dir() {
    [ -d "$1" ] || die "no such directory: $1"
    DIR=$(cd "$1" && pwd -P)
    CONF=$DIR/ceph.conf
    PIDS=$DIR/pid
    LOGS=$DIR/log
}

# Seconds since the epoch with microseconds, and the time since $1 as "1.23".
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

daemon_prog() {
    case $1 in
    mon) echo ceph-mon ;;
    osd) echo ceph-osd ;;
    rgw) echo radosgw ;;
    *) die "unknown daemon $1" ;;
    esac
}

# True if PID is a live (not zombie) process of program PROG started with this DIR's ceph.conf.
# A killed daemon stays a zombie until pid 1 reaps it, and kill -0 still succeeds on a zombie;
# its /proc/PID/cmdline is empty, though, and a reused pid runs something else.
pid_is_daemon() {
    local pid=$1 prog=$2 cmd
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [ -n "$cmd" ] || return 1
    [[ $cmd == *"$prog "* && $cmd == *" $CONF "* ]]
}

# Prints the recorded pid of daemon NAME if that daemon is alive; fails otherwise.
alive_pid() {
    local pid
    [ -r "$PIDS/$1" ] || return 1
    pid=$(<"$PIDS/$1")
    pid_is_daemon "$pid" "$(daemon_prog "$1")" || return 1
    echo "$pid"
}

# Starts daemon NAME as COMMAND... in its own session, with nothing inherited from the caller
# (a test harness that captures our output must not wait on the daemons), and records its pid.
start_daemon() {
    local name=$1
    shift
    mkdir -p "$PIDS" "$LOGS"
    setsid "$@" </dev/null >>"$LOGS/$name.out" 2>&1 &
    local pid=$! i
    echo "$pid" >"$PIDS/$name"
    # Until it has exec'd, the child is a copy of this shell: wait for that (liveness checks
    # look for the program's name).
    for i in {1..200}; do
        if pid_is_daemon "$pid" "$(daemon_prog "$name")"; then
            return 0
        fi
        [ -e "/proc/$pid" ] || break
        sleep 0.01
    done
    die "$(daemon_prog "$name") did not start (see $LOGS/$name.out)"
}

# Stops the named daemons that are alive: SIGTERM to all, SIGKILL to those still there after
# CEPH_STOP_TIMEOUT seconds. Sets STOPPED to "name (pid N)" items and KILLED to the names killed.
stop_daemons() {
    local name pid left deadline
    local -a pids=() names=()
    STOPPED=()
    KILLED=()
    for name in "$@"; do
        if pid=$(alive_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
            STOPPED+=("$name (pid $pid)")
        fi
    done
    deadline=$(awk -v t="$EPOCHREALTIME" -v d="$CEPH_STOP_TIMEOUT" 'BEGIN { printf "%d", t + d }')
    while :; do
        left=()
        for i in "${!pids[@]}"; do
            pid_is_daemon "${pids[$i]}" "$(daemon_prog "${names[$i]}")" && left+=("$i")
        done
        [ ${#left[@]} -eq 0 ] && break
        if [ "${EPOCHREALTIME%.*}" -ge "$deadline" ]; then
            for i in "${left[@]}"; do
                kill -KILL "${pids[$i]}" 2>/dev/null || true
                KILLED+=("${names[$i]}")
            done
            # SIGKILL cannot be ignored; wait for the exits (zombies count as gone).
            local n=0
            while [ $n -lt 100 ]; do
                local any=0
                for i in "${left[@]}"; do
                    pid_is_daemon "${pids[$i]}" "$(daemon_prog "${names[$i]}")" && any=1
                done
                [ $any -eq 0 ] && break
                sleep 0.1
                n=$((n + 1))
            done
            break
        fi
        sleep 0.05
    done
    for name in "$@"; do
        alive_pid "$name" >/dev/null || rm -f "$PIDS/$name"
    done
}

# True if something accepts connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Sends a signed S3 request METHOD to PATH (e.g. /bucket) and prints the HTTP status (000 when
# nothing answered). Needs RGW_PORT, S3_ACCESS_KEY, S3_SECRET_KEY.
s3_request() {
    local method=$1 path=$2
    local -a how=(-X "$method")
    [ "$method" = HEAD ] && how=(-I)
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 --noproxy '*' "${how[@]}" \
        --aws-sigv4 "aws:amz:us-east-1:s3" -u "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
        -H "x-amz-content-sha256: $EMPTY_SHA256" "http://127.0.0.1:$RGW_PORT$path" || true
}

# Waits until COMMAND... succeeds, for at most CEPH_START_TIMEOUT seconds, checking meanwhile
# that daemon NAME is still alive. Fails with a reason on stderr otherwise.
wait_for() {
    local name=$1 what=$2
    shift 2
    local deadline=$((${EPOCHREALTIME%.*} + CEPH_START_TIMEOUT))
    while ! "$@"; do
        alive_pid "$name" >/dev/null ||
            die "$(daemon_prog "$name") exited before $what (see $LOGS/$name.out and $LOGS/)"
        [ "${EPOCHREALTIME%.*}" -lt "$deadline" ] ||
            die "$what: not within ${CEPH_START_TIMEOUT} s (see $LOGS/)"
        sleep 0.1
    done
}

# The ceph CLI (python, ~0.4 s a call) on this DIR, its chatter to the log.
ceph_cli() {
    timeout 20 ceph -c "$CONF" --connect-timeout 5 "$@" 2>>"$LOGS/cli.log"
}

mon_answers() { ceph_cli mon stat >/dev/null; }

# The OSD itself says it is active (booted and up in the map the mon serves): asked through its
# admin socket, so that a mon still holding the last run's "up" does not fool a restart.
osd_active() {
    timeout 10 ceph -c "$CONF" --admin-daemon "$DIR/run/ceph-osd.0.asok" status 2>>"$LOGS/cli.log" |
        grep -q '"state": "active"'
}

bucket_answers() { [ "$(s3_request HEAD "/$S3_BUCKET")" = 200 ]; }

# Starts radosgw (the mon and OSD must be up) and waits until a signed request to the bucket
# succeeds. The bucket must exist ("existing"), or a first start makes the user and the bucket
# in between ("create").
start_rgw() {
    start_daemon rgw radosgw -c "$CONF" -f -n client.rgw.a
    if [ "${1:-}" = create ]; then
        wait_for rgw "radosgw listening on 127.0.0.1:$RGW_PORT" port_in_use "$RGW_PORT"
        step "radosgw listening"
        radosgw-admin -c "$CONF" user create --uid=cowdisk-test --display-name="cowdisk tests" \
            --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >>"$LOGS/cli.log" 2>&1 ||
            die "radosgw-admin user create failed (see $LOGS/cli.log)"
        step "user created"
        wait_for rgw "CreateBucket $S3_BUCKET" create_bucket
        step "bucket created"
    fi
    wait_for rgw "a signed HEAD of bucket $S3_BUCKET" bucket_answers
    step "S3 answers"
}

create_bucket() {
    local code
    code=$(s3_request PUT "/$S3_BUCKET")
    [ "$code" = 200 ] && return 0
    # Before the gateway is ready it answers 5xx or not at all; anything else is final.
    case $code in 000 | 5*) return 1 ;; esac
    die "CreateBucket $S3_BUCKET answered HTTP $code (see $LOGS/rgw.out and $LOGS/)"
}

# Appends a timed step to log/start.log (T0 is when the script began).
step() {
    echo "$(since "$T0") s $*" >>"$LOGS/start.log"
}
