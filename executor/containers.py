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
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from chalicelib.errors import RunnerHubError

JITCONFIG_TARGET = "/run/runnerhub/jitconfig"
LABEL_PREFIX = "runnerhub."
MANAGED_LABEL = "runnerhub.managed"


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

    @property
    def labels(self) -> dict[str, str]:
        return {
            MANAGED_LABEL: "true",
            f"{LABEL_PREFIX}runner": self.name,
            f"{LABEL_PREFIX}pool": self.pool,
            f"{LABEL_PREFIX}job": str(self.job_id),
            f"{LABEL_PREFIX}generation": str(self.generation),
            f"{LABEL_PREFIX}host": self.host_id,
        }


@dataclass(frozen=True)
class RunnerContainer:
    name: str
    container_id: str
    status: str  # created, running, exited, dead, ...
    exit_code: int | None
    labels: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status in ("exited", "dead")


class RunnerContainers:
    def __init__(
        self,
        client: Any,
        jitconfig_dir: Path,
        network: str,
        runner_uid: int = 1001,
        no_new_privileges: bool = True,
    ) -> None:
        self._client = client
        self._dir = jitconfig_dir
        self._network = network
        self._uid = runner_uid
        self._no_new_privileges = no_new_privileges

    def prepare(self) -> None:
        """Create the JIT config directory (0700) and the runners' bridge network if needed."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._network in ("host", "bridge", "none"):
            return
        import docker.errors

        try:
            self._client.networks.get(self._network)
        except docker.errors.NotFound:
            self._client.networks.create(
                self._network, driver="bridge", labels={MANAGED_LABEL: "true"}
            )

    def jitconfig_path(self, name: str) -> Path:
        return self._dir / f"{name}.jitconfig"

    def start(self, spec: RunnerSpec, jit_config: SecretStr) -> str:
        import docker.errors
        from docker.types import Mount

        path = self.jitconfig_path(spec.name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, jit_config.get_secret_value().encode())
        finally:
            os.close(fd)
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
        return container.id

    def managed(self, host_id: str) -> list[RunnerContainer]:
        containers = self._client.containers.list(
            all=True, filters={"label": [f"{MANAGED_LABEL}=true", f"{LABEL_PREFIX}host={host_id}"]}
        )
        found = []
        for container in containers:
            state = container.attrs.get("State", {})
            found.append(
                RunnerContainer(
                    name=container.name,
                    container_id=container.id,
                    status=container.status,
                    exit_code=state.get("ExitCode") if container.status in ("exited", "dead")
                    else None,
                    labels=dict(container.labels),
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
