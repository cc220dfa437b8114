"""The trainer Lambda (daily, infra/runnerhub_infra/trainer.py): per pool, read the last weeks of
demand history (chalicelib/history.py), fit the forecaster (forecast/model.py), write the model
to S3 and the forecast item the scaler reads (`forecast#<pool>` in the history table).

The item carries the floor in hosts per bucket (`floor_hosts`) and the warm runners per bucket
(`warm`: the executors' and the scaler's warm targets follow it, chalicelib/warm_targets.py),
computed here with the simulator's predictive policy's own code (`floor_of`:
forecast/policies.py `forecast_plan` over `spread_kernel` of the pool's job durations, gated
by forecast/replay.py `forecast_skill`), so the scaler and the executors apply what
`make replay` judged; they only look it up. A pool whose
forecast fails the skill gate (or has too little history to be judged: 8 days) gets an item
whose floor and warm runners are 0 throughout, the reason in `no_floor`, counted
(`TrainerPoolNoFloor`). An hourly cost cap (the scaler's variables) caps the plan's hosts, so
the warm runners planned on them too, as `make replay`'s `cost_cap_per_hour` does.

A pool whose training fails (history unreadable, a fit that raises, a write refused) keeps its
previous forecast in force (the item is written last, only after a good fit and the model's
write) and is counted (`TrainerPoolFailed`, the `TrainerPoolsFailing` alarm); the other pools
train on. A pool with less than a day of history is skipped and counted apart: no forecast yet
is the normal state of a new pool, not a failure. A run that crashes or times out is Lambda's
`Errors` (the `TrainerFailing` alarm); no run for two days is `TrainerMissing`.

    handler(event, context)              # the Lambda entry (a schedule, or {"pools": [...]})
    python -m forecast.trainer [--pool NAME ...]   # the same run, from a shell
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chalicelib.history import BUCKET_S, Bucket, ForecastItem, HistoryStore, bucket_of
from chalicelib.resources import HISTORY_TABLE
from chalicelib.telemetry import Telemetry
from forecast.policies import forecast_plan, spread_kernel
from forecast.replay import SKILL_MIN
from forecast.traces import DAY_BUCKETS, HORIZON, WEEK_BUCKETS, Series

logger = logging.getLogger("runnerhub.trainer")
TRAINER = "trainer"  # the deployable (chalicelib.aws.TRAINER; EMF `service`)
WEEK_S = WEEK_BUCKETS * BUCKET_S
MODEL_PREFIX = "models/"
# The item covers 48 h from its run: the next daily run replaces it after 24 h, and a run that
# fails leaves the previous one's second day in force (until FORECAST_STALE_S), so a failed run
# never drops the floor and the forecast's warm runners, nor does the next run's own time.
STORED_HORIZON = 2 * HORIZON


def parse_pool_slots(value: str) -> dict[str, int]:
    """RUNNERHUB_SCALER_POOL_SLOTS as the scaler reads it (chalicelib/scaler/settings.py), not
    imported from there: that module pulls the GitHub client (PyJWT), which the trainer's
    package does not carry. `pool=slots` pairs, comma-separated; a ValueError otherwise."""
    found: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        pool, sep, slots = (x.strip() for x in part.partition("="))
        if not sep or not pool or not slots.isdigit() or not 1 <= int(slots) <= 256:
            raise ValueError(f"scaler_pool_slots: {part!r} is not pool=slots (slots 1-256)")
        if pool in found:
            raise ValueError(f"scaler_pool_slots: pool {pool} given twice")
        found[pool] = int(slots)
    return found


class TrainerSettings(BaseSettings):
    """RUNNERHUB_* variables, set by infra/ (names as the other deployables')."""

    model_config = SettingsConfigDict(env_prefix="RUNNERHUB_", frozen=True, extra="ignore")

    pools_file: Path | None = None
    history_table: str = HISTORY_TABLE.default_name
    models_bucket: str = Field(..., min_length=3, max_length=63)
    trainer_pools: str = ""  # comma-separated; default: every pool of the pools file
    trainer_quantile: float = Field(0.9, gt=0, lt=1)
    trainer_weeks: int = Field(5, ge=1, le=6)  # the history keeps 6 weeks (HISTORY_TTL_S)
    # A host's runner slots, as the scaler's (the same variables): the floor is in hosts.
    slots: int = Field(4, ge=1, le=256)
    scaler_pool_slots: str = ""
    # The scaler's hourly cost cap (the same variables): the plan's hosts never cost more.
    scaler_forecast_hourly_cap: float = Field(0.0, ge=0)
    scaler_host_hourly_cost: float = Field(0.0, ge=0)
    # Warm runners on this share of the floor's slots above the mean forecast (0: none; the
    # simulator's predictive policy's `warm_share`).
    trainer_warm_share: float = Field(1.0, ge=0, le=1)
    emit_metrics: bool = True

    @field_validator("scaler_pool_slots")
    @classmethod
    def _pool_slots(cls, value: str) -> str:
        parse_pool_slots(value)
        return value

    def cost_cap_hosts(self) -> int | None:
        from chalicelib.history import cost_cap_hosts

        return cost_cap_hosts(self.scaler_forecast_hourly_cap, self.scaler_host_hourly_cost)


class Models(Protocol):
    def put(self, key: str, blob: bytes) -> None: ...


class S3Models:
    """Where the fitted models go (one object per pool and day: the forecast item names it)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    def put(self, key: str, blob: bytes) -> None:
        from chalicelib.errors import outage_as

        with outage_as("s3"):
            self._client.put_object(Bucket=self._bucket, Key=key, Body=blob,
                                    ContentType="application/octet-stream")


class Model(Protocol):
    def fit(self, series: Series) -> Model: ...

    def predict(self, start: float, horizon: int = HORIZON) -> Any: ...

    def dumps(self) -> bytes: ...


# skill(series, judged, quantile): forecast/replay.py `forecast_skill` (injected: tests fake it).
Skill = Callable[[Series, float, float], float]
# forecast_skill validates on the last week with a model fitted on the weeks before it.
SKILL_BUCKETS = WEEK_BUCKETS + DAY_BUCKETS


@dataclass(frozen=True)
class PoolShape:
    """What a pool's floor is counted in: a host's runner slots (the scaler's), the most
    hosts its `max_runners` fill or an hourly cost cap pays for (as the simulator caps its
    plans), and the share of spare planned slots kept warm."""

    slots: int
    max_hosts: int | None = None
    warm_share: float = 1.0

    def __post_init__(self) -> None:
        if self.slots < 1 or (self.max_hosts is not None and self.max_hosts < 0):
            raise ValueError("a pool's slots must be >= 1 and its max hosts >= 0")
        if not 0 <= self.warm_share <= 1:
            raise ValueError("a pool's warm share is within [0, 1]")


@dataclass(frozen=True)
class PoolTraining:
    pool: str
    status: str  # trained, skipped (too little history), failed
    buckets: int = 0  # buckets of history the fit saw
    model_key: str = ""
    error: str = ""
    peak_upper: float = 0.0  # the forecast's highest upper value (runner-seconds a bucket)
    skill: float | None = None  # forecast_skill on the last week (None: not enough history)
    peak_floor: int = 0  # the floor's most hosts
    peak_warm: int = 0  # the most warm runners planned
    no_floor: str = ""  # why the pool gets no floor (the skill gate), or ""


def durations_of(buckets: Iterable[Bucket]) -> list[float]:
    """The pool's job durations (the spread kernel's input). A bucket written before the
    history kept durations gives its mean duration once per arrival. Pure."""
    found: list[float] = []
    for bucket in buckets:
        if bucket.durations:
            found += bucket.durations
        elif bucket.runner_s > 0:
            count = max(bucket.arrivals, 1)
            found += [bucket.runner_s / count] * count
    return found


@dataclass(frozen=True)
class FloorPlan:
    hosts: tuple[int, ...]  # floor hosts per bucket
    warm: tuple[int, ...]  # warm runners per bucket
    no_floor: str = ""  # why both are 0 throughout (the skill gate), or ""


def floor_of(forecast: Any, series: Series, durations: Sequence[float], shape: PoolShape,
             skill: float | None) -> FloorPlan:
    """The floor in hosts and the warm runners per bucket of the forecast, exactly as the
    simulator's predictive policy plans them (forecast/replay.py `replay_jobs`):
    `forecast_plan` of the forecast's upper and mean, spread by the pool's durations, with the
    day of history before it (its jobs still run), capped at the pool's hosts; and its gate: a
    skill below SKILL_MIN (or none: too little history to judge) is neither, with the reason.
    The boot lead is the scaler's, applied where it looks the floor up (chalicelib/history.py
    `floor_hosts`)."""
    zero = (0,) * len(forecast.upper)
    if skill is None:
        return FloorPlan(zero, zero, f"{len(series)} buckets of history: the skill gate needs "
                                     f"{SKILL_BUCKETS} (8 days)")
    if skill < SKILL_MIN:
        return FloorPlan(zero, zero,
                         f"skill {skill:.3f} < {SKILL_MIN} (no better than a flat forecast)")
    plan = forecast_plan(forecast.start, forecast.upper, forecast.mean,
                         spread_kernel(durations), shape.slots, 0.0,
                         history=series.runner_s[-HORIZON:], max_hosts=shape.max_hosts,
                         warm_share=shape.warm_share)
    return FloorPlan(plan.hosts, plan.warm)


def series_of(pool: str, buckets: Iterable[Bucket], start: int, end: int) -> Series | None:
    """The pool's history as a Series over [first recorded bucket, end), absent buckets as
    zero demand (no job arrived in them); None when nothing was recorded. The weeks before
    the first recorded bucket are left out: the history had not begun (a new pool, a new
    deployment), which is not the same as no demand. Pure."""
    found = {b.bucket: b for b in buckets if start <= b.bucket < end}
    if not found:
        return None
    first = min(found)
    count = (end - first) // BUCKET_S
    arrivals = [0] * count
    runner_s = [0.0] * count
    for bucket, item in found.items():
        index = (bucket - first) // BUCKET_S
        arrivals[index] = item.arrivals
        runner_s[index] = item.runner_s
    return Series(pool, float(first), arrivals, runner_s)


def model_key(pool: str, trained_at: float) -> str:
    day = datetime.fromtimestamp(trained_at, UTC).strftime("%Y-%m-%dT%H%M%SZ")
    return f"{MODEL_PREFIX}{pool}/{day}.joblib"


class Trainer:
    def __init__(self, *, pools: Sequence[str], history: HistoryStore, models: Models,
                 make_model: Callable[[float], Model], skill: Skill,
                 shapes: Mapping[str, PoolShape], quantile: float = 0.9, weeks: int = 5,
                 clock: Callable[[], float] = time.time,
                 telemetry: Telemetry | None = None) -> None:
        self.pools = tuple(pools)
        self._skill = skill
        self._shapes = dict(shapes)
        self._history = history
        self._models = models
        self._make_model = make_model
        self._quantile = quantile
        self._weeks = weeks
        self._clock = clock
        self._telemetry = telemetry

    def run(self, pools: Iterable[str] | None = None) -> dict[str, Any]:
        now = self._clock()
        end = bucket_of(now)  # the current bucket is incomplete: the forecast starts there
        results = [self.train(pool, now, end) for pool in (pools or self.pools)]
        telemetry = self._telemetry
        if telemetry is not None:
            telemetry.count("TrainerRuns")
            for result in results:
                if result.status == "failed":
                    telemetry.count("TrainerPoolFailed")
                elif result.status == "skipped":
                    telemetry.count("TrainerPoolSkipped")
                elif result.no_floor:
                    telemetry.count("TrainerPoolNoFloor")
            telemetry.flush()
        return {"trained_at": now, "pools": [asdict(r) for r in results],
                "failed": sum(r.status == "failed" for r in results)}

    def train(self, pool: str, now: float, end: int) -> PoolTraining:
        log = {"pool": pool}
        try:
            start = end - self._weeks * WEEK_S
            shape = self._shapes[pool]
            buckets = self._history.buckets(pool, start, end)
            series = series_of(pool, buckets, start, end)
            if series is None or len(series) < DAY_BUCKETS:
                seen = 0 if series is None else len(series)
                logger.info("pool %s: %d buckets of history, a day (%d) needed: no forecast "
                            "yet", pool, seen, DAY_BUCKETS, extra=log)
                return PoolTraining(pool, "skipped", seen)
            model = self._make_model(self._quantile).fit(series)
            forecast = model.predict(float(end), STORED_HORIZON)
            skill = (self._skill(series, float(end), self._quantile)
                     if len(series) >= SKILL_BUCKETS else None)
            planned = floor_of(forecast, series, durations_of(buckets), shape, skill)
            floor, no_floor = planned.hosts, planned.no_floor
            key = model_key(pool, now)
            # The model first: the forecast item names it, and is written only once both exist.
            self._models.put(key, model.dumps())
            item = ForecastItem(pool=pool, start=float(forecast.start),
                                upper=tuple(float(v) for v in forecast.upper), trained_at=now,
                                quantile=self._quantile, model_key=key, floor_hosts=floor,
                                skill=skill, no_floor=no_floor, warm=planned.warm)
            self._history.put_forecast(item)
        except Exception as exc:  # one pool's failure never stops the others
            # Expected ones (an outage) and bugs alike keep the previous forecast: logged with
            # the stack, counted for the alarm.
            logger.exception("pool %s: training failed, the previous forecast stays", pool,
                             extra=log)
            return PoolTraining(pool, "failed", error=f"{type(exc).__name__}: {exc}")
        if no_floor:
            logger.warning("pool %s: forecast written, no floor: %s", pool, no_floor, extra=log)
        else:
            logger.info("pool %s: forecast written (%d buckets of history, floor up to %d "
                        "hosts, up to %d warm runners)", pool, len(series), max(floor),
                        max(planned.warm), extra=log)
        return PoolTraining(pool, "trained", len(series), key, peak_upper=max(item.upper),
                            skill=skill, peak_floor=max(floor), no_floor=no_floor,
                            peak_warm=max(planned.warm))


_lock = threading.Lock()
_trainer: Trainer | None = None


def build(settings: TrainerSettings, clock: Callable[[], float] = time.time) -> Trainer:
    from chalicelib import aws
    from chalicelib.errors import ConfigurationError
    from chalicelib.history import DynamoHistory
    from chalicelib.pools import load_pools
    from forecast.model import Forecaster
    from forecast.replay import forecast_skill

    config = load_pools(settings.pools_file)
    names = [n.strip() for n in settings.trainer_pools.split(",") if n.strip()] or list(
        config.names)
    unknown = sorted(set(names) - set(config.names))
    if unknown:
        raise ConfigurationError(f"unknown pools {', '.join(unknown)} (file has {config.names})")
    pool_slots = parse_pool_slots(settings.scaler_pool_slots)
    unknown = sorted(set(pool_slots) - set(config.names))
    if unknown:
        raise ConfigurationError(f"RUNNERHUB_SCALER_POOL_SLOTS names unknown pools "
                                 f"{', '.join(unknown)} (file has {config.names})")
    shapes = {}
    capped = settings.cost_cap_hosts()
    for name in names:
        slots = pool_slots.get(name, settings.slots)
        most = math.ceil(config.by_name(name).max_runners / slots)
        shapes[name] = PoolShape(slots, most if capped is None else min(most, capped),
                                 settings.trainer_warm_share)
    return Trainer(
        pools=names,
        history=DynamoHistory(aws.client("dynamodb", TRAINER), settings.history_table),
        models=S3Models(aws.client("s3", TRAINER), settings.models_bucket),
        make_model=lambda quantile: Forecaster(quantile=quantile), skill=forecast_skill,
        shapes=shapes,
        quantile=settings.trainer_quantile, weeks=settings.trainer_weeks, clock=clock,
        telemetry=Telemetry(TRAINER, emit=settings.emit_metrics),
    )


def trainer() -> Trainer:
    global _trainer
    if _trainer is None:
        with _lock:
            if _trainer is None:
                _trainer = build(TrainerSettings())
    return _trainer


def use(instance: Trainer | None) -> None:
    """Replace (or with None, forget) the trainer: tests wire their own."""
    global _trainer
    _trainer = instance


def pools_of(event: Mapping[str, Any], known: Sequence[str]) -> tuple[str, ...]:
    """The pools an event asks to train: a schedule, every pool; {"pools": [...]}, those."""
    if not isinstance(event, Mapping):
        raise ValueError(f"a trainer event is a JSON object, not {type(event).__name__}")
    if "pools" in event:
        asked = event["pools"]
        if not isinstance(asked, list) or not all(isinstance(p, str) for p in asked):
            raise ValueError('"pools" must be a list of pool names')
        unknown = sorted(set(asked) - set(known))
        if unknown:
            raise ValueError(f"unknown pools {unknown} (pools: {list(known)})")
        return tuple(pool for pool in known if pool in asked)
    if event.get("detail-type") == "Scheduled Event" or event.get("source") == "aws.events":
        return tuple(known)
    raise ValueError("unrecognised trainer event: expected a schedule (EventBridge) or "
                     f'{{"pools": [...]}}, got keys {sorted(event)}')


def handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda entry: one training run (see the module docstring)."""
    instance = trainer()
    return instance.run(pools_of(event, instance.pools))


def main(argv: list[str] | None = None) -> int:
    from chalicelib.errors import ConfigurationError, DependencyUnavailable, startup_failure

    parser = argparse.ArgumentParser(description="Train each pool's forecast once.")
    parser.add_argument("--pool", action="append", help="a pool (default: every pool)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        instance = build(TrainerSettings(emit_metrics=False))
    except (ConfigurationError, ValueError, DependencyUnavailable) as exc:
        # pydantic's ValidationError is a ValueError: every bad setting lands here.
        return startup_failure("trainer", exc)
    result = instance.run(pools_of({"pools": args.pool}, instance.pools) if args.pool
                          else None)
    print(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
