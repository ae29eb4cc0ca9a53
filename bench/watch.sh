#!/usr/bin/env bash
# Watch fan-out benchmark: 10,000 watch subscribers on one topic across a
# three-server Meshwork cluster vs 10,000 watchers on one key across a
# three-member etcd 3.4 cluster (Debian's etcd-server), same load tool
# (bench/watch-fanout, Rust, tonic), same machine, same N and C.
# Then the sidecar agent's idle RSS.
#
#   sudo bash bench/watch.sh      # from anywhere; ~3 minutes plus builds on a quiet machine (longer when it waits for quiet)
#
# Every round runs in each client mode of the load tool (CLIENT_MODES):
#   full   each system's usual Rust client (tonic's generated Meshwork
#          client; the etcd-client crate), every message decoded with prost;
#   light  one raw-HTTP/2 gRPC subscriber (h2) that is the SAME code for both
#          systems: the request encoded once, messages split by their length
#          prefixes and recognised by their bytes. Only the method path, the
#          request bytes and the byte markers (END_OF_SNAPSHOT / created; the
#          new instance's ID / the written value) differ between systems. It
#          needs far less CPU per message, so the latencies show more of the
#          servers and less of the load tool.
#
# Per round and system: SUBSCRIBERS streams, subscriber i on server i mod 3,
# multiplexed over CONNS HTTP/2 connections per server (Meshwork:
# meshwork.v1.Watch/Subscribe to `service web`; etcd: one Watch stream per
# watcher on /bench/web, etcd-client's `watch`). When all are subscribed
# (END_OF_SNAPSHOT / watch created) the tool samples the servers' VmRSS,
# waits, then makes ONE write through one server (Meshwork: HTTP PUT
# /v1/catalog/register of a new `web` instance; etcd: gRPC Put of the key),
# and records when the write's acknowledgement arrived and when each
# subscriber received the change. The write goes through member
# ((round - 1) mod 3) + 1 in both systems. ROUNDS rounds; a round is one run
# per system and client mode, interleaved: the mode order alternates every
# round, the system order inside a mode alternates too (and is mirrored for
# the next mode), so neither a system nor a mode always goes first.
#
# Environment knobs (defaults in brackets):
#   SUBSCRIBERS  watch streams per round [10000]
#   CONNS        HTTP/2 connections per server, both systems [32]
#   ROUNDS       rounds per system and client mode [3]
#   CLIENT_MODES the load tool's client modes, in the first round's order
#                [full light]
#   TIMEOUT_S    delivery timeout after the write [30]
#   SETUP_TIMEOUT_S  time allowed to open all subscriptions [120]
#   OPEN_CONCURRENCY subscriptions being opened at once [512]
#   SETTLE_MS    after the last subscription: wait, then sample RSS [2000]
#   HOLD_MS      after the RSS sample: wait, then write [1000]
#   SIDECAR_IDLE_S  sidecar: seconds after /ready before reading RSS [5]
#   COST_N, COST_W  per-message CPU, measured last with watch-fanout/cpu.sh
#                in each client mode: COST_N streams (over CONNS connections)
#                on one `--dev` server, COST_W changes [SUBSCRIBERS / 3, the
#                share of one server in the rounds, rounded up; 40];
#                COST_W=0 skips it
#   SKIP_BUILD   1 = use the existing release binaries (Meshwork and the
#                load tool) [0]
#   QUIET_WAIT_S before each round, wait up to this long for the machine to
#                be idle (other processes skew a 2-core box) [90]
#   NOISE_PCT    a round during whose write/delivery window other processes
#                used more than this % of the machine is repeated [10]
#   MAX_ATTEMPTS at most this many tries per round [3]
#   MW_EXTRA_ARGS extra flags for meshwork-registry, word-split (experiments
#                only) []
#   BENCH_TMPDIR parent of the temporary data dirs [/var/tmp]
#   RESULTS_FILE where to write the report [bench/RESULTS-watch.md]
#   RAW_DIR      raw JSON, /proc samples, configs and logs
#                [bench/out/watch] (git-ignored)
#
# Ports: Meshwork raft/http/grpc/dns 1830N/1850N/1860N/1870N, etcd
# client/peer 2379N/2380N (N = 1..3), sidecar admin 19090, cpu.sh's server
# 28301/28501/28601/28701; the script refuses
# to start if one is taken. Everything listens on 127.0.0.1 only; every wait
# loop is bounded; the EXIT trap stops every process this script started
# and removes the temp dir.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
SUBSCRIBERS=${SUBSCRIBERS:-10000}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-3}
CLIENT_MODES=${CLIENT_MODES:-full light}
TIMEOUT_S=${TIMEOUT_S:-30}
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-120}
OPEN_CONCURRENCY=${OPEN_CONCURRENCY:-512}
SETTLE_MS=${SETTLE_MS:-2000}
HOLD_MS=${HOLD_MS:-1000}
SIDECAR_IDLE_S=${SIDECAR_IDLE_S:-5}
COST_N=${COST_N:-$(( (SUBSCRIBERS + 2) / 3 ))}
COST_W=${COST_W:-40}
SKIP_BUILD=${SKIP_BUILD:-0}
QUIET_WAIT_S=${QUIET_WAIT_S:-90}
NOISE_PCT=${NOISE_PCT:-10}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-3}
MW_EXTRA_ARGS=${MW_EXTRA_ARGS:-}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-watch.md}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/watch}
REPORT=$BENCH_DIR/watch-report.py
TOOL_DIR=$BENCH_DIR/watch-fanout
TOOL=$TOOL_DIR/target/release/watch-fanout
HOST=127.0.0.1
ETCD_KEY=/bench/web
SIDECAR_ADMIN=$HOST:19090

MW_PEERS="1@$HOST:18301,2@$HOST:18302,3@$HOST:18303"
MW_GRPC="$HOST:18601,$HOST:18602,$HOST:18603"
MW_HTTP="$HOST:18501,$HOST:18502,$HOST:18503"
ETCD_CLUSTER="e1=http://$HOST:23801,e2=http://$HOST:23802,e3=http://$HOST:23803"
ETCD_CLIENT="$HOST:23791,$HOST:23792,$HOST:23793"

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

read -r -a MODES <<<"$CLIENT_MODES"
[ "${#MODES[@]}" -gt 0 ] || die "CLIENT_MODES is empty"
for m in "${MODES[@]}"; do
    case "$m" in full|light) ;; *) die "CLIENT_MODES: unknown mode '$m' (full, light)" ;; esac
done

declare -a PIDS=()
declare -A MW_PID=() ETCD_PID=()
WORK=""
SIDECAR_PID=""

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    local i alive
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
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        # Keep the logs of a failed run.
        if [ "$rc" != 0 ] && [ -d "$WORK/logs" ] && [ -d "$RAW_DIR" ]; then
            cp "$WORK"/logs/*.log "$RAW_DIR/" 2>/dev/null
        fi
        rm -rf -- "$WORK"
    fi
    [ "$rc" = 0 ] || log "exited with status $rc (processes stopped, temp dir removed)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- prerequisites
need_tool_build() { [ "$SKIP_BUILD" != 1 ] || [ ! -x "$TOOL" ]; }

ensure_packages() {
    local -a missing=()
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    # The load tool's etcd client (etcd-client crate) runs protoc in its build
    # script and needs the well-known types; the Meshwork client uses protox.
    if need_tool_build; then
        command -v protoc >/dev/null || missing+=(protobuf-compiler)
        [ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
    fi
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root or install them first"
    local p need_update=0
    for p in "${missing[@]}"; do
        apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]' || need_update=1
    done
    if [ "$need_update" = 1 ]; then
        log "apt-get update"
        apt-get update -q >&2
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# Free = can be bound the way the servers bind it (SO_REUSEADDR).
port_free() {
    python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind((sys.argv[1], int(sys.argv[2])))
except OSError: sys.exit(1)' "$HOST" "$1"
}

check_ports() {
    local p
    for p in 18301 18302 18303 18501 18502 18503 18601 18602 18603 18701 18702 18703 \
             23791 23792 23793 23801 23802 23803 19090 28301 28501 28601 28701; do
        port_free "$p" || die "port $HOST:$p is already in use"
    done
}

# ---------------------------------------------------------------- /proc helpers
CLK_TCK=$(getconf CLK_TCK)
rss_kb() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
sys_cpu() { awk '/^cpu /{idle=$5+$6; t=0; for(i=2;i<=NF;i++) t+=$i; print t, idle}' /proc/stat; }

busy_pct() { # seconds -> machine CPU busy % over that time
    local a b
    a=$(sys_cpu); sleep "$1"; b=$(sys_cpu)
    awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); dt=y[1]-x[1]; di=y[2]-x[2]; printf "%.0f", (dt>0 ? 100*(dt-di)/dt : 0)}'
}

# Waits (bounded) until the machine has been idle for two 2-second samples in
# a row; records the last sample (and how long it waited) in quiet.tsv.
wait_quiet() { # label
    local deadline=$((SECONDS + QUIET_WAIT_S)) t0=$SECONDS b1 b2 said=0
    b1=$(busy_pct 2); b2=$(busy_pct 2)
    while { [ "$b1" -gt 15 ] || [ "$b2" -gt 15 ]; } && [ "$SECONDS" -lt "$deadline" ]; do
        if [ "$said" = 0 ]; then
            log "  machine is ${b2}% busy without load (someone else?); waiting up to ${QUIET_WAIT_S}s"
            ps -eo pid,pcpu,comm --sort=-pcpu | sed -n 2,4p >&2
            said=1
        fi
        b1=$b2; b2=$(busy_pct 2)
    done
    printf '%s\t%s\t%s\n' "$1" "$b2" "$((SECONDS - t0))" >>"$RAW_DIR/quiet.tsv"
    [ "$b2" -gt 15 ] && log "  machine still ${b2}% busy; measuring anyway (recorded)"
    return 0
}

# ---------------------------------------------------------------- clusters
start_meshwork() {
    local i
    for i in 1 2 3; do
        mkdir -p "$WORK/mw/n$i"
        # shellcheck disable=SC2086
        "$MW_BIN" --node-id "$i" --data-dir "$WORK/mw/n$i" \
            --http-addr "$HOST:1850$i" --grpc-addr "$HOST:1860$i" \
            --raft-addr "$HOST:1830$i" --dns-addr "$HOST:1870$i" \
            --peers "$MW_PEERS" --log-level warn $MW_EXTRA_ARGS \
            >"$WORK/logs/meshwork-$i.log" 2>&1 &
        MW_PID[$i]=$!
        PIDS+=("$!")
    done
}

start_etcd() {
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

check_alive() { # name pid log
    kill -0 "$2" 2>/dev/null && return 0
    tail -n 20 "$3" >&2 || true
    die "$1 (pid $2) exited"
}

check_all_alive() {
    local i
    for i in 1 2 3; do
        check_alive "meshwork-$i" "${MW_PID[$i]}" "$WORK/logs/meshwork-$i.log"
        check_alive "etcd-$i" "${ETCD_PID[$i]}" "$WORK/logs/etcd-$i.log"
    done
}

# Prints the node number (1..3) of the Meshwork leader, or nothing.
meshwork_leader() {
    local i raw
    for i in 1 2 3; do
        raw=$(curl -s -m 2 "http://$HOST:1850$i/v1/status/leader" 2>/dev/null) || continue
        case "$raw" in
            *"$HOST:1830"[123]*) raw=${raw##*:1830}; echo "${raw:0:1}"; return 0 ;;
        esac
    done
}

# Prints the member number (1..3) of the etcd leader, or nothing.
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

wait_ready() {
    local deadline=$((SECONDS + 60))
    MW_LEADER="" ETCD_LEADER=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        check_all_alive
        [ -z "$MW_LEADER" ] && MW_LEADER=$(meshwork_leader)
        [ -z "$ETCD_LEADER" ] && ETCD_LEADER=$(etcd_leader)
        if [ -n "$MW_LEADER" ] && [ -n "$ETCD_LEADER" ]; then
            local a b
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

# The topic before the rounds: three `web` instances (Meshwork) and a value of
# the same shape under the key (etcd).
seed() {
    local k out n c p
    for k in 1 2 3; do
        out=$(curl -sS -m 10 -X PUT "http://$HOST:1850$k/v1/catalog/register" \
            -d "{\"Node\":\"web-host-$k\",\"Address\":\"198.18.0.$k\",\"Service\":{\"Service\":\"web\",\"ID\":\"web-$k\",\"Port\":8080}}")
        [ "$out" = true ] || die "seed registration via server $k answered: $out"
    done
    for _ in $(seq 1 40); do
        n=0
        for p in 18501 18502 18503; do
            c=$(curl -sS -m 5 "http://$HOST:$p/v1/health/service/web?stale" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' || echo 0)
            [ "$c" = 3 ] && n=$((n + 1))
        done
        [ "$n" = 3 ] && break
        sleep 0.25
    done
    [ "$n" = 3 ] || die "not every Meshwork server sees the 3 seed instances of web"
    local v='{"Node":"web-host-1","Address":"198.18.0.1","Service":{"Service":"web","ID":"web-1","Port":8080}}'
    out=$(curl -sS -m 10 -X POST -d "{\"key\":\"$(b64 "$ETCD_KEY")\",\"value\":\"$(b64 "$v")\"}" \
        "http://$HOST:2379$ETCD_LEADER/v3/kv/put")
    [[ "$out" == *'"header"'* ]] || die "etcd seed put answered: $out"
}

snapshot_rss() { # label -> rss.tsv: label system member role VmRSS VmHWM
    local i
    for i in 1 2 3; do
        printf '%s\tmeshwork\t%s\t%s\t%s\t%s\n' "$1" "$i" "$([ "$i" = "$MW_LEADER" ] && echo leader || echo follower)" \
            "$(rss_kb "${MW_PID[$i]}" VmRSS)" "$(rss_kb "${MW_PID[$i]}" VmHWM)" >>"$RAW_DIR/rss.tsv"
    done
    for i in 1 2 3; do
        printf '%s\tetcd\t%s\t%s\t%s\t%s\n' "$1" "$i" "$([ "$i" = "$ETCD_LEADER" ] && echo leader || echo follower)" \
            "$(rss_kb "${ETCD_PID[$i]}" VmRSS)" "$(rss_kb "${ETCD_PID[$i]}" VmHWM)" >>"$RAW_DIR/rss.tsv"
    done
}

# ---------------------------------------------------------------- one round
# run_round SYSTEM ROUND WRITE_MEMBER MODE SEQ -> appends the tool's JSON to
# results.jsonl (SEQ: the run's place in the whole sequence, for the report)
run_round() {
    local sys=$1 r=$2 ws=$3 mode=$4 seq=$5 attempt out label leader pids others tag
    for attempt in $(seq 1 "$MAX_ATTEMPTS"); do
        label="$sys-$mode-r$r-a$attempt"
        tag="$mode-r$r-a$attempt"
        if [ "$sys" = meshwork ]; then
            leader=$(meshwork_leader)
            pids="${MW_PID[1]},${MW_PID[2]},${MW_PID[3]}"
            others="${ETCD_PID[1]},${ETCD_PID[2]},${ETCD_PID[3]}"
        else
            leader=$(etcd_leader)
            pids="${ETCD_PID[1]},${ETCD_PID[2]},${ETCD_PID[3]}"
            others="${MW_PID[1]},${MW_PID[2]},${MW_PID[3]}"
        fi
        wait_quiet "$label"
        log "$sys round $r, $mode client$([ "$attempt" -gt 1 ] && echo " (attempt $attempt)"): $SUBSCRIBERS subscribers, $CONNS conns/server, write via member $ws (leader: ${leader:-?})"
        local -a args=(--subscribers "$SUBSCRIBERS" --conns "$CONNS" --write-server "$ws"
            --open-concurrency "$OPEN_CONCURRENCY" --setup-timeout "$SETUP_TIMEOUT_S"
            --timeout "$TIMEOUT_S" --settle-ms "$SETTLE_MS" --hold-ms "$HOLD_MS"
            --pids "$pids" --other-pids "$others" --clk-tck "$CLK_TCK" --label "$label"
            --client "$mode" --meta "client=$mode" --meta "seq=$seq"
            --meta "round=$r" --meta "attempt=$attempt" --meta "leader=${leader:-}"
            --new-id "web-new-$tag" --new-node "bench-$tag"
            --new-address "10.9.$r.$(( attempt + $([ "$mode" = light ] && echo 10 || echo 0) ))")
        if [ "$sys" = meshwork ]; then
            args=(meshwork --servers "$MW_GRPC" --http "$MW_HTTP" "${args[@]}")
        else
            args=(etcd --servers "$ETCD_CLIENT" --key "$ETCD_KEY" --value-tag "$tag" "${args[@]}")
        fi
        out=$(timeout --kill-after=10 $((SETUP_TIMEOUT_S + TIMEOUT_S + 120)) "$TOOL" "${args[@]}" \
            2>>"$RAW_DIR/client.log") || true
        [ -n "$out" ] || out="{\"kind\":\"failed\",\"label\":\"$label\",\"system\":\"$sys\",\"error\":\"load tool produced no output (see client.log)\"}"
        # Meshwork: remove the instance again so every round sees the same topic.
        if [ "$sys" = meshwork ]; then
            curl -sS -m 10 -X PUT "http://$HOST:1850$ws/v1/catalog/deregister" \
                -d "{\"Node\":\"bench-$tag\"}" >/dev/null 2>&1 || true
        fi
        check_all_alive
        python3 "$REPORT" --line "$out" >&2 || true
        if [ "$attempt" -lt "$MAX_ATTEMPTS" ] && python3 "$REPORT" --noisy "$out" "$NOISE_PCT"; then
            log "  other processes used more than ${NOISE_PCT}% of the machine during the write/delivery window; repeating"
            printf '%s\n' "$out" >>"$RAW_DIR/discarded.jsonl"
            sleep 3
            continue
        fi
        printf '%s\n' "$out" >>"$RAW_DIR/results.jsonl"
        break
    done
    # Let the servers release the closed streams before the next round.
    sleep 3
}

# ---------------------------------------------------------------- sidecar
measure_sidecar() {
    local conf=$RAW_DIR/sidecar.toml code="" i t0 st
    cat >"$conf" <<EOF
# bench/watch.sh: the sidecar agent's idle memory
[registry]
addresses = ["$HOST:18601", "$HOST:18602", "$HOST:18603"]

[service]
name = "bench"
id = "bench-1"
address = "$HOST"
port = 1

[[service.checks]]
tcp = "$HOST:18501"
interval = "10s"
timeout = "1s"

[session]
node = "bench-sidecar-host"

[admin]
listen = "$SIDECAR_ADMIN"
EOF
    : >"$RAW_DIR/sidecar.tsv"
    "$SIDECAR_BIN" --config "$conf" >"$WORK/logs/sidecar.log" 2>&1 &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    t0=$SECONDS
    for i in $(seq 1 150); do
        kill -0 "$SIDECAR_PID" 2>/dev/null || { tail -n 20 "$WORK/logs/sidecar.log" >&2; die "sidecar exited before /ready"; }
        code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://$SIDECAR_ADMIN/ready" || true)
        [ "$code" = 200 ] && break
        sleep 0.2
    done
    [ "$code" = 200 ] || die "sidecar not ready within 30 s (last /ready status '$code')"
    log "sidecar ready after $((SECONDS - t0)) s; idle ${SIDECAR_IDLE_S} s"
    printf 'ready_after_s\t%s\n' "$((SECONDS - t0))" >>"$RAW_DIR/sidecar.tsv"
    for i in $(seq 1 "$SIDECAR_IDLE_S"); do
        sleep 1
        printf 'sample\t%s\t%s\t%s\n' "$i" "$(rss_kb "$SIDECAR_PID" VmRSS)" "$(rss_kb "$SIDECAR_PID" VmHWM)" >>"$RAW_DIR/sidecar.tsv"
    done
    {
        printf 'VmRSS\t%s\n' "$(rss_kb "$SIDECAR_PID" VmRSS)"
        printf 'VmHWM\t%s\n' "$(rss_kb "$SIDECAR_PID" VmHWM)"
        printf 'RssAnon\t%s\n' "$(rss_kb "$SIDECAR_PID" RssAnon)"
        printf 'RssFile\t%s\n' "$(rss_kb "$SIDECAR_PID" RssFile)"
        printf 'Threads\t%s\n' "$(rss_kb "$SIDECAR_PID" Threads)"
        printf 'binary_bytes\t%s\n' "$(stat -c %s "$SIDECAR_BIN")"
    } >>"$RAW_DIR/sidecar.tsv"
    curl -s -m 2 "http://$SIDECAR_ADMIN/status" >"$RAW_DIR/sidecar-status.json" 2>/dev/null || true
    kill -TERM "$SIDECAR_PID" 2>/dev/null || true
    st=""
    for i in $(seq 1 100); do
        kill -0 "$SIDECAR_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SIDECAR_PID" 2>/dev/null; then
        log "sidecar still running 10 s after SIGTERM; SIGKILL"
        kill -KILL "$SIDECAR_PID" 2>/dev/null || true
    fi
    wait "$SIDECAR_PID" 2>/dev/null && st=0 || st=$?
    printf 'exit_status\t%s\n' "$st" >>"$RAW_DIR/sidecar.tsv"
    SIDECAR_PID=""
}

# ================================================================ main
START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ensure_packages
check_ports

# File descriptors (the tool multiplexes, but keep headroom for the servers).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
log "open-file limit: $NOFILE"

if [ "$SKIP_BUILD" != 1 ]; then
    log "cargo build --release --bin meshwork-registry --bin meshwork-sidecar"
    (cd "$REPO_DIR" && timeout 1800 cargo build --release --bin meshwork-registry --bin meshwork-sidecar) >&2
fi
MW_BIN=${MW_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/meshwork-registry}
SIDECAR_BIN=${SIDECAR_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/meshwork-sidecar}
[ -x "$MW_BIN" ] || die "no binary at $MW_BIN"
[ -x "$SIDECAR_BIN" ] || die "no binary at $SIDECAR_BIN"
if need_tool_build; then
    log "cargo build --release (load tool, $TOOL_DIR)"
    (cd "$TOOL_DIR" && CARGO_TARGET_DIR="$TOOL_DIR/target" timeout 1800 cargo build --release) >&2
fi
[ -x "$TOOL" ] || die "no load tool at $TOOL"

# Raw data: only ever replace a RAW_DIR that this script made (marker file).
if [ -e "$RAW_DIR" ]; then
    [ -f "$RAW_DIR/.watch-raw" ] || die "RAW_DIR $RAW_DIR exists and was not made by this script; pick another"
    rm -rf -- "$RAW_DIR"
fi
mkdir -p "$RAW_DIR"; : >"$RAW_DIR/.watch-raw"
: >"$RAW_DIR/results.jsonl"; : >"$RAW_DIR/discarded.jsonl"; : >"$RAW_DIR/quiet.tsv"
: >"$RAW_DIR/rss.tsv"; : >"$RAW_DIR/client.log"

mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-watch-bench.XXXXXX")
mkdir -p "$WORK/logs"

{
    echo "date_utc=$START_TS"
    echo "nproc=$(nproc)"
    echo "cpu_model=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
    echo "mem_total=$(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
    echo "kernel=$(uname -r)"
    echo "os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
    echo "fs=$(df -PT "$WORK" | awk 'NR==2{print $2" ("$1")"}')"
    echo "etcd_version=$(etcd --version 2>/dev/null | awk '/etcd Version/{print $3}')"
    echo "etcd_go=$(etcd --version 2>/dev/null | awk '/Go Version/{print $3}')"
    echo "meshwork_version=$("$MW_BIN" --version 2>/dev/null | head -n1)"
    echo "meshwork_binary_mtime=$(date -u -r "$MW_BIN" +%Y-%m-%dT%H:%M:%SZ)"
    echo "sidecar_binary_mtime=$(date -u -r "$SIDECAR_BIN" +%Y-%m-%dT%H:%M:%SZ)"
    echo "rustc=$(rustc --version 2>/dev/null)"
    echo "tool_deps=$(cd "$TOOL_DIR" && awk '/^name = "(tonic|etcd-client|prost|tokio|h2|hyper)"$/{n=$3; getline; print n"@"$3}' Cargo.lock | tr -d '"' | tr '\n' ' ')"
    echo "git_rev=$(git -C "$REPO_DIR" --no-optional-locks rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "git_dirty=$(git -C "$REPO_DIR" --no-optional-locks status --porcelain 2>/dev/null | awk '$2 !~ /^bench\//' | grep -c . || true)"
    echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "nofile=$NOFILE"
    echo "clk_tck=$CLK_TCK"
    echo "subscribers=$SUBSCRIBERS"
    echo "conns=$CONNS"
    echo "rounds=$ROUNDS"
    echo "client_modes=${MODES[*]}"
    echo "timeout_s=$TIMEOUT_S"
    echo "setup_timeout_s=$SETUP_TIMEOUT_S"
    echo "open_concurrency=$OPEN_CONCURRENCY"
    echo "settle_ms=$SETTLE_MS"
    echo "hold_ms=$HOLD_MS"
    echo "sidecar_idle_s=$SIDECAR_IDLE_S"
    echo "cost_n=$COST_N"
    echo "cost_w=$COST_W"
    echo "noise_pct=$NOISE_PCT"
    echo "mw_extra_args=$MW_EXTRA_ARGS"
    echo "skip_build=$SKIP_BUILD"
} >"$RAW_DIR/machine.txt"
free -h >"$RAW_DIR/free.txt"
ps -eo pid,pcpu,etime,comm --sort=-pcpu | head -n 8 >"$RAW_DIR/ps-before.txt"

log "starting clusters in $WORK"
start_meshwork
start_etcd
wait_ready
seed
sleep 2
snapshot_rss idle
echo "mw_leader_start=$MW_LEADER" >>"$RAW_DIR/machine.txt"
# Log lines from here on count as warnings after startup (elections and peer
# connections log a few warnings while the clusters form).
for i in 1 2 3; do
    echo "meshwork_log_base_$i=$(wc -l <"$WORK/logs/meshwork-$i.log")" >>"$RAW_DIR/machine.txt"
    echo "etcd_log_base_$i=$(wc -l <"$WORK/logs/etcd-$i.log")" >>"$RAW_DIR/machine.txt"
done
echo "etcd_leader_start=$ETCD_LEADER" >>"$RAW_DIR/machine.txt"

# Order: round r takes the modes rotated by r - 1 (full light, light full,
# ...). The first mode of a round starts with Meshwork in rounds 1-2, 5-6, ...
# and with etcd in rounds 3-4, 7-8, ... (every other round with one mode);
# each further mode of the round mirrors the previous one's system order
# (ABBA), so the same system runs twice in a row across a mode change.
NM=${#MODES[@]}
SEQ=0
for r in $(seq 1 "$ROUNDS"); do
    ws=$(( (r - 1) % 3 + 1 ))
    if [ "$NM" -gt 1 ]; then flip=$(( ((r - 1) / 2) % 2 )); else flip=$(( (r - 1) % 2 )); fi
    for j in $(seq 0 $((NM - 1))); do
        mode=${MODES[$(( (j + r - 1) % NM ))]}
        if [ $(( (flip + j) % 2 )) = 0 ]; then order="meshwork etcd"; else order="etcd meshwork"; fi
        for sys in $order; do
            SEQ=$((SEQ + 1))
            run_round "$sys" "$r" "$ws" "$mode" "$SEQ"
        done
    done
    snapshot_rss "after-round-$r"
done

log "sidecar idle RSS"
wait_quiet sidecar
measure_sidecar
snapshot_rss end

# The CPU one message costs the server and the load tool's receiving side,
# each client mode (what the report's cost floor is computed from).
if [ "$COST_W" -gt 0 ]; then
    for mode in "${MODES[@]}"; do
        log "per-message CPU, $mode client (watch-fanout/cpu.sh $COST_N $COST_W)"
        wait_quiet "cost-$mode"
        if ! CLIENT=$mode CONNS=$CONNS MW_BIN=$MW_BIN bash "$TOOL_DIR/cpu.sh" "$COST_N" "$COST_W" \
            >"$RAW_DIR/cost-$mode.txt" 2>&1; then
            log "  cpu.sh failed; see $RAW_DIR/cost-$mode.txt"
        fi
    done
fi

echo "mw_leader_end=$(meshwork_leader)" >>"$RAW_DIR/machine.txt"
echo "etcd_leader_end=$(etcd_leader)" >>"$RAW_DIR/machine.txt"
echo "total_s=$SECONDS" >>"$RAW_DIR/machine.txt"
echo "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW_DIR/machine.txt"
cp "$WORK"/logs/*.log "$RAW_DIR"/
python3 "$REPORT" "$RAW_DIR" >"$RAW_DIR/report.md"
cp "$RAW_DIR/report.md" "$RESULTS_FILE"
log "wrote $RESULTS_FILE (raw data in $RAW_DIR); took ${SECONDS}s"
