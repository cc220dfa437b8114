"""The executor daemon: long-poll demand, claim it, start an ephemeral runner, watch it, clean up.

Threads: one poller per pool (`executor.intake`), a pool of serving threads (`executor.serve`:
one message -> one disposition; `executor.launch`: claim -> JIT -> container -> records), and
the monitor (the caller of `run()`), whose tick writes the host's heartbeat, extends the
visibility of held messages, renews claim leases, notices exited containers, reaps surplus idle
runners (`executor.registry`), gives back the demand of runners that left before a job
(`executor.redemand`) and recovers what dead hosts (`executor.takeover`) or a previous daemon on
this host (`executor.adoption`) left. Every message is deleted, delayed, made visible again or
dead-lettered on every path, and shutdown returns whatever is still held.

Life of a daemon (docs/operations.md):
- start: one synchronous look at IMDS (a daemon restarted on an instance that is ending must
  not claim anything: it drains at once, receiving nothing), heartbeat, then adoption:
  containers a previous daemon on this host left are adopted when their runner is still
  registered and healthy, else removed with their runner; claims of this host nobody serves any
  more are re-demanded if GitHub still has the job queued;
- serve: as above; the monitor takes over expired claims of hosts whose heartbeat stopped;
- first SIGTERM: stop receiving; demand received but not started is made visible again at once
  (a claim is released); running jobs finish for up to `drain_timeout_s` while heartbeats go on;
- second SIGTERM or the drain timeout: runners are deregistered and stopped (the demand of those
  that had no job yet is re-demanded); then the daemon exits.
- the instance's end seen in IMDS (`executor.lifecycle`): target lifecycle state `Terminated`
  drains as the first SIGTERM does but for up to `lifecycle_drain_timeout_s` (the hook is kept
  alive by heartbeats meanwhile) and completes the lifecycle action once drained; a Spot notice
  drains with a deadline before the instance ends, then records the jobs it took, returns what
  it holds, writes its last heartbeat and only then re-runs them once where the pool opts in.
  Several drain requests: the earliest deadline wins.
The decisions about others' claims and runners are pure functions in `executor.recovery`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from aws_lambda_powertools import Logger

import executor
from chalicelib.demand import DemandQueue
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubApp
from chalicelib.hosts import KEPT_STATES, ClaimIndex, Heartbeat, HostState, HostStore
from chalicelib.jobs import JobStore
from chalicelib.pools import Pool
from chalicelib.runners import RunnerStore
from chalicelib.warm_targets import WarmTargets
from executor import messages
from executor.adoption import Adoption
from executor.containers import RunnerContainers
from executor.context import Context
from executor.github_runners import GitHubRunners
from executor.intake import Intake
from executor.launch import Launcher
from executor.lifecycle import Lifecycle, Lost
from executor.metrics import HOST_FAILURE_STAGES, ExecutorMetrics, counter_total
from executor.monitor import Monitor
from executor.queue import DemandConsumer
from executor.redemand import Redemand
from executor.registry import Registry, RunnerWatch
from executor.serve import Server
from executor.settings import ExecutorSettings
from executor.slots import Slots
from executor.takeover import Takeover
from executor.warm import WarmKeeper

logger = Logger(service="runnerhub-executor")

# How long shutdown waits for the last pollers and serving threads, beyond one long poll.
STOP_RECEIVING_MARGIN_S = 30.0
# How long shutdown waits for retired containers to be seen exited.
RETIRE_WAIT_S = 30.0
# A change of busy slots is heartbeated at most this often (see `_beat`).
BUSY_BEAT_MIN_S = 1.0

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
        launcher: Callable[..., Launcher] = Launcher,
        lifecycle: Callable[..., Lifecycle] | None = None,
        warm_targets: WarmTargets | None = None,
        monitor: Callable[[Context], Monitor] | None = None,
    ) -> None:
        """`launcher`: how a runner is started; a test or benchmark harness passes its own
        (devstack/test_executor.py). `lifecycle`: how the watch on the instance's end is built
        (`executor.lifecycle.factory`); None: no watch (IMDS disabled). `monitor`: how the
        runtime monitor is built (`executor.monitor`); None: none."""
        self.ctx = ctx = Context(
            settings=settings, pools={pool.name: pool for pool in pools}, jobs=jobs,
            runners=runners, hosts=hosts, claims=claims, consumer=consumer, demand=demand,
            github=github, containers=containers, metrics=metrics, clock=clock,
            beat=lambda: self._beat(force=True), warm_targets=warm_targets or WarmTargets())
        self.settings, self.pools, self.host_id, self.metrics = (
            settings, ctx.pools, settings.host_id, metrics)
        self.slots = Slots(settings.slots, on_unheld=metrics.slot_releases_unheld.inc)
        self.registry = Registry()
        # One registry of local runners and one GitHub view, shared by every part below.
        ask = GitHubRunners(ctx)
        self.redemand = Redemand(ctx, ask)
        self.watch = RunnerWatch(ctx, self.registry, self.slots, ask, self.redemand)
        self.launcher = launcher(ctx, self.registry, self.slots, ask, self.redemand)
        self.warm = WarmKeeper(ctx, self.registry, self.slots, self.launcher, self.watch)
        self.launcher.spare = self.warm.spare
        self.watch.warm_ended = self.warm.ended
        self.takeover = Takeover(ctx, self.registry, self.launcher, ask, self.redemand)
        self.adoption = Adoption(ctx, self.registry, self.slots, self.watch, ask,
                                 self.redemand)
        self.adoption.starting_warm = lambda: frozenset(self.launcher.starting_warm)
        # Pollers hand each message to a serving thread, which forgets it once served.
        self.intake = Intake(ctx, self.slots, lambda received: self.server.serve(received))
        self.server = Server(ctx, self.slots, self.launcher, self.takeover, self.intake.forget)
        self._forced = threading.Event()
        self._signalled = False  # a first SIGTERM came (`stop`)
        # Each drain request's deadline (epoch seconds): running jobs are stopped at the
        # earliest. Appended to, never rewritten: the signal handler and the lifecycle thread
        # both add one.
        self._drain_untils: list[float] = []
        self.lifecycle = lifecycle(ctx, drain=self.drain, busy=lambda: bool(self.registry.local),
                                   pause=self._pause) if lifecycle else None
        self.monitor = monitor(ctx) if monitor else None
        self._state = HostState.SERVING
        self._stored_state: HostState | None = None  # what the last heartbeat found stored
        self._busy_at: float | None = None  # the last tick that saw a slot held
        self._started_at = clock()
        self._last_beat = -math.inf
        self._beaten_busy = -1  # slots busy as the last heartbeat wrote them
        self._last_dead_scan = -math.inf
        self._drain_read_at = -math.inf  # when the host's record was last read for a drain
        self._last_own_scan = clock()
        self.adopted: dict[str, int] = {}  # what start-up adoption found (`adopt`)
        metrics.slots_total.set(settings.slots)

    # --- lifecycle ---

    def run(self) -> bool:
        """Serve until stopped; then drain and clean up. True when it exits holding nothing:
        every message it received deleted or visible again, every runner gone."""
        self.ctx.containers.prepare(self.host_id)
        if self.lifecycle is not None:
            # Before the first heartbeat says `serving`: restarted on an instance that is
            # ending (after a drain left something, or by hand), the daemon claims nothing.
            self.lifecycle.poll_safely()
        if self.ctx.stopping.is_set():
            self._state = HostState.DRAINING
        self._beat(force=True)
        try:
            self.adopt()
        except Exception:
            self.metrics.errors.labels("adopt").inc()
            logger.exception("start-up adoption failed; the monitor goes on",
                             extra={"host_id": self.host_id})
        # A drain requested already: no poller at all, straight to the drain.
        pollers = [] if self.ctx.stopping.is_set() else self.intake.start()
        if self.lifecycle is not None:
            self.lifecycle.start()
        if self.monitor is not None:
            self.monitor.start()
        logger.info("executor started", extra={"host_id": self.host_id,
                                               "pools": list(self.pools),
                                               "slots": self.settings.slots,
                                               "version": executor.__version__})
        while not self.ctx.stopping.is_set():
            self._tick_safely()
            self.ctx.stopping.wait(self.settings.tick_s)
        try:
            return self._shutdown(pollers)
        finally:
            if self.lifecycle is not None:
                self.lifecycle.close()
            if self.monitor is not None:
                self.monitor.close()

    def adopt(self) -> dict[str, int]:
        """What a previous daemon on this host left (`executor.adoption`); the counts."""
        self.adopted = self.adoption.adopt()
        return self.adopted

    def stop(self) -> None:
        """SIGTERM. First call: stop receiving and drain for up to `drain_timeout_s` (also when
        the instance's end already drains for longer: systemd SIGKILLs at TimeoutStopSec).
        Second call: stop runners now."""
        if self._signalled:
            self._forced.set()
        self._signalled = True
        self.drain(self.ctx.clock() + self.settings.drain_timeout_s, "sigterm")

    def drain(self, until: float | None = None, why: str = "") -> None:
        """Stop receiving and drain (never forcing): runners still running at `until` (epoch
        seconds; None: `drain_timeout_s` from now) are stopped. Called again, the earliest
        deadline wins."""
        if until is None:
            until = self.ctx.clock() + self.settings.drain_timeout_s
        self._drain_untils.append(until)
        if not self.ctx.stopping.is_set():
            logger.info("drain requested: %s", why or "unspecified",
                        extra={"host_id": self.host_id,
                               "drain_s": round(until - self.ctx.clock(), 1)})
        self.ctx.stopping.set()

    def _drain_deadline(self, default: float) -> float:
        """When running jobs must be done: the earliest deadline requested."""
        return min(self._drain_untils, default=default)

    def _pause(self, seconds: float) -> None:
        if self._forced.is_set():
            time.sleep(min(seconds, 0.2))
        else:
            self._forced.wait(seconds)

    def _shutdown(self, pollers: list[threading.Thread]) -> bool:
        # Every path here requested a drain (`stop`, `drain`); a default all the same.
        deadline = self.ctx.clock() + self.settings.drain_timeout_s
        local = self.registry.local
        self._state = HostState.DRAINING
        self._beat(force=True)
        logger.info("draining", extra={
            "host_id": self.host_id, "runners": len(local),
            "drain_s": round(self._drain_deadline(deadline) - self.ctx.clock(), 1)})
        # 1. Stop receiving: pollers end their long poll; whatever they or the serving threads
        #    hold and have not started is made visible again at once (`Server.decide`,
        #    `Launcher.launch`).
        limit = time.monotonic() + self.settings.poll_wait_s + STOP_RECEIVING_MARGIN_S
        while ((any(t.is_alive() for t in pollers) or self.intake.held)
               and time.monotonic() < limit):
            self._tick_safely()
            self._pause(min(self.settings.tick_s, 0.2))
        self.intake.close()
        self.warm.close()
        # 2. Drain: running jobs finish; surplus idle runners are reaped at once.
        while (local and not self._forced.is_set()
               and self.ctx.clock() < self._drain_deadline(deadline)):
            self._tick_safely()
            self._pause(self.settings.tick_s)
        # 3. Past the drain (second SIGTERM, timeout, Spot deadline): deregister and stop what
        #    is left; a Spot interruption's jobs are recorded first and re-run after (5.).
        spot = self.lifecycle is not None and self.lifecycle.notice is not None
        lost: list[Lost] = []
        if local:
            why = ("forced" if self._forced.is_set() else "spot_interruption" if spot
                   else "drain_timeout")
            logger.warning("retiring %d runner(s): %s", len(local), why,
                           extra={"host_id": self.host_id})
            lost = self.lifecycle.record_spot_losses(self.registry.runners()) if spot else []
            for runner in self.registry.runners():
                self.watch.retire_safely(runner, f"host_stopped:{why}")
            limit = time.monotonic() + RETIRE_WAIT_S
            while local and time.monotonic() < limit:
                self._tick_safely()
                time.sleep(min(self.settings.tick_s, 0.2))
        # 4. Nothing held: messages returned, the network released, a last heartbeat. Before
        #    the re-runs, which may wait until the Spot notice's time: returned now, a message
        #    is served elsewhere at once, not after its visibility timeout.
        returned = self.intake.return_all()
        pending = self.redemand.pending
        if pending:
            logger.warning("%d early-exit re-demand(s) not given back; other executors take "
                           "over their claims", len(pending), extra={"jobs": sorted(pending)})
        clean = (returned and not local and not pending
                 and not any(t.is_alive() for t in pollers))
        try:
            self.ctx.containers.release_network(self.host_id)
        except Exception as exc:  # noqa: BLE001 - best effort; a restart reuses it
            logger.warning("could not remove the runners' network: %s", exc,
                           extra={"host_id": self.host_id})
        self._state = HostState.STOPPED
        self._beat(force=True, clean=clean)
        # 5. Spot: re-run the lost jobs (GitHub refuses until their runs have completed).
        if lost:
            self.lifecycle.rerun_lost(lost)
        if self.lifecycle is not None:
            self.lifecycle.finish()  # the lifecycle action completes once nothing is left
        logger.info("executor stopped", extra={"host_id": self.host_id, "clean": clean,
                                               "runners_left": list(local)})
        return clean

    # --- heartbeat ---

    def _beat(self, force: bool = False, clean: bool | None = None) -> None:
        # `now` is read before the slots are counted (`Heartbeat.item`: the retire condition).
        now = self.ctx.clock()
        since = now - self._last_beat
        # The scaler sizes the pool from heartbeats: a change of busy slots is written within
        # BUSY_BEAT_MIN_S (not up to heartbeat_s later), so a burst never waits a whole
        # interval for hosts; at most one extra write a second, only while slots change.
        changed = self.slots.used != self._beaten_busy and since >= BUSY_BEAT_MIN_S
        if not force and not changed and since < self.settings.heartbeat_s:
            return
        if self.slots.used:
            self._busy_at = now
        beat = Heartbeat(
            host_id=self.host_id,
            pools=tuple(self.pools),
            slots_total=self.slots.total,
            slots_busy=self.slots.used,
            runners=len(self.registry.local),
            version=executor.__version__,
            schema_versions=(messages.OLDEST_ACCEPTED_SCHEMA_VERSION,
                             messages.DEMAND_SCHEMA_VERSION),
            state=self._state,
            heartbeat_s=self.settings.heartbeat_s,
            started_at=self._started_at,
            clean=clean,
            busy_at=self._busy_at,
            starts=counter_total(self.ctx.metrics.started),
            start_failures=counter_total(self.ctx.metrics.start_failures, "stage",
                                         HOST_FAILURE_STAGES),
        )
        try:
            stored = self.ctx.hosts.beat(beat, now)
            self._last_beat = now
            self._beaten_busy = beat.slots_busy
        except DependencyUnavailable as exc:
            self.metrics.heartbeat_failures.inc()
            logger.warning("heartbeat failed: %s", exc, extra={"host_id": self.host_id})
            return
        self._found(stored)
        if now - self._drain_read_at >= self.settings.heartbeat_s:
            self._drain_read_at = now
            self._drain_if_requested(now)

    def _drain_if_requested(self, now: float) -> None:
        """An operator asked this busy host to drain (`drain_requested_at` on its record, the
        management API): it drains (receives nothing, its jobs finish, for up to
        `lifecycle_drain_timeout_s`) and exits;
        the scaler then reaps the stopped instance. Read every `heartbeat_s`; a restarted
        daemon drains again at once."""
        if self.ctx.stopping.is_set():
            return
        try:
            record = self.ctx.hosts.get(self.host_id)
        except DependencyUnavailable as exc:
            logger.warning("drain request not read: %s", exc, extra={"host_id": self.host_id})
            return
        if record is None or record.drain_requested_at is None:
            return
        self.metrics.drain_requests.inc()
        # As long as an instance's end may wait (not SIGTERM's short drain): jobs finish.
        self.drain(now + self.settings.lifecycle_drain_timeout_s,
                   f"requested by {record.drain_requested_by or 'an operator'}")

    def _found(self, stored: HostState) -> None:
        """The state the heartbeat found stored: `retiring` (the scaler chose this host: it
        claims nothing and receives nothing until terminated, or until the scaler gives the
        retirement up) or `lost` (declared dead: its work was taken over) stop receiving."""
        if stored is not self._stored_state and stored in KEPT_STATES:
            logger.warning("this host is %s: receiving nothing", stored.value,
                           extra={"host_id": self.host_id})
        elif self._stored_state in KEPT_STATES and stored is HostState.SERVING:
            logger.info("this host is serving again", extra={"host_id": self.host_id})
        self._stored_state = stored
        if stored is HostState.SERVING:
            self.ctx.receiving.set()
        elif stored in KEPT_STATES:
            self.ctx.receiving.clear()

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
        if self.monitor is not None:
            try:
                self.monitor.tick(self.ctx.clock())
            except Exception:
                self.metrics.errors.labels("isolation_monitor").inc()
                logger.exception("runtime monitor tick failed")
        if self.ctx.stopping.is_set() or not self.ctx.receiving.is_set():
            return  # a draining or retiring host takes nothing over
        try:
            self._recover()
        except Exception:
            self.metrics.errors.labels("recover").inc()
            logger.exception("recovery scan failed")

    def _tick(self) -> None:
        now = self.ctx.clock()
        if self.slots.used:
            self._busy_at = now  # how long the host has been idle (the scaler's idle timeout)
        self.intake.extend(now)
        self.watch.check(now)
        self.warm.tick(now)
        self.redemand.give_back_due(now)
        self.metrics.report_slots(tuple(self.pools), self.slots.total, self.slots.used, now)

    def _recover(self) -> None:
        now = self.ctx.clock()
        if now - self._last_dead_scan >= self.settings.heartbeat_s:
            self._last_dead_scan = now
            self.takeover.scan_dead_hosts(now)
        if now - self._last_own_scan >= max(self.settings.heartbeat_s, self.settings.lease_s / 2):
            self._last_own_scan = now
            self.adoption.orphan_claims(now, at_start=False)
            self.adoption.orphan_records(now)
