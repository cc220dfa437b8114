"""Claims of dead hosts: a demand message whose job another host's claim holds (a duplicate to
delete, an expired claim of a dead host to take over, or one to look at again later), and the
monitor's scan of hosts whose heartbeat stopped. The decisions are `executor.recovery`'s."""

from __future__ import annotations

import math

from aws_lambda_powertools import Logger

from chalicelib import jobs as moves
from chalicelib.demand import DemandMessage
from chalicelib.hosts import HostNotServing, HostState, host_alive
from chalicelib.jobs import Change, JobRecord, Transition
from chalicelib.pools import Pool
from executor import recovery
from executor.context import Context
from executor.github_runners import GitHubRunners
from executor.launch import Launcher
from executor.messages import Ack, Delay, Disposition, drop_reason
from executor.queue import Received
from executor.recovery import Drop, Retry, TakeOver
from executor.redemand import Redemand
from executor.registry import Registry

logger = Logger(service="runnerhub-executor")


class Takeover:
    def __init__(self, ctx: Context, registry: Registry, launcher: Launcher,
                 github: GitHubRunners, redemand: Redemand) -> None:
        self._ctx = ctx
        self._registry = registry
        self._launcher = launcher
        self._github = github
        self._redemand = redemand

    def on_refused(self, pool: Pool, message: DemandMessage, job: JobRecord | None,
                   received: Received, log: dict) -> Disposition:
        """Another claim holds the job: a live one (a duplicate message: delete it), an expired
        one of a dead host (take it over), or one not decidable yet (look again later)."""
        ctx = self._ctx
        holder = job.host_id if job else None
        claimant = None
        if (drop_reason(job, message.generation) == "claimed_already" and holder
                and holder != ctx.host_id):
            claimant = ctx.hosts.get(holder)
        now = ctx.clock()
        verdict = recovery.on_claim_refused(job, message.generation, ctx.host_id, claimant,
                                            self._registry.serves(message.job_id), now)
        if isinstance(verdict, Drop):
            ctx.metrics.dropped.labels(pool.name, verdict.reason).inc()
            logger.info("demand dropped: %s", verdict.reason, extra=log | {"holder": holder})
            return Ack()
        if isinstance(verdict, Retry):
            ctx.metrics.rejected.labels(pool.name, verdict.reason).inc()
            logger.info("claim held by %s (%s): look again in %.0fs", holder, verdict.reason,
                        verdict.after_s, extra=log)
            return Delay(math.ceil(verdict.after_s))
        assert isinstance(verdict, TakeOver)
        try:
            # Its runner starts here: a claim like any other (this host must be serving).
            taken = self._ctx.hosts.claim(
                ctx.host_id, ctx.jobs, message.job_id, moves.TAKEOVER, now,
                self._takeover_change(verdict.from_host, now),
                generation=message.generation, host_id=verdict.from_host)
        except HostNotServing as exc:
            self._launcher.not_serving(exc, log)
            return Delay(0)
        if not taken.applied:
            # Someone acted first (another takeover, a re-demand): decide again shortly.
            return Delay(math.ceil(recovery.MIN_RETRY_S))
        ctx.metrics.takeovers.labels(pool.name, "message").inc()
        logger.warning("took over the expired claim of dead host %s", verdict.from_host,
                       extra=log)
        assert taken.job is not None
        return self._launcher.launch(pool, message, taken.job, received, log)

    def _takeover_change(self, from_host: str, now: float) -> Change:
        return Change(fields={"host_id": self._ctx.host_id,
                              "lease_until": now + self._ctx.settings.lease_s,
                              "taken_over_from": from_host})

    def _take(self, job_id: int, generation: int, from_host: str, now: float) -> Transition:
        """A takeover to settle (re-demand), not to serve here: no runner starts on this host,
        so it needs no claim transaction."""
        return self._ctx.jobs.apply(job_id, moves.TAKEOVER, now,
                                    self._takeover_change(from_host, now),
                                    generation=generation, host_id=from_host)

    def scan_dead_hosts(self, now: float) -> None:
        """Hosts sharing a pool with this one whose heartbeat stopped: take over their expired
        claims (one conditional write each, so one executor acts), re-demand those GitHub still
        has queued, deregister their runners; mark the host lost once nothing is left."""
        ctx = self._ctx
        mine = frozenset(ctx.pools)
        for host in ctx.hosts.all():
            host_id = host.host_id
            if host_id == ctx.host_id or host.state is HostState.LOST:
                continue
            if host.state is HostState.STOPPED and host.clean:
                continue  # exited holding nothing
            if host_alive(host, now) or not mine & set(host.pools):
                continue
            plan = recovery.plan_dead_host(host, ctx.claims.open_claims(host_id),
                                           ctx.runners.on_host(host_id), mine, now)
            for job in plan.take_over:
                self._take_over_unserved(job, host_id, now)
            for record in plan.deregister:
                self._github.deregister_record(record, f"host_lost:{host_id}")
            if plan.take_over or plan.deregister:
                logger.warning("recovered from dead host %s: %d claim(s) taken over, %d "
                               "runner(s) deregistered, %d claim(s) still waiting", host_id,
                               len(plan.take_over), len(plan.deregister), plan.waiting,
                               extra={"dead_host": host_id})
            if plan.nothing_left and ctx.hosts.mark_lost(
                    host_id, host.heartbeat_at, now, ctx.host_id):
                ctx.metrics.hosts_lost.inc()
                logger.warning("host %s marked lost: nothing of it left", host_id,
                               extra={"dead_host": host_id})

    def _take_over_unserved(self, job: JobRecord, from_host: str, now: float) -> None:
        taken = self._take(job.job_id, job.demand_generation, from_host, now)
        if not taken.applied or taken.job is None:
            return  # another executor took it, or it moved on
        self._ctx.metrics.takeovers.labels(str(job.pool), "scan").inc()
        outcome = self._redemand.settle(taken.job, f"host_lost:{from_host}")
        logger.warning("took over the expired claim of dead host %s: %s", from_host, outcome,
                       extra={"job_id": job.job_id, "pool": job.pool})
