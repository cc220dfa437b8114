"""The executor's configuration: one pydantic-settings model, from RUNNERHUB_* variables.

`load()` validates everything before the daemon starts; `python -m executor` turns a
ConfigurationError into a clear message and exit code 2.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator

from chalicelib.errors import ConfigurationError, validation_summary
from chalicelib.pools import Pool, load_pools
from chalicelib.resources import (
    AUDIT_TABLE,
    DEMAND_VISIBILITY_S,
    HISTORY_TABLE,
    SQS_MAX_BATCH,
    SQS_MAX_LONG_POLL_S,
)
from chalicelib.settings import (
    EXECUTOR_DRAIN_TIMEOUT_S,
    EXECUTOR_LIFECYCLE_DRAIN_TIMEOUT_S,
    EXECUTOR_LIFECYCLE_HEARTBEAT_S,
    GitHubAppSettings,
)

# Auto Scaling keeps an instance in Terminating:Wait at most 48 h (or 100 x the hook's heartbeat
# timeout, whichever is smaller), however many heartbeats it gets: a longer drain is never had.
# https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_LifecycleHook.html
LIFECYCLE_HOOK_MAX_WAIT_S = 48 * 3600


# The base adds RUNNERHUB_SECRET_BACKEND and RUNNERHUB_VAULT_* (docs/secrets.md).
class ExecutorSettings(GitHubAppSettings):
    # Comma-separated pool names this host serves (default: every pool in the file).
    executor_pools: str = ""
    # Empty: `load()` resolves it, the instance id from IMDS, or (IMDS disabled) the hostname.
    # Not the hostname on EC2: it comes from the private IP, and EC2 reuses those.
    host_id: str = Field("", max_length=64)
    # IMDSv2 (executor/imds.py) at this endpoint; empty disables it (off EC2). The local stack
    # may point it at devstack/imds.py.
    imds_endpoint: str = "http://169.254.169.254"
    # Per request (connect, read); an unreachable IMDS costs about attempts x 2 x timeout.
    imds_timeout_s: float = Field(1.0, gt=0, le=10)
    imds_attempts: int = Field(3, ge=1, le=10)
    slots: int = Field(4, ge=1, le=256)
    # Warm targets follow the trainer's forecast (its `warm` per bucket, read from the history
    # table at most every `warm_forecast_refresh_s`) where it asks more than the pools file.
    warm_forecast: bool = True
    warm_forecast_refresh_s: float = Field(300.0, ge=10, le=3600)
    history_table: str = HISTORY_TABLE.default_name

    # "host" (local stack: runners reach a loopback GitHub emulator) or a bridge network name
    # the executor creates; hosts require IMDSv2 with hop limit 1 either way.
    docker_network: str = "runnerhub"
    # Host tmpfs directory for JIT config files (bind-mounted read-only into containers).
    jitconfig_dir: Path = Path("/dev/shm/runnerhub")
    runner_uid: int = Field(1001, ge=0)
    no_new_privileges: bool = True
    # Pools with `isolation = "docker"`: each job's own Docker engine runs in a sibling
    # container of this image (executor/job_engine.py; `make dind-image` builds it locally).
    job_engine_image: str = "runnerhub/dind:local"
    # Job disks (executor/disk.py): each runner's work directory is a loop-mounted ext4 file of
    # its pool's disk_mb under `job_disk_dir` (root only). Off: a tmpfs of at most half the
    # runner's memory, plus Docker's `--storage-opt size` where the engine enforces it.
    job_disks: bool = False
    job_disk_dir: Path = Path("/var/lib/runnerhub/disks")

    poll_wait_s: int = Field(SQS_MAX_LONG_POLL_S, ge=0, le=SQS_MAX_LONG_POLL_S)
    visibility_s: int = Field(DEMAND_VISIBILITY_S, ge=10, le=12 * 3600)
    lease_s: float = Field(120.0, ge=5)
    tick_s: float = Field(1.0, gt=0, le=30)
    idle_timeout_s: float = Field(300.0, gt=0)
    # A pool's warm deficit no spare runner filled for this long is filled by starting warm
    # runners (executor/warm.py): a job's own runner, starting when the job was queued, usually
    # takes the seat its warm runner left within a container start.
    warm_refill_grace_s: float = Field(3.0, ge=0, le=300)
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

    # The runtime monitor (executor/monitor.py; docs/security.md): containers' processes and
    # the firewall's counters read every `monitor_interval_s`; a busy runner's container still
    # running `outlived_job_s` after its job completed is a violation. Findings go to the
    # audit table (RUNNERHUB_AUDIT_TABLE; empty: the `runnerhub.audit` log lines only).
    monitor: bool = True
    monitor_interval_s: float = Field(2.0, ge=0.2, le=60)
    outlived_job_s: float = Field(300.0, ge=10)
    audit_table: str = AUDIT_TABLE.default_name

    # Image scanning (executor/image_scan.py; docs/security.md): a runner image from ECR whose
    # scan on push found anything at or above this severity (INFORMATIONAL, LOW, MEDIUM, HIGH,
    # CRITICAL; "none": no check) is refused: the start fails and the job is re-demanded.
    image_max_severity: str = "HIGH"
    # A scan not complete (in progress, not found, failed): refuse (the re-demand's backoff
    # waits for it) or allow the start with a warning.
    image_scan_pending: Literal["refuse", "allow"] = "refuse"
    # A complete scan's verdict is kept this long per digest (ECR re-scans are rare): a start
    # in the steady state costs no ECR call.
    image_scan_cache_s: float = Field(3600.0, ge=0, le=24 * 3600)

    # Lifecycle hooks and Spot notices (executor/lifecycle.py; docs/operations.md). IMDS is
    # read every `lifecycle_poll_s` (off with an empty `imds_endpoint`): a target lifecycle
    # state `Terminated` drains as SIGTERM does, then completes the terminating lifecycle
    # action of `lifecycle_hook_name` (RUNNERHUB_LIFECYCLE_HOOK; empty: the local fleet plays
    # the hook by watching the daemon exit, no Auto Scaling call is made) in group `asg_name`
    # (empty: looked up from the instance id). While jobs still run, the hook's timeout is
    # pushed back every `lifecycle_heartbeat_s`: keep it well below the hook's heartbeat timeout
    # (the CDK app sets ten times it), so a few failed heartbeats do not lose the hook.
    lifecycle_hook_name: str = Field("", max_length=255, validation_alias=AliasChoices(
        "RUNNERHUB_LIFECYCLE_HOOK", "lifecycle_hook_name"))
    asg_name: str = Field("", max_length=255)
    lifecycle_poll_s: float = Field(5.0, ge=0.2, le=60)
    lifecycle_heartbeat_s: float = Field(EXECUTOR_LIFECYCLE_HEARTBEAT_S, ge=1, le=3600)
    # A drain the instance's end asks for (target lifecycle state `Terminated`) lets running
    # jobs finish for up to this long; a SIGTERM's drain keeps `drain_timeout_s` (systemd
    # SIGKILLs at TimeoutStopSec). Nothing but an instance refresh or a rebalance is waiting,
    # so the default is GitHub-hosted runners' job limit (6 h): a job that ran on one fits.
    # The hook holds the instance that long only with heartbeats, and never beyond Auto
    # Scaling's own limit (LIFECYCLE_HOOK_MAX_WAIT_S, or 100 x the hook's heartbeat timeout).
    lifecycle_drain_timeout_s: float = Field(EXECUTOR_LIFECYCLE_DRAIN_TIMEOUT_S, ge=0,
                                             le=LIFECYCLE_HOOK_MAX_WAIT_S)
    # A Spot notice gives two minutes: runners still running this long before the notice's
    # time are stopped (GitHub fails their jobs at once, not after its lost-runner timeout).
    spot_stop_before_s: float = Field(30.0, ge=0, le=120)

    @field_validator("executor_pools")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(name.strip() for name in value.split(",") if name.strip())

    @field_validator("image_max_severity")
    @classmethod
    def _severity(cls, value: str) -> str:
        from executor.image_scan import parse_max_severity

        return parse_max_severity(value) or "none"

    @field_validator("imds_endpoint")
    @classmethod
    def _imds_endpoint(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") or parts.query:
            raise ValueError(f"must be http://HOST[:PORT] without a path (or empty), not {value!r}")
        return value.rstrip("/")

    @property
    def deployment(self) -> str:
        """Labels this deployment's containers (executor/containers.py)."""
        return f"{self.stage}/{self.jobs_table}"

    @property
    def receive_batch(self) -> int:
        return min(SQS_MAX_BATCH, self.slots)


def read_settings(env_file: Path | None = None) -> ExecutorSettings:
    """The settings from RUNNERHUB_* variables (and `env_file`, a systemd EnvironmentFile the
    variables override); ConfigurationError on anything invalid."""
    if env_file is not None and not env_file.is_file():
        raise ConfigurationError(f"environment file {env_file} not found")
    try:
        return ExecutorSettings(_env_file=env_file)
    except ValidationError as exc:
        raise ConfigurationError(validation_summary(exc, "settings")) from exc


def served_pools(settings: ExecutorSettings) -> tuple[Pool, ...]:
    """The pools this host serves, from the pools file; ConfigurationError on a bad file or an
    unknown pool name."""
    try:
        config = load_pools(settings.pools_file)
    except ValueError as exc:
        raise ConfigurationError(str(exc).splitlines()[0]) from exc
    names = settings.executor_pools.split(",") if settings.executor_pools else config.names
    unknown = [name for name in names if name not in config.names]
    if unknown:
        raise ConfigurationError(f"unknown pools {', '.join(unknown)} (file has {config.names})")
    return tuple(config.by_name(name) for name in names)


def resolve_host_id(settings: ExecutorSettings) -> tuple[str, str]:
    """(host id, where it came from): RUNNERHUB_HOST_ID when set, else the instance id from
    IMDS, else (IMDS disabled) the hostname. IMDS enabled but unreachable: ConfigurationError
    saying how to choose, never a guess (a hostname on EC2 would be a reused private IP)."""
    if settings.host_id:
        return settings.host_id, "RUNNERHUB_HOST_ID"
    if not settings.imds_endpoint:
        return socket.gethostname()[:64], "hostname (IMDS disabled)"
    from executor.imds import Imds, ImdsUnavailable

    try:
        with Imds(settings.imds_endpoint, timeout_s=settings.imds_timeout_s,
                  attempts=settings.imds_attempts) as imds:
            return imds.instance_id(), f"IMDS at {settings.imds_endpoint}"
    except ImdsUnavailable as exc:
        raise ConfigurationError(
            f"no host id: instance metadata unreachable ({exc}); on EC2 check the launch "
            "template's metadata options, elsewhere set RUNNERHUB_HOST_ID or an empty "
            "RUNNERHUB_IMDS_ENDPOINT (then the hostname is used)") from exc


def load(env_file: Path | None = None) -> tuple[ExecutorSettings, tuple[Pool, ...]]:
    """Settings (host id resolved) and the pools this host serves; ConfigurationError on
    anything invalid. The host id comes last: it may ask IMDS, once the rest is known good."""
    settings = read_settings(env_file)
    pools = served_pools(settings)
    if settings.github_app_key_file and not settings.github_app_key_file.is_file():
        raise ConfigurationError(f"GitHub App key file {settings.github_app_key_file} not found")
    host_id, _source = resolve_host_id(settings)
    return settings.model_copy(update={"host_id": host_id}), pools
