#!/bin/bash
# RunnerHub entry point for the real runner image, ghcr.io/actions/actions-runner (user `runner`,
# uid 1001, runner in /home/runner, jobs in /home/runner/_work). Same contract as the stand-in's
# entrypoint.sh: the executor bind-mounts the JIT config read-only at /run/runnerhub/jitconfig
# (or $RUNNERHUB_JITCONFIG_FILE), a file on a host tmpfs; it never travels in the container's
# configuration, so `docker inspect` cannot show it. This script never prints it.
set -euo pipefail

file=${RUNNERHUB_JITCONFIG_FILE:-/run/runnerhub/jitconfig}

fail() {
    echo "runnerhub-entrypoint: $*" >&2
    exit 78 # EX_CONFIG
}
[ -e "$file" ] || fail "JIT config file $file is missing; the executor must bind-mount it read-only"
[ -f "$file" ] || fail "JIT config $file is not a regular file"
[ -r "$file" ] || fail "JIT config file $file is not readable by uid $(id -u)"
[ -s "$file" ] || fail "JIT config file $file is empty"

cd /home/runner
# Equivalent to `./run.sh --jitconfig "$(cat "$file")"`, but through this process's environment
# instead of argv: any host user can read a process's argv (ps, /proc/PID/cmdline), while its
# environment is readable only by its own uid and root. The runner reads ACTIONS_RUNNER_INPUT_*
# variables as its command-line arguments, masks JITCONFIG as a secret and removes it from its
# environment block. Exported here only, so it is not in the container's Config.Env.
ACTIONS_RUNNER_INPUT_JITCONFIG=$(cat "$file")
export ACTIONS_RUNNER_INPUT_JITCONFIG
exec ./run.sh "$@"
