#!/usr/bin/env bash
# Steady-state elections under load: a three-server Meshwork cluster with its
# default timings (heartbeat 100 ms, election timeout 300 ms) and a
# three-member etcd cluster (its defaults: heartbeat 100 ms, election 1000 ms),
# one after the other on 127.0.0.1, each written by wrk at CONNS connections
# for DURATION seconds (bench/wrk-put.lua, 256-byte values). Nothing is killed
# or cut: every term change in the run is an election no one asked for.
#
#   bash bench/elections.sh       # writes bench/RESULTS-elections.md
#
# Environment knobs (defaults in brackets):
#   DURATION     seconds of load per system [600]
#   CONNS        wrk connections [64]
#   SKIP_BUILD   1 = use the existing release binary [0]
#   BENCH_TMPDIR parent of the temporary data dirs [/var/tmp] (a real disk)
#   RESULTS_FILE where to write the report [bench/RESULTS-elections.md]
#   MW_EXTRA_ARGS extra flags for meshwork-registry (e.g. other timings) []
#   SKIP_ETCD    1 = Meshwork only, no report (a quick look at the logs) [0]
#   RAW_DIR      where the servers' logs are kept [bench/out/elections]
#
# Everything listens on 127.0.0.1 only; every wait loop is bounded; the EXIT
# trap stops every process this script started and removes the temp dir.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source=lib.sh
. "$BENCH_DIR/lib.sh"
LOG_TAG=elections
DURATION=${DURATION:-600}
CONNS=${CONNS:-64}
SKIP_BUILD=${SKIP_BUILD:-0}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-elections.md}
MW_EXTRA_ARGS=${MW_EXTRA_ARGS:-}
SKIP_ETCD=${SKIP_ETCD:-0}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/elections}
LUA=$BENCH_DIR/wrk-put.lua
declare -A MW_PID=() ETCD_PID=()

ensure_packages etcd:etcd-server wrk:wrk curl:curl python3:python3
check_ports 18301 18302 18303 18501 18502 18503 18601 18602 18603 18701 18702 18703 \
    23791 23792 23793 23801 23802 23803
if [ "$SKIP_BUILD" != 1 ]; then
    build_release 0 --bin meshwork-registry
fi
MW_BIN=${MW_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/meshwork-registry}
[ -x "$MW_BIN" ] || die "no binary at $MW_BIN"
mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-elections.XXXXXX")
mkdir -p "$WORK/logs"
raise_nofile
keep_logs() { rm -rf "$RAW_DIR"; mkdir -p "$RAW_DIR"; cp -r "$WORK/logs/." "$RAW_DIR/" 2>/dev/null || true; }
add_cleanup_after_stop keep_logs

# metric BASE_URL NAME: the value of a Prometheus metric (first sample).
metric() {
    curl -s -m 5 "$1/metrics" | awk -v n="$2" '$1==n || index($1, n"{")==1 {print $2; exit}'
}

# mw_terms / etcd_terms: "term1 term2 term3 changes1 changes2 changes3".
mw_state() {
    local i terms="" changes="" fast=""
    for i in 1 2 3; do
        terms+="$(metric "http://$HOST:1850$i" meshwork_raft_term) "
        changes+="$(metric "http://$HOST:1850$i" meshwork_raft_leader_changes_total) "
        fast+="$(metric "http://$HOST:1850$i" meshwork_raft_fast_elections_total) "
    done
    echo "$terms| $changes| $fast"
}
etcd_state() {
    local i terms="" changes=""
    for i in 1 2 3; do
        terms+="$(curl -s -m 5 -X POST -d '{}' "http://$HOST:2379$i/v3/maintenance/status" |
            python3 -c 'import json,sys; print(json.load(sys.stdin).get("raftTerm", "?"))') "
        changes+="$(metric "http://$HOST:2379$i" etcd_server_leader_changes_seen_total) "
    done
    echo "$terms| $changes"
}

# await_leader FN NAME: the leader's number from FN (meshwork_leader,
# etcd_leader) once it names one (at most 60 s), then 2 s to settle.
await_leader() {
    local deadline=$((SECONDS + 60)) leader=""
    while [ -z "$leader" ] && [ "$SECONDS" -lt "$deadline" ]; do
        leader=$("$1"); [ -n "$leader" ] || sleep 0.5
    done
    [ -n "$leader" ] || die "no $2 leader within 60 s"
    sleep 2
    echo "$leader"
}

# load SYSTEM URL OUT: wrk at CONNS for DURATION.
load() {
    timeout --signal=INT --kill-after=10 $((DURATION + 60)) \
        wrk -t2 -c"$CONNS" -d"${DURATION}s" --timeout 10s --latency -s "$LUA" "$2" -- "$1" "el" \
        >"$3" 2>&1 || die "wrk failed for $1 (see $3)"
}

# ---------------------------------------------------------------- Meshwork
log "Meshwork: three servers, defaults, $CONNS connections for $DURATION s"
# shellcheck disable=SC2086
start_meshwork_cluster "$WORK/mw" 1830 1850 1860 1870 $MW_EXTRA_ARGS
MW_LEADER=$(await_leader meshwork_leader Meshwork)
mw_before=$(mw_state)
load meshwork "http://$HOST:1850$MW_LEADER" "$WORK/mw-wrk.txt"
mw_after=$(mw_state)
for i in 1 2 3; do check_alive "meshwork $i" "${MW_PID[$i]}" "$WORK/logs/meshwork-$i.log"; done
mw_result=$(sed -n 's/^RESULT //p' "$WORK/mw-wrk.txt")
for i in 1 2 3; do kill -TERM "${MW_PID[$i]}" 2>/dev/null || true; done
for i in 1 2 3; do wait "${MW_PID[$i]}" 2>/dev/null || true; done
log "Meshwork: terms/changes/fast before: $mw_before; after: $mw_after; $mw_result"
if [ "$SKIP_ETCD" = 1 ]; then
    exit 0
fi

# ---------------------------------------------------------------- etcd
log "etcd: three members, defaults, $CONNS connections for $DURATION s"
start_etcd_cluster
ETCD_LEADER=$(await_leader etcd_leader etcd)
etcd_before=$(etcd_state)
load etcd "http://$HOST:2379$ETCD_LEADER" "$WORK/etcd-wrk.txt"
etcd_after=$(etcd_state)
etcd_result=$(sed -n 's/^RESULT //p' "$WORK/etcd-wrk.txt")

# ---------------------------------------------------------------- report
python3 - "$RESULTS_FILE" "$DURATION" "$CONNS" "$(git_rev)" "$(cpu_model)" "$(nproc)" \
    "$mw_before" "$mw_after" "$mw_result" "$etcd_before" "$etcd_after" "$etcd_result" \
    "$MW_EXTRA_ARGS" <<'EOF'
import sys, datetime
(out, duration, conns, rev, cpu, nproc, mwb, mwa, mwr, eb, ea, er, extra) = sys.argv[1:]

def nums(part):
    return [float(x) for x in part.split()]

def parse(s):
    return [nums(p) for p in s.split("|")]

def result(line):
    return dict(kv.split("=", 1) for kv in line.split())

mb, ma = parse(mwb), parse(mwa)
eb_, ea_ = parse(eb), parse(ea)
mw_terms = max(ma[0]) - max(mb[0])
mw_changes = [a - b for a, b in zip(ma[1], mb[1])]
mw_fast = [a - b for a, b in zip(ma[2], mb[2])]
etcd_terms = max(ea_[0]) - max(eb_[0])
etcd_changes = [a - b for a, b in zip(ea_[1], eb_[1])]
r_mw, r_etcd = result(mwr), result(er)

def rate(r):
    return float(r.get("ok", 0)) / float(duration)

def failed(r):
    keys = ["non2xx", "badbody", "connect_err", "read_err", "write_err", "timeout_err"]
    return sum(int(r.get(k, 0)) for k in keys)

def ms(r, k):
    return f"{int(r.get(k, 0)) / 1000:.1f}"

lines = [
    "# Steady-state elections under write load",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {nproc} cores ({cpu}), "
    f"git {rev}. Command: `DURATION={duration} CONNS={conns} bash bench/elections.sh`"
    + (f" with `MW_EXTRA_ARGS={extra}`" if extra else "") + ".",
    "",
    f"Each system: three servers on 127.0.0.1 with their default timings, written by wrk "
    f"at {conns} connections for {duration} s (256-byte values, a new key per request), "
    "one system after the other. Nothing is killed or cut, so every term change is an "
    "election no one asked for.",
    "",
    "| | Meshwork (heartbeat 100 ms, election 300 ms) | etcd (heartbeat 100 ms, election 1000 ms) |",
    "|---|---|---|",
    f"| term changes during the run | {mw_terms:.0f} | {etcd_terms:.0f} |",
    f"| leader changes seen, per server | {', '.join(f'{c:.0f}' for c in mw_changes)} | {', '.join(f'{c:.0f}' for c in etcd_changes)} |",
    f"| fast elections called (leader's port refused) | {', '.join(f'{c:.0f}' for c in mw_fast)} | — |",
    f"| acknowledged writes/s | {rate(r_mw):,.0f} | {rate(r_etcd):,.0f} |",
    f"| failed requests | {failed(r_mw)} | {failed(r_etcd)} |",
    f"| latency p99 / p99.9 / max, ms | {ms(r_mw, 'p99_us')} / {ms(r_mw, 'p999_us')} / {ms(r_mw, 'max_us')} | {ms(r_etcd, 'p99_us')} / {ms(r_etcd, 'p999_us')} / {ms(r_etcd, 'max_us')} |",
    "",
]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
EOF
log "wrote $RESULTS_FILE"
