"""Stuck jobs, decided: which jobs look unserved, and what GitHub's view of one makes of it.
Pure: the reconciler asks GitHub and acts (`reconciler.service`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from chalicelib.jobs import CLAIM_STATES, WAITING_FOR_RUNNER, JobRecord, JobState
from chalicelib.reconciler.policy import DEFAULT_POLICY, Policy

# Looked for in this order (the state machine's), each through the jobs' by_state index.
STUCK_STATES = tuple(state for state in JobState if state in WAITING_FOR_RUNNER)


class Act(StrEnum):
    LEAVE = "leave"
    REDEMAND = "redemand"
    START_JOB = "start_job"
    COMPLETE = "complete"


@dataclass(frozen=True)
class StuckAction:
    act: Act
    job_id: int
    reason: str
    generation: int = 0  # the demand generation a re-demand is conditioned on
    fields: Mapping[str, Any] = field(default_factory=dict)


def lease_live(job: JobRecord, now: float) -> bool:
    """An executor still answers for this job: its claim's lease has not expired."""
    lease = job.lease_until
    return job.state in CLAIM_STATES and lease is not None and lease > now


def unserved_reason(job: JobRecord, now: float, policy: Policy = DEFAULT_POLICY) -> str | None:
    """Why a job looks unserved (then GitHub is asked about it), or None: leave it alone."""
    state = job.state
    if state not in WAITING_FOR_RUNNER:
        return None
    if lease_live(job, now):
        return None
    if now - job.updated_at < policy.stuck_after(state):
        return None
    if state in CLAIM_STATES:
        return "lease_expired"
    return f"stale_{state.value}"


def classify_stuck(
    job: JobRecord,
    github_job: Mapping[str, Any] | None,
    now: float,
    policy: Policy = DEFAULT_POLICY,
) -> StuckAction:
    """What to do with a job that may be stuck, given GitHub's view of it (None: GitHub could
    not be asked). GitHub's answer only ever moves a job forward or re-demands it: an error or
    an unknown status leaves it as it is, so a GitHub outage never closes a job."""
    job_id = job.job_id
    reason = unserved_reason(job, now, policy)
    if reason is None:
        why = "lease_live" if lease_live(job, now) else "not_stuck"
        return StuckAction(Act.LEAVE, job_id, why)
    if github_job is None:
        return StuckAction(Act.LEAVE, job_id, "github_unavailable")
    status = github_job.get("status")
    if status == "queued":
        return StuckAction(
            Act.REDEMAND, job_id, reason, generation=job.demand_generation
        )
    runner = {
        "runner_name": github_job.get("runner_name"),
        "runner_id": github_job.get("runner_id"),
    }
    if status == "in_progress":
        return StuckAction(
            Act.START_JOB, job_id, "github_in_progress",
            fields={**runner, "started_at": github_job.get("started_at")},
        )
    if status == "completed":
        return StuckAction(
            Act.COMPLETE, job_id, "github_completed",
            fields={
                **runner,
                "conclusion": github_job.get("conclusion") or "unknown",
                "github_completed_at": github_job.get("completed_at"),
            },
        )
    # waiting (an environment approval), pending, requested, or something new: not ours to move.
    return StuckAction(Act.LEAVE, job_id, f"github_{status or 'unknown'}")

