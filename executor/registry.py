"""The runners this daemon started or adopted, and what the monitor does with them each tick:
watch (renew the claim, notice a job taken), reap a surplus idle runner, retire one at shutdown,
clean up after one whose container exited.

`Registry` is the one shared record (one lock) the serving threads, the monitor, start-up
adoption and the recovery scans read and write; `RunnerWatch` acts on it from the monitor."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from chalicelib import jobs as moves
from chalicelib.github import RunnerScope
from chalicelib.jobs import WAITING_FOR_RUNNER, Change, JobRecord, JobState
from chalicelib.pools import Pool
from chalicelib.runners import RunnerRecord, RunnerState
from executor.containers import RunnerContainer
from executor.context import Context
from executor.github_runners import GitHubRunners
from executor.recovery import GiveBack
from executor.redemand import Redemand
from executor.runner_version import TAIL_LINES, rejected_version
from executor.slots import Slots

logger = Logger(service="runnerhub-executor")
# How often the host's runner records are read for an operator's retire requests (one query).
RETIRE_REQUESTS_EVERY_S = 10.0


@dataclass
class LocalRunner:
    name: str
    pool: Pool
    job_id: int
    generation: int
    installation_id: int
    scope: RunnerScope
    runner_id: int | None
    started_at: float
    lease_renewed_at: float
    busy: bool = False
    reaping: bool = False
    checked_at: float = 0.0  # last health check with GitHub (idle runners past the timeout)
    # A warm runner (`executor.warm`) holds a warm seat and serves no job's demand: started
    # warm (job_id 0), or a spare one whose job another runner took. `warm_since`: idle since.
    warm: bool = False
    warm_since: float = 0.0
    # Its job was taken by another runner before it was up: a warm runner if a seat frees.
    spare: bool = False

    @property
    def log(self) -> dict:
        return {"runner": self.name, "job_id": self.job_id, "pool": self.pool.name}

    def serving(self, record: RunnerRecord | None) -> tuple[int, int]:
        """The job and generation whose demand it serves now: its record's (the webhook may
        have handed it another job's demand), else the ones it was started for."""
        job_id = record.job_id if record and record.job_id is not None else self.job_id
        generation = (record.generation if record and record.generation is not None
                      else self.generation)
        return job_id, generation


class Registry:
    """Local runners by name, and the jobs a serving thread holds a claim for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.local: dict[str, LocalRunner] = {}  # read freely; changed under the lock
        self._starting: set[int] = set()

    def add(self, local: LocalRunner) -> None:
        with self._lock:
            self.local[local.name] = local

    def remove(self, name: str) -> None:
        with self._lock:
            self.local.pop(name, None)

    def runners(self) -> list[LocalRunner]:
        with self._lock:
            return list(self.local.values())

    @contextmanager
    def starting(self, job_id: int) -> Iterator[None]:
        """A serving thread holds a claim of this job while it starts its runner."""
        with self._lock:
            self._starting.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._starting.discard(job_id)

    def serves(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._starting or any(
                local.job_id == job_id for local in self.local.values())

    def served(self) -> tuple[frozenset[int], frozenset[str]]:
        """The jobs served (being started or by a runner) and the runners' names, at once."""
        with self._lock:
            jobs = frozenset(self._starting | {lo.job_id for lo in self.local.values()})
            return jobs, frozenset(self.local)


class RunnerWatch:
    def __init__(self, ctx: Context, registry: Registry, slots: Slots, github: GitHubRunners,
                 redemand: Redemand) -> None:
        # A warm runner ended, healthy or not (the warm keeper's backoff): set by the daemon.
        self.warm_ended: Callable[[Pool, bool], None] = lambda pool, healthy: None
        self._ctx = ctx
        self._registry = registry
        self._slots = slots
        self._github = github
        self._redemand = redemand
        self._requests_read_at = -RETIRE_REQUESTS_EVERY_S

    def check(self, now: float) -> None:
        """One monitor pass over the local runners and this host's containers."""
        # The local runners first, then Docker's listing: a runner started in between is not
        # in the listing and must not be taken for one that exited.
        known = self._registry.runners()
        containers = {c.name: c for c in self._ctx.containers.managed(self._ctx.host_id)}
        for local in known:
            container = containers.get(local.name)
            if container is None or container.finished:
                self.exited(local, container)
            else:
                self.watch(local, now)
        for container in containers.values():
            if container.name not in self._registry.local and container.finished:
                self._ctx.containers.remove(container.name)  # a leftover of a failed start
        self.retire_requested(now)

    def retire_requested(self, now: float) -> None:
        """Idle runners an operator asked to retire (`retire_requested_at` on the record,
        the management API): a warm one is reaped (the keeper starts a fresh one), one
        waiting for its job is retired and its demand re-queued. One query of this host's
        runner records every RETIRE_REQUESTS_EVERY_S, only while it has an idle runner."""
        idle = [local for local in self._registry.runners()
                if not local.busy and not local.reaping]
        if not idle or now - self._requests_read_at < RETIRE_REQUESTS_EVERY_S:
            return
        self._requests_read_at = now
        records = {r.runner_name: r for r in self._ctx.runners.on_host(self._ctx.host_id)}
        for local in idle:
            record = records.get(local.name)
            if record is None or record.retire_requested_at is None:
                continue
            if record.state is RunnerState.BUSY:
                local.busy = True  # it took a job first: the request no longer applies
                continue
            self._ctx.metrics.retire_requests.labels(local.pool.name).inc()
            logger.info("retire requested by %s", record.retire_requested_by or "an operator",
                        extra=local.log)
            if local.warm:
                self.reap(local)
            else:
                self.retire(local, "retire_requested")

    def watch(self, local: LocalRunner, now: float) -> None:
        if local.busy or local.reaping:
            return
        if local.warm:
            self.watch_warm(local, now)
            return
        settings = self._ctx.settings
        record = None
        if local.job_id and now - local.lease_renewed_at >= settings.lease_s / 3:
            # Renew the claim of the job this runner serves now (a hand-over may have changed
            # it); when the job has moved on there is nothing to renew until the next check.
            record = self._ctx.runners.get(local.name)
            if self.noticed_warm(local, record):
                return
            job_id, generation = local.serving(record)
            self._ctx.jobs.apply(
                job_id, moves.RENEW_LEASE, now,
                Change(fields={"lease_until": now + settings.lease_s}),
                generation=generation, host_id=self._ctx.host_id,
            )
            local.lease_renewed_at = now
        # While draining, a surplus idle runner is reaped at once, not after the idle timeout.
        if now - local.started_at < settings.idle_timeout_s and not self._ctx.stopping.is_set():
            return
        record = record or self._ctx.runners.get(local.name)
        if record and record.state is RunnerState.BUSY:
            local.busy = True
            return
        if self.noticed_warm(local, record):
            return
        if self.wanted_job(local, record) is None:
            self.reap(local)
            return
        # The demand it serves is still unmet: keep waiting, while GitHub still sees the runner
        # (a runner that never came online, or was deleted, would hold the demand for ever).
        if now - local.checked_at >= settings.idle_timeout_s:
            local.checked_at = now
            found = self.github_runner(local)
            if found is None or (isinstance(found, dict) and not found.get("busy")
                                 and found.get("status") != "online"):
                logger.warning("idle runner not online in GitHub: retired, its demand re-queued",
                               extra=local.log)
                self.retire(local, "runner_not_online")

    @staticmethod
    def noticed_warm(local: LocalRunner, record: RunnerRecord | None) -> bool:
        """The webhook made this runner warm (a warm runner took its job): it serves no job's
        demand from now on, and holds a warm seat."""
        if not (record and record.warm and record.state in (RunnerState.STARTING,
                                                            RunnerState.IDLE)):
            return False
        local.warm, local.spare = True, False
        local.job_id = local.generation = 0
        local.warm_since = record.warm_at or local.started_at
        logger.info("runner is now a warm runner", extra=local.log)
        return True

    def watch_warm(self, local: LocalRunner, now: float) -> None:
        """A warm runner serves no job's demand (no lease to renew). Reaped at once while
        draining; past its pool's `warm_idle_limit_s` idle it is retired (the keeper starts a
        fresh one), so none goes stale with GitHub; one that took a job meanwhile is busy."""
        draining = self._ctx.stopping.is_set()
        # Up to 10 % sooner, by the runner's name: warm runners started together do not all
        # leave (and their pool empty) at the same moment.
        limit = local.pool.warm_idle_limit_s * (0.9 + (zlib.crc32(local.name.encode()) % 100)
                                                / 1000)
        if not draining and now - local.warm_since < limit:
            return
        record = self._ctx.runners.get(local.name)
        if record and (record.state is RunnerState.BUSY or not record.warm):
            local.busy = True  # it took a job (the webhook released its warm seat)
            return
        if draining:
            self.reap(local)
            return
        self._ctx.metrics.warm_retired.labels(local.pool.name).inc()
        logger.info("warm runner idle past %.0fs: retired and replaced",
                    local.pool.warm_idle_limit_s, extra=local.log)
        self.reap(local)

    def github_runner(self, local: LocalRunner):
        return self._github.find(local.name, local.installation_id, local.scope,
                                 local.runner_id, local.log)

    def wanted_job(self, local: LocalRunner, record: RunnerRecord | None) -> JobRecord | None:
        """The job whose demand this runner still serves (the webhook may have handed it
        another job's demand), or None when it is surplus."""
        job_id, generation = local.serving(record)
        job = self._ctx.jobs.get(job_id)
        if job and job.state in WAITING_FOR_RUNNER and job.demand_generation == generation:
            return job
        return None

    def _deregister(self, local: LocalRunner) -> bool | None:
        assert local.runner_id is not None
        return self._github.delete(local.installation_id, local.scope, local.runner_id,
                                   local.name, local.log)

    def reap(self, local: LocalRunner) -> None:
        """A surplus idle runner: deregister it (GitHub refuses while busy), then stop it."""
        deleted = local.runner_id is None or self._deregister(local)
        if deleted is None:
            return
        if not deleted:
            local.busy = True  # GitHub says it is busy: it took a job
            return
        local.reaping = True
        self._ctx.metrics.reaped.labels(local.pool.name).inc()
        logger.info("reaping surplus idle runner", extra=local.log)
        self._ctx.containers.stop(local.name, timeout_s=10)

    def retire_safely(self, local: LocalRunner, reason: str) -> None:
        try:
            self.retire(local, reason)
        except Exception:
            self._ctx.metrics.errors.labels("retire").inc()
            logger.exception("retiring runner %s failed", local.name, extra=local.log)

    def retire(self, local: LocalRunner, reason: str) -> None:
        """Shutdown past the drain: deregister the runner (so it takes no job), stop its
        container, and hand the demand of a runner that had no job yet back to the queue."""
        local.reaping = True
        deregistered = False
        if local.runner_id is not None and not local.busy:
            deregistered = bool(self._deregister(local))
            if not deregistered:
                local.busy = True  # it took a job meanwhile (GitHub refused)
        self._ctx.containers.stop(local.name, timeout_s=10)
        if local.busy and local.runner_id is not None:
            self._deregister(local)  # a runner stopped mid-job may not have deregistered itself
        if deregistered:
            job = self.wanted_job(local, self._ctx.runners.get(local.name))
            if job is not None and self._waits_on(job, local.name):
                self._redemand.redemand(job, reason, local.pool.name)
        logger.info("runner retired: %s", reason, extra=local.log | {"busy": local.busy})

    def _waits_on(self, job: JobRecord, name: str) -> bool:
        """The job's demand is met by this runner only (or by this host's unstarted claim)."""
        if job.state is JobState.RUNNER_STARTED:
            return job.started_runner == name
        return job.state is JobState.CLAIMED and job.host_id == self._ctx.host_id

    def exited(self, local: LocalRunner, container: RunnerContainer | None) -> None:
        now = self._ctx.clock()
        exit_code = container.exit_code if container else None
        record = self._ctx.runners.get(local.name)
        ran_job = local.busy or (record is not None and record.state is RunnerState.BUSY)
        refused = None
        if not ran_job and not local.reaping and exit_code not in (0, None):
            # Read before the container is removed: GitHub refusing the runner's version.
            refused = rejected_version(self._ctx.containers.log_tail(local.name, TAIL_LINES))
            if refused is not None:
                self._ctx.metrics.runner_version_rejected(local.pool.name)
                logger.warning("GitHub refused runner version %s: pool %s's image is below "
                               "GitHub's minimum (alarm RunnerVersionTooOld)", refused,
                               local.pool.name, extra=local.log)
        self._ctx.runners.move(local.name, RunnerState.GONE, now, exit_code=exit_code,
                               reason="reaped" if local.reaping else "exited")
        self._ctx.containers.remove(local.name)
        if not ran_job and local.runner_id is not None:
            # An ephemeral runner deregisters itself after a job; one that ran none may not.
            self._deregister(local)
        self._registry.remove(local.name)
        self._slots.free(local.name, local.log)
        outcome = "job" if ran_job else ("reaped" if local.reaping else f"exit_{exit_code}")
        self._ctx.metrics.exited.labels(local.pool.name, outcome).inc()
        logger.info("runner exited: %s", outcome, extra=local.log | {"exit_code": exit_code})
        if local.warm:
            # A warm runner that ran a job or lived to be retired proved its pool's image and
            # registration; one that left on its own with an error did not (a broken image, a
            # refused registration): the keeper backs off. Exit 0 without a recorded job is a
            # job that ended before its in_progress was recorded.
            self.warm_ended(local.pool, ran_job or local.reaping or exit_code == 0)
        if ran_job or local.reaping or local.warm:
            return
        job = self.wanted_job(local, record)
        if job and job.state is JobState.RUNNER_STARTED and job.started_runner == local.name:
            # The runner left before GitHub gave it a job: the demand may still be unmet.
            if exit_code == 0:
                self._redemand.give_back(GiveBack(
                    job_id=job.job_id, generation=job.demand_generation,
                    runner=local.name, pool=local.pool.name, reason="exited_before_job"))
                return
            reason, stage = f"runner exited with {exit_code} before a job", "runner"
            if refused is not None:
                reason = f"GitHub refused runner version {refused} (below its minimum)"
                stage = "runner_version"
            self._redemand.start_failed(local.pool, job, reason, stage,
                                        {"pool": local.pool.name, "job_id": job.job_id})
