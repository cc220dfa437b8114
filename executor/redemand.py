"""Giving demand back to the queue: a re-demand (the job's next generation), a failed start
re-demanded with backoff, and the demand of a runner that left before a job, given back only
once GitHub says the job is still queued and tried again on later ticks until that is settled."""

from __future__ import annotations

from dataclasses import replace

from aws_lambda_powertools import Logger

from chalicelib.demand import demand_of, dispatch, redemand
from chalicelib.errors import DependencyUnavailable
from chalicelib.jobs import JobRecord
from chalicelib.pools import Pool
from executor import recovery
from executor.context import Context
from executor.github_runners import GitHubRunners
from executor.recovery import GiveBack

logger = Logger(service="runnerhub-executor")


def backoff_s(failures: int, base_s: float, most_s: float) -> float:
    return min(most_s, base_s * 2 ** max(0, failures - 1))


class Redemand:
    def __init__(self, ctx: Context, github: GitHubRunners) -> None:
        self._ctx = ctx
        self._github = github
        # Demand of runners that left before a job, not yet given back (monitor thread only).
        self.pending: dict[int, GiveBack] = {}

    def redemand(self, job: JobRecord, reason: str, pool: str) -> bool:
        moved = redemand(self._ctx.jobs, self._ctx.demand, job, self._ctx.clock(), reason=reason)
        if moved.applied:
            self._ctx.metrics.redemanded.labels(pool, reason.split(":", 1)[0]).inc()
            logger.info("job re-demanded: %s", reason,
                        extra={"job_id": job.job_id, "pool": pool,
                               "generation": moved.generation})
        return moved.applied

    def settle(self, job: JobRecord, reason: str) -> str:
        """A claim nobody serves: re-demand it if GitHub still has the job queued. Returns
        `redemanded`, `not_queued`, `unknown` (GitHub not asked) or `moved_on`."""
        queued = self._github.job_queued(job)
        if queued is None:
            return "unknown"
        if not queued:
            return "not_queued"
        return "redemanded" if self.redemand(job, reason, str(job.pool)) else "moved_on"

    def start_failed(self, pool: Pool, job: JobRecord, reason: str, stage: str,
                     log: dict) -> None:
        """Re-demand with backoff; after N failures in a row, flag the job (it stays open)."""
        settings, metrics = self._ctx.settings, self._ctx.metrics
        failures = job.start_failures + 1
        flagged = failures >= settings.max_start_failures
        now = self._ctx.clock()
        delay = backoff_s(failures, settings.start_backoff_s, settings.max_start_backoff_s)
        metrics.start_failures.labels(pool.name, stage).inc()
        if flagged:
            metrics.flagged.labels(pool.name).inc()
        logger.warning("runner start failed at %s (%s); re-demand %d in %.1fs",
                       stage, reason[:200], failures, delay,
                       extra=log | {"start_failures": failures, "flagged": flagged})
        redemand(
            self._ctx.jobs, self._ctx.demand, job, now,
            reason=f"start_failed:{stage}", not_before=now + delay,
            fields={"start_failures": failures, "last_start_error": reason[:300],
                    "flagged": True if flagged else None},
        )

    def give_back_due(self, now: float) -> None:
        for item in [i for i in self.pending.values() if i.due_at <= now]:
            self.give_back(item)

    def give_back(self, item: GiveBack) -> None:
        """One try at giving back the demand of a runner that left before a job: re-demanded
        only if GitHub says the job is still queued (it may have given the job to another
        runner). When GitHub can't be asked or the re-demand fails, tried again on a later
        tick with backoff, and counted."""
        log = {"job_id": item.job_id, "pool": item.pool}
        try:
            outcome = self._give_back_once(item)
            cause = "github" if outcome == "unknown" else None
        except DependencyUnavailable as exc:
            cause = "aws"
            logger.warning("re-demand of job %s failed: %s", item.job_id, exc, extra=log)
        except Exception:
            cause = "error"
            self._ctx.metrics.errors.labels("give_back").inc()
            logger.exception("re-demand of job %s failed", item.job_id, extra=log)
        if cause is None:
            self.pending.pop(item.job_id, None)
            return
        failures = item.failures + 1
        delay = backoff_s(failures, self._ctx.settings.start_backoff_s,
                          self._ctx.settings.max_start_backoff_s)
        self._ctx.metrics.redemand_failures.labels(item.pool, cause).inc()
        self.pending[item.job_id] = replace(item, failures=failures,
                                           due_at=self._ctx.clock() + delay)
        logger.info("re-demand of job %s (runner %s left before a job) tried again in %.0fs",
                    item.job_id, item.runner, delay,
                    extra=log | {"cause": cause, "failures": failures})

    def _give_back_once(self, item: GiveBack) -> str:
        """`redemanded`, `not_queued`, `unknown` (GitHub not asked) or `moved_on`; raises
        DependencyUnavailable when AWS fails."""
        job = self._ctx.jobs.get(item.job_id)
        step = recovery.give_back_step(job, item)
        if step == "done":
            return "moved_on"
        assert job is not None
        if step == "resend":
            self._resend(job, item)
            return "redemanded"
        outcome = self.settle(job, item.reason)
        if outcome == "not_queued":
            logger.info("runner %s left before a job GitHub no longer has queued: not "
                        "re-demanded", item.runner,
                        extra={"job_id": item.job_id, "pool": item.pool})
        return outcome

    def _resend(self, job: JobRecord, item: GiveBack) -> None:
        """A re-demand that was recorded but whose message was not sent: send it now."""
        now = self._ctx.clock()
        message = demand_of(job, now)
        dispatch(self._ctx.jobs, self._ctx.demand, message, now)
        self._ctx.metrics.redemanded.labels(item.pool, item.reason).inc()
        logger.info("job re-demanded: %s (its message sent again)", item.reason,
                    extra={"job_id": item.job_id, "pool": item.pool,
                           "generation": message.generation})
