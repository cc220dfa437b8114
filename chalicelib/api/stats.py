"""Analytics from job and runner records (pure): each stage's time per job, percentiles, the
bottleneck, idle warm runner-seconds, cross-pool runs.

Stages, from the job record's stamps (chalicelib/jobs.py) and its runner's record:
  webhook          GitHub's `created_at` -> `received_at` (delivery + the webhook Lambda)
  enqueue          `received_at` -> `dispatched_at` (SQS accepted the demand)
  claim            `dispatched_at` -> `claimed_at` (an executor took the demand)
  jit              the runner record's `jit_s` (the JIT config from GitHub)
  container_start  the runner record's `container_start_s`
  runner_boot      `runner_started_at` -> `in_progress_at`: the runner's boot and registration
                   plus GitHub's assignment (the runner's own "Listening for Jobs" moment is
                   not recorded, so the two cannot be told apart)
  job              `in_progress_at` -> `completed_at`
A job served by a warm runner has no claim, JIT or container stage: it is not in those samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

STAGES = ("webhook", "enqueue", "claim", "jit", "container_start", "runner_boot", "job")
# The bottleneck is of the wait before a job runs: the job's own run time is not a stage of it.
WAIT_STAGES = STAGES[:-1]
STAGE_NOTES = {
    "runner_boot": "runner_started -> in_progress: boot, registration and GitHub's assignment",
}
STAMPS = ("waiting_at", "received_at", "redemanded_at", "dispatched_at", "claimed_at",
          "runner_started_at", "in_progress_at", "completed_at")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def epoch(value: Any) -> float | None:
    """Epoch seconds of a stamp (a number) or of GitHub's ISO 8601 time; None if neither."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _between(job: Mapping[str, Any], start: str, end: str) -> float | None:
    a, b = epoch(job.get(start)), epoch(job.get(end))
    if a is None or b is None:
        return None
    return round(b - a, 3)


def job_stages(job: Mapping[str, Any], runner: Mapping[str, Any] | None
               ) -> dict[str, float | None]:
    """Each stage's seconds for one job (None where a stamp is missing)."""
    served = runner if runner and runner.get("job_id") == job.get("job_id") else None
    return {
        "webhook": _between(job, "created_at", "received_at"),
        "enqueue": _between(job, "received_at", "dispatched_at"),
        "claim": _between(job, "dispatched_at", "claimed_at"),
        "jit": _number(served.get("jit_s")) if served and job.get("claimed_at") else None,
        "container_start": (_number(served.get("container_start_s"))
                            if served and job.get("claimed_at") else None),
        "runner_boot": _between(job, "runner_started_at", "in_progress_at"),
        "job": _between(job, "in_progress_at", "completed_at"),
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def why_missing(stage: str) -> str:
    return {
        "jit": "only for jobs whose own runner was started for them (not warm runners)",
        "container_start": "only for jobs whose own runner was started for them",
        "job": "no job in the window completed",
    }.get(stage, "no job in the window has both stamps of this stage")


def pickup_s(job: Mapping[str, Any]) -> float | None:
    """GitHub's created_at -> the job started (GitHub's started_at, else our in_progress)."""
    created = epoch(job.get("created_at"))
    started = epoch(job.get("started_at")) or epoch(job.get("in_progress_at"))
    if created is None or started is None:
        return None
    return round(started - created, 3)


@dataclass(frozen=True)
class StageFigure:
    stage: str
    p50: float | None
    p95: float | None
    samples: int


def stage_figures(per_job: Iterable[Mapping[str, float | None]]) -> list[StageFigure]:
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for stages in per_job:
        for stage in STAGES:
            value = stages.get(stage)
            if value is not None and value >= 0:
                samples[stage].append(value)
    return [StageFigure(stage, percentile(values, 50), percentile(values, 95), len(values))
            for stage, values in samples.items()]


def bottleneck(figures: Iterable[StageFigure]) -> str | None:
    """The wait stage with the largest p95 (None when no stage has a figure)."""
    candidates = [f for f in figures if f.stage in WAIT_STAGES and f.p95 is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda f: (f.p95, -WAIT_STAGES.index(f.stage))).stage


def timeline(job: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The job's stamps, in time order."""
    found = [(stamp, float(job[stamp])) for stamp in STAMPS
             if isinstance(job.get(stamp), int | float)]
    return sorted(found, key=lambda item: item[1])


def idle_warm_seconds(runners: Iterable[Mapping[str, Any]], pool: str, since: float,
                      now: float) -> float:
    """Seconds warm runners of `pool` sat idle within [since, now]: from `warm_at` until the
    runner took a job, lost its warm seat, or ended (or now)."""
    total = 0.0
    for runner in runners:
        if runner.get("pool") != pool or not isinstance(runner.get("warm_at"), int | float):
            continue
        ends = [runner.get(s) for s in ("warm_taken_at", "unwarmed_at", "gone_at", "busy_at")]
        end = min((float(e) for e in ends if isinstance(e, int | float)), default=now)
        start = max(float(runner["warm_at"]), since)
        total += max(0.0, min(end, now) - start)
    return round(total, 3)


def cross_pool(jobs: Iterable[Mapping[str, Any]], runners: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, int]:
    """Jobs run by a runner of another pool: runner pool -> count."""
    counts: Counter[str] = Counter()
    for job in jobs:
        runner = runners.get(str(job.get("runner_name") or ""))
        if runner and runner.get("pool") and job.get("pool") and runner["pool"] != job["pool"]:
            counts[str(runner["pool"])] += 1
    return dict(counts)
