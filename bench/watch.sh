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
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
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
ETCD_KEY=/bench/web
SIDECAR_ADMIN=$HOST:19090

MW_GRPC="$HOST:18601,$HOST:18602,$HOST:18603"
MW_HTTP="$HOST:18501,$HOST:18502,$HOST:18503"
ETCD_CLIENT="$HOST:23791,$HOST:23792,$HOST:23793"

read -r -a MODES <<<"$CLIENT_MODES"
[ "${#MODES[@]}" -gt 0 ] || die "CLIENT_MODES is empty"
for m in "${MODES[@]}"; do
    case "$m" in full|light) ;; *) die "CLIENT_MODES: unknown mode '$m' (full, light)" ;; esac
done

declare -A MW_PID=() ETCD_PID=()
SIDECAR_PID=""

# Keep the logs of a failed run.
keep_logs_on_failure() {
    if [ "$BENCH_EXIT_RC" != 0 ] && [ -n "$WORK" ] && [ -d "$WORK/logs" ] && [ -d "$RAW_DIR" ]; then
        cp "$WORK"/logs/*.log "$RAW_DIR/" 2>/dev/null
    fi
}
add_cleanup_after_stop keep_logs_on_failure

# ---------------------------------------------------------------- prerequisites
need_tool_build() { [ "$SKIP_BUILD" != 1 ] || [ ! -x "$TOOL" ]; }

ensure_watch_packages() {
    local -a specs=(etcd:etcd-server etcdctl:etcd-client curl:curl python3:python3)
    # The load tool's etcd client (etcd-client crate) runs protoc in its build
    # script and needs the well-known types; the Meshwork client uses protox.
    if need_tool_build; then
        specs+=(protoc:protobuf-compiler /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev)
    fi
    ensure_packages "${specs[@]}"
}

check_watch_ports() {
    check_ports 18301 18302 18303 18501 18502 18503 18601 18602 18603 18701 18702 18703 \
        23791 23792 23793 23801 23802 23803 19090 28301 28501 28601 28701
}

# Waits (bounded) for an idle machine (lib.sh); records the last sample (and
# how long it waited) in quiet.tsv.
wait_quiet_watch() { # label
    wait_quiet
    printf '%s\t%s\t%s\n' "$1" "$QUIET_BUSY" "$QUIET_WAITED" >>"$RAW_DIR/quiet.tsv"
}

# ---------------------------------------------------------------- clusters
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
        wait_quiet_watch "$label"
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
        check_clusters_alive
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
ensure_watch_packages
check_watch_ports

# File descriptors (the tool multiplexes, but keep headroom for the servers).
raise_nofile
log "open-file limit: $NOFILE"

if [ "$SKIP_BUILD" != 1 ]; then
    build_release 1800 --bin meshwork-registry --bin meshwork-sidecar
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
claim_raw_dir "$RAW_DIR" .watch-raw
: >"$RAW_DIR/results.jsonl"; : >"$RAW_DIR/discarded.jsonl"; : >"$RAW_DIR/quiet.tsv"
: >"$RAW_DIR/rss.tsv"; : >"$RAW_DIR/client.log"

mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-watch-bench.XXXXXX")
mkdir -p "$WORK/logs"

{
    echo "date_utc=$START_TS"
    echo "nproc=$(nproc)"
    echo "cpu_model=$(cpu_model)"
    echo "mem_total=$(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
    echo "kernel=$(uname -r)"
    echo "os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
    echo "fs=$(fs_of "$WORK")"
    echo "etcd_version=$(etcd --version 2>/dev/null | awk '/etcd Version/{print $3}')"
    echo "etcd_go=$(etcd --version 2>/dev/null | awk '/Go Version/{print $3}')"
    echo "meshwork_version=$("$MW_BIN" --version 2>/dev/null | head -n1)"
    echo "meshwork_binary_mtime=$(date -u -r "$MW_BIN" +%Y-%m-%dT%H:%M:%SZ)"
    echo "sidecar_binary_mtime=$(date -u -r "$SIDECAR_BIN" +%Y-%m-%dT%H:%M:%SZ)"
    echo "rustc=$(rustc --version 2>/dev/null)"
    echo "tool_deps=$(cd "$TOOL_DIR" && awk '/^name = "(tonic|etcd-client|prost|tokio|h2|hyper)"$/{n=$3; getline; print n"@"$3}' Cargo.lock | tr -d '"' | tr '\n' ' ')"
    echo "git_rev=$(git_rev)"
    echo "git_dirty=$(git_status | awk '$2 !~ /^bench\//' | grep -c . || true)"
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
# shellcheck disable=SC2086 # MW_EXTRA_ARGS is word-split on purpose
start_meshwork_cluster "$WORK/mw/n" 1830 1850 1860 1870 $MW_EXTRA_ARGS
start_etcd_cluster
wait_clusters_ready
seed
sleep 2
snapshot_rss idle "$RAW_DIR/rss.tsv"
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
    snapshot_rss "after-round-$r" "$RAW_DIR/rss.tsv"
done

log "sidecar idle RSS"
wait_quiet_watch sidecar
measure_sidecar
snapshot_rss end "$RAW_DIR/rss.tsv"

# The CPU one message costs the server and the load tool's receiving side,
# each client mode (what the report's cost floor is computed from).
if [ "$COST_W" -gt 0 ]; then
    for mode in "${MODES[@]}"; do
        log "per-message CPU, $mode client (watch-fanout/cpu.sh $COST_N $COST_W)"
        wait_quiet_watch "cost-$mode"
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
