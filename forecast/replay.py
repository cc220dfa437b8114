"""Replay a trace under every policy: `make replay TRACE=file.csv [POOLS=pools.toml]
[POOL_SLOTS=gpu=1,linux-large=8] [BOOT_S=60]`, or `python -m forecast.replay TRACE [--pools FILE]
[--pool-slots POOL=SLOTS,...] [--boot-s S] [--aperiodic] [--seed N] [--workers N]`.

Trains on all but the last week, judges the last week (the 7 days up to the UTC midnight after
the last job). The predictive plan of each day is the daily trainer's (forecast/trainer.py
`floor_of`) at that day's midnight, from the history the trainer would read then
(`JobHistory`: a job's runner-seconds count once it completed, in its arrival's bucket), used
for that day; the forecaster is fitted (and skill-gated) once, at the judged week's first
midnight. The simulation starts `WARMUP_S` before the judged week with the jobs of that time,
so the judged week starts with a fleet in its normal state; only judged jobs' waits and the
judged week's instance-hours count.

The baseline (docs/scaling.md): of the reactive grid, the point with the lowest p95 wait among
those using no more instance-hours than the predictive policy (ties: the cheaper), or the
cheapest point if none is. The static schedule's point is chosen the same way. Prints a table,
the result as one JSON line, then as its last line the verdict (`summary`, as
`make bench-scaling` prints for six traces); exits 1 when a target is missed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from chalicelib.history import FORECAST_LEAD_S
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
# The weeks of history the daily trainer reads (forecast/trainer.py TrainerSettings.trainer_weeks'
# default; not imported: the trainer imports this module).
TRAINER_WEEKS = 5
# A pool's forecast is used only where it beat a flat forecast (the training mean) by this much
# on the last training week, in hourly runner-seconds (`skill`): on an aperiodic history the
# predictive policy is the scaler alone, so it never costs more than reacting.
SKILL_MIN = 0.2
PERIODIC_P95_RATIO = 0.6  # targets (issue 16): predictive p95 over its baseline's, periodic
PERIODIC_MASE = 1.0
APERIODIC_RATIO = 1.05  # aperiodic: p95 and instance-hours over the default reactive's
# `make bench-scaling` passes only when it judged the aperiodic trace and this many periodic
# ones (issue 16: at least five periodic traces, every one meeting the targets).
MIN_PERIODIC_TRACES = 5
APERIODIC = "aperiodic"  # the generated aperiodic trace's name


@dataclass(frozen=True)
class PredictiveSettings:
    """The predictive policy's knobs (docs/scaling.md): the trainer's own
    (forecast/trainer.py TrainerSettings), so the judged plan is the applied one."""

    quantile: float = QUANTILE
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


def _router(pools: PoolConfig) -> Callable[[tuple[str, ...]], str | None]:
    """The pool a label set routes to (or None), each distinct label set routed once."""
    owner, routes = sim_owner(pools), {}

    def pool_of(labels: tuple[str, ...]) -> str | None:
        if labels not in routes:
            decision = route(pools, labels, owner=owner, repository=SIM_REPOSITORY,
                             private=True)
            routes[labels] = decision.pool.name if decision.pool else None
        return routes[labels]

    return pool_of


def pool_durations(jobs: Sequence[TraceJob], pools: PoolConfig, until: float
                   ) -> dict[str, list[float]]:
    """Durations of the jobs before `until`, per pool they route to."""
    pool_of = _router(pools)
    found: dict[str, list[float]] = {name: [] for name in pools.names}
    for job in jobs:
        if job.at >= until:
            break
        if (name := pool_of(job.labels)) is not None:
            found[name].append(job.duration_s)
    return found


class JobHistory:
    """The demand history as chalicelib/history.py records it, at any moment: a job's arrival
    counts in its bucket when it arrives; its runner-seconds (and its duration, the spread
    kernel's input) count in the same bucket only once it completed. So at a daily run the
    jobs still running are not in the history yet, as in production."""

    def __init__(self, jobs: Sequence[TraceJob], pools: PoolConfig, start: float) -> None:
        if start % BUCKET_S:
            raise ValueError(f"JobHistory: start {start} is not a multiple of {BUCKET_S} s")
        self.start = start
        pool_of = _router(pools)
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in pools.names}
        for job in jobs:
            if job.at >= start and (name := pool_of(job.labels)) is not None:
                rows[name].append((job.at, job.duration_s))
        self._jobs = {name: np.asarray(found, dtype=float).reshape(-1, 2)
                      for name, found in rows.items()}

    def at(self, pool: str, origin: float, weeks: int = TRAINER_WEEKS
           ) -> tuple[Series, list[float]]:
        """What the trainer reads at `origin` (a bucket boundary): the pool's Series over
        the `weeks` before it (not before `start`), and the durations of its jobs completed
        by then."""
        since = max(self.start, origin - weeks * WEEK_S)
        count = int((origin - since) // BUCKET_S)
        at, duration = self._jobs[pool][:, 0], self._jobs[pool][:, 1]
        inside = (at >= since) & (at < origin)
        index = ((at - since) // BUCKET_S).astype(int)
        done = inside & (at + duration <= origin)
        arrivals = np.bincount(index[inside], minlength=count)
        runner_s = np.bincount(index[done], weights=duration[done], minlength=count)
        return (Series(pool, float(since), [int(a) for a in arrivals],
                       [float(r) for r in runner_s]), duration[done].tolist())


@dataclass
class PoolForecasts:
    """One pool's forecasts and plans, a day at a time: the plans from `start` (the day before
    the judged week: the warm-up's) to the judged week's end, the forecasts of the judged days
    (for MASE). Each day is what the daily trainer makes at that day's midnight."""

    start: float
    skill: float | None  # `forecast_skill` at the judged week's start (None: too little history)
    model: Forecaster
    hosts: list[int] = field(default_factory=list)  # the predictive floor (`floor_of`)
    warm: list[int] = field(default_factory=list)  # its warm runners
    hourly_hosts: list[int] = field(default_factory=list)  # the hourly forecast's plan
    hourly_warm: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)  # judged days only, from here on
    hourly: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    actual: list[float] = field(default_factory=list)
    no_floor: str = ""  # why the floor is 0 every day (the skill gate), or ""


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


def forecast_pool(actual: Series, history: JobHistory, judged: float, end: float,
                  quantile: float, shape: Any) -> PoolForecasts:
    """The pool's daily plans as the trainer makes them (`floor_of` on the forecast from the
    history at each midnight, `shape` a forecast/trainer.py PoolShape), and the judged days'
    forecasts against `actual` (the whole runner-seconds of each bucket's arrivals)."""
    from forecast.trainer import SKILL_BUCKETS, floor_of  # the trainer imports this module

    pool = actual.pool
    trained, _ = history.at(pool, judged)
    model = Forecaster(quantile).fit(trained)
    skill = (forecast_skill(trained, judged, quantile) if len(trained) >= SKILL_BUCKETS
             else None)
    out = PoolForecasts(judged - DAY_S, skill, model)
    reasons = []
    for origin in np.arange(out.start, end, DAY_S):
        origin = float(origin)
        past, durations = history.at(pool, origin)
        forecast = model.with_history(past).predict(origin, HORIZON)
        # The trainer judges no skill on less than SKILL_BUCKETS of history (the warm-up
        # day's run, on a short trace): no floor that day, as in production.
        planned = floor_of(forecast, past, durations, shape,
                           skill if len(past) >= SKILL_BUCKETS else None)
        out.hosts += planned.hosts
        out.warm += planned.warm
        reasons.append(planned.no_floor)
        hourly = hourly_forecast(past, origin, HORIZON).mean
        # EC2's granularity planned the same way (no skill gate: it is the comparison).
        flat = forecast_plan(origin, hourly, hourly, spread_kernel(durations), shape.slots,
                             0.0, history=past.runner_s[-HORIZON:], max_hosts=shape.max_hosts,
                             warm_share=shape.warm_share)
        out.hourly_hosts += flat.hosts
        out.hourly_warm += flat.warm
        if origin >= judged:
            out.mean += forecast.mean
            out.hourly += hourly
            out.naive += seasonal_naive(past, origin, HORIZON)
    out.actual = actual.runner_s[actual.index(judged):actual.index(end)]
    out.no_floor = reasons[-1] if all(reasons) else ""
    return out


def mase_of(forecasts: dict[str, PoolForecasts], field_name: str) -> float | None:
    """Pooled MASE over the pools' judged buckets."""
    error = scale = 0.0
    for pool in forecasts.values():
        actual = np.asarray(pool.actual)
        error += float(np.abs(actual - np.asarray(getattr(pool, field_name))).sum())
        scale += float(np.abs(actual - np.asarray(pool.naive)).sum())
    if scale == 0:
        return 0.0 if error == 0 else None
    return error / scale


@dataclass
class Planning:
    """Every planned policy's plans per pool (pools the trace never uses have none)."""

    forecasts: dict[str, PoolForecasts]
    predictive: dict[str, Plan]  # only pools that pass the skill gate
    hourly: dict[str, Plan]
    static: dict[str, Plan]

    @property
    def floor_only(self) -> dict[str, Plan]:
        """The ablation: the predictive floor without its warm runners."""
        return {pool: replace(plan, warm=(0,) * len(plan.warm))
                for pool, plan in self.predictive.items()}


def plan_pools(jobs: Sequence[TraceJob], pools: PoolConfig, config: SimConfig,
               settings: PredictiveSettings, say: Callable[[str], None] = lambda _: None,
               name: str = "trace") -> Planning:
    """The planned policies' plans for `jobs`' judged week (sorted jobs). The predictive and
    hourly plans are looked up FORECAST_LEAD_S ahead, the scaler's default lead."""
    from forecast.trainer import PoolShape  # the trainer imports this module

    first, judged, end = judged_window(jobs)
    series = buckets(jobs, pools, start=first, end=end)
    history = JobHistory(jobs, pools, first)
    durations = pool_durations(jobs, pools, judged)
    capped = cost_cap_hosts(settings.cost_cap_per_hour, settings.host_price_per_hour)
    planning = Planning({}, {}, {}, {})
    for pool in pools.pools:
        if not any(series[pool.name].runner_s):
            continue  # a pool the trace never uses: nothing to forecast
        slots = config.slots_for(pool.name)
        cap = min(config.max_hosts.get(pool.name, math.inf),
                  math.ceil(pool.max_runners / slots))
        shape = PoolShape(slots, int(cap if capped is None else min(cap, capped)),
                          settings.warm_share)
        say(f"{name}: forecasting {pool.name}")
        f = planning.forecasts[pool.name] = forecast_pool(series[pool.name], history, judged,
                                                          end, settings.quantile, shape)
        if not f.no_floor:  # the gate passed (one skill for the week, as one model)
            planning.predictive[pool.name] = Plan(f.start, BUCKET_S, tuple(f.hosts),
                                                  tuple(f.warm), lead_s=FORECAST_LEAD_S)
        planning.hourly[pool.name] = Plan(f.start, BUCKET_S, tuple(f.hourly_hosts),
                                          tuple(f.hourly_warm), lead_s=FORECAST_LEAD_S)
        training = series[pool.name].window(first, judged)
        planning.static[pool.name] = static_plan(training.start, training.runner_s,
                                                 spread_kernel(durations[pool.name]), slots)
    return planning


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
    """a / b, unrounded (the verdict compares it; round only to print); 1 for 0 / 0."""
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def _check_judged_routes(jobs: Sequence[TraceJob], pools: PoolConfig, judged: float) -> None:
    pool_of = _router(pools)
    week = [job for job in jobs if job.at >= judged]
    if not any(pool_of(job.labels) is not None for job in week):
        seen = sorted({";".join(job.labels) for job in week})
        shown = ", ".join(seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
        raise ValueError(f"none of the judged week's {len(week)} jobs routes to a pool of the "
                         f"pools file ({', '.join(pools.names)}); their labels: {shown}")


def replay_jobs(jobs: Sequence[TraceJob], pools: PoolConfig, *, name: str = "trace",
                seed: int = 0, config: SimConfig | None = None,
                predictive: PredictiveSettings | None = None, workers: int = 1,
                grid: Sequence[tuple[int, float, float]] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every policy on `jobs`' judged week; the figures as a dict (module docstring), ratios
    and MASE unrounded. ValueError: too short a trace, no judged job any pool serves, a
    config naming pools the file lacks."""
    jobs = sorted(jobs, key=lambda job: job.at)
    settings = predictive or PredictiveSettings()
    _, judged, end = judged_window(jobs)
    _check_judged_routes(jobs, pools, judged)
    base = config or SimConfig()
    unknown = sorted((set(base.pool_slots) | set(base.max_hosts)) - set(pools.names))
    if unknown:
        raise ValueError(f"per-pool settings name pools not in the pools file: {unknown} "
                         f"(pools: {', '.join(pools.names)})")
    config = replace(base, measure_from=judged, measure_to=end)
    say = log or (lambda _text: None)
    planning = plan_pools(jobs, pools, config, settings, say, name)
    forecasts = planning.forecasts

    knobs = list(grid) if grid is not None else knob_grid()
    reactive = ([Reactive(knob_name("reactive", *k), *k) for k in knobs] if grid is not None
                else reactive_grid())
    static = [Planned(knob_name("static", *k), *k, plans=planning.static) for k in knobs]
    others = [Planned("hourly", plans=planning.hourly),
              Planned("predictive", plans=planning.predictive),
              Planned("predictive-floor-only", plans=planning.floor_only)]
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
    shown = {"predictive": "predictive", "predictive-floor-only": "predictive-floor-only",
             "hourly": "hourly", "baseline": baseline, "static": static_pick,
             "reactive-default": DEFAULT_REACTIVE.name}
    return {
        "trace": name,
        "jobs": len(jobs),
        "judged_from": _iso(judged), "judged_to": _iso(end),
        "judged_jobs": len(best.waits),
        "unrouted": best.unrouted,
        # The judged figure: pooled over the pools (issue 16 defines MASE per trace).
        "mase": mase_of(forecasts, "mean") if forecasts else None,
        "mase_hourly": mase_of(forecasts, "hourly") if forecasts else None,
        "mase_by_pool": {pool: mase_of({pool: f}, "mean") for pool, f in forecasts.items()},
        "skill_by_pool": {pool: f.skill for pool, f in forecasts.items()},
        "forecast_used": sorted(planning.predictive),
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


# --- the verdict (issue 16's targets), on unrounded figures ---

def rounded(value: Any, digits: int = 3) -> Any:
    """`value` with every float rounded (for printing only: the verdict compares the
    unrounded figures, so 0.6004 misses "<= 0.6" though it prints 0.6)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def periodic_misses(result: dict[str, Any]) -> list[str]:
    """The periodic targets `result` misses (none: it passes), each as a sentence."""
    ratio, mase = result["p95_wait_ratio"], result["mase"]
    misses = []
    if ratio is None:
        misses.append("p95_wait_ratio undefined (the baseline's p95 wait is 0, predictive's "
                      "is not)")
    elif not ratio <= PERIODIC_P95_RATIO:
        misses.append(f"p95_wait_ratio {ratio:.6g} > {PERIODIC_P95_RATIO}")
    if mase is None:
        misses.append("MASE undefined (seasonal naive is exact, the forecast is not)")
    elif not mase < PERIODIC_MASE:
        misses.append(f"MASE {mase:.6g} >= {PERIODIC_MASE}")
    return misses


def aperiodic_misses(result: dict[str, Any]) -> list[str]:
    """The aperiodic targets (against reactive-default) `result` misses."""
    misses = []
    for key, ratio in result["default"].items():
        if ratio is None:
            misses.append(f"{key} vs default undefined (the default's is 0, predictive's is "
                          "not)")
        elif not ratio <= APERIODIC_RATIO:
            misses.append(f"{key} vs default {ratio:.6g} > {APERIODIC_RATIO}")
    return misses


def periodic_pass(result: dict[str, Any]) -> bool:
    return not periodic_misses(result)


def aperiodic_pass(result: dict[str, Any]) -> bool:
    return not aperiodic_misses(result)


def verdict(results: dict[str, dict[str, Any]], aperiodic: Collection[str] = (APERIODIC,), *,
            min_periodic: int = MIN_PERIODIC_TRACES, need_aperiodic: bool = True
            ) -> tuple[dict[str, Any], list[str]]:
    """The summary line `{"traces", "all_pass", "worst", "aperiodic"}` (rounded, to print)
    over `results` (trace name -> replay_jobs' result; those named in `aperiodic` are judged
    as aperiodic), and why all_pass is false (empty when true). all_pass needs every trace
    to meet its targets, at least `min_periodic` periodic traces, and an aperiodic one when
    `need_aperiodic` (`make bench-scaling`; `make replay` judges one trace: 0 and False)."""
    periodic = {name: r for name, r in results.items() if name not in aperiodic}
    others = {name: r for name, r in results.items() if name in aperiodic}
    misses = [f"{name}: {miss}" for name, r in periodic.items() for miss in periodic_misses(r)]
    misses += [f"{name}: {miss}" for name, r in others.items() for miss in aperiodic_misses(r)]
    if len(periodic) < min_periodic:
        misses.append(f"{len(periodic)} periodic trace(s) judged, the verdict needs at least "
                      f"{min_periodic}")
    if need_aperiodic and not others:
        misses.append("no aperiodic trace judged, the verdict needs one")
    if not results:
        misses.append("no trace judged")

    def worst(values: list[float | None]) -> float | None:
        return None if not values or None in values else max(values)

    line: dict[str, Any] = {
        "traces": len(results), "all_pass": not misses,
        "worst": {"p95_wait_ratio": worst([r["p95_wait_ratio"] for r in periodic.values()]),
                  "mase": worst([r["mase"] for r in periodic.values()])}}
    if others:
        line["aperiodic"] = {key: worst([r["default"][key] for r in others.values()])
                             for key in ("p95_wait_ratio", "instance_hours_ratio")}
    return rounded(line), misses


def summary(results: dict[str, dict[str, Any]], aperiodic: Collection[str] = (APERIODIC,),
            **kwargs: Any) -> dict[str, Any]:
    """`verdict`'s line alone."""
    return verdict(results, aperiodic, **kwargs)[0]


def table(result: dict[str, Any]) -> str:
    shown = rounded(result)
    by_pool = ", ".join(f"{pool} {mase}" for pool, mase in shown["mase_by_pool"].items())
    lines = [f"{result['trace']}: judged {result['judged_from']} - {result['judged_to']}, "
             f"{result['judged_jobs']} jobs, MASE {shown['mase']} (by pool: {by_pool or '-'}; "
             f"hourly {shown['mase_hourly']})",
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
    from forecast.trainer import parse_pool_slots  # the trainer imports this module

    parser = argparse.ArgumentParser(prog="python -m forecast.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="a CSV trace: timestamp,labels,duration_s")
    parser.add_argument("--pools", type=Path, default=SIM_POOLS)
    parser.add_argument("--pool-slots", default="", metavar="POOL=SLOTS,...",
                        help="a host's runner slots per pool where not the default "
                             f"{SimConfig.slots_per_host} (RUNNERHUB_SCALER_POOL_SLOTS' "
                             "format), e.g. gpu=1,linux-large=8")
    parser.add_argument("--boot-s", type=float, default=SimConfig.boot_s,
                        help="launch -> the daemon's first heartbeat, seconds (default "
                             f"{SimConfig.boot_s:g}, +- up to {SimConfig.boot_jitter_s:g})")
    parser.add_argument("--aperiodic", action="store_true",
                        help="judge the trace as aperiodic (default: when no pool's forecast "
                             "passes the skill gate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        jitter = min(SimConfig.boot_jitter_s, max(args.boot_s, 0.0))
        try:
            slots = parse_pool_slots(args.pool_slots)
        except ValueError as exc:
            raise ValueError(f"--pool-slots: {exc}") from exc
        config = SimConfig(pool_slots=slots, boot_s=args.boot_s,
                           boot_jitter_s=jitter)
        result = replay(args.trace, args.pools, seed=args.seed, workers=args.workers,
                        config=config)
    except ValueError as exc:
        parser.exit(2, f"error: {' '.join(str(exc).split())}\n")
    aperiodic = args.aperiodic or not result["forecast_used"]
    line, misses = verdict({result["trace"]: result},
                           [result["trace"]] if aperiodic else [], min_periodic=0,
                           need_aperiodic=False)
    print(table(result))
    print(json.dumps(rounded({key: value for key, value in result.items()
                              if key != "reactive_grid"})))
    kind = "aperiodic (against reactive-default)" if aperiodic else "periodic"
    print(f"verdict, judged as {kind}: "
          + ("pass" if not misses else "MISS: " + "; ".join(misses)))
    print(json.dumps(line))
    return 0 if line["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
