"""What a deployed stage refuses in a pools file, checked before anything is synthesized.

Pure functions over the pools model and the stage settings, so every refusal is unit-tested by
name (tests/infra/test_pool_checks.py). `check_deployable` returns every problem at once;
`require_deployable` raises them as one `PoolsRefused` that names the file and the stage.

- Images: by digest only, from an ECR registry in the stage's region (its account when the stage
  names one), in a repository the runnerhub-images stack creates (`runnerhub/...`). A tag, even
  next to a digest, can be moved or rebuilt; a digest is the image that was scanned.
- Scope: never the local demo's owner.
- Capacity: slots x the pool's runner size fits every instance type of the pool's mix (a table
  of the types the app allows; slots default to what fits the smallest), a pool that needs GPUs
  runs only on types that have them, and the hosts reach max_runners.
- Spot: at least two instance types to choose capacity from, an on-demand base within the
  group's maximum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from chalicelib.pools import Pool, PoolConfig
from runnerhub_infra.stages import HostSettings, StageSettings

# The owner the local demo and the emulator use (chalicelib/config/pools.toml).
DEMO_OWNERS = frozenset({"runnerhub-demo"})
# Every runner image repository is created by the runnerhub-images stack under this namespace.
REPOSITORY_NAMESPACE = "runnerhub/"
# <registry>/<repository>@sha256:<64 hex>: nothing else (no tag, no `latest`).
_DIGEST_REFERENCE = re.compile(
    r"^(?P<registry>[^/]+)/(?P<repository>[a-z0-9]+(?:[._/-][a-z0-9]+)*)@sha256:[0-9a-f]{64}$"
)
_ECR_REGISTRY = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$"
)
# Left to the host: the OS, Docker, the executor daemon and the page cache.
HOST_RESERVED_MEMORY_MIB = 1024


@dataclass(frozen=True)
class InstanceType:
    vcpus: int
    memory_mib: int
    gpus: int = 0


# The instance types a pool may run on (x86_64: the executor AMI and the runner images are
# amd64). From the EC2 instance type specifications (aws ec2 describe-instance-types). Add a
# row to allow another type.
INSTANCE_TYPES: dict[str, InstanceType] = {
    "m6i.large": InstanceType(2, 8192),
    "m6i.xlarge": InstanceType(4, 16384),
    "m6i.2xlarge": InstanceType(8, 32768),
    "m6i.4xlarge": InstanceType(16, 65536),
    "m6i.8xlarge": InstanceType(32, 131072),
    "m6a.xlarge": InstanceType(4, 16384),
    "m6a.2xlarge": InstanceType(8, 32768),
    "m7i.xlarge": InstanceType(4, 16384),
    "m7i.2xlarge": InstanceType(8, 32768),
    "m5.xlarge": InstanceType(4, 16384),
    "m5.2xlarge": InstanceType(8, 32768),
    "c6i.xlarge": InstanceType(4, 8192),
    "c6i.2xlarge": InstanceType(8, 16384),
    "c6i.4xlarge": InstanceType(16, 32768),
    "c6i.8xlarge": InstanceType(32, 65536),
    "r6i.xlarge": InstanceType(4, 32768),
    "r6i.2xlarge": InstanceType(8, 65536),
    "g4dn.xlarge": InstanceType(4, 16384, gpus=1),
    "g4dn.2xlarge": InstanceType(8, 32768, gpus=1),
    "g4dn.12xlarge": InstanceType(48, 196608, gpus=4),
    "g5.xlarge": InstanceType(4, 16384, gpus=1),
    "g5.2xlarge": InstanceType(8, 32768, gpus=1),
    "g5.12xlarge": InstanceType(48, 196608, gpus=4),
}


class PoolsRefused(ValueError):
    """A pools file that a deployed stage must not run; the message lists every problem."""

    def __init__(self, pools_file: Path, stage: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"pools file {pools_file} cannot be deployed to stage {stage}:\n{lines}")


def image_problems(pool: Pool, stage: StageSettings) -> list[str]:
    image = pool.image
    match = _DIGEST_REFERENCE.match(image)
    if not match:
        return [
            f"pool {pool.name}: image {image} is not pinned by digest; deployed stages take "
            f"<account>.dkr.ecr.<region>.amazonaws.com/runnerhub/<name>@sha256:<64 hex> only "
            f"(a tag such as :local or :latest names whatever was pushed last)"
        ]
    problems = []
    registry = _ECR_REGISTRY.match(match["registry"])
    if not registry:
        problems.append(
            f"pool {pool.name}: image {image} is not in an ECR registry "
            f"(<account>.dkr.ecr.{stage.region}.amazonaws.com)"
        )
    else:
        if registry["region"] != stage.region:
            problems.append(
                f"pool {pool.name}: image {image} is in region {registry['region']}, "
                f"the stage in {stage.region}"
            )
        if stage.account and registry["account"] != stage.account:
            problems.append(
                f"pool {pool.name}: image {image} is in account {registry['account']}, "
                f"the stage in {stage.account}"
            )
    if not match["repository"].startswith(REPOSITORY_NAMESPACE):
        problems.append(
            f"pool {pool.name}: image {image} is not in a repository the runnerhub-images stack "
            f"creates ({REPOSITORY_NAMESPACE}<name>)"
        )
    return problems


def scope_problems(pool: Pool) -> list[str]:
    if pool.scope.owner in DEMO_OWNERS:
        return [
            f"pool {pool.name}: scope owner {pool.scope.owner} is the local demo's; "
            f"name your organisation or user"
        ]
    return []


def fitting_slots(pool: Pool, kind: InstanceType) -> int:
    """How many of the pool's runners one host of this type holds (vCPU, memory less the
    host's share, GPUs)."""
    fits = [int(kind.vcpus // pool.cpus),
            (kind.memory_mib - HOST_RESERVED_MEMORY_MIB) // pool.memory_mb]
    if pool.gpus:
        fits.append(kind.gpus // pool.gpus)
    return max(0, min(fits))


def host_slots(pool: Pool, host: HostSettings) -> int:
    """Slots per host: the settings' own, else as many as fit the SMALLEST type of the mix
    (any host may be launched as that type). 0 when a type is unknown or holds no runner
    (`capacity_problems` says which)."""
    if host.slots is not None:
        return host.slots
    kinds = [INSTANCE_TYPES.get(name) for name in host.instance_types]
    if None in kinds:
        return 0
    return min(fitting_slots(pool, kind) for kind in kinds)


def max_hosts(pool: Pool, host: HostSettings) -> int:
    """The pool's group MaxSize (enough hosts for max_runners unless max_hosts is set)."""
    return host.hosts_for(pool.max_runners, max(1, host_slots(pool, host)))


def capacity_problems(pool: Pool, host: HostSettings) -> list[str]:
    unknown = [name for name in host.instance_types if name not in INSTANCE_TYPES]
    if unknown:
        return [
            f"pool {pool.name}: instance type {', '.join(unknown)} is not one the app allows "
            f"({', '.join(sorted(INSTANCE_TYPES))}; see pool_checks.INSTANCE_TYPES)"
        ]
    problems = []
    slots = host_slots(pool, host)
    if slots == 0:
        smallest = min(host.instance_types,
                       key=lambda name: fitting_slots(pool, INSTANCE_TYPES[name]))
        return [
            f"pool {pool.name}: one runner ({pool.cpus:g} vCPU, {pool.memory_mb} MiB, "
            f"{pool.gpus} GPU) does not fit {smallest}"
        ]
    # Every type of the mix must hold `slots` runners: a host may be any of them.
    for name in host.instance_types:
        problems += _type_problems(pool, slots, name, INSTANCE_TYPES[name])
    hosts = max_hosts(pool, host)
    if hosts * slots < pool.max_runners:
        problems.append(
            f"pool {pool.name}: max_hosts {hosts} x {slots} slots = {hosts * slots} runners, "
            f"under max_runners {pool.max_runners}"
        )
    if host.min_hosts > hosts:
        problems.append(
            f"pool {pool.name}: min_hosts {host.min_hosts} is above the group's maximum {hosts}"
        )
    return problems + spot_problems(pool, host, hosts)


def _type_problems(pool: Pool, slots: int, name: str, kind: InstanceType) -> list[str]:
    problems = []
    if slots * pool.cpus > kind.vcpus:
        problems.append(
            f"pool {pool.name}: {slots} slots x {pool.cpus:g} vCPU = {slots * pool.cpus:g} vCPU "
            f"exceed {name}'s {kind.vcpus}"
        )
    usable = kind.memory_mib - HOST_RESERVED_MEMORY_MIB
    if slots * pool.memory_mb > usable:
        problems.append(
            f"pool {pool.name}: {slots} slots x {pool.memory_mb} MiB = {slots * pool.memory_mb} "
            f"MiB exceed {name}'s {kind.memory_mib} MiB less "
            f"{HOST_RESERVED_MEMORY_MIB} MiB for the host"
        )
    needs_gpu = pool.gpus > 0 or "gpu" in pool.label_set
    if needs_gpu and pool.gpus == 0:
        problems.append(f"pool {pool.name}: labelled gpu but asks for no GPU (set gpus = 1)")
    if needs_gpu and kind.gpus == 0:
        problems.append(
            f"pool {pool.name}: needs a GPU, instance type {name} has none "
            f"(e.g. {', '.join(t for t, k in INSTANCE_TYPES.items() if k.gpus)})"
        )
    elif slots * pool.gpus > kind.gpus:
        problems.append(
            f"pool {pool.name}: {slots} slots x {pool.gpus} GPU exceed {name}'s {kind.gpus}"
        )
    return problems


# Capacity-optimized Spot picks the pools with the most spare capacity among the types given;
# with one type there is no choice, and an interruption wave takes the whole pool.
SPOT_MIN_TYPES = 2


def spot_problems(pool: Pool, host: HostSettings, hosts: int) -> list[str]:
    if not host.spot:
        return []
    problems = []
    if len(host.instance_types) < SPOT_MIN_TYPES:
        problems.append(
            f"pool {pool.name}: Spot with one instance type ({host.instance_type}); give at "
            f"least {SPOT_MIN_TYPES} of similar size in instance_types"
        )
    if host.on_demand_base > hosts:
        problems.append(
            f"pool {pool.name}: on_demand_base {host.on_demand_base} exceeds the group's "
            f"{hosts} hosts at most"
        )
    return problems


# IAM's limit on a role name (runnerhub-<stage>-executor-<pool> must fit).
IAM_ROLE_NAME_MAX = 64


def role_name_problems(pool: Pool, stage: StageSettings) -> list[str]:
    name = stage.role_name(f"executor-{pool.name}")
    if len(name) > IAM_ROLE_NAME_MAX:
        return [
            f"pool {pool.name}: its hosts' role name {name} is longer than IAM's "
            f"{IAM_ROLE_NAME_MAX} characters; shorten the pool or stage name"
        ]
    return []


def check_deployable(pools: PoolConfig, stage: StageSettings) -> list[str]:
    """Every reason this pools file must not run in `stage`; empty when it may."""
    problems = []
    for pool in pools.pools:
        problems += role_name_problems(pool, stage)
        problems += image_problems(pool, stage)
        problems += scope_problems(pool)
        problems += capacity_problems(pool, stage.host_settings(pool.name))
    return problems


def require_deployable(pools: PoolConfig, stage: StageSettings) -> None:
    problems = check_deployable(pools, stage)
    if problems:
        raise PoolsRefused(stage.pools_file, stage.name, problems)


def image_repositories(pools: PoolConfig) -> list[str]:
    """The ECR repository names the pools' images live in (runnerhub/<name>), sorted, unique.
    An image that is not a valid ECR digest reference has none (its pool is refused anyway)."""
    found = set()
    for pool in pools.pools:
        match = _DIGEST_REFERENCE.match(pool.image)
        if match and match["repository"].startswith(REPOSITORY_NAMESPACE):
            found.add(match["repository"])
    return sorted(found)


def registry_accounts(pools: PoolConfig) -> set[str]:
    """The accounts whose ECR the pools' images name (the stack asserts it deploys there)."""
    accounts = set()
    for pool in pools.pools:
        match = _DIGEST_REFERENCE.match(pool.image)
        registry = match and _ECR_REGISTRY.match(match["registry"])
        if registry:
            accounts.add(registry["account"])
    return accounts
