"""The `docker` profile: a Docker engine of the job's own, in a sibling container, never the
host's socket.

Rootless dockerd inside the job's container was the first choice and does not fit: it needs
newuidmap/newgidmap (setuid), user namespaces and a writable root, and the hardened runner has
`no-new-privileges`, no capabilities and a read-only root. So each job of a `docker` pool gets
a sibling container `rh-engine-<runner>` running `dockerd` on the job's own network, with its
own volume for /var/lib/docker (no host path is mounted), listening on tcp/2375 there; the
runner gets DOCKER_HOST=tcp://rh-engine-<runner>:2375. Both are removed with the job.

The engine carries its runner's pool, job and deployment labels (never `runnerhub.managed`: it
is not a runner), so the runtime monitor records what happens to it against the job
(executor/monitor.py). With job disks on (RUNNERHUB_JOB_DISKS), its /var/lib/docker is a job
disk of the pool's `disk_mb` (executor/disk.py) instead of an unbounded Docker volume.

dockerd needs what Docker calls `--privileged`: every capability, no seccomp or AppArmor
profile, /proc and /sys unmasked. `privileged=True` itself is not used because it asks for
every capability the kernel knows, and an engine whose bounding set lacks one (CAP_SYS_RESOURCE
on some hosts) refuses to start such a container; the sibling gets every capability Docker
and the engine's bounding set allow instead: the same power, see docs/security.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import RunnerHubError
from executor.containers import HOST_LABEL, LABEL_PREFIX, MANAGED_LABEL, ContainerStartFailed

logger = Logger(service="runnerhub-executor")

ENGINE_PORT = 2375
ENGINE_PREFIX = "rh-engine-"
# Not `runnerhub.managed`: an engine is not a runner (adoption and the monitor list runners by
# that label); its own label lets a restarted daemon find and remove leftover engines.
ENGINE_LABEL = "runnerhub.engine"
RUNNER_LABEL = f"{LABEL_PREFIX}runner"
# The capabilities Docker 20.10 accepts by name (newer ones, such as BPF, it refuses);
# intersected with the engine's bounding set (`bounding_capabilities`).
DOCKER_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
    "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
)
# Networks Docker itself owns: a job engine never joins them (anyone there could use it).
SHARED_NETWORKS = ("host", "bridge", "none", "")
DATA_ROOT = "/var/lib/docker"


def bounding_capabilities(status_path: str = "/proc/self/status") -> tuple[str, ...]:
    """The Docker capability names in this process's bounding set (the executor runs on the
    engine's host, as root, with the engine's bounding set); all of them when unreadable."""
    try:
        with open(status_path) as status:
            line = next(line for line in status if line.startswith("CapBnd:"))
        mask = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return DOCKER_CAPABILITIES
    # Bit numbers from linux/capability.h, in the order above.
    return tuple(cap for bit, cap in enumerate(DOCKER_CAPABILITIES) if mask >> bit & 1)


def engine_name(runner: str) -> str:
    return f"{ENGINE_PREFIX}{runner}"


class JobEngines:
    """Start, find and remove per-job Docker engines (sibling containers)."""

    def __init__(self, client: Any, image: str, host_id: str, memory_mb: int = 2048,
                 pids_limit: int = 4096, ready_timeout_s: float = 30.0,
                 capabilities: tuple[str, ...] | None = None,
                 clock: Callable[[], float] = time.monotonic, disks: Any = None) -> None:
        self._client = client
        self.image = image
        self._host_id = host_id
        self._memory_mb = memory_mb
        self._pids_limit = pids_limit
        self._ready_timeout_s = ready_timeout_s
        self._caps = list(capabilities or bounding_capabilities())
        self._clock = clock
        # executor.disk.JobDisks of the engines' own (root-owned) or None: each engine's data
        # root is then a loop disk of the pool's disk_mb, not a Docker volume without a bound.
        self._disks = disks

    @property
    def capabilities(self) -> frozenset[str]:
        """What an engine is granted (Docker's names): what the runtime monitor expects it to
        hold, and no more."""
        return frozenset(self._caps)

    def labels(self, runner: str, job: Mapping[str, str] | None = None) -> dict[str, str]:
        """The engine's labels: its own, and its job's (pool, job, deployment...) from `job`
        (the runner's labels), never the runner marker."""
        extra = {key: value for key, value in (job or {}).items()
                 if key.startswith(LABEL_PREFIX) and key != MANAGED_LABEL}
        return extra | {ENGINE_LABEL: "true", HOST_LABEL: self._host_id, RUNNER_LABEL: runner}

    def start(self, runner: str, network: str | None, job: Mapping[str, str] | None = None,
              disk_mb: int | None = None) -> dict[str, str]:
        """Start the runner's engine on `network` (the job's own; None or a shared one: the
        engine gets a network of its own) and wait until it answers; the runner's environment
        (DOCKER_HOST). `job`: the runner's labels (the engine carries its pool and job);
        `disk_mb`: the size of its data root when there are job disks. ContainerStartFailed,
        with what was made removed, when it cannot."""
        import docker.errors
        import requests.exceptions

        name = engine_name(runner)
        labels = self.labels(runner, job)
        try:
            if not network or network in SHARED_NETWORKS:
                network = name
                self._client.networks.create(name, driver="bridge", labels=labels)
            data_root = self._data_root(name, labels, disk_mb)
            api = self._client.api
            host_config = api.create_host_config(
                cap_add=self._caps,
                security_opt=["seccomp=unconfined", "apparmor=unconfined"],
                binds={data_root: {"bind": DATA_ROOT, "mode": "rw"}},
                network_mode=network, mem_limit=f"{self._memory_mb}m",
                pids_limit=self._pids_limit,
            )
            # The CLI's `--security-opt systempaths=unconfined` (the SDK has no argument for
            # it): /proc and /sys unmasked, as dockerd's own containers need them.
            host_config.update(MaskedPaths=[], ReadonlyPaths=[])
            created = api.create_container(
                self.image, ["dockerd", f"--host=tcp://0.0.0.0:{ENGINE_PORT}", "--tls=false"],
                name=name, hostname=name, labels=labels, host_config=host_config,
                networking_config=api.create_networking_config(
                    {network: api.create_endpoint_config()}))
            api.start(created["Id"])
            container = self._client.containers.get(created["Id"])
            container.reload()
            address = container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        except docker.errors.ImageNotFound as exc:
            self.remove(runner)
            raise ContainerStartFailed(f"job engine image {self.image} not found") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                KeyError, RunnerHubError) as exc:
            self._remove_quietly(runner)
            raise ContainerStartFailed(f"job engine: {exc}"[:300]) from exc
        if not self._wait_ready(address):
            logs = b""
            with contextlib.suppress(docker.errors.DockerException):
                logs = container.logs(tail=5)
            self._remove_quietly(runner)
            raise ContainerStartFailed(
                f"job engine not ready in {self._ready_timeout_s:.0f}s: "
                f"{logs.decode(errors='replace').strip()}"[:300])
        # The engine's name resolves on a user-defined network; on its own network the runner
        # (then on the host's network) reaches it by address.
        host = name if network != name else str(ipaddress.ip_address(address))
        return {"DOCKER_HOST": f"tcp://{host}:{ENGINE_PORT}"}

    def _data_root(self, name: str, labels: dict[str, str], disk_mb: int | None) -> str:
        """The engine's /var/lib/docker: a job disk of `disk_mb` when there are job disks
        (JobDiskFailed when it cannot be made), else a Docker volume of its own."""
        if self._disks is not None and disk_mb:
            return str(self._disks.create(name, disk_mb))
        return self._client.volumes.create(name, labels=labels).name

    def _wait_ready(self, address: str) -> bool:
        """Poll the engine's /_ping from the host until it answers OK, at most
        `ready_timeout_s` (dockerd takes 1-3 s)."""
        deadline = self._clock() + self._ready_timeout_s
        url = f"http://{address}:{ENGINE_PORT}/_ping"
        while self._clock() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def remove(self, runner: str) -> None:
        """Remove the runner's engine, its volume (the images it built) and its own network,
        if any. Idempotent."""
        import docker.errors

        name = engine_name(runner)
        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(name).remove(force=True, v=True)
        with contextlib.suppress(docker.errors.NotFound):
            self._client.volumes.get(name).remove(force=True)
        if self._disks is not None:  # after its container: nothing holds it any more
            self._disks.remove(name)
        with contextlib.suppress(docker.errors.NotFound):
            network = self._client.networks.get(name)
            if network.attrs.get("Labels", {}).get(ENGINE_LABEL) == "true":
                network.remove()

    def _remove_quietly(self, runner: str) -> None:
        import docker.errors
        import requests.exceptions

        try:
            self.remove(runner)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            logger.warning("job engine of %s not removed: %s", runner, exc)

    def runners(self) -> set[str]:
        """The runners that have an engine (container, volume or network) on this host."""
        found = set()
        selector = {"label": [f"{ENGINE_LABEL}=true", f"{HOST_LABEL}={self._host_id}"]}
        for item in self._client.api.containers(all=True, filters=selector):
            found.add((item.get("Labels") or {}).get(RUNNER_LABEL, ""))
        for volume in self._client.volumes.list(filters=selector):
            found.add((volume.attrs.get("Labels") or {}).get(RUNNER_LABEL, ""))
        for network in self._client.networks.list(filters=selector):
            found.add((network.attrs.get("Labels") or {}).get(RUNNER_LABEL, ""))
        if self._disks is not None:
            found |= {disk.removeprefix(ENGINE_PREFIX) for disk in self._disks.names()
                      if disk.startswith(ENGINE_PREFIX)}
        found.discard("")
        return found

    def remove_leftovers(self, keep: set[str]) -> list[str]:
        """Remove the engines of runners not in `keep` (a restarted daemon's clean-up)."""
        gone = sorted(self.runners() - keep)
        for runner in gone:
            self._remove_quietly(runner)
        return gone
