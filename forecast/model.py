"""The forecaster: per pool, the next 24 h of runner-seconds per 5-minute bucket, with an upper
quantile the scaler provisions for (docs/scaling.md, "Predictive scaling").

Model: two scikit-learn HistGradientBoostingRegressors on the same features, one with quantile
loss at `quantile` (`upper`) and one with absolute-error loss (`mean`: the conditional median,
the point forecast that minimises MASE's absolute error). Features of a bucket at time t:

- calendar: minute of day, day of week, hour of week (UTC): the daily and weekly cycle, at
  5-minute resolution, so a 02:00 cron storm or a 09:30 stand-up is its own feature value;
- trend: weeks since the first bucket of the training history. Trees do not extrapolate, so
  this is recency, not a line: the leaves of the latest weeks apply to the future, which
  follows growth and sets an anomalous training week (a holiday) apart;
- lags: the value one day and one week earlier, and their 1-hour means (less noisy). A 24 h
  horizon from the end of the history always has both; further ahead, the forecaster's own
  point forecast stands in for the missing days.

HistGradientBoosting takes missing values (the first week has no week lag) and fits a few
weeks of 5-minute buckets (~10k rows) in about a second. `python -m forecast.model --evaluate
DIR` prints MASE against seasonal-naive on the judged (last) week of each trace in DIR, for this
model, a calendar-only ablation and the hourly forecast.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from chalicelib.pools import load_pools
from forecast.traces import (
    BUCKET_S,
    DAY_BUCKETS,
    HORIZON,
    SIM_POOLS,
    TRACES,
    WEEK_BUCKETS,
    Series,
    buckets,
    read_trace,
)

WEEK_S = WEEK_BUCKETS * BUCKET_S
# Epoch 0 (1970-01-01) was a Thursday: the day of week with Monday = 0 is (days + 3) % 7.
_EPOCH_WEEKDAY = 3
SMOOTH_HALF = 6  # buckets each side: a 1-hour window for the smoothed lags
CALENDAR = ("minute_of_day", "day_of_week", "hour_of_week", "trend")
FEATURE_SETS = {
    "full": (*CALENDAR, "lag_1d", "lag_1w", "smooth_1d", "smooth_1w"),
    "calendar": CALENDAR,
}
MIN_HISTORY = DAY_BUCKETS  # a day at least: the day lag needs one
# Ties at the loss's starting value (the median: 0 on a pool whose buckets are mostly empty)
# give absolute-error boosting nothing to move on: measured, a pool with 51 % empty buckets got
# an all-zero forecast. A deterministic jitter of at most 1 ms of runner time breaks the ties.
JITTER_S = 1e-3
FORMAT_VERSION = 1


@dataclass
class Forecast:
    """Runner-seconds per 5-minute bucket from `start`: the point forecast and the quantile."""

    start: float
    mean: list[float]
    upper: list[float]


def _calendar(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    days = np.floor(t / 86400)
    minute_of_day = (t - days * 86400) / 60
    day_of_week = (days + _EPOCH_WEEKDAY) % 7
    hour_of_week = day_of_week * 24 + np.floor(minute_of_day / 60)
    return minute_of_day, day_of_week, hour_of_week


def _lag(values: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    j = index - k
    ok = (j >= 0) & (j < len(values))
    out = np.full(len(index), np.nan)
    out[ok] = values[j[ok]]
    return out


def _smoothed(values: np.ndarray) -> np.ndarray:
    """The mean of the known values within SMOOTH_HALF buckets of each bucket (NaN if none)."""
    known = ~np.isnan(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(known, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(known)])
    low = np.clip(np.arange(len(values)) - SMOOTH_HALF, 0, len(values))
    high = np.clip(np.arange(len(values)) + SMOOTH_HALF + 1, 0, len(values))
    n = counts[high] - counts[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[high] - sums[low]) / np.maximum(n, 1), np.nan)


def _check_start(start: float) -> None:
    if not math.isfinite(start) or start % BUCKET_S:
        raise ValueError(f"start {start} is not a multiple of {BUCKET_S} s")


def _check_horizon(horizon: int) -> None:
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a whole number of buckets >= 1, got {horizon!r}")


def _history(series: Series) -> np.ndarray:
    values = np.asarray(series.runner_s, dtype=float)
    if len(values) and (not np.all(np.isfinite(values)) or values.min() < 0):
        raise ValueError(f"series {series.pool}: runner_s must be finite and >= 0")
    return values


class Forecaster:
    """Per pool: fit on a history Series, predict runner-seconds per bucket with a quantile."""

    def __init__(self, quantile: float = 0.9, features: str = "full"):
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be between 0 and 1 (exclusive), got {quantile!r}")
        if features not in FEATURE_SETS:
            raise ValueError(f"unknown feature set {features!r}: {', '.join(FEATURE_SETS)}")
        self.quantile = quantile
        self.features = features
        self.pool: str | None = None
        self._origin = 0.0  # the training history's first bucket: trend counts from here
        self._start = 0.0  # the current history's first bucket
        self._values = np.zeros(0)
        self._mean: HistGradientBoostingRegressor | None = None
        self._upper: HistGradientBoostingRegressor | None = None
        self._columns = FEATURE_SETS[features]

    def _model(self, loss: str) -> HistGradientBoostingRegressor:
        extra = {"quantile": self.quantile} if loss == "quantile" else {}
        # Shallow, regularised trees and no early stopping: deterministic, about a second.
        return HistGradientBoostingRegressor(
            loss=loss, max_iter=150, learning_rate=0.08, max_leaf_nodes=31,
            min_samples_leaf=15, l2_regularization=1.0, early_stopping=False, random_state=0,
            **extra)

    def _matrix(self, index: np.ndarray, values: np.ndarray, smooth: np.ndarray) -> np.ndarray:
        t = self._start + index * BUCKET_S
        minute_of_day, day_of_week, hour_of_week = _calendar(t)
        columns = {
            "minute_of_day": minute_of_day, "day_of_week": day_of_week,
            "hour_of_week": hour_of_week, "trend": (t - self._origin) / WEEK_S,
            "lag_1d": _lag(values, index, DAY_BUCKETS),
            "lag_1w": _lag(values, index, WEEK_BUCKETS),
            "smooth_1d": _lag(smooth, index, DAY_BUCKETS),
            "smooth_1w": _lag(smooth, index, WEEK_BUCKETS),
        }
        return np.column_stack([columns[name] for name in self._columns])

    def fit(self, series: Series) -> Forecaster:
        values = _history(series)
        if len(values) < MIN_HISTORY:
            raise ValueError(f"series {series.pool}: {len(values)} buckets of history, the "
                             f"forecaster needs at least {MIN_HISTORY} (one day)")
        self.pool, self._origin, self._start, self._values = (
            series.pool, series.start, series.start, values)
        index = np.arange(len(values))
        self._columns = FEATURE_SETS[self.features]
        matrix = self._matrix(index, values, _smoothed(values))
        # A history shorter than a week has no week lag at all; scikit-learn cannot bin a
        # column without a single value, so such a column is left out (here and in predict).
        known = ~np.all(np.isnan(matrix), axis=0)
        self._columns = tuple(np.asarray(self._columns)[known].tolist())
        matrix = matrix[:, known]
        target = values + JITTER_S * np.random.default_rng(0).random(len(values))
        # One thread: on a busy 2-core machine OpenMP's threads made a 1 s fit take 60 s, and
        # a Lambda function has one or two vCPUs anyway.
        with threadpool_limits(1):
            self._mean = self._model("absolute_error").fit(matrix, target)
            self._upper = self._model("quantile").fit(matrix, target)
        return self

    def with_history(self, series: Series) -> Forecaster:
        """The same fitted model over a newer history (its lags), without refitting: a day's
        forecast from the latest buckets between two trainings."""
        self._fitted()
        other = copy.copy(self)
        other._values, other._start = _history(series), series.start
        return other

    def _fitted(self) -> None:
        if self._mean is None or self._upper is None:
            raise NotFittedError("Forecaster.fit() first")

    @property
    def history_end(self) -> float:
        """Epoch seconds just past the last bucket of the history."""
        return self._start + len(self._values) * BUCKET_S

    def predict(self, start: float, horizon: int = HORIZON) -> Forecast:
        """Runner-seconds per bucket for `horizon` buckets from `start` (not before the
        history's first bucket). Buckets past the history's end use the point forecast of the
        buckets before them as their lags, a day at a time."""
        self._fitted()
        _check_start(start)
        _check_horizon(horizon)
        first = round((start - self._start) / BUCKET_S)
        if first < 0:
            raise ValueError(f"start {start} is before the history's first bucket "
                             f"{self._start}")
        known = len(self._values)
        stop = first + horizon
        values = np.full(max(known, stop), np.nan)
        values[:known] = self._values
        mean, upper = np.zeros(stop), np.zeros(stop)
        # Unknown buckets between the history and `start` are forecast too (their lags).
        position = min(first, known)
        while position < stop:
            # A day at a time: the day lag of a bucket is never in its own chunk.
            index = np.arange(position, min(position + DAY_BUCKETS, stop))
            matrix = self._matrix(index, values, _smoothed(values))
            with threadpool_limits(1):
                mean[index] = np.maximum(self._mean.predict(matrix), 0.0)
                upper[index] = np.maximum(self._upper.predict(matrix), mean[index])
            future = index[index >= known]
            values[future] = mean[future]
            position = index[-1] + 1
        return Forecast(float(start), mean[first:stop].tolist(), upper[first:stop].tolist())

    def dumps(self) -> bytes:
        """The fitted forecaster as bytes (joblib). Load only blobs RunnerHub wrote: unpickling
        runs code."""
        self._fitted()
        buffer = io.BytesIO()
        joblib.dump({"format": FORMAT_VERSION, "forecaster": self}, buffer, compress=3)
        return buffer.getvalue()

    @classmethod
    def loads(cls, blob: bytes) -> Forecaster:
        try:
            data = joblib.load(io.BytesIO(blob))
        except Exception as exc:  # any unpickling failure means a bad blob
            raise ValueError(f"not a forecaster blob: {exc}") from exc
        if (not isinstance(data, dict) or data.get("format") != FORMAT_VERSION
                or not isinstance(data.get("forecaster"), cls)):
            raise ValueError(f"not a forecaster blob of format {FORMAT_VERSION}")
        return data["forecaster"]


def _index_in(series: Series, start: float, horizon: int) -> np.ndarray:
    _check_start(start)
    _check_horizon(horizon)
    return round((start - series.start) / BUCKET_S) + np.arange(horizon)


def seasonal_naive(series: Series, start: float, horizon: int = HORIZON) -> list[float]:
    """The same bucket one week earlier (past the history's end: the last week repeated)."""
    values = _history(series)
    index = _index_in(series, start, horizon) - WEEK_BUCKETS
    if len(values) and index.max() >= len(values):
        # Beyond the week after the history: repeat its last week.
        index = np.where(index >= len(values),
                         index - WEEK_BUCKETS * np.ceil((index - len(values) + 1)
                                                        / WEEK_BUCKETS).astype(int), index)
    if not len(values) or index.min() < 0:
        raise ValueError(f"series {series.pool}: seasonal-naive needs the week before {start}, "
                         f"the history starts at {series.start}")
    return values[index].tolist()


def hourly_forecast(series: Series, start: float, horizon: int = HORIZON) -> Forecast:
    """EC2 predictive scaling's granularity: the history's mean per hour of week (per 5-minute
    bucket), flat within each hour; hours the history lacks get its overall mean."""
    values = _history(series)
    if not len(values):
        raise ValueError(f"series {series.pool}: no history")
    _, _, past_how = _calendar(series.start + np.arange(len(values)) * BUCKET_S)
    sums = np.bincount(past_how.astype(int), weights=values, minlength=168)
    counts = np.bincount(past_how.astype(int), minlength=168)
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), values.mean())
    index = _index_in(series, start, horizon)
    _, _, how = _calendar(series.start + index * BUCKET_S)
    flat = profile[how.astype(int)].tolist()
    return Forecast(float(start), flat, list(flat))


def mase(actual: Sequence[float], forecast: Sequence[float], naive: Sequence[float]) -> float:
    """Mean |actual - forecast| over mean |actual - naive|. 0.0 when both errors are zero;
    inf when only the naive forecast is perfect."""
    a, f, n = (np.asarray(x, dtype=float) for x in (actual, forecast, naive))
    if not (len(a) == len(f) == len(n)) or not len(a):
        raise ValueError(f"mase needs equal, non-empty lengths; got {len(a)}, {len(f)}, "
                         f"{len(n)}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(f)) and np.all(np.isfinite(n))):
        raise ValueError("mase: values must be finite")
    error, scale = np.abs(a - f).mean(), np.abs(a - n).mean()
    if scale == 0:
        return 0.0 if error == 0 else math.inf
    return float(error / scale)


@dataclass
class Judged:
    """Absolute errors summed over a judged week, for pooling across pools."""

    model: float = 0.0
    calendar: float = 0.0
    hourly: float = 0.0
    naive: float = 0.0
    covered: int = 0
    buckets: int = 0

    def add(self, other: Judged) -> None:
        for name in ("model", "calendar", "hourly", "naive", "covered", "buckets"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def ratio(self, name: str) -> float:
        error = getattr(self, name)
        return (0.0 if error == 0 else math.inf) if self.naive == 0 else error / self.naive


def judge_series(series: Series, quantile: float = 0.9) -> Judged:
    """Train on all but the last week, then forecast each day of the last week 24 h ahead from
    the buckets before it (one fit, the day's history: `with_history`)."""
    if len(series) < 2 * WEEK_BUCKETS:
        raise ValueError(f"series {series.pool}: {len(series)} buckets, judging needs two "
                         f"weeks at least (one to train on, the last to judge)")
    judged_start = series.end - WEEK_S
    train = series.window(series.start, judged_start)
    models = {name: Forecaster(quantile, features=name).fit(train) for name in FEATURE_SETS}
    values = np.asarray(series.runner_s, dtype=float)
    out = Judged()
    for day in range(7):
        origin = judged_start + day * DAY_BUCKETS * BUCKET_S
        history = series.window(series.start, origin)
        first = series.index(origin)
        actual = values[first:first + HORIZON]
        full = models["full"].with_history(history).predict(origin)
        calendar = models["calendar"].with_history(history).predict(origin)
        out.model += float(np.abs(actual - full.mean).sum())
        out.calendar += float(np.abs(actual - calendar.mean).sum())
        out.hourly += float(np.abs(actual - hourly_forecast(history, origin).mean).sum())
        out.naive += float(np.abs(actual - seasonal_naive(history, origin)).sum())
        out.covered += int((actual <= np.asarray(full.upper) + 1e-9).sum())
        out.buckets += len(actual)
    return out


def evaluate(directory: Path, pools_path: Path = SIM_POOLS, quantile: float = 0.9) -> dict:
    """MASE per trace (pooled over its pools) on the judged week of every CSV in `directory`."""
    pools = load_pools(pools_path)
    paths = sorted(directory.glob("*.csv"),
                   key=lambda p: (TRACES.index(p.stem) if p.stem in TRACES else len(TRACES),
                                  p.stem))
    if not paths:
        raise ValueError(f"no *.csv traces in {directory}")
    results = {}
    for path in paths:
        jobs = read_trace(path)
        if not jobs:
            raise ValueError(f"{path}: no jobs")
        # Whole UTC days: the judged week is the last 7 days, each forecast from midnight.
        series_by_pool = buckets(jobs, pools, start=math.floor(jobs[0].at / 86400) * 86400,
                                 end=math.ceil((jobs[-1].at + 1) / 86400) * 86400)
        total, per_pool = Judged(), {}
        for name, series in series_by_pool.items():
            if not any(series.runner_s):
                continue  # a pool the trace never uses: nothing to forecast or judge
            judged = judge_series(series, quantile)
            per_pool[name] = round(judged.ratio("model"), 3)
            total.add(judged)
        results[path.stem] = {
            "mase": round(total.ratio("model"), 3),
            "mase_calendar_only": round(total.ratio("calendar"), 3),
            "mase_hourly": round(total.ratio("hourly"), 3),
            "upper_coverage": round(total.covered / max(total.buckets, 1), 3),
            "mase_per_pool": per_pool,
            "unrouted": sum(series_by_pool.unrouted.values()),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forecast.model")
    parser.add_argument("--evaluate", type=Path, required=True, metavar="DIR",
                        help="a directory of trace CSVs (python -m forecast.generate DIR)")
    parser.add_argument("--pools", type=Path, default=SIM_POOLS)
    parser.add_argument("--quantile", type=float, default=0.9)
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.evaluate, args.pools, args.quantile)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{'trace':<15} {'MASE':>6} {'calendar':>9} {'hourly':>7} {'q-cover':>8}  per pool")
    for name, row in results.items():
        print(f"{name:<15} {row['mase']:>6.3f} {row['mase_calendar_only']:>9.3f} "
              f"{row['mase_hourly']:>7.3f} {row['upper_coverage']:>8.3f}  "
              f"{row['mase_per_pool']}")
    periodic = [row["mase"] for name, row in results.items() if name != "aperiodic"]
    print({"worst_periodic_mase": max(periodic, default=None)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
