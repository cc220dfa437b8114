"""What a previous daemon on this host left: at start-up its containers (adopted when their
runner is still registered and healthy, else removed with their runner), runners without a
container and JIT config files; at start-up and then periodically, claims of this host that
nothing of this daemon serves. The decisions are `executor.recovery`'s."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from aws_lambda_powertools import Logger

from chalicelib import jobs as moves
from chalicelib.jobs import Change, JobState
from chalicelib.runners import RunnerRecord, RunnerState
from executor import recovery
from executor.containers import RunnerContainer
from executor.context import Context
from executor.github_runners import GitHubRunners, record_scope, runner_scope
from executor.recovery import Adopt, Discard
from executor.redemand import Redemand
from executor.registry import LocalRunner, Registry, RunnerWatch
from executor.slots import Slots

logger = Logger(service="runnerhub-executor")

COUNTS = ("adopted", "adopted_busy", "discarded", "exited", "runners_deregistered",
          "claims_redemanded", "claims_left", "files_removed")


# A runner record of this host older than this with no local runner is an orphan (no start
# takes this long: a JIT config and a container start).
ORPHAN_RECORD_AGE_S = 300.0


class Adoption:
    def __init__(self, ctx: Context, registry: Registry, slots: Slots, watch: RunnerWatch,
                 github: GitHubRunners, redemand: Redemand) -> None:
        self._ctx = ctx
        self._registry = registry
        self._slots = slots
        self._watch = watch
        self._github = github
        self._redemand = redemand
        # Names of warm runners being started (the launcher's): their records come first.
        self.starting_warm: Callable[[], Iterable[str]] = lambda: ()

    def adopt(self) -> dict[str, int]:
        """Everything a previous daemon on this host left. Returns the counts (also logged)."""
        ctx = self._ctx
        now = ctx.clock()
        counts = dict.fromkeys(COUNTS, 0)
        containers = ctx.containers.managed(ctx.host_id)
        records = {r.runner_name: r for r in ctx.runners.on_host(ctx.host_id)}
        for container in containers:
            record = records.get(container.name) or ctx.runners.get(container.name)
            what = self._container(container, record, now)
            if what in counts:
                counts[what] += 1
        present = {c.name for c in containers}
        for name, record in records.items():
            if name not in present and record.state is not RunnerState.GONE:
                if self._github.deregister_record(record, "abandoned:no_container"):
                    counts["runners_deregistered"] += 1
        for _, outcome in self.orphan_claims(now, at_start=True):
            counts["claims_redemanded" if outcome == "redemanded" else "claims_left"] += 1
        counts["files_removed"] = len(ctx.containers.remove_stray_files(
            set(self._registry.local)))
        logger.info("start-up adoption: %s", counts, extra={"host_id": ctx.host_id,
                                                            "adoption": counts})
        return counts

    def _container(self, container: RunnerContainer, record: RunnerRecord | None, now: float
                   ) -> str:
        """One container of a previous daemon; what became of it (a key of the counts, or
        `left` when a busy runner of an unserved pool is left to finish)."""
        ctx = self._ctx
        local = self._local_from(container, record)
        log = local.log if local else {"runner": container.name}
        if container.finished:
            ctx.metrics.adoption.labels("exited").inc()
            if local is None:
                ctx.containers.remove(container.name)
                return "exited"
            self._slots.force_take(local.name)
            self._registry.add(local)
            self._watch.exited(local, container)
            return "exited"
        if container.status == "created":
            # The previous daemon died between creating and starting it: it never runs.
            verdict: Adopt | Discard = Discard("never_started")
        else:
            found = self._watch.github_runner(local) if local else recovery.UNKNOWN
            verdict = recovery.adopt_or_discard(record, found, container.age_s(now),
                                                ctx.settings.adopt_grace_s, local is not None)
        if isinstance(verdict, Adopt) and local is None:
            # Busy in a pool this host no longer serves: let its job finish; the monitor
            # removes the container once it exited (ephemeral: it deregisters itself).
            logger.warning("busy runner of an unserved pool left to finish", extra=log)
            return "left"
        if isinstance(verdict, Adopt):
            assert local is not None
            self._adopt_runner(local, container, record, verdict.busy, now)
            ctx.metrics.adoption.labels("adopted").inc()
            return "adopted_busy" if verdict.busy else "adopted"
        ctx.metrics.adoption.labels("discarded").inc()
        logger.warning("container of a previous daemon removed: %s", verdict.reason, extra=log)
        ctx.containers.stop(container.name, timeout_s=5)
        ctx.containers.remove(container.name)
        if record and record.state is not RunnerState.GONE:
            self._github.deregister_record(record, f"abandoned:{verdict.reason}")
        return "discarded"

    def orphan_claims(self, now: float, *, at_start: bool) -> list[tuple[int, str]]:
        """Claims of this host that no runner or serving thread of this daemon serves: a
        previous daemon here held them. Re-demanded if GitHub still has the job queued."""
        ctx = self._ctx
        claims = ctx.claims.open_claims(ctx.host_id)
        served, names = self._registry.served()
        settled = []
        for job in recovery.orphan_claims(claims, served, names, now, at_start=at_start):
            log = {"job_id": job.job_id, "pool": job.pool}
            if job.pool not in ctx.pools:
                logger.warning("claim of job %s is for pool %s, not served here any more",
                               job.job_id, job.pool, extra=log)
                continue
            outcome = self._redemand.settle(job, "previous_daemon")
            if outcome != "redemanded":
                # Look again after a lease, not at every scan.
                ctx.jobs.apply(job.job_id, moves.RENEW_LEASE, now,
                               Change(fields={"lease_until": now + ctx.settings.lease_s}),
                               generation=job.demand_generation, host_id=ctx.host_id)
            settled.append((job.job_id, outcome))
            logger.info("unserved claim of a previous daemon: %s", outcome, extra=log)
        return settled

    def _local_from(self, container: RunnerContainer, record: RunnerRecord | None
                    ) -> LocalRunner | None:
        """The local runner of a container, from its runner record (or, without one, from
        the container's labels and its job's record)."""
        labels = container.labels
        pool = self._ctx.pools.get(
            str((record and record.pool) or labels.get("runnerhub.pool")))
        if pool is None:
            return None
        job_id = int((record and record.job_id) or labels.get("runnerhub.job") or 0)
        generation = int((record and record.generation)
                         or labels.get("runnerhub.generation") or 0)
        scope = record_scope(record) if record else None
        if scope is None:
            job = self._ctx.jobs.get(job_id)
            repository = (record and record.repository) or (job and job.repository)
            if not repository:
                return None
            scope = runner_scope(pool, repository)
        started = container.started_at or (record and record.starting_at) or self._ctx.clock()
        warm = bool(record and record.warm)
        return LocalRunner(
            name=container.name, pool=pool, job_id=0 if warm else job_id,
            generation=0 if warm else generation,
            installation_id=(record and record.installation_id) or 0,
            scope=scope, runner_id=record.runner_id if record else None,
            started_at=started, lease_renewed_at=-math.inf,
            warm=warm, warm_since=(record and record.warm_at) or started,
        )

    def orphan_records(self, now: float) -> int:
        """Runner records of this host that no local runner and no start in flight explains
        (a start whose clean-up could not record it gone): ended, so the seats they hold go
        back to their pools. Only records older than ORPHAN_RECORD_AGE_S: a start writes its
        record before its container exists."""
        records = [r for r in self._ctx.runners.on_host(self._ctx.host_id)
                   if r.state is not RunnerState.GONE
                   and now - (r.starting_at or now) >= ORPHAN_RECORD_AGE_S]
        if not records:
            return 0
        # Read after the records: a runner added meanwhile is in these, not mistaken.
        served, local = self._registry.served()
        live = {c.name for c in self._ctx.containers.managed(self._ctx.host_id)
                if not c.finished}  # e.g. a busy runner of a pool no longer served here
        ended = 0
        for record in records:
            name = record.runner_name
            if (name in local or name in live or name in self.starting_warm()
                    or (record.job_id is not None and record.job_id in served)):
                continue
            if self._github.deregister_record(record, "orphan_record"):
                ended += 1
                logger.warning("runner record without a runner on this host ended",
                               extra={"runner": record.runner_name, "pool": record.pool})
        return ended

    def _adopt_runner(self, local: LocalRunner, container: RunnerContainer,
                      record: RunnerRecord | None, busy: bool, now: float) -> None:
        ctx = self._ctx
        local.busy = busy
        if local.runner_id is None:
            found = self._watch.github_runner(local)
            if isinstance(found, dict):
                local.runner_id = int(found["id"])
        self._slots.force_take(local.name)
        self._registry.add(local)
        if record and record.state is RunnerState.STARTING:
            ctx.runners.move(local.name, RunnerState.IDLE, now,
                             container_id=container.container_id, runner_id=local.runner_id)
        job = ctx.jobs.get(local.job_id)
        if (job and job.state is JobState.CLAIMED and job.host_id == ctx.host_id
                and job.demand_generation == local.generation):
            ctx.jobs.apply(local.job_id, moves.START_RUNNER, now,
                           Change(fields={"started_runner": local.name}),
                           generation=local.generation, host_id=ctx.host_id)
        logger.info("adopted the runner of a previous daemon",
                    extra=local.log | {"busy": busy})

