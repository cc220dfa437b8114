#!/usr/bin/env bash
# Build runnerhub/executor-host-test:local: a Debian 12 (bookworm) root file system holding the
# Debian packages scripts/install-executor.sh installs, so tests run that script offline in a
# container (tests/e2e/test_install_script.py). Set-up only (`make executor-host-image`, part of
# `make test`): debootstrap needs root and Debian's mirror; the tests never download.
# The image carries the label runnerhub.inputs-hash (the packages, the suite, this script): an
# image whose label matches is kept, so a second run takes a second.
#
# Usage: scripts/build-executor-host-image.sh [--force] [--print-hash]
# Environment: RUNNERHUB_DEBIAN_MIRROR (default: the one apt uses here)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=runnerhub/executor-host-test:local
suite=bookworm
force=0
print_hash=0
while (($#)); do
    case $1 in
        --force) force=1; shift ;;
        --print-hash) print_hash=1; shift ;;
        -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "[build-executor-host-image] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# The install script's packages, plus systemd as on a real host (the test verifies the unit
# with systemd-analyze).
packages=$({ "$repo/scripts/install-executor.sh" --print-packages; echo systemd; } | paste -sd, -)
arch=$(dpkg --print-architecture)
hash=$({ echo "$suite $arch $packages"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-64)
if [ "$print_hash" = 1 ]; then
    echo "$hash"
    exit 0
fi

"$repo/scripts/ensure-docker.sh"
current=$(docker image inspect -f '{{ index .Config.Labels "runnerhub.inputs-hash" }}' "$image" \
    2>/dev/null || true)
if [ "$force" = 0 ] && [ "$current" = "$hash" ]; then
    say "$image is up to date (inputs ${hash:0:12})"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null || ! [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    "$repo/scripts/apt-install.sh" debootstrap debian-archive-keyring
fi

# The Debian mirror apt already uses here (one-line and deb822 formats): CI machines may only
# reach their own mirror.
mirror=${RUNNERHUB_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '!/^[[:space:]]*#/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }' \
        || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi

start_s=$SECONDS
mkdir -p "$repo/.cache"
tmp=$(mktemp -d "$repo/.cache/executor-host.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
say "debootstrap $suite ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" "$suite" "$tmp/root" "$mirror" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/* \
    "$tmp"/root/var/log/* "$tmp"/root/dev/*
tar -C "$tmp/root" --numeric-owner -cf - . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL runnerhub.inputs-hash=$hash runnerhub.debian-suite=$suite" \
    --message "runnerhub executor host test image ($suite: $packages)" \
    - "$image" >/dev/null
docker image prune -f --filter label=runnerhub.inputs-hash >/dev/null 2>&1 || true
say "$image built in $((SECONDS - start_s)) s"
