"""The trainer (forecast/trainer.py): history to series, a failing pool keeping its previous
forecast while the others train, too little history skipped (not a failure), events refused by
name; the stored floor is the simulator's predictive policy's for the same forecast, and a pool
failing the skill gate gets none (with its reason, counted). The real forecaster against
DynamoDB and S3 is tests/functional/test_history_http.py."""

from __future__ import annotations

import random

import pytest

from chalicelib import warm_targets
from chalicelib.history import (
    BUCKET_S,
    Bucket,
    Event,
    ForecastFloor,
    ForecastItem,
    ForecastReader,
    Kind,
    MemoryHistory,
    floor_hosts,
)
from chalicelib.pools import Pool
from chalicelib.telemetry import Telemetry
from chalicelib.warm_targets import WarmTargets
from forecast.model import Forecaster
from forecast.policies import Planned, forecast_plan, spread_kernel
from forecast.replay import SKILL_MIN, forecast_skill
from forecast.traces import DAY_BUCKETS, HORIZON
from forecast.trainer import (
    STORED_HORIZON,
    PoolShape,
    Trainer,
    durations_of,
    model_key,
    parse_pool_slots,
    pools_of,
    series_of,
)

T0 = 1_767_571_200  # 2026-01-05 00:00 UTC (a Monday)
DAY = 86400


class Models:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, blob: bytes) -> None:
        self.objects[key] = blob


class FlatModel:
    """A stand-in for the forecaster: the history's mean, flat (or a failure, for a pool)."""

    def __init__(self, quantile: float, fail_for: str = "") -> None:
        self.quantile, self.fail_for = quantile, fail_for

    def fit(self, series):
        if series.pool == self.fail_for:
            raise RuntimeError("fit diverged")
        self.level = sum(series.runner_s) / len(series)
        return self

    def predict(self, start, horizon=HORIZON):
        class Forecast:
            pass

        found = Forecast()
        found.start, found.upper = start, [self.level * 1.5] * horizon
        found.mean = [self.level] * horizon
        return found

    def dumps(self) -> bytes:
        return b"model"


class Sink:
    def __init__(self) -> None:
        self.blobs: list[dict] = []

    def send(self, blob: dict) -> None:
        self.blobs.append(blob)


def fill(history: MemoryHistory, pool: str, days: float, runner_s: float = 600.0,
         end: int = T0 + 14 * DAY) -> None:
    count = int(days * DAY_BUCKETS)
    history.record([Event(pool, end - (n + 1) * BUCKET_S, n, Kind.COMPLETION, runner_s)
                    for n in range(count)], end)


def test_series_fills_gaps_with_zero_and_starts_at_the_first_recorded_bucket():
    found = [Bucket(T0 + BUCKET_S, 2, 60.0), Bucket(T0 + 3 * BUCKET_S, 1, 30.0),
             Bucket(T0 - 9 * BUCKET_S, 5, 5.0)]  # before the window: left out
    series = series_of("linux", found, T0, T0 + 5 * BUCKET_S)
    assert series.start == T0 + BUCKET_S
    assert series.arrivals == [2, 0, 1, 0] and series.runner_s == [60.0, 0.0, 30.0, 0.0]
    assert series_of("linux", [], T0, T0 + BUCKET_S) is None


SHAPES = {"linux": PoolShape(slots=2, max_hosts=8), "gpu": PoolShape(slots=1)}


def trainer(history, models, fail_for="", sink=None, now=T0 + 14 * DAY + 42, skill=0.5):
    telemetry = Telemetry("trainer", sink=sink) if sink is not None else None
    return Trainer(pools=["linux", "gpu"], history=history, models=models,
                   make_model=lambda q: FlatModel(q, fail_for),
                   skill=lambda series, judged, quantile: skill, shapes=SHAPES, quantile=0.9,
                   weeks=5, clock=lambda: now, telemetry=telemetry)


def test_each_pool_gets_its_model_and_a_forecast_from_the_current_bucket():
    history, models = MemoryHistory(), Models()
    fill(history, "linux", 2)
    fill(history, "gpu", 2, runner_s=300.0)
    result = trainer(history, models).run()
    assert result["failed"] == 0 and [p["status"] for p in result["pools"]] == ["trained"] * 2
    item = history.forecast("linux")
    assert item.start == T0 + 14 * DAY and len(item.upper) == STORED_HORIZON
    assert item.upper[0] == pytest.approx(900.0) and item.quantile == 0.9
    assert item.model_key == model_key("linux", T0 + 14 * DAY + 42)
    assert models.objects[item.model_key] == b"model"
    assert history.forecast("gpu").upper[0] == pytest.approx(450.0)


def test_a_failing_pool_keeps_its_previous_forecast_and_is_counted_the_others_train():
    history, models, sink = MemoryHistory(), Models(), Sink()
    fill(history, "linux", 2)
    fill(history, "gpu", 2)
    previous = ForecastItem("linux", T0, (1.0,) * HORIZON, trained_at=T0)
    history.put_forecast(previous)
    result = trainer(history, models, fail_for="linux", sink=sink).run()
    assert result["failed"] == 1
    (linux,) = [p for p in result["pools"] if p["pool"] == "linux"]
    assert linux["status"] == "failed" and "fit diverged" in linux["error"]
    assert history.forecast("linux") == previous
    assert history.forecast("gpu").trained_at == T0 + 14 * DAY + 42
    counted = {name: blob[name] for blob in sink.blobs for name in
               ("TrainerRuns", "TrainerPoolFailed") if name in blob}
    assert counted == {"TrainerRuns": [1.0], "TrainerPoolFailed": [1.0]}
    assert all(blob.get("service") == "trainer" for blob in sink.blobs)


def test_a_failed_daily_run_leaves_the_previous_runs_second_day_in_force():
    """The item covers 48 h: when the next day's run fails, the floor and warm runners of the
    previous run's second day still apply (and through the next run's own time); two days
    after its run the item is stale."""
    history, now = MemoryHistory(), [T0 + 14 * DAY + 42]
    fill(history, "linux", 14, runner_s=6000.0)
    trainer(history, Models(), skill=SKILL_MIN, now=now[0]).run(["linux"])
    item = history.forecast("linux")
    assert len(item.floor_hosts) == len(item.warm) == STORED_HORIZON
    now[0] += DAY
    result = trainer(history, Models(), fail_for="linux", now=now[0]).run(["linux"])
    assert result["failed"] == 1 and history.forecast("linux") == item
    reader = ForecastReader(history, clock=lambda: now[0])
    assert ForecastFloor(reader, lead_s=180)("linux") == 8  # 25 h after the run: its 2nd day
    assert floor_hosts(item, item.trained_at + 47 * 3600, 180) == 8
    assert floor_hosts(item, item.trained_at + 49 * 3600, 180) == 0  # stale


def test_less_than_a_day_of_history_is_skipped_not_failed():
    history, sink = MemoryHistory(), Sink()
    fill(history, "linux", 0.5)
    result = trainer(history, Models(), sink=sink).run(["linux", "gpu"])
    assert [(p["status"], p["buckets"]) for p in result["pools"]] == [
        ("skipped", DAY_BUCKETS // 2), ("skipped", 0)]
    assert result["failed"] == 0 and history.forecast("linux") is None
    assert not any("TrainerPoolFailed" in blob for blob in sink.blobs)
    assert any(blob.get("TrainerPoolSkipped") == [2.0] for blob in sink.blobs)


def test_events_the_trainer_takes_and_refuses():
    known = ("linux", "gpu")
    assert pools_of({"detail-type": "Scheduled Event", "source": "aws.events"}, known) == known
    assert pools_of({"pools": ["gpu"]}, known) == ("gpu",)
    with pytest.raises(ValueError, match=r"unknown pools \['arm'\]"):
        pools_of({"pools": ["arm"]}, known)
    with pytest.raises(ValueError, match="list of pool names"):
        pools_of({"pools": "gpu"}, known)
    with pytest.raises(ValueError, match="unrecognised trainer event"):
        pools_of({"Records": []}, known)


def test_durations_come_from_the_buckets_and_old_buckets_give_their_mean_per_arrival():
    assert durations_of([Bucket(T0, 2, 90.0, (30.0, 60.0)), Bucket(T0 + BUCKET_S, 0, 0.0),
                         Bucket(T0 + 2 * BUCKET_S, 3, 300.0)]) == [30.0, 60.0, 100.0, 100.0,
                                                                   100.0]


def daily_peak(days: int, seed: int = 3) -> tuple[list[Event], list[float]]:
    """`days` of a workday peak (09:00-11:00 UTC, ~10 jobs a bucket of 2-25 min) over a
    trickle, ending at T0 + 14 days: the events and the jobs' durations."""
    rng, events, durations = random.Random(seed), [], []
    end = T0 + 14 * DAY
    for n in range(days * DAY_BUCKETS):
        bucket = end - days * DAY + n * BUCKET_S
        jobs = rng.randint(7, 13) if 9 * 3600 <= bucket % DAY < 11 * 3600 else rng.randint(0, 1)
        for _ in range(jobs):
            job_id = len(durations) + 1
            duration = float(rng.choice((120, 300, 600, 1500)))
            durations.append(duration)
            events += [Event("linux", bucket, job_id, Kind.ARRIVAL),
                       Event("linux", bucket, job_id, Kind.COMPLETION, duration)]
    return events, durations


class Recorded(Forecaster):
    """The real forecaster, keeping the forecasts it gave (the trainer's, to compare)."""

    def predict(self, start, horizon=HORIZON):
        found = super().predict(start, horizon)
        self.__dict__.setdefault("seen", []).append(found)
        return found


def test_the_stored_floor_is_the_simulators_predictive_floor_for_the_same_forecast():
    """The real forecaster and skill gate on 15 days of a daily peak: the trainer's
    `floor_hosts` equal the plan the simulator's predictive policy builds from that forecast
    (forecast/replay.py: forecast_plan over spread_kernel of the jobs' durations, the day
    before as history, the pool's cap), and the scaler's lookup (ForecastFloor) equals the
    policy's (`Planned.floor_hosts`) at every minute of the day, boot lead included."""
    history, now, lead = MemoryHistory(), T0 + 14 * DAY + 42, 180.0
    events, durations = daily_peak(15)
    history.record(events, now)
    made: list[Recorded] = []
    result = Trainer(pools=["linux"], history=history, models=Models(),
                     make_model=lambda q: made.append(Recorded(quantile=q)) or made[-1],
                     skill=forecast_skill, shapes=SHAPES, clock=lambda: now).run()
    (pool,) = result["pools"]
    item = history.forecast("linux")
    ((forecast,),) = [model.seen for model in made]
    end = T0 + 14 * DAY
    series = series_of("linux", history.buckets("linux", end - 5 * 7 * DAY, end),
                       end - 5 * 7 * DAY, end)
    assert pool["skill"] == forecast_skill(series, end, 0.9)  # deterministic
    assert item.skill == pytest.approx(pool["skill"], abs=1e-3)  # stored rounded
    assert item.skill >= SKILL_MIN and item.no_floor == "" and pool["no_floor"] == ""

    plan = forecast_plan(forecast.start, forecast.upper, forecast.mean,
                         spread_kernel(durations), 2, lead,
                         history=series.runner_s[-DAY_BUCKETS:], max_hosts=8)
    assert item.floor_hosts == plan.hosts and len(plan.hosts) == STORED_HORIZON
    assert pool["peak_floor"] == max(plan.hosts) >= 3  # the peak's ~10 jobs of ~10 min
    # The warm runners too: the plan's, which the warm targets follow.
    assert item.warm == plan.warm and pool["peak_warm"] == max(plan.warm) > 0
    policy = Planned("predictive", plans={"linux": plan})
    clock = [now]
    reader = ForecastReader(history, clock=lambda: clock[0])
    floor, targets = ForecastFloor(reader, lead_s=lead), WarmTargets(reader)
    pool_cfg = Pool.model_validate({"name": "linux", "labels": ["linux"], "image": "img",
                                    "scope": {"owner": "acme"}, "max_runners": 16})
    for minute in range(-10, 24 * 60 + 10):
        clock[0] = end + minute * 60.0
        assert floor("linux") == policy.floor_hosts("linux", clock[0]), minute
        # The executor's and the scaler's target is the simulator's (a file asking none).
        assert targets.target(pool_cfg, clock[0]) == warm_targets.wanted(
            pool_cfg, clock[0], policy.warm("linux", clock[0])), minute
    # An hourly cost cap caps the lookup as the simulator's cap caps the plan.
    peak_at = end + plan.hosts.index(max(plan.hosts)) * BUCKET_S
    assert floor_hosts(item, peak_at, lead, max_hosts=2) == 2


def test_a_pool_failing_the_skill_gate_gets_no_floor_with_its_reason_counted():
    history, sink = MemoryHistory(), Sink()
    fill(history, "linux", 9)
    fill(history, "gpu", 2)
    result = trainer(history, Models(), sink=sink, skill=SKILL_MIN - 0.01).run()
    linux, gpu = result["pools"]
    assert linux["status"] == gpu["status"] == "trained" and result["failed"] == 0
    item = history.forecast("linux")
    assert item.floor_hosts == (0,) * STORED_HORIZON and max(item.upper) > 0
    assert item.no_floor == linux["no_floor"] and "skill 0.190 < 0.2" in item.no_floor
    # Under 8 days the gate cannot judge: no floor either, said so.
    assert "the skill gate needs" in gpu["no_floor"] and gpu["skill"] is None
    assert history.forecast("gpu").floor_hosts == (0,) * STORED_HORIZON
    assert floor_hosts(item, item.start + 600, 180) == 0
    assert any(blob.get("TrainerPoolNoFloor") == [2.0] for blob in sink.blobs)


def test_a_pool_passing_the_gate_gets_the_flat_forecasts_floor_within_its_cap():
    history = MemoryHistory()
    # One 50-min job a bucket: 10 (20) runners busy; the flat model's upper is 1.5 times.
    fill(history, "linux", 9, runner_s=6000.0)  # 30 runners on 2-slot hosts: 15, capped at 8
    fill(history, "gpu", 9, runner_s=3000.0)  # 1-slot hosts, no cap
    trainer(history, Models(), skill=SKILL_MIN).run()
    assert set(history.forecast("linux").floor_hosts) == {8}
    gpu = history.forecast("gpu").floor_hosts
    # The day before's jobs (10 busy) hand over to the forecast's 15 as they end.
    assert gpu[0] == 11 and gpu[9:] == (15,) * (STORED_HORIZON - 9) and sorted(gpu) == list(gpu)


def test_pool_slots_are_read_as_the_scaler_reads_them():
    assert parse_pool_slots(" gpu=1, linux-large=8 ,") == {"gpu": 1, "linux-large": 8}
    with pytest.raises(ValueError, match="'gpu' is not pool=slots"):
        parse_pool_slots("gpu")
    with pytest.raises(ValueError, match="is not pool=slots"):
        parse_pool_slots("gpu=0")
    with pytest.raises(ValueError, match="pool gpu given twice"):
        parse_pool_slots("gpu=1,gpu=2")
    with pytest.raises(ValueError, match="slots must be >= 1"):
        PoolShape(slots=0)
