# shellcheck shell=bash disable=SC2034
# (SC2034: the names and ports here are used by the scripts that source it.)
# Sourced by the lab scripts (up.sh, down.sh, partition.sh, heal.sh): the
# lab's settings, names, addresses and small helpers. The layout is
# documented at the top of up.sh.

lab_script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lab_repo=$(cd "$lab_script_dir/../.." && pwd)

die() {
    echo "${0##*/}: $*" >&2
    exit 1
}
say() { echo "${0##*/}: $*"; }

[[ $(id -u) -eq 0 ]] || die "the lab creates network namespaces: run it as root"
command -v ip >/dev/null || die "'ip' (iproute2) not found: apt-get install iproute2"

LAB_DIR=${LAB_DIR:-/tmp/meshwork-lab}
[[ $LAB_DIR == /* && $LAB_DIR != / ]] || die "LAB_DIR must be an absolute path other than /, not '$LAB_DIR'"
LAB_DIR=${LAB_DIR%/}
lab_env="$LAB_DIR/lab.env"

# Settings: the ones a running lab recorded in lab.env win for down.sh,
# partition.sh and heal.sh (so they act on what up.sh made); up.sh compares
# them with what it is asked for.
lab_load_settings() {
    LAB_PREFIX=${LAB_PREFIX:-mwlab}
    LAB_NET=${LAB_NET:-198.18.0}
    LAB_SERVERS=${LAB_SERVERS:-3}
    LAB_APPS=${LAB_APPS:-2}
    LAB_GATEWAY=${LAB_GATEWAY:-1}
    if [[ -f $lab_env ]]; then
        local key value
        while IFS='=' read -r key value; do
            case $key in
            recorded_prefix) recorded_prefix=$value ;;
            recorded_net) recorded_net=$value ;;
            recorded_servers) recorded_servers=$value ;;
            recorded_apps) recorded_apps=$value ;;
            recorded_gateway) recorded_gateway=$value ;;
            esac
        done <"$lab_env"
    fi
    [[ $LAB_PREFIX =~ ^[a-z][a-z0-9]{0,19}$ ]] ||
        die "LAB_PREFIX '$LAB_PREFIX': 1-20 lower-case letters and digits, starting with a letter"
    if ! [[ $LAB_NET =~ ^198\.1[89]\.([0-9]{1,3})$ ]] || ((BASH_REMATCH[1] > 255)); then
        die "LAB_NET '$LAB_NET': must be the first three octets of a /24 in 198.18.0.0/15 (198.18.X or 198.19.X)"
    fi
    [[ $LAB_SERVERS =~ ^[1-7]$ ]] || die "LAB_SERVERS '$LAB_SERVERS': 1 to 7 registry servers"
    [[ $LAB_APPS =~ ^[0-9]$ ]] || die "LAB_APPS '$LAB_APPS': 0 to 9 app hosts"
    [[ $LAB_GATEWAY =~ ^[01]$ ]] || die "LAB_GATEWAY '$LAB_GATEWAY': 1 (a gateway in front of the apps) or 0 (none)"
}

# Use what a running lab recorded (down.sh, partition.sh, heal.sh).
lab_use_recorded() {
    LAB_PREFIX=${recorded_prefix:-$LAB_PREFIX}
    LAB_NET=${recorded_net:-$LAB_NET}
    LAB_SERVERS=${recorded_servers:-$LAB_SERVERS}
    LAB_APPS=${recorded_apps:-$LAB_APPS}
    LAB_GATEWAY=${recorded_gateway:-$LAB_GATEWAY}
}

# Ports (every host has its own network namespace, so all use the defaults).
HTTP_PORT=8500
GRPC_PORT=8502
RAFT_PORT=8300
DNS_PORT=8600
APP_PORT=8080
INBOUND_PORT=21000
ADMIN_PORT=19000
UPSTREAM_PORT_BASE=9100
# The gateway (host gw): its listeners, the name of its ingress-gateway
# entry, and the domain of the host names it routes (app<i>.lab.test ->
# app<i>; .test is reserved, never a real name: clients reach the gateway
# with curl --resolve, no DNS involved).
GATEWAY_HTTPS_PORT=443
GATEWAY_HTTP_PORT=80
GATEWAY_NAME=edge
GATEWAY_DOMAIN=lab.test

# The "switch": a namespace of its own holding the bridge and the
# host-side ends of the veths, so nothing is made in the caller's namespace.
lab_switch() { echo "$LAB_PREFIX-sw"; }
lab_ns() { echo "$LAB_PREFIX-$1"; }
# In the switch namespace: the bridge, the second bridge partition.sh moves
# cut-off hosts to, and each host's port (named after the host; inside the
# host it is eth0).
LAB_BRIDGE=br0
LAB_BRIDGE_B=br1
sw() { ip -n "$(lab_switch)" "$@"; }
sw_link_exists() { ip -n "$(lab_switch)" link show dev "$1" >/dev/null 2>&1; }

lab_servers() {
    local i
    for ((i = 1; i <= LAB_SERVERS; i++)); do echo "reg$i"; done
}
lab_apps() {
    local i
    for ((i = 1; i <= LAB_APPS; i++)); do echo "app$i"; done
}
# The gateway host, when there is one: LAB_GATEWAY=1 and apps behind it.
lab_gateways() {
    ((LAB_GATEWAY == 1 && LAB_APPS >= 1)) && echo gw
    return 0
}
lab_hosts() {
    lab_servers
    lab_apps
    lab_gateways
}

# reg<i> is LAB_NET.1<i>, app<i> LAB_NET.2<i>, gw LAB_NET.30.
lab_ip() {
    case $1 in
    reg[1-9]) echo "$LAB_NET.1${1#reg}" ;;
    app[1-9]) echo "$LAB_NET.2${1#app}" ;;
    gw) echo "$LAB_NET.30" ;;
    *) die "unknown lab host '$1'" ;;
    esac
}

lab_is_host() {
    local h
    for h in $(lab_hosts); do [[ $h == "$1" ]] && return 0; done
    return 1
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

# in_host HOST CMD…: runs CMD inside HOST's namespace.
in_host() {
    local host=$1
    shift
    ip netns exec "$(lab_ns "$host")" "$@"
}

# wait_until SECONDS WHAT CMD…: polls CMD every 0.2 s until it succeeds,
# or fails after SECONDS with a message naming WHAT.
wait_until() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "${0##*/}: timed out after ${limit}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# http_ok HOST URL: a 2xx answer to GET URL from inside HOST.
http_ok() {
    in_host "$1" curl -fsS --max-time 2 -o /dev/null "$2"
}

# pid_alive PIDFILE HOST: the process recorded in PIDFILE runs in HOST's
# namespace (a recycled pid elsewhere does not count).
pid_alive() {
    local pidfile=$1 host=$2 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ $(ip netns identify "$pid" 2>/dev/null) == "$(lab_ns "$host")" ]]
}
