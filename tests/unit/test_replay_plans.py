"""`make replay`'s plans and command line (forecast/replay.py): each day's predictive plan is
the one the daily trainer (forecast/trainer.py) stores at that day's midnight, from the history
it reads then (jobs still running are not in it); one boot lead, the scaler's; the fleet's
slots and boot from the command line; bad input exits 2 with one line."""

from __future__ import annotations

import json
import math

import pytest

from chalicelib.history import FORECAST_LEAD_S, Event, Kind, MemoryHistory, bucket_of
from chalicelib.pools import PoolConfig
from forecast import replay as replay_module
from forecast.replay import (
    DAY_S,
    TRAINER_WEEKS,
    PredictiveSettings,
    judged_window,
    main,
    plan_pools,
)
from forecast.simulate import SimConfig
from forecast.traces import HORIZON, TraceJob, buckets, write_trace
from forecast.trainer import PoolShape, Trainer, TrainerSettings, floor_of

T0 = 1_767_571_200.0  # 2026-01-05 00:00 UTC, a Monday
LABELS = ("self-hosted", "linux")
POOLS = PoolConfig.model_validate({"pool": [{
    "name": "linux", "labels": list(LABELS), "scope": {"owner": "acme"}, "image": "img",
    "max_runners": 16}]})


def daily_trace(days: int = 15) -> list[TraceJob]:
    """A morning peak, and at 23:20 a batch of 1-2 h jobs still running at every midnight.
    Integer durations: the history's sums are exact in any order."""
    jobs = []
    for day in range(days):
        base = T0 + day * DAY_S
        jobs.append(TraceJob(base + 10, LABELS, 120.0))  # the first bucket of every day
        jobs += [TraceJob(base + 9 * 3600 + i * 180, LABELS, 600.0 + (i % 5) * 150)
                 for i in range(40)]
        jobs += [TraceJob(base + 23 * 3600 + 1200 + i * 60, LABELS, 3600.0 + i * 600)
                 for i in range(6)]
    return jobs


class _Models:
    def put(self, key: str, blob: bytes) -> None:
        pass


class _Same:
    """The replay's fitted forecaster, as the trainer's model: the trainer's fit on its
    history is the replay's model over that history (the replay fits once a week)."""

    def __init__(self, model):
        self.model = model

    def fit(self, series):
        return self.model.with_history(series)


def trainer_floor(jobs, origin, model, skill, shape):
    """What the production trainer stores at `origin`: its history is recorded as the scaler's
    stream handler records it (an arrival at once, runner-seconds at completion)."""
    history = MemoryHistory()
    events = [Event("linux", bucket_of(job.at), n, Kind.ARRIVAL)
              for n, job in enumerate(jobs) if job.at < origin]
    events += [Event("linux", bucket_of(job.at), n, Kind.COMPLETION, job.duration_s)
               for n, job in enumerate(jobs) if job.at + job.duration_s <= origin]
    history.record(events, origin)
    Trainer(pools=["linux"], history=history, models=_Models(),
            make_model=lambda _q: _Same(model), skill=lambda *_: skill,
            shapes={"linux": shape}, clock=lambda: origin).run()
    return history.forecast("linux")


@pytest.fixture(scope="module")
def planned():
    jobs = daily_trace()
    config = SimConfig()
    return jobs, plan_pools(jobs, POOLS, config, PredictiveSettings())


def test_each_days_predictive_plan_is_what_the_trainer_stores_at_its_midnight(planned):
    jobs, planning = planned
    _, judged, end = judged_window(jobs)
    f = planning.forecasts["linux"]
    plan = planning.predictive["linux"]  # the gate passed: a real floor to compare
    assert f.skill is not None and f.no_floor == ""
    shape = PoolShape(4, math.ceil(16 / 4), 1.0)
    days = round((end - plan.start) / DAY_S)
    assert plan.start == judged - DAY_S and days == 8
    assert len(plan.hosts) == days * HORIZON and max(plan.hosts) >= 2
    for day in range(days):
        origin = plan.start + day * DAY_S
        # Jobs of the 23:20 batch still run at this midnight: not in the trainer's history.
        assert any(job.at < origin < job.at + job.duration_s for job in jobs)
        item = trainer_floor(jobs, origin, f.model, f.skill, shape)
        part = slice(day * HORIZON, (day + 1) * HORIZON)
        assert item.start == origin
        assert item.floor_hosts[:HORIZON] == plan.hosts[part], day
        assert item.warm[:HORIZON] == plan.warm[part], day


def test_a_history_counting_running_jobs_would_plan_differently(planned):
    # The comparison above can fail: the whole runner-seconds of the still-running batch,
    # counted at arrival (the old replay's history), change some day's floor.
    jobs, planning = planned
    f, plan = planning.forecasts["linux"], planning.predictive["linux"]
    first, _, end = judged_window(jobs)
    full = buckets(jobs, POOLS, start=first, end=end)["linux"]
    shape = PoolShape(4, 4, 1.0)
    differs = []
    for day in range(round((end - plan.start) / DAY_S)):
        origin = plan.start + day * DAY_S
        past = full.window(max(first, origin - TRAINER_WEEKS * 7 * DAY_S), origin)
        forecast = f.model.with_history(past).predict(origin, HORIZON)
        durations = [job.duration_s for job in jobs if job.at < origin]
        wrong = floor_of(forecast, past, durations, shape, f.skill)
        differs.append(wrong.hosts != plan.hosts[day * HORIZON:(day + 1) * HORIZON])
    assert any(differs)


def test_plans_are_looked_up_one_scaler_lead_ahead(planned):
    _, planning = planned
    assert FORECAST_LEAD_S == 180.0  # the scaler's default, not a boot (60-70 s)
    assert planning.predictive["linux"].lead_s == FORECAST_LEAD_S
    assert planning.hourly["linux"].lead_s == FORECAST_LEAD_S
    assert planning.floor_only["linux"].lead_s == FORECAST_LEAD_S
    assert set(planning.floor_only["linux"].warm) == {0}


def test_the_replay_reads_as_many_weeks_as_the_trainer():
    assert TRAINER_WEEKS == TrainerSettings.model_fields["trainer_weeks"].default


def test_pools_the_trace_never_uses_get_no_plan():
    two = PoolConfig.model_validate({"pool": [
        {"name": "linux", "labels": list(LABELS), "scope": {"owner": "acme"}, "image": "img"},
        {"name": "gpu", "labels": ["self-hosted", "gpu"], "scope": {"owner": "acme"},
         "image": "img"}]})
    jobs = daily_trace(15)
    planning = plan_pools(jobs, two, SimConfig(), PredictiveSettings())
    assert set(planning.forecasts) == {"linux"} and "gpu" not in planning.hourly


# --- the command line ---

def _result(name: str, *, ratio: float, mase: float, used: list[str]) -> dict:
    return {"trace": name, "judged_from": "a", "judged_to": "b", "judged_jobs": 10,
            "mase": mase, "mase_hourly": 1.2, "mase_by_pool": {"linux": mase},
            "forecast_used": used, "p95_wait_ratio": ratio,
            "default": {"p95_wait_ratio": 0.9, "instance_hours_ratio": 1.01},
            "policies": {"predictive": {"policy": "predictive", "p50_wait_s": 0.5,
                                        "p95_wait_s": 0.5, "max_wait_s": 3.0,
                                        "instance_hours": 10.0, "utilisation": 0.3}}}


class _Calls(list):
    result: dict | None = None  # what the fake replay returns


@pytest.fixture
def fake_replay(monkeypatch):
    # The command line's wiring alone (a real replay of a week is make bench-scaling's).
    calls = _Calls()

    def fake(trace, pools, *, seed, workers, config):
        calls.append(config)
        return calls.result

    monkeypatch.setattr(replay_module, "replay", fake)
    return calls


def test_pool_slots_and_boot_reach_the_simulation(fake_replay, capsys):
    fake_replay.result = _result("t", ratio=0.2, mase=0.7, used=["linux"])
    assert main(["t.csv", "--pool-slots", "gpu=1,linux-large=8", "--boot-s", "90"]) == 0
    (config,) = fake_replay
    assert config.pool_slots == {"gpu": 1, "linux-large": 8}
    assert (config.boot_s, config.boot_jitter_s, config.slots_per_host) == (90.0, 10.0, 4)
    out = capsys.readouterr().out.strip().splitlines()
    assert "MASE 0.7 (by pool: linux 0.7" in out[0]
    assert json.loads(out[-1]) == {"traces": 1, "all_pass": True,
                                   "worst": {"p95_wait_ratio": 0.2, "mase": 0.7}}


def test_a_missed_target_prints_why_and_exits_1(fake_replay, capsys):
    fake_replay.result = _result("t", ratio=0.6004, mase=0.7, used=["linux"])
    assert main(["t.csv"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["all_pass"] is False
    assert "p95_wait_ratio 0.6004 > 0.6" in out[-2]


def test_a_trace_no_pool_forecasts_is_judged_aperiodic(fake_replay, capsys):
    # No pool passed the skill gate: judged against reactive-default (both ratios <= 1.05),
    # not against the periodic targets its MASE would miss.
    fake_replay.result = _result("t", ratio=1.0, mase=1.3, used=[])
    assert main(["t.csv"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["aperiodic"] == {"p95_wait_ratio": 0.9, "instance_hours_ratio": 1.01}
    assert line["all_pass"] is True and line["worst"] == {"p95_wait_ratio": None, "mase": None}
    fake_replay.result = _result("t", ratio=0.2, mase=0.7, used=["linux"])
    assert main(["t.csv", "--aperiodic"]) == 0
    assert "aperiodic" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("args, message", [
    (["--pool-slots", "gpu=0"], "--pool-slots: scaler_pool_slots: 'gpu=0' is not pool=slots"),
    (["--pool-slots", "gpu"], "is not pool=slots"),
    (["--boot-s", "-5"], "boot_s must be a finite number >= 0"),
    (["--boot-s", "700"], "boot_timeout_s"),
])
def test_bad_fleet_options_exit_2_with_one_line(fake_replay, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        main(["t.csv", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not fake_replay


def test_pool_slots_naming_an_unknown_pool_exit_2(tmp_path, capsys):
    path = tmp_path / "t.csv"
    write_trace(path, [TraceJob(T0 + day * DAY_S, ("self-hosted", "linux", "x64"), 60.0)
                       for day in range(15)])
    with pytest.raises(SystemExit) as exited:
        main([str(path), "--pool-slots", "windows=2"])
    assert exited.value.code == 2
    assert "name pools not in the pools file: ['windows']" in capsys.readouterr().err


def test_a_trace_whose_judged_jobs_route_nowhere_exits_2(tmp_path, capsys):
    # Two weeks of jobs no pool of the default pools file serves: refused with one line, not
    # a run with all-zero figures.
    path = tmp_path / "t.csv"
    write_trace(path, [TraceJob(T0 + hour * 3600, ("windows", "arm64"), 60.0)
                       for hour in range(15 * 24)])
    with pytest.raises(SystemExit) as exited:
        main([str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "none of the judged week's 168 jobs routes to a pool" in err
    assert "windows;arm64" in err
