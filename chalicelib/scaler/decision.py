"""The scaler's decision for one pool: a pure function of the pool's Auto Scaling group, its
hosts' heartbeats and its demand, returning a frozen `Decision` (docs/scaling.md).

Each instance of the group is in one role:
- `serving`: its record says `serving` and its heartbeat is fresh: capacity (free slots);
- `booting`: no heartbeat yet, launched less than `boot_timeout_s` ago (or launched so recently
  the group does not list it yet: desired capacity above the instances listed): capacity to come;
- `stuck`: no heartbeat `boot_timeout_s` after launch: not capacity, and reaped (terminated);
- `draining` / `retiring`: finishing work or about to be terminated: not capacity;
- `down`: stopped, lost or a stale heartbeat: not capacity; reaped once its last heartbeat is
  `boot_timeout_s` old (time for a restarted daemon to beat again) and it holds no job (the
  service checks; one still holding a claim is left to the executors' takeover);
- `leaving`: terminating, detaching or in standby: already on its way out.

Needed slots = busy slots of serving hosts + backlog (demand no live host holds) + warm slots.
Target hosts = ceil(needed / slots per host), at least the group's minimum and the forecast
floor, at most `cap` = min(the group's maximum, ceil(max_runners / slots per host)).
Scale-out raises desired capacity by target - (serving + booting), never above `cap`: hosts
that are not capacity (stuck, down, draining, retiring) still count against it, and stuck and
down ones are reaped to make room. Scale-in retires idle serving hosts (no busy slot, idle for
`idle_s`), never a busy or booting one, while the remaining capacity still covers the needed
slots and the target, and never below the group's minimum (the group would refuse).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from chalicelib.hosts import HostRecord, HostState, dead_at
from chalicelib.jobs import CLAIM_STATES, DEMAND_STATES, WAITING_FOR_RUNNER, JobRecord

# Auto Scaling lifecycle states of an instance on its way out of the group (or out of service):
# https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-lifecycle.html
LEAVING_LIFECYCLE = frozenset({
    "Terminating", "Terminating:Wait", "Terminating:Proceed", "Terminated",
    "Detaching", "Detached", "EnteringStandby", "Standby",
})


class Role(StrEnum):
    SERVING = "serving"
    BOOTING = "booting"
    STUCK = "stuck"
    DRAINING = "draining"
    RETIRING = "retiring"
    DOWN = "down"
    LEAVING = "leaving"


@dataclass(frozen=True)
class Instance:
    """An instance of the pool's Auto Scaling group (its id is the host id)."""

    instance_id: str
    lifecycle_state: str
    availability_zone: str = ""
    launched_at: float | None = None  # None: unknown (then it counts as just launched)
    protected: bool = True  # from scale-in
    # The launch template version it was launched with (None: unknown, or no template).
    launch_version: str | None = None


@dataclass(frozen=True)
class Limits:
    """A pool's bounds: the group's min/max size, slots per host, the pool's `max_runners`."""

    min_hosts: int
    max_hosts: int
    slots_per_host: int
    max_runners: int
    idle_s: float
    boot_timeout_s: float
    warm_slots: int = 0

    def __post_init__(self) -> None:
        if self.slots_per_host < 1 or self.max_runners < 1:
            raise ValueError("slots_per_host and max_runners must be at least 1")
        if not 0 <= self.min_hosts <= self.max_hosts:
            raise ValueError(f"need 0 <= min_hosts ({self.min_hosts}) <= max_hosts "
                             f"({self.max_hosts})")
        if self.idle_s < 0 or self.boot_timeout_s <= 0 or self.warm_slots < 0:
            raise ValueError("idle_s and warm_slots must be >= 0, boot_timeout_s > 0")

    @property
    def cap(self) -> int:
        """Never more hosts than `max_runners` needs, nor than the group may hold."""
        return min(self.max_hosts, math.ceil(self.max_runners / self.slots_per_host))

    @property
    def floor(self) -> int:
        return min(self.min_hosts, self.cap)


@dataclass(frozen=True)
class PoolView:
    """What one scaler run reads for one pool."""

    pool: str
    now: float
    desired: int  # the group's desired capacity
    instances: tuple[Instance, ...]
    hosts: Mapping[str, HostRecord]  # heartbeat records by host id (= instance id)
    backlog: int  # demand no live host holds (`backlog`)
    forecast_hosts: int = 0  # the forecast floor (0: none yet)


@dataclass(frozen=True)
class Reap:
    """A stuck or down instance to terminate. `decrement`: lower desired capacity with it;
    False where that would take the group below its minimum (the group launches a
    replacement instead, which the minimum asks for anyway)."""

    instance_id: str
    role: Role
    decrement: bool = True


@dataclass(frozen=True)
class Decision:
    pool: str
    desired: int  # the desired capacity to set (== current: no scale-out)
    current_desired: int
    target: int  # hosts the pool should have serving or booting
    needed_slots: int
    backlog: int
    busy_slots: int
    retire: tuple[str, ...]  # idle serving hosts to retire, in order
    finish: tuple[str, ...]  # hosts left `retiring` (by an earlier run) to terminate
    protect: tuple[str, ...]  # instances not yet protected from scale-in
    roles: Mapping[str, Role] = field(default_factory=dict)
    reap: tuple[Reap, ...] = ()  # stuck and down instances to terminate (if they hold no job)

    @property
    def scale_out(self) -> int:
        return self.desired - self.current_desired

    def count(self, role: Role) -> int:
        return sum(1 for r in self.roles.values() if r is role)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool, "desired": self.desired, "current_desired": self.current_desired,
            "target": self.target, "needed_slots": self.needed_slots, "backlog": self.backlog,
            "busy_slots": self.busy_slots, "retire": list(self.retire),
            "finish": list(self.finish), "protect": list(self.protect),
            "reap": [reap.instance_id for reap in self.reap],
            "roles": dict(Counter(role.value for role in self.roles.values())),
        }


def role_of(instance: Instance, host: HostRecord | None, now: float, limits: Limits) -> Role:
    if instance.lifecycle_state in LEAVING_LIFECYCLE:
        return Role.LEAVING
    if host is None:
        launched = instance.launched_at if instance.launched_at is not None else now
        return Role.BOOTING if now - launched <= limits.boot_timeout_s else Role.STUCK
    if host.state is HostState.RETIRING:
        return Role.RETIRING
    fresh = now <= dead_at(host)
    if fresh and host.state is HostState.SERVING:
        return Role.SERVING
    if fresh and host.state is HostState.DRAINING:
        return Role.DRAINING
    return Role.DOWN


def decide(view: PoolView, limits: Limits) -> Decision:
    """The pool's desired capacity and the hosts to retire. Pure."""
    now = view.now
    roles = {i.instance_id: role_of(i, view.hosts.get(i.instance_id), now, limits)
             for i in view.instances}
    in_group = [i for i in view.instances if roles[i.instance_id] is not Role.LEAVING]
    serving = [view.hosts[i.instance_id] for i in in_group
               if roles[i.instance_id] is Role.SERVING]
    booting = sum(1 for r in roles.values() if r is Role.BOOTING)
    # Desired capacity not yet listed as instances: launching, counts as booting.
    unseen = max(0, view.desired - len(in_group))
    have = len(serving) + booting + unseen

    busy = sum(max(0, host.slots_busy) for host in serving)
    needed = busy + max(0, view.backlog) + limits.warm_slots
    want = math.ceil(needed / limits.slots_per_host)
    target = min(max(want, limits.floor, view.forecast_hosts), limits.cap)

    finish = tuple(i.instance_id for i in in_group
                   if roles[i.instance_id] is Role.RETIRING
                   and view.hosts[i.instance_id].slots_busy == 0)
    # Terminations that lower desired capacity may take it down to the group's minimum, no
    # further (AWS refuses one below it with a ValidationError).
    room = max(0, view.desired - limits.min_hosts - len(finish))
    reap = []
    for i in in_group:
        if roles[i.instance_id] is Role.STUCK or (
                roles[i.instance_id] is Role.DOWN
                and now - view.hosts[i.instance_id].heartbeat_at > limits.boot_timeout_s):
            reap.append(Reap(i.instance_id, roles[i.instance_id], decrement=room > 0))
            room = max(0, room - 1)

    # Instances that are not capacity still count against the cap: billed hosts never
    # outnumber what max_runners needs. Reaping them makes room (the next round re-reads).
    base = max(view.desired, len(in_group))
    desired = view.desired
    retire: tuple[str, ...] = ()
    if target > have:
        # Never below what the group already has (only retiring lowers it), never above the
        # cap (which the group's maximum bounds too).
        desired = max(view.desired, min(base + target - have, limits.cap))
    elif target < have:
        retire = _victims(view, limits, serving, in_group, min(have - target, room), needed,
                          booting + unseen)

    protect = tuple(i.instance_id for i in in_group if not i.protected)
    return Decision(pool=view.pool, desired=desired, current_desired=view.desired,
                    target=target, needed_slots=needed, backlog=view.backlog, busy_slots=busy,
                    retire=retire, finish=finish, protect=protect, roles=roles,
                    reap=tuple(reap))


def _victims(view: PoolView, limits: Limits, serving: list[HostRecord],
             in_group: list[Instance], surplus: int, needed: int, coming: int
             ) -> tuple[str, ...]:
    """Idle serving hosts to retire, at most `surplus`, while the rest still covers `needed`.

    Order: the availability zone holding the most of the group's instances first (the scaler
    chooses its victims itself, so it keeps the zones balanced as the group's own termination
    policy would), then the host idle longest (the least recent demand), then the oldest
    launched (likely the oldest launch template: retiring it first moves the fleet forward, as
    the `OldestLaunchTemplate` policy does), then the id (deterministic)."""
    zone_of = {i.instance_id: i.availability_zone for i in in_group}
    launched = {i.instance_id: i.launched_at or 0.0 for i in in_group}
    idle = [host for host in serving
            if host.slots_busy == 0 and view.now - host.idle_since >= limits.idle_s]
    zones = Counter(zone_of[i.instance_id] for i in in_group)
    capacity = sum(host.slots_total or limits.slots_per_host for host in serving)
    capacity += coming * limits.slots_per_host
    chosen: list[str] = []
    while idle and len(chosen) < surplus:
        host = min(idle, key=lambda h: (-zones[zone_of[h.host_id]], h.idle_since,
                                        launched[h.host_id], h.host_id))
        slots = host.slots_total or limits.slots_per_host
        if capacity - slots < needed:
            break
        idle.remove(host)
        chosen.append(host.host_id)
        capacity -= slots
        zones[zone_of[host.host_id]] -= 1
    return tuple(chosen)


def with_seen(listed: list[JobRecord], seen: Iterable[JobRecord]) -> list[JobRecord]:
    """The waiting jobs the index listed, plus the jobs a stream batch showed waiting that it
    does not list yet (the `by_state` index is eventually consistent: it may miss the very job
    whose record triggered the run). One record per job id; the index's wins. Pure."""
    found = {job.job_id: job for job in seen if job.state in WAITING_FOR_RUNNER}
    found.update((job.job_id, job) for job in listed)
    return list(found.values())


def backlog(jobs: Any, live_hosts: set[str] | frozenset[str] | Mapping[str, float]) -> int:
    """Demand no live host's heartbeat counts yet: jobs received or dispatched, jobs claimed
    (or with a runner started) by a host that is not live, and jobs a live host claimed after
    its last heartbeat. A live claimant's job holds one of its slots (slots are taken when the
    message is received), which its next heartbeat reports busy: counting it here once the
    heartbeat has would count it twice; not counting it before then would under-count demand
    for up to a heartbeat interval, and a burst would wait that long for hosts.
    `jobs`: records with `state`, `host_id` and `claimed_at`; `live_hosts`: live host ids, or
    live host id -> its last heartbeat time."""
    beats = live_hosts if isinstance(live_hosts, Mapping) else dict.fromkeys(live_hosts, None)
    count = 0
    for job in jobs:
        if job.state in DEMAND_STATES:
            count += 1
        elif job.state in CLAIM_STATES:
            if job.host_id not in beats:
                count += 1
            else:
                beat = beats[job.host_id]
                claimed = getattr(job, "claimed_at", None)
                if beat is not None and claimed is not None and claimed > beat:
                    count += 1
    return count
