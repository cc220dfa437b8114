"""A pool's warm target (chalicelib/warm_targets.py): the pools file's or the forecast's, the
larger, within max_runners; never the forecast's where warm runners cannot register."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chalicelib.errors import DependencyUnavailable
from chalicelib.history import BUCKET_S, ForecastItem, ForecastReader, MemoryHistory
from chalicelib.overrides import OverrideRejected, PoolOverrides, check_warm, effective
from chalicelib.pools import Pool
from chalicelib.warm_targets import WarmTargets, wanted

MONDAY_NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp()
START = MONDAY_NOON - MONDAY_NOON % BUCKET_S


def pool(**fields) -> Pool:
    return Pool.model_validate({"name": "p", "labels": ["x"], "image": "img",
                                "scope": {"owner": "acme"}, "max_runners": 10} | fields)


OFFICE = pool(warm_schedule=[{"start": "09:00", "end": "17:00", "warm_runners": 4}])


@pytest.mark.parametrize(("config", "forecast", "expected"), [
    (pool(), 0, 0),
    (pool(), 3, 3),  # the file wants none: the forecast's
    (pool(warm_runners=2), 1, 2),  # the file's is larger
    (OFFICE, 2, 4),  # inside the window: the window's
    (OFFICE, 7, 7),
    (pool(max_runners=5), 9, 5),  # never above max_runners
    (pool(warm_runners=2), -1, 2),  # a negative forecast is none
])
def test_the_larger_of_file_and_forecast_within_max_runners(config, forecast, expected):
    assert wanted(config, MONDAY_NOON, forecast) == expected


def test_outside_the_window_the_base_or_the_forecast():
    evening = MONDAY_NOON + 8 * 3600
    assert wanted(OFFICE, evening, 0) == 0 and wanted(OFFICE, evening, 2) == 2


def test_repository_scoped_runners_with_many_repositories_never_follow_the_forecast():
    """A warm runner registers before its job exists: with repository-scoped runners it needs
    the pool's one repository, so the forecast asks nothing of a pool serving several."""
    many = pool(runner_scope="repo", scope={"owner": "acme", "repositories": ["a", "b"]})
    one = pool(runner_scope="repo", scope={"owner": "acme", "repositories": ["a"]})
    assert wanted(many, MONDAY_NOON, 5) == 0 and WarmTargets(ForecastReader(
        MemoryHistory())).ever(many) == 0
    assert wanted(one, MONDAY_NOON, 5) == 5


class Store(MemoryHistory):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def forecast(self, name):
        if self.fail:
            raise DependencyUnavailable("dynamodb", "timeout")
        return super().forecast(name)


def test_targets_read_the_forecast_and_keep_the_last_one_through_an_outage():
    store, now, errors = Store(), [START + 1.0], []
    store.put_forecast(ForecastItem("p", START, (0.0,) * 2, trained_at=START, warm=(3, 6)))
    targets = WarmTargets(ForecastReader(store, refresh_s=60, clock=lambda: now[0],
                                         on_error=lambda name, exc: errors.append(name)))
    assert targets.follows_forecast and targets.target(pool(), now[0]) == 3
    store.fail = True
    now[0] = START + BUCKET_S + 1
    assert targets.target(pool(), now[0]) == 6 and errors == ["p"]  # the item read before
    # Beyond the horizon: the file's.
    assert targets.target(pool(warm_runners=1), START + 2 * BUCKET_S) == 1


def test_without_a_reader_the_file_alone():
    targets = WarmTargets()
    assert not targets.follows_forecast
    assert targets.target(OFFICE, MONDAY_NOON) == 4 and targets.ever(OFFICE) == 4
    assert targets.ever(pool()) == 0
    assert WarmTargets(ForecastReader(MemoryHistory())).ever(pool()) == 10


class Overrides:
    def __init__(self, warm):
        self.warm = warm

    def get(self, name):
        return PoolOverrides(warm_runners=self.warm)


def test_an_operators_warm_target_replaces_file_and_forecast_within_max_runners():
    store = MemoryHistory()
    store.put_forecast(ForecastItem("p", START, (0.0,) * 2, trained_at=START, warm=(6, 6)))
    forecasts = ForecastReader(store, clock=lambda: START + 1)
    assert WarmTargets(forecasts).target(OFFICE, START + 1) == 6
    assert WarmTargets(forecasts, overrides=Overrides(1)).target(OFFICE, START + 1) == 1
    assert WarmTargets(overrides=Overrides(0)).target(OFFICE, MONDAY_NOON) == 0
    assert WarmTargets(overrides=Overrides(99)).target(OFFICE, MONDAY_NOON) == 10
    # Not set: the file's and the forecast's rule.
    assert WarmTargets(forecasts, overrides=Overrides(None)).target(OFFICE, START + 1) == 6
    many = pool(runner_scope="repo", scope={"owner": "acme", "repositories": ["a", "b"]})
    assert WarmTargets(overrides=Overrides(3)).target(many, MONDAY_NOON) == 0
    assert WarmTargets(overrides=Overrides(None)).ever(pool()) == 10


def test_an_override_out_of_the_pools_limits_is_refused_with_the_reason():
    many = pool(runner_scope="repo", scope={"owner": "acme", "repositories": ["a", "b"]})
    with pytest.raises(OverrideRejected, match="several repositories"):
        check_warm(many, 1)
    check_warm(many, 0)
    with pytest.raises(OverrideRejected, match=r"outside 0\.\.max_runners"):
        check_warm(pool(), 11)
    # The effective view shows the forecast's when it is larger than the file's.
    assert effective(OFFICE, None, MONDAY_NOON, forecast_warm=7).warm_runners == 7
    assert effective(OFFICE, PoolOverrides(warm_runners=2), MONDAY_NOON,
                     forecast_warm=7).warm_runners == 2
