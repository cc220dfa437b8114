#!/bin/bash
# RunnerHub stand-in runner image entry point (runs as user `runner`, uid 1001).
# The executor bind-mounts the runner's JIT config, a file on a host tmpfs, read-only at
# /run/runnerhub/jitconfig (or $RUNNERHUB_JITCONFIG_FILE). The secret only ever travels as that
# file: never as an argument or environment variable (those show in `docker inspect`), and this
# script never prints it.
set -euo pipefail

file=${RUNNERHUB_JITCONFIG_FILE:-/run/runnerhub/jitconfig}

fail() {
    echo "runnerhub-entrypoint: $*" >&2
    exit 78 # EX_CONFIG: the container was started without a usable JIT config
}
[ -e "$file" ] || fail "JIT config file $file is missing; the executor must bind-mount it read-only"
[ -f "$file" ] || fail "JIT config $file is not a regular file"
[ -r "$file" ] || fail "JIT config file $file is not readable by uid $(id -u)"
[ -s "$file" ] || fail "JIT config file $file is empty"

# exec: the runner becomes tini's direct child and gets SIGTERM from `docker stop`.
exec python3 /opt/runnerhub/standin_runner.py --jitconfig-file "$file" "$@"
