#!/usr/bin/env bash
# Installs Meshwork on this VM, or into $DESTDIR: the binaries, the
# `meshwork` system user, /etc/meshwork and /var/lib/meshwork, example
# configs (only where no config exists yet), the systemd units, and enables
# the units you ask for. Idempotent: a second run with the same inputs
# changes nothing (files are replaced only when their content differs).
#
# usage: deploy-vm/install.sh [--bin-dir DIR] [--node-id N]
#                             [--acl-bootstrap file|manual]
#                             [--registry] [--sidecar NAME]...
#                             [--gateway NAME]... [--now]
#
#   --bin-dir DIR   the built binaries (env BIN_DIR; default: target/release
#                   of this checkout, `cargo build --release --bins`)
#   --node-id N     /etc/meshwork/registry.toml, when absent, is written from
#                   deploy-vm/config/registry-N.toml (default 1; edit it!)
#   --acl-bootstrap file|manual
#                   ACLs are on (default deny) in the written registry.toml;
#                   `file` (default): the first server bootstraps them and
#                   leaves the management token in
#                   /var/lib/meshwork/management-token (0600); `manual`: you
#                   run `meshctl acl bootstrap` once (the leader logs a
#                   reminder until then)
#   --registry      enable meshwork-registry.service (a registry server VM)
#   --sidecar NAME  enable meshwork-sidecar@NAME.service, which reads
#                   /etc/meshwork/sidecar/NAME.toml (repeatable)
#   --gateway NAME  enable meshwork-gateway@NAME.service, which reads
#                   /etc/meshwork/gateway/NAME.toml (repeatable)
#   --now           also start the enabled units (needs a running systemd)
#
# environment:
#   DESTDIR   install under this root (for packaging and the tests): no user
#             is created and nothing is chowned (the sysusers.d entry creates
#             the user on the target), units are enabled offline with
#             `systemctl --root`, nothing is started
#   PREFIX    where binaries go (default /usr/local: $PREFIX/bin)
#   BIN_DIR   as --bin-dir
#
# What goes where (under $DESTDIR):
#   $PREFIX/bin/meshwork-registry, meshwork-sidecar, meshctl (if built)
#   $PREFIX/share/meshwork/examples/   registry-{1,2,3}.toml, web.toml, edge.toml,
#                                      edge-ingress.json (the gateway's config entry)
#   /etc/systemd/system/               meshwork-registry.service, meshwork-sidecar@.service,
#                                      meshwork-gateway@.service
#   /etc/sysusers.d/meshwork.conf      the meshwork user
#   /etc/meshwork/registry.toml        only if absent
#   /etc/meshwork/sidecar/web.toml     only if absent
#   /etc/meshwork/gateway/edge.toml    only if absent
#   /etc/meshwork/tls/                 where the CA and this server's certificate go
#                                      (docs/tls.md; the registry needs them to start)
#   /var/lib/meshwork                  state (the units' StateDirectory)
set -euo pipefail

# New directories (and parents) 0755 whatever the caller's umask; files
# get their modes explicitly.
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

die() {
    echo "install.sh: $*" >&2
    exit 1
}
usage() {
    sed -n '/^# usage:/,/^#   --now/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
node_id=1
acl_bootstrap=file
enable_registry=0
sidecars=()
gateways=()
now=0

while (($#)); do
    case $1 in
    --bin-dir)
        (($# >= 2)) || die "--bin-dir needs a directory"
        BIN_DIR=$2
        shift 2
        ;;
    --node-id)
        (($# >= 2)) || die "--node-id needs a number"
        node_id=$2
        shift 2
        ;;
    --acl-bootstrap)
        (($# >= 2)) || die "--acl-bootstrap needs file or manual"
        [[ $2 == file || $2 == manual ]] || die "--acl-bootstrap: '$2' is neither file nor manual"
        acl_bootstrap=$2
        shift 2
        ;;
    --registry)
        enable_registry=1
        shift
        ;;
    --sidecar)
        (($# >= 2)) || die "--sidecar needs a service name"
        [[ $2 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--sidecar: '$2' is not a usable service name (letters, digits, _ . -)"
        sidecars+=("$2")
        shift 2
        ;;
    --gateway)
        (($# >= 2)) || die "--gateway needs a gateway name"
        [[ $2 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--gateway: '$2' is not a usable gateway name (letters, digits, _ . -)"
        gateways+=("$2")
        shift 2
        ;;
    --now)
        now=1
        shift
        ;;
    -h | --help) usage ;;
    *) die "unknown argument '$1' (try --help)" ;;
    esac
done

[[ $node_id =~ ^[1-9][0-9]*$ ]] || die "--node-id: '$node_id' is not a positive number"
[[ $PREFIX == /* ]] || die "PREFIX must be an absolute path, not '$PREFIX'"
if [[ -n $DESTDIR ]]; then
    [[ $DESTDIR == /* ]] || DESTDIR="$PWD/$DESTDIR"
    DESTDIR=${DESTDIR%/}
    [[ -n $DESTDIR ]] || die "DESTDIR=/ is not a staging root; leave DESTDIR unset to install on this machine"
    ((now == 0)) || die "--now cannot start units inside DESTDIR"
elif [[ $(id -u) -ne 0 ]]; then
    die "installing on this machine needs root (or set DESTDIR=/some/dir to stage the files)"
fi

for bin in meshwork-registry meshwork-sidecar; do
    [[ -x $BIN_DIR/$bin ]] || die "$BIN_DIR/$bin not found: build it (cargo build --release --bins) or point --bin-dir/BIN_DIR at the binaries"
done

changes=0
note() { echo "  $*"; }

# put SRC DEST MODE: writes DEST (atomically, through a temp file in the
# same directory) unless it already has SRC's content and MODE.
put() {
    local src=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        if [[ $(stat -c %a "$dest") != "$mode" ]]; then
            chmod "$mode" "$dest"
            note "mode $mode $dest"
            changes=$((changes + 1))
        fi
        return 0
    fi
    local tmp
    tmp=$(mktemp "$(dirname "$dest")/.install.XXXXXX")
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
    note "wrote $dest"
    changes=$((changes + 1))
}

# put_if_absent SRC DEST MODE: a config the operator owns once it exists.
put_if_absent() {
    local src=$1 dest=$2 mode=$3
    if [[ -e $dest ]]; then
        return 0
    fi
    put "$src" "$dest" "$mode"
}

# dir PATH MODE [OWNER:GROUP]: creates PATH, fixes its mode and (outside
# DESTDIR, once the user exists) its owner.
dir() {
    local path=$1 mode=$2 owner=${3:-}
    if [[ ! -d $path ]]; then
        mkdir -p "$path"
        note "created $path"
        changes=$((changes + 1))
    fi
    if [[ $(stat -c %a "$path") != "$mode" ]]; then
        chmod "$mode" "$path"
        changes=$((changes + 1))
    fi
    chown_if "$owner" "$path"
}

# sysdir PATH: a directory Meshwork shares with the system (/usr/local/bin,
# /etc/systemd/system, …): created (0755) when missing, never re-moded.
sysdir() {
    if [[ ! -d $1 ]]; then
        mkdir -p "$1"
        note "created $1"
        changes=$((changes + 1))
    fi
}

chown_if() {
    local owner=$1 path=$2
    [[ -n $owner && -z $DESTDIR ]] || return 0
    if [[ $(stat -c %U:%G "$path") != "$owner" ]]; then
        chown "$owner" "$path"
        note "owner $owner $path"
        changes=$((changes + 1))
    fi
}

root=$DESTDIR
echo "installing Meshwork into ${root:-/} (binaries from $BIN_DIR)"

# --- the user ---------------------------------------------------------
sysdir "$root/etc/sysusers.d"
sysusers=$(mktemp)
trap 'rm -f "$sysusers" "${unit_tmp:-}" "${manual_config:-}"' EXIT
cat >"$sysusers" <<'EOF'
# The user Meshwork's systemd units run as (deploy-vm/install.sh).
u meshwork - "Meshwork service mesh" /var/lib/meshwork -
EOF
put "$sysusers" "$root/etc/sysusers.d/meshwork.conf" 644
if [[ -z $DESTDIR ]] && ! getent passwd meshwork >/dev/null; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers /etc/sysusers.d/meshwork.conf
    else
        useradd --system --user-group --home-dir /var/lib/meshwork --no-create-home \
            --shell "$(command -v nologin || echo /bin/false)" meshwork
    fi
    getent passwd meshwork >/dev/null || die "could not create the user meshwork"
    note "created user meshwork"
    changes=$((changes + 1))
fi

# --- binaries -----------------------------------------------------------
sysdir "$root$PREFIX/bin"
put "$BIN_DIR/meshwork-registry" "$root$PREFIX/bin/meshwork-registry" 755
put "$BIN_DIR/meshwork-sidecar" "$root$PREFIX/bin/meshwork-sidecar" 755
if [[ -x $BIN_DIR/meshctl ]]; then
    put "$BIN_DIR/meshctl" "$root$PREFIX/bin/meshctl" 755
else
    note "no $BIN_DIR/meshctl: skipped"
fi

# --- examples and configs ---------------------------------------------
sysdir "$root$PREFIX/share"
dir "$root$PREFIX/share/meshwork" 755
dir "$root$PREFIX/share/meshwork/examples" 755
for example in "$here"/config/*.toml "$here"/config/*.json; do
    put "$example" "$root$PREFIX/share/meshwork/examples/$(basename "$example")" 644
done
dir "$root/etc/meshwork" 750 root:meshwork
dir "$root/etc/meshwork/sidecar" 750 root:meshwork
dir "$root/etc/meshwork/gateway" 750 root:meshwork
dir "$root/etc/meshwork/tls" 750 root:meshwork
if [[ ! -e $root/etc/meshwork/registry.toml ]]; then
    [[ -f $here/config/registry-$node_id.toml ]] || die "no example config for --node-id $node_id (deploy-vm/config has registry-1..3.toml); write $root/etc/meshwork/registry.toml yourself"
    if [[ $acl_bootstrap == manual ]]; then
        manual_config=$(mktemp)
        grep -v '^bootstrap_file = ' "$here/config/registry-$node_id.toml" >"$manual_config"
        put_if_absent "$manual_config" "$root/etc/meshwork/registry.toml" 640
    else
        put_if_absent "$here/config/registry-$node_id.toml" "$root/etc/meshwork/registry.toml" 640
    fi
fi
put_if_absent "$here/config/web.toml" "$root/etc/meshwork/sidecar/web.toml" 640
put_if_absent "$here/config/edge.toml" "$root/etc/meshwork/gateway/edge.toml" 640
chown_if root:meshwork "$root/etc/meshwork/registry.toml"
chown_if root:meshwork "$root/etc/meshwork/sidecar/web.toml"
chown_if root:meshwork "$root/etc/meshwork/gateway/edge.toml"
dir "$root/var/lib/meshwork" 750 meshwork:meshwork

# --- units ------------------------------------------------------------
unit_dir="$root/etc/systemd/system"
sysdir "$unit_dir"
units_changed=0
unit_tmp=$(mktemp)
for unit in "$here"/systemd/*.service; do
    # The units name /usr/local/bin; follow PREFIX.
    sed "s|/usr/local/bin/|$PREFIX/bin/|g" "$unit" >"$unit_tmp"
    before=$changes
    put "$unit_tmp" "$unit_dir/$(basename "$unit")" 644
    ((changes == before)) || units_changed=1
done

# --- enable -------------------------------------------------------------
to_enable=()
((enable_registry)) && to_enable+=(meshwork-registry.service)
for name in "${sidecars[@]}"; do
    to_enable+=("meshwork-sidecar@$name.service")
    [[ -e $root/etc/meshwork/sidecar/$name.toml ]] ||
        echo "install.sh: warning: $root/etc/meshwork/sidecar/$name.toml does not exist yet; meshwork-sidecar@$name will not start without it" >&2
done
for name in "${gateways[@]}"; do
    to_enable+=("meshwork-gateway@$name.service")
    [[ -e $root/etc/meshwork/gateway/$name.toml ]] ||
        echo "install.sh: warning: $root/etc/meshwork/gateway/$name.toml does not exist yet; meshwork-gateway@$name will not start without it" >&2
done

systemd_running=0
[[ -z $DESTDIR && -d /run/systemd/system ]] && systemd_running=1
if ((systemd_running && units_changed)); then
    systemctl daemon-reload
fi
if ((${#to_enable[@]})); then
    if ! command -v systemctl >/dev/null; then
        echo "install.sh: warning: no systemctl here; not enabling ${to_enable[*]}" >&2
    else
        missing=()
        for unit in "${to_enable[@]}"; do
            systemctl --root="${root:-/}" is-enabled --quiet "$unit" 2>/dev/null || missing+=("$unit")
        done
        if ((systemd_running)); then
            if ((now)); then
                systemctl enable --now "${to_enable[@]}"
            elif ((${#missing[@]})); then
                systemctl enable "${missing[@]}"
            fi
        elif ((${#missing[@]})); then
            # Offline (DESTDIR, an image build, a container): the symlinks only.
            systemctl --root="${root:-/}" enable "${missing[@]}"
            ((now == 0)) || echo "install.sh: warning: systemd is not running here; --now ignored" >&2
        fi
        changes=$((changes + ${#missing[@]}))
    fi
fi

if ((changes == 0)); then
    echo "nothing to change: everything was already in place"
else
    echo "done: $changes change(s)"
fi
if ((systemd_running)) && [[ ${#to_enable[@]} -eq 0 ]]; then
    echo "next: edit /etc/meshwork/registry.toml (servers), /etc/meshwork/sidecar/NAME.toml (apps)"
    echo "  or /etc/meshwork/gateway/NAME.toml (gateways), then"
    echo "  systemctl enable --now meshwork-registry         # on each registry server"
    echo "  systemctl enable --now meshwork-sidecar@NAME     # one per service instance"
    echo "  systemctl enable --now meshwork-gateway@NAME     # one per gateway"
fi
if ((systemd_running && changes > 0)); then
    running=$(systemctl list-units --state=active --no-legend --plain 'meshwork-*' | awk '{print $1}' | xargs)
    [[ -z $running ]] || echo "note: running: $running: restart them (registry servers one at a time) to use the new files"
fi
exit 0
