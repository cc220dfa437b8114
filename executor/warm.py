"""Warm runners: registered, idle runners kept ready per pool across all its hosts, so a job
starts as soon as GitHub hands it over, not after a runner's start-up.

The pool's count is held in DynamoDB (`RunnerStore.seats`: a conditional counter, see
chalicelib/runners.py), so hosts never overshoot the pool's warm target however they race. The
warm pool is refilled two ways:
- by demand: every job still gets a runner of its own started (claim -> JIT -> container). When
  a warm runner took the job first, that runner is spare: it takes the freed warm seat
  (`spare`, then each tick until its idle timeout), so the refill costs one start-up, begun when
  the job was queued, not when the warm runner was taken;
- by the keeper (`tick`): a deficit no spare runner filled for `warm_refill_grace_s` (the first
  fill, a warm runner retired at its idle limit, a job whose demand came after the job started)
  is filled by starting warm runners on this host's free slots.
The target is the pools file's or the trainer's forecast's, the larger (`ctx.warm_targets`,
chalicelib/warm_targets.py).
The webhook releases a warm runner's seat when it takes a job (`RunnerStore.take_warm`); the
monitor retires one idle past its pool's `warm_idle_limit_s` (`RunnerWatch.watch_warm`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.pools import Pool
from executor.context import Context
from executor.launch import Launcher, warm_runner_name
from executor.redemand import backoff_s
from executor.registry import LocalRunner, Registry, RunnerWatch
from executor.slots import Slots

logger = Logger(service="runnerhub-executor")

# Warm runners this host starts at once (each a JIT config and a container start).
START_WORKERS = 2


class WarmKeeper:
    def __init__(self, ctx: Context, registry: Registry, slots: Slots,
                 launcher: Launcher, watch: RunnerWatch) -> None:
        self._ctx = ctx
        self._watch = watch
        self._registry = registry
        self._slots = slots
        self._launcher = launcher
        self._targets = ctx.warm_targets
        self._pools = [pool for pool in ctx.pools.values() if self._targets.ever(pool) > 0]
        self._short_since: dict[str, float] = {}  # pool -> when its deficit was first seen
        self._failures: dict[str, int] = {}  # pool -> warm failures in a row on this host
        self._backoff_until: dict[str, float] = {}
        self._starting: dict[str, int] = {}  # pool -> warm starts in flight on this host
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(START_WORKERS, thread_name_prefix="warm")

    @property
    def active(self) -> bool:
        return bool(self._pools)

    # --- spare runners become warm ---

    def spare(self, name: str, now: float) -> None:
        """The launcher's hook: runner `name`'s job was taken by another runner."""
        local = self._registry.local.get(name)
        if local is None or local.warm:
            return
        local.spare = True
        self._warm_spare(local, now)

    def _warm_spare(self, local: LocalRunner, now: float) -> bool:
        target = self._targets.target(local.pool, now)
        if target <= 0:
            return False
        if not self._ctx.runners.make_warm(local.name, local.pool.name, target, now):
            # No seat free, or the webhook made it warm already (its record says so).
            return RunnerWatch.noticed_warm(local, self._ctx.runners.get(local.name))
        local.warm, local.spare, local.warm_since = True, False, now
        local.job_id = local.generation = 0  # it serves no job's demand any more
        self._ctx.metrics.warm_from_spare.labels(local.pool.name).inc()
        logger.info("spare runner is now a warm runner", extra=local.log)
        return True

    # --- the monitor's tick ---

    def tick(self, now: float) -> None:
        """Spare runners first (a seat freed since the last tick), then the keeper's fill."""
        if not self._pools or self._ctx.stopping.is_set() or not self._ctx.receiving.is_set():
            return
        for pool in self._pools:
            try:
                target = self._targets.target(pool, now)
                self._ctx.metrics.warm_target.labels(pool.name).set(target)
                if target <= 0 and not self._holds_warm(pool):
                    # Nothing wanted and nothing of ours to retire: no seat read (a pool that
                    # follows a forecast is polled every tick, mostly at 0 overnight).
                    self._short_since.pop(pool.name, None)
                    continue
                self._spares(pool, target, now)
                self._fill(pool, target, now)
            except DependencyUnavailable as exc:
                logger.warning("warm pool not checked: %s", exc, extra={"pool": pool.name})

    def _holds_warm(self, pool: Pool) -> bool:
        with self._lock:
            if self._starting.get(pool.name):
                return True
        return any(local.pool.name == pool.name and local.warm
                   for local in self._registry.runners())

    def _spares(self, pool: Pool, target: int, now: float) -> None:
        """This host's spare runners of the pool take free warm seats (read first: a make_warm
        is a transaction on the pool's one counter item)."""
        spares = [local for local in self._registry.runners()
                  if local.pool.name == pool.name and local.spare and not local.warm
                  and not local.busy and not local.reaping]
        if not spares or self._ctx.runners.seats(pool.name).warm >= target:
            return
        for local in spares:
            if not self._warm_spare(local, now):
                return

    def _fill(self, pool: Pool, target: int, now: float) -> None:
        with self._lock:
            in_flight = self._starting.get(pool.name, 0)
        seated = self._ctx.runners.seats(pool.name).warm
        short = target - seated - in_flight
        if seated > target:
            self._shrink(pool, target, now)
        if short <= 0:
            self._short_since.pop(pool.name, None)
            return
        since = self._short_since.setdefault(pool.name, now)
        # The grace, plus up to two ticks for a host with free slots to spare: the busiest
        # host that has room fills first, so warm runners gather on few hosts and the others
        # can go idle and be retired.
        free_share = (self._slots.total - self._slots.used) / self._slots.total
        grace = self._ctx.settings.warm_refill_grace_s + 2 * self._ctx.settings.tick_s * free_share
        if now - since < grace or now < self._backoff_until.get(pool.name, 0.0):
            return  # a spare runner on its way (a job's own) may take the seat
        for _ in range(short):
            name = warm_runner_name(pool.name)
            if not self._slots.try_take(name):
                return  # this host is full: the scaler counts the deficit as demand
            with self._lock:
                self._starting[pool.name] = self._starting.get(pool.name, 0) + 1
            try:
                self._workers.submit(self._start, pool, target, name)
            except RuntimeError:  # shutting down
                self._started(pool, name, False)
                return

    def _shrink(self, pool: Pool, target: int, now: float) -> None:
        """The target fell (a schedule window ended): retire this host's idle warm runners
        while the pool holds more than it (each release is conditional on the pool's count,
        so hosts shrinking at once never go below the target)."""
        for local in self._registry.runners():
            if local.pool.name != pool.name or not local.warm or local.busy or local.reaping:
                continue
            if not self._ctx.runners.unwarm(local.name, target, now):
                # This one is starting or took a job: the next may do, unless the pool is
                # down to its target already.
                if self._ctx.runners.seats(pool.name).warm <= target:
                    return
                continue
            local.warm = False
            self._ctx.metrics.warm_retired.labels(pool.name).inc()
            logger.info("warm target fell to %d: warm runner retired", target, extra=local.log)
            self._watch.reap(local)

    def _start(self, pool: Pool, target: int, name: str) -> None:
        outcome = "not_tried"
        self._launcher.starting_warm.add(name)
        try:
            if not self._ctx.stopping.is_set():
                outcome = self._launcher.start_warm(pool, target, name)
        except Exception:
            outcome = "failed"
            self._ctx.metrics.errors.labels("warm").inc()
            logger.exception("warm runner start failed", extra={"pool": pool.name})
        finally:
            self._launcher.starting_warm.discard(name)
            self._started(pool, name, outcome == "started")
        if outcome == "failed":
            self.failed(pool)

    def _started(self, pool: Pool, name: str, ok: bool) -> None:
        with self._lock:
            self._starting[pool.name] = max(0, self._starting.get(pool.name, 0) - 1)
        if not ok:
            self._slots.release(name)  # the runner never held it: nothing started

    def failed(self, pool: Pool) -> None:
        """A warm start failed or a warm runner left without a job (a broken image, a
        refused registration): this host starts none for the pool for a while, doubling."""
        failures = self._failures[pool.name] = self._failures.get(pool.name, 0) + 1
        delay = backoff_s(failures, self._ctx.settings.start_backoff_s,
                          self._ctx.settings.max_start_backoff_s)
        self._backoff_until[pool.name] = self._ctx.clock() + delay
        self._ctx.metrics.warm_failures.labels(pool.name).inc()
        logger.warning("warm runner failed (%d in a row): none started for %.0fs", failures,
                       delay, extra={"pool": pool.name})

    def ended(self, pool: Pool, healthy: bool) -> None:
        """A warm runner ended: healthy (it ran a job, or lived to be retired) clears the
        pool's failures; one that left with an error counts as one. A start alone proves
        nothing: a broken image starts fine and exits."""
        if healthy:
            self._failures.pop(pool.name, None)
            self._backoff_until.pop(pool.name, None)
        else:
            self.failed(pool)

    def close(self) -> None:
        """Wait for starts in flight (each ends quickly once stopping is set)."""
        self._workers.shutdown(wait=True)
