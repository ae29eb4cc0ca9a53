#!/usr/bin/env bash
# KV PUT benchmark: a three-server Meshwork cluster vs a three-member etcd
# cluster (Debian's etcd-server, written through its JSON gateway), both on
# 127.0.0.1, driven by the same wrk + Lua script with the same 256-byte values.
#
#   bash bench/kv-put.sh            # writes bench/RESULTS.md and bench/out/ (raw data)
#
# Environment knobs (defaults in brackets):
#   DURATION     seconds per measured run [20]
#   WARMUP       seconds of discarded warm-up before each measured run [3]
#   CONCURRENCY  connection counts [1 16 64]
#   DISK_WRITES  writes in the disk-usage phase [100000]
#   DISK_CONNS   connections in the disk-usage phase [64]
#   DISK_MAX_S   time cap of the disk-usage phase per system, seconds [300]
#   DIAG_STRACE  1 = short extra run under `strace -c` to count fsyncs [1]
#   SKIP_BUILD   1 = use the existing release binary [0]
#   BENCH_TMPDIR parent of the temporary data dirs [/var/tmp] (must be a real
#                disk, not tmpfs, or fsync costs nothing)
#   RESULTS_FILE where to write the report [bench/RESULTS.md]
#   RAW_DIR      where to keep raw wrk output and logs [bench/out/kv] (git-ignored)
#   QUIET_WAIT_S before each measured run, wait up to this long for the machine
#                to be idle (other processes skew a 2-core box) [90]
#   NOISE_PCT    if other processes used more than this % of the machine's CPU
#                during a measured run, that run is repeated [10]
#   MAX_ATTEMPTS at most this many tries per measured run [3]
#   MW_EXTRA_ARGS extra flags for meshwork-registry, word-split (experiments
#                only, e.g. "--snapshot-threshold 1000000") []
#
# Everything listens on 127.0.0.1 only; every wait loop is bounded; the EXIT
# trap stops every process this script started and removes the temp dir.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source=lib.sh
. "$BENCH_DIR/lib.sh"
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-3}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
DISK_WRITES=${DISK_WRITES:-100000}
DISK_CONNS=${DISK_CONNS:-64}
DISK_MAX_S=${DISK_MAX_S:-300}
DIAG_STRACE=${DIAG_STRACE:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS.md}
RAW_DIR=${RAW_DIR:-$BENCH_DIR/out/kv}
QUIET_WAIT_S=${QUIET_WAIT_S:-90}
NOISE_PCT=${NOISE_PCT:-10}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-3}
MW_EXTRA_ARGS=${MW_EXTRA_ARGS:-}
LUA=$BENCH_DIR/wrk-put.lua

# Ports. Meshwork: raft 1830N, http 1850N, grpc 1860N, dns 1870N.
# etcd: client 2379N, peer 2380N (N = 1..3; Debian's default 2379/2380 untouched).

declare -A MW_PID=() ETCD_PID=()
SAMPLER_PID=""
FOREIGN_PCT=0
kill_sampler() { [ -z "$SAMPLER_PID" ] || kill -KILL "$SAMPLER_PID" 2>/dev/null; }
add_cleanup kill_sampler


# ---------------------------------------------------------------- prerequisites
check_kv_ports() {
    check_ports 18301 18302 18303 18501 18502 18503 18601 18602 18603 \
        23791 23792 23793 23801 23802 23803
}

# ---------------------------------------------------------------- /proc helpers
io_write_bytes() { [ -r "/proc/$1/io" ] && awk '/^write_bytes/{print $2}' "/proc/$1/io" || echo 0; }
du_alloc() { du -sB1 "$1" | cut -f1; }
du_apparent() { du -sb --apparent-size "$1" | cut -f1; }

# Waits (bounded) for an idle machine (lib.sh) and records the last sample in
# quiet.tsv.
wait_quiet_kv() { # label
    wait_quiet
    printf '%s\t%s\n' "$1" "$QUIET_BUSY" >>"$WORK/quiet.tsv"
}

# ---------------------------------------------------------------- clusters
url_of() { # system -> leader base URL
    if [ "$1" = meshwork ]; then echo "http://$HOST:1850$MW_LEADER"; else echo "http://$HOST:2379$ETCD_LEADER"; fi
}

# ---------------------------------------------------------------- measurement
all_server_pids() { echo "${MW_PID[1]} ${MW_PID[2]} ${MW_PID[3]} ${ETCD_PID[1]} ${ETCD_PID[2]} ${ETCD_PID[3]}"; }

# scrape_mw_metrics OUTPREFIX: each Meshwork server's /metrics into
# OUTPREFIX-nN.txt (the per-stage histograms of a write; see report.py).
scrape_mw_metrics() {
    local i
    for i in 1 2 3; do
        curl -s -m 5 "http://$HOST:1850$i/metrics" >"$1-n$i.txt" 2>/dev/null || true
    done
}

# run_load SYSTEM CONNS SECONDS PREFIX OUTFILE [record]
# Runs wrk; if the 6th argument is "record", appends one line to runs.tsv.
run_load() {
    local sys=$1 c=$2 d=$3 prefix=$4 out=$5 record=${6:-}
    local threads=$(( c < 2 ? c : 2 )) url pid
    url=$(url_of "$sys")
    local -a before=() wb_before=() after=() wb_after=()
    for pid in $(all_server_pids); do before+=("$(cpu_ticks "$pid")"); wb_before+=("$(io_write_bytes "$pid")"); done
    local s0 s1
    if [ "$record" = record ] && [ "$sys" = meshwork ]; then scrape_mw_metrics "$out.metrics-before"; fi
    s0=$(sys_cpu)
    local top_pid=""
    if [ "$record" = record ]; then
        ( sleep $((d / 2)); top -b -n1 -w 200 2>/dev/null | head -n 25 >"$out.top" ) &
        top_pid=$!
    fi
    local TIMEFORMAT='%U %S'
    { time timeout --signal=INT --kill-after=10 $((d + 30)) \
        wrk -t"$threads" -c"$c" -d"${d}s" --timeout 10s --latency -s "$LUA" "$url" -- "$sys" "$prefix" \
        >"$out" 2>"$out.err" ; } 2>"$out.time" || die "wrk failed for $sys c=$c (see $out.err)"
    if [ -n "$top_pid" ]; then wait "$top_pid" 2>/dev/null || true; fi
    s1=$(sys_cpu)
    if [ "$record" = record ] && [ "$sys" = meshwork ]; then scrape_mw_metrics "$out.metrics-after"; fi
    for pid in $(all_server_pids); do after+=("$(cpu_ticks "$pid")"); wb_after+=("$(io_write_bytes "$pid")"); done
    grep -q '^RESULT ' "$out" || die "no RESULT line from wrk for $sys c=$c (see $out)"
    if [ "$record" = record ]; then
        local -a cpu=() wb=()
        local k
        for k in 0 1 2 3 4 5; do
            cpu+=("$(awk -v a="${after[$k]}" -v b="${before[$k]}" -v t="$CLK_TCK" 'BEGIN{printf "%.2f", (a-b)/t}')")
            wb+=("$(( wb_after[k] - wb_before[k] ))")
        done
        local sysbusy
        sysbusy=$(busy_between "$s0" "$s1" "%.1f")
        # Share of the machine's CPU time used by processes other than the six
        # servers and wrk (someone else's build skews a 2-core machine).
        local ours=0
        for k in 0 1 2 3 4 5; do ours=$(( ours + after[k] - before[k] )); done
        FOREIGN_PCT=$(awk -v a="$s0" -v b="$s1" -v ours="$ours" -v w="$(cat "$out.time")" -v t="$CLK_TCK" \
            'BEGIN{split(a,x," "); split(b,y," "); split(w,z," "); dt=y[1]-x[1]; di=y[2]-x[2];
                   f=(dt-di) - ours - (z[1]+z[2])*t; printf "%.0f", (dt>0 && f>0 ? 100*f/dt : 0)}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sys" "$c" "$threads" \
            "$(sed -n 's/^RESULT //p' "$out")" \
            "${cpu[*]}" "${wb[*]}" "$(cat "$out.time")" "$sysbusy" \
            "$(sed -n 's/^FIRST_ERROR //p' "$out" | head -n1)" >>"$WORK/runs.tsv"
    fi
}

# Writes exactly-ish N keys with the same wrk script in quota mode. Each wrk
# thread stops after N/threads responses and drops a marker file; when all
# threads are done, wrk is sent SIGINT and prints its summary.
write_n() { # system n conns prefix outfile
    local sys=$1 n=$2 c=$3 prefix=$4 out=$5
    local threads=$(( c < 2 ? c : 2 )) url
    url=$(url_of "$sys")
    local quota=$(( (n + threads - 1) / threads ))
    local markers="$WORK/markers-$sys"
    rm -rf "$markers"; mkdir -p "$markers"
    wrk -t"$threads" -c"$c" -d"${DISK_MAX_S}s" --timeout 10s -s "$LUA" "$url" \
        -- "$sys" "$prefix" "$quota" "$markers" >"$out" 2>"$out.err" &
    BG_PID=$!
    local deadline=$((SECONDS + DISK_MAX_S + 30))
    while kill -0 "$BG_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        [ "$(find "$markers" -type f | wc -l)" -ge "$threads" ] && break
        sleep 0.2
    done
    stop_bg 10
    grep -q '^RESULT ' "$out" || die "no RESULT line from wrk (disk phase, $sys; see $out)"
}

snapshot_disk() { # label system -> appends to disk.tsv
    local i dir
    sync
    for i in 1 2 3; do
        if [ "$2" = meshwork ]; then dir="$WORK/mw/n$i"; else dir="$WORK/etcd/n$i"; fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$i" "$(du_alloc "$dir")" "$(du_apparent "$dir")" >>"$WORK/disk.tsv"
    done
}

fsync_probe() { # latency of fdatasync and of sled's sync_file_range on the data disk
    python3 - "$WORK/fsync-probe" <<'EOF2'
import ctypes, os, sys, time
path = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
FLAGS = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER, as sled 0.34 uses it
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
buf = b"x" * 4096
def probe(sync):
    lat = []
    for i in range(300):
        off = (i % 64) * 4096
        os.pwrite(fd, buf, off)
        t = time.perf_counter()
        sync(off)
        lat.append(time.perf_counter() - t)
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000
    return f"{q(50):.3f}\t{q(99):.3f}\t{sum(lat)/len(lat)*1000:.3f}"
def sfr(off):
    if libc.sync_file_range(fd, off, 4096, FLAGS) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")
print("fdatasync\t" + probe(lambda off: os.fdatasync(fd)))
print("sync_file_range\t" + probe(sfr))
os.close(fd)
os.unlink(path)
EOF2
}

strace_probe() { # system leader-pid -> raw/strace-<system>.txt
    local sys=$1 pid=$2
    local out="$WORK/raw/strace-$sys.txt"
    command -v strace >/dev/null || { echo "strace not installed" >"$out"; return 0; }
    strace -f -c -w -e trace=fsync,fdatasync,sync_file_range,write,pwrite64,writev,sendto,sendmsg \
        -p "$pid" -o "$out" 2>"$out.err" &
    BG_PID=$!
    sleep 1
    run_load "$sys" 16 5 "strace" "$WORK/raw/strace-wrk-$sys.txt"
    stop_bg 20
}

# ================================================================ main
START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ensure_packages etcd:etcd-server etcdctl:etcd-client wrk:wrk curl:curl python3:python3
check_kv_ports
check_raw_dir "$RAW_DIR" .kv-put-raw

if [ "$SKIP_BUILD" != 1 ]; then
    build_release 0 --bin meshwork-registry
fi
MW_BIN=${MW_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/meshwork-registry}
[ -x "$MW_BIN" ] || die "no binary at $MW_BIN"

mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/meshwork-bench.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/raw"
: >"$WORK/runs.tsv"; : >"$WORK/rss.tsv"; : >"$WORK/disk.tsv"; : >"$WORK/quiet.tsv"; : >"$WORK/attempts.tsv"

# Machine facts.
{
    echo "date_utc=$START_TS"
    echo "nproc=$(nproc)"
    echo "cpu_model=$(cpu_model)"
    echo "kernel=$(uname -r)"
    echo "fs=$(fs_of "$WORK")"
    echo "etcd_version=$(etcd --version 2>/dev/null | awk '/etcd Version/{print $3}')"
    echo "wrk_version=$(wrk -v 2>&1 | head -n1 | awk '{print $2}')"
    echo "meshwork_version=$("$MW_BIN" --version 2>/dev/null | awk '{print $2}')"
    echo "git_rev=$(git_rev)"
    echo "git_dirty=$(git_status | grep -vc '^?? bench/' || true)"
    echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "duration=$DURATION"
    echo "warmup=$WARMUP"
    echo "concurrency=$CONCURRENCY"
    echo "disk_writes=$DISK_WRITES"
    echo "disk_conns=$DISK_CONNS"
    echo "mw_extra_args=$MW_EXTRA_ARGS"
} >"$WORK/machine.txt"
free -h >"$WORK/free.txt"
ps -eo pid,pcpu,etime,comm --sort=-pcpu | head -n 8 >"$WORK/ps-before.txt"
log "fsync probe on $(df -P "$WORK" | awk 'NR==2{print $1}')"
fsync_probe >"$WORK/fsync.tsv"

log "starting clusters in $WORK"
# shellcheck disable=SC2086 # MW_EXTRA_ARGS is word-split on purpose
start_meshwork_cluster "$WORK/mw/n" 1830 1850 1860 1870 $MW_EXTRA_ARGS
start_etcd_cluster
wait_clusters_ready
MW_LEADER_START=$MW_LEADER
ETCD_LEADER_START=$ETCD_LEADER
sleep 2
snapshot_rss idle "$WORK/rss.tsv"
snapshot_disk start meshwork
snapshot_disk start etcd

flip=0
for c in $CONCURRENCY; do
    if [ "$flip" = 0 ]; then order="meshwork etcd"; flip=1; else order="etcd meshwork"; flip=0; fi
    for sys in $order; do
        if [ "$WARMUP" -gt 0 ]; then
            log "$sys: warm-up ${WARMUP}s, $c connections"
            run_load "$sys" "$c" "$WARMUP" "warm/c$c" "$WORK/raw/warmup-$sys-c$c.txt"
        fi
        for attempt in $(seq 1 "$MAX_ATTEMPTS"); do
            wait_quiet_kv "$sys-c$c"
            log "$sys: measured ${DURATION}s, $c connections"
            cp "$WORK/runs.tsv" "$WORK/runs.tsv.bak"
            run_load "$sys" "$c" "$DURATION" "bench/c$c-$attempt" "$WORK/raw/wrk-$sys-c$c.txt" record
            printf '%s\t%s\t%s\t%s\n' "$sys" "$c" "$attempt" "$FOREIGN_PCT" >>"$WORK/attempts.tsv"
            if [ "$FOREIGN_PCT" -gt "$NOISE_PCT" ] && [ "$attempt" -lt "$MAX_ATTEMPTS" ]; then
                log "  other processes used ${FOREIGN_PCT}% of the machine during this run; repeating it"
                cp "$WORK/runs.tsv.bak" "$WORK/runs.tsv"
                continue
            fi
            break
        done
        log "  $(sed -n 's/^RESULT //p' "$WORK/raw/wrk-$sys-c$c.txt" | awk '{print $2, $3, $4, $5, $11, $13}')"
        check_clusters_alive
    done
done
snapshot_rss after-latency-runs "$WORK/rss.tsv"

for sys in meshwork etcd; do
    sleep 3
    snapshot_disk before-disk-phase "$sys"
    if [ "$sys" = meshwork ]; then ddirs="$WORK/mw"; else ddirs="$WORK/etcd"; fi
    # Sample the data dirs every 2 s during the phase (peak disk use).
    ( t0=$SECONDS
      while [ $((SECONDS - t0)) -lt $((DISK_MAX_S + 120)) ]; do
          printf '%s\t%s\n' $((SECONDS - t0)) "$(du -sB1 "$ddirs" 2>/dev/null | cut -f1)"
          sleep 2
      done ) >"$WORK/raw/du-samples-$sys.tsv" &
    SAMPLER_PID=$!
    log "$sys: disk phase, writing $DISK_WRITES keys with $DISK_CONNS connections (cap ${DISK_MAX_S}s)"
    write_n "$sys" "$DISK_WRITES" "$DISK_CONNS" "disk" "$WORK/raw/wrk-$sys-disk.txt"
    log "  $(sed -n 's/^RESULT //p' "$WORK/raw/wrk-$sys-disk.txt" | awk '{print $1, $3, $4, $5}')"
    # Let background compaction/flushing settle: until two samples 3 s apart
    # differ by less than 1% (at most 30 s).
    prev=0
    for i in $(seq 1 10); do
        sleep 3
        cur=$(du -sB1 "$ddirs" | cut -f1)
        awk -v a="$prev" -v b="$cur" 'BEGIN{exit !(a > 0 && (a-b)^2 < (b/100)^2)}' && break
        prev=$cur
    done
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
    snapshot_disk after-disk-phase "$sys"
done
snapshot_rss end "$WORK/rss.tsv"

# Per-directory breakdown of node 1 of each system, and the leaders at the end.
{
    echo "== meshwork node 1"; (cd "$WORK/mw/n1" && du -aB1 --max-depth=2 . | sort -k2)
    echo "== etcd member 1"; (cd "$WORK/etcd/n1" && du -aB1 --max-depth=3 . | sort -k2)
} >"$WORK/raw/du-breakdown.txt" 2>&1 || true
MW_LEADER_END=$(meshwork_leader); ETCD_LEADER_END=$(etcd_leader)
{
    echo "mw_leader_start=$MW_LEADER_START"; echo "mw_leader_end=$MW_LEADER_END"
    echo "etcd_leader_start=$ETCD_LEADER_START"; echo "etcd_leader_end=$ETCD_LEADER_END"
} >>"$WORK/machine.txt"

if [ "$DIAG_STRACE" = 1 ]; then
    log "diagnostic: strace -c on each leader during a 5 s, 16-connection run (not part of the results)"
    strace_probe meshwork "${MW_PID[$MW_LEADER]}"
    strace_probe etcd "${ETCD_PID[$ETCD_LEADER]}"
fi

# Keep raw output and server logs next to the report.
# Only ever delete a RAW_DIR that this script created (it carries a marker).
claim_raw_dir "$RAW_DIR" .kv-put-raw
cp "$WORK"/raw/* "$RAW_DIR"/ 2>/dev/null || true
cp "$WORK"/logs/*.log "$RAW_DIR"/
cp "$WORK"/*.tsv "$WORK"/machine.txt "$WORK"/free.txt "$WORK"/ps-before.txt "$RAW_DIR"/

python3 "$BENCH_DIR/report.py" "$RAW_DIR" >"$RESULTS_FILE"
log "wrote $RESULTS_FILE (raw data in $RAW_DIR)"
