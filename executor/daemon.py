"""The executor loop: long-poll demand, claim it, start an ephemeral runner, watch it, clean up.

Threads: one poller per pool (never receives more messages than free slots), a worker pool that
serves messages, and the monitor (the caller of `run()`), which extends the visibility of held
messages, renews claim leases, notices exited containers and reaps surplus idle runners.
Every message is deleted, delayed or dead-lettered on every path: `_serve` ends in `finally`.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib import jobs as moves
from chalicelib.demand import DemandMessage, DemandQueue, redemand
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubApp, GitHubError, RunnerScope
from chalicelib.jobs import Change, JobStore
from chalicelib.pools import Pool
from chalicelib.runners import RunnerState, RunnerStore
from executor.containers import ContainerStartFailed, RunnerContainer, RunnerContainers, RunnerSpec
from executor.messages import Accepted, Malformed, TooNew, classify, drop_reason
from executor.metrics import ExecutorMetrics
from executor.queue import DemandConsumer, Received
from executor.settings import ExecutorSettings

logger = Logger(service="runnerhub-executor")

WAITING_FOR_RUNNER = frozenset({"received", "dispatched", "claimed", "runner_started"})


class Slots:
    """Runner slots on this host: taken when a message is received, held until its container
    exits. Pollers only wait for free slots; they never hold slots through a long poll, so an
    empty pool's queue can't starve a busy one."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._cond = threading.Condition()

    def wait_free(self, timeout_s: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._used < self.total, timeout=timeout_s)
            return self.total - self._used

    def try_take(self) -> bool:
        with self._cond:
            if self._used >= self.total:
                return False
            self._used += 1
            return True

    def release(self, count: int = 1) -> None:
        if count <= 0:
            return
        with self._cond:
            self._used = max(0, self._used - count)
            self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


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


@dataclass
class Held:
    """A message this host holds while it starts a runner for it."""

    received: Received
    extended_at: float
    done: bool = field(default=False)


def runner_name(job_id: int, generation: int) -> str:
    # Unique per attempt; GitHub refuses a duplicate name (409). At most 64 characters.
    return f"rh-{job_id}-{generation}-{secrets.token_hex(3)}"


def backoff_s(failures: int, base_s: float, most_s: float) -> float:
    return min(most_s, base_s * 2 ** max(0, failures - 1))


class Executor:
    def __init__(
        self,
        settings: ExecutorSettings,
        pools: tuple[Pool, ...],
        *,
        jobs: JobStore,
        runners: RunnerStore,
        consumer: DemandConsumer,
        demand: DemandQueue,
        github: GitHubApp,
        containers: RunnerContainers,
        metrics: ExecutorMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.pools = {pool.name: pool for pool in pools}
        self.host_id = settings.host_id
        self._jobs = jobs
        self._runners = runners
        self._consumer = consumer
        self._demand = demand
        self._github = github
        self._containers = containers
        self.metrics = metrics
        self._clock = clock
        self.slots = Slots(settings.slots)
        self._stopping = threading.Event()
        self._forced = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}
        self._local: dict[str, LocalRunner] = {}
        self._workers = ThreadPoolExecutor(settings.slots, thread_name_prefix="serve")
        metrics.slots_total.set(settings.slots)

    # --- lifecycle ---

    def run(self) -> None:
        """Serve until stopped; then drain (running jobs finish) and clean up."""
        self._containers.prepare()
        pollers = [
            threading.Thread(target=self._poll, args=(name,), name=f"poll-{name}", daemon=True)
            for name in self.pools
        ]
        for thread in pollers:
            thread.start()
        logger.info("executor started", extra={"host_id": self.host_id,
                                               "pools": list(self.pools),
                                               "slots": self.settings.slots})
        while not self._stopping.is_set():
            self._tick_safely()
            self._stopping.wait(self.settings.tick_s)
        for thread in pollers:
            thread.join(timeout=self.settings.poll_wait_s + 5)
        self._workers.shutdown(wait=True)
        self._drain()
        logger.info("executor stopped", extra={"host_id": self.host_id})

    def stop(self) -> None:
        """First call: stop receiving and drain. Second call: stop runners now."""
        if self._stopping.is_set():
            self._forced.set()
        self._stopping.set()

    def _drain(self) -> None:
        deadline = self._clock() + self.settings.drain_timeout_s
        while self._local and not self._forced.is_set() and self._clock() < deadline:
            self._tick_safely()
            self._forced.wait(self.settings.tick_s)
        for local in list(self._local.values()):
            self._retire(local, "shutdown")
        self._tick_safely()

    # --- receiving ---

    def _poll(self, pool: str) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.slots.wait_free(timeout_s=1.0)
            if not free:
                continue
            try:
                batch = self._consumer.receive(
                    pool, min(free, self.settings.receive_batch), self.settings.poll_wait_s,
                    self.settings.visibility_s,
                )
                failures = 0
            except DependencyUnavailable as exc:
                failures += 1
                logger.warning("receive failed: %s", exc, extra={"pool": pool})
                self._stopping.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            now = self._clock()
            for received in batch:
                if not self.slots.try_take():
                    # Another pool's poller took the slot meanwhile: let another host have it.
                    self.metrics.rejected.labels(pool, "no_free_slot").inc()
                    self._requeue(received, 0)
                    continue
                with self._lock:
                    self._held[received.receipt] = Held(received, now)
                self._workers.submit(self._serve, received)

    def _serve(self, received: Received) -> None:
        holds_slot = False
        try:
            holds_slot = self._serve_message(received)
        except Exception:
            self.metrics.errors.labels("serve").inc()
            logger.exception("serving a demand message failed", extra={"pool": received.pool})
            self._requeue(received, self.settings.start_backoff_s)
        finally:
            with self._lock:
                self._held.pop(received.receipt, None)
            if not holds_slot:
                self.slots.release()

    def _requeue(self, received: Received, delay_s: float) -> None:
        try:
            self._consumer.set_visibility(received, math.ceil(delay_s))
        except DependencyUnavailable as exc:
            logger.warning("could not requeue message (%s); it reappears after its timeout", exc)

    def _serve_message(self, received: Received) -> bool:
        """Handle one message; True when a runner now holds the slot."""
        pool = self.pools[received.pool]
        self.metrics.received.labels(pool.name).inc()
        verdict = classify(received.body, pool.name)
        if isinstance(verdict, Malformed):
            self.metrics.rejected.labels(pool.name, "malformed").inc()
            logger.warning("malformed demand message to the DLQ: %s", verdict.reason,
                           extra={"pool": pool.name, "message_id": received.message_id})
            self._consumer.dead_letter(received, verdict.reason)
            return False
        if isinstance(verdict, TooNew):
            self.metrics.rejected.labels(pool.name, "too_new").inc()
            logger.info("demand schema %s is newer than this executor; left for an upgraded one",
                        verdict.version, extra={"pool": pool.name})
            self._consumer.set_visibility(received, self.settings.newer_schema_delay_s)
            return False
        assert isinstance(verdict, Accepted)
        message = verdict.message
        log = {"pool": pool.name, "job_id": message.job_id, "generation": message.generation}
        if self._stopping.is_set():
            self._consumer.set_visibility(received, 0)  # another host takes it now
            return False
        now = self._clock()
        if message.not_before and message.not_before > now:
            self._consumer.set_visibility(received, math.ceil(message.not_before - now))
            return False
        claim = self._jobs.apply(
            message.job_id,
            moves.CLAIM,
            now,
            Change(fields={"host_id": self.host_id, "lease_until": now + self.settings.lease_s}),
            generation=message.generation,
        )
        if not claim.applied:
            reason = drop_reason(claim.job, message.generation)
            self.metrics.dropped.labels(pool.name, reason).inc()
            logger.info("demand dropped: %s", reason, extra=log)
            self._consumer.delete(received)
            return False
        return self._start_runner(pool, message, claim.job, received, log)

    # --- starting a runner ---

    def _start_runner(self, pool: Pool, message: DemandMessage, job: dict[str, Any],
                      received: Received, log: dict) -> bool:
        claimed_at = self._clock()
        name = runner_name(message.job_id, message.generation)
        owner, repo = message.repository.split("/", 1)
        scope = RunnerScope("org", owner) if pool.runner_scope == "org" else RunnerScope(
            "repo", owner, repo)
        stage, jit, installation = "github", None, message.installation_id
        try:
            if installation is None:
                installation = self._github.installation_for(owner, repo)
            self._runners.move(
                name, RunnerState.STARTING, claimed_at, pool=pool.name, host_id=self.host_id,
                job_id=message.job_id, generation=message.generation, image=pool.image,
            )
            jit = self._github.generate_jitconfig(
                installation, scope, name, pool.labels, pool.runner_group_id
            )
            jit_at = self._clock()
            if self.settings.register_only:
                return self._registered_only(message, name, jit, received, claimed_at, jit_at)
            stage = "docker"
            spec = RunnerSpec(
                name=name, image=pool.image, pool=pool.name, job_id=message.job_id,
                generation=message.generation, host_id=self.host_id, cpus=pool.cpus,
                memory_mb=pool.memory_mb, pids_limit=pool.pids_limit,
            )
            container_id = self._containers.start(spec, jit.encoded_jit_config)
        except (GitHubError, ContainerStartFailed, DependencyUnavailable) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self._cleanup_failed(name, installation, scope, jit.runner_id if jit else None,
                                 reason)
            self._start_failed(pool, job, reason, stage, log)
            self._consumer.delete(received)
            return False
        now = self._clock()
        with self._lock:
            self._local[name] = LocalRunner(
                name=name, pool=pool, job_id=message.job_id, generation=message.generation,
                installation_id=installation, scope=scope, runner_id=jit.runner_id,
                started_at=now, lease_renewed_at=now,
            )
        self._jobs.apply(message.job_id, moves.START_RUNNER, now,
                         Change(fields={"started_runner": name}),
                         generation=message.generation, host_id=self.host_id)
        # Stage timings for the pickup benchmark and dashboards.
        self._runners.move(name, RunnerState.IDLE, now, container_id=container_id,
                           runner_id=jit.runner_id, installation_id=installation,
                           jit_s=round(jit_at - claimed_at, 3),
                           container_start_s=round(now - jit_at, 3))
        self._consumer.delete(received)
        self.metrics.started.labels(pool.name).inc()
        self.metrics.start_seconds.labels(pool.name).observe(now - claimed_at)
        logger.info("runner started", extra=log | {"runner": name})
        return True

    def _registered_only(self, message: DemandMessage, name: str, jit: Any,
                         received: Received, claimed_at: float, jit_at: float) -> bool:
        """Benchmark mode (RUNNERHUB_REGISTER_ONLY): the JIT runner is registered with GitHub
        but no container starts; the demand counts as met and the slot is free again."""
        self._jobs.apply(message.job_id, moves.START_RUNNER, jit_at,
                         Change(fields={"started_runner": name}),
                         generation=message.generation, host_id=self.host_id)
        self._runners.move(name, RunnerState.GONE, jit_at, runner_id=jit.runner_id,
                           reason="register_only", jit_s=round(jit_at - claimed_at, 3))
        self._consumer.delete(received)
        self.metrics.started.labels(message.pool).inc()
        return False

    def _cleanup_failed(self, name: str, installation: int | None, scope: RunnerScope,
                        runner_id: int | None, reason: str) -> None:
        """Leave nothing behind from a failed start: container, file, GitHub runner, record."""
        try:
            self._containers.remove(name)
        except Exception as exc:  # noqa: BLE001 - clean-up is best effort; the monitor retries
            logger.warning("could not remove container %s: %s", name, exc)
        if runner_id is not None and installation is not None:
            try:
                self._github.delete_runner(installation, scope, runner_id)
            except GitHubError as exc:
                logger.warning("could not delete runner %s from GitHub: %s", name, exc)
        try:
            self._runners.move(name, RunnerState.GONE, self._clock(), reason=reason[:300])
        except DependencyUnavailable as exc:
            logger.warning("could not record runner %s gone: %s", name, exc)

    def _start_failed(self, pool: Pool, job: dict[str, Any], reason: str, stage: str,
                      log: dict) -> None:
        """Re-demand with backoff; after N failures in a row, flag the job (it stays open)."""
        failures = int(job.get("start_failures", 0)) + 1
        flagged = failures >= self.settings.max_start_failures
        now = self._clock()
        delay = backoff_s(failures, self.settings.start_backoff_s,
                          self.settings.max_start_backoff_s)
        self.metrics.start_failures.labels(pool.name, stage).inc()
        if flagged:
            self.metrics.flagged.labels(pool.name).inc()
        logger.warning("runner start failed at %s (%s); re-demand %d in %.1fs",
                       stage, reason[:200], failures, delay,
                       extra=log | {"start_failures": failures, "flagged": flagged})
        redemand(
            self._jobs, self._demand, job, now,
            reason=f"start_failed:{stage}", not_before=now + delay,
            fields={"start_failures": failures, "last_start_error": reason[:300],
                    "flagged": True if flagged else None},
        )

    # --- the monitor ---

    def _tick_safely(self) -> None:
        try:
            self._tick()
        except Exception:
            self.metrics.errors.labels("monitor").inc()
            logger.exception("monitor tick failed")

    def _tick(self) -> None:
        now = self._clock()
        self._extend_held(now)
        containers = {c.name: c for c in self._containers.managed(self.host_id)}
        for local in list(self._local.values()):
            container = containers.get(local.name)
            if container is None or container.finished:
                self._runner_exited(local, container)
            else:
                self._watch_runner(local, now)
        for container in containers.values():
            if container.name not in self._local and container.finished:
                self._containers.remove(container.name)  # a leftover of a failed start
        self.metrics.slots_busy.set(self.slots.used)

    def _extend_held(self, now: float) -> None:
        with self._lock:
            held = list(self._held.values())
        for item in held:
            if now - item.extended_at >= self.settings.visibility_s / 3:
                item.extended_at = now
                self._requeue(item.received, self.settings.visibility_s)

    def _watch_runner(self, local: LocalRunner, now: float) -> None:
        if local.busy or local.reaping:
            return
        record: dict | None = None
        if now - local.lease_renewed_at >= self.settings.lease_s / 3:
            # Renew the claim of the job this runner serves now (a hand-over may have changed
            # it); when the job has moved on there is nothing to renew until the next check.
            record = self._runners.get(local.name) or {}
            self._jobs.apply(
                int(record.get("job_id", local.job_id)), moves.RENEW_LEASE, now,
                Change(fields={"lease_until": now + self.settings.lease_s}),
                generation=int(record.get("generation", local.generation)),
                host_id=self.host_id,
            )
            local.lease_renewed_at = now
        if now - local.started_at < self.settings.idle_timeout_s:
            return
        record = record if record is not None else (self._runners.get(local.name) or {})
        if record.get("state") == RunnerState.BUSY:
            local.busy = True
            return
        if self._wanted_job(local, record) is not None:
            return  # the demand it serves is still unmet: keep waiting
        self._reap(local)

    def _wanted_job(self, local: LocalRunner, record: dict) -> dict | None:
        """The job whose demand this runner still serves (the webhook may have handed it
        another job's demand), or None when it is surplus."""
        job_id = int(record.get("job_id", local.job_id))
        generation = int(record.get("generation", local.generation))
        job = self._jobs.get(job_id)
        if (job and job.get("state") in WAITING_FOR_RUNNER
                and int(job.get("demand_generation", 0)) == generation):
            return job
        return None

    def _reap(self, local: LocalRunner) -> None:
        """A surplus idle runner: deregister it (GitHub refuses while busy), then stop it."""
        try:
            deleted = local.runner_id is None or self._github.delete_runner(
                local.installation_id, local.scope, local.runner_id
            )
        except GitHubError as exc:
            logger.warning("could not deregister idle runner %s: %s", local.name, exc)
            return
        if not deleted:
            local.busy = True  # GitHub says it is busy: it took a job
            return
        local.reaping = True
        self.metrics.reaped.labels(local.pool.name).inc()
        logger.info("reaping surplus idle runner", extra={"runner": local.name,
                                                          "pool": local.pool.name})
        self._containers.stop(local.name, timeout_s=10)

    def _retire(self, local: LocalRunner, reason: str) -> None:
        """Shutdown past the drain: stop the container and deregister its runner."""
        local.reaping = True
        self._containers.stop(local.name, timeout_s=10)
        if local.runner_id is not None:
            try:
                self._github.delete_runner(local.installation_id, local.scope, local.runner_id)
            except GitHubError as exc:
                logger.warning("could not deregister runner %s: %s", local.name, exc)
        logger.info("runner retired: %s", reason, extra={"runner": local.name})

    def _runner_exited(self, local: LocalRunner, container: RunnerContainer | None) -> None:
        now = self._clock()
        exit_code = container.exit_code if container else None
        record = self._runners.get(local.name) or {}
        ran_job = local.busy or record.get("state") == RunnerState.BUSY
        self._runners.move(local.name, RunnerState.GONE, now, exit_code=exit_code,
                           reason="reaped" if local.reaping else "exited")
        self._containers.remove(local.name)
        if not ran_job and local.runner_id is not None:
            try:  # an ephemeral runner deregisters itself after a job; one that ran none may not
                self._github.delete_runner(local.installation_id, local.scope, local.runner_id)
            except GitHubError as exc:
                logger.warning("could not deregister runner %s: %s", local.name, exc)
        with self._lock:
            self._local.pop(local.name, None)
        self.slots.release()
        outcome = "job" if ran_job else ("reaped" if local.reaping else f"exit_{exit_code}")
        self.metrics.exited.labels(local.pool.name, outcome).inc()
        logger.info("runner exited: %s", outcome,
                    extra={"runner": local.name, "job_id": local.job_id, "exit_code": exit_code})
        if ran_job or local.reaping or exit_code == 0:
            return
        job = self._wanted_job(local, record)
        if job and job.get("state") == "runner_started" and job.get("started_runner") == local.name:
            # The runner died before GitHub gave it a job: the demand is still unmet.
            self._start_failed(local.pool, job, f"runner exited with {exit_code} before a job",
                               "runner", {"pool": local.pool.name, "job_id": job["job_id"]})
