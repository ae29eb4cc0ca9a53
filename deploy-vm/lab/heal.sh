#!/usr/bin/env bash
# Undoes every partition.sh: all hosts back on the lab's bridge, links up.
# Safe to re-run. Works on the lab in LAB_DIR (default /tmp/meshwork-lab).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_load_settings
lab_use_recorded
[[ -f $lab_env ]] || die "no lab in $LAB_DIR: run up.sh first"

bridge=$(lab_bridge)
link_exists "$bridge" || die "no bridge $bridge: is the lab up? (up.sh makes it again)"
for host in $(lab_hosts); do
    veth=$(lab_veth "$host")
    link_exists "$veth" || continue
    ip link set "$veth" master "$bridge"
    ip link set "$veth" up
done
if link_exists "$(lab_bridge_b)"; then
    ip link del "$(lab_bridge_b)"
fi
say "healed: every host is back on $bridge"
