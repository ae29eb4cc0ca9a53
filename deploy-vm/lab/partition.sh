#!/usr/bin/env bash
# Cuts lab hosts off from the rest of the lab.
#
#   partition.sh HOST…            the named hosts form one side, everything
#                                 else the other: the named hosts still
#                                 reach each other
#   partition.sh --isolate HOST…  each named host alone: its link goes down
#
# Hosts are reg1… and app1… (see up.sh). Partitions add up: a host already
# cut off stays so. heal.sh undoes them all. Works on the lab in LAB_DIR
# (default /tmp/meshwork-lab). Done in the switch namespace with the
# hosts' bridge ports: moved to a second bridge, or set down; no firewall
# needed. Packets in flight across the cut are lost, as on a real network.
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
    sw_link_exists "$host" || die "$host has no port on the lab's switch: is the lab up?"
done

if ((isolate)); then
    for host in "$@"; do
        sw link set dev "$host" down
        # up.sh, run again, leaves an isolated host down.
        echo "$host" >>"$LAB_DIR/isolated"
    done
    say "isolated $*"
else
    if ! sw_link_exists "$LAB_BRIDGE_B"; then
        sw link add name "$LAB_BRIDGE_B" type bridge
    fi
    sw link set dev "$LAB_BRIDGE_B" up
    for host in "$@"; do
        sw link set dev "$host" master "$LAB_BRIDGE_B"
    done
    say "partitioned: {$*} | the rest"
fi
