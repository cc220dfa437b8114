"""Replay a trace under every policy: `make replay TRACE=file.csv [POOLS=pools.toml]`, or
`python -m forecast.replay TRACE [--pools FILE] [--seed N] [--workers N]`.

Trains on all but the last week, judges the last week (the 7 days up to the UTC midnight after
the last job). The forecaster is fitted once on the training weeks and forecasts each day of the
judged week 24 h ahead from the buckets before that day (as the daily trainer would). The
simulation starts `WARMUP_S` before the judged week with the jobs of that time, so the judged
week starts with a fleet in its normal state; only judged jobs' waits and the judged week's
instance-hours count.

The baseline (docs/scaling.md): of the reactive grid, the point with the lowest p95 wait among
those using no more instance-hours than the predictive policy (ties: the cheaper), or the
cheapest point if none is. The static schedule's point is chosen the same way. Prints a table,
then the result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from chalicelib.pools import PoolConfig, load_pools, route
from forecast.model import Forecaster, hourly_forecast, seasonal_naive
from forecast.policies import (
    DEFAULT_REACTIVE,
    Plan,
    Planned,
    Reactive,
    cost_cap_hosts,
    forecast_plan,
    knob_grid,
    knob_name,
    reactive_grid,
    spread_kernel,
    static_plan,
)
from forecast.simulate import SimConfig, SimResult, simulate
from forecast.traces import (
    BUCKET_S,
    HORIZON,
    SIM_POOLS,
    SIM_REPOSITORY,
    Series,
    TraceJob,
    buckets,
    read_trace,
    sim_owner,
)

DAY_S = 86400
WEEK_S = 7 * DAY_S
WARMUP_S = 6 * 3600.0
QUANTILE = 0.9
# A pool's forecast is used only where it beat a flat forecast (the training mean) by this much
# on the last training week, in hourly runner-seconds (`skill`): on an aperiodic history the
# predictive policy is the scaler alone, so it never costs more than reacting.
SKILL_MIN = 0.2
PERIODIC_P95_RATIO = 0.6  # targets (issue 16): predictive p95 over its baseline's, periodic
PERIODIC_MASE = 1.0
APERIODIC_RATIO = 1.05  # aperiodic: p95 and instance-hours over the default reactive's


@dataclass(frozen=True)
class PredictiveSettings:
    """The predictive policy's knobs (docs/scaling.md)."""

    quantile: float = QUANTILE
    headroom: float = 1.0  # floor hosts for the upper quantile's busy slots times this
    warm_share: float = 1.0  # warm runners on this share of the floor's slots above the mean
    cost_cap_per_hour: float | None = None  # per pool, in host-hours per hour at price 1
    host_price_per_hour: float = 1.0


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def judged_window(jobs: Sequence[TraceJob]) -> tuple[float, float, float]:
    """(history start, judged start, judged end): whole UTC days; at least a week to train on."""
    if not jobs:
        raise ValueError("the trace has no job")
    first = math.floor(jobs[0].at / DAY_S) * DAY_S
    end = math.floor(jobs[-1].at / DAY_S) * DAY_S + DAY_S
    judged = end - WEEK_S
    if judged - first < WEEK_S:
        raise ValueError(f"the trace spans {(end - first) / DAY_S:g} days ({_iso(first)} to "
                         f"{_iso(end)}); replay needs at least 14: a week to train on (the "
                         "seasonal-naive forecast needs the week before) and the last to judge")
    return first, judged, end


def pool_durations(jobs: Sequence[TraceJob], pools: PoolConfig, until: float
                   ) -> dict[str, list[float]]:
    """Durations of the jobs before `until`, per pool they route to."""
    owner, routes = sim_owner(pools), {}
    found: dict[str, list[float]] = {name: [] for name in pools.names}
    for job in jobs:
        if job.at >= until:
            break
        if job.labels not in routes:
            decision = route(pools, job.labels, owner=owner, repository=SIM_REPOSITORY,
                             private=True)
            routes[job.labels] = decision.pool.name if decision.pool else None
        if routes[job.labels]:
            found[routes[job.labels]].append(job.duration_s)
    return found


@dataclass
class PoolForecasts:
    """One pool's daily forecasts from `start` (a day before the judged week) to its end."""

    start: float
    upper: list[float]
    mean: list[float]
    hourly: list[float]
    naive: list[float]
    actual: list[float]
    history: list[float]  # the day of actual buckets before `start`
    skill: float = 0.0  # on the last training week (`forecast_skill`)


def forecast_skill(series: Series, judged: float, quantile: float) -> float:
    """1 - the forecaster's absolute error / a flat forecast's (the mean of its training), on
    hourly runner-seconds of the last training week, forecast a day at a time as in the judged
    week by a model fitted on the weeks before it. About 0 where the history has no pattern."""
    validation = judged - WEEK_S
    train = series.window(series.start, validation)
    if len(train) < DAY_S // BUCKET_S:
        return 0.0
    model = Forecaster(quantile).fit(train)
    actual, forecast = [], []
    for origin in np.arange(validation, judged, DAY_S):
        history = series.window(series.start, float(origin))
        forecast += model.with_history(history).predict(float(origin), HORIZON).mean
        first = series.index(float(origin))
        actual += series.runner_s[first:first + HORIZON]
    hourly = 3600 // BUCKET_S
    a = np.asarray(actual).reshape(-1, hourly).sum(axis=1)
    f = np.asarray(forecast).reshape(-1, hourly).sum(axis=1)
    flat = float(np.mean(train.runner_s)) * hourly
    scale = float(np.abs(a - flat).sum())
    return 0.0 if scale == 0 else 1.0 - float(np.abs(a - f).sum()) / scale


def forecast_pool(series: Series, judged: float, end: float, quantile: float) -> PoolForecasts:
    plan_start = judged - DAY_S
    model = Forecaster(quantile).fit(series.window(series.start, judged))
    out = PoolForecasts(plan_start, [], [], [], [], [], [])
    out.skill = forecast_skill(series, judged, quantile)
    for origin in np.arange(plan_start, end, DAY_S):
        history = series.window(series.start, float(origin))
        forecast = model.with_history(history).predict(float(origin), HORIZON)
        out.upper += forecast.upper
        out.mean += forecast.mean
        out.hourly += hourly_forecast(history, float(origin), HORIZON).mean
        out.naive += seasonal_naive(history, float(origin), HORIZON)
    first = series.index(plan_start)
    out.actual = series.runner_s[first:series.index(end)]
    out.history = series.runner_s[max(0, first - HORIZON):first]
    return out


def mase_of(forecasts: dict[str, PoolForecasts], field_name: str, skip: int) -> float | None:
    """Pooled MASE over the pools' judged buckets (from bucket `skip` of each forecast)."""
    error = scale = 0.0
    for pool in forecasts.values():
        actual = np.asarray(pool.actual[skip:])
        error += float(np.abs(actual - np.asarray(getattr(pool, field_name)[skip:])).sum())
        scale += float(np.abs(actual - np.asarray(pool.naive[skip:])).sum())
    if scale == 0:
        return 0.0 if error == 0 else None
    return error / scale


# --- running many simulations ---

_SHARED: dict[str, Any] = {}


def _init(jobs: Sequence[TraceJob], pools: PoolConfig, config: SimConfig, seed: int) -> None:
    _SHARED.update(jobs=jobs, pools=pools, config=config, seed=seed)


def _simulate_one(policy: Reactive) -> SimResult:
    return simulate(_SHARED["jobs"], _SHARED["pools"], policy, _SHARED["config"],
                    _SHARED["seed"])


def run_policies(jobs: Sequence[TraceJob], pools: PoolConfig, policies: Sequence[Reactive],
                 config: SimConfig, seed: int, workers: int = 1) -> list[SimResult]:
    """Each policy's simulation (in `workers` processes; the same results either way)."""
    if workers <= 1 or len(policies) < 2:
        _init(jobs, pools, config, seed)
        return [_simulate_one(policy) for policy in policies]
    with ProcessPoolExecutor(workers, initializer=_init,
                             initargs=(jobs, pools, config, seed)) as pool:
        return list(pool.map(_simulate_one, policies, chunksize=4))


def pick(results: dict[str, SimResult], names: Sequence[str], budget: float) -> str:
    """Of `names`, the lowest p95 wait within `budget` instance-hours (ties: the cheaper), or
    the cheapest if none is within it."""
    within = [n for n in names if results[n].instance_hours <= budget + 1e-9]
    if within:
        return min(within, key=lambda n: (results[n].percentile(95),
                                          results[n].instance_hours, n))
    return min(names, key=lambda n: (results[n].instance_hours, results[n].percentile(95), n))


def _ratio(a: float, b: float) -> float | None:
    if b == 0:
        return 1.0 if a == 0 else None
    return round(a / b, 3)


def replay_jobs(jobs: Sequence[TraceJob], pools: PoolConfig, *, name: str = "trace",
                seed: int = 0, config: SimConfig | None = None,
                predictive: PredictiveSettings | None = None, workers: int = 1,
                grid: Sequence[tuple[int, float, float]] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every policy on `jobs`' judged week; the figures as a dict (module docstring)."""
    jobs = sorted(jobs, key=lambda job: job.at)
    settings = predictive or PredictiveSettings()
    first, judged, end = judged_window(jobs)
    base = config or SimConfig()
    config = replace(base, measure_from=judged, measure_to=end)
    lead = config.boot_s + config.boot_jitter_s
    series = buckets(jobs, pools, start=first, end=end)
    durations = pool_durations(jobs, pools, judged)
    say = log or (lambda _text: None)

    forecasts: dict[str, PoolForecasts] = {}
    predictive_plans: dict[str, Plan] = {}
    floor_only_plans: dict[str, Plan] = {}  # the ablation: the same floor, no warm runners
    hourly_plans: dict[str, Plan] = {}
    static_plans: dict[str, Plan] = {}
    for pool in pools.pools:
        if not any(series[pool.name].runner_s):
            continue  # a pool the trace never uses: nothing to forecast
        slots = config.slots_for(pool.name)
        kernel = spread_kernel(durations[pool.name])
        cap = min(config.max_hosts.get(pool.name, math.inf),
                  math.ceil(pool.max_runners / slots))
        capped = cost_cap_hosts(settings.cost_cap_per_hour, settings.host_price_per_hour)
        most = int(cap if capped is None else min(cap, capped))
        say(f"{name}: forecasting {pool.name}")
        f = forecasts[pool.name] = forecast_pool(series[pool.name], judged, end,
                                                 settings.quantile)
        if f.skill >= SKILL_MIN:
            predictive_plans[pool.name] = forecast_plan(
                f.start, f.upper, f.mean, kernel, slots, lead, history=f.history,
                headroom=settings.headroom, max_hosts=most, warm_share=settings.warm_share)
            floor = predictive_plans[pool.name]
            floor_only_plans[pool.name] = replace(floor, warm=(0,) * len(floor.warm))
        hourly_plans[pool.name] = forecast_plan(
            f.start, f.hourly, f.hourly, kernel, slots, lead, history=f.history,
            max_hosts=most, warm_share=settings.warm_share)
        training = series[pool.name].window(first, judged)
        static_plans[pool.name] = static_plan(training.start, training.runner_s, kernel, slots)

    knobs = list(grid) if grid is not None else knob_grid()
    reactive = ([Reactive(knob_name("reactive", *k), *k) for k in knobs] if grid is not None
                else reactive_grid())
    static = [Planned(knob_name("static", *k), *k, plans=static_plans) for k in knobs]
    others = [Planned("hourly", plans=hourly_plans),
              Planned("predictive", plans=predictive_plans),
              Planned("predictive-floor-only", plans=floor_only_plans)]
    policies = [*others, *reactive, *static]
    if DEFAULT_REACTIVE.name not in {p.name for p in policies}:
        policies.append(DEFAULT_REACTIVE)
    sim_jobs = [job for job in jobs if job.at >= judged - WARMUP_S]
    say(f"{name}: simulating {len(policies)} policies on {len(sim_jobs)} jobs")
    results = dict(zip((p.name for p in policies),
                       run_policies(sim_jobs, pools, policies, config, seed, workers),
                       strict=True))
    best = results["predictive"]
    budget = best.instance_hours
    baseline = pick(results, [p.name for p in reactive], budget)
    static_pick = pick(results, [p.name for p in static], budget)
    default = results[DEFAULT_REACTIVE.name]
    skip = DAY_S // BUCKET_S  # the forecasts' first day is the warm-up's, not judged
    mase = mase_of(forecasts, "mean", skip) if forecasts else None
    shown = {"predictive": "predictive", "predictive-floor-only": "predictive-floor-only",
             "hourly": "hourly", "baseline": baseline, "static": static_pick,
             "reactive-default": DEFAULT_REACTIVE.name}
    return {
        "trace": name,
        "jobs": len(jobs),
        "judged_from": _iso(judged), "judged_to": _iso(end),
        "judged_jobs": len(best.waits),
        "unrouted": best.unrouted,
        "mase": None if mase is None else round(mase, 3),
        "mase_hourly": (None if not forecasts or mase_of(forecasts, "hourly", skip) is None
                        else round(mase_of(forecasts, "hourly", skip), 3)),
        "mase_by_pool": {pool: (None if (m := mase_of({pool: f}, "mean", skip)) is None
                                else round(m, 3)) for pool, f in forecasts.items()},
        "skill_by_pool": {pool: round(f.skill, 3) for pool, f in forecasts.items()},
        "forecast_used": sorted(predictive_plans),
        "baseline": baseline,
        "static": static_pick,
        "p95_wait_ratio": _ratio(best.percentile(95), results[baseline].percentile(95)),
        "instance_hours_ratio": _ratio(best.instance_hours, results[baseline].instance_hours),
        "default": {
            "p95_wait_ratio": _ratio(best.percentile(95), default.percentile(95)),
            "instance_hours_ratio": _ratio(best.instance_hours, default.instance_hours),
        },
        "policies": {label: {"policy": policy, **results[policy].summary()}
                     for label, policy in shown.items()},
        "reactive_grid": [{"policy": p.name,
                           "p95_wait_s": round(results[p.name].percentile(95), 2),
                           "instance_hours": round(results[p.name].instance_hours, 2)}
                          for p in reactive],
    }


def periodic_pass(result: dict[str, Any]) -> bool:
    ratio, mase = result["p95_wait_ratio"], result["mase"]
    return (ratio is not None and ratio <= PERIODIC_P95_RATIO
            and mase is not None and mase < PERIODIC_MASE)


def aperiodic_pass(result: dict[str, Any]) -> bool:
    ratios = result["default"]
    return all(r is not None and r <= APERIODIC_RATIO
               for r in (ratios["p95_wait_ratio"], ratios["instance_hours_ratio"]))


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['trace']}: judged {result['judged_from']} - {result['judged_to']}, "
             f"{result['judged_jobs']} jobs, MASE {result['mase']} (hourly "
             f"{result['mase_hourly']})",
             f"  {'policy':<22} {'p50 s':>7} {'p95 s':>7} {'max s':>9} {'inst-h':>8} "
             f"{'util':>6}  point"]
    for label, row in result["policies"].items():
        lines.append(f"  {label:<22} {row['p50_wait_s']:>7.1f} {row['p95_wait_s']:>7.1f} "
                     f"{row['max_wait_s']:>9.1f} {row['instance_hours']:>8.1f} "
                     f"{row['utilisation']:>6.3f}  {row['policy']}")
    return "\n".join(lines)


def replay(trace_path: str | Path, pools_path: str | Path | None = None, *, seed: int = 0,
           workers: int = 1, config: SimConfig | None = None,
           predictive: PredictiveSettings | None = None) -> dict[str, Any]:
    """Replay the trace file under every policy (module docstring); the figures as a dict."""
    pools = load_pools(pools_path or SIM_POOLS)
    jobs = read_trace(trace_path)
    return replay_jobs(jobs, pools, name=Path(trace_path).stem, seed=seed, config=config,
                       predictive=predictive, workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forecast.replay", description=__doc__)
    parser.add_argument("trace", type=Path, help="a CSV trace: timestamp,labels,duration_s")
    parser.add_argument("--pools", type=Path, default=SIM_POOLS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        result = replay(args.trace, args.pools, seed=args.seed, workers=args.workers)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(table(result))
    print(json.dumps({key: value for key, value in result.items() if key != "reactive_grid"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
