"""Runner containers through the Docker SDK: start one per demand, list, stop, remove.

The JIT config reaches the runner as a file on a host tmpfs, bind-mounted read-only at
/run/runnerhub/jitconfig: never as an argument, environment variable or label, so it is not in
`docker inspect` or any log. Every container and file carries the host id, so a restarted daemon
finds what a previous one left.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from chalicelib.errors import RunnerHubError

JITCONFIG_TARGET = "/run/runnerhub/jitconfig"
JITCONFIG_SUFFIX = ".jitconfig"
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


class RunnerContainers:
    def __init__(
        self,
        client: Any,
        jitconfig_dir: Path,
        network: str,
        runner_uid: int = 1001,
        no_new_privileges: bool = True,
        deployment: str = "",
    ) -> None:
        self._client = client
        self._dir = jitconfig_dir
        self._network = network
        self._uid = runner_uid
        self._no_new_privileges = no_new_privileges
        self.deployment = deployment

    def prepare(self, host_id: str | None = None) -> None:
        """Create the JIT config directory (0700) and the runners' bridge network if needed."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._network in ("host", "bridge", "none"):
            return
        import docker.errors

        try:
            self._client.networks.get(self._network)
        except docker.errors.NotFound:
            labels = {MANAGED_LABEL: "true"}
            if host_id:
                labels[HOST_LABEL] = host_id
            self._client.networks.create(self._network, driver="bridge", labels=labels)

    def release_network(self, host_id: str) -> bool:
        """Remove the runners' bridge network this host created, once no container uses it.
        True when there is none left."""
        if self._network in ("host", "bridge", "none"):
            return True
        import docker.errors

        try:
            network = self._client.networks.get(self._network)
            network.reload()
        except docker.errors.NotFound:
            return True
        if network.attrs.get("Labels", {}).get(HOST_LABEL) != host_id:
            return False  # not ours (created by hand, or by another daemon on this engine)
        if network.attrs.get("Containers"):
            return False
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()
        return True

    def remove_stray_files(self, keep: set[str]) -> list[str]:
        """Delete JIT config files of runners that have no container (a start that died half
        way); return their runner names."""
        removed = []
        for path in self._dir.glob(f"*{JITCONFIG_SUFFIX}"):
            name = path.name.removesuffix(JITCONFIG_SUFFIX)
            if name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(name)
        return removed

    def jitconfig_path(self, name: str) -> Path:
        return self._dir / f"{name}{JITCONFIG_SUFFIX}"

    def start(self, spec: RunnerSpec, jit_config: SecretStr) -> str:
        """Write the JIT config file and start the container. ContainerStartFailed when either
        fails (the file can't be written, the image is missing, the Docker engine refuses or
        can't be reached); what was made is removed as far as Docker lets."""
        import docker.errors
        import requests.exceptions
        from docker.types import Mount

        path = self.jitconfig_path(spec.name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            try:
                os.write(fd, jit_config.get_secret_value().encode())
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise ContainerStartFailed(
                f"jitconfig file: {exc.strerror or type(exc).__name__}") from exc
        with contextlib.suppress(PermissionError):
            os.chown(path, self._uid, -1)  # only root may; the runner user must read it
        try:
            container = self._client.containers.run(
                spec.image,
                detach=True,
                name=spec.name,
                labels=spec.labels,
                mounts=[Mount(JITCONFIG_TARGET, str(path), type="bind", read_only=True)],
                network_mode=self._network,
                nano_cpus=int(spec.cpus * 1e9),
                mem_limit=f"{spec.memory_mb}m",
                pids_limit=spec.pids_limit,
                security_opt=["no-new-privileges:true"] if self._no_new_privileges else None,
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

    def _remove_quietly(self, name: str) -> None:
        """`remove` while Docker may be down: the JIT config file goes whatever happens."""
        import docker.errors
        import requests.exceptions

        try:
            self.remove(name)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            with contextlib.suppress(FileNotFoundError):
                self.jitconfig_path(name).unlink()

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

    def stop(self, name: str, timeout_s: int = 10) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(name).stop(timeout=timeout_s)

    def remove(self, name: str) -> None:
        """Remove the container (if any) and its JIT config file. Idempotent."""
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(name).remove(force=True)
        with contextlib.suppress(FileNotFoundError):
            self.jitconfig_path(name).unlink()
