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
functions of the planner modules (`deliveries`, `stuck`, `dead_letters`, `orphans`,
`discovery`); this class gathers their inputs and acts, with the lost-webhook and discovery
steps in `redelivery` and `sweep`.

    python -m chalicelib.reconciler [--every SECONDS]    # the same, from RUNNERHUB_* settings
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from chalicelib import jobs as moves
from chalicelib.demand import DeadLetter, DeadLetters, DemandQueue, redemand
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubApp, GitHubError
from chalicelib.jobs import Change, JobRecord, JobStore
from chalicelib.pools import PoolConfig
from chalicelib.reconciler.common import EXPECTED_ERRORS, ReconcileSummary, Tally, logger
from chalicelib.reconciler.dead_letters import (
    DeadAct,
    DeadLetterAction,
    from_github,
    settle_dead_letter,
)
from chalicelib.reconciler.orphans import RUNNER_PREFIX, ListedRunner, plan_orphans, runner_scopes
from chalicelib.reconciler.policy import DEFAULT_POLICY, Policy
from chalicelib.reconciler.redelivery import LostWebhooks
from chalicelib.reconciler.state import ReconcilerState
from chalicelib.reconciler.store import DeliveryRecords, JobIndex, LeaseStore
from chalicelib.reconciler.stuck import (
    STUCK_STATES,
    Act,
    StuckAction,
    classify_stuck,
    unserved_reason,
)
from chalicelib.reconciler.sweep import Discovery
from chalicelib.runners import RunnerStore, took_job
from chalicelib.telemetry import COUNT, Telemetry
from chalicelib.webhook import JobIntake

# Open jobs, in the order a job goes through them.
CENSUS_STATES = tuple(state for state in moves.JobState if state in moves.OPEN_STATES)

# Stop starting new actions this long before the lease ends, so none runs unleased.
LEASE_MARGIN_FRACTION = 0.25


class Reconciler(LostWebhooks, Discovery):
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
        tally = Tally(self._telemetry)
        state = self._step("deliveries", tally, self._lost_webhooks, state, default=state)
        if self._dead_letters is not None:
            self._step("dead_letters", tally, self._dead_lettered)
        self._step("jobs", tally, self._stuck_jobs)
        state = self._step("runners", tally, self._orphans, state, default=state)
        if self._intake is not None:
            state = self._step("discovery", tally, self._discover, state, default=state)
        self._step("census", tally, self._census)
        try:
            if not self._lease.save(self.owner, state, self._clock()):
                # Another run took over after our lease expired: its state wins.
                logger.warning("lease lost before the state was saved")
                tally.add("errors", dimension=("step", "lease"))
        except DependencyUnavailable as exc:
            logger.warning("could not save the reconciler state: %s", exc)
            tally.add("errors", dimension=("step", "lease"))
        summary = ReconcileSummary(acted=True, **tally.counts)
        for name, value in summary.run_metrics().items():
            self._telemetry.measure(name, value, COUNT)
        self._telemetry.flush()
        logger.info("reconcile run done", extra={"summary": summary.as_dict()})
        return summary

    def _step(self, name: str, tally: Tally, step: Callable, *args: Any, default: Any = None):
        try:
            return step(*args, tally)
        except EXPECTED_ERRORS as exc:
            logger.warning("reconcile step %s failed: %s", name, exc)
        except Exception:  # noqa: BLE001 - a bug: logged with its stack and counted; the next step runs
            logger.exception("reconcile step %s failed unexpectedly", name)
        tally.add("errors", dimension=("step", name))
        return default

    def _time_left(self) -> bool:
        return self._clock() < self._deadline

    # --- the jobs census (the dashboard's jobs by state, the flagged-job alarm) ---

    def _census(self, tally: Tally) -> None:
        counts = self._index.census(CENSUS_STATES)
        for state, (count, _) in counts.items():
            self._telemetry.measure("JobsOpen", count, COUNT, {"state": state.value})
        # Flagged and still waiting for a runner: the alarm holds while any is.
        waiting = sum(flagged for state, (_, flagged) in counts.items()
                      if state in moves.BEFORE_IN_PROGRESS)
        self._telemetry.measure("JobsFlagged", waiting, COUNT)


    # --- stuck jobs ---

    def _stuck_jobs(self, tally: Tally) -> None:
        checked = 0
        for state in STUCK_STATES:
            before = self._clock() - self._policy.stuck_after(state)
            budget = self._policy.jobs_per_run - checked
            for item in self._index.stale(state, before, budget):
                if checked >= self._policy.jobs_per_run or not self._time_left():
                    tally.set("jobs_checked", checked)
                    return
                # The index is eventually consistent: decide on the record itself.
                job = self._jobs.get(item.job_id)
                now = self._clock()
                if job is None or unserved_reason(job, now, self._policy) is None:
                    continue
                checked += 1
                self._check_job(job, now, tally)
        tally.set("jobs_checked", checked)

    def _check_job(self, job: JobRecord, now: float, tally: Tally) -> None:
        logger.append_keys(job_id=job.job_id, pool=job.pool)
        try:
            github_job = self._github_job(job, tally)
            action = classify_stuck(job, github_job, now, self._policy)
            self._carry_out(action, job, now, tally)
        except EXPECTED_ERRORS as exc:
            tally.add("errors", dimension=("step", "job"))
            logger.warning("could not repair stuck job: %s", exc)
        finally:
            logger.remove_keys(["job_id", "pool"])

    def _github_job(self, job: JobRecord, tally: Tally) -> dict[str, Any] | None:
        repository = job.repository or ""
        owner, _, repo = repository.partition("/")
        try:
            # The recorded installation is the one whose webhook arrived first: with several
            # Apps it may be another App's, so then ask for this App's own.
            installation = (job.installation_id if len(self._apps) == 1 else None
                            ) or self._github.installation_for(owner, repo)
            return self._github.get_job(int(installation), repository, job.job_id)
        except GitHubError as exc:
            # Fail open: the job stays as it is until GitHub answers.
            tally.add("errors", dimension=("step", "get_job"))
            logger.warning("GitHub could not say how the job is: %s", exc)
            return None

    def _carry_out(self, action: StuckAction, job: JobRecord, now: float,
                   tally: Tally) -> None:
        if action.act is Act.LEAVE:
            logger.info("stuck job left as it is: %s", action.reason)
            return
        if action.act is Act.REDEMAND:
            moved = redemand(self._jobs, self._demand, job, now,
                             reason=f"reconciler:{action.reason}")
            # Ours only when this reason is on the new generation (not another actor's).
            reason = (moved.job.redemand_reason if moved.job else None) or ""
            if moved.generation > action.generation and reason.startswith("reconciler:"):
                tally.add("re_demanded", dimension=("pool", str(job.pool)))
                logger.info("stuck job re-demanded: %s", action.reason,
                            extra={"generation": moved.generation})
            return
        move = moves.START_JOB if action.act is Act.START_JOB else moves.COMPLETE
        moved = self._jobs.apply(action.job_id, move, now, Change(fields=dict(action.fields)))
        if not moved.applied:
            return  # the webhook (or another run) moved it first
        tally.add("moved_forward", dimension=("pool", str(job.pool)))
        logger.info("job moved forward from GitHub's view: %s", action.reason,
                    extra={"state": moved.state})
        runner_name = action.fields.get("runner_name")
        if action.act is Act.START_JOB and runner_name:
            # As the in_progress webhook would: the executor must not reap a busy runner. A
            # runner that is not ours has no record, and the conditional write does nothing.
            took_job(self._runners, str(runner_name), action.job_id, now)

    # --- dead-lettered demand ---

    def _dead_lettered(self, tally: Tally) -> None:
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

    def _dead_letter(self, letter: DeadLetter, tally: Tally) -> None:
        message = letter.message.model_dump() if letter.message else None
        logger.append_keys(job_id=message["job_id"] if message else None, pool=letter.pool)
        try:
            job = self._jobs.get(int(message["job_id"])) if message else None
            now = self._clock()
            action = settle_dead_letter(message, job, now)
            if action is None:
                github_job = self._github_job(job, tally)
                action = from_github(job, github_job)
            self._carry_out_dead_letter(letter, action, job, tally)
        except EXPECTED_ERRORS as exc:
            tally.add("errors", dimension=("step", "dead_letter"))
            logger.warning("could not settle a dead-lettered demand: %s", exc)
        finally:
            logger.remove_keys(["job_id", "pool"])

    def _carry_out_dead_letter(self, letter: DeadLetter, action: DeadLetterAction,
                               job: JobRecord | None, tally: Tally) -> None:
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

    def _orphans(self, state: ReconcilerState, tally: Tally) -> ReconcilerState:
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
