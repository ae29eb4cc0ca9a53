# shellcheck shell=bash
# Variables set here are read by the sourcing scripts (SC2034), the
# [$i] subscripts are needed for the callers' associative arrays (SC2004),
# and optional arguments default (SC2119/SC2120).
# shellcheck disable=SC2034,SC2004,SC2119,SC2120
# Shared helpers of the bench scripts. Source it right after `set -euo pipefail`:
#
#   BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
#   . "$BENCH_DIR/lib.sh"
#
# It defines functions and a few variables (PIDS, WORK, BG_PID, CLK_TCK,
# HOST unless set), installs the EXIT trap (bench_cleanup) and exits 130 on
# INT/TERM. A script then sets its knobs, starts processes with the start_*
# functions (or appends its own background pids to PIDS) and puts its
# temporary files in WORK (created by the script; removed on exit).
#
# Everything here is bounded: every wait loop has a deadline.

# Guard against being sourced twice (cpu.sh is also run by watch.sh, but as
# a separate process, so this only protects against a script's own mistake).
[ -n "${BENCH_LIB_LOADED:-}" ] && return 0
BENCH_LIB_LOADED=1

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${REPO_DIR:=$(dirname "$BENCH_LIB_DIR")}"
: "${HOST:=127.0.0.1}"

# ---------------------------------------------------------------- logging
# LOG_TAG (optional) is put in front of the time: "[proxy-cost 12:00:01] ...".
log() { printf '[%s%s] %s\n' "${LOG_TAG:+$LOG_TAG }" "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
# PIDS: every long-running process the script started (servers, proxies, load
# tools held for a whole phase). On exit each gets SIGTERM, then up to 10 s to
# go, then SIGKILL.
# BG_PID: one short-lived helper (strace, a quota-mode wrk, a mid-run check)
# that the script normally stops itself with stop_bg; on exit it gets SIGKILL
# first.
# WORK: the script's temp dir; removed on exit.
# add_cleanup CMD: CMD (a function name or a command line, eval'd) runs on
#   exit before the processes are stopped, in the order registered.
# add_cleanup_after_stop CMD: runs after they are stopped and before WORK is
#   removed (e.g. to copy server logs out of WORK); BENCH_EXIT_RC holds the
#   exit status.
# CLEANUP_LOG_STATUS=0: do not log "exited with status N" (cpu.sh, whose last
#   output line watch.sh's report shows when it fails).
declare -a PIDS=()
declare -a BENCH_CLEANUPS=() BENCH_CLEANUPS_AFTER=()
WORK=""
BG_PID=""
BENCH_EXIT_RC=0
CLEANUP_LOG_STATUS=${CLEANUP_LOG_STATUS:-1}

add_cleanup() { BENCH_CLEANUPS+=("$*"); }
add_cleanup_after_stop() { BENCH_CLEANUPS_AFTER+=("$*"); }

bench_cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    BENCH_EXIT_RC=$rc
    local c pid i alive
    [ -n "$BG_PID" ] && kill -KILL "$BG_PID" 2>/dev/null
    for c in "${BENCH_CLEANUPS[@]}"; do eval "$c"; done
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for i in $(seq 1 50); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) still running 10 s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    wait 2>/dev/null
    for c in "${BENCH_CLEANUPS_AFTER[@]}"; do eval "$c"; done
    [ -n "$WORK" ] && [ -d "$WORK" ] && rm -rf -- "$WORK"
    [ "$rc" = 0 ] || [ "$CLEANUP_LOG_STATUS" = 0 ] || log "exited with status $rc (processes stopped, temp dir removed)"
    exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# stop_bg SECONDS: SIGINT to BG_PID (strace and wrk print their summary on
# it), up to SECONDS for it to finish, then SIGKILL; clears BG_PID.
stop_bg() {
    local i
    [ -n "$BG_PID" ] || return 0
    kill -INT "$BG_PID" 2>/dev/null || true
    for i in $(seq 1 $(($1 * 10))); do kill -0 "$BG_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BG_PID" 2>/dev/null || true
    wait "$BG_PID" 2>/dev/null || true
    BG_PID=""
}

# ---------------------------------------------------------------- packages
# ensure_packages SPEC...: installs, with apt-get, the Debian packages of the
# specs that are missing. SPEC is COMMAND:PACKAGE (missing if COMMAND is not
# on PATH) or /ABSOLUTE/FILE:PACKAGE (missing if the file does not exist).
# `apt-get update` runs only if apt-cache has no candidate for one of them.
# Needs root only if something is missing.
ensure_packages() {
    local -a missing=()
    local spec what pkg p need_update=0
    for spec in "$@"; do
        what=${spec%%:*} pkg=${spec#*:}
        if [ "${what:0:1}" = / ]; then
            [ -e "$what" ] && continue
        else
            command -v "$what" >/dev/null && continue
        fi
        case " ${missing[*]} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root or install them first"
    for p in "${missing[@]}"; do
        apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]' || need_update=1
    done
    if [ "$need_update" = 1 ]; then
        log "apt-get update"
        apt-get update -q >&2
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "could not install ${missing[*]}"
}

# ---------------------------------------------------------------- build
# build_release TIMEOUT_S CARGO_ARGS...: `cargo build --release CARGO_ARGS`
# in the repository (TIMEOUT_S 0 = no time limit), output to stderr.
build_release() {
    local t=$1; shift
    log "cargo build --release $*"
    (cd "$REPO_DIR" && timeout "$t" cargo build --release "$@") >&2
}

# ---------------------------------------------------------------- ports
# port_free PORT: HOST:PORT can be bound the way the servers bind it
# (SO_REUSEADDR, as tokio does). Stricter than "nothing listens": the bench
# ports are in the ephemeral range, where another program's outgoing
# connection can hold a port nothing listens on.
port_free() {
    python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind((sys.argv[1], int(sys.argv[2])))
except OSError: sys.exit(1)' "$HOST" "$1"
}

# port_listening PORT: something accepts TCP connections on HOST:PORT.
port_listening() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# check_ports PORT...: dies if one of them is taken.
check_ports() {
    local p
    for p in "$@"; do
        port_free "$p" || die "port $HOST:$p is already in use"
    done
}

# ---------------------------------------------------------------- /proc
CLK_TCK=$(getconf CLK_TCK)
# cpu_ticks PID...: utime+stime of the processes, summed (0 for a gone one).
cpu_ticks() {
    local p t=0 v
    for p in "$@"; do
        v=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
# rss_kb PID [FIELD]: a kB field of /proc/PID/status [VmRSS] (0 if gone).
rss_kb() { awk -v k="${2:-VmRSS}:" '$1==k{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# rss_sum_kb PID...: VmRSS of the processes, summed.
rss_sum_kb() {
    local p t=0 v
    for p in "$@"; do
        v=$(rss_kb "$p")
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
# sys_cpu: "total idle steal" jiffies of the whole machine from /proc/stat.
sys_cpu() { awk '/^cpu /{idle=$5+$6; t=0; for(i=2;i<=NF;i++) t+=$i; print t, idle, $9}' /proc/stat; }
# busy_between A B [FORMAT]: busy % of the whole machine between two sys_cpu samples [%.0f].
busy_between() {
    awk -v a="$1" -v b="$2" -v f="${3:-%.0f}" 'BEGIN{split(a,x," "); split(b,y," "); dt=y[1]-x[1]; di=y[2]-x[2]; printf f, (dt>0 ? 100*(dt-di)/dt : 0)}'
}
# steal_between A B: % of the machine's time stolen by the hypervisor.
steal_between() {
    awk -v a="$1" -v b="$2" 'BEGIN{split(a,x," "); split(b,y," "); dt=y[1]-x[1]; printf "%.0f", (dt>0 ? 100*(y[3]-x[3])/dt : 0)}'
}
# busy_pct SECONDS: machine CPU busy % over that time.
busy_pct() { local a b; a=$(sys_cpu); sleep "$1"; b=$(sys_cpu); busy_between "$a" "$b"; }

# ---------------------------------------------------------------- quiet machine
# wait_quiet: waits (up to QUIET_WAIT_S) until two 2-second samples in a row
# show the machine at most 15% busy. Sets QUIET_BUSY (the last sample, %),
# QUIET_WAITED (seconds) and QUIET_DETAIL (the sampler's detail, if any); the
# caller records them in its own format.
# QUIET_SAMPLER (optional): a command printing "BUSY_PCT[<TAB>DETAIL]" after
# sampling 2 s (catalog.sh's also names the processes that used the CPU);
# default: busy_pct 2.
quiet_sample() {
    if [ -n "${QUIET_SAMPLER:-}" ]; then eval "$QUIET_SAMPLER"; else busy_pct 2; fi
}
wait_quiet() {
    : "${QUIET_WAIT_S:?set by the script}"
    local deadline=$((SECONDS + QUIET_WAIT_S)) t0=$SECONDS s1 s2 b1 b2 said=0
    s1=$(quiet_sample); s2=$(quiet_sample)
    b1=${s1%%$'\t'*}; b2=${s2%%$'\t'*}
    while { [ "$b1" -gt 15 ] || [ "$b2" -gt 15 ]; } && [ "$SECONDS" -lt "$deadline" ]; do
        if [ "$said" = 0 ]; then
            if [ "$s2" != "$b2" ]; then
                log "  machine is ${b2}% busy without our load (${s2#*$'\t'}); waiting up to ${QUIET_WAIT_S}s"
            else
                log "  machine is ${b2}% busy without our load (someone else?); waiting up to ${QUIET_WAIT_S}s. Busiest now:"
                top -b -n 2 -d 1 -w 120 2>/dev/null | awk '/^top -/{n++} n==2 && /^ *[0-9]/' | head -n 3 >&2 || true
            fi
            said=1
        fi
        b1=$b2; s2=$(quiet_sample); b2=${s2%%$'\t'*}
    done
    QUIET_BUSY=$b2
    QUIET_WAITED=$((SECONDS - t0))
    QUIET_DETAIL=""
    [ "$s2" != "$b2" ] && QUIET_DETAIL=${s2#*$'\t'}
    [ "$b2" -gt 15 ] && log "  machine still ${b2}% busy; measuring anyway (recorded)"
    return 0
}

# ---------------------------------------------------------------- Meshwork
# MW_BIN: the registry binary (set by the script). MW_LAUNCH: optional
# command prefix, e.g. (taskset -c 0); it must exec the binary so that the
# pid is the server's.
declare -a MW_LAUNCH=()

# start_meshwork ID DATA_DIR LOG HTTP_PORT GRPC_PORT RAFT_PORT DNS_PORT PEERS [FLAGS...]
# ID "dev" starts a one-server `--dev` registry (PEERS must be "-"); otherwise
# node ID of the cluster PEERS. Logs at warn level. Leaves the pid in
# LAST_PID and in PIDS.
start_meshwork() {
    local id=$1 data=$2 logf=$3 http=$4 grpc=$5 raft=$6 dns=$7 peers=$8
    shift 8
    local -a mw_mode=(--dev) peer_args=()
    [ "$id" = dev ] || mw_mode=(--node-id "$id")
    [ "$peers" = - ] || peer_args=(--peers "$peers")
    mkdir -p "$data"
    "${MW_LAUNCH[@]}" "$MW_BIN" "${mw_mode[@]}" --data-dir "$data" \
        --http-addr "$HOST:$http" --grpc-addr "$HOST:$grpc" \
        --raft-addr "$HOST:$raft" --dns-addr "$HOST:$dns" \
        "${peer_args[@]}" --log-level warn "$@" \
        >"$logf" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# start_meshwork_cluster DATA_PREFIX RAFT HTTP GRPC DNS [FLAGS...]: three
# servers, node N (1..3) on ports RAFT''N, HTTP''N, GRPC''N, DNS''N (e.g. RAFT
# 1830 -> 18301..18303), data in DATA_PREFIX''N, log in
# $WORK/logs/meshwork-N.log. Fills MW_PID[1..3] (declared by the caller).
start_meshwork_cluster() {
    local prefix=$1 raft=$2 http=$3 grpc=$4 dns=$5 i
    shift 5
    local peers="1@$HOST:${raft}1,2@$HOST:${raft}2,3@$HOST:${raft}3"
    for i in 1 2 3; do
        start_meshwork "$i" "$prefix$i" "$WORK/logs/meshwork-$i.log" \
            "$http$i" "$grpc$i" "$raft$i" "$dns$i" "$peers" "$@"
        MW_PID[$i]=$LAST_PID
    done
}

# meshwork_leader [HTTP RAFT]: the node number (1..3) of the leader of the
# cluster on ports HTTP''N / RAFT''N [1850 1830], or nothing.
meshwork_leader() {
    local http=${1:-1850} raft=${2:-1830} i raw
    for i in 1 2 3; do
        raw=$(curl -s -m 2 "http://$HOST:$http$i/v1/status/leader" 2>/dev/null) || continue
        case "$raw" in
            *"$HOST:$raft"[123]*) raw=${raw##*:"$raft"}; echo "${raw:0:1}"; return 0 ;;
        esac
    done
}

# ---------------------------------------------------------------- etcd
# start_etcd_cluster: three etcd members (Debian's etcd-server), client
# ports 23791..3, peer ports 23801..3, data in $WORK/etcd/nN, logs in
# $WORK/logs/etcd-N.log. Fills ETCD_PID[1..3] (declared by the caller).
ETCD_CLUSTER="e1=http://$HOST:23801,e2=http://$HOST:23802,e3=http://$HOST:23803"
start_etcd_cluster() {
    local i
    mkdir -p "$WORK/etcd"
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$WORK/etcd/n$i" \
            --listen-client-urls "http://$HOST:2379$i" \
            --advertise-client-urls "http://$HOST:2379$i" \
            --listen-peer-urls "http://$HOST:2380$i" \
            --initial-advertise-peer-urls "http://$HOST:2380$i" \
            --initial-cluster "$ETCD_CLUSTER" --initial-cluster-state new \
            --initial-cluster-token meshwork-bench \
            --logger zap --log-level warn \
            >"$WORK/logs/etcd-$i.log" 2>&1 &
        ETCD_PID[$i]=$!
        PIDS+=("$!")
    done
}

# etcd_leader: the member number (1..3) of the etcd leader, or nothing.
etcd_leader() {
    local i raw
    for i in 1 2 3; do
        raw=$(curl -s -m 2 -X POST -d '{}' "http://$HOST:2379$i/v3/maintenance/status" 2>/dev/null) || continue
        if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["header"]["member_id"]==d["leader"] else 1)' "$raw" 2>/dev/null; then
            echo "$i"; return 0
        fi
    done
}

b64() { printf '%s' "$1" | base64 -w0; }

# ---------------------------------------------------------------- both clusters
# check_alive NAME PID LOG: dies (showing the log's tail) if PID is gone.
check_alive() {
    kill -0 "$2" 2>/dev/null && return 0
    tail -n 20 "$3" >&2 || true
    die "$1 (pid $2) exited"
}

# check_clusters_alive: every server of start_meshwork_cluster (ports 18xxx)
# and start_etcd_cluster still runs.
check_clusters_alive() {
    local i
    for i in 1 2 3; do
        check_alive "meshwork-$i" "${MW_PID[$i]}" "$WORK/logs/meshwork-$i.log"
        check_alive "etcd-$i" "${ETCD_PID[$i]}" "$WORK/logs/etcd-$i.log"
    done
}

# wait_clusters_ready: both clusters have a leader and accept a write
# (bounded: 60 s). Sets MW_LEADER and ETCD_LEADER.
wait_clusters_ready() {
    local deadline=$((SECONDS + 60)) a b
    MW_LEADER="" ETCD_LEADER=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        check_clusters_alive
        [ -z "$MW_LEADER" ] && MW_LEADER=$(meshwork_leader)
        [ -z "$ETCD_LEADER" ] && ETCD_LEADER=$(etcd_leader)
        if [ -n "$MW_LEADER" ] && [ -n "$ETCD_LEADER" ]; then
            a=$(curl -s -m 5 -X PUT --data-binary ready "http://$HOST:1850$MW_LEADER/v1/kv/ready" || true)
            b=$(curl -s -m 5 -X POST -d "{\"key\":\"$(b64 ready)\",\"value\":\"$(b64 ready)\"}" \
                "http://$HOST:2379$ETCD_LEADER/v3/kv/put" || true)
            if [ "$a" = true ] && [[ "$b" == *'"header"'* ]]; then
                log "ready: Meshwork leader node $MW_LEADER, etcd leader member $ETCD_LEADER"
                return 0
            fi
        fi
        sleep 0.5
    done
    die "clusters not ready within 60 s (meshwork leader '${MW_LEADER}', etcd leader '${ETCD_LEADER}')"
}

# snapshot_rss LABEL FILE: appends "label system member role VmRSS VmHWM"
# for the six servers to FILE.
snapshot_rss() {
    local i
    for i in 1 2 3; do
        printf '%s\tmeshwork\t%s\t%s\t%s\t%s\n' "$1" "$i" "$([ "$i" = "$MW_LEADER" ] && echo leader || echo follower)" \
            "$(rss_kb "${MW_PID[$i]}" VmRSS)" "$(rss_kb "${MW_PID[$i]}" VmHWM)" >>"$2"
    done
    for i in 1 2 3; do
        printf '%s\tetcd\t%s\t%s\t%s\t%s\n' "$1" "$i" "$([ "$i" = "$ETCD_LEADER" ] && echo leader || echo follower)" \
            "$(rss_kb "${ETCD_PID[$i]}" VmRSS)" "$(rss_kb "${ETCD_PID[$i]}" VmHWM)" >>"$2"
    done
}

# ---------------------------------------------------------------- raw data, machine facts
# claim_raw_dir DIR MARKER: refuses (dies) if DIR exists without the marker
# file this script leaves in it; otherwise replaces DIR with an empty one
# holding the marker. check_raw_dir DIR MARKER: only the refusal (early).
check_raw_dir() {
    if [ -e "$1" ] && [ ! -f "$1/$2" ]; then
        die "RAW_DIR $1 exists and was not made by this script; pick another"
    fi
}
claim_raw_dir() {
    check_raw_dir "$1" "$2"
    [ -e "$1" ] && rm -rf -- "$1"
    mkdir -p "$1"; : >"$1/$2"
}

# raise_nofile: open-file limit up to 65536 (or the hard limit); sets NOFILE.
raise_nofile() {
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    NOFILE=$(ulimit -n)
}

cpu_model() { awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo; }
# fs_of DIR: "TYPE (DEVICE)" of the file system DIR is on.
fs_of() { df -PT "$1" | awk 'NR==2{print $2" ("$1")"}'; }
# git_rev: short commit of the work tree. --no-optional-locks everywhere:
# others use the same work tree, and a plain `git status` can take the index lock.
git_rev() { git -C "$REPO_DIR" --no-optional-locks rev-parse --short HEAD 2>/dev/null || echo unknown; }
git_status() { git -C "$REPO_DIR" --no-optional-locks status --porcelain "$@" 2>/dev/null; }
