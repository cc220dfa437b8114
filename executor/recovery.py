"""What an executor does about claims, runners and containers another daemon left: pure
decisions returning frozen dataclasses; the daemon carries them out.

- `on_claim_refused`: a demand message whose job another claim holds. A live host's live claim
  is a duplicate (deleted); a claim whose lease expired while its host's heartbeat stopped is
  taken over (one conditional write, `jobs.TAKEOVER`); anything in between is looked at again
  once it could be decided.
- `plan_dead_host`: a host whose heartbeat stopped: which of its claims to take over now, which
  to wait for (lease still live), which of its runners to deregister, and whether nothing is
  left (the host can be marked `lost`).
- `orphan_claims`: this host's own claims that no runner or message of this daemon serves (a
  previous daemon on this host held them).
- `adopt_or_discard`: a container of this host found at start-up.
- `give_back_step`: the demand of a runner of this host that left before GitHub gave it a job,
  given back (re-demanded) only once GitHub says the job is still queued, and tried again
  until that is settled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chalicelib.hosts import HostRecord, dead_at, host_alive
from chalicelib.jobs import JobRecord, JobState
from chalicelib.runners import RunnerRecord, RunnerState
from executor.messages import drop_reason

# Look at a message again at least this long later (each look is a receive; the queue's redrive
# policy dead-letters a message after a few).
MIN_RETRY_S = 2.0
MAX_RETRY_S = 900.0


@dataclass(frozen=True)
class Drop:
    """Delete the message: nothing to do for it."""

    reason: str


@dataclass(frozen=True)
class TakeOver:
    """Take the claim of `from_host` (dead, lease expired) and start a runner for it."""

    from_host: str


@dataclass(frozen=True)
class Retry:
    """Not decidable yet (a lease still live, or a heartbeat not yet stale): look again later."""

    after_s: float
    reason: str


ClaimVerdict = Drop | TakeOver | Retry


def lease_expired(job: JobRecord, now: float) -> bool:
    return job.lease_until is None or job.lease_until < now


def on_claim_refused(
    job: JobRecord | None,
    generation: int,
    me: str,
    claimant: HostRecord | None,
    known_locally: bool,
    now: float,
) -> ClaimVerdict:
    """Decide about a demand message whose claim was refused. `claimant` is the heartbeat record
    of the host holding the claim; `known_locally` says whether this daemon serves the job."""
    reason = drop_reason(job, generation)
    if reason != "claimed_already":
        return Drop(reason)
    assert job is not None
    holder = job.host_id or ""
    expired = lease_expired(job, now)
    lease_left = (job.lease_until or 0.0) - now
    if holder == me:
        # This host's claim: live if this daemon serves it; else a previous daemon here held it.
        if known_locally:
            return Drop("claimed_already")
        if expired:
            return TakeOver(holder)
        return Retry(_clamp(lease_left), "own_previous_claim")
    alive = host_alive(claimant, now)
    if alive and not expired:
        return Drop("claimed_already")
    if expired and not alive:
        return TakeOver(holder)
    if not expired:
        return Retry(_clamp(lease_left), "lease_live")
    # Lease expired but its host still beats: never taken from a live host. Look again once it
    # would count as dead.
    return Retry(_clamp((dead_at(claimant) if claimant else 0.0) - now), "host_alive")


def _clamp(seconds: float) -> float:
    return min(MAX_RETRY_S, max(MIN_RETRY_S, seconds + 1.0))


@dataclass(frozen=True)
class DeadHostPlan:
    host_id: str
    take_over: tuple[JobRecord, ...]  # expired claims in this executor's pools
    waiting: int  # claims whose lease is still live, or in pools this executor does not serve
    deregister: tuple[RunnerRecord, ...]  # runner records not yet gone
    nothing_left: bool  # no claim and no runner left: mark the host lost


def plan_dead_host(
    host: HostRecord,
    claims: Iterable[JobRecord],
    runners: Iterable[RunnerRecord],
    my_pools: frozenset[str],
    now: float,
) -> DeadHostPlan:
    """What to recover from a host whose heartbeat stopped (the caller checked it is dead)."""
    take, waiting = [], 0
    for job in claims:
        if job.pool in my_pools and lease_expired(job, now):
            take.append(job)
        else:
            waiting += 1
    left = [r for r in runners if r.state is not RunnerState.GONE]
    return DeadHostPlan(
        host_id=host.host_id,
        take_over=tuple(take),
        waiting=waiting,
        deregister=tuple(left),
        nothing_left=not take and not waiting and not left,
    )


def orphan_claims(
    claims: Iterable[JobRecord],
    served_jobs: frozenset[int],
    local_runners: frozenset[str],
    now: float,
    *,
    at_start: bool,
) -> list[JobRecord]:
    """This host's claims that this daemon does not serve: held by a previous daemon here. At
    start-up every claim not served by an adopted runner is one; later only those whose lease
    expired (a claim just made by a serving thread has a fresh lease)."""
    found = []
    for job in claims:
        if job.job_id in served_jobs or job.started_runner in local_runners:
            continue
        if at_start or lease_expired(job, now):
            found.append(job)
    return found


@dataclass(frozen=True)
class Adopt:
    busy: bool


@dataclass(frozen=True)
class Discard:
    reason: str


UNKNOWN = object()  # GitHub could not be asked


def adopt_or_discard(
    record: RunnerRecord | None,
    github_runner: Mapping[str, Any] | object | None,
    container_age_s: float,
    grace_s: float,
    pool_served: bool,
) -> Adopt | Discard:
    """A running container of this host that a previous daemon started. Adopt it when its runner
    is still registered and healthy (busy, online, or offline but younger than `grace_s`: it may
    still be registering); else discard it (stop it, deregister its runner). A runner GitHub
    says is busy is never discarded: stopping it would cancel a job."""
    if isinstance(github_runner, Mapping) and github_runner.get("busy"):
        return Adopt(busy=True)
    if not pool_served:
        return Discard("pool_not_served")
    if not record:
        return Discard("no_record")
    if record.state is RunnerState.GONE:
        return Discard("record_gone")
    if github_runner is UNKNOWN:
        # GitHub can't be asked now: keep it; the monitor reaps it if it stays idle.
        return Adopt(busy=record.state is RunnerState.BUSY)
    if github_runner is None:
        return Discard("not_registered")
    assert isinstance(github_runner, Mapping)
    if github_runner.get("status") == "online" or container_age_s < grace_s:
        return Adopt(busy=record.state is RunnerState.BUSY)
    return Discard("offline")


@dataclass(frozen=True)
class GiveBack:
    """The demand of a runner that exited before GitHub gave it a job. Kept (and tried again
    with backoff) until GitHub could be asked and the re-demand, if any, was recorded and sent."""

    job_id: int
    generation: int  # the demand generation the runner served
    runner: str
    pool: str
    reason: str
    failures: int = 0
    due_at: float = 0.0


def give_back_step(job: JobRecord | None, item: GiveBack) -> str:
    """What a give-back needs next, from the job record now: `ask_github` while the job still
    waits on the runner that left (GitHub decides whether to re-demand), `resend` when its
    re-demand was recorded but its message not sent (the next generation, still `received`,
    with this give-back's reason), `done` when the job moved on otherwise."""
    if job is None:
        return "done"
    generation = job.demand_generation
    if (job.state is JobState.RUNNER_STARTED and generation == item.generation
            and job.started_runner == item.runner):
        return "ask_github"
    if (job.state is JobState.RECEIVED and generation == item.generation + 1
            and job.redemand_reason == item.reason):
        return "resend"
    return "done"
