"""One trace-week end to end (the short version of `make bench-scaling`): the generated nightly
cron trace, three weeks (two to train on, the last judged), the real forecaster, the real
routing and scaler decision, a one-point grid."""

from __future__ import annotations

import pytest

from chalicelib.pools import load_pools
from forecast.generate import generate
from forecast.replay import replay_jobs
from forecast.traces import SIM_POOLS


@pytest.fixture(scope="module")
def week():
    jobs = generate("nightly_cron", seed=0, weeks=3)
    return replay_jobs(jobs, load_pools(SIM_POOLS), name="nightly_cron",
                       grid=[(0, 300.0, 0.0)], workers=1)


def test_the_judged_week_is_the_last(week):
    assert week["judged_from"] == "2026-01-19T00:00:00Z"
    assert week["judged_to"] == "2026-01-26T00:00:00Z"
    assert week["judged_jobs"] > 1000 and week["unrouted"] == 0


def test_predictive_prewarms_the_nightly_storm(week):
    # The 02:00 storm is in the forecast: the predictive policy has hosts and warm runners up
    # before it, the default reactive policy boots for it.
    assert "linux-large" in week["forecast_used"]
    predictive = week["policies"]["predictive"]
    default = week["policies"]["reactive-default"]
    assert predictive["p95_wait_s"] < 0.6 * default["p95_wait_s"]
    assert predictive["instance_hours"] > 0 and 0 < predictive["utilisation"] <= 1


def test_figures_are_reported_for_every_policy(week):
    assert set(week["policies"]) == {"predictive", "predictive-floor-only", "hourly",
                                     "baseline", "static", "reactive-default"}
    assert week["mase"] is not None and 0 < week["mase"] < 5
    assert week["p95_wait_ratio"] is not None
    assert week["default"]["instance_hours_ratio"] is not None
