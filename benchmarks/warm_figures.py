"""The pickup benchmark's figures for warm runners, from ground truth only: the emulator's record
of each job (queued sent, taken, the taking runner's first poll) and of each runner (created,
listening, job taken, deleted). Pure functions; tests/unit/test_pickup_bench.py feeds each the
failures it exists to catch.

- warm hit: the job's runner was listening before the job's `queued` was sent;
- a replacement: a runner that joined the idle pool (its first job, if any, was queued after it
  began listening: one that took a job already waiting was a cold start, not a replacement);
- refill: each warm hit, in time order, paired with the earliest unpaired replacement that began
  listening at or after the take (one listening before it was the pool the take drew from); a
  take with none by the end (but for the last start-up + 1 s) is `unreplaced`, a miss;
- idle runner-seconds: each runner's time listening without a job, within the measured window;
- the warm pool seen: the most runners idle and listening at once (ground truth, not the
  configured size), held to the bound computed from the measured arrival rate;
- the start-up seen: the median of each runner's JIT config issued -> listening, which must be
  at least the modelled start-up (else the figures would flatter every cold start).
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


def replacements(jobs: Iterable[Mapping], runners: Iterable[Mapping]) -> list[float]:
    """When each runner that joined the idle pool began listening (sorted)."""
    queued_of = {job.get("runner_name"): job.get("queued_sent_at") for job in jobs}
    found = []
    for runner in runners:
        listening = runner.get("listening_at")
        if listening is None:
            continue
        queued = queued_of.get(runner.get("name"))
        if runner.get("taken_at") is not None and queued is not None and queued <= listening:
            continue  # it took a job already waiting: a cold start
        found.append(listening)
    return sorted(found)


def refills(jobs: Iterable[Mapping], runners: Iterable[Mapping]) -> list[float]:
    """Seconds from each warm runner taken to a replacement listening (pairing above)."""
    jobs = list(jobs)
    takes = sorted(job["taken_at"] for job in jobs if warm_hit(job) and job.get("taken_at"))
    listens = replacements(jobs, runners)
    found, cursor = [], 0
    for taken in takes:
        while cursor < len(listens) and listens[cursor] < taken:
            cursor += 1  # listening before this take: the pool the take drew from
        if cursor == len(listens):
            break  # never replaced within the run: reported by `unreplaced`
        found.append(listens[cursor] - taken)
        cursor += 1
    return found


def unreplaced(jobs: Iterable[Mapping], runners: Iterable[Mapping], end: float,
               grace_s: float) -> int:
    """Warm takes never refilled, but for those in the run's last `grace_s`."""
    jobs = list(jobs)
    takes = sorted(job["taken_at"] for job in jobs if warm_hit(job) and job.get("taken_at"))
    refilled = len(refills(jobs, runners))
    return sum(1 for taken in takes[refilled:] if taken < end - grace_s)


def idle_seconds(runners: Iterable[Mapping], end: float, began: float = -math.inf) -> float:
    total = 0.0
    for runner in runners:
        start = runner.get("listening_at")
        if start is None:
            continue
        stops = [t for t in (runner.get("taken_at"), runner.get("deleted_at"),
                             runner.get("disconnected_at")) if t is not None]
        total += max(0.0, min(min(stops, default=end), end) - max(start, began))
    return total


def peak_idle(runners: Iterable[Mapping], began: float, end: float) -> int:
    """The most runners idle and listening at once within [began, end]."""
    edges = []
    for runner in runners:
        start = runner.get("listening_at")
        if start is None:
            continue
        stops = [t for t in (runner.get("taken_at"), runner.get("deleted_at"),
                             runner.get("disconnected_at")) if t is not None]
        stop = min(min(stops, default=end), end)
        start = max(start, began)
        if stop > start:
            edges += [(start, 1), (stop, -1)]
    level = peak = 0
    for _, step in sorted(edges):  # an end before a start at the same instant
        level += step
        peak = max(peak, level)
    return peak


def startup_seen(runners: Iterable[Mapping]) -> float | None:
    """Median of JIT config issued -> listening: the runners' start-up as GitHub saw it."""
    return p([r["listening_at"] - r["created_at"] for r in runners
              if r.get("listening_at") is not None and r.get("created_at") is not None], 0.5)


def arrival_rate(jobs: Sequence[Mapping]) -> float | None:
    """Jobs per second between the first and the last `queued` sent."""
    sent = sorted(job["queued_sent_at"] for job in jobs if job.get("queued_sent_at"))
    if len(sent) < 2 or sent[-1] <= sent[0]:
        return None
    return (len(sent) - 1) / (sent[-1] - sent[0])


def mode_figures(jobs: Sequence[Mapping], runners: Sequence[Mapping], began: float,
                 end: float, startup_s: float, cpu_s: float, peak_rss_mb: float) -> dict:
    """One mode's figures (the `cold`, `warm` and `burst` objects of the last line), over the
    window [began, end]: from the first job sent to the last one completed."""
    waits = pickups(jobs)
    refill = refills(jobs, runners)
    count = len(jobs)
    lags = [job["queued_sent_at"] - job["queued_at"] for job in jobs
            if job.get("queued_sent_at") is not None and job.get("queued_at") is not None]
    return {
        "jobs": count,
        "untaken": sum(1 for job in jobs if job.get("taken_at") is None),
        "pickup_p50_s": p(waits, 0.5),
        "pickup_p95_s": p(waits, 0.95),
        "warm_hit_share": round(sum(map(warm_hit, jobs)) / count, 3) if count else None,
        "refill_p95_s": p(refill, 0.95),
        "unreplaced": unreplaced(jobs, runners, end, startup_s + REFILL_MARGIN_S),
        "warm_pool_seen": peak_idle(runners, began, end),
        "arrival_rate_per_s": round3(arrival_rate(jobs)),
        "startup_s": startup_s,
        "startup_seen_p50_s": startup_seen(runners),
        "send_lag_max_s": round3(max(lags)) if lags else None,
        "idle_warm_s_per_job": (round(idle_seconds(runners, end, began) / count, 2)
                                if count else None),
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

    for name in ("cold", "warm", "burst"):
        mode = result[name]
        if mode.get("untaken"):
            misses.append(f"{name}: {mode['untaken']} job(s) never taken")
        seen = mode.get("startup_seen_p50_s")
        if seen is None or seen < startup:
            misses.append(f"{name}: runners started in {seen}s, less than the modelled "
                          f"{startup}s")
    at_most("warm pickup_p50_s", warm["pickup_p50_s"], WARM_P50_MAX_S)
    at_most("warm pickup_p95_s", warm["pickup_p95_s"], WARM_P95_MAX_S)
    if warm["warm_hit_share"] is None or warm["warm_hit_share"] < WARM_HIT_SHARE_MIN:
        misses.append(f"warm warm_hit_share {warm['warm_hit_share']} < {WARM_HIT_SHARE_MIN}")
    if warm["jobs"] < 100:
        misses.append(f"warm ran {warm['jobs']} jobs, fewer than 100")
    rate = warm.get("arrival_rate_per_s")
    bound = warm_pool_size(rate, startup) if rate is not None else None
    if bound is None or warm.get("warm_pool_seen") is None or warm["warm_pool_seen"] > bound:
        misses.append(f"warm pool seen {warm.get('warm_pool_seen')} above the bound {bound} "
                      f"(measured rate {rate}/s)")
    at_most("warm refill_p95_s", warm["refill_p95_s"], startup + REFILL_MARGIN_S)
    if warm.get("unreplaced"):
        misses.append(f"warm: {warm['unreplaced']} warm runner(s) taken and never replaced")
    cold_p95 = cold["pickup_p95_s"]
    at_most("burst overflow_p95_s", burst.get("overflow_p95_s"),
            (cold_p95 if cold_p95 is not None else -math.inf) + OVERFLOW_MARGIN_S)
    return misses
