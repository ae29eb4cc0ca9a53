#!/usr/bin/env bash
# Catalog benchmark: blocking-query fan-out and catalog scale on a three-server
# Meshwork cluster, all on 127.0.0.1.
#
#   bash bench/catalog.sh        # as root, from anywhere; ~6-10 minutes
#
# 1. Fan-out: WAITERS connections spread evenly over the three servers' HTTP
#    ports, each holding `GET /v1/health/service/web?index=N&wait=60s`; then ONE
#    registration of a new `web` instance through one server. Measured: time
#    from the write's acknowledgement to each waiter's response (kernel receive
#    timestamps), CPU of the servers during the fan-out, RSS growth per 1,000
#    waiters. ROUNDS times with WAITERS, SMALL_ROUNDS times with SMALL_WAITERS.
#    Also: NOISE_WRITES unrelated KV writes with and without the waiters held
#    (server CPU per write; no waiter may answer), and one more fan-out round
#    after the catalog-scale phase (big catalog).
# 2. Catalog scale: SERVICES x INSTANCES registrations through
#    `PUT /v1/catalog/register`, SCALE_CONC keep-alive connections spread over
#    the servers; registrations/s, latency, RSS and data-dir size.
#
# Environment knobs (defaults in brackets):
#   WAITERS [10000]  ROUNDS [3]  SMALL_WAITERS [1000]  SMALL_ROUNDS [3]
#   WAIT         ?wait= of the blocking queries [60s]
#   HOLD_S       seconds between the last waiter's send and the write [2]
#   NOISE_WRITES unrelated writes in the noise test, 0 = skip [100]
#   SERVICES [10000]  INSTANCES [5]  SCALE_NODES [1000]  SCALE_CONC [64]
#   SCALE_MAX_S  time cap of the registration phase [300]
#   POST_SCALE_ROUND 1 = one more WAITERS fan-out on the big catalog [1]
#   CONNMEM      connections in the per-connection memory check on a separate
#                fresh one-server cluster (idle, then blocking), 0 = skip [3334]
#   TIME_BUDGET_S optional phases (small rounds after the first, noise test,
#                memory check, post-scale round) are skipped once this many
#                seconds have passed since the servers started [600]
#   QUIET_WAIT_S before each measurement, wait up to this long for the machine
#                to be idle (it is shared) [30]
#   NOISE_PCT    a fan-out round during which other processes used more than
#                this % of the machine's CPU is repeated [10]
#   MAX_ATTEMPTS at most this many tries per fan-out round [3]
#   SKIP_BUILD   1 = use the existing target/release/meshwork-registry [0]
#   BENCH_TMPDIR parent of the temporary data dirs [/var/tmp]
#   RESULTS_FILE report [bench/RESULTS-catalog.md]
#   RAW_DIR      raw JSON, /proc samples and server logs, kept after the run
#                [/var/tmp/meshwork-bench-catalog]
#
# Ports: raft/http/grpc/dns 3630N/3650N/3660N/3670N (N = 1..3, and N = 4 for
# the one-server cluster of the per-connection memory check); the script
# refuses to start if one is taken. Every wait loop is bounded; the EXIT trap
# stops every process this script started and removes the temp dir.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
WAITERS=${WAITERS:-10000}
ROUNDS=${ROUNDS:-3}
SMALL_WAITERS=${SMALL_WAITERS:-1000}
SMALL_ROUNDS=${SMALL_ROUNDS:-3}
WAIT=${WAIT:-60s}
HOLD_S=${HOLD_S:-2}
NOISE_WRITES=${NOISE_WRITES:-100}
SERVICES=${SERVICES:-10000}
INSTANCES=${INSTANCES:-5}
SCALE_NODES=${SCALE_NODES:-1000}
SCALE_CONC=${SCALE_CONC:-64}
SCALE_MAX_S=${SCALE_MAX_S:-300}
POST_SCALE_ROUND=${POST_SCALE_ROUND:-1}
CONNMEM=${CONNMEM:-3334}
TIME_BUDGET_S=${TIME_BUDGET_S:-600}
QUIET_WAIT_S=${QUIET_WAIT_S:-30}
NOISE_PCT=${NOISE_PCT:-10}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-3}
SKIP_BUILD=${SKIP_BUILD:-0}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-catalog.md}
RAW_DIR=${RAW_DIR:-/var/tmp/meshwork-bench-catalog}
CLIENT=$BENCH_DIR/catalog-waiters.py
REPORT=$BENCH_DIR/catalog-report.py
MW_BIN=$REPO_DIR/target/release/meshwork-registry
HTTP_PORTS="36501,36502,36503"
RAFT_ADDRS="$HOST:36301,$HOST:36302,$HOST:36303"

declare -A MW_PID=()

# The servers' logs are kept in RAW_DIR even when the run fails.
keep_logs() {
    [ -d "$WORK/logs" ] && mkdir -p "$RAW_DIR" && cp "$WORK"/logs/*.log "$RAW_DIR/" 2>/dev/null
}
add_cleanup_after_stop keep_logs

# ---------------------------------------------------------------- helpers
# Waits (bounded) until the machine is idle (lib.sh); the sampler is the load
# client's, which also names the processes that used the CPU. Records the
# last sample, how long it waited and those processes in quiet.tsv.
wait_quiet_catalog() { # label
    local ours="${MW_PID[1]},${MW_PID[2]},${MW_PID[3]},${SOLO_PID:-}"
    QUIET_SAMPLER="python3 \"\$CLIENT\" busy --seconds 2 --ours $ours"
    wait_quiet
    printf '%s\t%s\t%s\t%s\n' "$1" "$QUIET_BUSY" "$QUIET_WAITED" "$QUIET_DETAIL" >>"$RAW_DIR/quiet.tsv"
}

http_get() { curl -sS --max-time 5 "http://$HOST:$1$2"; }

check_servers_alive() { # phase
    local i
    for i in 1 2 3; do
        if ! kill -0 "${MW_PID[$i]}" 2>/dev/null; then
            tail -n 30 "$WORK/logs/meshwork-$i.log" >&2 || true
            printf '{"kind":"crash","server":%s,"phase":"%s"}\n' "$i" "$1" >>"$RAW_DIR/results.jsonl"
            die "server $i (pid ${MW_PID[$i]}) is gone after phase $1"
        fi
    done
}

# The budget counts from when the servers start (a build can take minutes).
T0=0
SKIPPED=""
budget_left() { # phase name
    [ $((SECONDS - T0)) -lt "$TIME_BUDGET_S" ] && return 0
    log "time budget (${TIME_BUDGET_S}s) used up; skipping $1"
    SKIPPED="$SKIPPED $1"
    return 1
}

# Runs the load client; a failure is recorded and the run goes on.
run_client() { # label subcommand args...
    local label=$1; shift
    local out
    if out=$(python3 "$CLIENT" "$@" --label "$label" \
            --ports "${CLIENT_PORTS:-$HTTP_PORTS}" \
            --pids "${CLIENT_PIDS:-${MW_PID[1]},${MW_PID[2]},${MW_PID[3]}}" \
            2>>"$RAW_DIR/client.log"); then
        printf '%s\n' "$out" >>"$RAW_DIR/results.jsonl"
        python3 "$REPORT" --line "$out" >&2 || true
    else
        log "  client failed for $label (see $RAW_DIR/client.log)"
        tail -n 5 "$RAW_DIR/client.log" >&2
        printf '{"kind":"failed","label":"%s"}\n' "$label" >>"$RAW_DIR/results.jsonl"
    fi
    check_servers_alive "$label"
}

# ---------------------------------------------------------------- prerequisites
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"

# File descriptors: the client holds WAITERS sockets, each server a third.
raise_nofile
[ "$NOFILE" -ge $((WAITERS + 500)) ] || die "open-file limit $NOFILE is too low for $WAITERS waiters"
log "open-file limit: $NOFILE (hard $(ulimit -Hn))"

mkdir -p "$RAW_DIR"
rm -f -- "$RAW_DIR"/results.jsonl "$RAW_DIR"/discarded.jsonl "$RAW_DIR"/quiet.tsv \
    "$RAW_DIR"/client.log "$RAW_DIR"/meta.txt "$RAW_DIR"/free.txt "$RAW_DIR"/report.md \
    "$RAW_DIR"/meshwork-*.log
: >"$RAW_DIR/results.jsonl"
: >"$RAW_DIR/quiet.tsv"
: >"$RAW_DIR/discarded.jsonl"

if [ "$SKIP_BUILD" != 1 ]; then
    build_release 1500 --bin meshwork-registry   # (waits for a build lock held by others)
fi
[ -x "$MW_BIN" ] || die "$MW_BIN missing (run without SKIP_BUILD=1)"

# ---------------------------------------------------------------- metadata
{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git=$(git_rev)"
    echo "git_dirty=$(git_status | grep -c . || true)"
    echo "binary_mtime=$(date -u -r "$MW_BIN" +%Y-%m-%dT%H:%M:%SZ)"
    echo "version=$("$MW_BIN" --version 2>/dev/null | head -1)"
    echo "nproc=$(nproc)"
    echo "cpu=$(cpu_model)"
    echo "kernel=$(uname -r)"
    echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "nofile=$NOFILE"
    echo "python=$(python3 --version 2>&1)"
    echo "fs=$(fs_of "$BENCH_TMPDIR")"
    echo "params=WAITERS=$WAITERS ROUNDS=$ROUNDS SMALL_WAITERS=$SMALL_WAITERS SMALL_ROUNDS=$SMALL_ROUNDS WAIT=$WAIT HOLD_S=$HOLD_S NOISE_WRITES=$NOISE_WRITES SERVICES=$SERVICES INSTANCES=$INSTANCES SCALE_NODES=$SCALE_NODES SCALE_CONC=$SCALE_CONC"
} >"$RAW_DIR/meta.txt"
free -h >"$RAW_DIR/free.txt"

# ---------------------------------------------------------------- cluster
check_ports 36301 36302 36303 36304 36501 36502 36503 36504 36601 36602 36603 36604 \
    36701 36702 36703 36704
T0=$SECONDS
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-catalog-bench.XXXXXX")
mkdir -p "$WORK/logs"
start_meshwork_cluster "$WORK/n" 3630 3650 3660 3670
# The one-server cluster of the per-connection memory check starts now too:
# its ports are in the ephemeral range and the load client's 10,000 outgoing
# connections could hold them by the time it is needed.
SOLO_PID=""
if [ "$CONNMEM" -gt 0 ]; then
    start_meshwork 1 "$WORK/solo" "$WORK/logs/meshwork-solo.log" 36504 36604 36304 36704 "1@$HOST:36304"
    SOLO_PID=$LAST_PID
fi
log "servers started: pids ${MW_PID[1]} ${MW_PID[2]} ${MW_PID[3]} (one-server check: ${SOLO_PID:-none}), data in $WORK"

leader=""
for _ in $(seq 1 60); do
    check_servers_alive startup
    l1=$(http_get 36501 /v1/status/leader 2>/dev/null || true)
    l2=$(http_get 36502 /v1/status/leader 2>/dev/null || true)
    l3=$(http_get 36503 /v1/status/leader 2>/dev/null || true)
    if [ -n "$l1" ] && [ "$l1" != '""' ] && [ "$l1" = "$l2" ] && [ "$l2" = "$l3" ]; then
        leader=$l1
        break
    fi
    sleep 0.5
done
[ -n "$leader" ] || die "no leader agreed by all three servers within 30 s"
log "leader: $leader"
# Log lines from here on are counted as warnings after startup (the election
# itself logs a few openraft WARNs about ignored vote responses).
declare -A LOG_BASE=()
for i in 1 2 3; do LOG_BASE[$i]=$(wc -l <"$WORK/logs/meshwork-$i.log"); done

# A few instances of web to watch.
for k in 1 2 3; do
    out=$(curl -sS --max-time 10 -X PUT "http://$HOST:3650$k/v1/catalog/register" \
        -d "{\"Node\":\"web-host-$k\",\"Address\":\"198.18.0.$k\",\"Service\":{\"Service\":\"web\",\"ID\":\"web-$k\",\"Port\":8080}}")
    [ "$out" = true ] || die "seed registration via server $k answered: $out"
done
for _ in $(seq 1 40); do
    n=0
    for p in 36501 36502 36503; do
        c=$(http_get "$p" '/v1/health/service/web?stale' | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
        [ "$c" = 3 ] && n=$((n + 1))
    done
    [ "$n" = 3 ] && break
    sleep 0.25
done
[ "$n" = 3 ] || die "not every server sees the 3 seed instances of web"
sleep 2

# ---------------------------------------------------------------- fan-out
fanout() { # label waiters write_server(0-based) [extra args]
    local label=$1 n=$2 ws=$3 attempt last; shift 3
    for attempt in $(seq 1 "$MAX_ATTEMPTS"); do
        log "fan-out $label: $n waiters, write via server $((ws + 1))$([ "$attempt" -gt 1 ] && echo " (attempt $attempt)")"
        wait_quiet_catalog "$label"
        run_client "$label" fanout --raft-addrs "$RAFT_ADDRS" --waiters "$n" --wait "$WAIT" \
            --hold "$HOLD_S" --write-server "$ws" \
            --new-id "web-$label-a$attempt" --new-node "node-$label-a$attempt" "$@"
        last=$(tail -n 1 "$RAW_DIR/results.jsonl")
        if [ "$attempt" -lt "$MAX_ATTEMPTS" ] && python3 "$REPORT" --noisy "$last" "$NOISE_PCT"; then
            log "  other processes used more than ${NOISE_PCT}% of the machine during $label; repeating it"
            printf '%s\n' "$last" >>"$RAW_DIR/discarded.jsonl"
            sed -i '$ d' "$RAW_DIR/results.jsonl"
            continue
        fi
        break
    done
}

# The small rounds first, so that their memory is measured on fresh servers
# (the allocator keeps what the 10,000-waiter rounds took).
for r in $(seq 1 "$SMALL_ROUNDS"); do
    [ "$r" = 1 ] || budget_left "w${SMALL_WAITERS}-r$r" || continue
    fanout "w${SMALL_WAITERS}-r$r" "$SMALL_WAITERS" $(( (r - 1) % 3 ))
done
for r in $(seq 1 "$ROUNDS"); do
    fanout "w${WAITERS}-r$r" "$WAITERS" $(( (r - 1) % 3 ))
done
if [ "$NOISE_WRITES" -gt 0 ] && budget_left "noise-test"; then
    log "noise: $NOISE_WRITES unrelated KV writes without waiters"
    wait_quiet_catalog "noise-w0"
    run_client "noise-w0" noise --write-server 0 --noise-writes "$NOISE_WRITES"
    fanout "noise-w${WAITERS}" "$WAITERS" 0 --noise-writes "$NOISE_WRITES"
fi

# ---------------------------------------------------------------- per-connection memory
# A fresh one-server cluster (raft/http/grpc/dns 36304/36504/36604/36704),
# so that no earlier round has warmed its allocator: RSS per idle connection,
# then per blocking request on those connections, then after they close;
# two passes.
if [ -n "$SOLO_PID" ] && budget_left "connmem"; then
    solo_ok=0
    for _ in $(seq 1 40); do
        kill -0 "$SOLO_PID" 2>/dev/null || break
        l=$(http_get 36504 /v1/status/leader 2>/dev/null || true)
        if [ -n "$l" ] && [ "$l" != '""' ]; then solo_ok=1; break; fi
        sleep 0.5
    done
    if [ "$solo_ok" = 1 ]; then
        log "per-connection memory: $CONNMEM connections to a fresh one-server cluster"
        wait_quiet_catalog "connmem"
        CLIENT_PORTS=36504 CLIENT_PIDS=$SOLO_PID run_client connmem connmem --waiters "$CONNMEM" --wait "$WAIT"
    else
        log "one-server cluster for the memory check is not up; skipped (see meshwork-solo.log)"
    fi
    kill -TERM "$SOLO_PID" 2>/dev/null || true
fi

# ---------------------------------------------------------------- catalog scale
log "catalog scale: $SERVICES services x $INSTANCES instances, $SCALE_CONC connections"
wait_quiet_catalog "scale"
run_client "scale" scale --data-dirs "$WORK/n1,$WORK/n2,$WORK/n3" \
    --services "$SERVICES" --instances "$INSTANCES" --nodes "$SCALE_NODES" \
    --concurrency "$SCALE_CONC" --max-s "$SCALE_MAX_S"

if [ "$POST_SCALE_ROUND" = 1 ] && budget_left "postscale-round"; then
    fanout "postscale-w${WAITERS}" "$WAITERS" 1
fi

# ---------------------------------------------------------------- report
for i in 1 2 3; do
    printf 'server%s_log_lines=%s\n' "$i" "$(wc -l <"$WORK/logs/meshwork-$i.log")" >>"$RAW_DIR/meta.txt"
    printf 'server%s_log_warn_error=%s\n' "$i" "$(tail -n +"$((LOG_BASE[$i] + 1))" "$WORK/logs/meshwork-$i.log" | grep -ciE 'warn|error|panic' || true)" >>"$RAW_DIR/meta.txt"
done
echo "total_s=$SECONDS" >>"$RAW_DIR/meta.txt"
echo "skipped=${SKIPPED# }" >>"$RAW_DIR/meta.txt"
printf 'server1_log_base=%s\nserver2_log_base=%s\nserver3_log_base=%s\n' \
    "${LOG_BASE[1]}" "${LOG_BASE[2]}" "${LOG_BASE[3]}" >>"$RAW_DIR/meta.txt"
cp "$WORK"/logs/*.log "$RAW_DIR/"
python3 "$REPORT" "$RAW_DIR" >"$RAW_DIR/report.md"
cp "$RAW_DIR/report.md" "$RESULTS_FILE"
log "report: $RESULTS_FILE (raw data in $RAW_DIR); took ${SECONDS}s"
