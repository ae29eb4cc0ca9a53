#!/usr/bin/env bash
# Installs what the test suites need beyond cargo, idempotently. Run by
# scripts/test.sh; safe to run by hand. Needs root (or sudo) only when a
# Debian package is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"

# Debian packages: procps (`kill`), dnsutils (`dig`), python3-pip and
# npm for the real Consul clients; iproute2 (`ip netns`), curl and
# systemd (`systemd-analyze verify`, `systemctl --root`) for the
# deploy-vm tests; iptables for the fault suite's splits and one-way loss
# (it also needs `setpriv`, from util-linux, which Debian always has);
# Patroni with PostgreSQL 15 for the Consul-sessions test, with
# python3-consul, Patroni's Consul client (the patroni package depends on
# one DCS client of several, and apt picks etcd's); chromium and
# chromium-driver for the web UI suite (driven over WebDriver); openssl
# for the gateway suite's RSA keys; prometheus (with promtool) for the
# dashboards and alert rules suite.
packages=(procps dnsutils iproute2 curl iptables patroni python3-consul postgresql-15 chromium chromium-driver openssl prometheus)
command -v systemd-analyze >/dev/null || packages+=(systemd)
command -v python3 >/dev/null || packages+=(python3 python3-pip)
command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# The Python Consul client (PyPI py-consul), pinned.
if ! python3 -c 'import consul, sys; sys.exit(0 if consul.__version__ == "1.8.0" else 1)' 2>/dev/null; then
    echo "installing py-consul 1.8.0"
    python3 -m pip install --quiet --disable-pip-version-check py-consul==1.8.0 \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages py-consul==1.8.0
fi

# The npm Consul client, pinned by tests/clients/package-lock.json.
if [[ ! -d tests/clients/node_modules/consul ]]; then
    echo "installing npm consul"
    (cd tests/clients && npm ci --silent --no-audit --no-fund)
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest not found: the suites will run under plain cargo test"
fi
