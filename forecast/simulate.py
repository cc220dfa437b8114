"""A discrete-event simulation of a pool's whole scaling loop, driven by a trace (docs/scaling.md,
"Predictive scaling: the simulator and the policies").

What is real: routing (`chalicelib.pools.route`, the pools file), the scaler's decision
(`chalicelib.scaler.decision.decide` on `PoolView`/`Limits` built as `Scaler._once` builds them,
with `HostRecord` heartbeats), its schedule (every `schedule_s`, 60 s) and its trigger (a job
arriving runs the pool's scaler `debounce_s`, 1 s, later: the stream's batching window), the pools'
warm targets (`chalicelib.warm_targets.wanted`: the executor's and the scaler's rule) and
`max_runners`. What is played: a host boots for `boot_s` (plus a seeded jitter) after the
scaler raises desired capacity, then serves `slots` runners; a job takes
a warm runner (waiting `pickup_s`) or a free slot (its own runner starts: `runner_startup_s` +
`pickup_s`), else it queues (FIFO, per pool) until a slot frees or a host comes up; a job holds
its slot for its `duration_s`. Warm runners hold slots like jobs and are refilled on free slots,
taking `runner_startup_s` to come up. A retired host is terminated at once (the retire protocol's
races cannot happen here: one event at a time). Hosts never fail, so their heartbeats are always
fresh (`heartbeat_s` = inf). A pool no simulated job routes to is left out: it is never scaled,
so no policy keeps spare hosts, warm runners or a floor there (a replay judges the pools its
trace uses; a fleet's idle pools would cost every policy alike).

Deterministic for a seed: the seed draws the boot jitter and which free host a demand message
reaches (SQS hands it to whichever poller receives first: random among hosts with free slots).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chalicelib import warm_targets
from chalicelib.hosts import HostRecord, HostState
from chalicelib.pools import PoolConfig, route
from chalicelib.scaler.decision import Instance, Limits, PoolView, decide
from forecast.traces import SIM_REPOSITORY, TraceJob, sim_owner

ZONES = ("a", "b", "c")  # instances spread over three zones, as a group over three subnets
# Event kinds, in the order of equal-time events (a job ending frees its slot before an arrival
# at the same instant looks for one; a scaler run sees both).
_END, _WARM_READY, _UP, _ARRIVAL, _SCALE, _TICK = range(6)


class Policy(Protocol):
    """How a pool is scaled, on top of the scaler's own decision (forecast/policies.py)."""

    name: str
    spare_hosts: int  # free hosts kept on top of demand: the scaler's warm slots / slots
    idle_s: float  # the scaler's idle timeout
    scale_in_delay_s: float  # no scale-in below the most hosts wanted this long ago

    def floor_hosts(self, pool: str, now: float) -> int: ...  # the forecast/schedule floor

    def warm(self, pool: str, now: float) -> int: ...  # warm runners wanted on top of the file's


@dataclass(frozen=True)
class SimConfig:
    """The simulated world. Jobs arriving in [measure_from, measure_to) are judged (default: the
    whole trace); earlier ones only warm the fleet up. Instance-hours count within that window."""

    boot_s: float = 60.0  # launch -> the daemon's first heartbeat
    boot_jitter_s: float = 10.0  # each boot is boot_s + uniform(-jitter, +jitter)
    runner_startup_s: float = 5.0  # a runner container's start-up (REAL_RUNNER_STARTUP_S)
    pickup_s: float = 0.5  # a listening runner -> GitHub hands it the job
    slots_per_host: int = 4  # the executors' RUNNERHUB_SLOTS
    pool_slots: Mapping[str, int] = field(default_factory=dict)  # per pool, where different
    min_hosts: int = 0
    max_hosts: Mapping[str, int] = field(default_factory=dict)  # group MaxSize (default: cap)
    boot_timeout_s: float = 600.0
    schedule_s: float = 60.0
    debounce_s: float = 1.0
    measure_from: float | None = None
    measure_to: float | None = None
    # When the simulated clock starts (no host yet): default the first arrival or measure_from,
    # whichever is earlier.
    start: float | None = None
    # After the last judged arrival the run goes on until every judged job has started, at most
    # this long; a job still waiting then counts with the wait it had (and as `unserved`).
    overrun_s: float = 86400.0

    def __post_init__(self) -> None:
        for name in ("boot_s", "boot_jitter_s", "runner_startup_s", "pickup_s", "overrun_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SimConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.boot_jitter_s > self.boot_s:
            raise ValueError("SimConfig.boot_jitter_s cannot exceed boot_s")
        if self.schedule_s <= 0 or self.debounce_s < 0 or self.boot_timeout_s <= 0:
            raise ValueError("SimConfig: schedule_s and boot_timeout_s must be > 0, "
                             "debounce_s >= 0")
        if self.boot_s + self.boot_jitter_s >= self.boot_timeout_s:
            raise ValueError("SimConfig: a boot longer than boot_timeout_s would be reaped as "
                             "stuck")
        slots = [self.slots_per_host, *self.pool_slots.values()]
        if any(not isinstance(s, int) or s < 1 for s in slots):
            raise ValueError(f"SimConfig: slots per host must be integers >= 1, got {slots}")
        if self.min_hosts < 0 or any(m < self.min_hosts for m in self.max_hosts.values()):
            raise ValueError("SimConfig: need 0 <= min_hosts <= every max_hosts")
        if (self.measure_from is not None and self.measure_to is not None
                and self.measure_to <= self.measure_from):
            raise ValueError("SimConfig: measure_to must be after measure_from")

    def slots_for(self, pool: str) -> int:
        return self.pool_slots.get(pool, self.slots_per_host)


@dataclass
class SimResult:
    """The judged jobs' waits (arrival -> a runner took it), in arrival order, and the cost."""

    waits: list[float]
    instance_hours: float
    utilisation: float  # busy slot-s (jobs' runners) / slot-s of hosts in the group
    unrouted: int = 0  # judged jobs no pool serves (not in `waits`)
    unserved: int = 0  # judged jobs still waiting when the run stopped (in `waits`, censored)
    hosts_launched: int = 0
    decisions: int = 0  # decide() calls
    wait_by_pool: dict[str, list[float]] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of the waits, nearest rank; 0 for no job."""
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]

    def summary(self) -> dict[str, Any]:
        return {"jobs": len(self.waits), "p50_wait_s": round(self.percentile(50), 2),
                "p95_wait_s": round(self.percentile(95), 2),
                "max_wait_s": round(max(self.waits, default=0.0), 2),
                "instance_hours": round(self.instance_hours, 2),
                "utilisation": round(self.utilisation, 4), "unrouted": self.unrouted,
                "unserved": self.unserved,
                "max_wait_by_pool": {pool: round(max(waits), 1)
                                     for pool, waits in sorted(self.wait_by_pool.items())}}


class _Host:
    __slots__ = ("busy_at", "claim_at", "end", "id", "instance", "jobs", "launched",
                 "record", "serving", "slots", "up_at", "warm_ready", "warm_starting")

    def __init__(self, host_id: str, zone: str, launched: float, slots: int) -> None:
        self.id = host_id
        self.instance = Instance(host_id, "InService", zone, launched_at=launched)
        self.launched = launched
        self.slots = slots
        self.up_at = math.inf
        self.end = math.inf
        self.serving = False
        self.jobs = 0  # slots held by jobs (their runner starting or running)
        self.warm_starting = 0
        self.warm_ready = 0
        self.busy_at: float | None = None
        self.claim_at: float | None = None
        self.record: HostRecord | None = None  # the last heartbeat, rebuilt on a change

    @property
    def used(self) -> int:
        return self.jobs + self.warm_starting + self.warm_ready

    def heartbeat(self, now: float) -> HostRecord:
        """The host's heartbeat record as the scaler reads it (fresh: hosts never fail here).
        model_construct: the fields are ours and right; validation would cost more than decide."""
        if self.record is None:
            self.record = HostRecord.model_construct(
                host_id=self.id, state=HostState.SERVING, heartbeat_at=now,
                heartbeat_s=math.inf, slots_total=self.slots, slots_busy=self.used,
                started_at=self.up_at, busy_at=self.busy_at, last_claim_at=self.claim_at)
        return self.record


class _Pool:
    def __init__(self, name: str, slots: int, cap_hosts: int, max_runners: int) -> None:
        self.name = name
        self.slots = slots
        self.max_hosts = cap_hosts
        self.max_runners = max_runners
        self.hosts: dict[str, _Host] = {}  # in the group (booting or serving): desired
        self.queue: deque[tuple[float, int]] = deque()  # (arrival, job index)
        self.runners = 0  # jobs' runners + warm runners: at most max_runners
        self.warm_seated = 0
        self.triggered = False
        self.wants: deque[tuple[float, int]] = deque()  # (time, hosts wanted): scale-in delay
        self.free: set[str] = set()  # serving hosts with a free slot


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def simulate(jobs: Sequence[TraceJob], pools: PoolConfig, policy: Policy, config: SimConfig,
             seed: int = 0) -> SimResult:
    """Run `jobs` through the pools' scaling loop under `policy`. Deterministic for `seed`."""
    return _Simulation(jobs, pools, policy, config, seed).run()


class _Simulation:
    def __init__(self, jobs: Sequence[TraceJob], pools: PoolConfig, policy: Policy,
                 config: SimConfig, seed: int) -> None:
        if not jobs:
            raise ValueError("simulate: the trace has no job")
        if policy.spare_hosts < 0 or policy.idle_s < 0 or policy.scale_in_delay_s < 0:
            raise ValueError(f"policy {policy.name}: spare_hosts, idle_s and scale_in_delay_s "
                             "must be >= 0")
        unknown = sorted((set(config.pool_slots) | set(config.max_hosts)) - set(pools.names))
        if unknown:
            raise ValueError(f"SimConfig names pools not in the pools file: {unknown}")
        self.jobs = sorted(jobs, key=lambda job: job.at)
        for job in self.jobs:
            if not (math.isfinite(job.at) and math.isfinite(job.duration_s)
                    and job.duration_s >= 0):
                raise ValueError(f"simulate: bad job {job!r} (time and duration must be "
                                 "finite, duration >= 0)")
        self.config = config
        self.policy = policy
        self.pool_cfg = {pool.name: pool for pool in pools.pools}
        self.rng = random.Random(seed)
        self.pools: dict[str, _Pool] = {}
        for pool in pools.pools:
            slots = config.slots_for(pool.name)
            cap = min(config.max_hosts.get(pool.name, math.inf),
                      math.ceil(pool.max_runners / slots))
            self.pools[pool.name] = _Pool(pool.name, slots, int(max(cap, config.min_hosts)),
                                          pool.max_runners)
        self.start = min([self.jobs[0].at, *(t for t in (config.start, config.measure_from)
                                             if t is not None)])
        self.m0 = config.measure_from if config.measure_from is not None else self.start
        # Default: up to a second after the last arrival (every job is judged).
        self.m1 = (config.measure_to if config.measure_to is not None
                   else self.jobs[-1].at + 1.0)
        # Route each distinct label set once (routing is pure).
        owner = sim_owner(pools)
        routes: dict[tuple[str, ...], str | None] = {}
        self.job_pool: list[str | None] = []
        for job in self.jobs:
            if job.labels not in routes:
                decision = route(pools, job.labels, owner=owner, repository=SIM_REPOSITORY,
                                 private=True)
                routes[job.labels] = decision.pool.name if decision.pool else None
            self.job_pool.append(routes[job.labels])
        # The pools the scaler runs for (in pools-file order): those some job routes to.
        used = set(self.job_pool)
        self.active = [pool for name, pool in self.pools.items() if name in used]
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.waits: dict[int, float] = {}  # judged job -> wait
        self.judged = [i for i, job in enumerate(self.jobs)
                       if self.m0 <= job.at < self.m1 and self.job_pool[i] is not None]
        self.judged_set = set(self.judged)
        self.unrouted = sum(1 for i, job in enumerate(self.jobs)
                            if self.m0 <= job.at < self.m1 and self.job_pool[i] is None)
        self.busy_slot_s = 0.0
        self.all_hosts: list[_Host] = []
        self.decisions = 0
        self.host_count = 0

    # --- the event queue ---

    def push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, payload))

    def run(self) -> SimResult:
        for index, job in enumerate(self.jobs):
            if self.job_pool[index] is not None:
                self.push(job.at, _ARRIVAL, index)
        # The scheduled runs: every pool on the same minute, as one Lambda invocation.
        first_tick = math.floor(self.start / self.config.schedule_s) * self.config.schedule_s
        self.push(first_tick, _TICK, None)
        stop = self.m1 + self.config.overrun_s
        waiting = len(self.judged)
        now = self.start
        while self.events:
            now, kind, _, payload = heapq.heappop(self.events)
            if now > stop or (now >= self.m1 and waiting == 0):
                break
            if kind == _ARRIVAL:
                self.arrive(now, payload)
            elif kind == _END:
                self.end_job(now, payload)
            elif kind == _WARM_READY:
                self.warm_ready(now, payload)
            elif kind == _UP:
                self.host_up(now, payload)
            elif kind == _SCALE:
                pool = self.pools[payload]
                pool.triggered = False
                self.scale(now, pool)
            elif kind == _TICK:
                for pool in self.active:
                    self.scale(now, pool)
                self.push(now + self.config.schedule_s, _TICK, None)
            waiting = len(self.judged) - len(self.waits)
        return self.result(min(now, stop))

    def result(self, stopped: float) -> SimResult:
        unserved = 0
        for index in self.judged:
            if index not in self.waits:
                self.waits[index] = stopped - self.jobs[index].at
                unserved += 1
        host_s = slot_s = 0.0
        for host in self.all_hosts:
            seconds = _overlap(host.launched, min(host.end, stopped), self.m0, self.m1)
            host_s += seconds
            slot_s += seconds * host.slots
        by_pool: dict[str, list[float]] = {}
        for index in self.judged:
            by_pool.setdefault(self.job_pool[index], []).append(self.waits[index])
        return SimResult(waits=[self.waits[i] for i in self.judged],
                         instance_hours=host_s / 3600,
                         utilisation=self.busy_slot_s / slot_s if slot_s else 0.0,
                         unrouted=self.unrouted, unserved=unserved,
                         hosts_launched=len(self.all_hosts), decisions=self.decisions,
                         wait_by_pool=by_pool)

    # --- jobs, runners, slots ---

    def warm_wanted(self, pool: _Pool, now: float) -> int:
        forecast = self.policy.warm(pool.name, now)
        if forecast < 0:
            raise ValueError(f"policy {self.policy.name}: warm({pool.name}) is negative")
        # The production rule (the executor's keeper and the scaler call it too).
        return warm_targets.wanted(self.pool_cfg[pool.name], now, forecast)

    def changed(self, pool: _Pool, host: _Host) -> None:
        host.record = None
        if host.serving and host.used < host.slots:
            pool.free.add(host.id)
        else:
            pool.free.discard(host.id)

    def start_job(self, now: float, pool: _Pool, host: _Host, index: int, wait: float,
                  run_from: float) -> None:
        """Job `index` holds a slot of `host` from now; its runner has it at `run_from`."""
        job = self.jobs[index]
        if index in self.judged_set:
            self.waits[index] = wait
        end = run_from + job.duration_s
        self.busy_slot_s += _overlap(now, end, self.m0, self.m1)
        self.push(end, _END, (pool.name, host.id))

    def arrive(self, now: float, index: int) -> None:
        pool = self.pools[self.job_pool[index]]
        taker = self.ready_warm_host(pool)
        if taker is not None and not pool.queue:
            # GitHub hands the job to an idle runner that covers it: a warm one.
            taker.warm_ready -= 1
            taker.jobs += 1
            pool.warm_seated -= 1
            self.changed(pool, taker)
            self.start_job(now, pool, taker, index, self.config.pickup_s,
                           now + self.config.pickup_s)
        else:
            pool.queue.append((now, index))
        self.dispatch(now, pool)
        if not pool.triggered:
            pool.triggered = True
            self.push(now + self.config.debounce_s, _SCALE, pool.name)

    def ready_warm_host(self, pool: _Pool) -> _Host | None:
        if pool.warm_seated == 0:
            return None
        for host in pool.hosts.values():
            if host.serving and host.warm_ready:
                return host
        return None

    def free_host(self, pool: _Pool) -> _Host | None:
        """A serving host with a free slot: whichever poller receives the message first."""
        if not pool.free or pool.runners >= pool.max_runners:
            return None
        if len(pool.free) == 1:
            return pool.hosts[next(iter(pool.free))]
        return pool.hosts[self.rng.choice(sorted(pool.free))]

    def dispatch(self, now: float, pool: _Pool) -> None:
        """Queued jobs onto free slots (each starts its own runner), then the warm refill."""
        config = self.config
        while pool.queue:
            host = self.free_host(pool)
            if host is None:
                break
            arrived, index = pool.queue.popleft()
            host.jobs += 1
            host.claim_at = now
            pool.runners += 1
            self.changed(pool, host)
            ready = now + config.runner_startup_s + config.pickup_s
            self.start_job(now, pool, host, index, ready - arrived, ready)
        wanted = self.warm_wanted(pool, now)
        while pool.warm_seated < wanted:
            host = self.free_host(pool)
            if host is None:
                break
            host.warm_starting += 1
            pool.warm_seated += 1
            pool.runners += 1
            self.changed(pool, host)
            self.push(now + config.runner_startup_s, _WARM_READY, (pool.name, host.id))
        if pool.warm_seated > wanted:
            # The target fell: hosts release ready warm runners down to it.
            for host in list(pool.hosts.values()):
                while host.warm_ready and pool.warm_seated > wanted:
                    host.warm_ready -= 1
                    pool.warm_seated -= 1
                    pool.runners -= 1
                    self.release(now, pool, host)

    def release(self, now: float, pool: _Pool, host: _Host) -> None:
        if host.used == 0:
            host.busy_at = now
        self.changed(pool, host)

    def end_job(self, now: float, where: tuple[str, str]) -> None:
        pool = self.pools[where[0]]
        host = pool.hosts[where[1]]
        host.jobs -= 1
        pool.runners -= 1
        self.release(now, pool, host)
        self.dispatch(now, pool)

    def warm_ready(self, now: float, where: tuple[str, str]) -> None:
        pool = self.pools[where[0]]
        host = pool.hosts[where[1]]
        host.warm_starting -= 1
        if pool.queue:
            # A job queued meanwhile: the runner that came up takes it (the oldest first).
            arrived, index = pool.queue.popleft()
            host.jobs += 1
            pool.warm_seated -= 1
            self.changed(pool, host)
            ready = now + self.config.pickup_s
            self.start_job(now, pool, host, index, ready - arrived, ready)
        else:
            host.warm_ready += 1
            self.changed(pool, host)
        self.dispatch(now, pool)

    def host_up(self, now: float, where: tuple[str, str]) -> None:
        pool = self.pools[where[0]]
        host = pool.hosts.get(where[1])
        if host is None:  # reaped before it came up
            return
        host.serving = True
        host.up_at = now
        self.changed(pool, host)
        self.dispatch(now, pool)

    # --- the scaler ---

    def scale(self, now: float, pool: _Pool) -> None:
        policy = self.policy
        floor = policy.floor_hosts(pool.name, now)
        if floor < 0:
            raise ValueError(f"policy {policy.name}: floor_hosts({pool.name}) is negative")
        delay = policy.scale_in_delay_s
        while pool.wants and pool.wants[0][0] < now - delay:
            pool.wants.popleft()
        if delay and pool.wants:
            floor = max(floor, max(want for _, want in pool.wants))
        wanted = self.warm_wanted(pool, now)
        if not (pool.hosts or pool.queue or floor or wanted or policy.spare_hosts
                or self.config.min_hosts):
            return  # an empty, quiet pool: decide() would keep it at zero
        warm_short = min(max(0, wanted - pool.warm_seated),
                         max(0, pool.max_runners - pool.runners))
        limits = Limits(min_hosts=self.config.min_hosts, max_hosts=pool.max_hosts,
                        slots_per_host=pool.slots, max_runners=pool.max_runners,
                        idle_s=policy.idle_s, boot_timeout_s=self.config.boot_timeout_s,
                        warm_slots=policy.spare_hosts * pool.slots + warm_short)
        # The group lists its instances at once here: desired capacity == instances.
        view = PoolView(pool=pool.name, now=now, desired=len(pool.hosts),
                        instances=tuple(host.instance for host in pool.hosts.values()),
                        hosts={host.id: host.heartbeat(now) for host in pool.hosts.values()
                               if host.serving},
                        backlog=len(pool.queue), forecast_hosts=floor)
        decided = decide(view, limits)
        self.decisions += 1
        if delay:
            pool.wants.append((now, min(math.ceil(decided.needed_slots / pool.slots),
                                        limits.cap)))
        launches = decided.desired - len(pool.hosts)
        for host_id in (*decided.retire, *decided.finish,
                        *(reap.instance_id for reap in decided.reap)):
            self.terminate(now, pool, host_id)
        for _ in range(launches):
            self.launch(now, pool)

    def launch(self, now: float, pool: _Pool) -> None:
        config = self.config
        self.host_count += 1
        host = _Host(f"i-{self.host_count:08x}", ZONES[self.host_count % len(ZONES)], now,
                     pool.slots)
        pool.hosts[host.id] = host
        self.all_hosts.append(host)
        boot = config.boot_s + self.rng.uniform(-config.boot_jitter_s, config.boot_jitter_s)
        self.push(now + boot, _UP, (pool.name, host.id))

    def terminate(self, now: float, pool: _Pool, host_id: str) -> None:
        host = pool.hosts.pop(host_id)
        if host.used:
            raise AssertionError(f"the scaler chose busy host {host_id} to terminate")
        host.end = now
        pool.free.discard(host_id)
