"""Dead-lettered demand, decided: send it again, drop it, or keep it. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from chalicelib.jobs import OPEN_STATES, WAITING_FOR_RUNNER, JobRecord
from chalicelib.reconciler.stuck import lease_live


class DeadAct(StrEnum):
    REDRIVE = "redrive"  # re-demand the job now: its demand goes back to the pool's queue
    DROP = "drop"  # delete the message: the demand is met or superseded
    KEEP = "keep"  # leave it in the DLQ (an operator's, or a later run's)


@dataclass(frozen=True)
class DeadLetterAction:
    act: DeadAct
    reason: str
    generation: int = 0  # the generation a re-demand is conditioned on


def settle_dead_letter(
    message: Mapping[str, Any] | None, job: JobRecord | None, now: float
) -> DeadLetterAction | None:
    """What to do with a dead-lettered demand message without asking GitHub, or None: GitHub
    must say whether the job is still queued. `message` is the demand (job_id, generation)."""
    if message is None:
        return DeadLetterAction(DeadAct.KEEP, "malformed")
    if job is None:
        return DeadLetterAction(DeadAct.KEEP, "no_record")
    state = job.state
    if state not in OPEN_STATES:
        return DeadLetterAction(DeadAct.DROP, "job_closed")
    if job.demand_generation != int(message["generation"]):
        return DeadLetterAction(DeadAct.DROP, "superseded")
    if state not in WAITING_FOR_RUNNER:
        return DeadLetterAction(DeadAct.DROP, f"job_{state.value}")
    if lease_live(job, now):
        return DeadLetterAction(DeadAct.KEEP, "lease_live")
    return None


def classify_dead_letter(
    message: Mapping[str, Any] | None,
    job: JobRecord | None,
    github_job: Mapping[str, Any] | None,
    now: float,
) -> DeadLetterAction:
    """A dead-lettered demand of a job GitHub still has queued, whose generation is the job's
    current one and that no live executor holds, is re-demanded at once (the stuck-job check
    would only find it after `dispatched_stuck_after_s`). GitHub's `in_progress`/`completed`
    drops it; an error or another status keeps it (fail open)."""
    settled = settle_dead_letter(message, job, now)
    if settled is not None:
        return settled
    assert job is not None  # settled when there is no record
    return from_github(job, github_job)


def from_github(job: JobRecord, github_job: Mapping[str, Any] | None) -> DeadLetterAction:
    """The decision `settle_dead_letter` left to GitHub's view of the job."""
    if github_job is None:
        return DeadLetterAction(DeadAct.KEEP, "github_unavailable")
    status = github_job.get("status")
    if status == "queued":
        return DeadLetterAction(DeadAct.REDRIVE, "still_queued",
                                generation=job.demand_generation)
    if status in ("in_progress", "completed"):
        return DeadLetterAction(DeadAct.DROP, f"github_{status}")
    return DeadLetterAction(DeadAct.KEEP, f"github_{status or 'unknown'}")

