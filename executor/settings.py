"""The executor's configuration: one pydantic-settings model, from RUNNERHUB_* variables.

`load()` validates everything before the daemon starts; `python -m executor` turns a
ConfigurationError into a clear message and exit code 2.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from chalicelib.errors import ConfigurationError, validation_summary
from chalicelib.pools import Pool, load_pools
from chalicelib.resources import (
    DEMAND_VISIBILITY_S,
    SQS_MAX_BATCH,
    SQS_MAX_LONG_POLL_S,
)
from chalicelib.settings import EXECUTOR_DRAIN_TIMEOUT_S, GitHubAppSettings


# The base adds RUNNERHUB_SECRET_BACKEND and RUNNERHUB_VAULT_* (docs/secrets.md).
class ExecutorSettings(GitHubAppSettings):
    # Comma-separated pool names this host serves (default: every pool in the file).
    executor_pools: str = ""
    host_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    slots: int = Field(4, ge=1, le=256)

    # "host" (local stack: runners reach a loopback GitHub emulator) or a bridge network name
    # the executor creates; hosts require IMDSv2 with hop limit 1 either way.
    docker_network: str = "runnerhub"
    # Host tmpfs directory for JIT config files (bind-mounted read-only into containers).
    jitconfig_dir: Path = Path("/dev/shm/runnerhub")
    runner_uid: int = Field(1001, ge=0)
    no_new_privileges: bool = True

    poll_wait_s: int = Field(SQS_MAX_LONG_POLL_S, ge=0, le=SQS_MAX_LONG_POLL_S)
    visibility_s: int = Field(DEMAND_VISIBILITY_S, ge=10, le=12 * 3600)
    lease_s: float = Field(120.0, ge=5)
    tick_s: float = Field(1.0, gt=0, le=30)
    idle_timeout_s: float = Field(300.0, gt=0)
    start_backoff_s: float = Field(5.0, ge=0)
    max_start_backoff_s: float = Field(300.0, ge=0)
    # After this many failed starts in a row the job is flagged (alarm); it stays open.
    max_start_failures: int = Field(3, ge=1)
    newer_schema_delay_s: int = Field(60, ge=0, le=900)
    # SIGTERM: running jobs get this long to finish (heartbeats go on); then, or at a second
    # SIGTERM, runners are deregistered and stopped. Keep systemd's TimeoutStopSec above it.
    drain_timeout_s: float = Field(EXECUTOR_DRAIN_TIMEOUT_S, ge=0)
    # The host's heartbeat record is written this often; after 3 missed beats the host is dead
    # and other executors take over its expired claims (chalicelib/hosts.py).
    heartbeat_s: float = Field(10.0, ge=0.2, le=300)
    # At start-up, a container of a previous daemon whose runner is registered but offline is
    # still adopted while younger than this (its runner may still be registering).
    adopt_grace_s: float = Field(30.0, ge=0)
    metrics_port: int = Field(9464, ge=0, le=65535)

    @field_validator("executor_pools")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(name.strip() for name in value.split(",") if name.strip())

    @property
    def deployment(self) -> str:
        """Labels this deployment's containers (executor/containers.py)."""
        return f"{self.stage}/{self.jobs_table}"

    @property
    def receive_batch(self) -> int:
        return min(SQS_MAX_BATCH, self.slots)


def load() -> tuple[ExecutorSettings, tuple[Pool, ...]]:
    """Settings and the pools this host serves; ConfigurationError on anything invalid."""
    try:
        settings = ExecutorSettings()
    except ValidationError as exc:
        raise ConfigurationError(validation_summary(exc, "settings")) from exc
    try:
        config = load_pools(settings.pools_file)
    except ValueError as exc:
        raise ConfigurationError(str(exc).splitlines()[0]) from exc
    names = settings.executor_pools.split(",") if settings.executor_pools else config.names
    unknown = [name for name in names if name not in config.names]
    if unknown:
        raise ConfigurationError(f"unknown pools {', '.join(unknown)} (file has {config.names})")
    if settings.github_app_key_file and not settings.github_app_key_file.is_file():
        raise ConfigurationError(f"GitHub App key file {settings.github_app_key_file} not found")
    return settings, tuple(config.by_name(name) for name in names)
