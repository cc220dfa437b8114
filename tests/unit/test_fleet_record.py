"""The local fleet's record: hosts per pool over time, and instance-seconds."""

from __future__ import annotations

from types import SimpleNamespace

from devstack.fleet import Instance, LocalFleet, Sample


def fleet_with(samples=(), instances=()) -> LocalFleet:
    stack = SimpleNamespace(pools=SimpleNamespace(names=["a", "b"]), prefix="p-")
    fleet = LocalFleet(stack)  # type: ignore[arg-type]
    fleet.samples = list(samples)
    fleet.instances = {i.instance_id: i for i in instances}
    return fleet


def test_hosts_over_time_has_one_row_per_change_and_one_per_interval():
    samples = [Sample(at, pool, 0, count, count) for at, pool, count in [
        (100.0, "a", 0), (100.0, "b", 0),
        (101.0, "a", 1), (101.0, "b", 0),  # a change
        (102.0, "a", 1), (102.0, "b", 0),  # nothing new
        (107.0, "a", 1), (107.0, "b", 0),  # the interval passed
        (108.0, "a", 0), (108.0, "b", 2),  # a change in both
    ]]
    assert fleet_with(samples).hosts_over_time(every_s=5.0) == [
        {"t_s": 0.0, "a": 0, "b": 0},
        {"t_s": 1.0, "a": 1, "b": 0},
        {"t_s": 7.0, "a": 1, "b": 0},
        {"t_s": 8.0, "a": 0, "b": 2},
    ]


def test_no_samples_no_rows():
    assert fleet_with().hosts_over_time() == []


def test_instance_seconds_count_from_launch_to_end_or_now():
    ended = Instance("i-1", "a", launched_at=10.0, ended_at=40.0)
    running = Instance("i-2", "a", launched_at=30.0)
    assert fleet_with(instances=[ended, running]).instance_seconds(until=50.0) == 30.0 + 20.0
