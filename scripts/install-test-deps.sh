#!/usr/bin/env bash
# Installs what the test suites need beyond cargo, idempotently. Run by
# scripts/test.sh; safe to run by hand. Needs root (or sudo) only when
# something is missing.
set -euo pipefail

# Debian packages the suites use: `kill` (procps) to stop servers.
packages=(procps)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest not found: the suites will run under plain cargo test"
fi
