#!/usr/bin/env bash
# Where a proxied request's user-space CPU goes: instructions per request
# (valgrind callgrind, deterministic, unlike timings on a shared 2-core box)
# for one Meshwork sidecar and for HAProxy, both with one worker thread, in
# front of the same nginx backend, over HTTP/1.1 and over HTTP/2 (prior
# knowledge), and the sidecar's instructions split by the crate they run in.
#
#   bash bench/proxy-cost.sh      # from anywhere; ~4 minutes after the build
#
# Each measured run: the proxy under callgrind, a warm-up of WARMUP requests,
# counters zeroed, exactly REQUESTS requests (h2load; HTTP/1.1: --h1 with
# H1_CONNS connections; HTTP/2: H2_CONNS connections x H2_STREAMS streams),
# counters dumped. Instructions per request = the dump's total / REQUESTS.
# Kernel work (system calls, loopback) is not counted: callgrind sees user
# space only.
#
# The sidecar is measured twice: plain, then with a discovery chain in front
# of each upstream (issue 24's routing cost): a service-router of 20 routes
# (path prefixes, a header and a query match; none matches the benchmark's
# `/`, so every request tries all 20 and falls through), a 3-way
# service-splitter over subsets, and a service-resolver whose subsets filter
# on Service.Meta.shard. Each upstream has three instances (shard a, b, c;
# the same nginx port) in both runs.
#
# Knobs: REQUESTS [30000], WARMUP [3000], H1_CONNS [16], H2_CONNS [4],
# H2_STREAMS [16], SKIP_BUILD [0], SC_BIN / MW_BIN (other binaries),
# RESULTS_FILE [bench/RESULTS-proxy-cost.md], RAW_DIR [bench/out/proxy-cost].
# Needs valgrind, h2load (nghttp2-client), haproxy, nginx: installed with
# apt-get when missing. Listens on 127.0.0.1 ports 24080-24081 (backend),
# 24181-24182 (HAProxy), 24191-24192 (sidecar), 24331/24531/24631/24731
# (registry), 24291 (sidecar admin). Every wait is bounded; the EXIT trap
# stops every process this script started.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
LOG_TAG=proxy-cost
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
REQUESTS=${REQUESTS:-30000}
WARMUP=${WARMUP:-3000}
H1_CONNS=${H1_CONNS:-16}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-16}
SKIP_BUILD=${SKIP_BUILD:-0}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-proxy-cost.md}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/proxy-cost}
TARGET=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
MW_BIN=${MW_BIN:-$TARGET/meshwork-registry}
SC_BIN=${SC_BIN:-$TARGET/meshwork-sidecar}
H=$HOST

ensure_packages valgrind:valgrind h2load:nghttp2-client haproxy:haproxy nginx:nginx-light
if [ "$SKIP_BUILD" != 1 ]; then
    build_release 0 --locked --bin meshwork-registry --bin meshwork-sidecar
fi
{ [ -x "$SC_BIN" ] && [ -x "$MW_BIN" ]; } || die "no release binaries at $SC_BIN / $MW_BIN"

check_ports 24080 24081 24181 24182 24191 24192 24291 24331 24531 24631 24731
# Raw data: only ever replace a RAW_DIR that this script made (marker file).
claim_raw_dir "$RAW_DIR" .proxy-cost-raw

WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/mw-proxy-cost.XXXXXX")
mkdir -p "$WORK/backend"

wait_http() { # url [h2] -> waits up to 30 s for a 200
    local i code
    for i in $(seq 1 150); do
        if [ "${2:-}" = h2 ]; then
            code=$(curl -s -m 2 --http2-prior-knowledge -o /dev/null -w '%{http_code}' "$1" || true)
        else
            code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$1" || true)
        fi
        [ "$code" = 200 ] && return 0
        sleep 0.2
    done
    return 1
}

log "backend (nginx), registry, services"
cat >"$WORK/backend/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn; events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/backend/b; proxy_temp_path $WORK/backend/p;
 fastcgi_temp_path $WORK/backend/f; uwsgi_temp_path $WORK/backend/u; scgi_temp_path $WORK/backend/s;
 keepalive_requests 1000000;
 server { listen $H:24080; listen $H:24081 http2; location / { return 200 "hello world\n"; } } }
EOF
nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend" >"$WORK/backend/out.log" 2>&1 &
PIDS+=("$!")
start_meshwork dev "$WORK/mw" "$WORK/registry.log" 24531 24631 24331 24731 -
wait_http "http://$H:24080/" || die "nginx did not answer"
for svc in "backend 24080 a" "backend 24080 b" "backend 24080 c" \
    "backend-h2 24081 a" "backend-h2 24081 b" "backend-h2 24081 c"; do
    set -- $svc
    ok=0
    for _ in $(seq 1 50); do
        if curl -fsS -m 2 -X PUT "http://$H:24531/v1/agent/service/register" \
            -d "{\"Name\":\"$1\",\"ID\":\"$1-$3\",\"Address\":\"$H\",\"Port\":$2,\"Meta\":{\"shard\":\"$3\"}}" >/dev/null 2>&1; then
            ok=1; break
        fi
        sleep 0.2
    done
    [ "$ok" = 1 ] || die "could not register $1 (registry log: $WORK/registry.log)"
done

# chain_entries: the discovery chain of the second sidecar run, for both
# upstreams (see the header).
chain_entries() {
    local svc routes i
    for svc in backend backend-h2; do
        routes=""
        for i in $(seq 1 18); do
            routes+="{\"Match\":{\"HTTP\":{\"PathPrefix\":\"/api/v$i/\"}},\"Destination\":{\"ServiceSubset\":\"a\"}},"
        done
        routes+="{\"Match\":{\"HTTP\":{\"Header\":[{\"Name\":\"x-canary\",\"Exact\":\"1\"}]}},\"Destination\":{\"ServiceSubset\":\"b\"}},"
        routes+="{\"Match\":{\"HTTP\":{\"QueryParam\":[{\"Name\":\"debug\",\"Present\":true}]}},\"Destination\":{\"ServiceSubset\":\"c\"}}"
        curl -fsS -m 5 -X PUT "http://$H:24531/v1/config" -d "{\"Kind\":\"service-resolver\",\"Name\":\"$svc\",
            \"Subsets\":{\"a\":{\"Filter\":\"Service.Meta.shard == a\"},\"b\":{\"Filter\":\"Service.Meta.shard == b\"},
            \"c\":{\"Filter\":\"Service.Meta.shard == c\"}}}" >/dev/null
        curl -fsS -m 5 -X PUT "http://$H:24531/v1/config" -d "{\"Kind\":\"service-splitter\",\"Name\":\"$svc\",
            \"Splits\":[{\"Weight\":33.33,\"ServiceSubset\":\"a\"},{\"Weight\":33.33,\"ServiceSubset\":\"b\"},
            {\"Weight\":33.34,\"ServiceSubset\":\"c\"}]}" >/dev/null
        curl -fsS -m 5 -X PUT "http://$H:24531/v1/config" -d "{\"Kind\":\"service-router\",\"Name\":\"$svc\",
            \"Routes\":[$routes]}" >/dev/null
    done
}

cat >"$WORK/sidecar.toml" <<EOF
[registry]
addresses = ["$H:24631"]
[admin]
listen = "$H:24291"
[service]
name = "proxy-cost"
port = 1
[[upstreams]]
name = "backend"
listen = "$H:24191"
protocol = "http"
[[upstreams]]
name = "backend-h2"
listen = "$H:24192"
protocol = "http2"
EOF
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend h1
    bind $H:24181
    default_backend b1
frontend h2
    bind $H:24182 proto h2
    default_backend b2
backend b1
    http-reuse always
    server s1 $H:24080
backend b2
    http-reuse always
    server s1 $H:24081 proto h2
EOF

load() { # proto port count
    if [ "$1" = h2 ]; then
        h2load -n "$3" -c "$H2_CONNS" -m "$H2_STREAMS" "http://$H:$2/"
    else
        h2load --h1 -n "$3" -c "$H1_CONNS" "http://$H:$2/"
    fi
}

# measure NAME -- command...: runs the proxy under callgrind and, for each
# protocol, dumps the counters over exactly REQUESTS requests
# (RAW_DIR/NAME-PROTO.out) and then over an idle spell as long as the load
# took (RAW_DIR/NAME-PROTO-idle.out: timers and background work, subtracted
# in the report).
measure() {
    local name=$1 vp out proto port got ok2xx t0 t1
    shift 2
    valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.cg" "$@" >"$WORK/$name.log" 2>&1 &
    vp=$!; PIDS+=("$vp")
    for proto in h1 h2; do
        if [[ "$name" == sidecar* ]]; then
            port=$([ $proto = h1 ] && echo 24191 || echo 24192)
        else
            port=$([ $proto = h1 ] && echo 24181 || echo 24182)
        fi
        wait_http "http://$H:$port/" "$([ $proto = h2 ] && echo h2)" \
            || die "$name did not answer over $proto (log: $WORK/$name.log)"
        if [ -n "${MEASURE_CHECK:-}" ]; then
            eval "$MEASURE_CHECK" || die "$name: check failed: $MEASURE_CHECK"
        fi
        load $proto $port "$WARMUP" >/dev/null
        callgrind_control -z "$vp" >/dev/null
        t0=${EPOCHREALTIME/./}
        out=$(load $proto $port "$REQUESTS")
        t1=${EPOCHREALTIME/./}
        # "requests: N total, N started, N done, N succeeded, ..." and
        # "status codes: N 2xx, ...": every request answered, with a 2xx.
        got=$(echo "$out" | awk '/^requests:/{print $8}')
        ok2xx=$(echo "$out" | awk '/^status codes:/{print $3}')
        [ "$got" = "$REQUESTS" ] && [ "$ok2xx" = "$REQUESTS" ] \
            || die "$name over $proto: $got of $REQUESTS requests succeeded, $ok2xx with a 2xx"
        callgrind_control -d "$vp" >/dev/null
        sleep 1
        out=$(ls -t "$WORK/$name.cg".* | head -n1)
        mv "$out" "$RAW_DIR/$name-$proto.out"
        callgrind_control -z "$vp" >/dev/null
        sleep "$(awk -v d=$((t1 - t0)) 'BEGIN{printf "%.3f", d / 1e6}')"
        callgrind_control -d "$vp" >/dev/null
        sleep 1
        out=$(ls -t "$WORK/$name.cg".* | head -n1)
        mv "$out" "$RAW_DIR/$name-$proto-idle.out"
        log "  $name $proto: $(awk '/^(summary|totals):/{print $2; exit}' "$RAW_DIR/$name-$proto.out") instructions, idle $(awk '/^(summary|totals):/{print $2; exit}' "$RAW_DIR/$name-$proto-idle.out")"
    done
    kill "$vp" 2>/dev/null || true
    wait "$vp" 2>/dev/null || true
}

log "sidecar under callgrind"
measure sidecar -- "$SC_BIN" --config "$WORK/sidecar.toml" --worker-threads 1 --log-level warn
log "sidecar with a discovery chain under callgrind"
chain_entries || die "could not store the discovery chain's entries"
# Both chains applied before the load (checked while the sidecar runs).
chains_applied() {
    local i
    for i in $(seq 1 50); do
        [ "$(curl -s -m 2 "http://$H:24291/config" | python3 -c 'import json,sys; c=json.load(sys.stdin)["chains"]; print(sum(1 for x in c if not x["plain"] and x["loaded"]))' 2>/dev/null)" = 2 ] && return 0
        sleep 0.2
    done
    return 1
}
MEASURE_CHECK=chains_applied measure sidecar-chain -- "$SC_BIN" --config "$WORK/sidecar.toml" --worker-threads 1 --log-level warn
log "HAProxy under callgrind"
measure haproxy -- haproxy -f "$WORK/haproxy.cfg" -db

{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git=$(git_rev)"
    # Uncommitted changes to the code measured (the bench's own files aside).
    echo "dirty=$(git_status -- sidecar proto Cargo.toml Cargo.lock | wc -l)"
    echo "requests=$REQUESTS"
    echo "h1_conns=$H1_CONNS"
    echo "h2_conns=$H2_CONNS"
    echo "h2_streams=$H2_STREAMS"
    echo "haproxy=$(haproxy -v 2>/dev/null | head -n1)"
    echo "nginx=$(nginx -v 2>&1 | head -n1)"
    echo "h2load=$(h2load --version 2>/dev/null | head -n1)"
    echo "valgrind=$(valgrind --version)"
} >"$RAW_DIR/machine.txt"
# A report that fails leaves the previous results file as it was.
python3 "$BENCH_DIR/proxy-cost-report.py" "$RAW_DIR" >"$RAW_DIR/report.md"
cp "$RAW_DIR/report.md" "$RESULTS_FILE"
log "wrote $RESULTS_FILE"
