"""The policies (forecast/policies.py) and the replay's choices (forecast/replay.py) that do not
need a simulation: plans, the duration spread, the grid, the baseline rule, the judged week."""

from __future__ import annotations

import numpy as np
import pytest

from forecast.policies import (
    BUCKET_S,
    MONDAY_EPOCH,
    Plan,
    Planned,
    Reactive,
    busy_slots,
    cost_cap_hosts,
    forecast_plan,
    knob_grid,
    reactive_grid,
    spread_kernel,
    static_plan,
)
from forecast.replay import judged_window, pick
from forecast.simulate import SimResult
from forecast.traces import TraceJob

T0 = 1_767_571_200.0  # 2026-01-05 00:00 UTC, a Monday


def test_reactive_grid_covers_the_stated_ranges():
    grid = knob_grid()
    assert len(grid) == len(reactive_grid()) == 60
    assert {g[0] for g in grid} == {0, 1, 2, 3, 4}
    assert {g[1] for g in grid} == {60.0, 300.0, 600.0, 900.0}
    assert {g[2] for g in grid} == {0.0, 300.0, 600.0}
    assert len({p.name for p in reactive_grid()}) == 60  # names are unique


def test_reactive_policy_refuses_negative_knobs():
    with pytest.raises(ValueError):
        Reactive("bad", spare_hosts=-1)
    with pytest.raises(ValueError):
        Reactive("bad", idle_s=-5)


def test_plan_looks_ahead_by_its_lead_and_is_zero_outside():
    plan = Plan(1000.0, 100.0, hosts=(1, 3, 0), warm=(2, 4, 0), lead_s=100.0)
    assert plan.hosts_at(1000.0) == 3  # now: 1, one lead ahead: 3
    assert plan.hosts_at(1250.0) == 0  # the last step, and past the end
    assert plan.hosts_at(0.0) == 0
    assert plan.warm_at(1150.0) == 4  # warm runners are for now, not a lead ahead
    assert Planned("p", plans={"a": plan}).floor_hosts("other", 1000.0) == 0


def test_weekly_plan_repeats_and_must_span_a_week():
    hosts = tuple(range(168))
    plan = Plan(float(MONDAY_EPOCH), 3600.0, hosts, (0,) * 168, weekly=True)
    assert plan.hosts_at(T0 + 5 * 3600) == 5  # Monday 05:00, many weeks later
    assert plan.hosts_at(T0 + 7 * 86400 + 30 * 3600) == 30  # the next Tuesday 06:00
    with pytest.raises(ValueError, match="one week"):
        Plan(0.0, 3600.0, (1,) * 24, (0,) * 24, weekly=True)
    with pytest.raises(ValueError):
        Plan(0.0, 60.0, (1, 2), (0,))
    with pytest.raises(ValueError):
        Plan(0.0, 60.0, (-1,), (0,))


def test_spread_kernel_short_jobs_stay_in_their_bucket_long_ones_spread():
    short = spread_kernel([10.0] * 100)
    assert short.sum() == pytest.approx(1.0)
    assert short[0] > 0.95
    long = spread_kernel([1500.0] * 100)  # 25 minutes: five to six buckets
    assert long.sum() == pytest.approx(1.0)
    assert long[0] < 0.25 and long[4] > 0.1 and long[7] == 0
    empty = spread_kernel([])
    assert empty[0] == 1.0 and empty.sum() == 1.0


def test_busy_slots_of_a_steady_demand_is_its_concurrency():
    # 3 slots busy all the time: 900 runner-seconds arrive per 5-minute bucket.
    kernel = spread_kernel([600.0] * 50)
    busy = busy_slots([900.0] * 40, kernel)
    assert busy[-1] == pytest.approx(3.0)
    assert busy[0] < 3.0  # the first bucket lacks the jobs of the buckets before it


def test_forecast_plan_floor_warm_and_caps():
    kernel = spread_kernel([60.0])  # short jobs: the bucket's own runner-seconds
    upper = [0.0, 2400.0, 600.0]  # 8 and 2 busy slots
    mean = [0.0, 1200.0, 300.0]  # 4 and 1
    plan = forecast_plan(0.0, upper, mean, kernel, slots=4, lead_s=60.0)
    assert plan.hosts[1] == 2 and plan.hosts[2] == 1 and plan.hosts[0] == 0
    # Warm: the floor's slots beyond the mean busy slots (8 - ~4, 4 - ~1).
    assert 3 <= plan.warm[1] <= 4 and 2 <= plan.warm[2] <= 3
    assert plan.warm[0] == 0
    capped = forecast_plan(0.0, upper, mean, kernel, slots=4, lead_s=60.0, max_hosts=1)
    assert max(capped.hosts) == 1 and max(capped.warm) <= 4
    none = forecast_plan(0.0, upper, mean, kernel, slots=4, lead_s=60.0, warm_share=0.0)
    assert max(none.warm) == 0
    with pytest.raises(ValueError):
        forecast_plan(0.0, [1.0], [1.0, 2.0], kernel, slots=4, lead_s=0.0)


def test_static_plan_is_one_window_per_day_type():
    # Two weeks of weekday 09:00-17:00 demand at 8 busy slots, nothing else.
    buckets = 14 * 288
    t = T0 + np.arange(buckets) * BUCKET_S
    hour = (t - T0) % 86400 // 3600
    weekday = ((t - T0) // 86400) % 7 < 5
    runner_s = np.where(weekday & (hour >= 9) & (hour < 17), 8 * BUCKET_S, 0.0)
    plan = static_plan(T0, runner_s.tolist(), spread_kernel([60.0]), slots=4)
    assert plan.weekly
    assert plan.hosts_at(T0 + 10 * 3600) == 2  # Monday 10:00
    assert plan.hosts_at(T0 + 3 * 3600) == 0  # Monday 03:00
    assert plan.hosts_at(T0 + 5 * 86400 + 10 * 3600) == 0  # Saturday: no demand, no window


def test_cost_cap():
    assert cost_cap_hosts(None, 1.0) is None
    assert cost_cap_hosts(10.0, 0.4) == 25
    with pytest.raises(ValueError):
        cost_cap_hosts(10.0, 0.0)


def _result(p95: float, hours: float) -> SimResult:
    return SimResult(waits=[p95] * 20, instance_hours=hours, utilisation=0.5)


def test_baseline_is_the_lowest_p95_within_the_budget():
    results = {"cheap": _result(60, 100), "mid": _result(10, 150), "rich": _result(1, 300)}
    assert pick(results, list(results), budget=200) == "mid"
    assert pick(results, list(results), budget=300) == "rich"


def test_baseline_is_the_cheapest_when_nothing_is_within_the_budget():
    results = {"cheap": _result(60, 100), "rich": _result(1, 300)}
    assert pick(results, list(results), budget=50) == "cheap"


def test_baseline_tie_on_p95_takes_the_cheaper():
    results = {"a": _result(5.5, 150), "b": _result(5.5, 120)}
    assert pick(results, list(results), budget=200) == "b"


def test_judged_week_is_the_last_seven_days_and_needs_two_weeks():
    jobs = [TraceJob(T0 + 3600, ("x",), 1.0), TraceJob(T0 + 20 * 86400 + 5, ("x",), 1.0)]
    first, judged, end = judged_window(jobs)
    assert (first, end) == (T0, T0 + 21 * 86400)
    assert judged == end - 7 * 86400
    with pytest.raises(ValueError, match="at least 14"):
        judged_window([TraceJob(T0, ("x",), 1.0), TraceJob(T0 + 10 * 86400, ("x",), 1.0)])
    with pytest.raises(ValueError, match="no job"):
        judged_window([])


def test_policies_run_in_worker_processes_give_the_same_results():
    from chalicelib.pools import PoolConfig
    from forecast.replay import run_policies
    from forecast.simulate import SimConfig

    pools = PoolConfig.model_validate({"pool": [{
        "name": "small", "labels": ["linux"], "scope": {"owner": "acme"}, "image": "img"}]})
    jobs = [TraceJob(T0 + i * 45.0, ("linux",), 400.0 + (i % 5) * 100) for i in range(150)]
    policies = [Reactive("a"), Reactive("b", spare_hosts=1, idle_s=60.0)]
    config = SimConfig(boot_jitter_s=15.0)
    alone = run_policies(jobs, pools, policies, config, seed=7, workers=1)
    forked = run_policies(jobs, pools, policies, config, seed=7, workers=2)
    assert [r.waits for r in alone] == [r.waits for r in forked]
    assert [r.instance_hours for r in alone] == [r.instance_hours for r in forked]
    assert alone[0].instance_hours != alone[1].instance_hours
