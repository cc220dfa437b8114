#!/usr/bin/env bash
# Build the RunnerHub test runner images offline, from Debian packages only (no registry):
#   runnerhub/runner-base:local   debootstrap rootfs + runner-image/ files, via `docker import`
#   one image per pool            `docker build` FROM the local base (see runner-image/Dockerfile.pool)
# Each image carries the label runnerhub.inputs-hash; an image whose label matches the current
# inputs is kept, so a second run takes a few seconds. Needs root (debootstrap) on a cold cache.
#
# Usage: scripts/build-runner-images.sh [--pools FILE] [--force]
#   --pools FILE  derive the pool images named in FILE (default chalicelib/config/pools.toml)
#   --force       rebuild the images even when their inputs are unchanged
# Environment:
#   RUNNERHUB_STANDIN_RUNNER  stand-in runner script (default emulator/standin_runner.py)
#   RUNNERHUB_DEBIAN_MIRROR   Debian mirror (default: the one apt uses here)
#   RUNNERHUB_CACHE_DIR       rootfs tarball cache (default .cache/runner-images in the repo)
#   RUNNERHUB_INVENTORY_DIR   package inventories, one per image id (default .cache/inventory;
#                             `python -m executor.inventory which PACKAGE` reads them)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pools_file=$repo/chalicelib/config/pools.toml
force=0
while (($#)); do
    case $1 in
        --pools) pools_file=${2:?--pools needs a file}; shift 2 ;;
        --pools=*) pools_file=${1#*=}; shift ;;
        --force) force=1; shift ;;
        -h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

suite=bookworm
# python3 (not python3-minimal: it lacks json), CA certificates for HTTPS, tini as PID 1 so
# `docker stop` reaches the runner and zombies are reaped.
packages=python3,ca-certificates,tini
base_image=runnerhub/runner-base:local
image_dir=$repo/runner-image
standin=${RUNNERHUB_STANDIN_RUNNER:-$repo/emulator/standin_runner.py}
cache_dir=${RUNNERHUB_CACHE_DIR:-$repo/.cache/runner-images}
inventory_dir=${RUNNERHUB_INVENTORY_DIR:-$repo/.cache/inventory}
arch=$(dpkg --print-architecture)
start_ns=$(date +%s%N)

say() { echo "[build-runner-images] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
since() { echo "$(( ($(date +%s%N) - $1) / 1000000 )) ms"; }
sha() { sha256sum | cut -c1-64; }
label_of() { docker image inspect -f '{{ index .Config.Labels "runnerhub.inputs-hash" }}' "$1" 2>/dev/null || true; }

[ -f "$standin" ] || die "stand-in runner $standin is missing (set RUNNERHUB_STANDIN_RUNNER)"
[ -f "$pools_file" ] || die "pools file $pools_file is missing"

# Host Python for tomllib (3.11+): the project venv if there is one, else the system python3.
py=python3
[ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python

apt_updated=0
apt_install() {
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The Debian mirror apt already uses here (one-line and deb822 formats), not a hard-coded one:
# CI machines may only reach their own mirror.
debian_mirror() {
    if [ -n "${RUNNERHUB_DEBIAN_MIRROR:-}" ]; then echo "$RUNNERHUB_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '!/^[[:space:]]*#/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }' \
        || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# The slow, rarely changing part: a Debian rootfs with the runner user, cached as a tarball whose
# name hashes this function's own code, the suite, the packages and the architecture.
make_rootfs() { # $1: output tarball
    local out=$1 tmp mirror
    if ! command -v debootstrap >/dev/null || ! [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
        apt_install debootstrap debian-archive-keyring
    fi
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    mirror=$(debian_mirror)
    tmp=$(mktemp -d "$cache_dir/rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand $tmp now: it is local
    trap "rm -rf '$tmp'" EXIT
    say "debootstrap $suite ($packages) from $mirror"
    debootstrap --variant=minbase --include="$packages" "$suite" "$tmp/root" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
    # uid/gid 1001 `runner`, home /home/runner, work dir _work: as in ghcr.io/actions/actions-runner.
    chroot "$tmp/root" groupadd --gid 1001 runner
    chroot "$tmp/root" useradd --uid 1001 --gid 1001 --create-home --home-dir /home/runner \
        --shell /bin/bash runner
    install -d -o 1001 -g 1001 "$tmp/root/home/runner/_work"
    # Mount point for the JIT config file (the bind mount would create it; this documents it).
    install -d -m 0755 "$tmp/root/run/runnerhub"
    rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/* \
        "$tmp"/root/var/log/* "$tmp"/root/dev/*
    tar -C "$tmp/root" --numeric-owner -cf "$tmp/rootfs.tar" .
    mv "$tmp/rootfs.tar" "$out"
    rm -rf "$tmp"
    trap - EXIT
}

build_base() { # $1: inputs hash
    local hash=$1 rootfs_key rootfs t tmp
    rootfs_key=$({ echo "$suite $arch $packages"; declare -f make_rootfs; } | sha | cut -c1-16)
    rootfs=$cache_dir/rootfs-$suite-$arch-$rootfs_key.tar
    if [ -f "$rootfs" ]; then
        say "rootfs cached: $rootfs"
    else
        t=$(date +%s%N)
        make_rootfs "$rootfs"
        # Older rootfs tarballs of this suite and architecture are now stale: reclaim the space.
        find "$cache_dir" -maxdepth 1 -name "rootfs-$suite-$arch-*.tar" ! -path "$rootfs" -delete
        say "rootfs built in $(since "$t"): $rootfs"
    fi
    # Add our files by appending to a copy of the cached tarball: no extraction, no root needed.
    t=$(date +%s%N)
    tmp=$(mktemp -d "$cache_dir/base.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    install -D -m 0755 "$image_dir/entrypoint.sh" "$tmp/add/opt/runnerhub/entrypoint.sh"
    install -m 0644 "$standin" "$tmp/add/opt/runnerhub/standin_runner.py"
    chmod 0755 "$tmp/add/opt/runnerhub"
    cp "$rootfs" "$tmp/image.tar"
    tar -C "$tmp/add" --owner=0 --group=0 --numeric-owner -rf "$tmp/image.tar" ./opt/runnerhub
    docker import \
        --change 'ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/opt/runnerhub/entrypoint.sh"]' \
        --change 'CMD []' \
        --change 'USER runner' \
        --change 'WORKDIR /home/runner/_work' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV HOME=/home/runner LANG=C.UTF-8 PYTHONUNBUFFERED=1' \
        --change "LABEL runnerhub.inputs-hash=$hash runnerhub.debian-suite=$suite" \
        --message "runnerhub runner base ($suite: $packages)" \
        "$tmp/image.tar" "$base_image" >/dev/null
    rm -rf "$tmp"
    trap - EXIT
    say "$base_image imported in $(since "$t")"
}

# "pool<TAB>image" for each pool whose image is local; registry images (ghcr.io/...) are pulled
# in production, not built here. Pools sharing an image are listed together: "a,b<TAB>image".
list_pools() {
    "$py" - "$1" <<'PY'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    pools = tomllib.load(f).get("pool", [])
by_image = {}
for pool in pools:
    name, image = pool["name"], pool.get("image", "")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        sys.exit(f"bad pool name {name!r}")
    first = image.split("/")[0]
    if not image or ("/" in image and ("." in first or ":" in first or first == "localhost")):
        print(f"pool {name}: image {image!r} comes from a registry, not built", file=sys.stderr)
        continue
    by_image.setdefault(image, []).append(name)
for image, names in by_image.items():
    print(f"{','.join(names)}\t{image}")
PY
}

"$repo/scripts/ensure-docker.sh" # returns at once when Docker already answers
mkdir -p "$cache_dir"
# Concurrent runs (parallel test sessions) would race on the same tags: serialise them.
exec 9>"$cache_dir/.lock"
flock -w 600 9 || die "another build holds $cache_dir/.lock"

pools=$(list_pools "$pools_file")

base_hash=$({
    echo "suite=$suite packages=$packages arch=$arch"
    cat "${BASH_SOURCE[0]}" "$image_dir/entrypoint.sh" "$standin"
} | sha)
if [ "$force" = 0 ] && [ "$(label_of "$base_image")" = "$base_hash" ]; then
    say "$base_image is up to date (inputs ${base_hash:0:12})"
else
    build_base "$base_hash"
fi

while IFS=$'\t' read -r pool image; do
    [ -n "$image" ] || continue
    hash=$({ echo "$base_hash $pool"; cat "$image_dir/Dockerfile.pool"; } | sha)
    if [ "$force" = 0 ] && [ "$(label_of "$image")" = "$hash" ]; then
        say "$image (pool $pool) is up to date"
        continue
    fi
    t=$(date +%s%N)
    ctx=$(mktemp -d)
    echo "$pool" >"$ctx/runnerhub-pool"
    cp "$image_dir/Dockerfile.pool" "$ctx/Dockerfile"
    # The classic builder resolves FROM against local images and never pulls unless --pull.
    DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$base_image" --build-arg "POOL=$pool" \
        --label "runnerhub.inputs-hash=$hash" -t "$image" "$ctx" >/dev/null 2>"$ctx/err" ||
        { cat "$ctx/err" >&2; rm -rf "$ctx"; die "docker build of $image failed"; }
    rm -rf "$ctx"
    say "$image (pool $pool) built in $(since "$t")"
done <<<"$pools"

# Each pool image's packages with its id (executor/inventory.py): recorded once per image id,
# so an image kept as up to date costs nothing here. It needs the Docker SDK (the venv's).
inventory=1
"$py" -c 'import docker' 2>/dev/null ||
    { inventory=0; say "package inventory skipped: $py has no docker module (make venv)"; }
while IFS=$'\t' read -r _pool image; do
    if [ "$inventory" = 0 ] || [ -z "$image" ]; then continue; fi
    id=$(docker image inspect -f '{{.Id}}' "$image")
    [ -f "$inventory_dir/sha256-${id#sha256:}.json" ] && continue
    (cd "$repo" && "$py" -m executor.inventory record "$image" --out "$inventory_dir") >&2 ||
        die "inventory of $image failed"
done <<<"$pools"

# Drop the untagged leftovers of earlier builds (only ours: they carry the label).
docker image prune -f --filter label=runnerhub.inputs-hash >/dev/null 2>&1 || true
say "done in $(since "$start_ns")"
