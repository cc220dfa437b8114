"""Queued jobs GitHub never announced, decided: the REST budget of a sweep, the order of the
repositories, and which listed jobs to take in. Pure: the reconciler sweeps (`reconciler.sweep`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from chalicelib.pools import PoolConfig, route
from chalicelib.reconciler.policy import DEFAULT_POLICY, Policy

# GitHub's primary REST limit of an installation token when it has not reported one yet (the
# documented minimum: https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api).
GITHUB_INSTALLATION_HOURLY_LIMIT = 5000
DISCOVERY_WINDOW_S = 3600.0
# A sweep remembers at most this many repositories (names) in the state item.
DISCOVERY_MAX_REPOSITORIES = 5000


@dataclass(frozen=True)
class DiscoveryState:
    """One repository owner's discovery: the repositories this sweep has still to check (most
    recently active first), when the sweep began, when the last one finished, and the REST calls
    spent per run within the last hour ((time, calls), oldest first)."""

    sweep: tuple[str, ...] = ()
    sweep_started_at: float = 0.0
    last_sweep_s: float | None = None
    spent: tuple[tuple[float, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": list(self.sweep), "started": self.sweep_started_at,
                "last_sweep_s": self.last_sweep_s, "spent": [list(item) for item in self.spent]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscoveryState:
        last = data.get("last_sweep_s")
        return cls(
            sweep=tuple(str(name) for name in data.get("sweep", [])),
            sweep_started_at=float(data.get("started", 0.0)),
            last_sweep_s=float(last) if last is not None else None,
            spent=tuple((float(at), int(calls)) for at, calls in data.get("spent", [])),
        )

    def spend(self, now: float, calls: int) -> DiscoveryState:
        """Record `calls` made now; forget what is older than the window."""
        kept = tuple(item for item in self.spent if item[0] > now - DISCOVERY_WINDOW_S)
        return replace(self, spent=(*kept, (now, calls)) if calls else kept)


@dataclass(frozen=True)
class DiscoveryBudget:
    hourly: int  # calls allowed in any hour: discovery_share of the installation's limit
    used: int  # calls made in the last hour
    this_run: int  # calls this run may make (spread over the hour)
    whole: int  # calls this run may make when a sweep must list the repositories first

    @property
    def left(self) -> int:
        return max(0, self.hourly - self.used)


def discovery_budget(
    state: DiscoveryState, limit: int | None, now: float, policy: Policy = DEFAULT_POLICY
) -> DiscoveryBudget:
    """How many REST calls discovery may make now for one installation: at most
    `discovery_share` of its hourly limit (GitHub's `x-ratelimit-limit`; the documented minimum
    when none was seen) in any hour, and 1/`discovery_spread` of that per run."""
    hourly = int(policy.discovery_share * (limit or GITHUB_INSTALLATION_HOURLY_LIMIT))
    used = sum(calls for at, calls in state.spent if at > now - DISCOVERY_WINDOW_S)
    left = max(0, hourly - used)
    per_run = max(1, math.ceil(hourly / max(1, policy.discovery_spread))) if hourly else 0
    return DiscoveryBudget(hourly, used, min(left, per_run), left)


def _activity(repository: Mapping[str, Any]) -> float:
    latest = 0.0
    for key in ("pushed_at", "updated_at"):
        value = repository.get(key)
        if not value:
            continue
        try:
            stamp = datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        latest = max(latest, stamp)
    return latest


def sweep_order(repositories: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The repositories' full names, most recently active first (the later of `pushed_at` and
    `updated_at`), then by name; archived and disabled ones run no workflows and are left out.
    At most DISCOVERY_MAX_REPOSITORIES (the state item's bound): the least active fall out."""
    usable = [
        repo for repo in repositories
        if repo.get("full_name") and not repo.get("archived") and not repo.get("disabled")
    ]
    ordered = sorted(usable, key=lambda repo: (-_activity(repo), str(repo["full_name"]).lower()))
    names = list(dict.fromkeys(str(repo["full_name"]) for repo in ordered))
    return tuple(names[:DISCOVERY_MAX_REPOSITORIES])


@dataclass(frozen=True)
class Discovered:
    """A queued job found through the REST API, and whether to take it in."""

    job_id: int
    pool: str | None
    reason: str  # "unannounced" (take it in), "known", "not_queued", or why it is not routed


def classify_discovered(
    github_job: Mapping[str, Any],
    repository: Mapping[str, Any],
    pools: PoolConfig,
    known: bool,
) -> Discovered:
    """A job from a run's job list is taken in, as its `queued` webhook would have been, when
    GitHub has it queued, it routes to a pool, and RunnerHub has no record of it (`known`)."""
    job_id = int(github_job["id"])
    if github_job.get("status") != "queued":
        return Discovered(job_id, None, "not_queued")
    owner = str((repository.get("owner") or {}).get("login") or "")
    decision = route(pools, list(github_job.get("labels") or ()), owner,
                     str(repository.get("name") or ""), bool(repository.get("private")))
    if not decision.routed:
        return Discovered(job_id, None, decision.reason.value)
    if known:
        return Discovered(job_id, decision.pool.name, "known")
    return Discovered(job_id, decision.pool.name, "unannounced")


def discovery_owners(pools: PoolConfig) -> tuple[tuple[str, str | None], ...]:
    """The accounts whose repositories are swept: each pool owner once, with a repository of
    it when the pools name one (to find a user account's installation)."""
    owners: dict[str, str | None] = {}
    for pool in pools.pools:
        repo = pool.scope.repositories[0] if pool.scope.repositories else None
        if owners.get(pool.scope.owner) is None:
            owners[pool.scope.owner] = repo
    return tuple(owners.items())

