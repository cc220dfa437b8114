"""The executor loop: long-poll demand, claim it, start an ephemeral runner, watch it, clean up.

Threads: one poller per pool (never receives more messages than free slots), a worker pool that
serves messages, and the monitor (the caller of `run()`), which writes the host's heartbeat,
extends the visibility of held messages, renews claim leases, notices exited containers, reaps
surplus idle runners and recovers what dead hosts (or a previous daemon on this host) left.
Every message is deleted, delayed, made visible again or dead-lettered on every path: `_serve`
ends in `finally`, and shutdown returns whatever is still held.

Life of a daemon (docs/operations.md):
- start: heartbeat, then adoption: containers a previous daemon on this host left are adopted
  when their runner is still registered and healthy, else removed with their runner; claims of
  this host nobody serves any more are re-demanded if GitHub still has the job queued;
- serve: as above; the monitor takes over expired claims of hosts whose heartbeat stopped;
- first SIGTERM: stop receiving; demand received but not started is made visible again at once
  (a claim is released); running jobs finish for up to `drain_timeout_s` while heartbeats go on;
- second SIGTERM or the drain timeout: runners are deregistered and stopped (the demand of those
  that had no job yet is re-demanded); then the daemon exits.
The decisions about others' claims and runners are pure functions in `executor.recovery`.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from aws_lambda_powertools import Logger

import executor
from chalicelib import jobs as moves
from chalicelib.demand import (
    DEMAND_SCHEMA_VERSION,
    DemandMessage,
    DemandQueue,
    dispatch,
    redemand,
)
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubApp, GitHubError, RunnerScope
from chalicelib.hosts import ClaimIndex, Heartbeat, HostState, HostStore, host_alive
from chalicelib.jobs import Change, JobState, JobStore, Transition
from chalicelib.pools import Pool
from chalicelib.resources import DEMAND_MAX_RECEIVES
from chalicelib.runners import RunnerState, RunnerStore
from executor import messages, recovery
from executor.containers import (
    ContainerStartFailed,
    RunnerContainer,
    RunnerContainers,
    RunnerSpec,
)
from executor.messages import Accepted, Malformed, TooNew, classify, drop_reason
from executor.metrics import ExecutorMetrics
from executor.queue import DemandConsumer, Received
from executor.recovery import Adopt, Discard, Drop, GiveBack, Retry, TakeOver
from executor.settings import ExecutorSettings

logger = Logger(service="runnerhub-executor")

WAITING_FOR_RUNNER = frozenset({"received", "dispatched", "claimed", "runner_started"})
# How long shutdown waits for the last pollers and serving threads, beyond one long poll.
STOP_RECEIVING_MARGIN_S = 30.0
# How long shutdown waits for retired containers to be seen exited.
RETIRE_WAIT_S = 30.0
# A message received when another pool's poller just took the last slot is held this long for
# a slot before it is returned to the queue (see `_wait_for_slot`).
SLOT_WAIT_S = 5.0
# A claim that fails because the jobs store is unavailable is tried again after this long,
# doubling up to the most, while its message stays held (see `_claim`).
CLAIM_RETRY_S = 1.0
CLAIM_RETRY_MAX_S = 30.0


class Slots:
    """Runner slots on this host: taken when a message is received, held until its container
    exits. Pollers only wait for free slots; they never hold slots through a long poll, so an
    empty pool's queue can't starve a busy one.

    Each slot has one holder: the message's receipt handle, then (`hand_over`) the name of the
    runner started for it. A slot is released once, by its holder; releasing for anything that
    holds none is refused (`release` returns False, the daemon counts it), never clamped, so a
    double release can't let the host over-commit."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._holders: set[str] = set()
        self._cond = threading.Condition()

    def _take(self, holder: str) -> None:
        if holder in self._holders:
            raise ValueError(f"{holder} already holds a slot")
        self._holders.add(holder)

    def wait_free(self, timeout_s: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: len(self._holders) < self.total, timeout=timeout_s)
            return max(0, self.total - len(self._holders))

    def try_take(self, holder: str) -> bool:
        with self._cond:
            if len(self._holders) >= self.total:
                return False
            self._take(holder)
            return True

    def take(self, holder: str, timeout_s: float | None, cancel: threading.Event) -> bool:
        """Wait for a free slot and take it; False after `timeout_s` (None: no limit) or once
        `cancel` is set."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while len(self._holders) >= self.total:
                if cancel.is_set():
                    return False
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._take(holder)
            return True

    def force_take(self, holder: str) -> None:
        """An adopted runner holds a slot even if it overfills the host (slots were lowered)."""
        with self._cond:
            self._take(holder)

    def hand_over(self, holder: str, to: str) -> bool:
        """`to` (a runner) now holds the slot `holder` (its message) held. False when `holder`
        held none: `to` then takes one anyway (a running container always holds a slot)."""
        with self._cond:
            held = holder in self._holders
            self._holders.discard(holder)
            self._take(to)
            return held

    def holds(self, holder: str) -> bool:
        with self._cond:
            return holder in self._holders

    def release(self, holder: str) -> bool:
        """Free the slot `holder` holds; False (nothing changes) when it holds none."""
        with self._cond:
            if holder not in self._holders:
                return False
            self._holders.remove(holder)
            self._cond.notify_all()
            return True

    @property
    def used(self) -> int:
        return len(self._holders)


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


def runner_scope(pool: Pool, repository: str) -> RunnerScope:
    owner, _, repo = repository.partition("/")
    return RunnerScope("org", owner) if pool.runner_scope == "org" else RunnerScope(
        "repo", owner, repo)


def record_scope(record: dict) -> RunnerScope | None:
    """The scope a runner was registered in, as its record says (None for older records)."""
    level, repository = record.get("scope_level"), record.get("repository")
    if level not in ("org", "repo") or not repository:
        return None
    owner, _, repo = str(repository).partition("/")
    return RunnerScope(level, owner, repo if level == "repo" else None)


class Executor:
    def __init__(
        self,
        settings: ExecutorSettings,
        pools: tuple[Pool, ...],
        *,
        jobs: JobStore,
        runners: RunnerStore,
        hosts: HostStore,
        claims: ClaimIndex,
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
        self._hosts = hosts
        self._claims = claims
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
        self._starting: set[int] = set()  # jobs a serving thread holds a claim for
        # Demand of runners that left before a job, not yet given back (monitor thread only).
        self._give_backs: dict[int, GiveBack] = {}
        self._workers = ThreadPoolExecutor(settings.slots, thread_name_prefix="serve")
        self._state = HostState.SERVING
        self._started_at = clock()
        self._last_beat = -math.inf
        self._last_dead_scan = -math.inf
        self._last_own_scan = clock()
        self.adoption: dict[str, int] = {}
        metrics.slots_total.set(settings.slots)

    # --- lifecycle ---

    def run(self) -> bool:
        """Serve until stopped; then drain and clean up. True when it exits holding nothing:
        every message it received deleted or visible again, every runner gone."""
        self._containers.prepare(self.host_id)
        self._beat(force=True)
        try:
            self.adopt()
        except Exception:
            self.metrics.errors.labels("adopt").inc()
            logger.exception("start-up adoption failed; the monitor goes on")
        pollers = [
            threading.Thread(target=self._poll, args=(name,), name=f"poll-{name}", daemon=True)
            for name in self.pools
        ]
        for thread in pollers:
            thread.start()
        logger.info("executor started", extra={"host_id": self.host_id,
                                               "pools": list(self.pools),
                                               "slots": self.settings.slots,
                                               "version": executor.__version__})
        while not self._stopping.is_set():
            self._tick_safely()
            self._stopping.wait(self.settings.tick_s)
        return self._shutdown(pollers)

    def stop(self) -> None:
        """First call: stop receiving and drain. Second call: stop runners now."""
        if self._stopping.is_set():
            self._forced.set()
        self._stopping.set()

    def _pause(self, seconds: float) -> None:
        if self._forced.is_set():
            time.sleep(min(seconds, 0.2))
        else:
            self._forced.wait(seconds)

    def _shutdown(self, pollers: list[threading.Thread]) -> bool:
        deadline = self._clock() + self.settings.drain_timeout_s
        self._state = HostState.DRAINING
        self._beat(force=True)
        logger.info("draining", extra={"host_id": self.host_id, "runners": len(self._local),
                                       "drain_timeout_s": self.settings.drain_timeout_s})
        # 1. Stop receiving: pollers end their long poll; whatever they or the serving threads
        #    hold and have not started is made visible again at once (`_serve_message`,
        #    `_start_runner`).
        limit = time.monotonic() + self.settings.poll_wait_s + STOP_RECEIVING_MARGIN_S
        while (any(t.is_alive() for t in pollers) or self._held) and time.monotonic() < limit:
            self._tick_safely()
            self._pause(min(self.settings.tick_s, 0.2))
        self._workers.shutdown(wait=False)
        # 2. Drain: running jobs finish; surplus idle runners are reaped at once.
        while self._local and not self._forced.is_set() and self._clock() < deadline:
            self._tick_safely()
            self._pause(self.settings.tick_s)
        # 3. Past the drain (second SIGTERM or timeout): deregister and stop what is left.
        if self._local:
            why = "forced" if self._forced.is_set() else "drain_timeout"
            logger.warning("retiring %d runner(s): %s", len(self._local), why,
                           extra={"host_id": self.host_id})
            for local in list(self._local.values()):
                self._retire_safely(local, f"host_stopped:{why}")
            limit = time.monotonic() + RETIRE_WAIT_S
            while self._local and time.monotonic() < limit:
                self._tick_safely()
                time.sleep(min(self.settings.tick_s, 0.2))
        # 4. Nothing held: messages returned, the network released, a last heartbeat.
        returned = self._return_held()
        if self._give_backs:
            logger.warning("%d early-exit re-demand(s) not given back; other executors take "
                           "over their claims", len(self._give_backs),
                           extra={"jobs": sorted(self._give_backs)})
        clean = (returned and not self._local and not self._give_backs
                 and not any(t.is_alive() for t in pollers))
        try:
            self._containers.release_network(self.host_id)
        except Exception as exc:  # noqa: BLE001 - best effort; a restart reuses it
            logger.warning("could not remove the runners' network: %s", exc)
        self._state = HostState.STOPPED
        self._beat(force=True, clean=clean)
        logger.info("executor stopped", extra={"host_id": self.host_id, "clean": clean,
                                               "runners_left": list(self._local)})
        return clean

    def _return_held(self) -> bool:
        with self._lock:
            held = list(self._held.values())
        ok = True
        for item in held:
            try:
                self._consumer.set_visibility(item.received, 0)
            except DependencyUnavailable as exc:
                ok = False
                logger.error("could not return a held message (%s); it reappears after its "
                             "visibility timeout", exc)
        return ok

    # --- heartbeat ---

    def _beat(self, force: bool = False, clean: bool | None = None) -> None:
        now = self._clock()
        if not force and now - self._last_beat < self.settings.heartbeat_s:
            return
        beat = Heartbeat(
            host_id=self.host_id,
            pools=tuple(self.pools),
            slots_total=self.slots.total,
            slots_busy=self.slots.used,
            runners=len(self._local),
            version=executor.__version__,
            schema_versions=(messages.OLDEST_ACCEPTED_SCHEMA_VERSION,
                             messages.DEMAND_SCHEMA_VERSION),
            state=self._state,
            heartbeat_s=self.settings.heartbeat_s,
            started_at=self._started_at,
            clean=clean,
        )
        try:
            self._hosts.beat(beat, now)
            self._last_beat = now
        except DependencyUnavailable as exc:
            self.metrics.heartbeat_failures.inc()
            logger.warning("heartbeat failed: %s", exc, extra={"host_id": self.host_id})

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
            with self._lock:  # held from now on: the monitor extends their visibility
                self._held.update((r.receipt, Held(r, now)) for r in batch)
            for received in batch:
                if self._stopping.is_set():
                    with self._lock:
                        self._held.pop(received.receipt, None)
                    self._requeue(received, 0)  # received after SIGTERM: another host takes it
                    continue
                if (not self.slots.try_take(received.receipt)
                        and not self._wait_for_slot(received)):
                    with self._lock:
                        self._held.pop(received.receipt, None)
                    self._requeue(received, 0)
                    continue
                try:
                    self._workers.submit(self._serve, received)
                except RuntimeError:  # shutting down: the worker pool takes nothing more
                    with self._lock:
                        self._held.pop(received.receipt, None)
                    self._release_slot(received.receipt)
                    self._requeue(received, 0)

    def _wait_for_slot(self, received: Received) -> bool:
        """Another pool's poller took the slot meanwhile. Returning the message at once would
        count a receive each time (the queue dead-letters a message after DEMAND_MAX_RECEIVES)
        and two pollers can bounce one message several times a second; so hold it (the monitor
        extends its visibility) until a slot frees, for a while, or for as long as it takes when
        one more receive would send it to the DLQ."""
        self.metrics.rejected.labels(received.pool, "no_free_slot").inc()
        near_dlq = received.receive_count >= DEMAND_MAX_RECEIVES - 1
        return self.slots.take(received.receipt, None if near_dlq else SLOT_WAIT_S,
                               self._stopping)

    def _serve(self, received: Received) -> None:
        try:
            self._serve_message(received)
        except Exception:
            self.metrics.errors.labels("serve").inc()
            logger.exception("serving a demand message failed", extra={"pool": received.pool})
            self._requeue(received, self.settings.start_backoff_s)
        finally:
            with self._lock:
                self._held.pop(received.receipt, None)
            # Its slot, unless a runner took it over (`_start_claimed`): that one releases it
            # when its container exits, even if a write after the start failed.
            if self.slots.holds(received.receipt):
                self._release_slot(received.receipt)

    def _release_slot(self, holder: str) -> None:
        if not self.slots.release(holder):
            self.metrics.slot_releases_unheld.inc()
            logger.error("slot released for %s, which holds none: a bug; nothing freed",
                         holder)

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
            if received.receive_count >= DEMAND_MAX_RECEIVES - 1:
                # One more receive would dead-letter a good message: put a fresh copy back.
                self._consumer.recycle(received)
            else:
                self._consumer.set_visibility(received, self.settings.newer_schema_delay_s)
            return False
        assert isinstance(verdict, Accepted)
        message = verdict.message
        log = {"pool": pool.name, "job_id": message.job_id, "generation": message.generation,
               "schema_version": message.schema_version}
        if self._stopping.is_set():
            self._consumer.set_visibility(received, 0)  # another host takes it now
            return False
        now = self._clock()
        if message.not_before and message.not_before > now:
            self._consumer.set_visibility(received, math.ceil(message.not_before - now))
            return False
        claim = self._claim(message, log)
        if claim is None:
            self._consumer.set_visibility(received, 0)  # stopping: another host takes it now
            return False
        if claim.applied:
            return self._start_runner(pool, message, claim.job, received, log)
        return self._claim_refused(pool, message, claim.job, received, log)

    def _claim(self, message: DemandMessage, log: dict) -> Transition | None:
        """Claim the job's generation. While the jobs store is unavailable the claim is tried
        again with backoff and the message stays held (the monitor extends its visibility):
        made visible again, each receive would count towards the DLQ, and an outage of a few
        receives would dead-letter waiting demand. None when the executor stops meanwhile."""
        failures = 0
        while True:
            now = self._clock()
            try:
                return self._jobs.apply(
                    message.job_id,
                    moves.CLAIM,
                    now,
                    Change(fields={"host_id": self.host_id,
                                   "lease_until": now + self.settings.lease_s}),
                    generation=message.generation,
                )
            except DependencyUnavailable as exc:
                failures += 1
                delay = backoff_s(failures, CLAIM_RETRY_S, CLAIM_RETRY_MAX_S)
                self.metrics.claim_retries.labels(message.pool).inc()
                logger.warning("claim failed (%s); message held, claim %d tried again in "
                               "%.1fs", exc, failures + 1, delay, extra=log)
            if self._stopping.wait(delay):
                return None

    def _claim_refused(self, pool: Pool, message: DemandMessage, job: dict | None,
                       received: Received, log: dict) -> bool:
        """Another claim holds the job: a live one (a duplicate message: delete it), an expired
        one of a dead host (take it over), or one not decidable yet (look again later)."""
        holder = (job or {}).get("host_id")
        claimant = None
        if (drop_reason(job, message.generation) == "claimed_already" and holder
                and holder != self.host_id):
            claimant = self._hosts.get(str(holder))
        now = self._clock()
        verdict = recovery.on_claim_refused(job, message.generation, self.host_id, claimant,
                                            self._serves(message.job_id), now)
        if isinstance(verdict, Drop):
            self.metrics.dropped.labels(pool.name, verdict.reason).inc()
            logger.info("demand dropped: %s", verdict.reason, extra=log | {"holder": holder})
            self._consumer.delete(received)
            return False
        if isinstance(verdict, Retry):
            self.metrics.rejected.labels(pool.name, verdict.reason).inc()
            logger.info("claim held by %s (%s): look again in %.0fs", holder, verdict.reason,
                        verdict.after_s, extra=log)
            self._consumer.set_visibility(received, math.ceil(verdict.after_s))
            return False
        assert isinstance(verdict, TakeOver)
        taken = self._jobs.apply(
            message.job_id, moves.TAKEOVER, now,
            Change(fields={"host_id": self.host_id, "lease_until": now + self.settings.lease_s,
                           "taken_over_from": verdict.from_host}),
            generation=message.generation, host_id=verdict.from_host,
        )
        if not taken.applied:
            # Someone acted first (another takeover, a re-demand): decide again shortly.
            self._consumer.set_visibility(received, math.ceil(recovery.MIN_RETRY_S))
            return False
        self.metrics.takeovers.labels(pool.name, "message").inc()
        logger.warning("took over the expired claim of dead host %s", verdict.from_host,
                       extra=log)
        return self._start_runner(pool, message, taken.job, received, log)

    def _serves(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._starting or any(
                local.job_id == job_id for local in self._local.values())

    # --- starting a runner ---

    def _start_runner(self, pool: Pool, message: DemandMessage, job: dict[str, Any],
                      received: Received, log: dict) -> bool:
        with self._lock:
            self._starting.add(message.job_id)
        try:
            return self._start_claimed(pool, message, job, received, log)
        finally:
            with self._lock:
                self._starting.discard(message.job_id)

    def _start_claimed(self, pool: Pool, message: DemandMessage, job: dict[str, Any],
                       received: Received, log: dict) -> bool:
        claimed_at = self._clock()
        if self.settings.test_start_delay_s:
            self._stopping.wait(self.settings.test_start_delay_s)  # TEST ONLY (settings.py)
        if self._stopping.is_set():
            return self._release(pool, message, received, log)
        name = runner_name(message.job_id, message.generation)
        scope = runner_scope(pool, message.repository)
        owner, repo = scope.owner, message.repository.partition("/")[2]
        stage, jit, installation = "github", None, message.installation_id
        try:
            if installation is None:
                installation = self._github.installation_for(owner, repo)
            self._runners.move(
                name, RunnerState.STARTING, claimed_at, pool=pool.name, host_id=self.host_id,
                job_id=message.job_id, generation=message.generation, image=pool.image,
                installation_id=installation, repository=message.repository,
                scope_level=scope.level,
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
                deployment=self.settings.deployment,
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
            # From here the runner holds the message's slot, until its container exits.
            handed = self.slots.hand_over(received.receipt, name)
        if not handed:
            self.metrics.slot_releases_unheld.inc()
            logger.error("message of runner %s held no slot; the runner takes one", name)
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

    def _release(self, pool: Pool, message: DemandMessage, received: Received,
                 log: dict) -> bool:
        """Draining before the runner started: hand the claim back and make the message visible
        at once, so another executor claims the same generation."""
        self._jobs.apply(message.job_id, moves.RELEASE, self._clock(),
                         generation=message.generation, host_id=self.host_id)
        self._consumer.set_visibility(received, 0)
        self.metrics.released.labels(pool.name).inc()
        logger.info("claim released: draining", extra=log)
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
            self._beat()
        except Exception:
            self.metrics.errors.labels("heartbeat").inc()
            logger.exception("heartbeat failed")
        try:
            self._tick()
        except Exception:
            self.metrics.errors.labels("monitor").inc()
            logger.exception("monitor tick failed")
        if self._stopping.is_set():
            return  # a draining host takes nothing over
        try:
            self._recover()
        except Exception:
            self.metrics.errors.labels("recover").inc()
            logger.exception("recovery scan failed")

    def _tick(self) -> None:
        now = self._clock()
        self._extend_held(now)
        # The local runners first, then Docker's listing: a runner started in between is not
        # in the listing and must not be taken for one that exited.
        known = list(self._local.values())
        containers = {c.name: c for c in self._containers.managed(self.host_id)}
        for local in known:
            container = containers.get(local.name)
            if container is None or container.finished:
                self._runner_exited(local, container)
            else:
                self._watch_runner(local, now)
        for container in containers.values():
            if container.name not in self._local and container.finished:
                self._containers.remove(container.name)  # a leftover of a failed start
        for item in [i for i in self._give_backs.values() if i.due_at <= now]:
            self._give_back(item)
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
        # While draining, a surplus idle runner is reaped at once, not after the idle timeout.
        if now - local.started_at < self.settings.idle_timeout_s and not self._stopping.is_set():
            return
        record = record if record is not None else (self._runners.get(local.name) or {})
        if record.get("state") == RunnerState.BUSY:
            local.busy = True
            return
        if self._wanted_job(local, record) is None:
            self._reap(local)
            return
        # The demand it serves is still unmet: keep waiting, while GitHub still sees the runner
        # (a runner that never came online, or was deleted, would hold the demand for ever).
        if now - local.checked_at >= self.settings.idle_timeout_s:
            local.checked_at = now
            found = self._github_runner(local)
            if found is None or (isinstance(found, dict) and not found.get("busy")
                                 and found.get("status") != "online"):
                logger.warning("idle runner not online in GitHub: retired, its demand re-queued",
                               extra={"runner": local.name, "job_id": local.job_id})
                self._retire(local, "runner_not_online")

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

    def _retire_safely(self, local: LocalRunner, reason: str) -> None:
        try:
            self._retire(local, reason)
        except Exception:
            self.metrics.errors.labels("retire").inc()
            logger.exception("retiring runner %s failed", local.name)

    def _retire(self, local: LocalRunner, reason: str) -> None:
        """Shutdown past the drain: deregister the runner (so it takes no job), stop its
        container, and hand the demand of a runner that had no job yet back to the queue."""
        local.reaping = True
        deregistered = False
        if local.runner_id is not None and not local.busy:
            try:
                deregistered = self._github.delete_runner(local.installation_id, local.scope,
                                                          local.runner_id)
            except GitHubError as exc:
                logger.warning("could not deregister runner %s: %s", local.name, exc)
            if not deregistered:
                local.busy = True  # it took a job meanwhile (GitHub refused)
        self._containers.stop(local.name, timeout_s=10)
        if local.busy and local.runner_id is not None:
            try:  # a runner stopped mid-job may not have deregistered itself
                self._github.delete_runner(local.installation_id, local.scope, local.runner_id)
            except GitHubError as exc:
                logger.warning("could not deregister runner %s: %s", local.name, exc)
        if deregistered:
            job = self._wanted_job(local, self._runners.get(local.name) or {})
            if job is not None and self._waits_on(job, local.name):
                self._redemand(job, reason, local.pool.name)
        logger.info("runner retired: %s", reason, extra={"runner": local.name,
                                                         "busy": local.busy})

    def _waits_on(self, job: dict, name: str) -> bool:
        """The job's demand is met by this runner only (or by this host's unstarted claim)."""
        if job.get("state") == JobState.RUNNER_STARTED:
            return job.get("started_runner") == name
        return job.get("state") == JobState.CLAIMED and job.get("host_id") == self.host_id

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
        self._release_slot(local.name)
        outcome = "job" if ran_job else ("reaped" if local.reaping else f"exit_{exit_code}")
        self.metrics.exited.labels(local.pool.name, outcome).inc()
        logger.info("runner exited: %s", outcome,
                    extra={"runner": local.name, "job_id": local.job_id, "exit_code": exit_code})
        if ran_job or local.reaping:
            return
        job = self._wanted_job(local, record)
        if job and job.get("state") == "runner_started" and job.get("started_runner") == local.name:
            # The runner left before GitHub gave it a job: the demand may still be unmet.
            if exit_code == 0:
                self._give_back(GiveBack(
                    job_id=int(job["job_id"]), generation=int(job["demand_generation"]),
                    runner=local.name, pool=local.pool.name, reason="exited_before_job"))
                return
            self._start_failed(local.pool, job, f"runner exited with {exit_code} before a job",
                               "runner", {"pool": local.pool.name, "job_id": job["job_id"]})

    def _give_back(self, item: GiveBack) -> None:
        """One try at giving back the demand of a runner that left before a job: re-demanded
        only if GitHub says the job is still queued (it may have given the job to another
        runner). When GitHub can't be asked or the re-demand fails, tried again on a later
        tick with backoff, and counted."""
        try:
            outcome = self._give_back_once(item)
            cause = "github" if outcome == "unknown" else None
        except DependencyUnavailable as exc:
            cause = "aws"
            logger.warning("re-demand of job %s failed: %s", item.job_id, exc,
                           extra={"job_id": item.job_id, "pool": item.pool})
        except Exception:
            cause = "error"
            self.metrics.errors.labels("give_back").inc()
            logger.exception("re-demand of job %s failed", item.job_id,
                             extra={"job_id": item.job_id, "pool": item.pool})
        if cause is None:
            self._give_backs.pop(item.job_id, None)
            return
        failures = item.failures + 1
        delay = backoff_s(failures, self.settings.start_backoff_s,
                          self.settings.max_start_backoff_s)
        self.metrics.redemand_failures.labels(item.pool, cause).inc()
        self._give_backs[item.job_id] = replace(item, failures=failures,
                                                due_at=self._clock() + delay)
        logger.info("re-demand of job %s (runner %s left before a job) tried again in %.0fs",
                    item.job_id, item.runner, delay,
                    extra={"job_id": item.job_id, "cause": cause, "failures": failures})

    def _give_back_once(self, item: GiveBack) -> str:
        """`redemanded`, `not_queued`, `unknown` (GitHub not asked) or `moved_on`; raises
        DependencyUnavailable when AWS fails."""
        job = self._jobs.get(item.job_id)
        step = recovery.give_back_step(job, item)
        if step == "done":
            return "moved_on"
        assert job is not None
        if step == "resend":
            self._resend(job, item)
            return "redemanded"
        outcome = self._settle(job, item.reason)
        if outcome == "not_queued":
            logger.info("runner %s left before a job GitHub no longer has queued: not "
                        "re-demanded", item.runner, extra={"job_id": item.job_id})
        return outcome

    def _resend(self, job: dict, item: GiveBack) -> None:
        """A re-demand that was recorded but whose message was not sent: send it now."""
        now = self._clock()
        message = DemandMessage(
            schema_version=DEMAND_SCHEMA_VERSION, job_id=int(job["job_id"]),
            generation=int(job["demand_generation"]), pool=job["pool"],
            labels=tuple(job.get("labels", ())), repository=job["repository"],
            owner=job["owner"], installation_id=job.get("installation_id"), created_at=now,
        )
        dispatch(self._jobs, self._demand, message, now)
        self.metrics.redemanded.labels(item.pool, item.reason).inc()
        logger.info("job re-demanded: %s (its message sent again)", item.reason,
                    extra={"job_id": item.job_id, "pool": item.pool,
                           "generation": message.generation})

    # --- recovering what others left ---

    def _recover(self) -> None:
        now = self._clock()
        if now - self._last_dead_scan >= self.settings.heartbeat_s:
            self._last_dead_scan = now
            self._recover_dead_hosts(now)
        if now - self._last_own_scan >= max(self.settings.heartbeat_s, self.settings.lease_s / 2):
            self._last_own_scan = now
            self._recover_own_claims(now, at_start=False)

    def _recover_dead_hosts(self, now: float) -> None:
        """Hosts sharing a pool with this one whose heartbeat stopped: take over their expired
        claims (one conditional write each, so one executor acts), re-demand those GitHub still
        has queued, deregister their runners; mark the host lost once nothing is left."""
        mine = frozenset(self.pools)
        for host in self._hosts.all():
            host_id = str(host["host_id"])
            if host_id == self.host_id or host.get("state") == HostState.LOST:
                continue
            if host.get("state") == HostState.STOPPED and host.get("clean"):
                continue  # exited holding nothing
            if host_alive(host, now) or not mine & set(host.get("pools") or ()):
                continue
            plan = recovery.plan_dead_host(host, self._claims.open_claims(host_id),
                                           self._runners.on_host(host_id), mine, now)
            for job in plan.take_over:
                self._take_over_unserved(job, host_id, now)
            for record in plan.deregister:
                self._deregister_record(record, f"host_lost:{host_id}")
            if plan.take_over or plan.deregister:
                logger.warning("recovered from dead host %s: %d claim(s) taken over, %d "
                               "runner(s) deregistered, %d claim(s) still waiting", host_id,
                               len(plan.take_over), len(plan.deregister), plan.waiting,
                               extra={"dead_host": host_id})
            if plan.nothing_left and self._hosts.mark_lost(
                    host_id, host["heartbeat_at"], now, self.host_id):
                self.metrics.hosts_lost.inc()
                logger.warning("host %s marked lost: nothing of it left", host_id,
                               extra={"dead_host": host_id})

    def _take_over_unserved(self, job: dict, from_host: str, now: float) -> None:
        taken = self._jobs.apply(
            int(job["job_id"]), moves.TAKEOVER, now,
            Change(fields={"host_id": self.host_id, "lease_until": now + self.settings.lease_s,
                           "taken_over_from": from_host}),
            generation=int(job["demand_generation"]), host_id=from_host,
        )
        if not taken.applied:
            return  # another executor took it, or it moved on
        self.metrics.takeovers.labels(str(job.get("pool")), "scan").inc()
        outcome = self._settle(taken.job, f"host_lost:{from_host}")
        logger.warning("took over the expired claim of dead host %s: %s", from_host, outcome,
                       extra={"job_id": job["job_id"], "pool": job.get("pool")})

    def _recover_own_claims(self, now: float, *, at_start: bool) -> list[tuple[int, str]]:
        """Claims of this host that no runner or serving thread of this daemon serves: a
        previous daemon here held them. Re-demanded if GitHub still has the job queued."""
        claims = self._claims.open_claims(self.host_id)
        with self._lock:
            served = frozenset(self._starting | {lo.job_id for lo in self._local.values()})
            names = frozenset(self._local)
        settled = []
        for job in recovery.orphan_claims(claims, served, names, now, at_start=at_start):
            if job.get("pool") not in self.pools:
                logger.warning("claim of job %s is for pool %s, not served here any more",
                               job["job_id"], job.get("pool"))
                continue
            outcome = self._settle(job, "previous_daemon")
            if outcome != "redemanded":
                # Look again after a lease, not at every scan.
                self._jobs.apply(int(job["job_id"]), moves.RENEW_LEASE, now,
                                 Change(fields={"lease_until": now + self.settings.lease_s}),
                                 generation=int(job["demand_generation"]), host_id=self.host_id)
            settled.append((int(job["job_id"]), outcome))
            logger.info("unserved claim of a previous daemon: %s", outcome,
                        extra={"job_id": job["job_id"], "pool": job.get("pool")})
        return settled

    def _settle(self, job: dict, reason: str) -> str:
        """A claim nobody serves: re-demand it if GitHub still has the job queued. Returns
        `redemanded`, `not_queued`, `unknown` (GitHub not asked) or `moved_on`."""
        queued = self._still_queued(job)
        if queued is None:
            return "unknown"
        if not queued:
            return "not_queued"
        return "redemanded" if self._redemand(job, reason, str(job.get("pool"))) else "moved_on"

    def _redemand(self, job: dict, reason: str, pool: str) -> bool:
        moved = redemand(self._jobs, self._demand, job, self._clock(), reason=reason)
        if moved.applied:
            self.metrics.redemanded.labels(pool, reason.split(":", 1)[0]).inc()
            logger.info("job re-demanded: %s", reason,
                        extra={"job_id": job["job_id"], "pool": pool,
                               "generation": moved.generation})
        return moved.applied

    def _lookup(self, installation: int | None, owner: str, repo: str | None
                ) -> tuple[Any, int]:
        """The App (and its installation) for read-only look-ups: with several Apps
        (`GitHubApps`), the first one, through its own installation for the owner."""
        apps = getattr(self._github, "apps", None)
        app = apps[0] if apps else self._github
        if installation and (not apps or len(apps) == 1):
            return app, int(installation)
        return app, app.installation_for(owner, repo)

    def _list_runners(self, installation: int | None, scope: RunnerScope) -> list[dict]:
        app, installation = self._lookup(installation, scope.owner, scope.repo)
        return app.list_runners(installation, scope)

    def _still_queued(self, job: dict) -> bool | None:
        """GitHub's view: True while the job is queued; None when GitHub can't be asked."""
        repository = str(job.get("repository") or "")
        owner, _, repo = repository.partition("/")
        try:
            app, installation = self._lookup(job.get("installation_id"), owner, repo)
            answer = app.get_job(installation, repository, int(job["job_id"]))
        except (GitHubError, DependencyUnavailable, ValueError) as exc:
            logger.warning("could not ask GitHub about job %s: %s", job.get("job_id"), exc)
            return None
        return answer.get("status") == "queued"

    def _deregister_record(self, record: dict, reason: str) -> bool:
        """A runner of a dead host (or one with no container): remove it from GitHub (GitHub
        refuses a busy one and ends its job itself) and record it gone."""
        name = str(record["runner_name"])
        scope = record_scope(record)
        if scope is None and record.get("pool") in self.pools and record.get("repository"):
            scope = runner_scope(self.pools[record["pool"]], str(record["repository"]))
        installation = record.get("installation_id")
        if scope is not None and installation is not None:
            try:
                runner_id = record.get("runner_id")
                if runner_id is None:  # registered, but its id was never recorded
                    runner_id = next((r["id"] for r in self._list_runners(
                        int(installation), scope) if r.get("name") == name), None)
                if runner_id is not None:
                    self._github.delete_runner(int(installation), scope, int(runner_id))
            except GitHubError as exc:
                logger.warning("could not deregister runner %s: %s", name, exc)
                return False
        self._runners.move(name, RunnerState.GONE, self._clock(), reason=reason[:300])
        return True

    # --- start-up adoption ---

    def adopt(self) -> dict[str, int]:
        """What a previous daemon on this host left: containers (adopted when their runner is
        still registered and healthy, else removed with their runner), runners without a
        container, claims nobody serves, JIT config files. Returns the counts (also logged)."""
        now = self._clock()
        counts = dict.fromkeys(("adopted", "adopted_busy", "discarded", "exited",
                                "runners_deregistered", "claims_redemanded", "claims_left",
                                "files_removed"), 0)
        containers = self._containers.managed(self.host_id)
        records = {str(r["runner_name"]): r for r in self._runners.on_host(self.host_id)}
        for container in containers:
            record = records.get(container.name) or self._runners.get(container.name)
            local = self._local_from(container, record)
            if container.finished:
                counts["exited"] += 1
                self.metrics.adoption.labels("exited").inc()
                if local is None:
                    self._containers.remove(container.name)
                    continue
                self.slots.force_take(local.name)
                with self._lock:
                    self._local[local.name] = local
                self._runner_exited(local, container)
                continue
            if container.status == "created":
                # The previous daemon died between creating and starting it: it never runs.
                verdict: Adopt | Discard = Discard("never_started")
            else:
                verdict = recovery.adopt_or_discard(
                    record, self._github_runner(local), container.age_s(now),
                    self.settings.adopt_grace_s, local is not None)
            if isinstance(verdict, Adopt) and local is None:
                # Busy in a pool this host no longer serves: let its job finish; the monitor
                # removes the container once it exited (ephemeral: it deregisters itself).
                logger.warning("busy runner of an unserved pool left to finish",
                               extra={"runner": container.name})
                continue
            if isinstance(verdict, Adopt):
                assert local is not None
                self._adopt_runner(local, container, record or {}, verdict.busy, now)
                counts["adopted_busy" if verdict.busy else "adopted"] += 1
                self.metrics.adoption.labels("adopted").inc()
                continue
            counts["discarded"] += 1
            self.metrics.adoption.labels("discarded").inc()
            logger.warning("container of a previous daemon removed: %s", verdict.reason,
                           extra={"runner": container.name})
            self._containers.stop(container.name, timeout_s=5)
            self._containers.remove(container.name)
            if record and record.get("state") != RunnerState.GONE:
                self._deregister_record(record, f"abandoned:{verdict.reason}")
        present = {c.name for c in containers}
        for name, record in records.items():
            if name not in present and record.get("state") != RunnerState.GONE:
                if self._deregister_record(record, "abandoned:no_container"):
                    counts["runners_deregistered"] += 1
        for _, outcome in self._recover_own_claims(now, at_start=True):
            counts["claims_redemanded" if outcome == "redemanded" else "claims_left"] += 1
        counts["files_removed"] = len(self._containers.remove_stray_files(set(self._local)))
        self.adoption = counts
        logger.info("start-up adoption: %s", counts, extra={"host_id": self.host_id,
                                                            "adoption": counts})
        return counts

    def _local_from(self, container: RunnerContainer, record: dict | None
                    ) -> LocalRunner | None:
        record = record or {}
        pool = self.pools.get(str(record.get("pool") or container.labels.get("runnerhub.pool")))
        if pool is None:
            return None
        job_id = int(record.get("job_id") or container.labels.get("runnerhub.job") or 0)
        generation = int(record.get("generation")
                         or container.labels.get("runnerhub.generation") or 0)
        scope = record_scope(record)
        repository = record.get("repository")
        if scope is None:
            job = self._jobs.get(job_id) or {}
            repository = repository or job.get("repository")
            if not repository:
                return None
            scope = runner_scope(pool, str(repository))
        started = container.started_at or float(record.get("starting_at") or self._clock())
        installation = record.get("installation_id")
        return LocalRunner(
            name=container.name, pool=pool, job_id=job_id, generation=generation,
            installation_id=int(installation) if installation is not None else 0,
            scope=scope,
            runner_id=int(record["runner_id"]) if record.get("runner_id") is not None else None,
            started_at=started, lease_renewed_at=-math.inf,
        )

    def _github_runner(self, local: LocalRunner | None) -> Any:
        if local is None or not local.installation_id:
            return recovery.UNKNOWN
        try:
            if local.runner_id is None:
                return next((r for r in self._list_runners(local.installation_id, local.scope)
                             if r.get("name") == local.name), None)
            return self._github.get_runner(local.installation_id, local.scope, local.runner_id)
        except (GitHubError, DependencyUnavailable) as exc:
            logger.warning("could not ask GitHub about runner %s: %s", local.name, exc)
            return recovery.UNKNOWN

    def _adopt_runner(self, local: LocalRunner, container: RunnerContainer, record: dict,
                      busy: bool, now: float) -> None:
        local.busy = busy
        if local.runner_id is None:
            found = self._github_runner(local)
            if isinstance(found, dict):
                local.runner_id = int(found["id"])
        self.slots.force_take(local.name)
        with self._lock:
            self._local[local.name] = local
        if record.get("state") == RunnerState.STARTING:
            self._runners.move(local.name, RunnerState.IDLE, now,
                               container_id=container.container_id, runner_id=local.runner_id)
        job = self._jobs.get(local.job_id) or {}
        if (job.get("state") == JobState.CLAIMED and job.get("host_id") == self.host_id
                and int(job.get("demand_generation", 0)) == local.generation):
            self._jobs.apply(local.job_id, moves.START_RUNNER, now,
                             Change(fields={"started_runner": local.name}),
                             generation=local.generation, host_id=self.host_id)
        logger.info("adopted the runner of a previous daemon", extra={
            "runner": local.name, "job_id": local.job_id, "busy": busy})
