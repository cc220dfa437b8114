"""The scaler's one acting class: per pool, under the pool's lease, read the group, the hosts and
the demand, decide (`decision.decide`, pure), and carry the decision out through the Auto Scaling
API and the retire protocol (docs/scaling.md):

1. mark the host `retiring` (conditional: `serving`, idle, its heartbeat saw its last claim);
   from then on its claims fail and its daemon receives nothing;
2. delete its runners from GitHub: GitHub refusing (422: a runner is busy) or not answering
   keeps the host (back to `serving`);
3. terminate the instance, decrementing desired capacity; record its runners gone. A group
   that still holds the instance and refuses (Standby, MinSize) puts the host back to
   `serving` and the run reports an error.
A host left `retiring` (a run that failed between 1 and 3) is finished by the next run.

Stuck instances (no heartbeat `boot_timeout_s` after launch) and down hosts (stopped, lost or
stale that long) are reaped: terminated once they hold no job (`HeldJobs`) and GitHub has
deleted their runners; a down host still holding a claim is left to the executors' takeover.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError, RunnerScope
from chalicelib.history import Event, HistoryStore
from chalicelib.hosts import DEAD_AFTER_BEATS, HostStore, host_alive
from chalicelib.jobs import JobRecord
from chalicelib.overrides import effective
from chalicelib.pools import Pool
from chalicelib.runners import RunnerRecord, RunnerState, RunnerStore
from chalicelib.scaler import decision
from chalicelib.scaler.autoscaling import AutoScaling, Group, TerminateRefused
from chalicelib.scaler.decision import Decision, Limits, PoolView, Reap
from chalicelib.scaler.rollout import RolloutPolicy, RolloutView, Step
from chalicelib.scaler.rollout import step as rollout_step
from chalicelib.scaler.store import HeldJobs, RolloutStore, ScalerLease, WaitingJobs
from chalicelib.telemetry import COUNT, Telemetry
from chalicelib.warm_targets import WarmTargets

logger = Logger(service="runnerhub-scaler")

# A run asked for again while it ran (`ScalerLease`), or whose round reaped hosts (the group
# changed under it), runs at most this many rounds in a row; one more asked after the last is
# left on the lease and reported (`again_pending`) for the next run.
MAX_ROUNDS = 3


@dataclass(frozen=True)
class ScalerConfig:
    group_prefix: str  # a pool's Auto Scaling group is named <prefix><pool>
    slots_per_host: int
    idle_s: float
    boot_timeout_s: float
    lease_s: float
    warm_slots: int = 0
    # Per-pool slots per host where a pool's hosts differ from `slots_per_host` (a GPU pool's
    # one slot): the executors' RUNNERHUB_SLOTS of that pool, set by infra/.
    pool_slots: Mapping[str, int] = field(default_factory=dict)

    def group_name(self, pool: str) -> str:
        return f"{self.group_prefix}{pool}"

    def slots_for(self, pool: str) -> int:
        return self.pool_slots.get(pool, self.slots_per_host)


@dataclass
class PoolRun:
    """What one run did for one pool."""

    pool: str
    decision: Decision | None = None
    skipped: str | None = None  # lease_held, no_group
    desired_set: int | None = None
    retired: list[str] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)  # stuck or down instances terminated
    kept: dict[str, str] = field(default_factory=dict)  # host -> why it was not retired/reaped
    errors: list[str] = field(default_factory=list)
    rounds: int = 0
    free_slots: int = 0  # free slots of the pool's serving hosts, as last read
    # One more round was asked after the last one (left on the lease for the next run).
    again_pending: bool = False
    rollout: dict[str, Any] | None = None  # the rollout's step, when one is under way

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "skipped": self.skipped, "desired_set": self.desired_set,
                "retired": self.retired, "reaped": self.reaped, "kept": self.kept,
                "errors": self.errors, "rounds": self.rounds, "free_slots": self.free_slots,
                "again_pending": self.again_pending, "rollout": self.rollout,
                "decision": self.decision.as_dict() if self.decision else None}


class Scaler:
    def __init__(
        self,
        *,
        pools: Mapping[str, Pool],
        hosts: HostStore,
        runners: RunnerStore,
        waiting: WaitingJobs,
        held: HeldJobs,
        groups: AutoScaling,
        github: Any,
        lease: ScalerLease,
        config: ScalerConfig,
        clock: Callable[[], float] = time.time,
        forecast: Callable[[str], int] | None = None,
        telemetry: Telemetry | None = None,
        history: HistoryStore | None = None,
        warm_targets: WarmTargets | None = None,
        overrides: Any = None,
        rollouts: RolloutStore | None = None,
        rollout_policy: RolloutPolicy | None = None,
    ) -> None:
        """`github`: a GitHubClient (deletes a retiring host's runners). `held`: the jobs a host
        holds (a host holding one is never reaped). `forecast`: hosts the
        forecast asks for per pool (the floor), none yet by default. `telemetry`: where each
        run's metrics go (`emit_run`), none by default. `history`: where the stream's demand
        history goes (`record_history`), none by default. `warm_targets`: each pool's warm
        target (chalicelib/warm_targets.py), the pools file's alone by default. `overrides`:
        an operator's host limits per pool (chalicelib/overrides.py OverridesReader), none by
        default."""
        self.pools = pools
        self._hosts = hosts
        self._runners = runners
        self._waiting = waiting
        self._held = held
        self._groups = groups
        self._github = github
        self._lease = lease
        self.config = config
        self._clock = clock
        self._forecast = forecast or (lambda pool: 0)
        self._telemetry = telemetry
        self._history = history
        self._warm_targets = warm_targets or WarmTargets()
        self._overrides = overrides
        self._rollouts = rollouts
        self.rollout_policy = rollout_policy or RolloutPolicy()

    def record_history(self, events: list[Event], unusable: int = 0) -> dict[str, int]:
        """Add a stream batch's history events (chalicelib/history.py). Never raises for an
        outage: the batch's scaling is done, and a retried batch would count nothing twice
        but would run the pools again; the loss is logged and counted (HistoryWriteFailed)."""
        if unusable:
            logger.warning("%d stream images with no usable history (no pool, or stamps "
                           "missing)", unusable)
        if self._history is None or not events:
            return {"written": 0, "duplicates": 0, "failed": 0, "unusable": unusable}
        try:
            tally = self._history.record(events, self._clock())
        except DependencyUnavailable as exc:
            logger.warning("demand history not recorded: %s", exc,
                           extra={"events": len(events)})
            if self._telemetry is not None:
                self._telemetry.count("HistoryWriteFailed")
                self._telemetry.flush()
            return {"written": 0, "duplicates": 0, "failed": len(events), "unusable": unusable}
        return {"written": tally.written, "duplicates": tally.duplicates, "failed": 0,
                "unusable": unusable}

    def run(self, pool: str, seen_jobs: Iterable[JobRecord] = ()) -> PoolRun:
        """One run for `pool` under its lease (then again, if asked meanwhile or if it reaped
        hosts). `seen_jobs`: the pool's jobs as the triggering stream batch showed them, counted
        as demand where the index does not list them yet (`decision.with_seen`)."""
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r} (pools: {sorted(self.pools)})")
        owner = f"scaler-{uuid.uuid4().hex[:12]}"
        result = PoolRun(pool)
        seen = tuple(seen_jobs)
        for round_ in range(1, MAX_ROUNDS + 1):
            if not self._lease.acquire(pool, owner, self._clock(), self.config.lease_s):
                # Held by another run, which was asked for one more round (`again`).
                if result.rounds == 0:
                    result.skipped = "lease_held"
                    logger.info("another scaler run holds the lease; it runs again",
                                extra={"pool": pool})
                break
            last, changed, failed = round_ == MAX_ROUNDS, False, True
            try:
                changed = self._once(pool, result, seen)
                failed = False
            finally:
                # A run that stops here (its last round, or failed) leaves a request for one
                # more run on the lease: the next run takes it up, it is never dropped.
                again = self._lease.release(pool, owner, self._clock(),
                                            keep_again=last or failed)
            if result.skipped or not (again or changed):
                break
            if last:
                result.again_pending = True
                logger.warning("scaler run asked again after %d rounds: left for the next run",
                               MAX_ROUNDS, extra={"pool": pool})
        self.emit_run(result)
        return result

    def emit_run(self, result: PoolRun) -> None:
        """One run's metrics (EMF, infra/runnerhub_infra/monitoring.py): a run that acted, a
        failed one, and the pool's figures as last decided. A run that found the lease held
        did nothing and emits nothing (the holder's run counts)."""
        telemetry = self._telemetry
        if telemetry is None or result.skipped == "lease_held":
            return
        telemetry.count("ScalerRuns")
        if result.errors or result.skipped:
            telemetry.count("ScalerRunFailed")
        decided = result.decision
        if decided is not None:
            pool = {"pool": result.pool}
            telemetry.measure("PoolDesiredHosts", decided.desired, COUNT, pool)
            telemetry.measure("PoolBacklog", decided.backlog, COUNT, pool)
            telemetry.measure("PoolFreeSlots", result.free_slots, COUNT, pool)
        telemetry.flush()

    # --- one round ---

    def _host_limits(self, pool: str, group_min: int, group_max: int, now: float
                     ) -> tuple[int, int]:
        """The group's MinSize..MaxSize, narrowed by an operator's overrides (within them)."""
        if self._overrides is None:
            return group_min, group_max
        eff = effective(self.pools[pool], self._overrides.get(pool), now, group_min, group_max)
        low = group_min if eff.min_hosts is None else eff.min_hosts
        high = group_max if eff.max_hosts is None else eff.max_hosts
        return low, max(low, high)

    def _warm_short(self, pool: str, now: float) -> int:
        """Warm runners the pool wants and lacks (its target now, less those seated): demand,
        so hosts exist for them. Those it has hold slots, counted busy already."""
        target = self._warm_targets.target(self.pools[pool], now)
        if not target:
            return 0
        seats = self._runners.seats(pool)
        # Never more than can start: at max_runners no warm runner can be seated.
        room = max(0, self.pools[pool].max_runners - seats.runners)
        return min(max(0, target - seats.warm), room)

    def _once(self, pool: str, result: PoolRun, seen: tuple[JobRecord, ...] = ()) -> bool:
        """One round; what it did is added to `result` (a repeated run adds its own). True
        when it reaped hosts: the group changed under its decision, read it again (a scale-out
        held by the cap while they counted against it can now go ahead)."""
        result.rounds += 1
        name = self.config.group_name(pool)
        group = self._groups.group(name)
        if group is None:
            result.skipped = "no_group"
            logger.error("no Auto Scaling group %s for pool %s", name, pool,
                         extra={"pool": pool})
            return False
        now = self._clock()
        ids = {instance.instance_id for instance in group.instances}
        hosts = {host.host_id: host for host in self._hosts.all() if host.host_id in ids}
        live = frozenset(h for h, record in hosts.items() if host_alive(record, now))
        low, high = self._host_limits(pool, group.min_size, group.max_size, now)
        limits = Limits(min_hosts=low, max_hosts=high,
                        slots_per_host=self.config.slots_for(pool),
                        max_runners=self.pools[pool].max_runners, idle_s=self.config.idle_s,
                        boot_timeout_s=self.config.boot_timeout_s,
                        warm_slots=self.config.warm_slots + self._warm_short(pool, now))
        view = PoolView(pool=pool, now=now, desired=group.desired, instances=group.instances,
                        hosts=hosts,
                        backlog=decision.backlog(
                            decision.with_seen(self._waiting.waiting(pool), seen),
                            {h: hosts[h].heartbeat_at for h in live}),
                        forecast_hosts=self._forecast(pool))
        result.decision = decided = decision.decide(view, limits)
        result.free_slots = sum(max(0, record.slots_total - record.slots_busy)
                                for host_id, record in hosts.items()
                                if decided.roles.get(host_id) is decision.Role.SERVING)
        logger.info("scaler decision", extra={"pool": pool, **decided.as_dict()})
        self._act(name, "protect", result,
                  lambda: decided.protect and self._groups.protect(name, decided.protect))
        if decided.desired > group.desired and self._act(
                name, "set_desired", result,
                lambda: self._groups.set_desired(name, decided.desired)):
            result.desired_set = decided.desired
        for host_id in decided.retire:
            record = hosts[host_id]
            fresh_after = now - DEAD_AFTER_BEATS * record.heartbeat_s
            self._act(name, f"retire:{host_id}", result,
                      lambda h=host_id, f=fresh_after: self._retire(pool, h, now, f, result))
        for host_id in decided.finish:
            self._act(name, f"finish:{host_id}", result,
                      lambda h=host_id: self._terminate(pool, h, result))
        reaped = len(result.reaped)
        for reap in decided.reap:
            self._act(name, f"reap:{reap.instance_id}", result,
                      lambda r=reap: self._reap(pool, r, result))
        if self._rollouts is not None:
            self._act(name, "rollout", result,
                      lambda: self._roll(pool, group, hosts, now, result))
        return len(result.reaped) > reaped

    # --- rollouts (chalicelib/scaler/rollout.py) ---

    def _roll(self, pool: str, group: Group, hosts: Mapping[str, Any], now: float,
              result: PoolRun) -> None:
        """One rollout step for the pool, under its lease: hosts launched with another launch
        template version than the group's are replaced, and a version whose new hosts fail is
        rolled back. The instances this round retired or reaped are judged (a stuck new host
        is reaped first) but not replaced, and such a round replaces nothing: its desired
        capacity as read is stale."""
        assert self._rollouts is not None
        gone = frozenset({*result.retired, *result.reaped})
        view = RolloutView(pool=pool, now=now, group_version=group.launch_version,
                           desired=group.desired, instances=group.instances, hosts=hosts,
                           gone=gone, may_replace=not gone)
        before = self._rollouts.get(pool)
        taken = rollout_step(view, before, self.rollout_policy)
        if taken.state is None:
            return
        result.rollout = {"event": taken.event, "status": taken.state.status,
                          "target": taken.state.target, "previous": taken.state.previous,
                          "terminate": list(taken.terminate), "reason": taken.state.reason,
                          **{k: v for k, v in taken.detail.items() if k != "failed"}}
        if taken.event != "none" and taken.event != "waiting":
            logger.info("rollout %s", taken.event, extra={"pool": pool, **result.rollout})
        if taken.set_version is not None:
            self._groups.set_version(group, taken.set_version)
            logger.warning("rollout rolled back: %s", taken.state.reason,
                           extra={"pool": pool, "version": taken.set_version})
        # A stalled one is written each run too: its item must not expire while it is stalled.
        if taken.state != before or taken.state.status == "stalled":
            self._rollouts.put(pool, taken.state, now)
        for instance_id in taken.terminate:
            self._replace(pool, instance_id, result)
        self._emit_rollout(taken)

    def _replace(self, pool: str, instance_id: str, result: PoolRun) -> None:
        """Terminate without lowering desired capacity: the group launches the replacement,
        the lifecycle hook holds the old instance while its daemon drains."""
        try:
            self._groups.terminate(instance_id, decrement=False)
        except TerminateRefused as exc:
            result.kept[instance_id] = "terminate_refused"
            logger.warning("rollout could not replace %s: %s", instance_id, exc,
                           extra={"pool": pool})

    def _emit_rollout(self, taken: Step) -> None:
        if self._telemetry is None:
            return
        names = {"started": "RolloutStarted", "rolled_back": "RolloutRolledBack",
                 "completed": "RolloutCompleted"}
        if taken.event in names:
            self._telemetry.count(names[taken.event])
        if taken.state is not None and taken.state.status == "stalled":
            self._telemetry.count("RolloutStalled")  # every run while stalled: the alarm's
        self._telemetry.flush()

    def _act(self, group: str, what: str, result: PoolRun, action: Callable[[], Any]) -> bool:
        """One action; an outage is logged and counted (the next run tries again)."""
        try:
            action()
            return True
        except (DependencyUnavailable, GitHubError) as exc:
            result.errors.append(f"{what}: {exc}")
            logger.warning("scaler action %s failed: %s", what, exc,
                           extra={"pool": result.pool, "group": group})
            return False

    # --- the retire protocol ---

    def _retire(self, pool: str, host_id: str, now: float, fresh_after: float,
                result: PoolRun) -> None:
        if not self._hosts.retire(host_id, now, fresh_after, by="scaler"):
            # It beat busy, claimed, drained or stopped since we read it: it stays.
            result.kept[host_id] = "changed"
            logger.info("host %s changed since read; not retired", host_id,
                        extra={"pool": pool, "host_id": host_id})
            return
        self._terminate(pool, host_id, result)

    def _terminate(self, pool: str, host_id: str, result: PoolRun) -> None:
        """The host is `retiring`: delete its runners from GitHub, then terminate it."""
        log = {"pool": pool, "host_id": host_id}
        left = [r for r in self._runners.on_host(host_id) if r.state is not RunnerState.GONE]
        why = self._deregister(left, log)
        if why is not None:
            self._hosts.unretire(host_id, self._clock())
            result.kept[host_id] = why
            logger.warning("host %s kept serving: %s", host_id, why, extra=log)
            return
        try:
            if not self._groups.terminate(host_id):
                logger.info("host %s is no longer in its group", host_id, extra=log)
        except TerminateRefused as exc:
            # Still in its group (Standby, MinSize): not retired. Back to serving, or it
            # would stay `retiring`, claiming nothing, for ever.
            self._hosts.unretire(host_id, self._clock())
            result.kept[host_id] = "terminate_refused"
            result.errors.append(f"terminate:{host_id}: {exc}")
            logger.warning("host %s kept serving: %s", host_id, exc, extra=log)
            return
        result.retired.append(host_id)
        logger.info("host %s retired", host_id, extra=log)
        self._runners_gone(left, "host_retired", log)

    def _reap(self, pool: str, reap: Reap, result: PoolRun) -> None:
        """Terminate a stuck or down instance, unless it holds a job (a claim is left to the
        executors' takeover, a running job to finish) or GitHub keeps one of its runners."""
        host_id = reap.instance_id
        log = {"pool": pool, "host_id": host_id, "role": reap.role.value}
        held = self._held.holding(host_id)
        if held:
            result.kept[host_id] = f"holds_jobs:{','.join(str(j.job_id) for j in held)}"
            logger.info("%s host %s holds jobs: not reaped", reap.role.value, host_id,
                        extra=log)
            return
        left = [r for r in self._runners.on_host(host_id) if r.state is not RunnerState.GONE]
        why = self._deregister(left, log)
        if why is not None:
            result.kept[host_id] = why
            logger.warning("%s host %s not reaped: %s", reap.role.value, host_id, why,
                           extra=log)
            return
        try:
            self._groups.terminate(host_id, decrement=reap.decrement)
        except TerminateRefused as exc:
            result.kept[host_id] = "terminate_refused"
            result.errors.append(f"reap:{host_id}: {exc}")
            logger.warning("%s host %s not reaped: %s", reap.role.value, host_id, exc,
                           extra=log)
            return
        result.reaped.append(host_id)
        logger.info("%s host %s reaped", reap.role.value, host_id, extra=log)
        self._runners_gone(left, "host_reaped", log)

    def _runners_gone(self, runners: list[RunnerRecord], reason: str, log: dict) -> None:
        for record in runners:
            try:
                self._runners.move(record.runner_name, RunnerState.GONE, self._clock(),
                                   reason=reason)
            except DependencyUnavailable as exc:
                logger.warning("runner %s not recorded gone: %s", record.runner_name, exc,
                               extra=log)

    def _deregister(self, runners: list[RunnerRecord], log: dict) -> str | None:
        """Delete the host's runners from GitHub; None when none is left, else why the host
        must stay (a busy runner, or GitHub could not be asked)."""
        for record in runners:
            scope = runner_scope(record)
            if scope is None or record.runner_id is None or record.installation_id is None:
                continue  # never registered as far as its record tells: nothing to delete
            try:
                deleted = self._github.delete_runner(int(record.installation_id), scope,
                                                     int(record.runner_id))
            except (GitHubError, DependencyUnavailable) as exc:
                logger.warning("could not delete runner %s: %s", record.runner_name, exc,
                               extra=log | {"runner": record.runner_name})
                return f"github_unavailable:{record.runner_name}"
            if not deleted:
                return f"runner_busy:{record.runner_name}"
        return None


def runner_scope(record: RunnerRecord) -> RunnerScope | None:
    """Where a runner was registered, as its record says."""
    level, repository = record.scope_level, record.repository
    if level not in ("org", "repo") or not repository:
        return None
    owner, _, repo = repository.partition("/")
    return RunnerScope(level, owner, repo if level == "repo" else None)
