"""Orphan runners, decided: which of RunnerHub's runners to delete from GitHub. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chalicelib.github import RunnerScope
from chalicelib.pools import PoolConfig
from chalicelib.reconciler.policy import DEFAULT_POLICY, Policy
from chalicelib.runners import RunnerRecord, RunnerState

# Every runner the executor registers is named `rh-<job>-<generation>-<hex>`
# (executor.launch.runner_name); other runners in the organisation are never touched.
RUNNER_PREFIX = "rh-"


@dataclass(frozen=True)
class ListedRunner:
    """A runner as GitHub lists it, with where it is registered."""

    scope: RunnerScope
    installation_id: int
    runner_id: int
    name: str
    status: str  # "online" | "offline"
    busy: bool


@dataclass(frozen=True)
class DeleteRunner:
    runner: ListedRunner
    reason: str  # "record_gone" | "offline"


@dataclass(frozen=True)
class OrphanPlan:
    delete: tuple[DeleteRunner, ...]
    offline_since: Mapping[str, float]  # what to remember for the next run
    busy_kept: int


def runner_scopes(pools: PoolConfig) -> tuple[RunnerScope, ...]:
    """Where the pools register runners: each organisation once, and the listed repositories of
    repository-scoped pools (a repo-scoped pool over all repositories cannot be listed)."""
    scopes: dict[tuple, RunnerScope] = {}
    for pool in pools.pools:
        owner = pool.scope.owner
        if pool.runner_scope == "org":
            scopes.setdefault(("org", owner), RunnerScope("org", owner))
            continue
        for repo in pool.scope.repositories:
            scopes.setdefault(("repo", owner, repo), RunnerScope("repo", owner, repo))
    return tuple(scopes.values())


def plan_orphans(
    listed: Sequence[ListedRunner],
    records: Mapping[str, RunnerRecord | None],
    offline_since: Mapping[str, float],
    now: float,
    policy: Policy = DEFAULT_POLICY,
) -> OrphanPlan:
    """Which of RunnerHub's runners to delete from GitHub.

    Only runners named `rh-...` that have a record in the runners table are RunnerHub's. A busy
    runner is never deleted. One whose record is `gone` is deleted at once (its container is
    gone); one offline on GitHub only after `orphan_grace_s` seen offline, because a runner is
    offline for a few seconds between its JIT config and its first poll.
    """
    delete: list[DeleteRunner] = []
    remembered: dict[str, float] = {}
    busy_kept = 0
    for runner in listed:
        if not runner.name.startswith(RUNNER_PREFIX):
            continue
        if runner.busy:
            busy_kept += 1
            continue
        record = records.get(runner.name)
        if record is None:
            continue  # not this deployment's (another stage may share the organisation)
        if record.state is RunnerState.GONE:
            delete.append(DeleteRunner(runner, "record_gone"))
            continue
        if runner.status != "offline":
            continue
        since = float(offline_since.get(runner.name, now))
        if now - since >= policy.orphan_grace_s:
            delete.append(DeleteRunner(runner, "offline"))
        else:
            remembered[runner.name] = since
    if len(remembered) > policy.max_offline_tracked:
        newest = sorted(remembered.items(), key=lambda kv: kv[1])[-policy.max_offline_tracked :]
        remembered = dict(newest)
    return OrphanPlan(tuple(delete), remembered, busy_kept)

