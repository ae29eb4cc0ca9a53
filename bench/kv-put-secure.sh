#!/usr/bin/env bash
# The cost of security on KV writes: a three-server Meshwork cluster plain,
# then with ACLs (default deny; a non-management token whose rules are
# evaluated on every write) and TLS (HTTPS to the API, mutual TLS between
# servers), beside a three-member etcd cluster plain and with TLS (client
# and peer TLS, peers authenticated by certificate). Same wrk + Lua script
# and 256-byte values as bench/kv-put.sh; one system at a time.
#
#   bash bench/kv-put-secure.sh     # writes bench/RESULTS-security.md
#
# Environment knobs (defaults in brackets):
#   DURATION     seconds per measured run [15]
#   WARMUP       seconds of discarded warm-up before each measured run [3]
#   CONCURRENCY  connection counts [16 64]
#   SKIP_BUILD   1 = use the existing release binaries [0]
#   BENCH_TMPDIR parent of the temporary data dirs [/var/tmp] (a real disk)
#   RESULTS_FILE where to write the report [bench/RESULTS-security.md]
#
# wrk cannot present a client certificate, so etcd runs without
# --client-cert-auth (its clients are checked by nothing here; Meshwork's by
# their ACL token). Everything listens on 127.0.0.1 only; every wait loop is
# bounded; the EXIT trap stops what this script started.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source=lib.sh
. "$BENCH_DIR/lib.sh"
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
CONCURRENCY=${CONCURRENCY:-"16 64"}
SKIP_BUILD=${SKIP_BUILD:-0}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-security.md}
LUA=$BENCH_DIR/wrk-put.lua
declare -A MW_PID=() ETCD_PID=()

ensure_packages etcd:etcd-server wrk:wrk curl:curl python3:python3
check_ports 18301 18302 18303 18501 18502 18503 18551 18552 18553 18601 18602 18603 \
    18631 18632 18633 18701 18702 18703 23791 23792 23793 23801 23802 23803
if [ "$SKIP_BUILD" != 1 ]; then
    build_release 0 --bin meshwork-registry --bin meshctl
fi
TARGET=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
MW_BIN=$TARGET/meshwork-registry
CTL=$TARGET/meshctl
[ -x "$MW_BIN" ] && [ -x "$CTL" ] || die "no release binaries in $TARGET"

mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-secure.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/raw" "$WORK/tls"
: >"$WORK/runs.tsv"

log "certificates (meshctl tls)"
"$CTL" tls ca create --dir "$WORK/tls" >/dev/null
"$CTL" tls cert create --server --dir "$WORK/tls" >/dev/null
CA=$WORK/tls/meshwork-agent-ca.pem
CERT=$WORK/tls/dc1-server-meshwork-0.pem
KEY=$WORK/tls/dc1-server-meshwork-0-key.pem

stop_all() {
    local pid
    for pid in "${MW_PID[@]}" "${ETCD_PID[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${MW_PID[@]}" "${ETCD_PID[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    MW_PID=() ETCD_PID=()
}

# measure LABEL URL MODE: warm-up, then one run per connection count.
measure() {
    local label=$1 url=$2 mode=$3 c threads out
    for c in $CONCURRENCY; do
        threads=$(( c < 2 ? c : 2 ))
        wrk -t"$threads" -c"$c" -d"${WARMUP}s" --timeout 10s -s "$LUA" "$url" -- "$mode" "warm-$c" \
            >/dev/null 2>&1 || die "warm-up failed: $label c=$c"
        out=$WORK/raw/$label-$c.txt
        wrk -t"$threads" -c"$c" -d"${DURATION}s" --timeout 10s --latency -s "$LUA" "$url" \
            -- "$mode" "run-$c" >"$out" 2>"$out.err" || die "wrk failed: $label c=$c (see $out.err)"
        grep -q '^RESULT ' "$out" || die "no RESULT from wrk: $label c=$c"
        printf '%s\t%s\t%s\n' "$label" "$c" "$(sed -n 's/^RESULT //p' "$out")" >>"$WORK/runs.tsv"
        log "$label c=$c: $(sed -n 's/^RESULT //p' "$out" | tr ' ' '\n' | grep -E '^(completed|ok|p99_us)=' | tr '\n' ' ')"
    done
}

# mw_cluster: three plain servers; sets MW_URL to the leader's API.
mw_cluster() {
    local i leader="" raw deadline
    rm -rf "$WORK/mw"
    for i in 1 2 3; do
        start_meshwork "$i" "$WORK/mw/n$i" "$WORK/logs/mw-plain-$i.log" "1850$i" "1860$i" "1830$i" "1870$i" \
            "1@$HOST:18301,2@$HOST:18302,3@$HOST:18303"
        MW_PID[$i]=$LAST_PID
    done
    deadline=$((SECONDS + 60))
    while [ -z "$leader" ] && [ "$SECONDS" -lt "$deadline" ]; do
        for i in 1 2 3; do
            raw=$(curl -s -m 2 "http://$HOST:1850$i/v1/status/leader" 2>/dev/null) || continue
            case "$raw" in *":1830"[123]*) raw=${raw##*:1830}; leader=${raw:0:1}; break ;; esac
        done
        sleep 0.3
    done
    [ -n "$leader" ] || die "no Meshwork leader within 60 s"
    MW_URL="http://$HOST:1850$leader"
}

# etcd_cluster SCHEME: three members, TLS for clients and peers with https;
# sets ETCD_URL to the leader's.
etcd_cluster() {
    local scheme=$1 i leader="" raw deadline
    local -a tls=()
    # No --trusted-ca-file for clients: this etcd then demands a client
    # certificate, which wrk cannot present.
    [ "$scheme" = https ] && tls=(--cert-file "$CERT" --key-file "$KEY"
        --peer-cert-file "$CERT" --peer-key-file "$KEY" --peer-trusted-ca-file "$CA" --peer-client-cert-auth)
    rm -rf "$WORK/etcd"; mkdir -p "$WORK/etcd"
    local cluster="e1=$scheme://$HOST:23801,e2=$scheme://$HOST:23802,e3=$scheme://$HOST:23803"
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$WORK/etcd/n$i" \
            --listen-client-urls "$scheme://$HOST:2379$i" --advertise-client-urls "$scheme://$HOST:2379$i" \
            --listen-peer-urls "$scheme://$HOST:2380$i" --initial-advertise-peer-urls "$scheme://$HOST:2380$i" \
            --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token mw-secure \
            --logger zap --log-level warn "${tls[@]}" >"$WORK/logs/etcd-$scheme-$i.log" 2>&1 &
        ETCD_PID[$i]=$!
        PIDS+=("$!")
    done
    deadline=$((SECONDS + 60))
    while [ -z "$leader" ] && [ "$SECONDS" -lt "$deadline" ]; do
        for i in 1 2 3; do
            raw=$(curl -s -m 2 --cacert "$CA" -X POST -d '{}' "$scheme://$HOST:2379$i/v3/maintenance/status" 2>/dev/null) || continue
            if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["header"]["member_id"]==d["leader"] else 1)' "$raw" 2>/dev/null; then
                leader=$i; break
            fi
        done
        sleep 0.3
    done
    [ -n "$leader" ] || die "no etcd leader within 60 s"
    ETCD_URL="$scheme://$HOST:2379$leader"
}

START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)

log "Meshwork, plain"
mw_cluster
measure meshwork-plain "$MW_URL" meshwork
stop_all

log "Meshwork, ACLs (default deny) + TLS"
# Each server's HTTPS port is 1855N (the plain one stays on for the
# leader lookup only).
rm -rf "$WORK/mw"
for i in 1 2 3; do
    start_meshwork "$i" "$WORK/mw/n$i" "$WORK/logs/mw-https-$i.log" "1850$i" "1860$i" "1830$i" "1870$i" \
        "1@$HOST:18301,2@$HOST:18302,3@$HOST:18303" --acl-enabled --tls-ca "$CA" --tls-cert "$CERT" \
        --tls-key "$KEY" --tls-verify-server-hostname --https-addr "$HOST:1855$i" --grpc-tls-addr "$HOST:1863$i"
    MW_PID[$i]=$LAST_PID
done
leader=""
deadline=$((SECONDS + 60))
while [ -z "$leader" ] && [ "$SECONDS" -lt "$deadline" ]; do
    for i in 1 2 3; do
        raw=$(curl -s -m 2 "http://$HOST:1850$i/v1/status/leader" 2>/dev/null) || continue
        case "$raw" in *":1830"[123]*) raw=${raw##*:1830}; leader=${raw:0:1}; break ;; esac
    done
    sleep 0.3
done
[ -n "$leader" ] || die "no Meshwork leader (ACLs + TLS) within 60 s"
MW_URL="https://$HOST:1855$leader"
MGMT=$(curl -s --cacert "$CA" -X PUT "$MW_URL/v1/acl/bootstrap" | python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')
curl -s --cacert "$CA" -X PUT -H "X-Consul-Token: $MGMT" "$MW_URL/v1/acl/policy" \
    -d '{"Name":"bench","Rules":"key_prefix \"\" {\n  policy = \"deny\"\n}\nkey_prefix \"warm-\" {\n  policy = \"write\"\n}\nkey_prefix \"run-\" {\n  policy = \"write\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\n"}' >/dev/null
WRK_TOKEN=$(curl -s --cacert "$CA" -X PUT -H "X-Consul-Token: $MGMT" "$MW_URL/v1/acl/token" \
    -d '{"Description":"bench","Policies":[{"Name":"bench"}]}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')
export WRK_TOKEN
measure meshwork-acl-tls "$MW_URL" meshwork
unset WRK_TOKEN
stop_all

log "etcd, plain"
etcd_cluster http
measure etcd-plain "$ETCD_URL" etcd
stop_all

log "etcd, TLS (clients and peers)"
etcd_cluster https
measure etcd-tls "$ETCD_URL" etcd
stop_all

python3 - "$WORK/runs.tsv" "$RESULTS_FILE" "$START_TS" "$(git_rev)" "$(nproc)" "$(cpu_model)" "$DURATION" <<'EOF'
import sys
runs, out, ts, rev, nproc, cpu, duration = sys.argv[1:]
rows = {}
for line in open(runs):
    label, c, result = line.rstrip("\n").split("\t")
    kv = dict(p.split("=") for p in result.split())
    secs = int(kv["duration_us"]) / 1e6
    rows[(label, int(c))] = (int(kv["ok"]) / secs, int(kv["p50_us"]) / 1000, int(kv["p99_us"]) / 1000,
                             int(kv["non2xx"]) + int(kv["badbody"]))
cs = sorted({c for _, c in rows})
labels = ["meshwork-plain", "meshwork-acl-tls", "etcd-plain", "etcd-tls"]
with open(out, "w") as f:
    f.write("# The cost of security on KV writes\n\n")
    f.write(f"`bash bench/kv-put-secure.sh` on {ts} (git {rev}), {nproc} cores ({cpu}), "
            f"{duration} s per run after a warm-up; three servers each, one system at a time, "
            "256-byte values through the same wrk script as `bench/kv-put.sh`.\n\n")
    f.write("- **meshwork-plain**: HTTP, no ACLs.\n")
    f.write("- **meshwork-acl-tls**: HTTPS to the API, mutual TLS between servers "
            "(`--tls-verify-server-hostname`), ACLs on with default deny, writes through a "
            "non-management token whose rules (a deny, two write prefixes) are evaluated on "
            "every request.\n")
    f.write("- **etcd-plain** / **etcd-tls**: Debian's etcd through its JSON gateway; with TLS "
            "for clients and peers (`--peer-client-cert-auth`). wrk cannot present a client "
            "certificate, so etcd runs without `--client-cert-auth`: its clients are not "
            "authenticated in this run, Meshwork's are (token).\n\n")
    f.write("| connections | system | writes/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|\n")
    for c in cs:
        for label in labels:
            if (label, c) in rows:
                r = rows[(label, c)]
                f.write(f"| {c} | {label} | {r[0]:.0f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]} |\n")
    f.write("\n| connections | Meshwork secure / plain | Meshwork secure / etcd TLS | etcd TLS / plain |\n|---|---|---|---|\n")
    for c in cs:
        g = lambda l: rows.get((l, c), (float("nan"),))[0]
        f.write(f"| {c} | {g('meshwork-acl-tls')/g('meshwork-plain'):.2f}× | "
                f"{g('meshwork-acl-tls')/g('etcd-tls'):.2f}× | {g('etcd-tls')/g('etcd-plain'):.2f}× |\n")
    f.write("\nTarget (issue 22): Meshwork with TLS + ACLs at least 0.9× its plain figure and ahead "
            "of etcd with TLS.\n")
print(open(out).read())
EOF
log "wrote $RESULTS_FILE"
