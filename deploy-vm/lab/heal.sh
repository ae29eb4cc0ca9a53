#!/usr/bin/env bash
# Undoes every partition.sh: all hosts back on the lab's bridge, links up.
# Safe to re-run. Works on the lab in LAB_DIR (default /tmp/meshwork-lab).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_load_settings
lab_use_recorded
[[ -f $lab_env ]] || die "no lab in $LAB_DIR: run up.sh first"
if ! ns_exists "$(lab_switch)" || ! sw_link_exists "$LAB_BRIDGE"; then
    die "no switch namespace $(lab_switch) with its bridge: is the lab up? (up.sh makes it again)"
fi

for host in $(lab_hosts); do
    sw_link_exists "$host" || continue
    sw link set dev "$host" master "$LAB_BRIDGE"
    sw link set dev "$host" up
done
if sw_link_exists "$LAB_BRIDGE_B"; then
    sw link del dev "$LAB_BRIDGE_B"
fi
rm -f "$LAB_DIR/isolated"
say "healed: every host is back on the lab's bridge"
