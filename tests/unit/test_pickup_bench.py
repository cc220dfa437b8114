"""The pickup benchmark's warm-runner figures and its verdict, fed each failure they catch:
cold starts counted as warm, refills paired with the pool they drew from, idle time past a
runner's end, a missed target passing."""

from __future__ import annotations

import copy

import pytest

from benchmarks import warm_figures as wf
from benchmarks.pickup import even_workload, poisson_workload


def job(queued, taken, listening, runner="r"):
    return {"queued_sent_at": queued, "taken_at": taken, "runner_listening_at": listening,
            "runner_name": runner}


def runner(listening, taken=None, deleted=None, disconnected=None):
    return {"listening_at": listening, "taken_at": taken, "deleted_at": deleted,
            "disconnected_at": disconnected}


def test_the_warm_pool_bound_is_littles_law_plus_one():
    assert wf.warm_pool_size(0.5, 5.0) == 4  # ceil(0.5 x 6) + 1
    assert wf.warm_pool_size(0.5, 5.1) == 5  # ceil(3.05) + 1
    assert wf.warm_pool_size(0.0, 5.0) == 1


def test_a_warm_hit_needs_the_runner_listening_before_queued_was_sent():
    assert wf.warm_hit(job(10.0, 10.1, 9.0))
    assert not wf.warm_hit(job(10.0, 16.0, 15.9))  # a cold start: registered after queued
    assert not wf.warm_hit(job(10.0, 10.1, 10.0))  # the same instant is not before
    assert not wf.warm_hit(job(10.0, None, None))  # never taken


def test_refill_pairs_each_take_with_the_next_runner_listening_after_it():
    jobs = [job(10.0, 10.1, 1.0), job(12.0, 12.1, 1.0)]
    runners = [runner(1.0, 10.1), runner(1.0, 12.1),  # the pool the takes drew from
               runner(15.6), runner(17.2)]  # the two replacements
    assert wf.refills(jobs, runners) == pytest.approx([5.5, 5.1])
    assert wf.unreplaced(jobs, runners) == 0


def test_a_take_never_replaced_is_counted_not_hidden():
    jobs = [job(10.0, 10.1, 1.0), job(12.0, 12.1, 1.0)]
    runners = [runner(1.0, 10.1), runner(1.0, 12.1), runner(15.6)]
    assert wf.refills(jobs, runners) == pytest.approx([5.5])
    assert wf.unreplaced(jobs, runners) == 1


def test_cold_starts_have_no_refill():
    jobs = [job(10.0, 15.5, 15.4)]
    assert wf.refills(jobs, [runner(15.4, 15.5)]) == []


def test_idle_time_ends_at_the_job_the_removal_the_disconnect_or_the_run():
    runners = [runner(0.0, taken=5.0), runner(0.0, deleted=3.0), runner(0.0, disconnected=2.0),
               runner(6.0), {"listening_at": None}]
    assert wf.idle_seconds(runners, end=10.0) == pytest.approx(5 + 3 + 2 + 4)


def test_overflow_is_the_jobs_no_warm_runner_took():
    jobs = [job(0.0, 0.1, -5.0), job(0.0, 0.2, -5.0), job(0.0, 6.0, 5.9), job(0.0, 7.0, 6.5)]
    assert wf.overflow_p95(jobs) == pytest.approx(7.0)  # nearest rank, of the two


def test_mode_figures_from_ground_truth():
    jobs = [job(10.0, 10.1, 1.0), job(12.0, 17.0, 16.9)]
    runners = [runner(1.0, 10.1), runner(15.3), runner(16.9, 17.0)]
    figures = wf.mode_figures(jobs, runners, end=20.0, cpu_s=3.0, peak_rss_mb=80.04)
    assert figures["jobs"] == 2
    assert figures["warm_hit_share"] == 0.5
    assert figures["refill_p95_s"] == pytest.approx(5.2)
    assert figures["cpu_s_per_job"] == 1.5
    assert figures["peak_rss_mb"] == 80.0
    assert figures["idle_warm_s_per_job"] == pytest.approx((9.1 + 4.7 + 0.1) / 2, abs=0.01)


GOOD = {
    "startup_s": 5.0, "warm_runners": 4, "warm_runners_max": 4,
    "cold": {"jobs": 40, "pickup_p95_s": 6.2},
    "warm": {"jobs": 100, "pickup_p50_s": 0.05, "pickup_p95_s": 0.2, "warm_hit_share": 0.99,
             "refill_p95_s": 5.8},
    "burst": {"jobs": 12, "overflow_p95_s": 6.9},
}


def test_the_verdict_passes_figures_within_every_target():
    assert wf.verdict(GOOD) == []


@pytest.mark.parametrize(("path", "value", "missed"), [
    (("warm", "pickup_p50_s"), 0.31, "warm pickup_p50_s"),
    (("warm", "pickup_p95_s"), 0.81, "warm pickup_p95_s"),
    (("warm", "warm_hit_share"), 0.94, "warm_hit_share"),
    (("warm", "jobs"), 99, "fewer than 100"),
    (("warm_runners",), 5, "warm_runners 5 above 4"),
    (("warm", "refill_p95_s"), 6.01, "refill_p95_s"),
    (("burst", "overflow_p95_s"), 7.21, "overflow_p95_s"),
    (("warm", "pickup_p95_s"), None, "warm pickup_p95_s"),  # a figure missing is a miss
    (("burst", "overflow_p95_s"), None, "overflow_p95_s"),
])
def test_the_verdict_catches_each_missed_target(path, value, missed):
    result = copy.deepcopy(GOOD)
    target = result
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    found = wf.verdict(result)
    assert len(found) == 1 and missed in found[0], found


def test_the_workloads_are_deterministic_and_shaped_as_stated():
    assert poisson_workload(10, 0.5, 5.0, seed=3) == poisson_workload(10, 0.5, 5.0, seed=3)
    even = even_workload(100, 0.5, 5.0)["jobs"]
    assert len(even) == 100 and even[1]["arrival_s"] - even[0]["arrival_s"] == 2.0
    burst = even_workload(12, 0.5, 5.0, at_once=True)["jobs"]
    assert {j["arrival_s"] for j in burst} == {1.0}
