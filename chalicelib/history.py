"""Per-pool demand history in 5-minute buckets, and the trained forecast the scaler reads.

Written off the webhook's path: the scaler's handler turns each batch of the jobs table's
stream into history events (`events_of`, pure) and records them (`HistoryStore.record`):
- a job's first `received` image (demand generation 1: a re-demand is not a new arrival) adds
  one arrival to the bucket of its `received_at`;
- its `completed` image adds its runner-seconds (`completed_at - in_progress_at`) to the same
  bucket (the bucket of its arrival, as `forecast.traces.buckets` does: a job's demand is
  dated by its arrival), and appends them to the bucket's `durations` (the trainer's spread of
  a bucket's demand over the following buckets needs the pool's job durations).
A stream delivers a record at least once and a job's record changes more than once in one
state, so each item keeps the ids it counted (`arrived`, `completed`: number sets) and each
add is conditioned on its id being absent: a retried batch counts nothing twice.

Items: `pool` (S), `bucket` (N, epoch seconds, a multiple of BUCKET_S), `arrivals` (N),
`runner_s` (N), `durations` (L of N), the id sets, `expires_at` (TTL: HISTORY_TTL_S after the
bucket, independent of the jobs' own TTL). The trainer (forecast/trainer.py) writes each pool's
forecast to the same table under `forecast#<pool>` (bucket 0): `start`, `upper` (runner-seconds
per bucket, 48 h of them: forecast/trainer.py STORED_HORIZON), `floor_hosts` (hosts per
bucket: the simulator's predictive policy's floor, computed by the trainer with
forecast/policies.py; all 0 when the pool failed the skill gate, `no_floor` saying why),
`warm` (warm runners per bucket, the same policy's: the floor's slots above the mean
forecast), `skill`, `trained_at`, `quantile`, `model_key`.
The scaler only looks `floor_hosts` up (`floor_hosts()`), and the warm targets `warm`
(`forecast_warm()`, chalicelib/warm_targets.py); an item without them (written before the
trainer computed them) is no floor and no warm runners.

No numpy, no scikit-learn here: this module is on the scaler's path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from chalicelib import dynamodb
from chalicelib.cache import PerKey
from chalicelib.dynamodb import from_item, to_attribute, to_item
from chalicelib.resources import HISTORY_BUCKET_S, HISTORY_TTL_S

BUCKET_S = HISTORY_BUCKET_S
# The job states whose images add to the history (the scaler's stream filter lets them through).
HISTORY_STATES = ("received", "completed")
FORECAST_PREFIX = "forecast#"
FORECAST_BUCKET = 0
# Ids one conditional UpdateItem adds at most (its condition names each: DynamoDB's
# expressions are limited to 4 KB).
IDS_PER_WRITE = 40
# A forecast older than this is not applied (the trainer runs daily: two missed runs).
FORECAST_STALE_S = 48 * 3600
# How far ahead the floor is looked up: a host's boot and its daemon's start. The scaler's
# default (RUNNERHUB_SCALER_FORECAST_LEAD_S) and the simulator's predictive plan (make replay,
# make bench-scaling) both use it, so the judged floor is the applied one.
FORECAST_LEAD_S = 180.0


class Kind(StrEnum):
    ARRIVAL = "arrival"
    COMPLETION = "completion"


@dataclass(frozen=True)
class Event:
    """One job's contribution to its pool's bucket."""

    pool: str
    bucket: int
    job_id: int
    kind: Kind
    runner_s: float = 0.0


@dataclass
class Tally:
    """What `record` did with a batch's events."""

    written: int = 0
    duplicates: int = 0  # already counted (a retried batch, a second image in one state)


@dataclass(frozen=True)
class Bucket:
    bucket: int
    arrivals: int
    runner_s: float
    durations: tuple[float, ...] = ()  # of the jobs completed (the runner-seconds' parts)


@dataclass(frozen=True)
class ForecastItem:
    """A pool's trained forecast: upper-quantile runner-seconds per bucket from `start`, and
    the floor in hosts per bucket the trainer derived from it and the warm runners per bucket
    (empty: an item from before the trainer computed them; all 0 with `no_floor` set: the pool
    failed the skill gate)."""

    pool: str
    start: float
    upper: tuple[float, ...]
    trained_at: float
    quantile: float = 0.9
    model_key: str = ""
    floor_hosts: tuple[int, ...] = ()
    skill: float | None = None
    no_floor: str = ""  # why the floor is 0 throughout (the skill gate), or ""
    warm: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.start % BUCKET_S:
            raise ValueError(f"forecast start {self.start} is not a multiple of {BUCKET_S} s")
        if not self.upper or any(not math.isfinite(v) or v < 0 for v in self.upper):
            raise ValueError("a forecast's upper values are finite runner-seconds, >= 0")
        for name in ("floor_hosts", "warm"):
            values = getattr(self, name)
            if values and len(values) != len(self.upper):
                raise ValueError(f"a forecast's {name} ({len(values)}) and upper "
                                 f"({len(self.upper)}) differ in length")
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
                raise ValueError(f"a forecast's {name} are whole numbers, >= 0")


def bucket_of(at: float) -> int:
    return int(at // BUCKET_S) * BUCKET_S


def _number(image: Mapping[str, Any], name: str) -> float | None:
    raw = (image.get(name) or {}).get("N")
    return float(raw) if raw is not None else None


def events_of(event: Mapping[str, Any]) -> tuple[list[Event], int]:
    """The history events of a stream batch, and how many records looked like history but
    could not be used (logged by the caller, never a crash): a job with no pool, a completion
    with no arrival or no start (a job cancelled before any runner took it demanded no
    runner-seconds: not counted as unusable). Pure."""
    found: list[Event] = []
    unusable = 0
    for record in event.get("Records") or ():
        image = (record.get("dynamodb") or {}).get("NewImage") or {}
        state = (image.get("state") or {}).get("S")
        if state not in HISTORY_STATES:
            continue
        pool = (image.get("pool") or {}).get("S")
        raw_id = (image.get("job_id") or {}).get("N")
        received = _number(image, "received_at")
        if not pool or raw_id is None:
            unusable += 1
            continue
        job_id = int(raw_id)
        if state == "received":
            if _number(image, "demand_generation") != 1 or received is None:
                continue  # a re-demand (generation 2 and up): the same arrival
            found.append(Event(pool, bucket_of(received), job_id, Kind.ARRIVAL))
            continue
        started, completed = _number(image, "in_progress_at"), _number(image, "completed_at")
        if started is None:
            continue  # never ran
        if received is None or completed is None or completed < started:
            unusable += 1
            continue
        found.append(Event(pool, bucket_of(received), job_id, Kind.COMPLETION,
                           round(completed - started, 3)))
    return found, unusable


def floor_hosts(item: ForecastItem | None, now: float, lead_s: float,
                max_hosts: int | None = None, stale_s: float = FORECAST_STALE_S) -> int:
    """The trainer's floor (`item.floor_hosts`) now and one boot time (`lead_s`) ahead, the
    larger (hosts launched now serve a boot later; those up serve now): the lookup of the
    simulator's predictive policy (forecast/policies.py `Plan.hosts_at`), whose floor the
    trainer stored; at most `max_hosts` (an hourly cost cap's hosts). 0 without a forecast,
    with a stale one, with one from before the trainer stored floors (no `floor_hosts`), or
    beyond its horizon (the scaler is then reactive alone). Pure."""
    if item is None or not item.floor_hosts or now - item.trained_at > stale_s:
        return 0
    found = []
    for at in (now, now + lead_s):
        index = math.floor((at - item.start) / BUCKET_S)
        if 0 <= index < len(item.floor_hosts):
            found.append(item.floor_hosts[index])
    hosts = max(found, default=0)
    return min(hosts, max_hosts) if max_hosts is not None else hosts


def forecast_warm(item: ForecastItem | None, now: float,
                  stale_s: float = FORECAST_STALE_S) -> int:
    """The trainer's warm runners for the bucket holding `now` (no lead: a warm runner starts
    in a runner's start-up, and one kept early is paid for): the simulator's predictive
    policy's lookup (forecast/policies.py `Plan.warm_at`). 0 without a forecast, with a stale
    one, one without warm runners, or beyond its horizon. Pure."""
    if item is None or not item.warm or now - item.trained_at > stale_s:
        return 0
    index = math.floor((now - item.start) / BUCKET_S)
    return item.warm[index] if 0 <= index < len(item.warm) else 0


def cost_cap_hosts(hourly_cap: float, host_hourly_cost: float) -> int | None:
    """Hosts an hourly cost cap allows (None: no cap)."""
    if hourly_cap <= 0:
        return None
    if host_hourly_cost <= 0:
        raise ValueError("a cost cap needs the host's hourly cost (> 0)")
    return int(hourly_cap // host_hourly_cost)


class HistoryStore(Protocol):
    def record(self, events: Iterable[Event], now: float) -> Tally: ...

    def buckets(self, pool: str, start: int, end: int) -> list[Bucket]:
        """The pool's buckets in [start, end), in order (absent buckets: no demand)."""

    def put_forecast(self, item: ForecastItem) -> None: ...

    def forecast(self, pool: str) -> ForecastItem | None: ...


def _groups(events: Iterable[Event]) -> dict[tuple[str, int, Kind], list[Event]]:
    groups: dict[tuple[str, int, Kind], dict[int, Event]] = {}
    for event in events:
        groups.setdefault((event.pool, event.bucket, event.kind), {})[event.job_id] = event
    return {key: list(found.values()) for key, found in groups.items()}


def _forecast_of(pool: str, record: Mapping[str, Any] | None) -> ForecastItem | None:
    if not record:
        return None
    skill = record.get("skill")
    return ForecastItem(pool=pool, start=float(record["start"]),
                        upper=tuple(float(v) for v in record["upper"]),
                        trained_at=float(record["trained_at"]),
                        quantile=float(record.get("quantile", 0.9)),
                        model_key=str(record.get("model_key", "")),
                        floor_hosts=tuple(_whole(v) for v in record.get("floor_hosts") or ()),
                        skill=None if skill is None else float(skill),
                        no_floor=str(record.get("no_floor", "")),
                        warm=tuple(_whole(v) for v in record.get("warm") or ()))


def _whole(value: Any) -> int:
    """A stored host count (DynamoDB gives numbers back as Decimal): whole, or a ValueError."""
    if int(value) != value:
        raise ValueError(f"a forecast holds {value} hosts or runners, not a whole number")
    return int(value)


def _record_of(item: ForecastItem) -> dict[str, Any]:
    record: dict[str, Any] = {
        "pool": FORECAST_PREFIX + item.pool, "bucket": FORECAST_BUCKET, "start": item.start,
        "upper": [round(v, 3) for v in item.upper], "floor_hosts": list(item.floor_hosts),
        "warm": list(item.warm),
        "trained_at": item.trained_at, "quantile": item.quantile,
        "model_key": item.model_key, "no_floor": item.no_floor}
    if item.skill is not None:
        record["skill"] = round(item.skill, 3)
    return record


@dataclass
class MemoryHistory:
    """In-memory history with the same idempotence (tests, the simulator)."""

    items: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def record(self, events: Iterable[Event], now: float) -> Tally:
        tally = Tally()
        for event in events:
            item = self.items.setdefault((event.pool, event.bucket),
                                         {"arrivals": 0, "runner_s": 0.0, "arrived": set(),
                                          "completed": set(), "durations": []})
            ids = item["arrived" if event.kind is Kind.ARRIVAL else "completed"]
            if event.job_id in ids:
                tally.duplicates += 1
                continue
            ids.add(event.job_id)
            if event.kind is Kind.ARRIVAL:
                item["arrivals"] += 1
            else:
                item["runner_s"] += event.runner_s
                item["durations"].append(event.runner_s)
            tally.written += 1
        return tally

    def buckets(self, pool: str, start: int, end: int) -> list[Bucket]:
        return [Bucket(bucket, item["arrivals"], item["runner_s"], tuple(item["durations"]))
                for (name, bucket), item in sorted(self.items.items())
                if name == pool and start <= bucket < end]

    def put_forecast(self, item: ForecastItem) -> None:
        self.items[(FORECAST_PREFIX + item.pool, FORECAST_BUCKET)] = _record_of(item)

    def forecast(self, pool: str) -> ForecastItem | None:
        return _forecast_of(pool, self.items.get((FORECAST_PREFIX + pool, FORECAST_BUCKET)))


class DynamoHistory:
    """The history table (chalicelib.resources.HISTORY_TABLE)."""

    def __init__(self, client: Any, table: str) -> None:
        self._client = client
        self._table = table

    def record(self, events: Iterable[Event], now: float) -> Tally:
        """One conditional UpdateItem per (pool, bucket, kind) and up to IDS_PER_WRITE jobs;
        when its condition fails (one of them was counted already), one per job. An outage is
        DependencyUnavailable (what was written before it stays written)."""
        tally = Tally()
        for key, found in _groups(events).items():
            for start in range(0, len(found), IDS_PER_WRITE):
                chunk = found[start:start + IDS_PER_WRITE]
                if self._add(key, chunk):
                    tally.written += len(chunk)
                elif len(chunk) == 1:
                    tally.duplicates += 1
                else:  # one of them was counted: each on its own
                    for event in chunk:
                        if self._add(key, [event]):
                            tally.written += 1
                        else:
                            tally.duplicates += 1
        return tally

    def _add(self, key: tuple[str, int, Kind], events: Sequence[Event]) -> bool:
        pool, bucket, kind = key
        arrival = kind is Kind.ARRIVAL
        names = {"#ids": "arrived" if arrival else "completed",
                 "#count": "arrivals" if arrival else "runner_s", "#exp": "expires_at"}
        amount: float | int = len(events) if arrival else sum(e.runner_s for e in events)
        values: dict[str, Any] = {
            ":ids": {"NS": [str(e.job_id) for e in events]},
            ":n": to_attribute(amount),
            ":exp": to_attribute(bucket + HISTORY_TTL_S),
        }
        update = "ADD #count :n, #ids :ids SET #exp = :exp"
        if not arrival:  # the durations, under the same condition: appended once
            names["#durs"] = "durations"
            values[":durs"] = {"L": [to_attribute(e.runner_s) for e in events]}
            values[":none"] = {"L": []}
            update += ", #durs = list_append(if_not_exists(#durs, :none), :durs)"
        conditions = []
        for index, event in enumerate(events):
            values[f":i{index}"] = {"N": str(event.job_id)}
            conditions.append(f"NOT contains(#ids, :i{index})")
        return dynamodb.conditional(
            self._client.update_item, TableName=self._table,
            Key={"pool": {"S": pool}, "bucket": {"N": str(bucket)}},
            UpdateExpression=update,
            ConditionExpression=" AND ".join(conditions),
            ExpressionAttributeNames=names, ExpressionAttributeValues=values,
        ) is not None

    def buckets(self, pool: str, start: int, end: int) -> list[Bucket]:
        """The pool's buckets, without their id sets (a smaller read)."""
        records = dynamodb.query(
            self._client, TableName=self._table,
            KeyConditionExpression="#pool = :pool AND #bucket BETWEEN :start AND :last",
            ProjectionExpression="#bucket, arrivals, runner_s, durations",
            ExpressionAttributeNames={"#pool": "pool", "#bucket": "bucket"},
            ExpressionAttributeValues={":pool": {"S": pool}, ":start": {"N": str(start)},
                                       ":last": {"N": str(end - 1)}})
        return [Bucket(int(r["bucket"]), int(r.get("arrivals", 0)),
                       float(r.get("runner_s", 0.0)),
                       tuple(float(d) for d in r.get("durations") or ())) for r in records]

    def put_forecast(self, item: ForecastItem) -> None:
        dynamodb.write(self._client.put_item, TableName=self._table,
                       Item=to_item(_record_of(item)))

    def forecast(self, pool: str) -> ForecastItem | None:
        """The pool's forecast (an eventually consistent read: a day-old forecast does not
        need the last second's)."""
        with dynamodb.unavailable():
            item = self._client.get_item(
                TableName=self._table,
                Key={"pool": {"S": FORECAST_PREFIX + pool},
                     "bucket": {"N": str(FORECAST_BUCKET)}}).get("Item")
        return _forecast_of(pool, from_item(item) if item else None)


class ForecastReader(PerKey[ForecastItem]):
    """Each pool's forecast item, read at most once per `refresh_s` (the trainer writes once
    a day); a failed read keeps the last item read (or none: no floor, no warm runners), so a
    forecast never stops a scaler run or an executor's tick. Shared by the scaler's floor
    (`ForecastFloor`) and the warm targets (chalicelib/warm_targets.py)."""

    def __init__(self, store: HistoryStore, *, refresh_s: float = 300.0,
                 clock: Callable[[], float] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        super().__init__(store.forecast, refresh_s=refresh_s, clock=clock, on_error=on_error)

    def item(self, pool: str) -> ForecastItem | None:
        return self.get(pool)


class ForecastFloor:
    """The scaler's `forecast` callable: hosts per pool, the trainer's `floor_hosts` looked up
    now and `lead_s` ahead (`floor_hosts()`), through a `ForecastReader`."""

    def __init__(self, reader: ForecastReader, *, lead_s: float,
                 max_hosts: int | None = None) -> None:
        self.reader = reader
        self._lead_s = lead_s
        self._max_hosts = max_hosts

    def item(self, pool: str) -> ForecastItem | None:
        return self.reader.item(pool)

    def __call__(self, pool: str) -> int:
        return floor_hosts(self.reader.item(pool), self.reader.clock(), self._lead_s,
                           self._max_hosts)
