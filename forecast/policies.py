"""The scaling policies the simulator compares (docs/scaling.md, "Predictive scaling: the
simulator and the policies"). Every policy runs the scaler's own decision; they differ in its
knobs and in the floor (`PoolView.forecast_hosts`) and warm runners they add:

- reactive: the scaler alone, over a grid of its knobs (`reactive_grid`): spare hosts 0-4 (the
  scaler's warm slots, a host's slots each), idle timeout 1/5/10/15 min, scale-in delay
  0/5/10 min (no host retired below the most hosts wanted that long ago);
- static schedule: one window per day type (weekdays, weekend) with a fixed floor and warm
  runners, as an operator writes it (terraform-aws-github-runner's idle schedules, RunnerHub's
  `warm_schedule`), read off the training weeks;
- hourly forecast: EC2 predictive scaling's granularity (`model.hourly_forecast`);
- predictive: RunnerHub's forecaster's upper quantile, the scaler's lead ahead
  (chalicelib.history.FORECAST_LEAD_S, 180 s: longer than the simulated boot), within the pool's
  cap and an optional hourly cost cap; warm runners follow the forecast too.

A forecast is runner-seconds demanded per 5-minute bucket, each job's whole duration counted in
the bucket it arrives in. Slots busy in a bucket are that demand spread over the following
buckets by the pool's duration profile (`spread_kernel`, from the training jobs), per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from forecast.traces import BUCKET_S

IDLE_GRID_S = (60.0, 300.0, 600.0, 900.0)
SPARE_GRID = (0, 1, 2, 3, 4)
SCALE_IN_DELAY_GRID_S = (0.0, 300.0, 600.0)
WEEK_S = 7 * 86400
# Epoch 0 was a Thursday: Monday 1970-01-05 00:00 UTC starts a week.
MONDAY_EPOCH = 4 * 86400
KERNEL_BUCKETS = 48  # a job's runner-seconds are spread over at most 4 h of buckets
KERNEL_SAMPLE = 4000  # durations the kernel is computed from (evenly spaced quantiles)
# A static window covers the hours whose mean busy slots reach this share of the day type's peak.
STATIC_WINDOW_SHARE = 0.25


@dataclass(frozen=True)
class Reactive:
    """The scaler alone. The defaults are the scaler's own (`SCALER_IDLE_S` 300, no warm
    slots): `DEFAULT_REACTIVE`, what an aperiodic trace is judged against."""

    name: str = "reactive"
    spare_hosts: int = 0
    idle_s: float = 300.0
    scale_in_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.spare_hosts < 0 or self.idle_s < 0 or self.scale_in_delay_s < 0:
            raise ValueError(f"policy {self.name}: spare_hosts, idle_s and scale_in_delay_s "
                             "must be >= 0")

    def floor_hosts(self, pool: str, now: float) -> int:
        return 0

    def warm(self, pool: str, now: float) -> int:
        return 0


DEFAULT_REACTIVE = Reactive("reactive-default")


def knob_grid() -> list[tuple[int, float, float]]:
    """(spare hosts, idle s, scale-in delay s) of the grid: 5 x 4 x 3 = 60 points."""
    return [(spare, idle, delay) for spare in SPARE_GRID for idle in IDLE_GRID_S
            for delay in SCALE_IN_DELAY_GRID_S]


def knob_name(kind: str, spare: int, idle: float, delay: float) -> str:
    return f"{kind}(spare={spare},idle={idle / 60:g}m,delay={delay / 60:g}m)"


def reactive_grid() -> list[Reactive]:
    return [Reactive(knob_name("reactive", *knobs), *knobs) for knobs in knob_grid()]


@dataclass(frozen=True)
class Plan:
    """A pool's floor hosts and warm runners per step of `step_s` from `start` (0 outside;
    `weekly`: the steps are one week, repeated). Looked up `lead_s` ahead: hosts launched now
    serve a boot time later."""

    start: float
    step_s: float
    hosts: tuple[int, ...]
    warm: tuple[int, ...]
    weekly: bool = False
    lead_s: float = 0.0

    def __post_init__(self) -> None:
        if len(self.hosts) != len(self.warm) or not self.hosts:
            raise ValueError("Plan: hosts and warm need the same, non-zero length")
        if min(self.hosts) < 0 or min(self.warm) < 0:
            raise ValueError("Plan: hosts and warm runners must be >= 0")
        if self.weekly and len(self.hosts) * self.step_s != WEEK_S:
            raise ValueError("Plan: a weekly plan's steps must add up to one week")

    def _index(self, at: float) -> int | None:
        index = math.floor((at - self.start) / self.step_s)
        if self.weekly:
            return index % len(self.hosts)
        return index if 0 <= index < len(self.hosts) else None

    def hosts_at(self, now: float) -> int:
        """The most hosts wanted now or one lead ahead."""
        found = [self.hosts[i] for i in (self._index(now), self._index(now + self.lead_s))
                 if i is not None]
        return max(found, default=0)

    def warm_at(self, now: float) -> int:
        index = self._index(now)
        return 0 if index is None else self.warm[index]


@dataclass(frozen=True)
class Planned(Reactive):
    """The scaler with a floor and warm runners per pool from a `Plan` (static schedule, hourly
    forecast, predictive). A pool without a plan gets none."""

    plans: Mapping[str, Plan] = field(default_factory=dict)

    def floor_hosts(self, pool: str, now: float) -> int:
        plan = self.plans.get(pool)
        return plan.hosts_at(now) if plan else 0

    def warm(self, pool: str, now: float) -> int:
        plan = self.plans.get(pool)
        return plan.warm_at(now) if plan else 0


def spread_kernel(durations: Sequence[float], buckets: int = KERNEL_BUCKETS) -> np.ndarray:
    """Share of a job's runner-seconds in each bucket from its arrival's on, its arrival
    uniform within its bucket, averaged over `durations` weighted by duration. Sums to 1."""
    values = np.sort(np.asarray([d for d in durations if d > 0], dtype=float))
    if not len(values):
        kernel = np.zeros(buckets)
        kernel[0] = 1.0
        return kernel
    if len(values) > KERNEL_SAMPLE:  # evenly spaced quantiles: deterministic, the same shape
        values = values[np.linspace(0, len(values) - 1, KERNEL_SAMPLE).round().astype(int)]
    offsets = (np.arange(10) + 0.5) / 10 * BUCKET_S
    starts = np.repeat(offsets, len(values))
    ends = starts + np.tile(values, len(offsets))
    edges = np.arange(buckets + 1) * BUCKET_S
    share = np.array([np.clip(np.minimum(ends, edges[j + 1]) - np.maximum(starts, edges[j]),
                              0, None).sum() for j in range(buckets)])
    return share / share.sum()


def busy_slots(runner_s: Sequence[float], kernel: np.ndarray) -> np.ndarray:
    """Mean busy slots per bucket: runner-seconds demanded per bucket spread by `kernel`."""
    demand = np.asarray(runner_s, dtype=float)
    return np.convolve(demand, kernel)[:len(demand)] / BUCKET_S


def forecast_plan(start: float, upper: Sequence[float], mean: Sequence[float],
                  kernel: np.ndarray, slots: int, lead_s: float, *, history: Sequence[float] = (),
                  headroom: float = 1.0, max_hosts: int | None = None,
                  warm_share: float = 1.0) -> Plan:
    """A pool's plan from a forecast of runner-seconds per bucket from `start`: floor hosts for
    the upper quantile's busy slots (times `headroom`), at most `max_hosts` (the cap, or an
    hourly cost cap); warm runners for the slots the floor leaves free beyond the mean demand
    (times `warm_share`), never more than the floor's slots. `history`: the actual buckets
    just before `start` (their jobs still run into the plan's first buckets)."""
    if slots < 1:
        raise ValueError("slots per host must be >= 1")
    if len(upper) != len(mean):
        raise ValueError("upper and mean forecasts differ in length")
    prefix = len(history)
    high = busy_slots([*history, *upper], kernel)[prefix:] * headroom
    low = busy_slots([*history, *mean], kernel)[prefix:]
    hosts = np.ceil(high / slots - 1e-9).astype(int)
    if max_hosts is not None:
        hosts = np.minimum(hosts, max_hosts)
    warm = np.minimum(np.floor((hosts * slots - low) * warm_share), hosts * slots)
    warm = np.maximum(warm, 0).astype(int)
    return Plan(start, BUCKET_S, tuple(int(h) for h in hosts), tuple(int(w) for w in warm),
                lead_s=lead_s)


def static_plan(history_start: float, runner_s: Sequence[float], kernel: np.ndarray,
                slots: int) -> Plan:
    """A weekly schedule an operator would write from the training weeks: per day type
    (weekdays, weekend) one window of whole hours, where the mean busy slots reach
    STATIC_WINDOW_SHARE of that day type's peak hour, with the floor the window's mean busy
    slots need; no floor outside it."""
    busy = busy_slots(runner_s, kernel)
    if not len(busy):
        raise ValueError("static_plan: no history")
    t = history_start + np.arange(len(busy)) * BUCKET_S
    hour_of_week = (((t - MONDAY_EPOCH) % WEEK_S) // 3600).astype(int)
    sums = np.bincount(hour_of_week, weights=busy, minlength=168)
    counts = np.bincount(hour_of_week, minlength=168)
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).reshape(7, 24)
    hosts = np.zeros((7, 24), dtype=int)
    warm = np.zeros((7, 24), dtype=int)
    for days in (range(5), range(5, 7)):
        day_profile = profile[list(days)].mean(axis=0)
        peak = day_profile.max()
        if peak <= 0:
            continue
        inside = np.flatnonzero(day_profile >= STATIC_WINDOW_SHARE * peak)
        first, last = inside.min(), inside.max()
        mean = day_profile[first:last + 1].mean()
        count = math.ceil(mean / slots)
        for day in days:
            hosts[day, first:last + 1] = count
            # Warm runners on the window's slots above its mean demand (a warm_schedule).
            warm[day, first:last + 1] = max(0, count * slots - math.ceil(mean))
    return Plan(float(MONDAY_EPOCH), 3600.0, tuple(int(h) for h in hosts.reshape(-1)),
                tuple(int(w) for w in warm.reshape(-1)), weekly=True)


def cost_cap_hosts(cap_per_hour: float | None, host_price_per_hour: float) -> int | None:
    """The most hosts an hourly cost cap pays for (None: no cap)."""
    if cap_per_hour is None:
        return None
    if cap_per_hour < 0 or host_price_per_hour <= 0:
        raise ValueError("the hourly cost cap must be >= 0 and a host's price > 0")
    return math.floor(cap_per_hour / host_price_per_hour)
