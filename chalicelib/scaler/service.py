"""The scaler's one acting class: per pool, under the pool's lease, read the group, the hosts and
the demand, decide (`decision.decide`, pure), and carry the decision out through the Auto Scaling
API and the retire protocol (docs/scaling.md):

1. mark the host `retiring` (conditional: `serving`, idle, its heartbeat saw its last claim);
   from then on its claims fail and its daemon receives nothing;
2. delete its runners from GitHub: GitHub refusing (422: a runner is busy) or not answering
   keeps the host (back to `serving`);
3. terminate the instance, decrementing desired capacity; record its runners gone.
A host left `retiring` (a run that failed between 1 and 3) is finished by the next run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError, RunnerScope
from chalicelib.hosts import DEAD_AFTER_BEATS, HostStore, host_alive
from chalicelib.pools import Pool
from chalicelib.runners import RunnerRecord, RunnerState, RunnerStore
from chalicelib.scaler import decision
from chalicelib.scaler.autoscaling import AutoScaling
from chalicelib.scaler.decision import Decision, Limits, PoolView
from chalicelib.scaler.store import ScalerLease, WaitingJobs
from chalicelib.telemetry import COUNT, Telemetry

logger = Logger(service="runnerhub-scaler")

# A run asked for again while it ran (`ScalerLease`) runs at most this many times in a row.
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
    kept: dict[str, str] = field(default_factory=dict)  # host -> why it was not retired
    errors: list[str] = field(default_factory=list)
    rounds: int = 0
    free_slots: int = 0  # free slots of the pool's serving hosts, as last read

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "skipped": self.skipped, "desired_set": self.desired_set,
                "retired": self.retired, "kept": self.kept, "errors": self.errors,
                "rounds": self.rounds, "free_slots": self.free_slots,
                "decision": self.decision.as_dict() if self.decision else None}


class Scaler:
    def __init__(
        self,
        *,
        pools: Mapping[str, Pool],
        hosts: HostStore,
        runners: RunnerStore,
        waiting: WaitingJobs,
        groups: AutoScaling,
        github: Any,
        lease: ScalerLease,
        config: ScalerConfig,
        clock: Callable[[], float] = time.time,
        forecast: Callable[[str], int] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """`github`: a GitHubClient (deletes a retiring host's runners). `forecast`: hosts the
        forecast asks for per pool (the floor), none yet by default. `telemetry`: where each
        run's metrics go (`emit_run`), none by default."""
        self.pools = pools
        self._hosts = hosts
        self._runners = runners
        self._waiting = waiting
        self._groups = groups
        self._github = github
        self._lease = lease
        self.config = config
        self._clock = clock
        self._forecast = forecast or (lambda pool: 0)
        self._telemetry = telemetry

    def run(self, pool: str) -> PoolRun:
        """One run for `pool` under its lease (then again, if asked meanwhile)."""
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r} (pools: {sorted(self.pools)})")
        owner = f"scaler-{uuid.uuid4().hex[:12]}"
        result = PoolRun(pool)
        for _ in range(MAX_ROUNDS):
            if not self._lease.acquire(pool, owner, self._clock(), self.config.lease_s):
                if result.rounds == 0:
                    result.skipped = "lease_held"
                    logger.info("another scaler run holds the lease; it runs again",
                                extra={"pool": pool})
                break
            try:
                self._once(pool, result)
            finally:
                again = self._lease.release(pool, owner, self._clock())
            if not again or result.skipped:
                break
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

    def _once(self, pool: str, result: PoolRun) -> None:
        """One round; what it did is added to `result` (a repeated run adds its own)."""
        result.rounds += 1
        name = self.config.group_name(pool)
        group = self._groups.group(name)
        if group is None:
            result.skipped = "no_group"
            logger.error("no Auto Scaling group %s for pool %s", name, pool,
                         extra={"pool": pool})
            return
        now = self._clock()
        ids = {instance.instance_id for instance in group.instances}
        hosts = {host.host_id: host for host in self._hosts.all() if host.host_id in ids}
        live = frozenset(h for h, record in hosts.items() if host_alive(record, now))
        limits = Limits(min_hosts=group.min_size, max_hosts=group.max_size,
                        slots_per_host=self.config.slots_for(pool),
                        max_runners=self.pools[pool].max_runners, idle_s=self.config.idle_s,
                        boot_timeout_s=self.config.boot_timeout_s,
                        warm_slots=self.config.warm_slots)
        view = PoolView(pool=pool, now=now, desired=group.desired, instances=group.instances,
                        hosts=hosts,
                        backlog=decision.backlog(self._waiting.waiting(pool), live),
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
        if not self._groups.terminate(host_id):
            logger.info("host %s is no longer in its group", host_id, extra=log)
        result.retired.append(host_id)
        logger.info("host %s retired", host_id, extra=log)
        for record in left:
            try:
                self._runners.move(record.runner_name, RunnerState.GONE, self._clock(),
                                   reason="host_retired")
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
