#!/usr/bin/env bash
# Removes everything deploy-vm/lab/up.sh made: stops every process in the
# lab's namespaces (SIGTERM, then SIGKILL; the apps' sidecars and the
# gateway first, so they deregister), deletes the namespaces (the switch's
# bridges and the veths go with them) and LAB_DIR (the registry's data with
# the gateway's ingress-gateway entry, the lab's CA and certificate). Only names with
# the lab's prefix are touched (LAB_PREFIX, default mwlab, or the one
# recorded in LAB_DIR), so other labs and the host's own interfaces are left
# alone. Safe to re-run.
#
# Environment: LAB_DIR (default /tmp/meshwork-lab), LAB_PREFIX.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_load_settings
lab_use_recorded

# Every namespace named <prefix>-*, not only the hosts up.sh would make
# now (an earlier up.sh may have had more).
mapfile -t namespaces < <(ip netns list | awk '{print $1}' | grep -E "^$LAB_PREFIX-" || true)

pids_in() { ip netns pids "$1" 2>/dev/null || true; }

# stop SIGNAL SECONDS NS…: signals every process in NS…, waits for them.
stop() {
    local signal=$1 limit=$2 ns pid
    shift 2
    local pids=()
    for ns in "$@"; do
        for pid in $(pids_in "$ns"); do pids+=("$pid"); done
    done
    ((${#pids[@]})) || return 0
    kill "-$signal" "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        local left=0
        for ns in "$@"; do [[ -z $(pids_in "$ns") ]] || left=1; done
        ((left)) || return 0
        sleep 0.2
    done
    return 1
}

apps=() servers=()
for ns in "${namespaces[@]}"; do
    case $ns in
    "$LAB_PREFIX"-app* | "$LAB_PREFIX"-gw) apps+=("$ns") ;;
    *) servers+=("$ns") ;;
    esac
done
# Apps and the gateway first (their sidecars deregister while the
# registry still runs), then the servers; whatever ignores SIGTERM gets SIGKILL.
if ((${#apps[@]})); then
    stop TERM 10 "${apps[@]}" || stop KILL 5 "${apps[@]}" || true
fi
if ((${#namespaces[@]})); then
    stop TERM 15 "${namespaces[@]}" || stop KILL 5 "${namespaces[@]}" || true
    for ns in "${namespaces[@]}"; do
        [[ -z $(pids_in "$ns") ]] || die "processes in $ns survived SIGKILL: $(pids_in "$ns" | xargs)"
        ip netns del "$ns"
    done
    say "removed namespaces ${namespaces[*]}"
fi

# The lab makes no links in this namespace; sweep any with its prefix anyway
# (a veth whose namespace is being torn down can linger for a moment).
mapfile -t links < <(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$LAB_PREFIX-" || true)
for link in "${links[@]}"; do
    ip link del "$link" 2>/dev/null || true
done
((${#links[@]} == 0)) || say "removed links ${links[*]}"

# Only a directory up.sh made (it holds lab.env) is removed.
if [[ -f $lab_env ]]; then
    rm -rf -- "$LAB_DIR"
    say "removed $LAB_DIR"
elif [[ -d $LAB_DIR ]]; then
    say "left $LAB_DIR alone: no lab.env in it, so up.sh did not make it"
fi

# Check: nothing with the prefix is left.
left=$( (ip netns list | awk '{print $1}'; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//') | grep -E "^$LAB_PREFIX-" || true)
[[ -z $left ]] || die "still present after cleanup: $(echo "$left" | xargs)"
say "lab $LAB_PREFIX is down"
