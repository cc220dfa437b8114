#!/usr/bin/env bash
# Build runnerhub/dind:local, the `docker` profile's per-job engine (executor/job_engine.py):
# Debian 12's docker.io (dockerd, containerd, runc, iptables), taken offline from
# runnerhub/executor-host-test:local (scripts/build-executor-host-image.sh, which debootstraps
# the install script's packages, docker.io among them). Set-up only (`make dind-image`); an
# image whose inputs-hash label matches is kept, so a second run takes a second.
#
# Usage: scripts/build-dind-image.sh [--force]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=runnerhub/dind:local
base=runnerhub/executor-host-test:local
force=0
case ${1:-} in
    --force) force=1 ;;
    "") ;;
    -h | --help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac
say() { echo "[build-dind-image] $*" >&2; }

"$repo/scripts/ensure-docker.sh"
docker image inspect "$base" >/dev/null 2>&1 || "$repo/scripts/build-executor-host-image.sh"
base_id=$(docker image inspect -f '{{.Id}}' "$base")
hash=$({ echo "$base_id"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-64)
current=$(docker image inspect -f '{{ index .Config.Labels "runnerhub.inputs-hash" }}' "$image" \
    2>/dev/null || true)
if [ "$force" = 0 ] && [ "$current" = "$hash" ]; then
    say "$image is up to date (inputs ${hash:0:12})"
    exit 0
fi
# No TLS here: the engine listens only on the job's own network (see docs/security.md).
docker build -q -t "$image" --label "runnerhub.inputs-hash=$hash" - >/dev/null <<DOCKERFILE
FROM $base
VOLUME /var/lib/docker
EXPOSE 2375
CMD ["dockerd", "--host=tcp://0.0.0.0:2375", "--tls=false"]
DOCKERFILE
say "$image built"
