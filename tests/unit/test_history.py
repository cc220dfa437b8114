"""Demand history from the jobs table's stream (chalicelib/history.py): which images count, a
retried batch counting nothing twice (in memory and on DynamoDB alike), the forecast item, and
the scaler's floor read from it."""

from __future__ import annotations

import pytest
from moto import mock_aws

from chalicelib import aws
from chalicelib.errors import DependencyUnavailable
from chalicelib.history import (
    BUCKET_S,
    IDS_PER_WRITE,
    DynamoHistory,
    Event,
    ForecastFloor,
    ForecastItem,
    ForecastReader,
    Kind,
    MemoryHistory,
    cost_cap_hosts,
    events_of,
    floor_hosts,
    forecast_warm,
)
from chalicelib.resources import HISTORY_TABLE, HISTORY_TTL_S
from devstack.resources import create_tables

T0 = 1_767_571_200  # 2026-01-05 00:00 UTC, a bucket boundary


def image(job_id: int, state: str, **fields) -> dict:
    found = {"job_id": {"N": str(job_id)}, "state": {"S": state}}
    for name, value in fields.items():
        found[name] = {"S": value} if isinstance(value, str) else {"N": str(value)}
    return {"eventSource": "aws:dynamodb", "eventName": "MODIFY",
            "dynamodb": {"NewImage": found}}


@pytest.fixture(params=["memory", "dynamodb"])
def history(request):
    if request.param == "memory":
        yield MemoryHistory()
        return
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        yield DynamoHistory(client, HISTORY_TABLE.default_name)


def test_a_first_received_image_is_an_arrival_in_its_bucket():
    events, unusable = events_of({"Records": [
        image(1, "received", pool="linux", demand_generation=1, received_at=T0 + 299.9)]})
    assert events == [Event("linux", T0, 1, Kind.ARRIVAL)] and unusable == 0


def test_a_redemand_is_not_a_new_arrival():
    events, _ = events_of({"Records": [
        image(1, "received", pool="linux", demand_generation=2, received_at=T0)]})
    assert events == []


def test_a_completion_adds_its_runner_seconds_to_its_arrivals_bucket():
    events, _ = events_of({"Records": [image(
        1, "completed", pool="linux", received_at=T0 + 10, in_progress_at=T0 + 400,
        completed_at=T0 + 1000)]})
    assert events == [Event("linux", T0, 1, Kind.COMPLETION, 600.0)]


def test_a_job_cancelled_before_a_runner_took_it_adds_nothing():
    events, unusable = events_of({"Records": [image(
        1, "completed", pool="linux", received_at=T0, completed_at=T0 + 5)]})
    assert (events, unusable) == ([], 0)


def test_images_history_cannot_use_are_counted_not_dropped_silently():
    events, unusable = events_of({"Records": [
        image(1, "received", demand_generation=1, received_at=T0),  # no pool
        image(2, "completed", pool="linux", in_progress_at=T0, completed_at=T0 + 1),  # no arrival
        image(3, "completed", pool="linux", received_at=T0, in_progress_at=T0 + 9,
              completed_at=T0 + 1),  # ends before it starts
        image(4, "dispatched", pool="linux", received_at=T0),  # not a history state
        {"eventSource": "aws:dynamodb", "eventName": "REMOVE", "dynamodb": {}},
    ]})
    assert (events, unusable) == ([], 3)


def test_a_retried_batch_counts_nothing_twice(history):
    batch = [Event("linux", T0, 1, Kind.ARRIVAL), Event("linux", T0, 2, Kind.ARRIVAL),
             Event("linux", T0, 1, Kind.COMPLETION, 120.0)]
    first = history.record(batch, T0)
    again = history.record(batch, T0)
    assert (first.written, first.duplicates) == (3, 0)
    assert (again.written, again.duplicates) == (0, 3)
    (bucket,) = history.buckets("linux", T0, T0 + BUCKET_S)
    assert (bucket.bucket, bucket.arrivals, bucket.runner_s) == (T0, 2, 120.0)
    assert bucket.durations == (120.0,)


def test_each_completion_keeps_its_duration_once(history):
    """The trainer's spread kernel needs the jobs' durations, not only their sum; a chunk
    refused because one of its jobs was counted adds the others' one by one."""
    history.record([Event("linux", T0, 1, Kind.COMPLETION, 60.0)], T0)
    history.record([Event("linux", T0, n, Kind.COMPLETION, 60.0 * n) for n in (1, 2, 3)], T0)
    (bucket,) = history.buckets("linux", T0, T0 + BUCKET_S)
    assert bucket.runner_s == 360.0 and sorted(bucket.durations) == [60.0, 120.0, 180.0]


def test_a_batch_with_one_job_already_counted_writes_the_others(history):
    history.record([Event("linux", T0, 1, Kind.ARRIVAL)], T0)
    tally = history.record([Event("linux", T0, n, Kind.ARRIVAL) for n in (1, 2, 3)], T0)
    assert (tally.written, tally.duplicates) == (2, 1)
    assert history.buckets("linux", T0, T0 + BUCKET_S)[0].arrivals == 3


def test_more_jobs_in_one_bucket_than_one_write_takes(history):
    count = IDS_PER_WRITE * 2 + 3
    tally = history.record([Event("linux", T0, n, Kind.ARRIVAL) for n in range(count)], T0)
    assert tally.written == count
    assert history.buckets("linux", T0, T0 + BUCKET_S)[0].arrivals == count


def test_buckets_are_per_pool_and_within_the_range(history):
    history.record([Event("linux", T0 + n * BUCKET_S, n, Kind.ARRIVAL) for n in range(4)]
                   + [Event("gpu", T0, 99, Kind.ARRIVAL)], T0)
    found = history.buckets("linux", T0 + BUCKET_S, T0 + 3 * BUCKET_S)
    assert [b.bucket for b in found] == [T0 + BUCKET_S, T0 + 2 * BUCKET_S]


def test_the_forecast_item_round_trips(history):
    assert history.forecast("linux") is None
    item = ForecastItem("linux", T0, tuple(float(n) for n in range(288)), trained_at=T0 - 5,
                        quantile=0.9, model_key="models/linux/x.joblib",
                        floor_hosts=tuple(n % 7 for n in range(288)), skill=0.432,
                        warm=tuple(n % 5 for n in range(288)))
    history.put_forecast(item)
    assert history.forecast("linux") == item
    gated = ForecastItem("linux", T0, (5.0,) * 288, trained_at=T0, floor_hosts=(0,) * 288,
                         skill=0.01, no_floor="skill 0.010 < 0.2")
    history.put_forecast(gated)
    assert history.forecast("linux") == gated
    # Not a bucket of the pool's history.
    assert history.buckets("linux", 0, T0 + 10**6) == []


def test_history_items_expire_independently_of_the_jobs():
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        DynamoHistory(client, HISTORY_TABLE.default_name).record(
            [Event("linux", T0, 1, Kind.ARRIVAL)], T0)
        item = client.get_item(TableName=HISTORY_TABLE.default_name,
                               Key={"pool": {"S": "linux"}, "bucket": {"N": str(T0)}})["Item"]
        assert int(item["expires_at"]["N"]) == T0 + HISTORY_TTL_S
        assert HISTORY_TTL_S >= 5 * 7 * 86400  # the trainer reads five weeks
        ttl = client.describe_time_to_live(TableName=HISTORY_TABLE.default_name)
        assert ttl["TimeToLiveDescription"]["AttributeName"] == "expires_at"


def test_an_item_from_before_the_trainer_stored_floors_reads_as_no_floor():
    """Compatibility: such an item (only `upper`) is read without error and is no floor (the
    old rule, upper over slots, was not the simulator's; the next daily run replaces it)."""
    with mock_aws():
        client = aws.client("dynamodb")
        create_tables(client)
        client.put_item(TableName=HISTORY_TABLE.default_name, Item={
            "pool": {"S": "forecast#linux"}, "bucket": {"N": "0"}, "start": {"N": str(T0)},
            "upper": {"L": [{"N": "3000"}] * 288}, "trained_at": {"N": str(T0)},
            "quantile": {"N": "0.9"}, "model_key": {"S": "models/linux/old.joblib"}})
        item = DynamoHistory(client, HISTORY_TABLE.default_name).forecast("linux")
    assert item.floor_hosts == () and item.upper[0] == 3000.0 and item.skill is None
    assert floor_hosts(item, T0 + 60, 180) == 0
    assert item.warm == () and forecast_warm(item, T0 + 60) == 0


def test_a_forecast_start_off_the_bucket_grid_is_refused():
    with pytest.raises(ValueError, match="not a multiple of 300"):
        ForecastItem("linux", T0 + 1, (1.0,), trained_at=T0)
    with pytest.raises(ValueError, match="finite runner-seconds"):
        ForecastItem("linux", T0, (float("nan"),), trained_at=T0)
    with pytest.raises(ValueError, match="differ in length"):
        ForecastItem("linux", T0, (1.0, 1.0), trained_at=T0, floor_hosts=(1,))
    with pytest.raises(ValueError, match="floor_hosts are whole numbers"):
        ForecastItem("linux", T0, (1.0,), trained_at=T0, floor_hosts=(-1,))
    with pytest.raises(ValueError, match=r"warm \(1\) and upper \(2\) differ in length"):
        ForecastItem("linux", T0, (1.0, 1.0), trained_at=T0, warm=(1,))
    with pytest.raises(ValueError, match="warm are whole numbers"):
        ForecastItem("linux", T0, (1.0,), trained_at=T0, warm=(True,))


# --- the floor ---

def forecast(hosts: list[int], trained_at: float = T0) -> ForecastItem:
    return ForecastItem("linux", T0, (0.0,) * len(hosts), trained_at=trained_at,
                        floor_hosts=tuple(hosts))


def test_the_floor_is_the_stored_hosts_now_or_one_boot_time_ahead_the_larger():
    item = forecast([0, 3, 0])
    assert floor_hosts(item, T0 + 10, lead_s=290) == 3
    assert floor_hosts(item, T0 + 10, lead_s=0) == 0
    # In the peak's bucket, with the lead past it: still the peak's hosts (they serve now).
    assert floor_hosts(item, T0 + BUCKET_S + 10, lead_s=300) == 3
    assert floor_hosts(item, T0 + 2 * BUCKET_S, lead_s=300) == 0


def test_no_floor_without_a_forecast_a_stale_one_or_beyond_its_horizon():
    assert floor_hosts(None, T0, 300) == 0
    assert floor_hosts(forecast([10] * 3, trained_at=T0 - 49 * 3600), T0, 0) == 0
    assert floor_hosts(forecast([10] * 3), T0 + 3 * BUCKET_S, 0) == 0
    assert floor_hosts(forecast([10] * 3), T0 - 1, 0) == 0
    # Before the horizon, the lead reaching into it: its first bucket.
    assert floor_hosts(forecast([10] * 3), T0 - 1, 180) == 10


def test_the_warm_runners_are_those_of_the_bucket_holding_now_no_lead():
    item = ForecastItem("linux", T0, (0.0,) * 3, trained_at=T0, warm=(0, 4, 2))
    assert forecast_warm(item, T0 + BUCKET_S - 1) == 0  # a warm runner starts in seconds
    assert forecast_warm(item, T0 + BUCKET_S) == 4
    assert forecast_warm(item, T0 + 3 * BUCKET_S - 1) == 2
    assert forecast_warm(item, T0 + 3 * BUCKET_S) == 0  # beyond the horizon
    assert forecast_warm(item, T0 - 1) == 0
    assert forecast_warm(None, T0 + BUCKET_S) == 0
    stale = ForecastItem("linux", T0, (0.0,) * 3, trained_at=T0 - 49 * 3600, warm=(5, 5, 5))
    assert forecast_warm(stale, T0) == 0


def test_an_hourly_cost_cap_bounds_the_floor():
    item = forecast([25])
    assert floor_hosts(item, T0, 0, max_hosts=cost_cap_hosts(2.0, 0.192)) == 10
    assert cost_cap_hosts(0.0, 0.192) is None
    with pytest.raises(ValueError, match="hourly cost"):
        cost_cap_hosts(2.0, 0.0)


class FlakyStore(MemoryHistory):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.fail = False

    def forecast(self, pool):
        self.reads += 1
        if self.fail:
            raise DependencyUnavailable("dynamodb", "timeout")
        return super().forecast(pool)


def test_the_floor_reads_the_forecast_once_per_refresh_and_keeps_it_through_an_outage():
    store, now, errors = FlakyStore(), [T0 + 1.0], []
    store.put_forecast(forecast([1] * 288))
    floor = ForecastFloor(ForecastReader(store, refresh_s=300, clock=lambda: now[0],
                                         on_error=lambda p, e: errors.append(p)), lead_s=60)
    assert (floor("linux"), floor("linux"), store.reads) == (1, 1, 1)
    store.fail = True
    now[0] += 300
    assert floor("linux") == 1 and store.reads == 2 and errors == ["linux"]
    # A pool never read, in an outage: no floor (the scaler is reactive alone).
    assert floor("gpu") == 0
