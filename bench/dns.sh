#!/usr/bin/env bash
# DNS benchmark: Meshwork's DNS interface (one --dev server) vs BIND 9
# (Debian's bind9, authoritative for the same `mesh.` data), both on
# 127.0.0.1, driven in the same run by the same dnsperf with the same query
# file (50% A, 50% SRV for web.service.mesh., a service with 10 instances).
#
#   bash bench/dns.sh        # writes bench/RESULTS-dns.md; raw data in $RAW_DIR
#
# Environment knobs (defaults in brackets):
#   DURATION      seconds per throughput run and of the fixed-rate run [10]
#   ROUNDS        throughput runs per system and setting; the order of the
#                 two systems alternates from round to round [3]
#   LAT_DURATION  seconds per latency run (dnsperf -v, per-query latencies); 0 = skip [10]
#   WARMUP        seconds of discarded load before each setting's runs [2]
#   SETTINGS      closed-loop load settings, CLIENTS:OUTSTANDING (dnsperf -c/-q)
#                 ["1:10 1:100 4:100"]. With few queries in flight dnsperf's
#                 sender sleeps when an answer comes back before it waits for
#                 one (at -q 1 a 67 µs answer gives ~190 qps): 1:10 measures
#                 that more than the server once answers take under ~100 µs;
#                 1:100 (dnsperf's default -q) is one client kept busy
#   PINNED_SETTINGS closed-loop settings also run with the server pinned to
#                 CPU 1 and dnsperf to CPU 0 (taskset), so that neither takes
#                 CPU from the other; "" = skip ["1:100 4:100"]
#   FIXED_QPS     offered rate of the fixed-rate latency run (dnsperf -Q); 0 = skip [2000]
#   FIXED_SETTING CLIENTS:OUTSTANDING of the fixed-rate run [4:100]
#   EDNS          1 = dnsperf -e (EDNS0, 4096-byte UDP answers, so the SRV
#                 answer with its 10 additional A records fits) [1]
#   QUIET_WAIT_S  before each measured run, wait up to this long for the
#                 machine to be idle (2-core box shared with others) [30]
#   NOISE_PCT     repeat a measured run if other processes used more than this
#                 % of the machine's CPU during it; the quietest try is kept [10]
#   MAX_ATTEMPTS  tries per measured run [3]
#   PORT_BASE     ports PORT_BASE+1..+5: Meshwork http, grpc, raft, dns; BIND.
#   ACL           1 = the registry runs with ACLs (default deny), answering DNS
#                 as a DNS token that may read every service and node (the
#                 query's resolution and checks cost, beside BIND) [0]
#                 If one is in use, another block in 35000-35999 is taken [35400]
#   DIAG_STRACE   1 = after the measured runs, attach `strace -c -f` to each
#                 server for STRACE_S [5] seconds at FIXED_QPS (syscalls per
#                 query; a diagnostic, not in the tables) [1]
#   SKIP_BUILD    1 = use the existing release binary [0]
#   BENCH_TMPDIR  parent of the temp dir (server data, BIND config and zone) [/tmp]
#   RESULTS_FILE  report [bench/RESULTS-dns.md]
#   RAW_DIR       raw dnsperf output, /proc samples, logs; replaced each run
#                 (only if this script made it) [/tmp/meshwork-bench-dns]
#
# Everything listens on 127.0.0.1 only; every wait loop is bounded; the EXIT
# trap stops the two servers (and any load process) this script started and
# removes its temp dir. A system-wide named (bind9.service) is neither used
# nor touched: BIND runs here as its own foreground `named -g` on PORT_BASE+5.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
PINNED_SETTINGS=${PINNED_SETTINGS:-"1:100 4:100"}
LAT_DURATION=${LAT_DURATION:-10}
WARMUP=${WARMUP:-2}
SETTINGS=${SETTINGS:-"1:10 1:100 4:100"}
FIXED_QPS=${FIXED_QPS:-2000}
FIXED_SETTING=${FIXED_SETTING:-4:100}
EDNS=${EDNS:-1}
QUIET_WAIT_S=${QUIET_WAIT_S:-30}
NOISE_PCT=${NOISE_PCT:-10}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-3}
PORT_BASE=${PORT_BASE:-35400}
DIAG_STRACE=${DIAG_STRACE:-1}
STRACE_S=${STRACE_S:-5}
SKIP_BUILD=${SKIP_BUILD:-0}
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}
ACL=${ACL:-0}
if [ "$ACL" = 1 ]; then
    RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-dns-acl.md}
fi
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS-dns.md}
# With ACL=1: the management token (bootstrapped with this secret) and the
# DNS token the registry is configured with.
ACL_MANAGEMENT=5ec0e000-0000-4000-8000-0000000000a1
ACL_DNS=5ec0e000-0000-4000-8000-0000000000d5
MW_TOKEN_HEADER=()
RAW_DIR=${RAW_DIR:-/tmp/meshwork-bench-dns}
N_INSTANCES=10

MW_HTTP="" MW_GRPC="" MW_RAFT="" MW_DNS="" BIND_PORT=""

export PATH="$PATH:/usr/sbin:/sbin"   # named, named-checkconf when not root's PATH
MW_DEV_PID="" BIND_PID=""

# ---------------------------------------------------------------- prerequisites
NAMED=""
find_named() {
    NAMED=$(command -v named 2>/dev/null || echo /usr/sbin/named)
    [ -x "$NAMED" ] || die "named not found after installing bind9"
}

# Ports: PORT_BASE+1..+5. 35000-35999 is inside Linux's ephemeral range, so
# other programs' client connections come and go there too: a base is taken
# only if no socket uses one of its ports (failing that, none but sockets in
# TIME-WAIT), and start_servers
# moves to another base if a server still cannot bind.
set_ports() {
    MW_HTTP=$(($1 + 1)) MW_GRPC=$(($1 + 2)) MW_RAFT=$(($1 + 3)) MW_DNS=$(($1 + 4)) BIND_PORT=$(($1 + 5))
}

ports_free() { # base strict|lenient -> 0 if none of its five ports is in use
    # (TCP or UDP; lenient: sockets in TIME-WAIT do not count)
    ss -Htanu 2>/dev/null | awk -v lo="$(($1 + 1))" -v hi="$(($1 + 5))" -v mode="$2" '
        mode == "strict" || $2 != "TIME-WAIT" { n = split($5, a, ":"); p = a[n] + 0; if (p >= lo && p <= hi) f = 1 }
        END { exit f }'
}

pick_ports() { # [exclude-base]
    local base mode
    for mode in strict lenient; do
        for base in "$PORT_BASE" $(shuf -i 0-98 | awk '{print 35000 + $1 * 10}'); do
            [ "$base" = "${1:-}" ] && continue
            if ports_free "$base" "$mode"; then set_ports "$base"; return 0; fi
        done
    done
    die "no free block of 5 ports found in 35000-35999"
}

# ---------------------------------------------------------------- servers
start_dns_meshwork() {
    local -a acl=()
    if [ "$ACL" = 1 ]; then
        printf '[acl]\nenabled = true\ndefault_policy = "deny"\n\n[acl.tokens]\ndns = "%s"\n' \
            "$ACL_DNS" >"$WORK/acl.toml"
        acl=(--config "$WORK/acl.toml")
        MW_TOKEN_HEADER=(-H "X-Consul-Token: $ACL_MANAGEMENT")
    fi
    start_meshwork dev "$WORK/mw" "$WORK/logs/meshwork.log" "$MW_HTTP" "$MW_GRPC" "$MW_RAFT" "$MW_DNS" - "${acl[@]}"
    MW_DEV_PID=$LAST_PID
}

# With ACL=1: bootstraps, then gives the configured DNS token read on every
# service and node (a policy, as an operator would).
setup_acl() {
    [ "$ACL" = 1 ] || return 0
    local out
    out=$(curl -s -m 5 -X PUT -d "{\"BootstrapSecret\":\"$ACL_MANAGEMENT\"}" "http://$HOST:$MW_HTTP/v1/acl/bootstrap")
    case "$out" in *SecretID*) ;; *) die "ACL bootstrap failed: '$out'" ;; esac
    out=$(curl -s -m 5 -X PUT "${MW_TOKEN_HEADER[@]}" "http://$HOST:$MW_HTTP/v1/acl/policy" \
        -d '{"Name":"dns-read","Rules":"service_prefix \"\" {\n  policy = \"read\"\n}\nnode_prefix \"\" {\n  policy = \"read\"\n}\n"}')
    case "$out" in *dns-read*) ;; *) die "DNS policy failed: '$out'" ;; esac
    out=$(curl -s -m 5 -X PUT "${MW_TOKEN_HEADER[@]}" "http://$HOST:$MW_HTTP/v1/acl/token" \
        -d "{\"SecretID\":\"$ACL_DNS\",\"Description\":\"DNS\",\"Policies\":[{\"Name\":\"dns-read\"}]}")
    case "$out" in *AccessorID*) ;; *) die "DNS token failed: '$out'" ;; esac
}

write_bind_config() {
    local dir="$WORK/bind" i
    mkdir -p "$dir"
    # Same records as the catalog gives, TTL 0 as Meshwork's default answers.
    {
        echo '$TTL 0'
        echo '@ IN SOA ns.mesh. hostmaster.mesh. 1 3600 600 86400 0'
        echo '@ IN NS ns.mesh.'
        echo 'ns IN A 127.0.0.1'
        for i in $(seq 1 "$N_INSTANCES"); do
            echo "web.service IN A 198.18.1.$i"
            echo "web.service IN SRV 1 1 $((8000 + i)) host$i.node.dc1.mesh."
            echo "host$i.node.dc1 IN A 198.18.1.$i"
        done
    } >"$dir/mesh.zone"
    # minimal-responses no-auth: no NS in the authority section but additional
    # A records for SRV targets, as Meshwork answers. rrset-order random: the
    # records are shuffled per answer, as Meshwork does.
    cat >"$dir/named.conf" <<EOF
options {
    directory "$dir";
    pid-file "$dir/named.pid";
    session-keyfile "$dir/session.key";
    listen-on port $BIND_PORT { $HOST; };
    listen-on-v6 { none; };
    recursion no;
    allow-query { $HOST; };
    dnssec-validation no;
    minimal-responses no-auth;
    rrset-order { order random; };
    querylog no;
    notify no;
};
controls { };
zone "mesh." { type primary; file "$dir/mesh.zone"; };
EOF
    named-checkconf "$dir/named.conf" >&2 || die "named-checkconf failed"
    named-checkzone -q mesh. "$dir/mesh.zone" || die "named-checkzone failed"
}

start_bind() {
    # -g: foreground, log to stderr; -p: our port. Threads: named's default (one per CPU).
    "$NAMED" -g -c "$WORK/bind/named.conf" -p "$BIND_PORT" >"$WORK/logs/named.log" 2>&1 &
    BIND_PID=$!
    PIDS+=("$BIND_PID")
}

stop_servers() { # stops the current Meshwork and BIND (a failed start)
    local pid i keep=()
    for pid in "$MW_DEV_PID" "$BIND_PID"; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 1 50); do
        { kill -0 "$MW_DEV_PID" 2>/dev/null || kill -0 "$BIND_PID" 2>/dev/null; } || break
        sleep 0.2
    done
    for pid in "$MW_DEV_PID" "$BIND_PID"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait "$MW_DEV_PID" "$BIND_PID" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        if [ "$pid" != "$MW_DEV_PID" ] && [ "$pid" != "$BIND_PID" ]; then keep+=("$pid"); fi
    done
    PIDS=("${keep[@]}")
    MW_DEV_PID="" BIND_PID=""
    return 0
}

# Starts both servers on a free block of ports; returns 1 if one of them could
# not bind (then the caller tries another block), dies on other failures.
try_start() {
    local deadline=$((SECONDS + 60)) leader=""
    write_bind_config
    start_dns_meshwork
    start_bind
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! kill -0 "$MW_DEV_PID" 2>/dev/null; then
            if grep -qi 'address already in use' "$WORK/logs/meshwork.log"; then
                log "  Meshwork: $(grep -i -m1 'address already in use' "$WORK/logs/meshwork.log"); trying other ports"
                return 1
            fi
            check_alive meshwork "$MW_DEV_PID" "$WORK/logs/meshwork.log"
        fi
        leader=$(curl -s -m 2 "http://$HOST:$MW_HTTP/v1/status/leader" 2>/dev/null || true)
        case "$leader" in '"'?*'"') break ;; esac
        sleep 0.3
    done
    case "$leader" in '"'?*'"') ;; *) die "Meshwork has no leader after 60 s (got '$leader')" ;; esac
    sleep 0.5
    if grep -qiE 'address in use|could not listen|failed to listen' "$WORK/logs/named.log"; then
        log "  BIND: port taken, trying other ports"; return 1
    fi
    check_alive bind "$BIND_PID" "$WORK/logs/named.log"
    log "Meshwork leader $leader"
    return 0
}

start_servers() {
    local attempt prev=""
    for attempt in 1 2 3 4 5 6; do
        pick_ports "$prev"
        prev=$((MW_HTTP - 1))
        rm -rf "$WORK/mw" "$WORK/bind"
        try_start && return 0
        stop_servers
    done
    die "could not start the servers on free ports in 6 attempts"
}

wait_ready() {
    local deadline i
    setup_acl
    log "registering $N_INSTANCES instances of web"
    for i in $(seq 1 "$N_INSTANCES"); do
        local body out
        body=$(printf '{"Node":"host%d","Address":"198.18.1.%d","Service":{"Service":"web","ID":"web-%d","Port":%d},"Check":{"CheckID":"web-%d-alive","Name":"alive","ServiceID":"web-%d","Status":"passing"}}' \
            "$i" "$i" "$i" $((8000 + i)) "$i" "$i")
        out=$(curl -s -m 5 -X PUT "${MW_TOKEN_HEADER[@]}" --data-binary "$body" "http://$HOST:$MW_HTTP/v1/catalog/register" || true)
        [ "$out" = true ] || die "register web-$i failed: '$out'"
    done
    # Both servers answer the A query with 10 records (bounded wait).
    local sys port n
    for sys in meshwork bind; do
        if [ "$sys" = meshwork ]; then port=$MW_DNS; else port=$BIND_PORT; fi
        deadline=$((SECONDS + 30)); n=0
        while [ "$SECONDS" -lt "$deadline" ]; do
            check_alive meshwork "$MW_DEV_PID" "$WORK/logs/meshwork.log"
            check_alive bind "$BIND_PID" "$WORK/logs/named.log"
            n=$(dig +short +time=1 +tries=1 @"$HOST" -p "$port" web.service.mesh A 2>/dev/null | grep -c '^198\.18\.1\.' || true)
            [ "$n" = "$N_INSTANCES" ] && break
            sleep 0.3
        done
        [ "$n" = "$N_INSTANCES" ] || die "$sys answers web.service.mesh A with $n records, expected $N_INSTANCES"
    done
    log "both servers answer (Meshwork dns $HOST:$MW_DNS pid $MW_DEV_PID, BIND $HOST:$BIND_PORT pid $BIND_PID)"
}

port_of() { if [ "$1" = meshwork ]; then echo "$MW_DNS"; else echo "$BIND_PORT"; fi; }
pid_of() { if [ "$1" = meshwork ]; then echo "$MW_DEV_PID"; else echo "$BIND_PID"; fi; }

# ---------------------------------------------------------------- measurement
# run_dnsperf SYSTEM KIND SETTING SECONDS OUTFILE [extra dnsperf args...]
# KIND: warmup | tp (throughput) | lat (-v, per-query latency) | fixed (-Q, -v).
# Sets LAST_ROW (a runs.tsv line; not for warm-ups) and FOREIGN_PCT.
FOREIGN_PCT=0 LAST_ROW=""
run_dnsperf() {
    local sys=$1 kind=$2 setting=$3 d=$4 out=$5; shift 5
    local clients=${setting%%:*} outstanding=${setting##*:}
    local port pid; port=$(port_of "$sys"); pid=$(pid_of "$sys")
    local -a args=(-s "$HOST" -p "$port" -d "$WORK/dns-queries.txt" -l "$d" -c "$clients" -q "$outstanding" -t 5)
    [ "$EDNS" = 1 ] && args+=(-e)
    args+=("$@")
    local -a pin=()
    local mask=""
    if [ "${PIN:-0}" = 1 ]; then
        # Server on CPU 1 (all its threads), dnsperf on CPU 0.
        mask=$(taskset -p "$pid" | awk '{print $NF}')
        taskset -a -p 2 "$pid" >/dev/null
        pin=(taskset -c 0)
    fi
    local srv0 srv1 s0 s1 w0 w1 check_pid=""
    srv0=$(cpu_ticks "$pid"); s0=$(sys_cpu); w0=$(date +%s.%N)
    if [ "$kind" = tp ]; then
        # In the middle of the run, check 25 A + 25 SRV answers for content.
        ( sleep $((d / 2)); python3 "$BENCH_DIR/dns-check.py" "$sys" "$HOST" "$port" --quick 25 \
            >"$out.check" 2>&1 || true ) &
        check_pid=$!
        BG_PID=$check_pid
    fi
    local TIMEFORMAT='%U %S'
    { time timeout --kill-after=5 $((d + 20)) "${pin[@]}" dnsperf "${args[@]}" >"$out" 2>"$out.err" ; } 2>"$out.time" \
        || die "dnsperf failed for $sys ($kind $setting), see $out.err"
    s1=$(sys_cpu); srv1=$(cpu_ticks "$pid"); w1=$(date +%s.%N)
    [ -n "$mask" ] && taskset -a -p "$mask" "$pid" >/dev/null
    [ -n "$check_pid" ] && { wait "$check_pid" 2>/dev/null || true; BG_PID=""; }
    grep -q 'Queries per second' "$out" || die "no dnsperf summary for $sys ($kind $setting), see $out"
    check_alive "$sys" "$pid" "$WORK/logs/$([ "$sys" = meshwork ] && echo meshwork || echo named).log"
    [ "$kind" = warmup ] && return 0
    local busy srv_s client_s foreign
    busy=$(busy_between "$s0" "$s1")
    srv_s=$(awk -v a="$srv0" -v b="$srv1" -v t="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/t}')
    client_s=$(awk '{printf "%.2f", $1+$2}' "$out.time")
    local wall
    wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN{printf "%.2f", b-a}')
    # Share of the machine's CPU used by neither the server nor dnsperf (nor
    # the mid-run check, ~0.1 s): someone else's build or tests. Busy % comes
    # from /proc/stat (tick-sampled: it under-counts short bursts at low load,
    # so this estimate is clamped at 0 and only meaningful for busy runs).
    FOREIGN_PCT=$(awk -v busy="$busy" -v wall="$wall" -v n="$(nproc)" -v srv="$srv_s" -v cl="$client_s" \
        -v chk="$([ "$kind" = tp ] && echo 0.1 || echo 0)" \
        'BEGIN{cap=wall*n; f=busy/100*cap - srv - cl - chk; printf "%.0f", (cap>0 && f>0 ? 100*f/cap : 0)}')
    LAST_ROW=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' \
        "$sys" "$kind" "$setting" "$(basename "$out")" "$srv_s" "$client_s" "$wall" \
        "$busy" "$FOREIGN_PCT" "${IDLE_BEFORE:-}" "$(rss_kb "$pid" VmRSS)" "${ROUND:-1}" "${PIN:-0}" \
        "$(steal_between "$s0" "$s1")")
}

qps_of() { sed -n 's/^ *Queries per second: *//p' "$1" | awk '{printf "%.0f", $1}'; }

# ================================================================ main
START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)
T0=$SECONDS
# (policy-rc.d may or may not let bind9's postinst start the system named on
# port 53; either way it is not the one measured here.)
ensure_packages dnsperf:dnsperf named:bind9 named-checkzone:bind9-utils dig:dnsutils \
    curl:curl python3:python3 ss:iproute2 taskset:util-linux
find_named
check_raw_dir "$RAW_DIR" .dns-bench-raw

if [ "$SKIP_BUILD" != 1 ]; then
    build_release 0 --bin meshwork-registry
fi
MW_BIN=${MW_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/meshwork-registry}
[ -x "$MW_BIN" ] || die "no binary at $MW_BIN"

mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-dns-bench.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/raw"
: >"$WORK/runs.tsv"; : >"$WORK/checks.tsv"
# 50% A, 50% SRV; dnsperf cycles through the file.
printf 'web.service.mesh A\nweb.service.mesh SRV\n' >"$WORK/dns-queries.txt"

{
    echo "date_utc=$START_TS"
    echo "nproc=$(nproc)"
    echo "cpu_model=$(cpu_model)"
    echo "kernel=$(uname -r)"
    echo "dnsperf_version=$(dnsperf -h 2>&1 | awk '/^Version/{print $2}')"
    echo "bind_version=$("$NAMED" -v 2>/dev/null)"
    echo "meshwork_version=$("$MW_BIN" --version 2>/dev/null | awk '{print $2}')"
    echo "git_rev=$(git_rev)"
    echo "git_dirty_files=$(git_status | grep -vc '^.. bench/' || true)"
    echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "duration=$DURATION"
    echo "lat_duration=$LAT_DURATION"
    echo "warmup=$WARMUP"
    echo "settings=$SETTINGS"
    echo "pinned_settings=$PINNED_SETTINGS"
    echo "rounds=$ROUNDS"
    echo "fixed_qps=$FIXED_QPS"
    echo "fixed_setting=$FIXED_SETTING"
    echo "edns=$EDNS"
    echo "acl=$ACL"
    echo "noise_pct=$NOISE_PCT"
    echo "max_attempts=$MAX_ATTEMPTS"
    echo "bind_threads=default (one per CPU)"
    echo "system_named=$(pgrep -x named | grep -vx "${BIND_PID:-none}" | tr '\n' ' ' || true)"
} >"$WORK/machine.txt"
free -h >"$WORK/free.txt"
ps -eo pid,ni,pcpu,etime,comm --sort=-pcpu | head -n 8 >"$WORK/ps-before.txt"

log "starting Meshwork and BIND in $WORK"
start_servers
wait_ready
echo "ports=Meshwork dns $MW_DNS (http $MW_HTTP), BIND $BIND_PORT" >>"$WORK/machine.txt"
echo "meshwork_threads=$(ls /proc/"$MW_DEV_PID"/task | wc -l)" >>"$WORK/machine.txt"
echo "bind_threads_running=$(ls /proc/"$BIND_PID"/task | wc -l)" >>"$WORK/machine.txt"

log "checking answers (before load)"
for sys in meshwork bind; do
    python3 "$BENCH_DIR/dns-check.py" "$sys" "$HOST" "$(port_of "$sys")" --rounds 100 \
        | sed 's/^/before\t/' >>"$WORK/checks.tsv" || true
done
log "  $(awk -F'\t' '$4=="FAIL"' "$WORK/checks.tsv" | wc -l) failed checks"

# One measured run (KIND tp, lat or fixed). If other processes used more than
# NOISE_PCT of the machine during it, it is repeated (up to MAX_ATTEMPTS) and
# the quietest attempt is kept; its files get the name OUTFILE, its line goes
# to runs.tsv. Uses ROUND and PIN.
measured_run() { # SYSTEM KIND SETTING SECONDS OUTFILE [dnsperf args...]
    local sys=$1 kind=$2 setting=$3 d=$4 out=$5; shift 5
    local attempt best=0 best_foreign=1000 best_row="" f what
    case "$kind" in
        tp) what="throughput" ;; lat) what="latency (dnsperf -v)" ;; *) what="fixed rate $FIXED_QPS qps (dnsperf -v)" ;;
    esac
    for attempt in $(seq 1 "$MAX_ATTEMPTS"); do
        wait_quiet
        IDLE_BEFORE=$QUIET_BUSY
        log "$sys: $what ${d}s, -c/-q $setting$([ "${PIN:-0}" = 1 ] && echo ', pinned')$([ "$kind" = tp ] && echo ", round $ROUND") (attempt $attempt)"
        run_dnsperf "$sys" "$kind" "$setting" "$d" "$out.a$attempt" "$@"
        log "  $(qps_of "$out.a$attempt") qps; other processes used ${FOREIGN_PCT}% of the machine"
        if [ "$FOREIGN_PCT" -lt "$best_foreign" ]; then
            best=$attempt best_foreign=$FOREIGN_PCT best_row=$LAST_ROW
        fi
        [ "$FOREIGN_PCT" -le "$NOISE_PCT" ] && break
        [ "$attempt" -lt "$MAX_ATTEMPTS" ] && log "  repeating (noise above ${NOISE_PCT}%)"
    done
    for f in "$out.a$best"*; do mv -- "$f" "$out${f#"$out.a$best"}"; done
    printf '%s\n' "$best_row" | awk -F'\t' -v OFS='\t' -v f="$(basename "$out")" '{$4 = f; print}' >>"$WORK/runs.tsv"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sys" "$kind" "$setting" "${PIN:-0}" "${ROUND:-1}" "$attempt" "$best" >>"$WORK/attempts.tsv"
}

# Closed-loop settings: ROUNDS rounds of throughput runs, the order of the two
# systems alternating from round to round (and the first system alternating
# from setting to setting); then one dnsperf -v latency run per system.
flip=0
closed_loop() { # SETTING TAG PINNED
    local setting=$1 tag=$2 pinned=$3 sys first second
    if [ "$flip" = 0 ]; then first=meshwork second=bind; flip=1; else first=bind second=meshwork; flip=0; fi
    PIN=$pinned
    if [ "$WARMUP" -gt 0 ]; then
        for sys in $first $second; do
            run_dnsperf "$sys" warmup "$setting" "$WARMUP" "$WORK/raw/warmup-$sys-$tag.txt"
        done
    fi
    for ROUND in $(seq 1 "$ROUNDS"); do
        if [ $((ROUND % 2)) = 1 ]; then order="$first $second"; else order="$second $first"; fi
        for sys in $order; do measured_run "$sys" tp "$setting" "$DURATION" "$WORK/raw/tp-$sys-$tag-r$ROUND.txt"; done
    done
    ROUND=1
    if [ "$pinned" = 0 ] && [ "$LAT_DURATION" -gt 0 ]; then
        for sys in $first $second; do
            measured_run "$sys" lat "$setting" "$LAT_DURATION" "$WORK/raw/lat-$sys-$tag.txt" -v
        done
    fi
    PIN=0
}

ROUND=1 PIN=0
for setting in $SETTINGS; do
    closed_loop "$setting" "c${setting%%:*}q${setting##*:}" 0
done
if [ -n "$PINNED_SETTINGS" ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    for setting in $PINNED_SETTINGS; do
        closed_loop "$setting" "c${setting%%:*}q${setting##*:}-pinned" 1
    done
fi
if [ "$FIXED_QPS" -gt 0 ]; then
    if [ "$flip" = 0 ]; then order="meshwork bind"; else order="bind meshwork"; fi
    for sys in $order; do
        [ "$WARMUP" -gt 0 ] && run_dnsperf "$sys" warmup "$FIXED_SETTING" "$WARMUP" "$WORK/raw/warmup-$sys-fixed.txt" -Q "$FIXED_QPS"
        measured_run "$sys" fixed "$FIXED_SETTING" "$DURATION" "$WORK/raw/fixed-$sys.txt" -Q "$FIXED_QPS" -v
    done
fi

# Diagnostic (not in the tables): syscalls per query of each server at the
# fixed rate, from `strace -c -f` attached for STRACE_S seconds.
if [ "$DIAG_STRACE" = 1 ] && [ "$FIXED_QPS" -gt 0 ] && command -v strace >/dev/null; then
    for sys in meshwork bind; do
        log "diagnostic: strace -c -f on $sys for ${STRACE_S}s at $FIXED_QPS qps"
        strace -c -f -o "$WORK/raw/strace-$sys.txt" -p "$(pid_of "$sys")" 2>"$WORK/raw/strace-$sys.err" &
        BG_PID=$!
        sleep 1
        timeout --kill-after=5 $((STRACE_S + 20)) dnsperf -s "$HOST" -p "$(port_of "$sys")" -d "$WORK/dns-queries.txt" \
            -l "$STRACE_S" -c "${FIXED_SETTING%%:*}" -q "${FIXED_SETTING##*:}" -Q "$FIXED_QPS" $([ "$EDNS" = 1 ] && echo -e) \
            >"$WORK/raw/strace-dnsperf-$sys.txt" 2>&1 || true
        stop_bg 10
        check_alive "$sys" "$(pid_of "$sys")" "$WORK/logs/$([ "$sys" = meshwork ] && echo meshwork || echo named).log"
    done
fi

log "checking answers (after load)"
for sys in meshwork bind; do
    python3 "$BENCH_DIR/dns-check.py" "$sys" "$HOST" "$(port_of "$sys")" --rounds 100 \
        | sed 's/^/after\t/' >>"$WORK/checks.tsv" || true
done
for f in "$WORK"/raw/tp-*.txt.check; do
    [ -f "$f" ] || continue
    t=$(basename "$f" .txt.check); sed "s/^/during-${t#tp-*-}\t/" "$f" >>"$WORK/checks.tsv"
done
for sys in meshwork bind; do
    pid=$(pid_of "$sys")
    printf '%s\t%s\t%s\n' "$sys" "$(rss_kb "$pid" VmRSS)" "$(rss_kb "$pid" VmHWM)" >>"$WORK/rss.tsv"
done
echo "elapsed_s=$((SECONDS - T0))" >>"$WORK/machine.txt"

claim_raw_dir "$RAW_DIR" .dns-bench-raw
cp "$WORK"/raw/* "$RAW_DIR"/ 2>/dev/null || true
cp "$WORK"/logs/*.log "$WORK"/*.tsv "$WORK"/machine.txt "$WORK"/free.txt "$WORK"/ps-before.txt \
   "$WORK"/dns-queries.txt "$WORK"/bind/named.conf "$WORK"/bind/mesh.zone "$RAW_DIR"/ 2>/dev/null || true

python3 "$BENCH_DIR/dns-report.py" "$RAW_DIR" >"$RESULTS_FILE.tmp"
mv "$RESULTS_FILE.tmp" "$RESULTS_FILE"
log "wrote $RESULTS_FILE (raw data in $RAW_DIR); $((SECONDS - T0)) s"
