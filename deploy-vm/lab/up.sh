#!/usr/bin/env bash
# The Meshwork lab: a fleet of "VMs" made of network namespaces on one
# Linux host (root needed). Registry servers and app hosts, each app host
# running a demo HTTP service and its sidecar. Safe to re-run: a second
# up.sh creates what is missing and starts what is not running (a killed
# server comes back with its data), and changes nothing else.
#
# Layout (LAB_NET=198.18.0 by default; everything stays inside
# 198.18.0.0/15, the benchmarking range that is never routed, and inside the
# lab's own namespaces: nothing is added to the caller's network, and there
# is no uplink, NAT or default route):
#
#   host     namespace       address            runs
#   reg<i>   <prefix>-reg<i> LAB_NET.1<i>       meshwork-registry  http :8500, grpc :8502,
#                                               dns :8600 (udp+tcp), raft :8300
#   app<i>   <prefix>-app<i> LAB_NET.2<i>       demo app  127.0.0.1:8080 (demo-app.py:
#                                               GET / -> "hello from app<i>", /health)
#                                               meshwork-sidecar: service "app<i>" (id app<i>,
#                                               node app<i>), inbound :21000,
#                                               admin 127.0.0.1:19000, upstream "app<j>"
#                                               for every other app j on 127.0.0.1:910<j>
#   switch   <prefix>-sw     -                  bridge br0; one port per host, named
#                                               after it (eth0 inside the host)
#
#   e.g. reg1 198.18.0.11, reg2 .12, reg3 .13, app1 .21, app2 .22. Reach them
#   from a host: `ip netns exec mwlab-app1 curl http://198.18.0.11:8500/v1/status/leader`;
#   app1 calls app2 with `ip netns exec mwlab-app1 curl http://127.0.0.1:9102/`.
#   partition.sh moves ports to a second bridge br1 (or downs them);
#   heal.sh puts them back.
#
# Environment:
#   LAB_DIR      all state: configs, data dirs, logs, pids (default /tmp/meshwork-lab)
#   LAB_PREFIX   prefix of namespace and interface names (default mwlab, <= 10 chars)
#   LAB_NET      first three octets of the lab's /24 (default 198.18.0; 198.18.X or 198.19.X)
#   LAB_SERVERS  registry servers, 1-7 (default 3)
#   LAB_APPS     app hosts, 0-9 (default 2; 0 = registry servers only)
#   BIN_DIR      meshwork-registry and meshwork-sidecar (default: target/release,
#                brought up to date with `cargo build --release` first)
#   LAB_WAIT     seconds to wait for each stage (default 60)
#   LAB_REGISTRY_FLAGS  extra meshwork-registry flags, e.g. "--election-timeout-ms 500"
#   RUST_LOG     passed to the binaries
#
# State in LAB_DIR: lab.env (the settings, read by the other scripts),
# <host>/{registry.toml,data/,sidecar.toml,*.log,*.pid}.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_load_settings
if [[ -f $lab_env ]]; then
    for pair in "prefix:$LAB_PREFIX:${recorded_prefix:-}" "net:$LAB_NET:${recorded_net:-}" \
        "servers:$LAB_SERVERS:${recorded_servers:-}" "apps:$LAB_APPS:${recorded_apps:-}"; do
        IFS=: read -r what want have <<<"$pair"
        [[ $want == "$have" ]] ||
            die "the lab in $LAB_DIR was made with $what=$have, not $want: run down.sh first (or use another LAB_DIR)"
    done
elif [[ -d $LAB_DIR ]] && [[ -n $(ls -A "$LAB_DIR") ]]; then
    die "$LAB_DIR exists, is not empty and is not a lab (no lab.env): choose another LAB_DIR"
fi
LAB_WAIT=${LAB_WAIT:-60}
[[ $LAB_WAIT =~ ^[1-9][0-9]*$ ]] || die "LAB_WAIT '$LAB_WAIT' is not a number of seconds"

for tool in curl python3; do
    command -v "$tool" >/dev/null || die "'$tool' not found (scripts/install-test-deps.sh installs it)"
done

if [[ -z ${BIN_DIR:-} ]]; then
    BIN_DIR=${CARGO_TARGET_DIR:-$lab_repo/target}/release
    # Build (a no-op when up to date) so that stale binaries are never used;
    # without cargo, whatever is in target/release.
    if command -v cargo >/dev/null; then
        say "cargo build --release (the lab's binaries; set BIN_DIR to use others)"
        (cd "$lab_repo" && cargo build --release --bin meshwork-registry --bin meshwork-sidecar --bin meshctl) ||
            die "the release build failed"
    fi
fi
BIN_DIR=$(cd "$BIN_DIR" 2>/dev/null && pwd) || die "BIN_DIR '$BIN_DIR' is not a directory"
for bin in meshwork-registry meshwork-sidecar; do
    [[ -x $BIN_DIR/$bin ]] || die "$BIN_DIR/$bin not found: build it or point BIN_DIR at it"
done

mkdir -p "$LAB_DIR"
cat >"$lab_env" <<EOF
recorded_prefix=$LAB_PREFIX
recorded_net=$LAB_NET
recorded_servers=$LAB_SERVERS
recorded_apps=$LAB_APPS
EOF

# --- network --------------------------------------------------------------
# The switch namespace holds the bridge; nothing is made in this one.
switch=$(lab_switch)
ns_exists "$switch" || ip netns add "$switch"
sw link set dev lo up
sw_link_exists "$LAB_BRIDGE" || sw link add name "$LAB_BRIDGE" type bridge
sw link set dev "$LAB_BRIDGE" up

for host in $(lab_hosts); do
    ns=$(lab_ns "$host")
    ns_exists "$ns" || ip netns add "$ns"
    if ! sw_link_exists "$host"; then
        # A half-made host (its namespace kept an eth0): start it over.
        ip -n "$ns" link del dev eth0 2>/dev/null || true
        sw link add name "$host" type veth peer name eth0 netns "$ns"
    fi
    # Onto the bridge, unless partition.sh holds it on the other side or
    # keeps it isolated.
    master=$(sw -o link show dev "$host" | sed -n 's/.* master \([^ ]*\) .*/\1/p')
    [[ $master == "$LAB_BRIDGE_B" ]] || sw link set dev "$host" master "$LAB_BRIDGE"
    grep -qx "$host" "$LAB_DIR/isolated" 2>/dev/null || sw link set dev "$host" up
    ip -n "$ns" link set dev lo up
    ip -n "$ns" addr replace "$(lab_ip "$host")/24" dev eth0
    ip -n "$ns" link set dev eth0 up
done

# --- processes -------------------------------------------------------------
# start HOST NAME CMD…: runs CMD in HOST's namespace in its own session (so
# it outlives this script), output to LAB_DIR/HOST/NAME.log, pid in NAME.pid.
start() {
    local host=$1 name=$2
    shift 2
    local pidfile="$LAB_DIR/$host/$name.pid"
    if pid_alive "$pidfile" "$host"; then
        say "$host: $name already running (pid $(<"$pidfile"))"
        return 0
    fi
    ip netns exec "$(lab_ns "$host")" setsid "$@" </dev/null >>"$LAB_DIR/$host/$name.log" 2>&1 &
    echo $! >"$pidfile"
    say "$host: started $name (pid $!)"
}

# The log's last lines when a stage fails.
tail_logs() {
    local host log
    for host in "$@"; do
        for log in "$LAB_DIR/$host"/*.log; do
            [[ -f $log ]] || continue
            echo "--- $log (last 15 lines)" >&2
            tail -n 15 "$log" >&2
        done
    done
}

# alive_and HOST NAME CMD…: CMD succeeds, or NAME's process is gone (then
# the wait ends at once and the caller finds out from alive).
alive_and() {
    local host=$1 name=$2
    shift 2
    pid_alive "$LAB_DIR/$host/$name.pid" "$host" || return 0
    "$@"
}
alive() {
    pid_alive "$LAB_DIR/$1/$2.pid" "$1" || {
        echo "${0##*/}: $1: $2 exited (see $LAB_DIR/$1/$2.log)" >&2
        return 1
    }
}
peers=""
for host in $(lab_servers); do
    peers+="${peers:+, }\"${host#reg}@$(lab_ip "$host"):$RAFT_PORT\""
done
registry_grpc=""
for host in $(lab_servers); do
    registry_grpc+="${registry_grpc:+, }\"$(lab_ip "$host"):$GRPC_PORT\""
done

# Plain logs in the log files (tracing colours them unless NO_COLOR is set).
export NO_COLOR=${NO_COLOR:-1}
read -r -a registry_flags <<<"${LAB_REGISTRY_FLAGS:-}"
for host in $(lab_servers); do
    ip=$(lab_ip "$host")
    mkdir -p "$LAB_DIR/$host/data"
    cat >"$LAB_DIR/$host/registry.toml" <<EOF
# Written by deploy-vm/lab/up.sh.
node_id = ${host#reg}
node_name = "$host"
data_dir = "$LAB_DIR/$host/data"
http_addr = "$ip:$HTTP_PORT"
grpc_addr = "$ip:$GRPC_PORT"
dns_addr = "$ip:$DNS_PORT"
raft_addr = "$ip:$RAFT_PORT"
peers = [$peers]
EOF
    start "$host" registry "$BIN_DIR/meshwork-registry" --config "$LAB_DIR/$host/registry.toml" "${registry_flags[@]}"
done

leader_known() {
    local host=$1 answer
    answer=$(in_host "$host" curl -fsS --max-time 2 "http://$(lab_ip "$host"):$HTTP_PORT/v1/status/leader") || return 1
    [[ $answer == \"$LAB_NET.*\" ]]
}
serving() {
    http_ok "$1" "http://$(lab_ip "$1"):$HTTP_PORT/v1/status/peers"
}
# During a partition (partition.sh, not yet healed) a leader or a
# registration may be out of reach: then only wait for the processes to serve.
partitioned=0
if sw_link_exists "$LAB_BRIDGE_B" || [[ -s $LAB_DIR/isolated ]]; then
    partitioned=1
    say "the lab is partitioned (heal.sh undoes it): waiting for the processes only"
fi
server_ready=leader_known
((partitioned == 0)) || server_ready=serving
for host in $(lab_servers); do
    if ! wait_until "$LAB_WAIT" "$host to know a leader" alive_and "$host" registry "$server_ready" "$host" ||
        ! alive "$host" registry; then
        mapfile -t servers < <(lab_servers)
        tail_logs "${servers[@]}"
        die "the registry cluster did not come up (logs in $LAB_DIR; clean up with down.sh)"
    fi
done
if ((partitioned == 0)); then
    leader=$(in_host reg1 curl -fsS --max-time 2 "http://$(lab_ip reg1):$HTTP_PORT/v1/status/leader" 2>/dev/null || true)
    say "registry cluster up, leader $leader"
fi

for host in $(lab_apps); do
    ip=$(lab_ip "$host")
    dir="$LAB_DIR/$host"
    mkdir -p "$dir"
    {
        cat <<EOF
# Written by deploy-vm/lab/up.sh.
[registry]
addresses = [$registry_grpc]

[service]
name = "$host"
id = "$host"
address = "$ip"
port = $APP_PORT
tags = ["lab"]

[[service.checks]]
http = "http://127.0.0.1:$APP_PORT/health"
interval = "1s"
timeout = "1s"
deregister_critical_after = "1m"

[session]
node = "$host"
ttl = "10s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[inbound]
listen = "$ip:$INBOUND_PORT"
protocol = "http"
app = "127.0.0.1:$APP_PORT"
EOF
        for other in $(lab_apps); do
            [[ $other == "$host" ]] && continue
            cat <<EOF

[[upstreams]]
name = "$other"
listen = "127.0.0.1:$((UPSTREAM_PORT_BASE + ${other#app}))"
protocol = "http"
EOF
        done
    } >"$dir/sidecar.toml"
    start "$host" app python3 "$lab_script_dir/demo-app.py" "$host" "$APP_PORT"
    start "$host" sidecar "$BIN_DIR/meshwork-sidecar" --config "$dir/sidecar.toml"
done

# registered HOST: some server lists HOST's instance with every check passing.
registered() {
    local host=$1 server answer
    for server in $(lab_servers); do
        answer=$(in_host "$server" curl -fsS --max-time 2 \
            "http://$(lab_ip "$server"):$HTTP_PORT/v1/health/service/$host?passing") || continue
        [[ $answer == *"\"ID\":\"$host\""* ]] && return 0
    done
    return 1
}
sidecar_ready() {
    ((partitioned)) || http_ok "$1" "http://127.0.0.1:$ADMIN_PORT/ready"
}
app_registered() {
    ((partitioned)) || registered "$1"
}
for host in $(lab_apps); do
    if ! wait_until "$LAB_WAIT" "$host's app" alive_and "$host" app http_ok "$host" "http://127.0.0.1:$APP_PORT/health" ||
        ! alive "$host" app ||
        ! wait_until "$LAB_WAIT" "$host's sidecar to be ready" alive_and "$host" sidecar sidecar_ready "$host" ||
        ! alive "$host" sidecar ||
        ! wait_until "$LAB_WAIT" "$host to be registered and passing" app_registered "$host"; then
        tail_logs "$host"
        die "app host $host did not come up (logs in $LAB_DIR; clean up with down.sh)"
    fi
done

# --- how to reach it ---------------------------------------------------------
echo
echo "Meshwork lab is up: $LAB_SERVERS registry server(s), $LAB_APPS app host(s); state and logs in $LAB_DIR"
printf '  %-5s %-14s %-14s %s\n' host namespace address "what"
for host in $(lab_servers); do
    printf '  %-5s %-14s %-14s %s\n' "$host" "$(lab_ns "$host")" "$(lab_ip "$host")" \
        "registry: http :$HTTP_PORT  grpc :$GRPC_PORT  dns :$DNS_PORT  raft :$RAFT_PORT"
done
for host in $(lab_apps); do
    ups=""
    for other in $(lab_apps); do
        [[ $other == "$host" ]] || ups+=" $other->127.0.0.1:$((UPSTREAM_PORT_BASE + ${other#app}))"
    done
    printf '  %-5s %-14s %-14s %s\n' "$host" "$(lab_ns "$host")" "$(lab_ip "$host")" \
        "app 127.0.0.1:$APP_PORT, sidecar inbound :$INBOUND_PORT, admin 127.0.0.1:$ADMIN_PORT, upstreams:${ups:- none}"
done
reg1_ip=$(lab_ip reg1)
echo
echo "Try:"
in_reg1="ip netns exec $(lab_ns reg1)"
if [[ -x $BIN_DIR/meshctl ]]; then
    echo "  $in_reg1 $BIN_DIR/meshctl --http-addr $reg1_ip:$HTTP_PORT members"
fi
echo "  $in_reg1 curl http://$reg1_ip:$HTTP_PORT/v1/status/peers"
if ((LAB_APPS >= 1)); then
    echo "  $in_reg1 curl 'http://$reg1_ip:$HTTP_PORT/v1/health/service/app1?passing'"
    echo "  $in_reg1 dig @$reg1_ip -p $DNS_PORT app1.service.mesh. +short"
fi
if ((LAB_APPS >= 2)); then
    echo "  ip netns exec $(lab_ns app1) curl http://127.0.0.1:$((UPSTREAM_PORT_BASE + 2))/   # app1 -> its sidecar -> app2's sidecar -> app2"
fi
echo "  $lab_script_dir/partition.sh reg1      # cut reg1 off (several hosts: one side; --isolate); heal.sh undoes it"
echo "  $lab_script_dir/down.sh                # remove everything"
