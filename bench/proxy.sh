#!/usr/bin/env bash
# Sidecar data-plane benchmark: the same backend (nginx answering a fixed
# 12-byte body) reached directly, through one Meshwork sidecar, through a
# client sidecar -> server sidecar chain, and through HAProxy and nginx in
# the same single and chained shapes. Same machine, same run, same load tool
# (wrk for HTTP/1.1, h2load for HTTP/2 with prior knowledge). Every proxy
# runs one worker thread (sidecar --worker-threads 1, HAProxy nbthread 1,
# nginx worker_processes 1 / master_process off).
#
# The sidecar chain's middle hop is mutual TLS (the mesh's: ECDSA P-256
# leaves from the registry's CA, client certificate required, resumption
# on). Its peer is an HAProxy chain doing the same (issue 23): client
# HAProxy -> server HAProxy over TLS with client certificates both ways,
# ECDSA P-256 leaves of one test CA made here with openssl, `verify required`
# on both sides (plus `verifyhost`, as the sidecar checks the server's
# identity), HAProxy's default resumption, ALPN http/1.1. The plain HAProxy
# and nginx chains stay for reference; every shape's label says plain or
# mTLS. Then new-connection TLS handshakes per second against the server
# side of each mTLS chain (the sidecar's inbound listener, the server
# HAProxy's TLS bind), full and resumed, with `openssl s_time -www /`
# (HS_CLIENTS processes at once, a client certificate of the respective CA),
# and the server process's CPU seconds per handshake.
#
#   bash bench/proxy.sh          # from anywhere; ~5 minutes plus the build
#
# Reported per shape: req/s, p50/p99/p99.9 latency and the added latency over
# direct, CPU seconds of the proxy processes per 100k requests, their RSS
# after the run, and how busy the whole machine was (other work skews a
# 2-core box). Then the sidecar's idle RSS, and its RSS following 1,000
# endpoints across 100 upstreams.
#
# Environment knobs (defaults in brackets):
#   DURATION   seconds per measured run [10]
#   ROUNDS     every shape is measured this many times, interleaved; the
#              report shows medians and the req/s range [3]
#   WARMUP     seconds of unmeasured load before each run [2]
#   CONNS      wrk connections (one wrk thread) [32]
#   H2_CONNS   h2load connections [4]; H2_STREAMS streams per connection [16]
#   SKIP_BUILD 1 = use the existing target/release binaries [0]
#   SC_BIN, MW_BIN  other sidecar / registry binaries (A/B experiments)
#   PERF       1 = perf record the sidecar shapes into RAW_DIR/perf-*.data [0]
#   STRACE     1 = count the first sidecar's syscalls (strace -c) per sidecar
#              shape into RAW_DIR/strace-*.txt (slows it down: diagnosis only) [0]
#   PIN        1 = pin the proxies under test to CPU $PROXY_CPU [1] and the
#              backend, registry and load tools to CPU $LOAD_CPU [0] with
#              taskset, so a proxy's throughput is bounded by its own core and
#              not by whatever else the shared cores run at the moment [0]
#   HS_DURATION seconds per handshake run [DURATION]; HS_CLIENTS openssl
#              s_time processes at once [4]; HANDSHAKES 0 = skip them [1]
#   BUILD_REV  the commit to name in the report when the binaries are not
#              HEAD's (SKIP_BUILD=1 with an earlier build) [HEAD]
#   RESULTS_FILE  [bench/RESULTS-proxy.md]; RAW_DIR [bench/out/proxy]
#   BENCH_TMPDIR  parent of the temp dir [/var/tmp]
#
# Needs wrk, h2load (nghttp2-client), haproxy, nginx (nginx-light), openssl:
# installed with apt-get when missing. Everything listens on 127.0.0.1 (ports 18080-18283,
# 18331/18531/18631/18731, 19191-19293, 21001, 22000-22099); every wait is
# bounded; the EXIT trap stops every process this script started.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-32}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-16}
SKIP_BUILD=${SKIP_BUILD:-0}
HS_DURATION=${HS_DURATION:-$DURATION}
HS_CLIENTS=${HS_CLIENTS:-4}
HANDSHAKES=${HANDSHAKES:-1}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-proxy.md}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/proxy}
TARGET=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
MW_BIN=${MW_BIN:-$TARGET/meshwork-registry}
SC_BIN=${SC_BIN:-$TARGET/meshwork-sidecar}
PIN=${PIN:-0}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
# Command prefixes that pin to a CPU when PIN=1 (taskset execs the
# command, so a background start's $! is the command's own pid).
PROXY_PIN=()
LOAD_PIN=()
if [ "$PIN" = 1 ]; then
    PROXY_PIN=(taskset -c "$PROXY_CPU")
    LOAD_PIN=(taskset -c "$LOAD_CPU")
fi

WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/meshwork-proxy-bench.XXXXXX")
mkdir -p "$RAW_DIR" "$WORK/logs"
: >"$RAW_DIR/results.jsonl"
: >"$RAW_DIR/handshakes.jsonl"
# The proxies' logs outlive the temp dir (errors in them are part of the result).
copy_logs() { rm -rf "$RAW_DIR/logs"; cp -r "$WORK/logs" "$RAW_DIR/logs" 2>/dev/null || true; }
add_cleanup_after_stop copy_logs

# ---------------------------------------------------------------- tools
ensure_packages wrk:wrk h2load:nghttp2-client haproxy:haproxy nginx:nginx-light openssl:openssl
if [ "$SKIP_BUILD" != 1 ]; then
    build_release 3600 --bin meshwork-registry --bin meshwork-sidecar
fi
{ [ -x "$MW_BIN" ] && [ -x "$SC_BIN" ]; } || die "release binaries missing under $TARGET"

check_ports 18080 18081 18181 18182 18183 18184 18185 18186 18281 18282 18283 18331 18531 18631 18731 \
    19191 19192 19193 19291 19292 19293 19294 21001

wait_port() { # port, seconds
    local deadline=$((SECONDS + $2))
    until port_listening "$1"; do
        [ "$SECONDS" -lt "$deadline" ] || die "nothing listens on $HOST:$1 after $2 s"
        sleep 0.1
    done
}

# ---------------------------------------------------------------- backend and peers
# Each starter runs in this shell (not in $(...), whose PIDS+= would be
# lost to the EXIT trap) and leaves the new process's pid in LAST_PID.
LAST_PID=""
nginx_conf() { # name, server block(s)
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/$1/nginx.pid;
error_log $WORK/logs/$1.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1/body;
    proxy_temp_path $WORK/$1/proxy;
    fastcgi_temp_path $WORK/$1/fastcgi;
    uwsgi_temp_path $WORK/$1/uwsgi;
    scgi_temp_path $WORK/$1/scgi;
    keepalive_requests 1000000;
$2
}
EOF
    local pin=("${PROXY_PIN[@]}")
    [ "$1" = backend ] && pin=("${LOAD_PIN[@]}")
    "${pin[@]}" nginx -c "$WORK/$1/nginx.conf" -p "$WORK/$1" >"$WORK/logs/$1.out" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

nginx_proxy_block() { # listen port, upstream port
    cat <<EOF
    upstream up$1 { server $HOST:$2; keepalive 64; }
    server {
        listen $HOST:$1;
        location / { proxy_pass http://up$1; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
EOF
}

haproxy_conf() { # name, frontend port, backend port, h2 (0/1), [bind options], [server options]
    local bind_opt=${5:-} srv_opt=${6:-}
    if [ "$4" = 1 ]; then bind_opt+=" proto h2"; srv_opt+=" proto h2"; fi
    cat >"$WORK/$1.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
    # HAProxy's defaults otherwise: TLS session cache and tickets on.
    ssl-server-verify required
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend f
    bind $HOST:$2 $bind_opt
    default_backend b
backend b
    http-reuse always
    server s1 $HOST:$3 $srv_opt
EOF
    "${PROXY_PIN[@]}" haproxy -f "$WORK/$1.cfg" -db >"$WORK/logs/$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# One test CA and ECDSA P-256 leaves signed by it for the mTLS HAProxy
# chain and the handshake client: what the mesh CA gives the sidecars
# (a DNS name for HAProxy's verifyhost and a SPIFFE-style URI SAN, so the
# certificates are about the size of the mesh's).
PKI=$WORK/pki
make_test_ca() {
    mkdir -p "$PKI"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
        -keyout "$PKI/ca.key" -out "$PKI/ca.pem" -subj "/CN=meshwork bench test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        >"$WORK/logs/openssl.log" 2>&1 || die "openssl could not make the test CA (see $WORK/logs/openssl.log)"
    local name
    for name in ha-server ha-client loadgen; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "/CN=$name" >>"$WORK/logs/openssl.log" 2>&1
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth,clientAuth" \
            "subjectAltName=DNS:$name.bench.test,URI:spiffe://bench.test/ns/default/dc/dc1/svc/$name" \
            >"$PKI/$name.ext"
        openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial \
            -days 7 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" >>"$WORK/logs/openssl.log" 2>&1 \
            || die "openssl could not sign $name (see $WORK/logs/openssl.log)"
        cat "$PKI/$name.crt" "$PKI/$name.key" >"$PKI/$name.pem"
    done
}

sidecar() { # name, admin port, config body
    cat >"$WORK/$1.toml" <<EOF
[registry]
addresses = ["$HOST:18631"]

[admin]
listen = "$HOST:$2"

$3
EOF
    "${PROXY_PIN[@]}" "$SC_BIN" --config "$WORK/$1.toml" --worker-threads 1 --log-level warn \
        >"$WORK/logs/$1.out" 2>"$WORK/logs/$1.log" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

register() { # name, id, port
    curl -fsS -X PUT "http://$HOST:18531/v1/agent/service/register" \
        -d "{\"Name\":\"$1\",\"ID\":\"$2\",\"Address\":\"$HOST\",\"Port\":$3}" >/dev/null
}

wait_endpoints() { # admin port, count, seconds
    local deadline=$((SECONDS + $3)) n
    while :; do
        n=$(curl -fsS "http://$HOST:$1/clusters" 2>/dev/null \
            | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(len(c["endpoints"]) for c in d["clusters"] if c["direction"]=="outbound"))' 2>/dev/null || echo 0)
        [ "$n" -ge "$2" ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || die "sidecar on :$1 sees $n of $2 endpoints after $3 s"
        sleep 0.2
    done
}

log "starting the backend (nginx, h1 :18080, h2c :18081), a registry, the proxies"
nginx_conf backend "    server { listen $HOST:18080; listen $HOST:18081 http2; location / { return 200 \"hello world\\n\"; } }"
BACKEND_PID=$LAST_PID
MW_LAUNCH=("${LOAD_PIN[@]}")
start_meshwork 1 "$WORK/mw" "$WORK/logs/registry.log" 18531 18631 18331 18731 "1@$HOST:18331"
wait_port 18080 10; wait_port 18531 20
deadline=$((SECONDS + 30))
until register backend backend-1 18080 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "the registry does not accept registrations"
    sleep 0.3
done
register backend-h2 backend-h2-1 18081

sidecar single 19291 "[service]
name = \"bench-client\"
port = 1
[[upstreams]]
name = \"backend\"
listen = \"$HOST:19191\"
protocol = \"http\"
[[upstreams]]
name = \"backend-h2\"
listen = \"$HOST:19193\"
protocol = \"http2\""
SC_SINGLE=$LAST_PID
sidecar server 19293 "[service]
name = \"backend-mesh\"
address = \"$HOST\"
port = 18080
[inbound]
listen = \"$HOST:21001\"
protocol = \"http\""
SC_SERVER=$LAST_PID
sidecar client 19292 "[service]
name = \"bench-client-2\"
port = 1
[[upstreams]]
name = \"backend-mesh\"
listen = \"$HOST:19192\"
protocol = \"http\""
SC_CLIENT=$LAST_PID
haproxy_conf ha-single 18181 18080 0
HA_SINGLE=$LAST_PID
haproxy_conf ha-chain-b 18183 18080 0
HA_B=$LAST_PID
haproxy_conf ha-chain-a 18182 18183 0
HA_A=$LAST_PID
haproxy_conf ha-h2 18184 18081 1
HA_H2=$LAST_PID
make_test_ca
haproxy_conf ha-tls-b 18185 18080 0 \
    "ssl crt $PKI/ha-server.pem ca-file $PKI/ca.pem verify required alpn http/1.1"
HA_TLS_B=$LAST_PID
haproxy_conf ha-tls-a 18186 18185 0 "" \
    "ssl verify required ca-file $PKI/ca.pem crt $PKI/ha-client.pem verifyhost ha-server.bench.test alpn http/1.1"
HA_TLS_A=$LAST_PID
nginx_conf ng-single "$(nginx_proxy_block 18281 18080)"
NG_SINGLE=$LAST_PID
nginx_conf ng-chain-b "$(nginx_proxy_block 18283 18080)"
NG_B=$LAST_PID
nginx_conf ng-chain-a "$(nginx_proxy_block 18282 18283)"
NG_A=$LAST_PID
for p in 18181 18182 18183 18184 18185 18186 18281 18282 18283 19191 19192 19193 21001; do wait_port "$p" 20; done
wait_endpoints 19291 2 20
wait_endpoints 19292 1 20
wait_ready() { # admin port, seconds: /ready is 200 once the sidecar has a leaf, roots and intentions
    local deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null "http://$HOST:$1/ready" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "sidecar on :$1 not ready after $2 s: $(curl -sS "http://$HOST:$1/ready" 2>&1)"
        sleep 0.2
    done
}
for p in 19291 19292 19293; do wait_ready "$p" 30; done
# The chain's middle hop must be the mesh's mutual TLS, not plain.
chain_tls=$(curl -fsS "http://$HOST:19292/clusters" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(",".join(e["tls"] for c in d["clusters"] if c["direction"] == "outbound" for e in c["endpoints"]))')
[ "$chain_tls" = mesh ] || die "the client sidecar dials the server sidecar as '$chain_tls', not mesh (mTLS)"
# And the HAProxy chain's middle hop must be verified TLS both ways.
curl -fsS -o /dev/null "http://$HOST:18186/" || die "the mTLS HAProxy chain does not answer (see $WORK/logs/ha-tls-*.log)"
if curl -fsS -o /dev/null --cacert "$PKI/ca.pem" --resolve "ha-server.bench.test:18185:$HOST" \
    "https://ha-server.bench.test:18185/" 2>/dev/null; then
    die "the server HAProxy accepts a TLS client without a certificate"
fi
log "chain middle hops: sidecar $chain_tls (mTLS), HAProxy TLS with client certificates"
sleep 2
SIDECAR_IDLE_KB=$(rss_sum_kb "$SC_SINGLE")
log "sidecar idle RSS: ${SIDECAR_IDLE_KB} KiB"

# ---------------------------------------------------------------- runs
run() { # shape, proto (h1/h2), url, proxy pids...
    local shape=$1 proto=$2 url=$3; shift 3
    local pids=("$@") out t0 t1 s0 s1 busy rss
    if [ "$proto" = h1 ]; then
        "${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    else
        "${LOAD_PIN[@]}" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D"$WARMUP" "$url" >/dev/null 2>&1 || true
    fi
    local perf_pid=""
    if [ "${PERF:-0}" = 1 ] && [ "${#pids[@]}" -gt 0 ] && [[ $shape == sidecar* ]]; then
        perf record -F 999 -g -o "$RAW_DIR/perf-$shape-$proto.data" -p "$(IFS=,; echo "${pids[*]}")" \
            -- sleep "$DURATION" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    if [ "${STRACE:-0}" = 1 ] && [ "${#pids[@]}" -gt 0 ] && [[ $shape == sidecar* ]]; then
        timeout "$DURATION" strace -c -f -o "$RAW_DIR/strace-$shape-$proto.txt" -p "${pids[0]}" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    t0=$(cpu_ticks "${pids[@]}"); s0=$(sys_cpu)
    if [ "$proto" = h1 ]; then
        out=$("${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$BENCH_DIR/proxy-wrk.lua" "$url" | tail -n 1)
    else
        rm -f "$WORK/h2.log"
        "${LOAD_PIN[@]}" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D"$DURATION" --log-file="$WORK/h2.log" "$url" \
            >"$RAW_DIR/h2load-$shape.txt" 2>&1 || true
        out=$(python3 "$BENCH_DIR/proxy-report.py" --h2load-log "$WORK/h2.log" "$DURATION")
    fi
    t1=$(cpu_ticks "${pids[@]}"); s1=$(sys_cpu)
    [ -z "$perf_pid" ] || wait "$perf_pid" || true
    busy=$(busy_between "$s0" "$s1")
    rss=$(rss_sum_kb "${pids[@]}")
    echo "$out" | python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
r.update(shape='$shape', proto='$proto', proxy_cpu_s=($t1 - $t0) / $CLK_TCK, proxy_rss_kb=$rss,
         machine_busy_pct=$busy, proxies=${#pids[@]})
print(json.dumps(r))" >>"$RAW_DIR/results.jsonl"
    log "  $shape ($proto): $(tail -n 1 "$RAW_DIR/results.jsonl")"
}

for round in $(seq 1 "$ROUNDS"); do
    log "round $round of $ROUNDS: HTTP/1.1 with wrk (${DURATION}s per shape, $CONNS connections)"
    run direct h1 "http://$HOST:18080/"
    run sidecar h1 "http://$HOST:19191/" "$SC_SINGLE"
    run haproxy h1 "http://$HOST:18181/" "$HA_SINGLE"
    run nginx h1 "http://$HOST:18281/" "$NG_SINGLE"
    run sidecar-chain-mtls h1 "http://$HOST:19192/" "$SC_CLIENT" "$SC_SERVER"
    run haproxy-chain-mtls h1 "http://$HOST:18186/" "$HA_TLS_A" "$HA_TLS_B"
    run haproxy-chain h1 "http://$HOST:18182/" "$HA_A" "$HA_B"
    run nginx-chain h1 "http://$HOST:18282/" "$NG_A" "$NG_B"
    log "round $round of $ROUNDS: HTTP/2 (h2c) with h2load ($H2_CONNS connections x $H2_STREAMS streams)"
    run direct h2 "http://$HOST:18081/"
    run sidecar h2 "http://$HOST:19193/" "$SC_SINGLE"
    run haproxy h2 "http://$HOST:18184/" "$HA_H2"
done

# ---------------------------------------------------------------- handshakes
# New TLS connections against the server side of each mTLS chain, each with
# a client certificate of its own CA: the sidecar's inbound listener (a mesh
# leaf for a made-up service from the registry's agent endpoint, the mesh
# root) and the server HAProxy's TLS bind (the test CA's loadgen leaf).
# `openssl s_time -www /` sends one HTTP/1.0 request per connection and reads
# the answer: without it s_time counts a TLS 1.3 connection as done before
# the server has checked the client's certificate (a certless client is
# "connected" too) and never reads the tickets that -reuse needs. The request
# goes through to nginx in both, so each handshake also costs one proxied
# request (about 1 % of a full handshake, see the HTTP/1.1 CPU column).
hs_run() { # server label, port, pid, mode (new|reuse), cert, key, ca
    local label=$1 port=$2 pid=$3 mode=$4 cert=$5 key=$6 ca=$7 i t0 t1 w0 w1 s0 s1
    local -a hs_pids=()
    t0=$(cpu_ticks "$pid"); s0=$(sys_cpu); w0=$(date +%s.%N)
    for i in $(seq 1 "$HS_CLIENTS"); do
        "${LOAD_PIN[@]}" openssl s_time -connect "$HOST:$port" "-$mode" -www / -cert "$cert" -key "$key" \
            -CAfile "$ca" -time "$HS_DURATION" >"$RAW_DIR/s_time-$label-$mode-$i.txt" 2>&1 &
        hs_pids+=("$!")
    done
    local rcs=""
    for i in "${hs_pids[@]}"; do wait "$i"; rcs+="$? "; done
    t1=$(cpu_ticks "$pid"); s1=$(sys_cpu); w1=$(date +%s.%N)
    python3 "$BENCH_DIR/proxy-report.py" --s-time "$RAW_DIR" "$label" "$mode" "$HS_CLIENTS" \
        "$(awk -v a="$w0" -v b="$w1" 'BEGIN{print b - a}')" "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN{print (b - a) / hz}')" \
        "$(busy_between "$s0" "$s1")" "$rcs" >>"$RAW_DIR/handshakes.jsonl"
    log "  handshakes $label ($mode): $(tail -n 1 "$RAW_DIR/handshakes.jsonl")"
}

if [ "$HANDSHAKES" = 1 ]; then
    log "TLS handshakes against the chains' server sides ($HS_CLIENTS s_time clients, ${HS_DURATION}s each)"
    MESH_PKI=$WORK/mesh-pki; mkdir -p "$MESH_PKI"
    curl -fsS "http://$HOST:18531/v1/agent/connect/ca/leaf/bench-loadgen" | python3 -c "
import json, sys
d = json.load(sys.stdin)
open('$MESH_PKI/loadgen.crt', 'w').write(d['CertPEM'])
open('$MESH_PKI/loadgen.key', 'w').write(d['PrivateKeyPEM'])" || die "no mesh leaf from the registry"
    curl -fsS "http://$HOST:18531/v1/connect/ca/roots" | python3 -c "
import json, sys
open('$MESH_PKI/ca.pem', 'w').write(json.load(sys.stdin)['Roots'][0]['RootCert'])" || die "no mesh root from the registry"
    for round in $(seq 1 "$ROUNDS"); do
        # Alternate which server goes first.
        order=(sidecar haproxy); [ $((round % 2)) = 0 ] && order=(haproxy sidecar)
        for who in "${order[@]}"; do
            for mode in new reuse; do
                if [ "$who" = sidecar ]; then
                    hs_run sidecar-inbound 21001 "$SC_SERVER" "$mode" \
                        "$MESH_PKI/loadgen.crt" "$MESH_PKI/loadgen.key" "$MESH_PKI/ca.pem"
                else
                    hs_run haproxy-tls-bind 18185 "$HA_TLS_B" "$mode" \
                        "$PKI/loadgen.crt" "$PKI/loadgen.key" "$PKI/ca.pem"
                fi
            done
        done
    done
fi
for p in 19292 19293; do curl -fsS "http://$HOST:$p/metrics" >"$RAW_DIR/metrics-$p.txt" 2>/dev/null || true; done
check_alive "server sidecar" "$SC_SERVER" "$WORK/logs/server.log"
check_alive "client sidecar" "$SC_CLIENT" "$WORK/logs/client.log"
check_alive "server HAProxy (TLS)" "$HA_TLS_B" "$WORK/logs/ha-tls-b.log"

# ---------------------------------------------------------------- RSS at scale
log "sidecar RSS with 1,000 endpoints across 100 upstreams"
for i in $(seq 0 99); do
    for j in $(seq 0 9); do
        curl -fsS -X PUT "http://$HOST:18531/v1/catalog/register" \
            -d "{\"Node\":\"bench-n$j\",\"Address\":\"$HOST\",\"Service\":{\"Service\":\"svc$i\",\"ID\":\"svc$i-$j\",\"Port\":$((30000 + j))}}" >/dev/null
    done
done
UPSTREAMS=""
for i in $(seq 0 99); do
    UPSTREAMS+="[[upstreams]]
name = \"svc$i\"
listen = \"$HOST:$((22000 + i))\"
protocol = \"http\"
"
done
sidecar big 19294 "[service]
name = \"bench-big\"
port = 1
$UPSTREAMS"
SC_BIG=$LAST_PID
wait_endpoints 19294 1000 60
sleep 2
SIDECAR_BIG_KB=$(rss_sum_kb "$SC_BIG")
log "sidecar RSS with 1,000 endpoints: ${SIDECAR_BIG_KB} KiB"

# ---------------------------------------------------------------- report
BUILD_REV=${BUILD_REV:-} PIN=$PIN PROXY_CPU=$PROXY_CPU LOAD_CPU=$LOAD_CPU HS_DURATION=$HS_DURATION HS_CLIENTS=$HS_CLIENTS \
python3 "$BENCH_DIR/proxy-report.py" "$RAW_DIR/results.jsonl" "$RESULTS_FILE" "$SIDECAR_IDLE_KB" "$SIDECAR_BIG_KB" \
    "$DURATION" "$CONNS" "$H2_CONNS" "$H2_STREAMS"
log "wrote $RESULTS_FILE"
