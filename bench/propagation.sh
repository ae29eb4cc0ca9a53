#!/usr/bin/env bash
# Config propagation: one `PUT /v1/config` to SIDECARS light sidecars on a
# three-server cluster, and the time until every sidecar has applied it and
# the registry knows (its Agent.ReportApplied answered), counted from the
# PUT's send; plus when `GET /v1/mesh/propagation?index=N` (what
# `meshctl config apply --wait` asks) answers Complete.
#
#   sudo bash bench/propagation.sh     # ~2 minutes plus builds, on a quiet machine
#
# The light sidecars (bench/watch-fanout/src/propagation.rs) do what a
# sidecar does with config entries and nothing else: register an instance,
# follow the four kinds of the discovery chain (one watch stream each) and
# report the index of each kind applied when it changes. Sidecar i uses
# server i mod 3 over one of CONNS HTTP/2 connections to it. No peer runs in
# the same process here: Consul is not in Debian's archive and Istio needs
# Kubernetes, so the comparison is with their published push times (cited in
# the report).
#
# Environment knobs (defaults in brackets):
#   SIDECARS   light sidecars [1000]
#   CONNS      HTTP/2 connections per server [16]
#   ROUNDS     writes, one per round, through server ((round-1) mod 3)+1 [5]
#   SKIP_BUILD 1 = use the existing release binaries [0]
#   RESULTS_FILE [bench/RESULTS-propagation.md]
#   RAW_DIR    raw JSON and logs [bench/out/propagation] (git-ignored)
#
# Ports: raft/http/grpc/dns 1930N/1950N/1960N/1970N (N = 1..3), 127.0.0.1
# only. Every wait is bounded; the EXIT trap stops what it started and
# removes the temp dir.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
SIDECARS=${SIDECARS:-1000}
CONNS=${CONNS:-16}
ROUNDS=${ROUNDS:-5}
SKIP_BUILD=${SKIP_BUILD:-0}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-propagation.md}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/propagation}
TOOL_DIR="$BENCH_DIR/watch-fanout"
TOOL="$TOOL_DIR/target/release/propagation"
declare -a MW_LAUNCH=()
declare -a MW_PID=()

for p in 19301 19302 19303 19501 19502 19503 19601 19602 19603 19701 19702 19703; do
    port_free "$p" || die "port $p is taken"
done
ensure_packages protoc:protobuf-compiler /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev curl:curl python3:python3
raise_nofile
if [ "$SKIP_BUILD" != 1 ]; then
    build_release 1800 --bin meshwork-registry
    log "cargo build --release (load tool)"
    (cd "$TOOL_DIR" && CARGO_TARGET_DIR="$TOOL_DIR/target" timeout 1800 cargo build --release --bin propagation) >&2
fi
MW_BIN=${MW_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/meshwork-registry}
[ -x "$MW_BIN" ] || die "no binary at $MW_BIN"
[ -x "$TOOL" ] || die "no load tool at $TOOL"
mkdir -p "$RAW_DIR"
WORK=$(mktemp -d /var/tmp/meshwork-propagation.XXXXXX)
mkdir -p "$WORK/logs"
QUIET_WAIT_S=${QUIET_WAIT_S:-90} wait_quiet || true

start_meshwork_cluster "$WORK/n" 1930 1950 1960 1970
deadline=$((SECONDS + 60))
until [ -n "$(meshwork_leader 1950 1930)" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "no leader within 60 s"
    for i in 1 2 3; do check_alive "meshwork-$i" "${MW_PID[$i]}" "$WORK/logs/meshwork-$i.log"; done
    sleep 0.5
done
log "cluster up (leader node $(meshwork_leader 1950 1930)); $SIDECARS light sidecars, $CONNS connections per server, $ROUNDS rounds"
START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)
busy_before=$(sys_cpu)
"$TOOL" --grpc "$HOST:19601,$HOST:19602,$HOST:19603" --http "$HOST:19501,$HOST:19502,$HOST:19503" \
    --sidecars "$SIDECARS" --conns "$CONNS" --rounds "$ROUNDS" \
    >"$RAW_DIR/result.json" 2>"$RAW_DIR/tool.log"
busy=$(busy_between "$busy_before" "$(sys_cpu)")
rss=$(for i in 1 2 3; do rss_kb "${MW_PID[$i]}"; done | paste -sd' ')
cp "$WORK"/logs/*.log "$RAW_DIR/" 2>/dev/null || true

python3 - "$RAW_DIR/result.json" "$RESULTS_FILE" "$START_TS" "$busy" "$rss" "$(git_rev)" "$(cpu_model)" <<'PY'
import json, sys
raw, out, ts, busy, rss, rev, cpu = sys.argv[1:8]
r = json.load(open(raw))
rows = []
acked_p99 = []
for x in r["rounds"]:
    rec, ack = x["received"], x["acked"]
    acked_p99.append(ack.get("p99_ms", float("nan")))
    rows.append(f"| {x['round']} | {x['put_via']} | {x['put_ms']} | {rec.get('p50_ms')} / {rec.get('p99_ms')} / {rec.get('max_ms')} "
                f"| {ack.get('p50_ms')} / {ack.get('p99_ms')} / {ack.get('max_ms')} | {x['not_acked']} "
                f"| {x['propagation_asked_of']}: {x['propagation_answer_ms']} ({'complete' if x['propagation_complete'] else 'NOT complete'}, {x['propagation_sidecars']} sidecars) |")
worst = max(acked_p99)
rss_mib = " / ".join(f"{int(k)/1024:.0f}" for k in rss.split())
text = f"""# Config propagation to {r['sidecars']} sidecars

`bench/propagation.sh` ({ts}, commit {rev}, {cpu}, 2 cores; three servers on loopback,
{r['sidecars']} light sidecars each following {len(r['kinds'])} config entry kinds over
{r['conns_per_server']} HTTP/2 connections per server; the machine was {busy} % busy over
the run, the load tool included). One `PUT /v1/config` (a `service-router`) per round;
times in ms from just before the PUT is sent:

- **received**: the sidecar's watch stream delivers the change (p50 / p99 / max);
- **applied and acked**: the sidecar's `Agent.ReportApplied` with the new index answered
  by its server — the sidecar has it and the registry knows (p50 / p99 / max);
- **propagation**: `GET /v1/mesh/propagation?index=N`, asked of another server right after
  the PUT's answer, answering (`meshctl config apply --wait`'s wait).

| round | PUT via | PUT answered | received | applied and acked | not acked | propagation (server: ms) |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

**Worst p99 until applied-and-acked: {worst} ms** for {r['sidecars']} sidecars (target: under
1,000 ms). Server RSS after the run: {rss_mib} MiB.

For comparison (published, not measured here — Consul is not in Debian's archive and Istio
needs Kubernetes): Istio's performance page gives 1.5–4.5 s p90 for a configuration push
to its proxies at scale; Consul's documentation does not publish an xDS push time. A real
sidecar also rebuilds its tables before it reports (a chain compile per upstream:
microseconds) and coalesces reports for 5 ms.

Reproduce: `sudo bash bench/propagation.sh` (`SIDECARS`, `CONNS`, `ROUNDS`; raw JSON and
logs in `bench/out/propagation/`).
"""
open(out, "w").write(text)
print(text)
PY
