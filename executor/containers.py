"""Runner containers through the Docker SDK: start one per demand, list, stop, remove.

The JIT config reaches the runner as a file on a host tmpfs, in a directory of its own that is
bind-mounted read-only at /run/runnerhub (the file: /run/runnerhub/jitconfig): never as an
argument, environment variable or label, so it is not in `docker inspect` or any log. Once the
runner has read it the file is deleted (executor/jitwatch.py), so a job cannot read it.

Hardened networking (every `docker_network` but "host"): each runner gets a bridge network of
its own, `rh-job-<runner>`, made from Docker's address pools (daemon.json
`default-address-pools`, scripts/install-executor.sh) and firewalled (executor/firewall.py)
before the container starts; both are removed with the container. "host" (the local stack: the
stand-in runner reaches a loopback GitHub emulator) has no per-job network and no firewall.
Every container is hardened whatever the network: no capabilities, `no-new-privileges`, a
read-only root filesystem with tmpfs work directories, memory, CPU and pids limits, and never
the Docker socket.

Every container, network and file carries the host id, so a restarted daemon finds what a
previous one left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger
from pydantic import SecretStr

from chalicelib.errors import RunnerHubError
from executor.firewall import Firewall, FirewallError
from executor.jitwatch import JitReadWatch

logger = Logger(service="runnerhub-executor")

JITCONFIG_DIR_TARGET = "/run/runnerhub"
JITCONFIG_FILE = "jitconfig"
JITCONFIG_TARGET = f"{JITCONFIG_DIR_TARGET}/{JITCONFIG_FILE}"
JITCONFIG_SUFFIX = ".jitconfig"  # files of executors before per-runner directories
HOST_NETWORK = "host"
JOB_NETWORK_PREFIX = "rh-job-"
DOCKER_SOCKET = "/var/run/docker.sock"
# What a job may write on its read-only root filesystem: each a tmpfs owned by the runner user.
# The real runner (runner-image/Dockerfile.actions-runner) runs jobs in /home/runner/_work and
# logs to /home/runner/_diag.
WRITABLE_DIRS = ("/tmp", "/home/runner/_work", "/home/runner/_diag")
WORK_DIR = "/home/runner/_work"  # on a job disk when there are job disks (executor/disk.py)
# Per-job networks carved from `job_subnets` (when given) have this size: a runner and, in the
# docker profile, its engine need a handful of addresses.
JOB_SUBNET_PREFIX = 28
LABEL_PREFIX = "runnerhub."
MANAGED_LABEL = "runnerhub.managed"
HOST_LABEL = "runnerhub.host"
# Which RunnerHub deployment (stage and tables) a container belongs to: a daemon adopts or
# removes only its own deployment's containers, even if another one shares the Docker engine.
DEPLOYMENT_LABEL = "runnerhub.deployment"


class ContainerStartFailed(RunnerHubError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RunnerSpec:
    name: str
    image: str
    pool: str
    job_id: int
    generation: int
    host_id: str
    cpus: float
    memory_mb: int
    pids_limit: int
    deployment: str = ""
    # The pool's egress allow-list (chalicelib/pools.py; the firewall's `allow` rules) and disk.
    egress_allow: tuple[str, ...] = ()
    disk_mb: int = 20480
    # The pool's `isolation`: "docker" starts a Docker engine of the job's own beside the
    # runner (executor/job_engine.py) and gives the runner DOCKER_HOST.
    isolation: str = "hardened"

    @property
    def labels(self) -> dict[str, str]:
        labels = {
            MANAGED_LABEL: "true",
            f"{LABEL_PREFIX}runner": self.name,
            f"{LABEL_PREFIX}pool": self.pool,
            f"{LABEL_PREFIX}job": str(self.job_id),
            f"{LABEL_PREFIX}generation": str(self.generation),
            HOST_LABEL: self.host_id,
        }
        if self.deployment:
            labels[DEPLOYMENT_LABEL] = self.deployment
        return labels


@dataclass(frozen=True)
class RunnerContainer:
    name: str
    container_id: str
    status: str  # created, running, exited, dead, ...
    exit_code: int | None
    labels: dict[str, str]
    started_at: float | None = None  # epoch seconds, from Docker's State.StartedAt

    @property
    def finished(self) -> bool:
        return self.status in ("exited", "dead")

    def age_s(self, now: float) -> float:
        return now - self.started_at if self.started_at else 0.0


def docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 time with nanoseconds ("2024-05-01T12:00:00.123456789Z") -> epoch."""
    if not text or text.startswith("0001-"):
        return None
    main, _, rest = text.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
    try:
        when = datetime.fromisoformat(main.removesuffix("Z") + "+00:00")
    except ValueError:
        return None
    return when.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def pool_profile(pool: Any) -> dict[str, Any]:
    """A pool's isolation fields (chalicelib/pools.py) as RunnerSpec arguments."""
    return {"isolation": pool.isolation, "egress_allow": tuple(pool.egress_allow),
            "disk_mb": pool.disk_mb}


def job_network_name(runner: str) -> str:
    """The runner's own bridge network (hardened networking)."""
    return f"{JOB_NETWORK_PREFIX}{runner}"


def tmpfs_mounts(spec: RunnerSpec, uid: int) -> dict[str, str]:
    """The writable directories of a read-only container, each a tmpfs of at most
    min(disk_mb, memory/2) MiB: tmpfs pages count against the container's memory limit, so a
    job filling them is stopped by its own limit (OOM), never the host's memory."""
    size_mb = max(16, min(spec.disk_mb, spec.memory_mb // 2))
    return {path: f"rw,nosuid,nodev,size={size_mb}m,mode=0700,uid={uid},gid={uid}"
            for path in WRITABLE_DIRS}


def hardened_options(spec: RunnerSpec, uid: int) -> dict[str, Any]:
    """The `containers.run` arguments every runner container gets. The runner runs as an
    unprivileged user (uid `uid`) and needs no capability: every one is dropped."""
    return {
        "user": f"{uid}:{uid}",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        "tmpfs": tmpfs_mounts(spec, uid),
        "nano_cpus": int(spec.cpus * 1e9),
        "mem_limit": f"{spec.memory_mb}m",
        # No swap beyond the memory limit: a memory bomb ends at the limit.
        "memswap_limit": f"{spec.memory_mb}m",
        "pids_limit": spec.pids_limit,
        "privileged": False,
    }


def assert_no_docker_socket(mounts: list[Any]) -> None:
    """Never the host's Docker socket (it is root on the host), under any path."""
    for mount in mounts:
        source = str(mount.get("Source", ""))
        if source.rstrip("/") in (DOCKER_SOCKET, "/run/docker.sock") or source in ("/", "/var",
                                                                                 "/run"):
            raise ContainerStartFailed(f"refused: a runner never mounts {source}")


class RunnerContainers:
    def __init__(
        self,
        client: Any,
        jitconfig_dir: Path,
        network: str,
        runner_uid: int = 1001,
        no_new_privileges: bool = True,
        deployment: str = "",
        engines: Any = None,
        firewall: Firewall | None = None,
        job_subnets: str | None = None,
        jit_watch: JitReadWatch | None = None,
        disk_limits: Any = None,
        job_disks: Any = None,
    ) -> None:
        self._client = client
        self._dir = jitconfig_dir
        self._network = network
        self._uid = runner_uid
        # Kept for the settings' sake; every runner container gets `no-new-privileges` now.
        self._no_new_privileges = no_new_privileges
        self.deployment = deployment
        # executor.job_engine.JobEngines: the `docker` profile's per-job engines (None: a pool
        # with `isolation = "docker"` fails to start, never falls back to the host's socket).
        self.engines = engines
        # The pool's disk_mb (executor/disk.py): `storage_opt` where the engine enforces it
        # (DiskLimits), and a job disk of that size as the work directory (JobDisks).
        self.disk_limits = disk_limits
        self.job_disks = job_disks
        # Hardened networking: a network and firewall rules per runner.
        self.hardened_network = network != HOST_NETWORK
        self.firewall = firewall if firewall or not self.hardened_network else Firewall()
        # Carve job networks from this range (tests; hosts use daemon.json's address pools).
        self._subnets = ipaddress.IPv4Network(job_subnets) if job_subnets else None
        self._subnet_lock = threading.Lock()
        self.jit_watch = jit_watch or JitReadWatch()
        self._host_id = ""

    def prepare(self, host_id: str | None = None) -> None:
        """Create the JIT config directory (0700) and, for hardened networking, the firewall's
        chain (an error is logged: every start then fails with its reason, none runs
        unfirewalled)."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._host_id = host_id or self._host_id
        if not self.hardened_network:
            return
        try:
            self.firewall.ensure_chain()
        except FirewallError as exc:
            logger.error("hardened networking unavailable, runners will not start: %s", exc)

    def _job_networks(self, host_id: str) -> list[Any]:
        """This host's (and deployment's) job networks."""
        filters = {"label": [f"{MANAGED_LABEL}=true", f"{HOST_LABEL}={host_id}"]}
        found = []
        for network in self._client.networks.list(filters=filters):
            labels = network.attrs.get("Labels") or {}
            if not network.name.startswith(JOB_NETWORK_PREFIX):
                continue
            if self.deployment and labels.get(DEPLOYMENT_LABEL, self.deployment) != (
                    self.deployment):
                continue
            found.append(network)
        return found

    def release_network(self, host_id: str) -> bool:
        """At shutdown: remove this host's job networks no container uses (with their rules).
        True when there is none left."""
        if not self.hardened_network:
            return True
        import docker.errors

        left = False
        for network in self._job_networks(host_id):
            with contextlib.suppress(docker.errors.NotFound):
                network.reload()
                if network.attrs.get("Containers"):
                    left = True
                    continue
            self._remove_network(network.name)
        return not left

    def remove_stray_files(self, keep: set[str]) -> list[str]:
        """What runners without a container left (a start that died half way, a previous
        daemon): their JIT config directories (and files of older executors), their job
        networks and firewall rules; return their runner names. The kept runners' networks get
        their rules again if they lost them (a reboot flushed iptables), and a kept JIT config
        is watched again (a runner not yet started still reads it)."""
        removed = set()
        for path in self._dir.iterdir() if self._dir.is_dir() else ():
            name = path.name.removesuffix(JITCONFIG_SUFFIX)
            if name in keep:
                if path.is_dir() and (path / JITCONFIG_FILE).exists():
                    self.jit_watch.watch(path / JITCONFIG_FILE)
                continue
            self._remove_jit(name)
            removed.add(name)
        if self.engines is not None:  # before the networks: an engine holds its job's
            removed |= set(self.engines.remove_leftovers(keep))
        if self.job_disks is not None:
            for name in self.job_disks.names() - keep:
                self.job_disks.remove(name)
                removed.add(name)
        if self.hardened_network and self._host_id:
            removed |= self._prune_networks(keep)
        return sorted(removed)

    def _prune_networks(self, keep: set[str]) -> set[str]:
        removed = set()
        for network in self._job_networks(self._host_id):
            runner = network.attrs.get("Labels", {}).get(f"{LABEL_PREFIX}runner", "")
            if runner in keep:
                try:
                    self._firewall(network)
                except FirewallError as exc:
                    logger.error("firewall rules of %s not restored: %s", network.name, exc)
                continue
            if network.attrs.get("Containers"):
                continue  # a container not managed here (an engine being removed): later
            self._remove_network(network.name)
            removed.add(runner)
        try:
            # Any network's on this engine (another deployment's too): only rules whose
            # network is gone are stale.
            existing = {network.name for network in self._client.networks.list()}
            for name in self.firewall.networks() - existing:
                if name.startswith(JOB_NETWORK_PREFIX):
                    self.firewall.remove(name)
        except FirewallError as exc:
            logger.warning("stale firewall rules not removed: %s", exc)
        return removed

    def jitconfig_dir(self, name: str) -> Path:
        return self._dir / name

    def jitconfig_path(self, name: str) -> Path:
        return self._dir / name / JITCONFIG_FILE

    def _write_jitconfig(self, name: str, jit_config: SecretStr) -> Path:
        """The runner's directory (0500, the runner user's) holding the file (0400)."""
        directory = self.jitconfig_dir(name)
        path = directory / JITCONFIG_FILE
        try:
            directory.mkdir(mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            try:
                os.write(fd, jit_config.get_secret_value().encode())
            finally:
                os.close(fd)
        except OSError as exc:
            self._remove_jit(name)
            raise ContainerStartFailed(
                f"jitconfig file: {exc.strerror or type(exc).__name__}") from exc
        with contextlib.suppress(PermissionError):
            # Only root may; the runner user must read the file and list the directory.
            os.chown(path, self._uid, -1)
            os.chown(directory, self._uid, -1)
        with contextlib.suppress(OSError):
            directory.chmod(0o500)
        return directory

    def _create_network(self, spec: RunnerSpec) -> str:
        """The runner's bridge network with its firewall rules. ContainerStartFailed when
        either fails (nothing left behind)."""
        import docker.errors
        from docker.types import IPAMConfig, IPAMPool

        name = job_network_name(spec.name)
        labels = {MANAGED_LABEL: "true", f"{LABEL_PREFIX}runner": spec.name,
                  HOST_LABEL: spec.host_id, f"{LABEL_PREFIX}pool": spec.pool,
                  # The rules are made again from the network alone (adoption).
                  f"{LABEL_PREFIX}egress": ",".join(spec.egress_allow)}
        if spec.deployment:
            labels[DEPLOYMENT_LABEL] = spec.deployment
        try:
            with self._subnet_lock:
                ipam = None
                if self._subnets is not None:
                    ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=self._free_subnet())])
                network = self._client.networks.create(
                    name, driver="bridge", labels=labels, ipam=ipam, check_duplicate=True)
            network.reload()
            self._firewall(network)
        except (docker.errors.APIError, ValueError) as exc:
            self._remove_network(name)
            raise ContainerStartFailed(f"job network: {exc}"[:300]) from exc
        except FirewallError as exc:
            self._remove_network(name)
            raise ContainerStartFailed(f"firewall: {exc}"[:300]) from exc
        return name

    def _free_subnet(self) -> str:
        used = []
        for network in self._client.networks.list():
            for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(KeyError, ValueError):
                    used.append(ipaddress.ip_network(config["Subnet"]))
        for candidate in self._subnets.subnets(new_prefix=JOB_SUBNET_PREFIX):
            if not any(candidate.overlaps(other) for other in used
                       if other.version == candidate.version):
                return str(candidate)
        raise ValueError(f"no free /{JOB_SUBNET_PREFIX} left in {self._subnets}")

    def _firewall(self, network: Any) -> None:
        """Apply the network's rules (idempotent), from its own id and labels."""
        options = network.attrs.get("Options") or {}
        bridge = options.get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"
        egress = network.attrs.get("Labels", {}).get(f"{LABEL_PREFIX}egress", "")
        try:
            self.firewall.apply(network.name, bridge,
                                tuple(rule for rule in egress.split(",") if rule))
        except ValueError as exc:
            raise FirewallError(str(exc)) from exc

    def _remove_network(self, name: str) -> None:
        """The job network (once its containers are gone) and its rules. Idempotent."""
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self._client.networks.get(name).remove()
        try:
            self.firewall.remove(name)
        except FirewallError as exc:
            # Harmless (the bridge is gone with the network); removed at the next start-up.
            logger.warning("firewall rules of %s not removed: %s", name, exc)

    def start(self, spec: RunnerSpec, jit_config: SecretStr) -> str:
        """Write the JIT config file, make the runner's network and firewall rules (hardened
        networking) and start the hardened container. ContainerStartFailed when any of it
        fails (the file can't be written, the firewall can't be set, the image is missing, the
        Docker engine refuses or can't be reached); what was made is removed as far as Docker
        lets."""
        import docker.errors
        import requests.exceptions
        from docker.types import Mount

        directory = self._write_jitconfig(spec.name, jit_config)
        mounts = [Mount(JITCONFIG_DIR_TARGET, str(directory), type="bind", read_only=True)]
        assert_no_docker_socket([{"Source": m["Source"]} for m in mounts])
        network = self._network
        if self.hardened_network:
            try:
                network = self._create_network(spec)
            except ContainerStartFailed:
                self._remove_jit(spec.name)
                raise
        environment = None
        if spec.isolation == "docker":
            if self.engines is None:
                self.remove(spec.name)
                raise ContainerStartFailed("isolation docker: no job engine configured")
            try:
                environment = self.engines.start(spec.name, network, spec.labels, spec.disk_mb)
            except ContainerStartFailed:
                self.remove(spec.name)
                raise
        options = hardened_options(spec, self._uid)
        if self.disk_limits is not None and (opt := self.disk_limits.storage_opt(spec.disk_mb)):
            options["storage_opt"] = opt
        if self.job_disks is not None:
            try:
                disk = self.job_disks.create(spec.name, spec.disk_mb)
            except RunnerHubError as exc:
                self.remove(spec.name)
                raise ContainerStartFailed(str(exc)) from exc
            options["tmpfs"].pop(WORK_DIR, None)  # the job disk instead of a tmpfs
            mounts.append(Mount(WORK_DIR, str(disk), type="bind"))
        # Watched before the runner can read it: no read is missed.
        self.jit_watch.watch(directory / JITCONFIG_FILE)
        try:
            container = self._client.containers.run(
                spec.image,
                detach=True,
                name=spec.name,
                labels=spec.labels,
                mounts=mounts,
                network=network if self.hardened_network else None,
                network_mode=None if self.hardened_network else network,
                environment=environment,
                **options,
            )
        except docker.errors.ImageNotFound as exc:
            self.remove(spec.name)
            raise ContainerStartFailed(f"image {spec.image} not found") from exc
        except docker.errors.APIError as exc:
            self.remove(spec.name)
            raise ContainerStartFailed(f"docker: {exc.explanation or exc}"[:300]) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            # The engine can't be reached (or the call timed out): the container may or may
            # not exist. Remove what we can; the monitor and adoption find any leftover.
            self._remove_quietly(spec.name)
            raise ContainerStartFailed(
                f"docker unreachable: {type(exc).__name__}: {exc}"[:300]) from exc
        return container.id

    def _remove_jit(self, name: str) -> None:
        path = self._dir / name
        self.jit_watch.forget(path / JITCONFIG_FILE)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self._dir / f"{name}{JITCONFIG_SUFFIX}").unlink()

    def _remove_quietly(self, name: str) -> None:
        """`remove` while Docker may be down: the JIT config file goes whatever happens."""
        import docker.errors
        import requests.exceptions

        try:
            self.remove(name)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            self._remove_jit(name)

    def managed(self, host_id: str) -> list[RunnerContainer]:
        """This host's runner containers (of this deployment; containers without the label,
        from an older executor, count as this deployment's). One that disappears while being
        listed is skipped."""
        import docker.errors

        listed = self._client.api.containers(
            all=True, filters={"label": [f"{MANAGED_LABEL}=true", f"{HOST_LABEL}={host_id}"]}
        )
        found = []
        for summary in listed:
            labels = summary.get("Labels") or {}
            if self.deployment and labels.get(DEPLOYMENT_LABEL, self.deployment) != (
                    self.deployment):
                continue
            try:
                attrs = self._client.api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue  # removed meanwhile
            state = attrs.get("State", {})
            status = state.get("Status", summary.get("State", ""))
            found.append(
                RunnerContainer(
                    name=attrs.get("Name", "").lstrip("/"),
                    container_id=attrs["Id"],
                    status=status,
                    exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
                    labels=dict(attrs.get("Config", {}).get("Labels") or labels),
                    started_at=docker_time(state.get("StartedAt")),
                )
            )
        return found

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last `lines` of a container's output ("" when it is gone or Docker fails): why
        a runner exited before a job (executor/runner_version.py). Runner logs carry no
        secret: the JIT config is read from a file and masked by the runner."""
        import docker.errors
        import requests.exceptions

        try:
            raw = self._client.api.logs(name, stdout=True, stderr=True, tail=lines)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return ""
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    def stop(self, name: str, timeout_s: int = 10) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(name).stop(timeout=timeout_s)

    def remove(self, name: str) -> None:
        """Remove the container (if any), its job network and firewall rules and its JIT config
        directory. Idempotent."""
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(name).remove(force=True)
        if self.engines is not None:
            self.engines.remove(name)  # the job's own Docker engine, if it had one
        if self.job_disks is not None:
            self.job_disks.remove(name)
        self._remove_jit(name)
        if self.hardened_network:
            self._remove_network(job_network_name(name))
