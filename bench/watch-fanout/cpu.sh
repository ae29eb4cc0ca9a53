#!/usr/bin/env bash
# Server CPU per subscriber per change, one `meshwork-registry --dev`:
# hold N watch streams on `service web` (the load tool, long hold), make
# W topic changes spaced apart, and read the server's utime+stime
# (/proc/PID/stat) around them; the same W writes with no subscribers give
# the baseline cost of a write. Prints µs per subscriber per change, for
# the server and for the load tool's receiving side (CLIENT=full|light,
# default full: the subscriber side's own cost per message received).
#
#   bash bench/watch-fanout/cpu.sh [N=3000] [W=20] [CONNS=32] [CLIENT=light]
# SYSCALLS=1 also counts the server's syscalls during the writes.
# PERF_OUT=FILE also records a perf profile of the server during the writes.
set -euo pipefail
N=${1:-3000}; W=${2:-20}; CONNS=${CONNS:-32}
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$(dirname "$DIR")")
REPO_DIR=$REPO
# watch.sh keeps this script's output and shows its last line when it fails:
# no "exited with status" line after the error.
CLEANUP_LOG_STATUS=0
LOG_TAG=cpu.sh
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$DIR/../lib.sh"
MW_BIN=${MW_BIN:-$REPO/target/release/meshwork-registry}
TOOL=$DIR/target/release/watch-fanout
H=127.0.0.1
WORK=$(mktemp -d /var/tmp/mw-cpu.XXXXXX)
# shellcheck disable=SC2086 # MW_EXTRA_ARGS is word-split on purpose
start_meshwork dev "$WORK/d" "$WORK/log" 28501 28601 28301 28701 - ${MW_EXTRA_ARGS:-}
SRV=$LAST_PID
for _ in $(seq 1 100); do curl -sf -m 1 http://$H:28501/v1/status/leader | grep -q 28301 && break; sleep 0.1; done
reg() { curl -sS -m 5 -X PUT http://$H:28501/v1/catalog/register \
    -d "{\"Node\":\"n-$1\",\"Address\":\"198.18.1.1\",\"Service\":{\"Service\":\"web\",\"ID\":\"$1\",\"Port\":8080}}" >/dev/null; }
reg seed-1; reg seed-2; reg seed-3
tck=$CLK_TCK
alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null || die "process $p exited (server log $WORK/log, tool $WORK/tool.err)"; done; }
TOOL_PID=
cpu() { echo "$(cpu_ticks "$SRV") $(cpu_ticks ${TOOL_PID:+"$TOOL_PID"})"; }
delta() { # "srv tool" before, after -> "srv tool" ticks
    echo "$(( $3 - $1 )) $(( $4 - $2 ))"
}
usec() { echo "${EPOCHREALTIME/./}"; }
writes() { # tag -> server ticks, tool ticks, seconds taken, failed writes: W writes 200 ms apart
    local a b i t0 t1 failed=0; a=$(cpu); t0=$(usec)
    for i in $(seq 1 "$W"); do reg "$1-$i" || failed=$((failed + 1)); sleep 0.2; done
    sleep 0.5; b=$(cpu); t1=$(usec)
    echo "$(delta $a $b) $(awk -v d=$((t1 - t0)) 'BEGIN{printf "%.3f", d / 1e6}') $failed"
}
idle() { local a b; a=$(cpu); sleep "$1"; b=$(cpu); delta $a $b; }
read -r base _ _ failed < <(writes base)
[ "${failed:-1}" = 0 ] || die "${failed:-all} of $W writes without subscribers failed"
"$TOOL" meshwork --client "${CLIENT:-full}" --servers $H:28601 --http $H:28501 --subscribers "$N" --conns "$CONNS" \
    --settle-ms 100 --hold-ms 600000 --timeout 5 --new-id never --new-node never \
    --label cpu >"$WORK/tool.out" 2>"$WORK/tool.err" &
TOOL_PID=$!; PIDS+=("$TOOL_PID")
n=0
for _ in $(seq 1 600); do
    n=$(curl -s -m 1 http://$H:28501/metrics | awk '$1=="meshwork_watch_subscribers"{print $2}') || n=0
    [ "${n:-0}" = "$N" ] && break; sleep 0.1
done
[ "${n:-0}" = "$N" ] || die "only ${n:-0} of $N subscribers after 60 s"
sleep 1
if [ -n "${SYSCALLS:-}" ]; then
    perf stat -e syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex -p "$SRV" -o "$WORK/stat" &
    PERF_PID=$!; sleep 0.5
fi
if [ -n "${PERF_OUT:-}" ]; then
    perf record -F 2000 -g --call-graph dwarf,16384 -p "$SRV" -o "$PERF_OUT" 2>/dev/null &
    PERF_PID=$!; sleep 0.5
fi
read -r with tool_with took failed < <(writes held)
if [ -n "${PERF_OUT:-}${SYSCALLS:-}" ]; then kill -INT "$PERF_PID"; wait "$PERF_PID" || true; fi
[ -n "${SYSCALLS:-}" ] && grep syscalls "$WORK/stat"
alive "$SRV" "$TOOL_PID"
[ "${failed:-1}" = 0 ] || die "${failed:-all} of $W writes with subscribers failed"
# The held streams alone (heartbeats etc.) over a window as long as the writes'.
read -r held_idle tool_idle < <(idle "$took")
alive "$SRV" "$TOOL_PID"
awk -v n="$N" -v w="$W" -v t="$tck" -v base="$base" -v with="$with" -v idle="$held_idle" \
    -v tw="$tool_with" -v ti="$tool_idle" -v client="${CLIENT:-full}" 'BEGIN{
    per = (with - base - idle) / t / w / n * 1e6;
    printf "N=%d W=%d: writes alone %.3f s, held idle %.3f s, writes with N held %.3f s -> %.2f us CPU per subscriber per change\n",
        n, w, base/t, idle/t, with/t, per;
    printf "load tool (%s client): %.3f s during the writes, %.3f s idle -> %.2f us CPU per message received\n",
        client, tw/t, ti/t, (tw - ti) / t / w / n * 1e6 }'
