"""Runner pools: the one configuration file, and the routing rule that maps a job to a pool.

Routing (DESIGN.md): a pool serves a job when the pool's labels are a superset of the job's
labels (case-insensitive) and the pool's scope covers the job's repository. A job with no labels
is not ours. Among matches the fewest extra labels wins, then the pool name. Public repositories
are refused unless the pool opts in (a fork's pull request could run code on the hosts).

Warm runners: each pool keeps `warm_runners` registered, idle runners, or the count of the first
`warm_schedule` window (in file order) that contains the time of day in `warm_timezone`
(`warm_target`). `python -m chalicelib.pools check FILE` reports pools whose labels cover
another's (chalicelib/pool_overlap.py).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# GitHub allows 1-100 labels on a runner (generate-jitconfig).
MAX_RUNNER_LABELS = 100
POOL_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
DEFAULT_POOLS_FILE = Path(__file__).parent / "config" / "pools.toml"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
# A warm runner idle longer than its limit is retired and replaced: a registered runner that sits
# idle for hours risks its session with GitHub going stale, and a job would then wait on it.
WARM_IDLE_LIMIT_S = (5.0, 86400.0)  # seconds: short limits are for tests
_CLOCK = re.compile(r"^(?:([01][0-9]|2[0-3]):([0-5][0-9])|(24):(00))$")


def _clock_s(value: str) -> int:
    """Seconds since midnight of an "HH:MM" already checked against _CLOCK."""
    hours, minutes = value.split(":")
    return int(hours) * 3600 + int(minutes) * 60


def _zone(name: str) -> tzinfo:
    """The time zone named `name`. UTC needs no tz database (a Lambda image may lack one)."""
    if name.upper() == "UTC":
        return UTC
    return ZoneInfo(name)


class WarmWindow(BaseModel):
    """A time-of-day window in which a pool keeps `warm_runners` warm instead of its base count.

    Half-open [start, end) in the pool's `warm_timezone` wall-clock time, on the given days; no
    wrap past midnight (two windows instead). Like terraform-aws-github-runner's
    `idle_config` schedules, without cron syntax.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    days: tuple[str, ...] = Field(default=WEEKDAYS, min_length=1)
    start: str
    end: str
    warm_runners: int = Field(ge=0)

    @field_validator("days")
    @classmethod
    def _known_days(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        days = tuple(dict.fromkeys(day.strip().lower() for day in value))
        unknown = [day for day in days if day not in WEEKDAYS]
        if unknown:
            raise ValueError(f"unknown day {unknown[0]!r}: use {', '.join(WEEKDAYS)}")
        return days

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not _CLOCK.match(value):
            raise ValueError(f"time {value!r} is not HH:MM (00:00 to 24:00)")
        return value

    @model_validator(mode="after")
    def _start_before_end(self) -> WarmWindow:
        if self.start == "24:00":
            raise ValueError("a window cannot start at 24:00; use 00:00 of the next day")
        if _clock_s(self.start) >= _clock_s(self.end):
            raise ValueError(
                f"window {self.start}-{self.end}: start must be before end; a window cannot "
                f"wrap past midnight, split it into two ({self.start}-24:00 on one day and "
                f"00:00-{self.end} on the next)")
        return self

    def contains(self, local: datetime) -> bool:
        """Whether wall-clock time `local` (already in the pool's zone) is inside the window."""
        if WEEKDAYS[local.weekday()] not in self.days:
            return False
        second = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        return _clock_s(self.start) <= second < _clock_s(self.end)

    def describe(self) -> str:
        return f"{','.join(self.days)} {self.start}-{self.end}"


class PoolScope(BaseModel):
    """Which repositories a pool serves: every repository of `owner`, or only `repositories`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str = Field(min_length=1, description="organisation or user login")
    repositories: tuple[str, ...] = Field(
        default=(), description="repository names under owner; empty means all of them"
    )

    @field_validator("owner")
    @classmethod
    def _lower_owner(cls, value: str) -> str:
        return value.lower()

    @field_validator("repositories")
    @classmethod
    def _lower_repositories(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for name in value:
            if "/" in name:
                raise ValueError(f"repository {name!r}: give the name only, the owner is in scope")
            names.append(name.lower())
        return tuple(names)

    def covers(self, owner: str, repository: str) -> bool:
        if owner.lower() != self.owner:
            return False
        return not self.repositories or repository.lower() in self.repositories


class Pool(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=POOL_NAME_PATTERN)
    labels: tuple[str, ...] = Field(min_length=1, max_length=MAX_RUNNER_LABELS)
    scope: PoolScope
    runner_group_id: int = Field(default=1, ge=1)
    image: str = Field(min_length=1)
    cpus: float = Field(default=2.0, gt=0, le=192)
    memory_mb: int = Field(default=4096, ge=64)
    pids_limit: int = Field(default=4096, ge=16)
    max_runners: int = Field(default=10, ge=1)
    # GPUs each runner needs; the infra puts such a pool on an instance type that has them
    # (infra/runnerhub_infra/pool_checks.py).
    gpus: int = Field(default=0, ge=0, le=8)
    # Warm runners kept registered and idle outside any warm_schedule window (see warm_target).
    warm_runners: int = Field(default=0, ge=0)
    warm_idle_limit_s: float = Field(default=1800.0, ge=WARM_IDLE_LIMIT_S[0],
                                     le=WARM_IDLE_LIMIT_S[1])
    warm_schedule: tuple[WarmWindow, ...] = ()
    warm_timezone: str = "UTC"
    allow_public_repos: bool = False
    # A job whose runner a Spot interruption stopped is re-run once through GitHub's API
    # (executor/lifecycle.py); the App then needs the Actions: write permission. Off: GitHub
    # fails the job and nobody re-runs it.
    rerun_on_spot_interruption: bool = False
    # Where JIT runners are registered: the organisation (runner group applies) or the job's
    # repository (for user-owned repositories, which have no organisation).
    runner_scope: Literal["org", "repo"] = "org"
    # How a job is kept from what is not its own (docs/security.md): `hardened` (its own bridge
    # network, no metadata service, no host service, no Docker socket, capabilities dropped, a
    # read-only root filesystem, limits), or `docker` (hardened, plus a Docker engine of the
    # job's own for jobs that build images).
    isolation: Literal["hardened", "docker"] = "hardened"
    # Egress allowed from a job's network: empty, the whole internet (never the metadata
    # address, the host or other jobs); else only these, each "CIDR" or "CIDR:PORT".
    egress_allow: tuple[str, ...] = ()
    # The job's writable disk (root filesystem layer and work directory), MiB; enforced where
    # the engine's storage supports a size (overlay2 on xfs with project quotas).
    disk_mb: int = Field(default=20480, ge=256)
    # What the runtime monitor does when a job's container breaks a boundary (gains
    # privileges, is exec'ed into, mounts, outlives its job, tries a blocked address):
    # `record` it (audit log, metric), or also `stop` the container at once.
    on_violation: Literal["record", "stop"] = "record"
    # A runner image the refresh pipeline built on a newer `actions/runner` and whose scan
    # passed is applied at once (the pool's image override) instead of proposed for an
    # operator's approval (chalicelib/image_refresh.py). Strictly a boolean: "yes" is refused.
    image_auto_update: bool = Field(default=False, strict=True)

    @field_validator("egress_allow")
    @classmethod
    def _egress_rules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for rule in value:
            egress_rule(rule)
        return value

    @field_validator("labels")
    @classmethod
    def _normalise_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for label in value:
            label = label.strip()
            if not label or len(label) > 256 or re.search(r"[\s,]", label):
                raise ValueError(f"invalid runner label {label!r}")
            seen[label.lower()] = None
        return tuple(seen)

    @field_validator("warm_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            _zone(value)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"unknown time zone {value!r}: give an IANA name such as "
                             "'Europe/Berlin' or 'UTC'") from exc
        return value

    @model_validator(mode="after")
    def _warm_within_max(self) -> Pool:
        if self.warm_runners > self.max_runners:
            raise ValueError(f"pool {self.name}: warm_runners exceeds max_runners")
        for number, window in enumerate(self.warm_schedule, start=1):
            if window.warm_runners > self.max_runners:
                raise ValueError(
                    f"pool {self.name}: warm_schedule window {number} ({window.describe()}) "
                    f"asks for {window.warm_runners} warm runners, above max_runners "
                    f"{self.max_runners}")
        return self

    @model_validator(mode="after")
    def _warm_repo_runners_need_one_repository(self) -> Pool:
        # A warm runner registers before any job exists, so with repository-scoped runners it
        # needs the one repository to register in.
        if warm_ever(self) > 0 and not can_warm(self):
            raise ValueError(
                f"pool {self.name}: warm runners with runner_scope = \"repo\" need a scope "
                f"naming exactly one repository (it has "
                f"{len(self.scope.repositories) or 'all'}); set warm runners to 0, use "
                f"runner_scope = \"org\", or split the pool per repository")
        return self

    @property
    def label_set(self) -> frozenset[str]:
        return frozenset(self.labels)


class PoolConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pools: tuple[Pool, ...] = Field(alias="pool", min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PoolConfig:
        names = [pool.name for pool in self.pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate pool names: {', '.join(duplicates)}")
        return self

    def by_name(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(pool.name for pool in self.pools)


def warm_target(pool: Pool, now: float) -> int:
    """Warm runners `pool` wants at epoch `now`: the count of the first window of its schedule
    (file order) that contains `now` in the pool's time zone, else its base `warm_runners`."""
    local = datetime.fromtimestamp(now, _zone(pool.warm_timezone))
    for window in pool.warm_schedule:
        if window.contains(local):
            return window.warm_runners
    return pool.warm_runners


def egress_rule(rule: str) -> tuple[ipaddress.IPv4Network, int | None]:
    """An `egress_allow` entry, "CIDR" or "CIDR:PORT", parsed; ValueError naming it."""
    cidr, sep, port = rule.strip().partition(":")
    try:
        network = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as exc:
        raise ValueError(f"egress_allow {rule!r}: {exc}") from exc
    if not sep:
        return network, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"egress_allow {rule!r}: the port must be 1-65535")
    return network, int(port)


def can_warm(pool: Pool) -> bool:
    """Whether warm runners can register for `pool`: one registers before any job exists, so
    repository-scoped runners need the pool's one repository to register in."""
    return pool.runner_scope != "repo" or len(pool.scope.repositories) == 1


def warm_ever(pool: Pool) -> int:
    """The most warm runners `pool` may ever want: its base count or any window's."""
    return max((pool.warm_runners, *(window.warm_runners for window in pool.warm_schedule)))


def load_pools(path: str | Path | None = None) -> PoolConfig:
    """Read and validate a pools file (TOML, `[[pool]]` tables). Raises ValueError on bad input."""
    path = Path(path) if path else DEFAULT_POOLS_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read pools file {path}: {exc}") from exc
    return PoolConfig.model_validate(data)


class NotRouted(StrEnum):
    """Why a job is not ours; also the metric dimension for dropped jobs."""

    NO_LABELS = "no_labels"
    NO_MATCHING_POOL = "no_matching_pool"
    PUBLIC_REPOSITORY = "public_repository"


@dataclass(frozen=True, slots=True)
class RouteDecision:
    pool: Pool | None
    reason: NotRouted | None = None

    @property
    def routed(self) -> bool:
        return self.pool is not None


def route(
    config: PoolConfig,
    labels: list[str] | tuple[str, ...],
    owner: str,
    repository: str,
    private: bool,
) -> RouteDecision:
    """Pick the pool for a job, or say why there is none. Pure."""
    wanted = frozenset(label.lower() for label in labels)
    if not wanted:
        return RouteDecision(None, NotRouted.NO_LABELS)
    matches = [
        pool
        for pool in config.pools
        if wanted <= pool.label_set and pool.scope.covers(owner, repository)
    ]
    if not matches:
        return RouteDecision(None, NotRouted.NO_MATCHING_POOL)
    if not private:
        matches = [pool for pool in matches if pool.allow_public_repos]
        if not matches:
            return RouteDecision(None, NotRouted.PUBLIC_REPOSITORY)
    best = min(matches, key=lambda pool: (len(pool.label_set - wanted), pool.name))
    return RouteDecision(best)


if __name__ == "__main__":
    # `python -m chalicelib.pools check FILE`; the logic is chalicelib/pool_overlap.py, imported
    # here only (it imports this module: a top-level import would be circular). runpy warns
    # ("found in sys.modules") if anything imports chalicelib.pools before it runs as __main__,
    # so chalicelib/__init__.py must not; tests/unit/test_pool_overlap.py checks stderr.
    import sys

    from chalicelib import pool_overlap

    sys.exit(pool_overlap.main(sys.argv[1:]))
