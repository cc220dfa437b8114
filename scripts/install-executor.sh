#!/usr/bin/env bash
# Install the RunnerHub executor on a Debian 12 (bookworm) host. One script for both paths:
#   the executor AMI (EC2 Image Builder's build phase): everything but the environment file;
#   the user-data fallback (a plain Debian AMI): the same, then the environment file and a start.
# Steps: Debian packages (docker.io, python3-venv, the ECR credential helper, logrotate), the
# CloudWatch agent (downloaded: the one step tests skip), the code bundle in /opt/runnerhub/app,
# the daemon's virtualenv /opt/runnerhub/venv (pinned by constraints.txt), docker credHelpers,
# the systemd unit + logrotate + CloudWatch agent config, the environment file, the runner images
# pre-pulled, and last `python -m executor --check` (then, with --start, the service starts).
# Idempotent: running it again updates in place. docs/executor-host.md has the details.
#
# Usage: install-executor.sh [options]
#   --bundle PATH            code bundle: a directory or a .zip (default: this script's checkout)
#   --wheelhouse DIR         install Python packages only from DIR (pip --no-index: offline)
#   --env-file FILE          install FILE as /etc/runnerhub/executor.env (mode 0600)
#   --pools FILE             pre-pull this pools file's images (default: the environment's
#                            RUNNERHUB_POOLS_FILE, else the bundle's chalicelib/config/pools.toml)
#   --ecr-registry HOST      pull from HOST through docker-credential-ecr-login
#                            (default: $RUNNERHUB_ECR_REGISTRY; e.g. 1234.dkr.ecr.eu-west-1.amazonaws.com)
#   --start                  (re)start the executor after the check (user data); default: only
#                            enable it, as for an AMI whose boot writes the environment file
#   --no-systemd             no systemd (a container): write the unit, enable and start nothing;
#                            Docker must already answer (e.g. a mounted socket)
#   --skip-apt               never run apt-get; fail when a package is missing
#   --skip-cloudwatch-agent  do not download and install the CloudWatch agent
#   --skip-pull              do not pre-pull the runner images
#   --skip-check             do not run `python -m executor --check`
#   --address-pool CIDR      Docker's address pool for the per-job networks (default
#                            $RUNNERHUB_DOCKER_ADDRESS_POOL, else 10.213.0.0/16): must not overlap
#                            the VPC (checked against this host's routes) nor 172.31.0.0/16
#   --network-size BITS      the prefix length of each job network (default 28: 16 addresses;
#                            10.213.0.0/16 then holds 4096 networks)
#   --print-packages         print the Debian packages this script installs, then exit
#   --print-bundle-paths     print what it takes from a directory bundle, then exit
# Environment: RUNNERHUB_ECR_REGISTRY, RUNNERHUB_CLOUDWATCH_AGENT_URL (the agent's .deb),
# RUNNERHUB_DOCKER_ADDRESS_POOL.
set -euo pipefail

readonly PREFIX=/opt/runnerhub
readonly APP_DIR=$PREFIX/app
readonly VENV_DIR=$PREFIX/venv
readonly CONFIG_DIR=/etc/runnerhub
readonly ENV_FILE=$CONFIG_DIR/executor.env
readonly DOCKER_CONFIG_DIR=$CONFIG_DIR/docker
readonly DOCKER_DAEMON_JSON=/etc/docker/daemon.json
readonly LOG_DIR=/var/log/runnerhub
readonly SERVICE=runnerhub-executor
readonly UNIT_FILE=/etc/systemd/system/$SERVICE.service
# /var/lib/docker on xfs with project quotas, before Docker (executor/host/docker-storage.sh).
readonly STORAGE_SERVICE=runnerhub-docker-storage
readonly LOGROTATE_FILE=/etc/logrotate.d/runnerhub
readonly CW_AGENT_CONFIG=/opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json
# curl: the CloudWatch agent's download; ca-certificates: HTTPS for it, pip and the registries;
# xfsprogs: mkfs.xfs for the Docker data volume.
readonly PACKAGES=(docker.io python3 python3-venv amazon-ecr-credential-helper logrotate
    ca-certificates curl xfsprogs)
# What a directory bundle contributes (a .zip bundle is taken whole): the same paths as the
# CDK app's bundle (infra/runnerhub_infra/host_install.py BUNDLE_PATHS).
readonly BUNDLE_PATHS=(executor chalicelib requirements.txt requirements-executor.txt
    constraints.txt scripts/install-executor.sh)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle=$repo
wheelhouse=""
env_source=""
pools_file=""
ecr_registry=${RUNNERHUB_ECR_REGISTRY:-}
start=0
systemd=1
[ -d /run/systemd/system ] || systemd=0
skip_apt=0
skip_agent=0
skip_pull=0
skip_check=0
address_pool=${RUNNERHUB_DOCKER_ADDRESS_POOL:-10.213.0.0/16}
network_size=28
docker_restart=0

say() { echo "[install-executor] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --bundle) bundle=${2:?--bundle needs a path}; shift 2 ;;
        --wheelhouse) wheelhouse=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --env-file) env_source=${2:?--env-file needs a file}; shift 2 ;;
        --pools) pools_file=${2:?--pools needs a file}; shift 2 ;;
        --ecr-registry) ecr_registry=${2:?--ecr-registry needs a host}; shift 2 ;;
        --start) start=1; shift ;;
        --no-systemd) systemd=0; shift ;;
        --skip-apt) skip_apt=1; shift ;;
        --skip-cloudwatch-agent) skip_agent=1; shift ;;
        --skip-pull) skip_pull=1; shift ;;
        --skip-check) skip_check=1; shift ;;
        --address-pool) address_pool=${2:?--address-pool needs a CIDR}; shift 2 ;;
        --network-size) network_size=${2:?--network-size needs a prefix length}; shift 2 ;;
        --print-packages) printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
        --print-bundle-paths) printf '%s\n' "${BUNDLE_PATHS[@]}"; exit 0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -e "$bundle" ] || die "bundle $bundle not found"
[ -z "$wheelhouse" ] || [ -d "$wheelhouse" ] || die "wheelhouse $wheelhouse is not a directory"
[ -z "$env_source" ] || [ -f "$env_source" ] || die "environment file $env_source not found"
[ -z "$pools_file" ] || [ -f "$pools_file" ] || die "pools file $pools_file not found"
if [ -n "$ecr_registry" ] && ! [[ $ecr_registry =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?$ ]]; then
    die "--ecr-registry $ecr_registry is not a registry host name"
fi
if [ "$start" = 1 ] && [ "$systemd" = 0 ]; then
    die "--start needs systemd (this system has none, or --no-systemd was given)"
fi

started_ns=$(date +%s%N)
step() { say "$* ($(( ($(date +%s%N) - started_ns) / 1000000 )) ms)"; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do installed "$package" || missing+=("$package"); done
    if [ ${#missing[@]} -eq 0 ]; then
        step "Debian packages present"
        return
    fi
    [ "$skip_apt" = 0 ] || die "--skip-apt, but these packages are missing: ${missing[*]}"
    step "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The one step that needs more than Debian's mirror and PyPI, so tests skip it
# (--skip-cloudwatch-agent); shellcheck is its test. Amazon publishes the agent as a .deb only.
install_cloudwatch_agent() {
    local arch url tmp
    if installed amazon-cloudwatch-agent; then
        step "CloudWatch agent present"
        return
    fi
    arch=$(dpkg --print-architecture)
    case $arch in amd64 | arm64) ;; *) die "no CloudWatch agent package for $arch" ;; esac
    url=${RUNNERHUB_CLOUDWATCH_AGENT_URL:-https://amazoncloudwatch-agent.s3.amazonaws.com/debian/$arch/latest/amazon-cloudwatch-agent.deb}
    step "downloading the CloudWatch agent: $url"
    tmp=$(mktemp -d)
    curl --fail --silent --show-error --location --retry 3 --max-time 300 \
        --output "$tmp/amazon-cloudwatch-agent.deb" "$url" \
        || { rm -rf "$tmp"; die "CloudWatch agent download failed"; }
    dpkg -i "$tmp/amazon-cloudwatch-agent.deb" >/dev/null \
        || { rm -rf "$tmp"; die "CloudWatch agent install failed"; }
    rm -rf "$tmp"
}

# The bundle replaces $APP_DIR whole (nothing of an older version lingers), via a sibling
# directory so a failed extraction leaves the installed version alone.
install_app() {
    local staging=$APP_DIR.new path
    rm -rf "$staging"
    mkdir -p "$staging"
    if [ -d "$bundle" ]; then
        for path in "${BUNDLE_PATHS[@]}"; do
            [ -e "$bundle/$path" ] || die "bundle $bundle lacks $path"
        done
        tar -C "$bundle" --exclude=__pycache__ --exclude='*.pyc' -cf - "${BUNDLE_PATHS[@]}" \
            | tar -C "$staging" --no-same-owner -xf -
    else
        python3 -m zipfile -e "$bundle" "$staging" || die "cannot extract bundle $bundle"
    fi
    if ! [ -f "$staging/executor/__main__.py" ] || ! [ -f "$staging/constraints.txt" ]; then
        die "bundle $bundle has no executor/__main__.py or constraints.txt"
    fi
    chmod -R u=rwX,go=rX "$staging"
    rm -rf "$APP_DIR"
    mv "$staging" "$APP_DIR"
    step "code installed in $APP_DIR"
}

install_venv() {
    local site pip_args=(--quiet --disable-pip-version-check --no-input)
    # A venv whose interpreter is gone (a Debian Python upgrade) is rebuilt, not patched.
    if ! [ -x "$VENV_DIR/bin/python" ] || ! "$VENV_DIR/bin/python" -c "" 2>/dev/null; then
        rm -rf "$VENV_DIR"
        python3 -m venv "$VENV_DIR"
    fi
    [ -z "$wheelhouse" ] || pip_args+=(--no-index --find-links "$wheelhouse")
    step "pip install${wheelhouse:+ from $wheelhouse}"
    # Pinned, transitive pins included: hosts run what the tests ran.
    "$VENV_DIR/bin/python" -m pip install "${pip_args[@]}" -c "$APP_DIR/constraints.txt" \
        -r "$APP_DIR/requirements-executor.txt"
    # The code is not a package: the venv finds it through a .pth file, from any directory.
    site=$("$VENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$APP_DIR" >"$site/runnerhub-app.pth"
    step "virtualenv ready: $VENV_DIR"
}

configure_docker() {
    install -d -m 0700 "$DOCKER_CONFIG_DIR"
    python3 - "$DOCKER_CONFIG_DIR/config.json" "$ecr_registry" <<'PY'
import json, sys
path, registry = sys.argv[1], sys.argv[2]
config = {"credHelpers": {registry: "ecr-login"}} if registry else {}
with open(path, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
PY
    chmod 0600 "$DOCKER_CONFIG_DIR/config.json"
    step "docker config: $DOCKER_CONFIG_DIR/config.json${ecr_registry:+ (ecr-login for $ecr_registry)}"
}

# Docker's address pools (daemon.json `default-address-pools`): every runner gets a bridge
# network of its own (executor/containers.py), so hundreds must fit, in a range that never
# overlaps the VPC (a job could not reach the VPC's hosts it must, and would shadow them) nor
# 172.31.0.0/16 (the default VPC). Other daemon.json keys are kept. Docker reads the file when
# it starts: a change restarts it in enable_services (before any runner runs).
configure_docker_daemon() {
    local result
    result=$(python3 - "$DOCKER_DAEMON_JSON" "$address_pool" "$network_size" \
        "$(ip -4 route show 2>/dev/null | awk '$1 != "default" {print $1}' | tr '\n' ' ')" <<'PY'
import ipaddress, json, os, sys
path, pool, size, routes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
try:
    network = ipaddress.IPv4Network(pool)
    bits = int(size)
except ValueError as exc:
    sys.exit(f"--address-pool {pool} / --network-size {size}: {exc}")
if not network.prefixlen < bits <= 30:
    sys.exit(f"--network-size {bits} must be longer than /{network.prefixlen} and at most /30")
taken = [ipaddress.IPv4Network("172.31.0.0/16")]
for route in routes:
    try:
        route_net = ipaddress.IPv4Network(route, strict=False)
    except ValueError:
        continue
    if not route_net.is_loopback and not route_net.is_link_local and route_net.prefixlen < 32:
        taken.append(route_net)
# Docker's own networks (docker0, earlier pools) are routes too: ours are not a conflict.
config = {}
if os.path.exists(path):
    with open(path) as f:
        config = json.load(f)
ours = {str(ipaddress.IPv4Network(p["base"])) for p in config.get("default-address-pools", [])}
clash = [str(t) for t in taken if t.overlaps(network) and not any(
    t.subnet_of(ipaddress.IPv4Network(o)) for o in ours) and str(t) != "172.17.0.0/16"]
if clash:
    sys.exit(f"--address-pool {network} overlaps {', '.join(clash)} (the VPC or 172.31.0.0/16)")
wanted = [{"base": str(network), "size": bits}]
changed = config.get("default-address-pools") != wanted
config["default-address-pools"] = wanted
if changed:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".new", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(path + ".new", path)
print(f"{'changed' if changed else 'unchanged'} {2 ** (bits - network.prefixlen)}")
PY
) || die "Docker address pool: see above"
    [ "${result%% *}" = changed ] && docker_restart=1
    step "docker daemon.json: address pool $address_pool, /$network_size each (${result#* } networks, ${result%% *})"
}

install_host_files() {
    local host=$APP_DIR/executor/host
    install -d -m 0755 "$CONFIG_DIR" "$(dirname "$UNIT_FILE")" "$(dirname "$LOGROTATE_FILE")"
    install -d -m 0750 "$LOG_DIR"
    install -m 0644 "$host/runnerhub-executor.service" "$UNIT_FILE"
    install -m 0644 "$host/$STORAGE_SERVICE.service" \
        "$(dirname "$UNIT_FILE")/$STORAGE_SERVICE.service"
    install -m 0644 "$host/logrotate.conf" "$LOGROTATE_FILE"
    if [ -f "$host/cloudwatch-agent.json" ]; then
        install -D -m 0644 "$host/cloudwatch-agent.json" "$CW_AGENT_CONFIG"
        step "CloudWatch agent config: $CW_AGENT_CONFIG"
    fi
    if [ -n "$env_source" ]; then
        install -m 0600 "$env_source" "$ENV_FILE.new"
        mv "$ENV_FILE.new" "$ENV_FILE"
        step "environment file: $ENV_FILE"
    fi
    step "unit $UNIT_FILE, logrotate $LOGROTATE_FILE"
}

enable_services() {
    if [ "$systemd" = 0 ]; then
        step "no systemd: unit written, not enabled"
        return
    fi
    systemctl daemon-reload
    # The Docker data volume (a blank second disk) is set up before Docker uses it: at every
    # boot by the unit; now, on a host whose Docker already runs on the root filesystem.
    systemctl enable "$STORAGE_SERVICE.service" >/dev/null
    if ! systemctl is-active --quiet "$STORAGE_SERVICE.service"; then
        systemctl stop docker.service docker.socket containerd.service 2>/dev/null || true
        systemctl start "$STORAGE_SERVICE.service"
    fi
    if [ "$docker_restart" = 1 ] && systemctl is-active --quiet docker.service; then
        systemctl restart docker.service  # the new address pools (no runner runs yet)
    fi
    systemctl enable --now docker.service >/dev/null
    systemctl enable "$SERVICE.service" >/dev/null
    if installed amazon-cloudwatch-agent; then
        systemctl enable amazon-cloudwatch-agent.service >/dev/null
    fi
    step "enabled docker and $SERVICE"
}

docker_ready() {
    local i
    for ((i = 0; i < 30; i++)); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "the Docker engine does not answer (without systemd, start it or mount its socket)"
}

# The value of KEY in the environment file (systemd EnvironmentFile syntax, simple lines), else
# in this script's environment.
setting() {
    local key=$1 value=""
    if [ -f "$ENV_FILE" ]; then
        value=$(sed -n "s/^[[:space:]]*$key=//p" "$ENV_FILE" | tail -n 1)
        value=${value%\"}; value=${value#\"}
    fi
    echo "${value:-${!key:-}}"
}

# The served pools' images (RUNNERHUB_EXECUTOR_POOLS, default all), read by the daemon's own
# pools parser, so the AMI holds exactly what the daemon will run.
pull_images() {
    local file served images image attempt
    file=${pools_file:-$(setting RUNNERHUB_POOLS_FILE)}
    served=$(setting RUNNERHUB_EXECUTOR_POOLS)
    images=$(cd "$APP_DIR" && "$VENV_DIR/bin/python" - "$file" "$served" <<'PY'
import sys
from chalicelib.pools import load_pools
config = load_pools(sys.argv[1] or None)
names = [n.strip() for n in sys.argv[2].split(",") if n.strip()] or config.names
unknown = sorted(set(names) - set(config.names))
if unknown:
    sys.exit(f"RUNNERHUB_EXECUTOR_POOLS names pools not in the file: {', '.join(unknown)}")
print("\n".join(dict.fromkeys(config.by_name(n).image for n in names)))
PY
    ) || die "cannot read the pools file ${file:-(the bundle default)}"
    docker_ready
    while read -r image; do
        [ -n "$image" ] || continue
        if docker image inspect "$image" >/dev/null 2>&1; then
            step "image $image present"
            continue
        fi
        for attempt in 1 2 3; do
            step "docker pull $image (attempt $attempt)"
            DOCKER_CONFIG=$DOCKER_CONFIG_DIR docker pull --quiet "$image" >/dev/null && break
            [ "$attempt" = 3 ] && die "cannot pull $image"
            sleep $((attempt * 5))
        done
    done <<<"$images"
}

run_check() {
    local args=(--check)
    [ -f "$ENV_FILE" ] && args+=(--env-file "$ENV_FILE")
    [ "$skip_pull" = 0 ] && args+=(--require-images)
    step "python -m executor ${args[*]}"
    (cd "$APP_DIR" && DOCKER_CONFIG=$DOCKER_CONFIG_DIR "$VENV_DIR/bin/python" -m executor \
        "${args[@]}") || die "the executor check failed (above)"
}

start_services() {
    systemctl restart "$SERVICE.service"
    if installed amazon-cloudwatch-agent && [ -f "$CW_AGENT_CONFIG" ]; then
        systemctl restart amazon-cloudwatch-agent.service
    fi
    step "started $SERVICE"
}

install_packages
if [ "$skip_agent" = 0 ]; then install_cloudwatch_agent; else step "CloudWatch agent skipped"; fi
install_app
install_venv
configure_docker
configure_docker_daemon
install_host_files
enable_services
if [ "$skip_pull" = 0 ]; then pull_images; else step "image pre-pull skipped"; fi
if [ "$skip_check" = 0 ]; then run_check; else step "check skipped"; fi
if [ "$start" = 1 ]; then start_services; fi
step "done"
