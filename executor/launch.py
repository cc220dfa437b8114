"""Starting a runner for a demand message: claim the job's generation, register a JIT runner with
GitHub, start its container, record it; leave nothing behind when a start fails (and re-demand
with backoff); hand the claim back when the daemon is draining.

`Launcher` is the production path. A test or benchmark harness passes its own subclass to the
`Executor` (devstack/test_executor.py): `before_start` and `registered` are its hooks."""

from __future__ import annotations

import secrets

from aws_lambda_powertools import Logger

from chalicelib import jobs as moves
from chalicelib.demand import DemandMessage
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError, JitRunner, RunnerScope
from chalicelib.hosts import HostNotServing
from chalicelib.jobs import Change, JobRecord, Transition
from chalicelib.overrides import effective_image
from chalicelib.pools import Pool
from chalicelib.runners import NoSeat, RunnerExists, RunnerState
from executor.containers import ContainerStartFailed, RunnerSpec, pool_profile
from executor.context import Context
from executor.github_runners import GitHubRunners, runner_scope
from executor.image_scan import ImageGate
from executor.messages import Ack, Delay, Disposition
from executor.queue import Received
from executor.redemand import Redemand, backoff_s
from executor.registry import LocalRunner, Registry
from executor.slots import Slots

logger = Logger(service="runnerhub-executor")

# A claim that fails because the jobs store is unavailable is tried again after this long,
# doubling up to the most, while its message stays held (see `Launcher.claim`).
CLAIM_RETRY_S = 1.0
CLAIM_RETRY_MAX_S = 30.0
# A claimed job whose pool is at `max_runners` asks for a runner seat again this often while
# its message stays held (the monitor extends its visibility).
SEAT_RETRY_S = 1.0


def runner_name(job_id: int, generation: int) -> str:
    # Unique per attempt; GitHub refuses a duplicate name (409). At most 64 characters.
    return f"rh-{job_id}-{generation}-{secrets.token_hex(3)}"


def warm_runner_name(pool: str) -> str:
    # A warm runner serves no job yet: named for its pool (40 characters at most) instead.
    return f"rh-warm-{pool}-{secrets.token_hex(4)}"


class Launcher:
    def __init__(self, ctx: Context, registry: Registry, slots: Slots, github: GitHubRunners,
                 redemand: Redemand) -> None:
        self.ctx = ctx
        # Warm runners being started (their records exist before their containers do).
        self.starting_warm: set[str] = set()
        self._registry = registry
        self._slots = slots
        self._github = github
        self._redemand = redemand
        # The pool image's ECR scan, checked before each start (executor/image_scan.py).
        self.images = ImageGate.from_settings(ctx.settings)

    def claim(self, message: DemandMessage, log: dict) -> Transition | None:
        """Claim the job's generation: one transaction with the condition that this host's
        record is `serving` (`HostStore.claim`), so a claim racing the scaler's retirement of
        this host either keeps the host or leaves the demand for another host.

        While the jobs store is unavailable the claim is tried again with backoff and the
        message stays held (the monitor extends its visibility): made visible again, each
        receive would count towards the DLQ, and an outage of a few receives would dead-letter
        waiting demand. None when the executor stops meanwhile or this host may not claim
        (retiring, lost): the message is made visible again for another host."""
        failures = 0
        beaten = False
        while True:
            now = self.ctx.clock()
            try:
                return self.ctx.hosts.claim(
                    self.ctx.host_id, self.ctx.jobs, message.job_id, moves.CLAIM, now,
                    Change(fields={"host_id": self.ctx.host_id,
                                   "lease_until": now + self.ctx.settings.lease_s}),
                    generation=message.generation,
                )
            except HostNotServing as exc:
                if exc.state is None and not beaten:
                    beaten = True  # no record yet (the first heartbeat failed): write it now
                    self.ctx.beat()
                    continue
                self.not_serving(exc, log)
                return None
            except DependencyUnavailable as exc:
                failures += 1
                delay = backoff_s(failures, CLAIM_RETRY_S, CLAIM_RETRY_MAX_S)
                self.ctx.metrics.claim_retries.labels(message.pool).inc()
                logger.warning("claim failed (%s); message held, claim %d tried again in "
                               "%.1fs", exc, failures + 1, delay, extra=log)
            if self.ctx.stopping.wait(delay):
                return None

    def not_serving(self, exc: HostNotServing, log: dict) -> None:
        """This host's record refused a claim: receive nothing until a heartbeat finds it
        serving again (the scaler retiring it, or it was declared lost)."""
        self.ctx.receiving.clear()
        logger.info("claim refused: %s; demand left for another host", exc, extra=log)

    def launch(self, pool: Pool, message: DemandMessage, job: JobRecord,
               received: Received, log: dict) -> Disposition:
        """The job is claimed by this host: start its runner. `Ack(runner)` when the runner now
        holds the message's slot."""
        with self._registry.starting(message.job_id):
            claimed_at = self.ctx.clock()
            self.before_start(message)
            if self.ctx.stopping.is_set():
                return self._release(pool, message, log)
            return self._start(pool, message, job, received.receipt, claimed_at, log)

    def image(self, pool: Pool) -> str:
        """The image a new runner of `pool` starts with: the pool's image override (set
        through the management API or by the image refresh; read at most every
        OVERRIDES_REFRESH_S), else the pools file's."""
        return effective_image(pool, self.ctx.warm_targets.overrides(pool))

    def before_start(self, message: DemandMessage) -> None:
        """A harness's hook: a test launcher waits here to hold unstarted claims longer."""

    def registered(self, message: DemandMessage, name: str, jit: JitRunner,
                   claimed_at: float, jit_at: float) -> Disposition | None:
        """A harness's hook once the JIT runner is registered: a disposition ends the start
        here (a benchmark starts no container); None starts the container."""
        return None

    def _start(self, pool: Pool, message: DemandMessage, job: JobRecord, receipt: str,
               claimed_at: float, log: dict) -> Disposition:
        ctx = self.ctx
        name = runner_name(message.job_id, message.generation)
        scope = runner_scope(pool, message.repository)
        owner, repo = scope.owner, message.repository.partition("/")[2]
        stage, jit, installation = "image", None, message.installation_id
        image = self.image(pool)
        try:
            # Before anything is registered: a refused image costs no GitHub call.
            self.images.check(image, log)
            stage = "github"
            if installation is None:
                installation = ctx.github.installation_for(owner, repo)
            if not self._seat(name, pool, claimed_at, log, host_id=ctx.host_id,
                              job_id=message.job_id, generation=message.generation,
                              image=image, installation_id=installation,
                              repository=message.repository, scope_level=scope.level):
                return self._release(pool, message, log, "no runner seat")
            jit = ctx.github.generate_jitconfig(
                installation, scope, name, pool.labels, pool.runner_group_id
            )
            jit_at = ctx.clock()
            done = self.registered(message, name, jit, claimed_at, jit_at)
            if done is not None:
                return done
            stage = "docker"
            spec = RunnerSpec(
                name=name, image=image, pool=pool.name, job_id=message.job_id,
                generation=message.generation, host_id=ctx.host_id, cpus=pool.cpus,
                memory_mb=pool.memory_mb, pids_limit=pool.pids_limit,
                deployment=ctx.settings.deployment, **pool_profile(pool),
            )
            container_id = ctx.containers.start(spec, jit.encoded_jit_config)
        except (GitHubError, ContainerStartFailed, DependencyUnavailable) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self._clean_up(name, installation, scope, jit.runner_id if jit else None, reason,
                           log)
            self._redemand.start_failed(pool, job, reason, stage, log)
            return Ack()
        now = ctx.clock()
        self._registry.add(LocalRunner(
            name=name, pool=pool, job_id=message.job_id, generation=message.generation,
            installation_id=installation, scope=scope, runner_id=jit.runner_id,
            started_at=now, lease_renewed_at=now,
        ))
        # From here the runner holds the message's slot, until its container exits.
        self._slots.hand_over(receipt, name)
        try:
            started = ctx.jobs.apply(message.job_id, moves.START_RUNNER, now,
                                     Change(fields={"started_runner": name}),
                                     generation=message.generation, host_id=ctx.host_id)
            # Stage timings for the pickup benchmark and dashboards.
            ctx.runners.move(name, RunnerState.IDLE, now, container_id=container_id,
                             runner_id=jit.runner_id, installation_id=installation,
                             jit_s=round(jit_at - claimed_at, 3),
                             container_start_s=round(now - jit_at, 3))
            if not started.applied:
                # Another runner (a warm one, most often) took the job meanwhile: this one is
                # spare, the warm pool's replacement if it has room (`executor.warm`).
                self.spare(name, now)
        except DependencyUnavailable as exc:
            # The runner is up and holds its slot: the message is served. The claim's lease
            # (renewed by the monitor) and the job's own webhooks carry the job on.
            ctx.metrics.errors.labels("records").inc()
            logger.warning("runner started; its records were not written: %s", exc,
                           extra=log | {"runner": name})
        ctx.metrics.runner_started(pool.name, now - claimed_at, now - message.created_at)
        logger.info("runner started", extra=log | {"runner": name})
        return Ack(runner=name)

    def spare(self, name: str, now: float) -> None:
        """A hook the daemon sets: a runner whose job another runner took (`executor.warm`)."""

    def _seat(self, name: str, pool: Pool, now: float, log: dict, **fields) -> bool:
        """Create the runner's record holding one of the pool's runner seats; while the pool is
        at `max_runners` (across every host) wait for one, holding the message and renewing
        the claim's lease. False when the daemon stops meanwhile, or the job moves on (a warm
        runner took it, a re-demand superseded the claim): the claim is then handed back."""
        job_id, generation = fields["job_id"], fields["generation"]
        waited = False
        renewed = now
        while True:
            try:
                self.ctx.runners.start(name, now, pool=pool.name,
                                       max_runners=pool.max_runners, **fields)
                return True
            except RunnerExists:
                # An earlier try committed and its answer was lost: the seat is ours if the
                # record is (the name is unique to this start).
                found = self.ctx.runners.get(name)
                return bool(found and found.host_id == self.ctx.host_id
                            and found.job_id == job_id and found.seat)
            except NoSeat:
                if not waited:
                    waited = True
                    self.ctx.metrics.seat_waits.labels(pool.name).inc()
                    logger.info("pool at max_runners (%d): the claim waits for a seat",
                                pool.max_runners, extra=log)
            except DependencyUnavailable as exc:
                # Contention on the pool's counter, or an outage: not a failed start.
                logger.warning("runner seat not taken (%s); tried again", exc, extra=log)
            if self.ctx.stopping.wait(SEAT_RETRY_S):
                return False
            now = self.ctx.clock()
            if now - renewed >= self.ctx.settings.lease_s / 3:
                try:
                    moved = self.ctx.jobs.apply(
                        job_id, moves.RENEW_LEASE, now,
                        Change(fields={"lease_until": now + self.ctx.settings.lease_s}),
                        generation=generation, host_id=self.ctx.host_id)
                except DependencyUnavailable as exc:
                    logger.warning("lease not renewed (%s); tried again", exc, extra=log)
                    continue
                renewed = now
                if not moved.applied:
                    logger.info("claim moved on while waiting for a seat", extra=log)
                    return False

    def start_warm(self, pool: Pool, warm_limit: int, name: str) -> str:
        """Start one warm runner of `pool` (`executor.warm` holds its slot): registered with
        the pool's labels in the pool's scope before any job, holding a runner seat and one of
        the pool's `warm_limit` warm seats. `started`, `no_seat` (the pool has none free), or
        `failed` (nothing left behind)."""
        ctx = self.ctx
        owner = pool.scope.owner
        repo = pool.scope.repositories[0] if pool.runner_scope == "repo" else None
        scope = runner_scope(pool, f"{owner}/{repo or ''}")
        log = {"runner": name, "pool": pool.name}
        now = ctx.clock()
        installation, jit = None, None
        image = self.image(pool)
        try:
            installation = ctx.github.installation_for(owner, repo)
        except (GitHubError, DependencyUnavailable) as exc:
            logger.warning("warm runner not started: %s", exc, extra=log)
            return "failed"
        try:
            self.images.check(image, log)
        except ContainerStartFailed as exc:
            ctx.metrics.start_failures.labels(pool.name, "warm_image").inc()
            logger.warning("warm runner not started: %s", exc.reason, extra=log)
            return "failed"
        stage = "seat"
        try:
            ctx.runners.start(name, now, pool=pool.name, max_runners=pool.max_runners,
                              warm_limit=warm_limit, host_id=ctx.host_id, image=image,
                              installation_id=installation,
                              repository=f"{owner}/{repo or ''}", scope_level=scope.level)
        except NoSeat:
            return "no_seat"
        except DependencyUnavailable as exc:
            # The write may have committed before the answer was lost: end it if so.
            self._clean_up(name, installation, scope, None, str(exc), log)
            logger.warning("warm runner not started: %s", exc, extra=log)
            return "failed"
        try:
            stage = "github"
            jit = ctx.github.generate_jitconfig(installation, scope, name, pool.labels,
                                                pool.runner_group_id)
            jit_at = ctx.clock()
            stage = "docker"
            spec = RunnerSpec(
                name=name, image=image, pool=pool.name, job_id=0, generation=0,
                host_id=ctx.host_id, cpus=pool.cpus, memory_mb=pool.memory_mb,
                pids_limit=pool.pids_limit, deployment=ctx.settings.deployment,
                **pool_profile(pool),
            )
            container_id = ctx.containers.start(spec, jit.encoded_jit_config)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the seat must be given back
            # A seat write that timed out may have committed: clean-up ends the record if so.
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            self._clean_up(name, installation, scope, jit.runner_id if jit else None, reason,
                           log)
            ctx.metrics.start_failures.labels(pool.name, f"warm_{stage}").inc()
            logger.warning("warm runner failed to start (%s): %s", stage, reason, extra=log)
            return "failed"
        started = ctx.clock()
        self._registry.add(LocalRunner(
            name=name, pool=pool, job_id=0, generation=0, installation_id=installation,
            scope=scope, runner_id=jit.runner_id, started_at=started,
            lease_renewed_at=started, warm=True, warm_since=started,
        ))
        try:
            ctx.runners.move(name, RunnerState.IDLE, started, container_id=container_id,
                             runner_id=jit.runner_id, jit_s=round(jit_at - now, 3),
                             container_start_s=round(started - jit_at, 3))
        except DependencyUnavailable as exc:
            ctx.metrics.errors.labels("records").inc()
            logger.warning("warm runner started; its record was not updated: %s", exc,
                           extra=log)
        ctx.metrics.warm_started.labels(pool.name).inc()
        logger.info("warm runner started", extra=log)
        return "started"

    def _release(self, pool: Pool, message: DemandMessage, log: dict,
                 why: str = "draining") -> Disposition:
        """Draining before the runner started (or no runner seat came): hand the claim back
        and make the message visible at once, so another executor claims the same
        generation (or, the job moved on, drops it)."""
        self.ctx.jobs.apply(message.job_id, moves.RELEASE, self.ctx.clock(),
                            generation=message.generation, host_id=self.ctx.host_id)
        self.ctx.metrics.released.labels(pool.name).inc()
        logger.info("claim released: %s", why, extra=log)
        return Delay(0)

    def _clean_up(self, name: str, installation: int | None, scope: RunnerScope,
                  runner_id: int | None, reason: str, log: dict) -> None:
        """Leave nothing behind from a failed start: container, file, GitHub runner, record."""
        log = log | {"runner": name}
        try:
            self.ctx.containers.remove(name)
        except Exception as exc:  # noqa: BLE001 - clean-up is best effort; the monitor retries
            logger.warning("could not remove container %s: %s", name, exc, extra=log)
        if runner_id is not None and installation is not None:
            self._github.delete(installation, scope, runner_id, name, log)
        try:
            self.ctx.runners.move(name, RunnerState.GONE, self.ctx.clock(), reason=reason[:300])
        except DependencyUnavailable as exc:
            logger.warning("could not record runner %s gone: %s", name, exc, extra=log)
