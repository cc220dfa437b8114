"""forecast/generate.py: the six bundled traces, their shapes, determinism, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from chalicelib.pools import load_pools
from forecast import generate as gen
from forecast.traces import SIM_POOLS, TRACES, buckets, read_trace

DAY_S = 86400
WEEK_S = 7 * DAY_S


@pytest.fixture(scope="module")
def pools():
    return load_pools(SIM_POOLS)


@pytest.fixture(scope="module")
def two_weeks():
    return {name: gen.generate(name, seed=3, weeks=2) for name in TRACES}


def arrivals_by_hour(jobs) -> np.ndarray:
    """Arrivals per hour since START."""
    hours = np.floor((np.array([job.at for job in jobs]) - gen.START) / 3600).astype(int)
    return np.bincount(hours)


def test_every_trace_is_sorted_routed_and_inside_its_weeks(two_weeks, pools):
    for name, jobs in two_weeks.items():
        assert len(jobs) > 1000, name
        at = [job.at for job in jobs]
        assert at == sorted(at) and gen.START <= at[0] and at[-1] < gen.START + 2 * WEEK_S
        durations = np.array([job.duration_s for job in jobs])
        assert durations.min() >= 10 and durations.max() <= 4 * 3600, name
        # A long right tail, as CI durations have: the mean well above the median.
        assert durations.mean() > 1.1 * np.median(durations), name
        assert not buckets(jobs, pools).unrouted, name


def test_the_same_seed_gives_the_same_trace_and_another_seed_does_not(two_weeks):
    assert gen.generate("matrix_bursts", seed=3, weeks=2) == two_weeks["matrix_bursts"]
    assert gen.generate("matrix_bursts", seed=4, weeks=2) != two_weeks["matrix_bursts"]


def test_office_hours_are_busy_on_weekday_mornings_and_quiet_at_night_and_weekends(two_weeks):
    hourly = arrivals_by_hour(two_weeks["office_hours"])
    weekday_10 = hourly[[d * 24 + 10 for d in range(5)]].mean()
    weekday_03 = hourly[[d * 24 + 3 for d in range(5)]].mean()
    saturday_10 = hourly[5 * 24 + 10]
    assert weekday_10 > 10 * weekday_03 and weekday_10 > 5 * saturday_10


def test_nightly_cron_storms_at_two(two_weeks):
    minutes = np.floor((np.array([j.at for j in two_weeks["nightly_cron"]]) - gen.START) / 60)
    per_minute = np.bincount(minutes.astype(int), minlength=14 * 1440).reshape(14, 1440)
    storm = per_minute[:, 120:130].sum(axis=1)  # 02:00-02:10 each day
    rest = per_minute[:, 130:].sum(axis=1) / (1440 - 130) * 10  # any other 10 minutes
    assert (storm > 100).all() and (storm > 10 * rest).all()


def test_matrix_bursts_arrive_as_fans_within_seconds(two_weeks):
    def close_gaps(name):  # the share of arrivals within 5 s of the one before
        return (np.diff([job.at for job in two_weeks[name]]) <= 5).mean()

    assert close_gaps("matrix_bursts") > 0.7 and close_gaps("office_hours") < 0.4


def test_growth_trend_grows_week_on_week(two_weeks):
    at = np.array([job.at for job in two_weeks["growth_trend"]]) - gen.START
    first, second = (at < WEEK_S).sum(), (at >= WEEK_S).sum()
    assert 1.05 < second / first < 1.2  # 10 % a week, compounded


def test_the_holiday_is_the_second_week_a_training_week(two_weeks):
    assert gen.HOLIDAY_WEEK == 1
    at = np.array([job.at for job in two_weeks["holiday_week"]]) - gen.START
    assert (at >= WEEK_S).sum() < 0.35 * (at < WEEK_S).sum()


def test_aperiodic_does_not_repeat_by_day(two_weeks):
    def day_to_day_correlation(name):
        days = arrivals_by_hour(two_weeks[name])[:14 * 24].reshape(14, 24)
        return np.mean([np.corrcoef(days[d], days[d + 1])[0, 1] for d in range(4)])

    assert day_to_day_correlation("office_hours") > 0.9
    assert day_to_day_correlation("aperiodic") < 0.5


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown trace 'weekly'"):
        gen.generate("weekly")
    with pytest.raises(ValueError, match="weeks must be"):
        gen.generate("office_hours", weeks=0)
    with pytest.raises(ValueError, match="seed must be"):
        gen.generate("office_hours", seed=-1)


def test_a_pools_file_without_the_trace_pools_is_refused(pools):
    from chalicelib.pools import PoolConfig

    other = PoolConfig.model_validate({"pool": [pools.pools[0].model_dump()]})
    with pytest.raises(ValueError, match="lacks pool 'linux-large'"):
        gen.generate("office_hours", weeks=1, pools=other)


def test_cli_refuses_fewer_than_four_weeks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gen.main([str(tmp_path), "--weeks", "3"])
    assert "at least 4" in capsys.readouterr().err


def test_cli_writes_all_six_traces(tmp_path, monkeypatch):
    # Shorter traces for speed: the CLI's own minimum is checked above.
    monkeypatch.setattr(gen, "MIN_CLI_WEEKS", 1)
    assert gen.main([str(tmp_path / "out"), "--weeks", "1", "--seed", "3"]) == 0
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.csv")) == sorted(TRACES)
    jobs = read_trace(tmp_path / "out" / "nightly_cron.csv")
    assert jobs == gen.generate("nightly_cron", seed=3, weeks=1)
