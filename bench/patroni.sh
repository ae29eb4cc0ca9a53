#!/usr/bin/env bash
# Patroni failover on Meshwork beside the same on etcd: the harness of
# tests/tests/patroni.rs (tests/clients/patroni_check.py), ROUNDS times
# against each, alternating, each a two-member PostgreSQL 15 cluster.
# Writes bench/RESULTS-patroni.md (RESULTS_FILE to change).
#
#   cargo build --release --bin meshwork-registry
#   sudo bench/patroni.sh            # ROUNDS=3 by default
#
# Meshwork runs as a 3-server cluster on 127.0.0.1 (Patroni talks to one
# follower); etcd as one member (the harness starts it: --start-etcd).
# Needs root (Patroni and PostgreSQL run as the postgres user), patroni,
# python3-consul, postgresql-15 and etcd-server.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$BENCH_DIR/lib.sh"
LOG_TAG=patroni

: "${ROUNDS:=3}"
: "${MW_BIN:=$REPO_DIR/target/release/meshwork-registry}"
: "${RESULTS_FILE:=$BENCH_DIR/RESULTS-patroni.md}"
HARNESS=$REPO_DIR/tests/clients/patroni_check.py
[ -x "$MW_BIN" ] || die "$MW_BIN missing: cargo build --release --bin meshwork-registry"
command -v patroni >/dev/null || die "patroni missing: scripts/install-test-deps.sh"
command -v etcd >/dev/null || die "etcd missing: apt-get install etcd-server"
WORK=$(mktemp -d /tmp/meshwork-patroni-bench.XXXXXX)
chmod 755 "$WORK"

start_meshwork() {
    local i peers=""
    for i in 1 2 3; do peers+="${peers:+,}$i@127.0.77.$i:28300"; done
    for i in 1 2 3; do
        mkdir -p "$WORK/mw$i"
        "$MW_BIN" --node-id "$i" --data-dir "$WORK/mw$i" --peers "$peers" \
            --http-addr "127.0.77.$i:28500" --grpc-addr "127.0.77.$i:28502" \
            --raft-addr "127.0.77.$i:28300" --dns-addr "127.0.77.$i:28600" \
            >"$WORK/mw$i.log" 2>&1 &
        PIDS+=($!)
    done
    local deadline=$((SECONDS + 30))
    until [ "$(curl -s 127.0.77.2:28500/v1/status/leader)" != '""' ] \
        && [ -n "$(curl -s 127.0.77.2:28500/v1/status/leader)" ]; do
        [ $SECONDS -lt $deadline ] || die "no Meshwork leader within 30 s"
        sleep 0.2
    done
}

run_harness() { # dcs addr extra... -> the summary line
    python3 "$HARNESS" --dcs "$1" --dcs-addr "$2" --workdir "$WORK/h" "${@:3}" \
        2>>"$WORK/harness.log" | tail -1
}

start_meshwork
: >"$WORK/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS: Meshwork"
    run_harness consul 127.0.77.2:28500 | sed 's/^/meshwork\t/' >>"$WORK/results.jsonl"
    log "round $round/$ROUNDS: etcd"
    run_harness etcd3 127.0.77.9:23790 --start-etcd | sed 's/^/etcd\t/' >>"$WORK/results.jsonl"
done

python3 - "$WORK/results.jsonl" "$RESULTS_FILE" "$ROUNDS" "$(etcd --version | head -1 | awk "{print \$NF}")" <<'PY'
import json, statistics, sys, time
path, out, rounds, etcd_version = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
runs = {"meshwork": [], "etcd": []}
for line in open(path):
    who, _, text = line.partition("\t")
    summary = json.loads(text)
    if summary.get("result") != "pass":
        sys.exit(f"a {who} run failed: {summary}")
    runs[who].append(summary)
def cell(who, key):
    values = [r[key] for r in runs[who]]
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"
rows = [
    ("bootstrap: primary and streaming replica", "bootstrap_s"),
    ("failover after SIGTERM of the primary's Patroni", "failover1_sigterm_s"),
    ("failover after kill -9 of the primary's Patroni", "failover2_kill9_s"),
    ("old primary back as a replica (after kill -9)", "rejoin2_s"),
]
lines = [
    "# Patroni on Meshwork and on etcd",
    "",
    f"Measured {time.strftime('%Y-%m-%d')} on the 2-core development VM by `bench/patroni.sh`: "
    f"Debian's Patroni 3.0.2 with PostgreSQL 15, two members, `ttl: 20`, `loop_wait: 2`, "
    f"`retry_timeout: 8`, {rounds} alternating rounds against each DCS — a 3-server Meshwork "
    f"cluster (Patroni's `consul:` DCS, through a follower) and one etcd member ({etcd_version}, "
    "`etcd3:`). Seconds, median (min–max). With Consul, Patroni asks for a session TTL of "
    "ttl/2 = 10 s, which lives up to 2 × 10 s after its last renewal; on etcd the leader key's "
    "lease has the full 20 s.",
    "",
    "| | Meshwork | etcd |",
    "|---|---|---|",
]
lines += [f"| {label} | {cell('meshwork', key)} | {cell('etcd', key)} |" for label, key in rows]
lines += ["", "Reproduce:", "", "```sh", "cargo build --release --bin meshwork-registry",
          f"sudo ROUNDS={rounds} bench/patroni.sh", "```", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
