"""Queued jobs GitHub never announced, acted on: sweep the installations' repositories within
the budget `reconciler.discovery` gives, and take such jobs in through the webhook's own code
path (a mixin of `Reconciler`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from chalicelib.github import GitHubError
from chalicelib.payloads import WorkflowJobEvent
from chalicelib.reconciler.common import Tally, logger
from chalicelib.reconciler.discovery import (
    DiscoveryState,
    classify_discovered,
    discovery_budget,
    discovery_owners,
    sweep_order,
)
from chalicelib.reconciler.state import ReconcilerState


class Discovery:
    """Needs the Reconciler's `_github`, `_jobs`, `_pools`, `_intake`, `_clock`, `_policy` and
    `_time_left`."""

    def _discover(self, state: ReconcilerState, tally: Tally) -> ReconcilerState:
        """Sweep each pool owner's repositories, most recently active first, for queued jobs
        RunnerHub has no record of (their `queued` webhook was never sent), within
        `discovery_share` of the installation's hourly REST limit."""
        for owner, repo in discovery_owners(self._pools):
            if not self._time_left():
                break
            current = state.discovery.get(owner, DiscoveryState())
            try:
                installation = self._github.installation_for(owner, repo)
            except GitHubError as exc:
                tally.add("errors", dimension=("step", "discovery"))
                logger.warning("no installation to sweep %s: %s", owner, exc)
                continue
            state = state.with_discovery(owner, self._sweep(installation, current, tally))
        return state

    def _sweep(self, installation: int, current: DiscoveryState, tally: Tally
               ) -> DiscoveryState:
        now = self._clock()
        limit = self._github.budget.primary_limit(str(installation))
        budget = discovery_budget(current, limit, now, self._policy)
        calls = 0
        sweep = list(current.sweep)
        started = current.sweep_started_at
        last_sweep_s = current.last_sweep_s
        try:
            if not sweep:
                listed, calls, complete = self._list_repositories(installation, budget.whole)
                if complete:
                    sweep, started = list(sweep_order(listed)), now
            while sweep and calls < budget.this_run and self._time_left():
                used, done = self._check_repository(installation, sweep[0],
                                                    budget.this_run - calls, tally)
                calls += used
                if not done:
                    break
                sweep.pop(0)
                if not sweep:
                    last_sweep_s = self._clock() - started
                    logger.info("discovery sweep done", extra={"sweep_s": last_sweep_s})
        except GitHubError as exc:
            tally.add("errors", dimension=("step", "discovery"))
            logger.warning("discovery stopped: %s", exc)
        finally:
            tally.add("discovery_calls", calls)
        return replace(current, sweep=tuple(sweep), sweep_started_at=started,
                       last_sweep_s=last_sweep_s).spend(now, calls)

    def _list_repositories(self, installation: int, allowed: int
                           ) -> tuple[list[dict[str, Any]], int, bool]:
        """Every repository the installation sees, if the listing fits in `allowed` calls:
        (repositories, calls made, complete)."""
        found: list[dict[str, Any]] = []
        calls, page = 0, 1
        while calls < allowed:
            listed = self._github.list_installation_repositories(installation, page)
            calls += 1
            found += listed.items
            if listed.next_page is None:
                return found, calls, True
            missing = max(0, (listed.total_count or 0) - len(found))
            pages_left = -(-missing // max(1, len(listed.items)))
            if calls + pages_left > allowed:
                break  # it cannot finish within this hour's share: try again later
            page = listed.next_page
        return found, calls, False

    def _check_repository(self, installation: int, repository: str, allowed: int,
                          tally: Tally) -> tuple[int, bool]:
        """Look at a repository's queued runs and their jobs: (calls made, finished). A
        repository GitHub no longer shows (404) counts as finished."""
        calls, page, runs = 0, 1, []
        try:
            while True:
                if calls >= allowed:
                    return calls, False
                listed = self._github.list_queued_runs(installation, repository, page)
                calls += 1
                runs += listed.items
                if listed.next_page is None:
                    break
                page = listed.next_page
            for run in runs:
                page = 1
                while True:
                    if calls >= allowed or not self._time_left():
                        return calls, False
                    listed = self._github.list_run_jobs(installation, repository,
                                                        int(run["id"]), page)
                    calls += 1
                    for github_job in listed.items:
                        self._take_in(installation, run, github_job, tally)
                    if listed.next_page is None:
                        break
                    page = listed.next_page
        except GitHubError as exc:
            if exc.status != 404:
                raise
            logger.info("repository %s not visible any more; skipped", repository)
        return calls, True

    def _take_in(self, installation: int, run: dict[str, Any], github_job: dict[str, Any],
                 tally: Tally) -> None:
        repository = run.get("repository") or {}
        try:
            known = github_job.get("status") == "queued" and self._jobs.get(
                int(github_job["id"])) is not None
            found = classify_discovered(github_job, repository, self._pools, known)
            if found.reason != "unannounced":
                return
            payload = WorkflowJobEvent.model_validate({
                "action": "queued", "workflow_job": github_job, "repository": repository,
                "installation": {"id": installation},
            })
        except (KeyError, TypeError, ValueError):
            logger.warning("malformed job in GitHub's list skipped")
            return
        logger.append_keys(job_id=found.job_id, pool=found.pool)
        try:
            outcome, job_state = self._intake.move(payload, found.pool, self._clock())
            if outcome == "dispatched":
                tally.add("discovered", dimension=("pool", found.pool))
                logger.info("queued job GitHub never announced taken in",
                            extra={"state": job_state})
        finally:
            logger.remove_keys(["job_id", "pool"])
