#!/usr/bin/env bash
# HTTPS termination at the Meshwork gateway (meshwork-sidecar in gateway
# mode, issue 25) against HAProxy and nginx doing the same job, in the same
# run: one certificate (ECDSA P-256, made here with openssl, SAN localhost)
# served by all three, TLS 1.2+1.3 offered by all three (every client here
# negotiates TLS 1.3; checked and reported), the same plain-HTTP backend
# (nginx answering a fixed 12-byte body), one worker thread each (gateway
# --worker-threads 1, HAProxy nbthread 1, nginx worker_processes 1 /
# master_process off).
#
# The paths are not the same, and the report says so. The gateway carries a
# request into the mesh: client -TLS-> gateway -mTLS-> the service's sidecar
# -plain-> app. HAProxy and nginx, as one would deploy them without a mesh,
# go straight to the app: client -TLS-> proxy -plain-> app. So the script
# also measures:
#   - HAProxy -> the same service sidecar over the mesh's mutual TLS
#     (HAProxy presents a mesh leaf of the registry's CA and verifies the
#     sidecar against the mesh root): the gateway's exact path with HAProxy
#     at the front, the like-for-like comparison;
#   - plain-HTTP listeners of the gateway and of HAProxy and nginx (same
#     processes, same paths), so that HTTPS minus plain is the cost of
#     termination alone;
#   - the CPU of every process on a path separately (the sidecar hop's
#     share is the sidecar's CPU).
#
# Runs:
#   - keep-alive HTTP/1.1 with wrk (CONNS connections, one thread): req/s,
#     p50/p99/p99.9, CPU s per 100k requests per process;
#   - keep-alive HTTP/2 over TLS (ALPN h2) with h2load on the three fronts;
#   - one handshake per connection: bench/tls-handshakes.py (HS_CLIENTS
#     processes; SNI, one `Connection: close` request per connection), full
#     and resumed, and resumed with HS_SESSIONS sessions per client process
#     (how many returning clients a server remembers); handshakes per CPU
#     second of the front process. `openssl s_time` (proxy.sh's tool) sends
#     no SNI, which the gateway refuses by design.
#
#   bash bench/gateway-https.sh      # from anywhere; ~10 minutes plus the build
#
# Environment knobs (defaults in brackets):
#   DURATION   seconds per measured run [10]; WARMUP [2]
#   ROUNDS     every shape is measured this many times, interleaved [3]
#   CONNS      wrk connections (one wrk thread) [32]
#   H2_CONNS   h2load connections [4]; H2_STREAMS streams per connection [16]
#   HS_DURATION seconds per handshake run [DURATION]; HS_CLIENTS client
#              processes [4]; HS_SESSIONS sessions per client process in
#              the many-clients resumption run [500]; HANDSHAKES 0 = skip [1]
#   PIN        1 = the proxies under test (front and sidecar) on CPU
#              $PROXY_CPU [1], backend, registry and load tools on
#              $LOAD_CPU [0], with taskset [0]
#   SKIP_BUILD 1 = use the existing target/release binaries [0]
#   SC_BIN, MW_BIN  other sidecar / registry binaries (A/B experiments)
#   BUILD_REV  the commit to name in the report when the binaries are not
#              HEAD's [HEAD]
#   RESULTS_FILE [bench/RESULTS-gateway.md]; RAW_DIR [bench/out/gateway]
#   BENCH_TMPDIR parent of the temp dir [/var/tmp]
#
# Needs wrk, h2load (nghttp2-client), haproxy, nginx (nginx-light),
# openssl, python3: installed with apt-get when missing. Everything listens
# on 127.0.0.1 (ports 18090, 18341/18541/18641/18741, 18443-18444,
# 18451-18453, 18461-18462, 19391-19392, 21011); every wait is bounded; the
# EXIT trap stops every process this script started.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-16}
HS_DURATION=${HS_DURATION:-$DURATION}
HS_CLIENTS=${HS_CLIENTS:-4}
HS_SESSIONS=${HS_SESSIONS:-500}
HANDSHAKES=${HANDSHAKES:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
QUIET_WAIT_S=${QUIET_WAIT_S:-60}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-gateway.md}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/gateway}
TARGET=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
MW_BIN=${MW_BIN:-$TARGET/meshwork-registry}
SC_BIN=${SC_BIN:-$TARGET/meshwork-sidecar}
PIN=${PIN:-0}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PROXY_PIN=()
LOAD_PIN=()
if [ "$PIN" = 1 ]; then
    PROXY_PIN=(taskset -c "$PROXY_CPU")
    LOAD_PIN=(taskset -c "$LOAD_CPU")
fi
SNI=localhost # /etc/hosts: 127.0.0.1; wrk and h2load send the URL's host as SNI

check_raw_dir "$RAW_DIR" .gateway-https-raw
ensure_packages wrk:wrk h2load:nghttp2-client haproxy:haproxy nginx:nginx-light openssl:openssl \
    python3:python3 curl:curl taskset:util-linux
if [ "$SKIP_BUILD" != 1 ]; then
    build_release 3600 --bin meshwork-registry --bin meshwork-sidecar
fi
{ [ -x "$MW_BIN" ] && [ -x "$SC_BIN" ]; } || die "release binaries missing under $TARGET"
check_ports 18090 18341 18541 18641 18741 18443 18444 18451 18452 18453 18461 18462 19391 19392 21011
getent ahostsv4 "$SNI" | grep -q '^127\.0\.0\.1 ' || die "$SNI does not resolve to 127.0.0.1"

claim_raw_dir "$RAW_DIR" .gateway-https-raw
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/meshwork-gateway-bench.XXXXXX")
mkdir -p "$WORK/logs"
: >"$RAW_DIR/results.jsonl"
: >"$RAW_DIR/handshakes.jsonl"
: >"$RAW_DIR/quiet.tsv"
copy_logs() { rm -rf "$RAW_DIR/logs"; cp -r "$WORK/logs" "$RAW_DIR/logs" 2>/dev/null || true; }
add_cleanup_after_stop copy_logs
raise_nofile

wait_port() { # port, seconds
    local deadline=$((SECONDS + $2))
    until port_listening "$1"; do
        [ "$SECONDS" -lt "$deadline" ] || die "nothing listens on $HOST:$1 after $2 s"
        sleep 0.1
    done
}

# ---------------------------------------------------------------- the certificate
# One test CA and one ECDSA P-256 leaf for $SNI, served by all three fronts.
PKI=$WORK/pki
mkdir -p "$PKI"
{
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
        -keyout "$PKI/ca.key" -out "$PKI/ca.pem" -subj "/CN=meshwork gateway bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$PKI/edge.key" -out "$PKI/edge.csr" -subj "/CN=$SNI"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$SNI" >"$PKI/edge.ext"
    openssl x509 -req -in "$PKI/edge.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 7 -sha256 -extfile "$PKI/edge.ext" -out "$PKI/edge.crt"
} >"$WORK/logs/openssl.log" 2>&1 || die "openssl could not make the certificate (see $WORK/logs/openssl.log)"
cat "$PKI/edge.crt" "$PKI/edge.key" >"$PKI/edge.pem" # HAProxy's crt: certificate and key in one file

# ---------------------------------------------------------------- backend, registry, sidecar
LAST_PID=""
nginx_conf() { # name, pin (load|proxy), server block(s)
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
$3
}
EOF
    local pin=("${PROXY_PIN[@]}")
    [ "$2" = load ] && pin=("${LOAD_PIN[@]}")
    "${pin[@]}" nginx -c "$WORK/$1/nginx.conf" -p "$WORK/$1" >"$WORK/logs/$1.out" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

sidecar() { # name, admin port, config body
    cat >"$WORK/$1.toml" <<EOF
[registry]
addresses = ["$HOST:18641"]

[admin]
listen = "$HOST:$2"

$3
EOF
    "${PROXY_PIN[@]}" "$SC_BIN" --config "$WORK/$1.toml" --worker-threads 1 --log-level warn \
        >"$WORK/logs/$1.out" 2>"$WORK/logs/$1.log" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

log "starting the backend (nginx :18090), a registry, the service's sidecar"
nginx_conf backend load "    server { listen $HOST:18090; location / { return 200 \"hello world\\n\"; } }"
BACKEND_PID=$LAST_PID
MW_LAUNCH=("${LOAD_PIN[@]}")
start_meshwork 1 "$WORK/mw" "$WORK/logs/registry.log" 18541 18641 18341 18741 "1@$HOST:18341"
REGISTRY_PID=$LAST_PID
wait_port 18090 10
wait_port 18541 30

sidecar app 19391 "[service]
name = \"backend-mesh\"
address = \"$HOST\"
port = 18090
[inbound]
listen = \"$HOST:21011\"
protocol = \"http\""
SC_APP=$LAST_PID

# ---------------------------------------------------------------- the gateway
sidecar gateway 19392 "[gateway]
name = \"edge\"
address = \"$HOST\"
port = 18443

[[gateway.certificates]]
hosts = [\"$SNI\"]
cert_file = \"$PKI/edge.crt\"
key_file = \"$PKI/edge.key\""
SC_GW=$LAST_PID
cat >"$WORK/edge-entry.json" <<EOF
{"Kind": "ingress-gateway", "Name": "edge",
 "Listeners": [
  {"Port": 18443, "Protocol": "http", "TLS": {"Enabled": true},
   "Services": [{"Name": "backend-mesh", "Hosts": ["$SNI"]}]},
  {"Port": 18444, "Protocol": "http",
   "Services": [{"Name": "backend-mesh", "Hosts": ["$SNI"]}]}]}
EOF
deadline=$((SECONDS + 30))
until curl -fsS -X PUT "http://$HOST:18541/v1/config" --data-binary @"$WORK/edge-entry.json" \
    >"$WORK/logs/entry-put.out" 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "the registry refuses the ingress-gateway entry: $(cat "$WORK/logs/entry-put.out")"
    sleep 0.3
done

# ---------------------------------------------------------------- HAProxy and nginx
# The mesh leaf HAProxy presents to the service's sidecar (service name
# ha-edge, signed by the registry's CA) and the mesh root it verifies the
# sidecar against.
MESH=$WORK/mesh
mkdir -p "$MESH"
deadline=$((SECONDS + 30))
until curl -fsS "http://$HOST:18541/v1/agent/connect/ca/leaf/ha-edge" >"$MESH/leaf.json" 2>/dev/null \
    && curl -fsS "http://$HOST:18541/v1/connect/ca/roots" >"$MESH/roots.json" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "no mesh leaf / roots from the registry"
    sleep 0.5
done
python3 - "$MESH" <<'EOF'
import json, sys
d = sys.argv[1]
leaf = json.load(open(f"{d}/leaf.json"))
open(f"{d}/leaf.pem", "w").write(leaf["CertPEM"].rstrip("\n") + "\n" + leaf["PrivateKeyPEM"])
roots = json.load(open(f"{d}/roots.json"))["Roots"]
open(f"{d}/roots.pem", "w").write("".join(r["RootCert"].rstrip("\n") + "\n" for r in roots))
EOF

cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
    # HAProxy's defaults otherwise: TLS 1.2 and 1.3, session cache and tickets on.
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend https
    bind $HOST:18451 ssl crt $PKI/edge.pem alpn h2,http/1.1
    default_backend app
frontend plain
    bind $HOST:18452
    default_backend app
frontend https-mesh
    bind $HOST:18453 ssl crt $PKI/edge.pem alpn h2,http/1.1
    default_backend mesh
backend app
    http-reuse always
    server s1 $HOST:18090
backend mesh
    http-reuse always
    # The sidecar's certificate names its service by a SPIFFE URI, no DNS
    # name: the chain is verified against the mesh root, the name is not
    # (the gateway also checks the service's identity).
    server s1 $HOST:21011 ssl crt $MESH/leaf.pem ca-file $MESH/roots.pem verify required alpn http/1.1
EOF
"${PROXY_PIN[@]}" haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/logs/haproxy.log" 2>&1 &
HA_PID=$!
PIDS+=("$HA_PID")

nginx_conf front proxy "    upstream app { server $HOST:18090; keepalive 64; }
    # nginx's defaults otherwise: TLS 1.2 and 1.3, session tickets on.
    server {
        listen $HOST:18461 ssl http2;
        ssl_certificate $PKI/edge.crt;
        ssl_certificate_key $PKI/edge.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
    }
    server {
        listen $HOST:18462;
        location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
    }"
NG_PID=$LAST_PID

for p in 18443 18444 18451 18452 18453 18461 18462 21011; do wait_port "$p" 30; done
deadline=$((SECONDS + 30))
until curl -fsS -o /dev/null "http://$HOST:19391/ready" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "the service's sidecar is not ready: $(curl -sS "http://$HOST:19391/ready" 2>&1)"
    sleep 0.2
done

# ---------------------------------------------------------------- checks
# Every front answers over HTTPS with the test certificate, and every path
# reaches the backend.
check_body() { # url, what
    local body deadline=$((SECONDS + 30))
    until body=$(curl -fsS --cacert "$PKI/ca.pem" "$1" 2>&1) && [ "$body" = "hello world" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "$2 ($1) does not answer the backend's body: $body"
        sleep 0.3
    done
}
check_body "https://$SNI:18443/" "the gateway's HTTPS listener"
check_body "http://$SNI:18444/" "the gateway's plain listener"
check_body "https://$SNI:18451/" "HAProxy (HTTPS -> app)"
check_body "http://$SNI:18452/" "HAProxy (plain -> app)"
check_body "https://$SNI:18453/" "HAProxy (HTTPS -> sidecar over mTLS)"
check_body "https://$SNI:18461/" "nginx (HTTPS -> app)"
check_body "http://$SNI:18462/" "nginx (plain -> app)"
# The gateway goes into the mesh over mutual TLS.
gw_tls=$(curl -fsS "http://$HOST:19392/clusters" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(",".join(sorted({e.get("tls", "?") for c in d["clusters"] for e in c["endpoints"]})))')
[ "$gw_tls" = mesh ] || die "the gateway dials the service's sidecar as '$gw_tls', not mesh (mTLS)"
# The service's sidecar refuses a client without a mesh certificate, so
# HAProxy's mesh path really is mutual TLS.
if curl -fsS -o /dev/null -k "https://$HOST:21011/" 2>/dev/null; then
    die "the service's sidecar accepts a TLS client without a certificate"
fi
# What each front negotiates with an OpenSSL 3 client.
for port in 18443 18451 18461; do
    printf '%s\t' "$port"
    openssl s_client -connect "$HOST:$port" -servername "$SNI" -CAfile "$PKI/ca.pem" -alpn http/1.1 \
        </dev/null 2>/dev/null | awk '/^New, /{printf "%s\t", $0} /Server Temp Key/{printf "%s\t", $0} /Verify return code/ && !v {print; v=1}'
done >"$RAW_DIR/negotiated.tsv"
log "negotiated: $(tr '\n' ';' <"$RAW_DIR/negotiated.tsv")"
grep -c 'TLSv1.3' "$RAW_DIR/negotiated.tsv" | grep -qx 3 || die "not every front negotiates TLS 1.3 (see $RAW_DIR/negotiated.tsv)"
sleep 2
{
    echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
    echo "rev=${BUILD_REV:-$(git_rev)}"
    echo "dirty=$(git_status -- sidecar core registry | wc -l)"
    echo "cpus=$(nproc)"
    echo "cpu_model=$(cpu_model)"
    echo "haproxy=$(haproxy -v | head -n 1)"
    echo "nginx=$(nginx -v 2>&1)"
    echo "openssl=$(openssl version)"
    echo "wrk=$(wrk -v 2>&1 | head -n 1)"
    echo "h2load=$(h2load --version 2>&1 | head -n 1)"
    echo "python=$(python3 -c 'import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)')"
    printf '%s\n' "pin=$PIN" "proxy_cpu=$PROXY_CPU" "load_cpu=$LOAD_CPU" "duration=$DURATION" "warmup=$WARMUP" \
        "rounds=$ROUNDS" "conns=$CONNS" "h2_conns=$H2_CONNS" "h2_streams=$H2_STREAMS" \
        "hs_duration=$HS_DURATION" "hs_clients=$HS_CLIENTS" "hs_sessions=$HS_SESSIONS"
    echo "gateway_idle_kb=$(rss_kb "$SC_GW")"
    echo "sidecar_idle_kb=$(rss_kb "$SC_APP")"
    echo "haproxy_idle_kb=$(rss_kb "$HA_PID")"
    echo "nginx_idle_kb=$(rss_kb "$NG_PID")"
} >"$RAW_DIR/meta.txt"

# ---------------------------------------------------------------- keep-alive runs
# run SHAPE PROTO URL FRONT_PID [SIDECAR_PID]: one measured run; CPU of the
# front and of the sidecar (if on the path) separately.
run() {
    local shape=$1 proto=$2 url=$3 front=${4:-} side=${5:-} out f0 f1 c0 c1 s0 s1 b0 b1
    if [ "$proto" = h1 ]; then
        "${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    else
        "${LOAD_PIN[@]}" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D"$WARMUP" "$url" >/dev/null 2>&1 || true
    fi
    f0=$(cpu_ticks ${front:+"$front"}); c0=$(cpu_ticks ${side:+"$side"}); b0=$(cpu_ticks "$BACKEND_PID"); s0=$(sys_cpu)
    if [ "$proto" = h1 ]; then
        out=$("${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$BENCH_DIR/proxy-wrk.lua" "$url" | tail -n 1)
    else
        rm -f "$WORK/h2.log"
        "${LOAD_PIN[@]}" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D"$DURATION" --log-file="$WORK/h2.log" "$url" \
            >"$RAW_DIR/h2load-$shape.txt" 2>&1 || true
        out=$(python3 "$BENCH_DIR/proxy-report.py" --h2load-log "$WORK/h2.log" "$DURATION")
    fi
    f1=$(cpu_ticks ${front:+"$front"}); c1=$(cpu_ticks ${side:+"$side"}); b1=$(cpu_ticks "$BACKEND_PID"); s1=$(sys_cpu)
    local front_rss=0 side_rss=0
    [ -z "$front" ] || front_rss=$(rss_kb "$front")
    [ -z "$side" ] || side_rss=$(rss_kb "$side")
    echo "$out" | python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
r.update(shape='$shape', proto='$proto', front_cpu_s=($f1 - $f0) / $CLK_TCK, sidecar_cpu_s=($c1 - $c0) / $CLK_TCK,
         backend_cpu_s=($b1 - $b0) / $CLK_TCK, front_rss_kb=$front_rss,
         sidecar_rss_kb=$side_rss, machine_busy_pct=$(busy_between "$s0" "$s1"),
         steal_pct=$(steal_between "$s0" "$s1"))
print(json.dumps(r))" >>"$RAW_DIR/results.jsonl"
    log "  $shape ($proto): $(tail -n 1 "$RAW_DIR/results.jsonl")"
}

# quiet ROUND_LABEL: waits for an idle machine (other work skews a 2-core
# box) and records how busy it was.
quiet() {
    wait_quiet
    printf '%s\t%s\t%s\n' "$1" "$QUIET_BUSY" "$QUIET_WAITED" >>"$RAW_DIR/quiet.tsv"
}

for round in $(seq 1 "$ROUNDS"); do
    quiet "keep-alive round $round"
    log "round $round of $ROUNDS: keep-alive HTTP/1.1, wrk, $CONNS connections, ${DURATION}s per shape"
    # Rotate the order so that no shape always runs first or last.
    shapes=(direct gateway-https haproxy-https nginx-https haproxy-https-mesh gateway-plain haproxy-plain nginx-plain)
    n=${#shapes[@]}; k=$(((round - 1) * 3 % n))
    for i in $(seq 0 $((n - 1))); do
        case ${shapes[$(((i + k) % n))]} in
            direct) run direct h1 "http://$HOST:18090/" ;;
            gateway-https) run gateway-https h1 "https://$SNI:18443/" "$SC_GW" "$SC_APP" ;;
            gateway-plain) run gateway-plain h1 "http://$SNI:18444/" "$SC_GW" "$SC_APP" ;;
            haproxy-https) run haproxy-https h1 "https://$SNI:18451/" "$HA_PID" ;;
            haproxy-plain) run haproxy-plain h1 "http://$SNI:18452/" "$HA_PID" ;;
            haproxy-https-mesh) run haproxy-https-mesh h1 "https://$SNI:18453/" "$HA_PID" "$SC_APP" ;;
            nginx-https) run nginx-https h1 "https://$SNI:18461/" "$NG_PID" ;;
            nginx-plain) run nginx-plain h1 "http://$SNI:18462/" "$NG_PID" ;;
        esac
    done
    log "round $round of $ROUNDS: keep-alive HTTP/2 over TLS, h2load, $H2_CONNS connections x $H2_STREAMS streams"
    run gateway-https h2 "https://$SNI:18443/" "$SC_GW" "$SC_APP"
    run haproxy-https h2 "https://$SNI:18451/" "$HA_PID"
    run nginx-https h2 "https://$SNI:18461/" "$NG_PID"
done

# ---------------------------------------------------------------- handshakes
hs_run() { # label, port, front pid, sidecar pid (or ""), mode, sessions per client
    local label=$1 port=$2 front=$3 side=$4 mode=$5 sessions=$6 f0 f1 c0 c1 s0 s1 out
    f0=$(cpu_ticks "$front"); c0=$(cpu_ticks ${side:+"$side"}); s0=$(sys_cpu)
    out=$("${LOAD_PIN[@]}" python3 "$BENCH_DIR/tls-handshakes.py" "$HOST" "$port" "$SNI" "$PKI/ca.pem" \
        "$mode" "$HS_DURATION" "$HS_CLIENTS" "$sessions")
    f1=$(cpu_ticks "$front"); c1=$(cpu_ticks ${side:+"$side"}); s1=$(sys_cpu)
    echo "$out" | python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
r.update(server='$label', front_cpu_s=($f1 - $f0) / $CLK_TCK, sidecar_cpu_s=($c1 - $c0) / $CLK_TCK,
         machine_busy_pct=$(busy_between "$s0" "$s1"), front_rss_kb=$(rss_kb "$front"))
print(json.dumps(r))" >>"$RAW_DIR/handshakes.jsonl"
    log "  handshakes $label ($mode, $sessions session(s) per client): $(tail -n 1 "$RAW_DIR/handshakes.jsonl")"
}

if [ "$HANDSHAKES" = 1 ]; then
    log "new connections: $HS_CLIENTS client processes, ${HS_DURATION}s per run"
    for round in $(seq 1 "$ROUNDS"); do
        quiet "handshakes round $round"
        order=(gateway haproxy nginx)
        case $((round % 3)) in 2) order=(haproxy nginx gateway) ;; 0) order=(nginx gateway haproxy) ;; esac
        for who in "${order[@]}"; do
            for mode in new reuse; do
                case $who in
                    gateway) hs_run gateway 18443 "$SC_GW" "$SC_APP" "$mode" 1 ;;
                    haproxy) hs_run haproxy 18451 "$HA_PID" "" "$mode" 1 ;;
                    nginx) hs_run nginx 18461 "$NG_PID" "" "$mode" 1 ;;
                esac
            done
        done
    done
    log "resumption with $((HS_CLIENTS * HS_SESSIONS)) returning clients (sessions) per server"
    hs_run gateway 18443 "$SC_GW" "$SC_APP" reuse "$HS_SESSIONS"
    hs_run haproxy 18451 "$HA_PID" "" reuse "$HS_SESSIONS"
    hs_run nginx 18461 "$NG_PID" "" reuse "$HS_SESSIONS"
fi

for p in 19391 19392; do curl -fsS "http://$HOST:$p/metrics" >"$RAW_DIR/metrics-$p.txt" 2>/dev/null || true; done
check_alive gateway "$SC_GW" "$WORK/logs/gateway.log"
check_alive "service sidecar" "$SC_APP" "$WORK/logs/app.log"
check_alive haproxy "$HA_PID" "$WORK/logs/haproxy.log"
check_alive registry "$REGISTRY_PID" "$WORK/logs/registry.log"

# ---------------------------------------------------------------- report
python3 "$BENCH_DIR/gateway-report.py" "$RAW_DIR" "$RESULTS_FILE"
log "wrote $RESULTS_FILE (raw data in $RAW_DIR)"
