#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`; install Debian's docker.io and start dockerd
# when it does not. Idempotent and safe to call repeatedly or concurrently: it exits 0 at once
# when Docker already works, and a lock keeps two callers from starting two daemons.
#
# Environment:
#   RUNNERHUB_DOCKERD_LOG   dockerd's log file (default /var/log/runnerhub-dockerd.log)
#   RUNNERHUB_DOCKERD_WAIT  seconds to wait for each start attempt (default 60)
set -euo pipefail

log=${RUNNERHUB_DOCKERD_LOG:-/var/log/runnerhub-dockerd.log}
wait_s=${RUNNERHUB_DOCKERD_WAIT:-60}
pidfile=/var/run/docker.pid

say() { echo "[ensure-docker] $*" >&2; }
docker_ok() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null && docker_ok; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    say "Docker is not reachable and starting it needs root (or add this user to the docker group)."
    exit 1
fi

# One caller at a time from here on; the others then find Docker running and leave.
lockdir=/run/lock
[ -d "$lockdir" ] && [ -w "$lockdir" ] || lockdir=/tmp
exec 9>"$lockdir/runnerhub-ensure-docker.lock"
flock -w 300 9
if command -v docker >/dev/null && docker_ok; then
    exit 0
fi

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    say "installing docker.io from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Recommends stay on: they bring apparmor (whose parser dockerd needs on AppArmor kernels)
    # and cgroupfs-mount.
    apt-get install -y -qq docker.io >/dev/null
fi

# Wait for the daemon whose pid is $1; return 1 early if it dies (so a fallback can be tried).
wait_for() {
    local pid=$1 i
    for ((i = 0; i < wait_s; i++)); do
        docker_ok && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

# A dockerd started by someone else may still be initialising: wait for it, don't start another.
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    say "dockerd (pid $(cat "$pidfile")) is running; waiting for it"
    wait_for "$(cat "$pidfile")" && exit 0
    say "the running dockerd does not answer; see its own log. Not starting a second one."
    exit 1
fi

# Start attempts, the first that answers wins:
#  1. defaults (overlay2, iptables NAT for the bridge), what a normal host or CI VM needs;
#  2. --iptables=false: sandboxes without netfilter; containers still run, host networking works;
#  3. also vfs storage and no default bridge: nested setups where overlayfs or veth is refused.
attempts=(
    ""
    "--iptables=false"
    "--iptables=false --bridge=none --storage-driver=vfs"
)
mkdir -p "$(dirname "$log")"
for flags in "${attempts[@]}"; do
    say "starting dockerd ${flags:-(default flags)}; log: $log"
    echo "=== $(date -u +%FT%TZ) ensure-docker: dockerd $flags" >>"$log"
    # setsid: the daemon must outlive this script and the make/pytest process group calling it.
    # shellcheck disable=SC2086  # $flags is a list of words on purpose
    setsid dockerd $flags >>"$log" 2>&1 </dev/null &
    pid=$!
    if wait_for "$pid"; then
        say "Docker is up (dockerd pid $pid${flags:+, flags: $flags})"
        exit 0
    fi
    kill "$pid" 2>/dev/null || true
    # Let it release its pid file and socket before the next attempt.
    for ((i = 0; i < 15; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
done

say "dockerd did not come up; last lines of $log:"
tail -n 40 "$log" >&2
exit 1
