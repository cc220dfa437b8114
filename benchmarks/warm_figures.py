"""The pickup benchmark's figures for warm runners, from ground truth only: the emulator's record
of each job (queued sent, taken, the taking runner's first poll) and of each runner (created,
listening, job taken, deleted). Pure functions; tests/unit/test_pickup_bench.py feeds each the
failures it exists to catch.

- warm hit: the job's runner was listening before the job's `queued` was sent;
- refill: each warm hit, in time order, paired with the earliest unpaired runner of the pool that
  started listening at or after the take (one listening before it was the pool it drew from);
- idle runner-seconds: each runner's time listening without a job (to its job, its removal, its
  disconnect, or the end of the run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from devstack.judge import percentile

# Targets of issue 15 (docs/benchmarks.md).
WARM_P50_MAX_S = 0.3
WARM_P95_MAX_S = 0.8
WARM_HIT_SHARE_MIN = 0.95
REFILL_MARGIN_S = 1.0  # refill p95 <= start-up + this
OVERFLOW_MARGIN_S = 1.0  # burst overflow p95 <= cold p95 + this


def warm_pool_size(rate_per_s: float, startup_s: float) -> int:
    """The most warm runners the `warm` mode may keep: ceil(rate x (start-up + 1 s)) + 1."""
    return math.ceil(rate_per_s * (startup_s + 1.0)) + 1


def round3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def p(values: Sequence[float], q: float) -> float | None:
    return round3(percentile(list(values), q)) if values else None


def pickups(jobs: Iterable[Mapping]) -> list[float]:
    return [job["taken_at"] - job["queued_sent_at"] for job in jobs
            if job.get("taken_at") is not None and job.get("queued_sent_at") is not None]


def warm_hit(job: Mapping) -> bool:
    listening = job.get("runner_listening_at")
    return listening is not None and job.get("queued_sent_at") is not None \
        and listening < job["queued_sent_at"]


def refills(jobs: Iterable[Mapping], runners: Iterable[Mapping]) -> list[float]:
    """Seconds from each warm runner taken to a replacement listening (pairing above)."""
    takes = sorted(job["taken_at"] for job in jobs if warm_hit(job) and job.get("taken_at"))
    listens = sorted(r["listening_at"] for r in runners if r.get("listening_at") is not None)
    found, cursor = [], 0
    for taken in takes:
        while cursor < len(listens) and listens[cursor] < taken:
            cursor += 1  # listening before this take: the pool the take drew from
        if cursor == len(listens):
            break  # never replaced within the run: reported by `unreplaced`
        found.append(listens[cursor] - taken)
        cursor += 1
    return found


def unreplaced(jobs: Iterable[Mapping], runners: Iterable[Mapping]) -> int:
    jobs, runners = list(jobs), list(runners)
    takes = sum(1 for job in jobs if warm_hit(job) and job.get("taken_at"))
    return takes - len(refills(jobs, runners))


def idle_seconds(runners: Iterable[Mapping], end: float) -> float:
    total = 0.0
    for runner in runners:
        start = runner.get("listening_at")
        if start is None:
            continue
        stops = [t for t in (runner.get("taken_at"), runner.get("deleted_at"),
                             runner.get("disconnected_at")) if t is not None]
        total += max(0.0, min(stops, default=end) - start)
    return total


def mode_figures(jobs: Sequence[Mapping], runners: Sequence[Mapping], end: float,
                 cpu_s: float, peak_rss_mb: float) -> dict:
    """One mode's figures (the `cold`, `warm` and `burst` objects of the last line)."""
    waits = pickups(jobs)
    refill = refills(jobs, runners)
    count = len(jobs)
    return {
        "jobs": count,
        "pickup_p50_s": p(waits, 0.5),
        "pickup_p95_s": p(waits, 0.95),
        "warm_hit_share": round(sum(map(warm_hit, jobs)) / count, 3) if count else None,
        "refill_p95_s": p(refill, 0.95),
        "unreplaced": unreplaced(jobs, runners),
        "idle_warm_s_per_job": round(idle_seconds(runners, end) / count, 2) if count else None,
        "cpu_s_per_job": round(cpu_s / count, 3) if count else None,
        "peak_rss_mb": round(peak_rss_mb, 1),
    }


def overflow_p95(jobs: Sequence[Mapping]) -> float | None:
    """Pickup p95 of the burst's jobs no warm runner took."""
    return p(pickups([job for job in jobs if not warm_hit(job)]), 0.95)


def verdict(result: Mapping) -> list[str]:
    """What misses the issue's targets (empty: all met). A missing figure is a miss."""
    misses = []
    startup = result["startup_s"]
    warm, burst, cold = result["warm"], result["burst"], result["cold"]

    def at_most(name: str, value: float | None, limit: float) -> None:
        if value is None or value > limit:
            misses.append(f"{name} {value} > {round(limit, 3)}")

    at_most("warm pickup_p50_s", warm["pickup_p50_s"], WARM_P50_MAX_S)
    at_most("warm pickup_p95_s", warm["pickup_p95_s"], WARM_P95_MAX_S)
    if warm["warm_hit_share"] is None or warm["warm_hit_share"] < WARM_HIT_SHARE_MIN:
        misses.append(f"warm warm_hit_share {warm['warm_hit_share']} < {WARM_HIT_SHARE_MIN}")
    if warm["jobs"] < 100:
        misses.append(f"warm ran {warm['jobs']} jobs, fewer than 100")
    if result["warm_runners"] > result["warm_runners_max"]:
        misses.append(f"warm_runners {result['warm_runners']} above "
                      f"{result['warm_runners_max']}")
    at_most("warm refill_p95_s", warm["refill_p95_s"], startup + REFILL_MARGIN_S)
    cold_p95 = cold["pickup_p95_s"]
    at_most("burst overflow_p95_s", burst.get("overflow_p95_s"),
            (cold_p95 if cold_p95 is not None else -math.inf) + OVERFLOW_MARGIN_S)
    return misses
