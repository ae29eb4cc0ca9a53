#!/usr/bin/env bash
# The Meshwork lab: a fleet of "VMs" made of network namespaces on one
# Linux host (root needed). Registry servers and app hosts, each app host
# running a demo HTTP service and its sidecar, and a gateway in front of
# the apps for clients outside the mesh. Safe to re-run: a second
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
#   gw       <prefix>-gw     LAB_NET.30         meshwork-sidecar in gateway mode (docs/gateway.md):
#                                               gateway "edge", admin 127.0.0.1:19000; its
#                                               ingress-gateway entry "edge" (written by up.sh)
#                                               routes app<i>.lab.test to app<i> on :443 (TLS,
#                                               a certificate for *.lab.test signed by a CA
#                                               up.sh makes: gw/tls/ca.pem) and on :80 (plain)
#   switch   <prefix>-sw     -                  bridge br0; one port per host, named
#                                               after it (eth0 inside the host)
#
#   e.g. reg1 198.18.0.11, reg2 .12, reg3 .13, app1 .21, app2 .22, gw .30. Reach them
#   from a host: `ip netns exec mwlab-app1 curl http://198.18.0.11:8500/v1/status/leader`;
#   app1 calls app2 with `ip netns exec mwlab-app1 curl http://127.0.0.1:9102/`;
#   an outside client (any other host) reaches app2 through the gateway with
#   `ip netns exec mwlab-reg1 curl --cacert /tmp/meshwork-lab/gw/tls/ca.pem
#    --resolve app2.lab.test:443:198.18.0.30 https://app2.lab.test/`.
#   partition.sh moves ports to a second bridge br1 (or downs them);
#   heal.sh puts them back.
#
# Environment:
#   LAB_DIR      all state: configs, data dirs, logs, pids (default /tmp/meshwork-lab)
#   LAB_PREFIX   prefix of namespace and interface names (default mwlab, <= 10 chars)
#   LAB_NET      first three octets of the lab's /24 (default 198.18.0; 198.18.X or 198.19.X)
#   LAB_SERVERS  registry servers, 1-7 (default 3)
#   LAB_APPS     app hosts, 0-9 (default 2; 0 = registry servers only)
#   LAB_GATEWAY  1 (default): the gateway host gw in front of the apps (none
#                without apps); 0: no gateway
#   BIN_DIR      meshwork-registry and meshwork-sidecar (default: target/release,
#                brought up to date with `cargo build --release` first); the
#                gateway's certificate is made with meshctl from there, else
#                with openssl
#   LAB_WAIT     seconds to wait for each stage (default 60)
#   LAB_REGISTRY_FLAGS  extra meshwork-registry flags, e.g. "--election-timeout-ms 500"
#   RUST_LOG     passed to the binaries
#
# State in LAB_DIR: lab.env (the settings, read by the other scripts),
# <host>/{registry.toml,data/,sidecar.toml,*.log,*.pid},
# gw/{gateway.toml,ingress-gateway.json,tls/}.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_load_settings
if [[ -f $lab_env ]]; then
    for pair in "prefix:$LAB_PREFIX:${recorded_prefix:-}" "net:$LAB_NET:${recorded_net:-}" \
        "servers:$LAB_SERVERS:${recorded_servers:-}" "apps:$LAB_APPS:${recorded_apps:-}" \
        "gateway:$LAB_GATEWAY:${recorded_gateway:-}"; do
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
recorded_gateway=$LAB_GATEWAY
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

# --- the gateway -------------------------------------------------------------
# make_certificates DIR: a CA of the lab's own and, signed by it, the
# gateway's certificate for *.GATEWAY_DOMAIN (ca.pem, gateway.pem,
# gateway-key.pem; the CA's key is not kept). Made once: a second up.sh
# keeps them, and the running gateway with them.
make_certificates() {
    local dir=$1 tmp
    if [[ -s $dir/ca.pem && -s $dir/gateway.pem && -s $dir/gateway-key.pem ]]; then
        return 0
    fi
    mkdir -p "$dir"
    tmp=$(mktemp -d "$dir/.make.XXXXXX")
    if [[ -x $BIN_DIR/meshctl ]]; then
        "$BIN_DIR/meshctl" tls ca create --dir "$tmp" >/dev/null &&
            "$BIN_DIR/meshctl" tls cert create --server --additional-dnsname "*.$GATEWAY_DOMAIN" \
                --dir "$tmp" >/dev/null &&
            mv "$tmp/meshwork-agent-ca.pem" "$tmp/ca.pem" &&
            mv "$tmp/dc1-server-meshwork-0.pem" "$tmp/gateway.pem" &&
            mv "$tmp/dc1-server-meshwork-0-key.pem" "$tmp/gateway-key.pem" ||
            die "meshctl tls could not make the gateway's certificate"
    elif command -v openssl >/dev/null; then
        printf '%s\n' "subjectAltName=DNS:*.$GATEWAY_DOMAIN" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$tmp/leaf.ext"
        {
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout "$tmp/ca-key.pem" -out "$tmp/ca.pem" -days 365 -subj "/CN=Meshwork lab CA" &&
                openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                    -keyout "$tmp/gateway-key.pem" -out "$tmp/gateway.csr" -subj "/CN=*.$GATEWAY_DOMAIN" &&
                openssl x509 -req -in "$tmp/gateway.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca-key.pem" \
                    -set_serial "0x$(openssl rand -hex 16)" -days 365 -extfile "$tmp/leaf.ext" \
                    -out "$tmp/gateway.pem"
        } >/dev/null 2>&1 || die "openssl could not make the gateway's certificate"
    else
        die "the gateway's certificate needs meshctl in BIN_DIR or openssl (apt-get install openssl); or set LAB_GATEWAY=0"
    fi
    chmod 600 "$tmp/gateway-key.pem"
    mv -f "$tmp/ca.pem" "$tmp/gateway.pem" "$tmp/gateway-key.pem" "$dir/"
    rm -rf "$tmp"
    say "gw: made a lab CA and the gateway's certificate for *.$GATEWAY_DOMAIN in $dir"
}

# The lab's first server that answers `curl ARGS… http://SERVER:8500PATH`
# from inside the gateway's host; fails when none does.
ask_registry() {
    local path=$1 server
    shift
    for server in $(lab_servers); do
        in_host gw curl -fsS --max-time 5 "$@" "http://$(lab_ip "$server"):$HTTP_PORT$path" && return 0
    done
    return 1
}

# through_gateway FROM APP: FROM (a host other than gw) gets APP's answer
# over HTTPS from the gateway, by name (SNI app<i>.lab.test), trusting the
# lab's CA; --resolve keeps it off DNS.
through_gateway() {
    local from=$1 app=$2 name="$2.$GATEWAY_DOMAIN" answer
    answer=$(in_host "$from" curl -fsS --max-time 2 --cacert "$LAB_DIR/gw/tls/ca.pem" \
        --resolve "$name:$GATEWAY_HTTPS_PORT:$(lab_ip gw)" "https://$name:$GATEWAY_HTTPS_PORT/") || return 1
    [[ $answer == "hello from $app" ]]
}

for host in $(lab_gateways); do
    ip=$(lab_ip "$host")
    dir="$LAB_DIR/$host"
    mkdir -p "$dir"
    make_certificates "$dir/tls"
    cat >"$dir/gateway.toml" <<EOF
# Written by deploy-vm/lab/up.sh.
[registry]
addresses = [$registry_grpc]

[gateway]
name = "$GATEWAY_NAME"
address = "$ip"
port = $GATEWAY_HTTPS_PORT
tags = ["lab"]

[[gateway.certificates]]
hosts = ["*.$GATEWAY_DOMAIN"]
cert_file = "$dir/tls/gateway.pem"
key_file = "$dir/tls/gateway-key.pem"

[session]
node = "$host"
ttl = "10s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"
EOF
    # Its listeners: every app by name, over TLS and plain HTTP.
    services=""
    for app in $(lab_apps); do
        services+="${services:+, }{\"Name\": \"$app\", \"Hosts\": [\"$app.$GATEWAY_DOMAIN\"]}"
    done
    cat >"$dir/ingress-gateway.json" <<EOF
{
  "Kind": "ingress-gateway",
  "Name": "$GATEWAY_NAME",
  "Listeners": [
    {"Port": $GATEWAY_HTTPS_PORT, "Protocol": "http", "TLS": {"Enabled": true}, "Services": [
        $services]},
    {"Port": $GATEWAY_HTTP_PORT, "Protocol": "http", "Services": [
        $services]}
  ]
}
EOF
    start "$host" gateway "$BIN_DIR/meshwork-sidecar" --config "$dir/gateway.toml"
    if ((partitioned)); then
        continue
    fi
    if ! wait_until "$LAB_WAIT" "the gateway to be ready" alive_and "$host" gateway http_ok "$host" "http://127.0.0.1:$ADMIN_PORT/ready" ||
        ! alive "$host" gateway; then
        tail_logs "$host"
        die "the gateway did not come up (logs in $LAB_DIR; clean up with down.sh)"
    fi
    # The entry is written once: one already in the registry (from an
    # earlier up.sh, or changed since by hand) is left as it is.
    if ask_registry "/v1/config/ingress-gateway/$GATEWAY_NAME" -o /dev/null 2>/dev/null; then
        say "$host: ingress-gateway $GATEWAY_NAME is in the registry (left as it is)"
    elif ask_registry /v1/config -o /dev/null -X PUT --data-binary "@$dir/ingress-gateway.json"; then
        say "$host: wrote ingress-gateway $GATEWAY_NAME ($dir/ingress-gateway.json)"
    else
        die "no registry server took the ingress-gateway entry $dir/ingress-gateway.json"
    fi
    first_server=$(lab_servers | head -n 1)
    first_app=$(lab_apps | head -n 1)
    if ! wait_until "$LAB_WAIT" "$first_app over HTTPS through the gateway" through_gateway "$first_server" "$first_app"; then
        tail_logs "$host"
        die "the gateway does not carry requests (logs in $LAB_DIR; clean up with down.sh)"
    fi
done

# --- how to reach it ---------------------------------------------------------
echo
gateways=$(lab_gateways | wc -l)
echo "Meshwork lab is up: $LAB_SERVERS registry server(s), $LAB_APPS app host(s), $gateways gateway(s); state and logs in $LAB_DIR"
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
for host in $(lab_gateways); do
    printf '  %-5s %-14s %-14s %s\n' "$host" "$(lab_ns "$host")" "$(lab_ip "$host")" \
        "gateway $GATEWAY_NAME: https :$GATEWAY_HTTPS_PORT and http :$GATEWAY_HTTP_PORT for app<i>.$GATEWAY_DOMAIN, admin 127.0.0.1:$ADMIN_PORT"
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
for host in $(lab_gateways); do
    gw_ip=$(lab_ip "$host")
    echo "  $in_reg1 curl --cacert $LAB_DIR/$host/tls/ca.pem --resolve app1.$GATEWAY_DOMAIN:$GATEWAY_HTTPS_PORT:$gw_ip https://app1.$GATEWAY_DOMAIN/   # outside client -> gateway -> app1's sidecar -> app1"
    echo "  $in_reg1 curl -H 'Host: app1.$GATEWAY_DOMAIN' http://$gw_ip:$GATEWAY_HTTP_PORT/"
    echo "  $in_reg1 curl http://$reg1_ip:$HTTP_PORT/v1/config/ingress-gateway/$GATEWAY_NAME   # the gateway's listeners"
done
echo "  $lab_script_dir/partition.sh reg1      # cut reg1 off (several hosts: one side; --isolate); heal.sh undoes it"
echo "  $lab_script_dir/down.sh                # remove everything"
