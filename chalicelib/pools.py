"""Runner pools: the one configuration file, and the routing rule that maps a job to a pool.

Routing (DESIGN.md): a pool serves a job when the pool's labels are a superset of the job's
labels (case-insensitive) and the pool's scope covers the job's repository. A job with no labels
is not ours. Among matches the fewest extra labels wins, then the pool name. Public repositories
are refused unless the pool opts in (a fork's pull request could run code on the hosts).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# GitHub allows 1-100 labels on a runner (generate-jitconfig).
MAX_RUNNER_LABELS = 100
POOL_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
DEFAULT_POOLS_FILE = Path(__file__).parent / "config" / "pools.toml"


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
    warm_runners: int = Field(default=0, ge=0)
    allow_public_repos: bool = False
    # A job whose runner a Spot interruption stopped is re-run once through GitHub's API
    # (executor/lifecycle.py); the App then needs the Actions: write permission. Off: GitHub
    # fails the job and nobody re-runs it.
    rerun_on_spot_interruption: bool = False
    # Where JIT runners are registered: the organisation (runner group applies) or the job's
    # repository (for user-owned repositories, which have no organisation).
    runner_scope: Literal["org", "repo"] = "org"

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

    @model_validator(mode="after")
    def _warm_within_max(self) -> Pool:
        if self.warm_runners > self.max_runners:
            raise ValueError(f"pool {self.name}: warm_runners exceeds max_runners")
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
