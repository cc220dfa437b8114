"""Rolling a pool's hosts onto its group's launch template version, and back when the new hosts
fail (pure; the scaler carries each step out: chalicelib/scaler/service.py).

A deploy that changes the executor AMI or the hosts' settings makes a new launch template
version and sets it on the group (infra/ pins the number). Instances launched before keep the old
one, so each scaler run compares them and, while any differ, steps a rollout:

- **Health of the new hosts first** (`host_failure`: only what the version is to blame for).
  `max_failed_hosts` failed new hosts roll the rollout back: the group's version is set back
  to the one the old hosts run, the failed hosts that never served are terminated, and the
  rollout continues towards the previous version. Replacements the group owes but has not
  launched within the grace after the last replacement are a failure too.
  A rollback is never itself rolled back: its failures stall it (`stalled`, an alarm), and a
  stalled rollout does nothing more until the group's version changes (a deploy, a person).
- **Replacement within a healthy minimum.** At most `desired - ceil(desired * min_healthy_percent
  / 100)` hosts (at least one) are out of service at once: replaced hosts still draining, and
  new hosts not yet healthy. Idle old hosts go first. Replacing is terminating the instance
  without lowering desired capacity: the group launches its replacement on the target version
  at once, and the terminating lifecycle hook holds the old instance while its daemon drains
  (executor/lifecycle.py: running jobs finish, nothing new is taken).
- **Checkpoints.** When the share of hosts on the target version first reaches a checkpoint
  (percent), the rollout pauses `checkpoint_delay_s` before replacing more: a bad version shows
  on a few hosts before it reaches all of them.

Each step is a `Step`: what to persist (`state`), the group version to set back, the instances to
terminate, and what happened (`event`, for the metrics and the log).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from chalicelib.hosts import HostRecord, HostState, host_alive
from chalicelib.scaler.decision import LEAVING_LIFECYCLE, Instance

Status = Literal["rolling", "rolling_back", "done", "stalled"]
Event = Literal["started", "checkpoint", "replacing", "rolled_back", "completed", "stalled",
                "waiting", "none"]


@dataclass(frozen=True)
class RolloutPolicy:
    min_healthy_percent: int = 90
    checkpoints: tuple[int, ...] = (50,)
    checkpoint_delay_s: float = 300.0
    health_grace_s: float = 600.0
    max_start_failures: int = 3
    max_failed_hosts: int = 1
    # A rollout (or its rollback) still under way after this long is stalled (alarm).
    stall_after_s: float = 3 * 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_healthy_percent <= 100:
            raise ValueError("min_healthy_percent must be within 0..100")
        if any(not 0 < c <= 100 for c in self.checkpoints):
            raise ValueError("checkpoints are percentages within 1..100")
        if self.max_failed_hosts < 1 or self.max_start_failures < 1:
            raise ValueError("max_failed_hosts and max_start_failures must be at least 1")


@dataclass(frozen=True)
class RolloutState:
    """A pool's rollout as persisted between scaler runs."""

    target: str  # the launch template version hosts are moved onto
    previous: str  # what the old hosts ran: the version a rollback returns to
    status: Status
    started_at: float
    checkpoint_until: float = 0.0
    passed_checkpoints: tuple[int, ...] = ()
    reason: str = ""
    failed_hosts: tuple[str, ...] = ()
    last_replaced_at: float = 0.0  # when it last terminated hosts for replacement

    @property
    def open(self) -> bool:
        return self.status in ("rolling", "rolling_back")


@dataclass(frozen=True)
class RolloutView:
    pool: str
    now: float
    group_version: str | None  # None: the group has no pinned version (then nothing rolls)
    desired: int
    instances: tuple[Instance, ...]
    hosts: Mapping[str, HostRecord]
    # Instances the scaler terminated this round (retired idle, reaped stuck): their health
    # still counts (a stuck new host is reaped by the scaler first), they are not replaced.
    gone: frozenset[str] = frozenset()
    # False in a round that lowered the group (retired or reaped): desired as read is stale,
    # so the rollout judges health but replaces nothing until the next round.
    may_replace: bool = True


@dataclass(frozen=True)
class Step:
    state: RolloutState | None  # what to persist (None: no rollout, nothing to write)
    event: Event = "none"
    set_version: str | None = None  # the group's version to set (a rollback)
    terminate: tuple[str, ...] = ()  # instances to terminate without lowering desired
    detail: dict[str, object] = field(default_factory=dict)


def _in_group(instances: tuple[Instance, ...]) -> list[Instance]:
    return [i for i in instances if i.lifecycle_state not in LEAVING_LIFECYCLE]


def host_failure(instance: Instance, record: HostRecord | None, now: float,
                 policy: RolloutPolicy) -> str | None:
    """Why a host on the target version counts as failed (None: not failed, perhaps booting).
    Only what the version is to blame for: a daemon that never heartbeat, one whose heartbeat
    stopped while it said it served (a crash), or runner starts that fail on the host itself
    (Docker, the runner: `start_failures` counts no GitHub or image failure) with none
    succeeding. A host drained, stopped, retiring or marked lost (an operator, the scaler, a
    Spot reclaim) is not the version's failure."""
    if record is not None and record.start_failures >= policy.max_start_failures \
            and record.starts == 0:
        return f"{record.start_failures} failed runner starts, none succeeded"
    launched = instance.launched_at if instance.launched_at is not None else now
    if now - launched < policy.health_grace_s:
        return None
    if record is None:
        return f"no heartbeat {policy.health_grace_s:.0f}s after launch"
    if record.state is HostState.SERVING and not host_alive(record, now):
        return f"heartbeat stopped at {record.heartbeat_at:.0f} while serving"
    return None


def healthy(record: HostRecord | None, now: float) -> bool:
    return host_alive(record, now) and record is not None and record.state is HostState.SERVING


def out_of_service_budget(desired: int, policy: RolloutPolicy) -> int:
    """Hosts that may be out of service at once (never less than one: a rollout must move)."""
    keep = math.ceil(desired * policy.min_healthy_percent / 100)
    return max(1, desired - keep)


def step(view: RolloutView, state: RolloutState | None, policy: RolloutPolicy) -> Step:
    now, target_now = view.now, view.group_version
    members = _in_group(view.instances)
    if target_now is None or not target_now.isdigit():
        return Step(state=state, event="none", detail={"why": "group version not pinned"})
    old = [i for i in members if i.launch_version != target_now]

    if state is not None and state.status == "stalled" and state.target == target_now:
        # Stalled stays stalled (and alarmed) until someone sets another version: acting
        # again would flap between two failing versions.
        return Step(state=state, event="none", detail={"why": "stalled"})
    if state is None or not state.open:
        if not old:
            return Step(state=state)  # every host runs the group's version
        versions = sorted({i.launch_version or "?" for i in old})
        state = RolloutState(target=target_now, previous=_most_common(old) or versions[0],
                             status="rolling", started_at=now)
        return _advance(view, state, policy, event="started")
    if target_now != state.target:
        # The group's version changed under the rollout (another deploy, or a person): roll to
        # it, from whatever the remaining old hosts run.
        state = RolloutState(target=target_now, previous=_most_common(old) or state.previous,
                             status="rolling", started_at=now)
        return _advance(view, state, policy, event="started")
    return _advance(view, state, policy)


def _advance(view: RolloutView, state: RolloutState, policy: RolloutPolicy,
             event: Event = "none") -> Step:
    now = view.now
    members = [i for i in _in_group(view.instances) if i.instance_id not in view.gone]
    new = [i for i in members if i.launch_version == state.target]
    old = [i for i in members if i.launch_version != state.target]
    # Capacity the group owes: replacements (or a scale-out) it has not listed yet.
    unlisted = max(0, view.desired - len(members))

    judged = [i for i in view.instances if i.launch_version == state.target
              and (i.instance_id in view.gone or i in new)]
    failed = {i.instance_id: why for i in judged
              if (why := host_failure(i, view.hosts.get(i.instance_id), now, policy))}
    if unlisted and state.last_replaced_at and \
            now - state.last_replaced_at >= policy.health_grace_s:
        failed["(unlaunched)"] = (f"{unlisted} replacement(s) not launched "
                                  f"{policy.health_grace_s:.0f}s after the last replacement")
    if len(failed) >= policy.max_failed_hosts:
        if state.status == "rolling":
            back = RolloutState(target=state.previous, previous=state.target,
                                status="rolling_back", started_at=now,
                                reason=f"version {state.target} failed on "
                                       f"{len(failed)} host(s): "
                                       + "; ".join(f"{h}: {w}" for h, w in sorted(failed.items())),
                                failed_hosts=tuple(sorted(failed)))
            # Only hosts that never served are terminated here: one whose heartbeat stopped
            # may hold a job, and is left to the scaler's reaping (which checks).
            doomed = tuple(sorted(
                h for h in failed if h in {i.instance_id for i in new}
                and ((r := view.hosts.get(h)) is None or r.starts == 0)))
            return Step(state=back, event="rolled_back", set_version=state.previous,
                        terminate=doomed, detail={"failed": failed})
        if state.status == "rolling_back":
            stalled = replace(state, status="stalled",
                              reason=f"rollback to {state.target} failing too: "
                                     + "; ".join(f"{h}: {w}" for h, w in sorted(failed.items())))
            return Step(state=stalled, event="stalled", detail={"failed": failed})

    if not old:
        if all(healthy(view.hosts.get(i.instance_id), now) for i in new):
            return Step(state=replace(state, status="done"), event="completed",
                        detail={"hosts": len(new)})
        return Step(state=state, event=event if event != "none" else "waiting",
                    detail={"booting": len(new)})

    if now - state.started_at >= policy.stall_after_s:
        return Step(state=replace(state, status="stalled",
                                  reason=f"{len(old)} host(s) still on other versions after "
                                         f"{policy.stall_after_s:.0f}s"), event="stalled")

    if now < state.checkpoint_until:
        return Step(state=state, event=event if event != "none" else "checkpoint",
                    detail={"until": state.checkpoint_until})
    total = max(len(members), 1)
    share = 100 * sum(healthy(view.hosts.get(i.instance_id), now) for i in new) / total
    reached = [c for c in policy.checkpoints
               if share >= c and c not in state.passed_checkpoints and c < 100]
    if reached and state.status == "rolling":
        paused = replace(state, checkpoint_until=now + policy.checkpoint_delay_s,
                         passed_checkpoints=tuple(sorted({*state.passed_checkpoints, *reached})))
        return Step(state=paused, event="checkpoint", detail={"share": round(share, 1)})

    # Out of service now: new hosts not yet healthy (booting) and replacements the group has
    # not listed yet. Old hosts already terminated have left `members` (their drain runs
    # under the lifecycle hook, off the group's count).
    booting = sum(not healthy(view.hosts.get(i.instance_id), now) for i in new) + unlisted
    room = out_of_service_budget(max(view.desired, len(members)), policy) - booting
    if room <= 0 or not view.may_replace:
        return Step(state=state, event=event if event != "none" else "waiting",
                    detail={"booting": booting, "may_replace": view.may_replace})
    # Idle hosts first (nothing to drain), then the oldest.
    order = sorted(old, key=lambda i: (_busy(view.hosts.get(i.instance_id)),
                                       i.launched_at or 0.0, i.instance_id))
    chosen = tuple(i.instance_id for i in order[:room])
    return Step(state=replace(state, last_replaced_at=now),
                event=event if event != "none" else "replacing", terminate=chosen,
                detail={"replacing": len(chosen), "old": len(old), "booting": booting})


def _busy(record: HostRecord | None) -> int:
    return record.slots_busy if record is not None else 0


def _most_common(instances: list[Instance]) -> str | None:
    counts: dict[str, int] = {}
    for instance in instances:
        if instance.launch_version:
            counts[instance.launch_version] = counts.get(instance.launch_version, 0) + 1
    return max(sorted(counts), key=counts.__getitem__) if counts else None
