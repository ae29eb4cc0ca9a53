#!/usr/bin/env bash
# Cuts lab hosts off from the rest of the lab.
#
#   partition.sh HOST…            the named hosts form one side, everything
#                                 else (and this host, LAB_NET.1) the other:
#                                 the named hosts still reach each other
#   partition.sh --isolate HOST…  each named host alone: its link goes down
#
# Hosts are reg1… and app1… (see up.sh). Partitions add up: a host already
# cut off stays so. heal.sh undoes them all. Works on the lab in LAB_DIR
# (default /tmp/meshwork-lab). Done with the host-side ends of the veths:
# moved to a second bridge (<prefix>-brb) or set down, so no firewall is
# needed; packets in flight across the cut are dropped, as on a real
# network.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_load_settings
lab_use_recorded
[[ -f $lab_env ]] || die "no lab in $LAB_DIR: run up.sh first"

isolate=0
if [[ ${1:-} == --isolate ]]; then
    isolate=1
    shift
fi
(($#)) || die "usage: partition.sh [--isolate] HOST… (hosts: $(lab_hosts | xargs))"
for host in "$@"; do
    lab_is_host "$host" || die "unknown host '$host' (hosts: $(lab_hosts | xargs))"
    link_exists "$(lab_veth "$host")" || die "$host has no link $(lab_veth "$host"): is the lab up?"
done

if ((isolate)); then
    for host in "$@"; do
        ip link set "$(lab_veth "$host")" down
    done
    say "isolated $*"
else
    side_b=$(lab_bridge_b)
    if ! link_exists "$side_b"; then
        ip link add "$side_b" type bridge
    fi
    ip link set "$side_b" up
    for host in "$@"; do
        ip link set "$(lab_veth "$host")" master "$side_b"
    done
    say "partitioned: {$*} | the rest"
fi
