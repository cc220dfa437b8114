"""The reconciler: repairs what webhooks and executors leave undone, once a minute.

- Lost webhooks: GitHub does not retry a failed delivery. Read every App's delivery log from
  where the last run stopped, and redeliver failed `workflow_job` deliveries that RunnerHub has
  not processed (no `done` record for the guid), each guid at most once per interval.
- Dead-lettered demand: a pool's DLQ message of a job GitHub still has queued is re-demanded at
  once; one whose demand is met or superseded is deleted.
- Stuck jobs: a job that stays in received/dispatched/claimed/runner_started too long with no
  live executor lease is checked on GitHub: still queued -> re-demand; in progress or completed
  -> moved forward. A GitHub error leaves the job as it is (fail open: a job GitHub still has
  queued is never closed by RunnerHub).
- Orphan runners: RunnerHub's runners (`rh-...`, with a record) that are offline on GitHub, or
  whose record is gone, are deleted from GitHub; a busy runner never is.
- Unannounced jobs: a sweep of the installations' repositories (most recently active first,
  within a tenth of the hourly REST limit) finds queued jobs whose `queued` webhook GitHub never
  sent, and takes them in through the webhook's own code path.

One reconciler acts at a time (a lease by conditional write); every action is conditional or
idempotent, so a run that dies half way can simply be repeated. The decisions are the pure
functions of `chalicelib.reconciler_plan`; this module gathers their inputs and acts.

    python -m chalicelib.reconciler [--every SECONDS]    # the same, from RUNNERHUB_* settings
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib import jobs as moves
from chalicelib.demand import DeadLetter, DeadLetters, DemandQueue, redemand
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubApp, GitHubError
from chalicelib.jobs import Change, JobStore
from chalicelib.payloads import WorkflowJobEvent
from chalicelib.pools import PoolConfig
from chalicelib.reconciler_plan import (
    DEFAULT_POLICY,
    RUNNER_PREFIX,
    STUCK_STATES,
    Act,
    Attempt,
    DeadAct,
    DeadLetterAction,
    DeliveryCursor,
    DiscoveryState,
    ListedRunner,
    Policy,
    ReconcilerState,
    StuckAction,
    advance_cursor,
    candidate_guids,
    classify_dead_letter,
    classify_discovered,
    classify_stuck,
    discovery_budget,
    discovery_owners,
    plan_deliveries,
    plan_orphans,
    read_page,
    runner_scopes,
    settle_dead_letter,
    sweep_order,
    unserved_reason,
)
from chalicelib.reconciler_store import DeliveryRecords, JobIndex, LeaseStore
from chalicelib.runners import RunnerState, RunnerStore
from chalicelib.telemetry import Telemetry
from chalicelib.webhook import JobIntake

logger = Logger(service="runnerhub-reconciler")

# Stop starting new actions this long before the lease ends, so none runs unleased.
LEASE_MARGIN_FRACTION = 0.25
# Outside errors a step survives (counted and logged); anything else is a bug: logged with its
# stack, counted, and the next step still runs.
EXPECTED_ERRORS = (GitHubError, DependencyUnavailable)


@dataclass(frozen=True)
class ReconcileSummary:
    """What one run did. `acted` is False when another reconciler held the lease."""

    acted: bool
    redelivered: int = 0
    re_demanded: int = 0
    moved_forward: int = 0
    orphans_deleted: int = 0
    errors: int = 0
    deliveries_read: int = 0
    pending_deliveries: int = 0
    jobs_checked: int = 0
    abandoned: int = 0
    redriven: int = 0
    dead_letters_dropped: int = 0
    discovered: int = 0
    discovery_calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Tally:
    """Counts of one run, mirrored to metrics as they happen."""

    METRICS = {
        "redelivered": "Redelivered",
        "re_demanded": "ReDemanded",
        "moved_forward": "MovedForward",
        "orphans_deleted": "OrphansDeleted",
        "errors": "ReconcileErrors",
        "abandoned": "RedeliveryAbandoned",
        "redriven": "DeadLetterRedriven",
        "dead_letters_dropped": "DeadLetterDropped",
        "discovered": "JobDiscovered",
        "discovery_calls": "DiscoveryCalls",
    }

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self.counts: dict[str, int] = {}

    def add(self, name: str, amount: int = 1, dimension: tuple[str, str] | None = None) -> None:
        self.counts[name] = self.counts.get(name, 0) + amount
        metric = self.METRICS.get(name)
        if metric:
            for _ in range(amount):
                self._telemetry.count(metric, dimension)

    def set(self, name: str, value: int) -> None:
        self.counts[name] = value


class Reconciler:
    def __init__(
        self,
        *,
        pools: PoolConfig,
        jobs: JobStore,
        job_index: JobIndex,
        runners: RunnerStore,
        demand: DemandQueue,
        github: GitHubApp,
        deliveries: DeliveryRecords,
        lease: LeaseStore,
        telemetry: Telemetry,
        policy: Policy = DEFAULT_POLICY,
        lease_s: float = 120.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        apps: Sequence[GitHubApp] = (),
        dead_letters: DeadLetters | None = None,
        intake: JobIntake | None = None,
    ) -> None:
        """`github` is the App that asks about jobs and runners; `apps` every App whose webhook
        deliveries are read (default: `github` alone). Without `dead_letters` the pools' DLQs
        are not read; without `intake` queued jobs GitHub never announced are not looked for."""
        self._pools = pools
        self._jobs = jobs
        self._index = job_index
        self._runners = runners
        self._demand = demand
        self._github = github
        self._deliveries = deliveries
        self._lease = lease
        self._telemetry = telemetry
        self._policy = policy
        self._lease_s = lease_s
        self.owner = owner or f"reconciler-{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._deadline = 0.0
        self._apps = tuple(apps) or (github,)
        self._dead_letters = dead_letters
        self._intake = intake

    # --- one run ---

    def run(self) -> ReconcileSummary:
        now = self._clock()
        state = self._lease.acquire(self.owner, now, self._lease_s)
        if state is None:
            logger.info("another reconciler holds the lease; nothing done")
            self._telemetry.count("ReconcileSkipped")
            self._telemetry.flush()
            return ReconcileSummary(acted=False)
        self._deadline = now + self._lease_s * (1 - LEASE_MARGIN_FRACTION)
        tally = _Tally(self._telemetry)
        state = self._step("deliveries", tally, self._lost_webhooks, state, default=state)
        if self._dead_letters is not None:
            self._step("dead_letters", tally, self._dead_lettered)
        self._step("jobs", tally, self._stuck_jobs)
        state = self._step("runners", tally, self._orphans, state, default=state)
        if self._intake is not None:
            state = self._step("discovery", tally, self._discover, state, default=state)
        try:
            if not self._lease.save(self.owner, state, self._clock()):
                # Another run took over after our lease expired: its state wins.
                logger.warning("lease lost before the state was saved")
                tally.add("errors", dimension=("step", "lease"))
        except DependencyUnavailable as exc:
            logger.warning("could not save the reconciler state: %s", exc)
            tally.add("errors", dimension=("step", "lease"))
        self._telemetry.flush()
        summary = ReconcileSummary(acted=True, **tally.counts)
        logger.info("reconcile run done", extra={"summary": summary.as_dict()})
        return summary

    def _step(self, name: str, tally: _Tally, step: Callable, *args: Any, default: Any = None):
        try:
            return step(*args, tally)
        except EXPECTED_ERRORS as exc:
            logger.warning("reconcile step %s failed: %s", name, exc)
        except Exception:
            logger.exception("reconcile step %s failed unexpectedly", name)
        tally.add("errors", dimension=("step", name))
        return default

    def _time_left(self) -> bool:
        return self._clock() < self._deadline

    # --- lost webhooks ---

    def _lost_webhooks(self, state: ReconcilerState, tally: _Tally) -> ReconcilerState:
        """Every App's delivery log: each App has its own webhook, so a delivery to the second
        App is only in the second App's log."""
        tally.set("deliveries_read", 0)
        tally.set("pending_deliveries", 0)
        for index, app in enumerate(self._apps):
            app_id = app.app_id if index else 0  # the first App's cursor is `deliveries`
            cursor = state.cursor_of(index, app_id)
            try:
                cursor = self._app_lost_webhooks(app, cursor, tally)
            except EXPECTED_ERRORS as exc:
                tally.add("errors", dimension=("step", "deliveries"))
                logger.warning("lost webhooks of App %s not checked: %s", app_id, exc)
                continue
            state = state.with_cursor(index, app_id, cursor)
        return state

    def _app_lost_webhooks(self, app: GitHubApp, cursor: DeliveryCursor, tally: _Tally
                           ) -> DeliveryCursor:
        now = self._clock()
        attempts, top, finished, next_cursor = self._read_deliveries(app, cursor, now, tally)
        tally.add("deliveries_read", len(attempts))
        guids = candidate_guids(attempts, cursor.pending)
        statuses, marks = self._deliveries.lookup(guids) if guids else ({}, {})
        plan = plan_deliveries(attempts, cursor.pending, statuses, marks, now, self._policy)
        gone: set[str] = set()
        for item in plan.redeliver:
            if not self._time_left():
                break
            logger.append_keys(delivery_id=item.guid)
            try:
                every_s = self._policy.redeliver_every_s
                if self._deliveries.claim_redelivery(item.guid, now, every_s) is None:
                    continue  # redelivered moments ago by another run
                if app.redeliver(item.delivery_id):
                    tally.add("redelivered")
                    logger.info("failed delivery redelivered", extra={"attempt": item.attempt})
                else:
                    gone.add(item.guid)
                    tally.add("abandoned")
                    logger.warning("delivery no longer on GitHub; given up")
            except EXPECTED_ERRORS as exc:
                tally.add("errors", dimension=("step", "redeliver"))
                logger.warning("redelivery failed: %s", exc)
            finally:
                logger.remove_keys(["delivery_id"])
        for abandoned in plan.abandoned:
            tally.add("abandoned")
            logger.warning("delivery given up: %s", abandoned.reason,
                           extra={"delivery_id": abandoned.pending.guid})
        pending = [p for p in plan.pending if p.guid not in gone]
        tally.add("pending_deliveries", len(pending))
        return advance_cursor(cursor, top, finished, next_cursor, pending)

    def _read_deliveries(
        self, app: GitHubApp, cursor: DeliveryCursor, now: float, tally: _Tally
    ) -> tuple[list[Attempt], int, bool, str | None]:
        """Pages of GitHub's log, newest first, down to what earlier runs saw, within the page
        budget. Returns (new attempts, the scan's newest id, finished, where to resume)."""
        oldest = now - self._policy.delivery_lookback_s
        page_cursor = cursor.resume
        top = cursor.resume_top if cursor.resume else 0
        found: list[Attempt] = []
        for _ in range(self._policy.delivery_pages_per_run):
            try:
                page = app.list_deliveries(page_cursor)
            except GitHubError as exc:
                # Resume from this page next run; what was read so far is still planned.
                tally.add("errors", dimension=("step", "list_deliveries"))
                logger.warning("listing deliveries failed: %s", exc)
                return found, top, False, page_cursor or cursor.resume
            attempts = []
            for item in page.deliveries:
                try:
                    attempts.append(Attempt.from_github(item))
                except (ValueError, KeyError, TypeError):
                    logger.warning("malformed delivery in GitHub's log skipped")
            if attempts and not top:
                top = max(a.id for a in attempts)
            verdict = read_page(attempts, cursor.floor_id, oldest)
            found += verdict.fresh
            if verdict.reached_end or page.next_cursor is None:
                return found, top, True, None
            page_cursor = page.next_cursor
        return found, top, False, page_cursor

    # --- stuck jobs ---

    def _stuck_jobs(self, tally: _Tally) -> None:
        checked = 0
        for state in STUCK_STATES:
            before = self._clock() - self._policy.stuck_after(state)
            budget = self._policy.jobs_per_run - checked
            for item in self._index.stale(state, before, budget):
                if checked >= self._policy.jobs_per_run or not self._time_left():
                    tally.set("jobs_checked", checked)
                    return
                # The index is eventually consistent: decide on the record itself.
                job = self._jobs.get(int(item["job_id"]))
                now = self._clock()
                if job is None or unserved_reason(job, now, self._policy) is None:
                    continue
                checked += 1
                self._check_job(job, now, tally)
        tally.set("jobs_checked", checked)

    def _check_job(self, job: dict[str, Any], now: float, tally: _Tally) -> None:
        logger.append_keys(job_id=job["job_id"], pool=job.get("pool"))
        try:
            github_job = self._github_job(job, tally)
            action = classify_stuck(job, github_job, now, self._policy)
            self._carry_out(action, job, now, tally)
        except EXPECTED_ERRORS as exc:
            tally.add("errors", dimension=("step", "job"))
            logger.warning("could not repair stuck job: %s", exc)
        finally:
            logger.remove_keys(["job_id", "pool"])

    def _github_job(self, job: dict[str, Any], tally: _Tally) -> dict[str, Any] | None:
        repository = str(job.get("repository") or "")
        owner, _, repo = repository.partition("/")
        try:
            # The recorded installation is the one whose webhook arrived first: with several
            # Apps it may be another App's, so then ask for this App's own.
            installation = (job.get("installation_id") if len(self._apps) == 1 else None
                            ) or self._github.installation_for(owner, repo)
            return self._github.get_job(int(installation), repository, int(job["job_id"]))
        except GitHubError as exc:
            # Fail open: the job stays as it is until GitHub answers.
            tally.add("errors", dimension=("step", "get_job"))
            logger.warning("GitHub could not say how the job is: %s", exc)
            return None

    def _carry_out(self, action: StuckAction, job: dict[str, Any], now: float,
                   tally: _Tally) -> None:
        if action.act is Act.LEAVE:
            logger.info("stuck job left as it is: %s", action.reason)
            return
        if action.act is Act.REDEMAND:
            moved = redemand(self._jobs, self._demand, job, now,
                             reason=f"reconciler:{action.reason}")
            # Ours only when this reason is on the new generation (not another actor's).
            reason = str((moved.job or {}).get("redemand_reason", ""))
            if moved.generation > action.generation and reason.startswith("reconciler:"):
                tally.add("re_demanded", dimension=("pool", str(job.get("pool"))))
                logger.info("stuck job re-demanded: %s", action.reason,
                            extra={"generation": moved.generation})
            return
        move = moves.START_JOB if action.act is Act.START_JOB else moves.COMPLETE
        moved = self._jobs.apply(action.job_id, move, now, Change(fields=dict(action.fields)))
        if not moved.applied:
            return  # the webhook (or another run) moved it first
        tally.add("moved_forward", dimension=("pool", str(job.get("pool"))))
        logger.info("job moved forward from GitHub's view: %s", action.reason,
                    extra={"state": moved.job.get("state") if moved.job else None})
        runner_name = action.fields.get("runner_name")
        if action.act is Act.START_JOB and runner_name:
            # As the in_progress webhook would: the executor must not reap a busy runner. A
            # runner that is not ours has no record, and the conditional write does nothing.
            self._runners.move(str(runner_name), RunnerState.BUSY, now,
                               took_job_id=action.job_id)

    # --- dead-lettered demand ---

    def _dead_lettered(self, tally: _Tally) -> None:
        """Demand messages the pools' DLQs hold: one of a job GitHub still has queued goes back
        to its queue at once, as a re-demand (a new generation: SQS would de-duplicate the same
        message id within 5 minutes of its first send)."""
        budget = self._policy.dead_letters_per_run
        for pool in self._pools.pools:
            if budget <= 0 or not self._time_left():
                return
            letters = self._dead_letters.dead_letters(pool.name, budget)
            budget -= len(letters)
            for letter in letters:
                if not self._time_left():
                    return
                self._dead_letter(letter, tally)

    def _dead_letter(self, letter: DeadLetter, tally: _Tally) -> None:
        message = letter.message.model_dump() if letter.message else None
        logger.append_keys(job_id=message["job_id"] if message else None, pool=letter.pool)
        try:
            job = self._jobs.get(int(message["job_id"])) if message else None
            now = self._clock()
            action = settle_dead_letter(message, job, now)
            if action is None:
                github_job = self._github_job(job, tally)
                action = classify_dead_letter(message, job, github_job, self._clock())
            self._carry_out_dead_letter(letter, action, job, tally)
        except EXPECTED_ERRORS as exc:
            tally.add("errors", dimension=("step", "dead_letter"))
            logger.warning("could not settle a dead-lettered demand: %s", exc)
        finally:
            logger.remove_keys(["job_id", "pool"])

    def _carry_out_dead_letter(self, letter: DeadLetter, action: DeadLetterAction,
                               job: dict[str, Any] | None, tally: _Tally) -> None:
        if action.act is DeadAct.KEEP:
            logger.info("dead-lettered demand kept: %s", action.reason)
            return
        if action.act is DeadAct.REDRIVE:
            moved = redemand(self._jobs, self._demand, job, self._clock(),
                             reason="reconciler:dead_lettered")
            if moved.applied:
                tally.add("redriven", dimension=("pool", letter.pool))
                logger.info("dead-lettered demand of a queued job sent again",
                            extra={"generation": moved.generation})
            # Not applied: another actor moved the job on; either way this message is spent.
        else:
            tally.add("dead_letters_dropped", dimension=("pool", letter.pool))
            logger.info("dead-lettered demand no longer wanted: %s", action.reason)
        self._dead_letters.forget(letter)

    # --- orphan runners ---

    def _orphans(self, state: ReconcilerState, tally: _Tally) -> ReconcilerState:
        listed: list[ListedRunner] = []
        for scope in runner_scopes(self._pools):
            try:
                installation = self._github.installation_for(scope.owner, scope.repo)
                found = self._github.list_runners(installation, scope)
            except GitHubError as exc:
                # Its runners' offline time restarts: a later deletion, never a wrong one.
                tally.add("errors", dimension=("step", "list_runners"))
                logger.warning("listing runners of %s failed: %s", scope.path, exc)
                continue
            for runner in found:
                try:
                    listed.append(ListedRunner(
                        scope=scope, installation_id=installation, runner_id=int(runner["id"]),
                        name=str(runner["name"]), status=str(runner.get("status", "")),
                        busy=bool(runner.get("busy")),
                    ))
                except (KeyError, TypeError, ValueError):
                    logger.warning("malformed runner in GitHub's list skipped")
        ours = [r for r in listed if r.name.startswith(RUNNER_PREFIX) and not r.busy]
        records = {runner.name: self._runners.get(runner.name) for runner in ours}
        plan = plan_orphans(listed, records, state.offline_since, self._clock(), self._policy)
        for item in plan.delete:
            if not self._time_left():
                break
            runner = item.runner
            try:
                deleted = self._github.delete_runner(
                    runner.installation_id, runner.scope, runner.runner_id
                )
            except GitHubError as exc:
                tally.add("errors", dimension=("step", "delete_runner"))
                logger.warning("could not delete orphan runner %s: %s", runner.name, exc)
                continue
            if deleted:
                tally.add("orphans_deleted")
                logger.info("orphan runner deleted: %s", item.reason,
                            extra={"runner": runner.name})
            else:
                logger.info("orphan runner is busy on GitHub; kept", extra={"runner": runner.name})
        return state.with_offline(plan.offline_since)

    # --- queued jobs GitHub never announced ---

    def _discover(self, state: ReconcilerState, tally: _Tally) -> ReconcilerState:
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

    def _sweep(self, installation: int, current: DiscoveryState, tally: _Tally
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
                          tally: _Tally) -> tuple[int, bool]:
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
                 tally: _Tally) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Run once (or every N seconds) from RUNNERHUB_* settings; print each summary as JSON."""
    import argparse
    import json
    import sys

    from pydantic import ValidationError

    from chalicelib import wiring
    from chalicelib.errors import ConfigurationError
    from chalicelib.reconciler_settings import ReconcilerSettings

    parser = argparse.ArgumentParser(prog="python -m chalicelib.reconciler",
                                     description="RunnerHub reconciler: one run, or a loop")
    parser.add_argument("--every", type=float, default=0.0,
                        help="run every SECONDS until interrupted (default: once)")
    args = parser.parse_args(argv)
    try:
        reconciler = wiring.build_reconciler(ReconcilerSettings())
    except ValidationError as exc:
        # Field and reason only: never the values (a setting may be a secret's location).
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        print(f"runnerhub reconciler: invalid configuration: {problems}", file=sys.stderr)
        return 2
    except (ConfigurationError, ValueError) as exc:
        print(f"runnerhub reconciler: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except DependencyUnavailable as exc:
        print(f"runnerhub reconciler: cannot start: {exc}", file=sys.stderr)
        return 1
    while True:
        try:
            summary = reconciler.run()
        except DependencyUnavailable as exc:
            # AWS or GitHub unreachable for the whole run (e.g. the lease could not be taken):
            # nothing was decided; a loop tries again next period, as the schedule would.
            logger.warning("reconcile run failed: %s", exc)
            if args.every <= 0:
                return 1
            time.sleep(args.every)
            continue
        print(json.dumps(summary.as_dict(), sort_keys=True), flush=True)
        if args.every <= 0:
            return 0 if summary.errors == 0 else 1
        try:
            time.sleep(args.every)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
