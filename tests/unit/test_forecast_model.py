"""forecast/model.py: the forecaster, the seasonal-naive and hourly baselines, and MASE."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from forecast import generate as gen
from forecast.model import (
    Forecaster,
    evaluate,
    hourly_forecast,
    mase,
    seasonal_naive,
)
from forecast.traces import BUCKET_S, DAY_BUCKETS, HORIZON, WEEK_BUCKETS, Series, write_trace

MONDAY = gen.START
WEEK_S = WEEK_BUCKETS * BUCKET_S


def synthetic(weeks: int, seed: int = 0, level: float = 2000.0) -> Series:
    """Runner-seconds with a weekday office bump (incl. a 15-minute spike at 09:30), quiet
    weekends, and Poisson-like noise."""
    t = np.arange(weeks * WEEK_BUCKETS)
    minute = (t % DAY_BUCKETS) * 5
    weekday = (t // DAY_BUCKETS) % 7 < 5
    shape = np.where((minute >= 480) & (minute < 1080), 1.0, 0.05)
    shape = shape + np.where((minute >= 570) & (minute < 585), 2.0, 0.0)
    mean = level * np.where(weekday, shape, 0.05)
    rng = np.random.default_rng(seed)
    values = rng.poisson(mean / 200) * 200.0 * rng.uniform(0.7, 1.3, len(t))
    return Series("linux-small", MONDAY, [0] * len(t), values.tolist())


@pytest.fixture(scope="module")
def history():
    return synthetic(3)


@pytest.fixture(scope="module")
def fitted(history):
    train = history.window(history.start, history.end - WEEK_S)
    return Forecaster(0.9).fit(train)


def test_beats_seasonal_naive_on_the_judged_week_and_covers_with_the_quantile(history, fitted):
    values = np.asarray(history.runner_s)
    judged = history.end - WEEK_S
    errors, naives, covered = [], [], []
    for day in range(7):
        origin = judged + day * DAY_BUCKETS * BUCKET_S
        past = history.window(history.start, origin)
        forecast = fitted.with_history(past).predict(origin)
        actual = values[history.index(origin):history.index(origin) + HORIZON]
        errors += list(np.abs(actual - forecast.mean))
        naives += list(np.abs(actual - seasonal_naive(past, origin)))
        covered += list(actual <= np.asarray(forecast.upper))
        assert np.all(np.asarray(forecast.upper) >= np.asarray(forecast.mean))
    assert np.mean(errors) / np.mean(naives) < 0.9
    assert 0.75 < np.mean(covered) < 0.99  # near the 0.9 quantile


def test_the_spike_after_standup_is_forecast_within_its_quarter_hour(fitted):
    forecast = fitted.predict(fitted.history_end)  # Monday of the third week, 24 h
    spike = np.mean(forecast.upper[114:117])  # 09:30-09:45
    assert spike > 1.5 * np.mean(forecast.upper[120:132])  # 10:00-11:00


def test_a_mostly_empty_pool_does_not_get_an_all_zero_forecast():
    # More than half its buckets are empty: the tie at the median once kept boosting at zero.
    sparse = synthetic(2, seed=1, level=300.0)
    assert np.mean(np.asarray(sparse.runner_s) == 0) > 0.5
    forecast = Forecaster().fit(sparse).predict(sparse.end)
    assert max(forecast.mean) > 0 and max(forecast.upper) > 0


def test_predicting_beyond_a_day_and_after_a_gap_uses_its_own_forecast_as_lags(fitted):
    start = fitted.history_end + 3 * DAY_BUCKETS * BUCKET_S
    forecast = fitted.predict(start, horizon=2 * HORIZON)
    assert forecast.start == start and len(forecast.mean) == len(forecast.upper) == 2 * HORIZON
    assert all(math.isfinite(v) and v >= 0 for v in forecast.mean + forecast.upper)
    # Thursday 10:00 is forecast busier than Thursday 03:00.
    assert forecast.mean[120] > 5 * forecast.mean[36]


def test_fitting_is_deterministic_and_survives_dumps_and_loads(history, fitted):
    train = history.window(history.start, history.end - WEEK_S)
    again = Forecaster(0.9).fit(train)
    origin = fitted.history_end
    assert again.predict(origin) == fitted.predict(origin)
    loaded = Forecaster.loads(fitted.dumps())
    assert loaded.predict(origin) == fitted.predict(origin)
    assert loaded.quantile == 0.9 and loaded.pool == "linux-small"


def test_loads_refuses_what_is_not_a_forecaster():
    with pytest.raises(ValueError, match="not a forecaster blob"):
        Forecaster.loads(b"garbage")
    import io

    import joblib

    buffer = io.BytesIO()
    joblib.dump({"format": 1, "forecaster": "no"}, buffer)
    with pytest.raises(ValueError, match="not a forecaster blob of format 1"):
        Forecaster.loads(buffer.getvalue())


def test_bad_use_is_a_clear_error(history, fitted):
    with pytest.raises(NotFittedError):
        Forecaster().predict(MONDAY)
    with pytest.raises(NotFittedError):
        Forecaster().dumps()
    with pytest.raises(ValueError, match="quantile must be between 0 and 1"):
        Forecaster(1.0)
    with pytest.raises(ValueError, match="unknown feature set"):
        Forecaster(features="everything")
    with pytest.raises(ValueError, match="needs at least 288"):
        Forecaster().fit(history.window(history.start, history.start + 100 * BUCKET_S))
    with pytest.raises(ValueError, match="finite and >= 0"):
        Forecaster().fit(Series("p", MONDAY, [0] * 300, [-1.0] * 300))
    with pytest.raises(ValueError, match="not a multiple of 300"):
        fitted.predict(fitted.history_end + 1)
    with pytest.raises(ValueError, match="before the history's first bucket"):
        fitted.predict(MONDAY - BUCKET_S)
    with pytest.raises(ValueError, match="horizon must be"):
        fitted.predict(fitted.history_end, horizon=0)


def test_seasonal_naive_is_the_same_bucket_a_week_earlier_then_the_last_week_again():
    values = [float(i) for i in range(2 * WEEK_BUCKETS)]
    series = Series("p", MONDAY, [0] * len(values), values)
    at = series.start + WEEK_S + 10 * BUCKET_S
    assert seasonal_naive(series, at, horizon=3) == [10.0, 11.0, 12.0]
    # A week past the end: the history's last week repeated.
    beyond = series.end + WEEK_S
    assert seasonal_naive(series, beyond, horizon=2) == [float(WEEK_BUCKETS),
                                                         float(WEEK_BUCKETS + 1)]
    with pytest.raises(ValueError, match="needs the week before"):
        seasonal_naive(series, series.start + 5 * BUCKET_S)


def test_hourly_forecast_is_the_hour_of_week_mean_flat_within_the_hour():
    values = [float(i % 12 + 12 * ((i // 12) % 168 == 9)) for i in range(WEEK_BUCKETS)]
    series = Series("p", MONDAY, [0] * len(values), values)
    forecast = hourly_forecast(series, series.end, horizon=24)  # the next Monday 00:00-02:00
    assert forecast.mean == forecast.upper == [5.5] * 24
    at_nine = hourly_forecast(series, series.end + 9 * 3600, horizon=12)
    assert at_nine.mean == [17.5] * 12
    with pytest.raises(ValueError, match="no history"):
        hourly_forecast(Series("p", MONDAY, [], []), MONDAY)


def test_mase_is_the_ratio_of_mean_absolute_errors():
    assert mase([1, 2, 3], [1, 2, 4], [0, 2, 5]) == pytest.approx((1 / 3) / 1)
    assert mase([1, 1], [1, 1], [1, 1]) == 0.0  # both perfect
    assert mase([1, 1], [0, 1], [1, 1]) == math.inf  # only the naive one is
    with pytest.raises(ValueError, match="equal, non-empty lengths"):
        mase([1, 2], [1], [1, 2])
    with pytest.raises(ValueError, match="equal, non-empty lengths"):
        mase([], [], [])
    with pytest.raises(ValueError, match="finite"):
        mase([1.0], [float("nan")], [1.0])


def test_evaluate_reports_mase_below_one_on_a_generated_trace(tmp_path):
    # One pool's jobs only, for speed; the pools the trace never uses are not judged.
    jobs = [job for job in gen.generate("office_hours", seed=1, weeks=2) if len(job.labels) == 3]
    write_trace(tmp_path / "office_hours.csv", jobs)
    results = evaluate(tmp_path)
    row = results["office_hours"]
    assert row["mase"] < 1 and row["mase_hourly"] > 0 and 0.7 < row["upper_coverage"] < 1
    assert set(row["mase_per_pool"]) == {"linux-small"}
    assert row["unrouted"] == 0


def test_evaluate_refuses_an_empty_directory(tmp_path):
    with pytest.raises(ValueError, match=r"no \*\.csv traces"):
        evaluate(tmp_path)


def test_a_history_shorter_than_a_week_fits_without_the_week_lags(history):
    two_days = history.window(history.start, history.start + 2 * DAY_BUCKETS * BUCKET_S)
    model = Forecaster().fit(two_days)
    assert "lag_1w" not in model._columns and "lag_1d" in model._columns
    forecast = model.predict(two_days.end)  # Wednesday
    assert forecast.mean[120] > forecast.mean[36]  # 10:00 busier than 03:00
