"""Configuration of the emulator: the Apps it knows, where it sends webhooks, its timeouts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .faults import FaultsConfig

DEFAULT_RUNNER_GROUP = {"id": 1, "name": "Default", "allows_public_repositories": False}

# The real actions/runner takes about 5 s from a ready container to "Listening for Jobs": the
# runner logs in actions-runner-controller issue #4000
# (https://github.com/actions/actions-runner-controller/issues/4000). Benchmarks run the stand-in
# with this start-up by default; tests keep 0 (`EmulatorConfig.runner_startup_s`).
REAL_RUNNER_STARTUP_S = 5.0
# Ten minutes: far beyond any real runner's start-up, so a larger value is a unit mistake.
MAX_RUNNER_STARTUP_S = 600.0


def runner_startup_seconds(value: object) -> float:
    """`value` as a runner start-up in seconds; ValueError with the reason when it is not a
    finite number in [0, MAX_RUNNER_STARTUP_S]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"seconds must be a number, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0.0 <= seconds <= MAX_RUNNER_STARTUP_S:
        raise ValueError(f"seconds must be between 0 and {MAX_RUNNER_STARTUP_S:g}, not {value}")
    return seconds


class RunnerGroupConfig(BaseModel):
    """An organisation's runner group. GitHub's Default group (id 1) refuses public repos."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(gt=0)
    name: str
    allows_public_repositories: bool = False


class InstallationConfig(BaseModel):
    """One installation of an App on an account (organisation or user)."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(gt=0)
    account: str = Field(min_length=1, description="login of the org or user")
    account_type: Literal["Organization", "User"] = "Organization"
    # None = "all repositories" of the account; a list = "selected" repositories (names or
    # owner/name).
    repositories: list[str] | None = None
    runner_groups: list[RunnerGroupConfig] = Field(
        default_factory=lambda: [RunnerGroupConfig(**DEFAULT_RUNNER_GROUP)]
    )

    @field_validator("repositories")
    @classmethod
    def _qualify(cls, repos: list[str] | None, info) -> list[str] | None:
        if repos is None:
            return None
        account = info.data.get("account", "")
        return [r if "/" in r else f"{account}/{r}" for r in repos]

    def covers(self, full_name: str) -> bool:
        owner = full_name.split("/", 1)[0]
        if owner.lower() != self.account.lower():
            return False
        if self.repositories is None:
            return True
        return full_name.lower() in {r.lower() for r in self.repositories}


class AppConfig(BaseModel):
    """A GitHub App: its id, the public half of its key, where it is installed."""

    model_config = ConfigDict(extra="forbid")

    app_id: int = Field(gt=0)
    slug: str = "runnerhub"
    client_id: str | None = None
    public_key_pem: str | None = None
    public_key_file: str | None = None
    installations: list[InstallationConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _load_key(self) -> AppConfig:
        if self.public_key_pem is None and self.public_key_file is not None:
            self.public_key_pem = Path(self.public_key_file).read_text()
        if not self.public_key_pem:
            raise ValueError(f"app {self.app_id}: public_key_pem or public_key_file is required")
        return self


class EmulatorConfig(BaseModel):
    """Everything the emulator needs; all fields have test-friendly defaults except the Apps."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    # GitHub Enterprise Server serves its REST API under /api/v3.
    api_prefix: str = ""
    ghes_version: str = "3.14.0"
    apps: list[AppConfig] = Field(default_factory=list)

    webhook_url: str | None = None
    # Several receivers: deliveries go to each in turn (`webhook_url` is then ignored).
    webhook_urls: list[str] = Field(default_factory=list)
    webhook_secret: str = ""
    hook_id: int = 424242
    webhook_timeout_s: float = Field(10.0, gt=0, description="GitHub gives a receiver 10 s")
    sender_threads: int = Field(8, ge=1, le=256)

    # The URL baked into JIT configs; a runner needs nothing else. Default: base_url.
    runner_url: str | None = None
    poll_timeout_s: float = Field(30.0, gt=0, le=120)
    # An offered job the runner does not acquire within this time goes back to the queue.
    acquire_timeout_s: float = Field(10.0, gt=0)
    # A busy runner silent for this long is lost: its job fails and the runner is removed.
    lost_runner_timeout_s: float = Field(30.0, gt=0)
    # An idle runner not polling for this long is reported offline.
    runner_offline_after_s: float = Field(60.0, gt=0)
    # The stand-in runner's start-up: written into each JIT config issued from then on; the
    # stand-in sleeps that long before it registers (see REAL_RUNNER_STARTUP_S).
    runner_startup_s: float = 0.0

    installation_token_ttl_s: int = Field(3600, gt=0)
    # A workflow-run search (`status=`, `created=`) reaches only its first N runs; GitHub's N
    # is 1,000 (smaller here makes the cap cheap to test).
    runs_search_cap: int = Field(1000, ge=1)
    rate_limit_installation: int = 5000
    rate_limit_app: int = 5000
    rate_limit_unauthenticated: int = 60
    # Lost/duplicated/reordered deliveries, REST 5xx, enforced rate limits; all off by default.
    # A workload's own `faults` replaces this when it is loaded.
    faults: FaultsConfig = Field(default_factory=FaultsConfig)

    @field_validator("api_prefix")
    @classmethod
    def _normalise_prefix(cls, prefix: str) -> str:
        prefix = prefix.strip().rstrip("/")
        if prefix and not prefix.startswith("/"):
            prefix = "/" + prefix
        return prefix

    @field_validator("runner_startup_s", mode="before")
    @classmethod
    def _startup(cls, value: object) -> float:
        # The same rule as the control endpoint's (pydantic alone would take `true` as 1 s).
        return runner_startup_seconds(value)

    @property
    def is_ghes(self) -> bool:
        return bool(self.api_prefix)

    @property
    def heartbeat_interval_s(self) -> float:
        # Three heartbeats fit in the lost-runner timeout, so one late packet never kills a job.
        return max(0.05, min(5.0, self.lost_runner_timeout_s / 3))


def load_apps_file(path: str | Path) -> list[AppConfig]:
    """Read an apps file: `{"apps": [AppConfig, ...]}` (or a bare list)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("apps", [])
    base = Path(path).resolve().parent
    apps = []
    for raw in data:
        key_file = raw.get("public_key_file")
        if key_file and not Path(key_file).is_absolute():
            raw = {**raw, "public_key_file": str(base / key_file)}
        apps.append(AppConfig.model_validate(raw))
    return apps
