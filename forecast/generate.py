"""The bundled traces: six synthetic organisations' weeks of jobs, deterministic per seed.

`python -m forecast.generate OUTDIR [--weeks N] [--seed S]` writes OUTDIR/<name>.csv for every
name of TRACES. Each trace starts on Monday 2026-01-05 00:00 UTC and lasts `weeks` whole weeks;
the simulator trains on all but the last week and judges the last one.

- office_hours: weekdays 08:00-18:00 UTC with a lunch dip and a burst after the 09:30 stand-up,
  quiet nights and weekends.
- nightly_cron: a storm of ~150 scheduled jobs at 02:00 every day (GitHub starts scheduled
  workflows a little late: delays are exponential, mean 60 s), an hourly cron at :00, and a
  light office-hours load.
- matrix_bursts: pushes in office hours, each fanning out a matrix of 4-32 jobs within seconds.
- growth_trend: office_hours growing 10 % a week (compounded continuously).
- holiday_week: office_hours with a holiday in the SECOND week (a training week, never the
  judged one): weekday traffic at 12 % of normal. The forecaster must not learn it as the
  pattern; the judged week is an ordinary one.
- aperiodic: no daily or weekly pattern: a Markov-modulated arrival rate (regimes of random
  level lasting ~3 h) plus bursts at random times. Forecasting cannot help here; the predictive
  policy must at least not cost more than reacting.

Arrivals are Poisson per minute at the trace's rate; durations are log-normal per pool (small
jobs: median 4 min; large: 12 min; gpu: 30 min; clipped to 10 s-4 h), which is the shape CI job
durations have (a long right tail). Labels come from forecast/pools.sim.toml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from chalicelib.pools import PoolConfig, load_pools
from forecast.traces import SIM_POOLS, TRACES, TraceJob, write_trace

START = datetime(2026, 1, 5, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC
MINUTES_PER_WEEK = 7 * 1440
HOLIDAY_WEEK = 1  # holiday_week's holiday: the second week (0-based), a training week
HOLIDAY_FACTOR = 0.12
GROWTH_PER_WEEK = 0.10
MIN_CLI_WEEKS = 4  # three weeks to train on and one to judge, at least
# pool -> (median duration s, log-normal sigma): CI durations have a long right tail.
DURATIONS = {"linux-small": (240.0, 0.8), "linux-large": (720.0, 0.6), "gpu": (1800.0, 0.5)}
DURATION_CLIP_S = (10.0, 4 * 3600.0)
OFFICE_MIX = {"linux-small": 0.70, "linux-large": 0.25, "gpu": 0.05}


def _logistic(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def office_rate(minute: np.ndarray, peak: float = 5.0) -> np.ndarray:
    """Jobs per minute at each minute since START: weekday office hours, quiet otherwise."""
    day = (minute // 1440) % 7  # 0 = Monday
    mod = (minute % 1440).astype(float)
    workday = _logistic((mod - 8 * 60) / 20) * _logistic((18 * 60 - mod) / 30)
    lunch = 1 - 0.35 * np.exp(-(((mod - 12.5 * 60) / 40) ** 2))
    standup = 1 + 0.8 * np.exp(-(((mod - 9.75 * 60) / 10) ** 2))  # pushes after the stand-up
    weekday = peak * workday * lunch * standup
    weekend = 0.4 * _logistic((mod - 10 * 60) / 60) * _logistic((17 * 60 - mod) / 60)
    return 0.15 + np.where(day < 5, weekday, weekend)


class _Builder:
    """Collects arrivals (as arrays) for one trace, then draws pools and durations."""

    def __init__(self, rng: np.random.Generator, pools: PoolConfig):
        self.rng = rng
        self.labels = {}
        for name in DURATIONS:
            try:
                self.labels[name] = pools.by_name(name).labels
            except KeyError as exc:
                raise ValueError(f"pools file lacks pool {name!r}, which the generated traces "
                                 f"use; give the bundled forecast/pools.sim.toml") from exc
        self.at: list[np.ndarray] = []
        self.pool: list[np.ndarray] = []
        self.median_scale: list[np.ndarray] = []

    def poisson(self, rate: np.ndarray, mix: dict[str, float], scale: float = 1.0) -> None:
        """Arrivals at `rate` jobs per minute (one entry per minute since START)."""
        counts = self.rng.poisson(rate)
        minute = np.repeat(np.arange(len(rate)), counts)
        self.add(minute * 60.0 + self.rng.uniform(0, 60, len(minute)), mix, scale)

    def add(self, offsets: np.ndarray, mix: dict[str, float], scale: float = 1.0) -> None:
        codes = np.array([list(DURATIONS).index(name) for name in mix])
        self.at.append(np.asarray(offsets, dtype=float))
        self.pool.append(codes[self.rng.choice(len(codes), size=len(offsets),
                                               p=list(mix.values()))])
        self.median_scale.append(np.full(len(offsets), scale))

    def jobs(self, span_s: float) -> list[TraceJob]:
        at = np.concatenate(self.at)
        pool = np.concatenate(self.pool)
        scale = np.concatenate(self.median_scale)
        names = list(DURATIONS)
        median = np.array([DURATIONS[n][0] for n in names])[pool] * scale
        sigma = np.array([DURATIONS[n][1] for n in names])[pool]
        duration = np.clip(np.round(median * np.exp(sigma * self.rng.standard_normal(len(at)))),
                           *DURATION_CLIP_S)
        keep = (at >= 0) & (at < span_s)
        order = np.argsort(at[keep], kind="stable")
        at, pool, duration = at[keep][order], pool[keep][order], duration[keep][order]
        # Whole seconds, as GitHub's timestamps are.
        return [TraceJob(START + float(np.floor(a)), self.labels[names[p]], float(d))
                for a, p, d in zip(at, pool, duration, strict=True)]


def _office_hours(b: _Builder, minute: np.ndarray) -> None:
    b.poisson(office_rate(minute), OFFICE_MIX)


def _nightly_cron(b: _Builder, minute: np.ndarray) -> None:
    b.poisson(office_rate(minute, peak=2.0), OFFICE_MIX)
    days = len(minute) // 1440
    storm = b.rng.poisson(150, days)
    day = np.repeat(np.arange(days), storm)
    b.add(day * 86400.0 + 2 * 3600 + b.rng.exponential(60, len(day)),
          {"linux-small": 0.3, "linux-large": 0.7}, scale=1.25)
    hours = days * 24
    hourly = b.rng.poisson(6, hours)
    hour = np.repeat(np.arange(hours), hourly)
    b.add(hour * 3600.0 + b.rng.exponential(30, len(hour)), {"linux-small": 1.0}, scale=0.5)


def _matrix_bursts(b: _Builder, minute: np.ndarray) -> None:
    b.poisson(office_rate(minute, peak=1.0), OFFICE_MIX)
    pushes = b.rng.poisson(office_rate(minute, peak=0.35) - 0.14)
    push_at = np.repeat(np.arange(len(minute)), pushes) * 60.0 + b.rng.uniform(
        0, 60, pushes.sum())
    sizes = b.rng.choice([4, 8, 12, 16, 24, 32], size=len(push_at),
                         p=[0.2, 0.25, 0.2, 0.15, 0.12, 0.08])
    at = np.repeat(push_at, sizes) + b.rng.uniform(0, 5, sizes.sum())
    b.add(at, {"linux-small": 0.2, "linux-large": 0.75, "gpu": 0.05})


def _growth_trend(b: _Builder, minute: np.ndarray) -> None:
    growth = np.exp(np.log1p(GROWTH_PER_WEEK) * minute / MINUTES_PER_WEEK)
    b.poisson(office_rate(minute) * growth, OFFICE_MIX)


def _holiday_week(b: _Builder, minute: np.ndarray) -> None:
    rate = office_rate(minute)
    holiday = (minute // MINUTES_PER_WEEK) == HOLIDAY_WEEK
    b.poisson(np.where(holiday, 0.15 + (rate - 0.15) * HOLIDAY_FACTOR, rate), OFFICE_MIX)


def _aperiodic(b: _Builder, minute: np.ndarray) -> None:
    # Regimes of random length (mean 3 h) at random levels: no hour or day repeats another.
    rate = np.empty(len(minute))
    position = 0
    while position < len(minute):
        length = max(5, int(b.rng.exponential(180)))
        rate[position:position + length] = b.rng.lognormal(np.log(1.2), 0.9)
        position += length
    b.poisson(rate, OFFICE_MIX)
    bursts = b.rng.poisson(len(minute) / 360)  # one every 6 h on average, at random times
    burst_at = b.rng.uniform(0, len(minute) * 60.0, bursts)
    sizes = b.rng.integers(20, 61, bursts)
    b.add(np.repeat(burst_at, sizes) + b.rng.exponential(20, sizes.sum()),
          {"linux-small": 0.5, "linux-large": 0.5})


SHAPES: dict[str, Callable[[_Builder, np.ndarray], None]] = {
    "office_hours": _office_hours, "nightly_cron": _nightly_cron,
    "matrix_bursts": _matrix_bursts, "growth_trend": _growth_trend,
    "holiday_week": _holiday_week, "aperiodic": _aperiodic,
}
assert tuple(SHAPES) == TRACES


def generate(name: str, seed: int = 0, weeks: int = 5,
             pools: PoolConfig | None = None) -> list[TraceJob]:
    """The trace `name` (one of TRACES): `weeks` whole weeks from START, sorted by arrival.
    The same name, seed and weeks always give the same jobs."""
    if name not in SHAPES:
        raise ValueError(f"unknown trace {name!r}: choose one of {', '.join(TRACES)}")
    if not isinstance(weeks, int) or weeks < 1:
        raise ValueError(f"weeks must be a whole number >= 1, got {weeks!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    # One stream per (seed, trace): generating one trace never shifts another's numbers.
    builder = _Builder(np.random.default_rng([seed, TRACES.index(name)]),
                       pools or load_pools(SIM_POOLS))
    minute = np.arange(weeks * MINUTES_PER_WEEK)
    SHAPES[name](builder, minute)
    return builder.jobs(weeks * MINUTES_PER_WEEK * 60.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forecast.generate",
                                     description="Write the six bundled traces as CSV files.")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--weeks", type=int, default=5,
                        help=f"whole weeks per trace (default 5, at least {MIN_CLI_WEEKS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.weeks < MIN_CLI_WEEKS:
        parser.error(f"--weeks must be at least {MIN_CLI_WEEKS}: three weeks to train on and "
                     "the last one to judge")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    args.outdir.mkdir(parents=True, exist_ok=True)
    for name in TRACES:
        jobs = generate(name, seed=args.seed, weeks=args.weeks)
        path = args.outdir / f"{name}.csv"
        write_trace(path, jobs)
        print(f"{path}: {len(jobs)} jobs over {args.weeks} weeks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
