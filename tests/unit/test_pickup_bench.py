"""The pickup benchmark's warm-runner figures and its verdict, fed each failure they catch:
cold starts counted as warm, refills paired with the pool they drew from, idle time past a
runner's end, a missed target passing."""

from __future__ import annotations

import copy

import pytest

from benchmarks import warm_figures as wf
from benchmarks.pickup import even_workload, poisson_workload


def job(queued, taken, listening, runner="r"):
    return {"queued_sent_at": queued, "queued_at": queued, "taken_at": taken,
            "runner_listening_at": listening, "runner_name": runner}


def runner(listening, taken=None, deleted=None, disconnected=None, name="x", created=None):
    return {"listening_at": listening, "taken_at": taken, "deleted_at": deleted,
            "disconnected_at": disconnected, "name": name,
            "created_at": listening - 5.2 if created is None and listening else created}


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
    jobs = [job(10.0, 10.1, 1.0, "w1"), job(12.0, 12.1, 1.0, "w2")]
    runners = [runner(1.0, 10.1, name="w1"), runner(1.0, 12.1, name="w2"),  # the pool
               runner(15.6, name="r1"), runner(17.2, name="r2")]  # the two replacements
    assert wf.refills(jobs, runners) == pytest.approx([5.5, 5.1])
    assert wf.unreplaced(jobs, runners, end=30.0, grace_s=6.0) == 0


def test_a_take_never_replaced_is_a_miss_unless_the_run_just_ended():
    jobs = [job(10.0, 10.1, 1.0, "w1"), job(12.0, 12.1, 1.0, "w2")]
    runners = [runner(1.0, 10.1, name="w1"), runner(1.0, 12.1, name="w2"),
               runner(15.6, name="r1")]
    assert wf.refills(jobs, runners) == pytest.approx([5.5])
    assert wf.unreplaced(jobs, runners, end=30.0, grace_s=6.0) == 1
    assert wf.unreplaced(jobs, runners, end=15.0, grace_s=6.0) == 0  # too late to tell


def test_a_cold_start_is_no_replacement():
    # A runner that came up and took a job already waiting for it never joined the pool: it
    # must not be paired with a warm take (that would hide a replacement that never came).
    jobs = [job(10.0, 10.1, 1.0, "w1"), job(12.0, 17.9, 17.8, "cold")]
    runners = [runner(1.0, 10.1, name="w1"), runner(17.8, 17.9, name="cold")]
    assert wf.replacements(jobs, runners) == [1.0]
    assert wf.refills(jobs, runners) == []
    assert wf.unreplaced(jobs, runners, end=40.0, grace_s=6.0) == 1


def test_a_replacement_that_later_took_a_job_still_counts():
    jobs = [job(10.0, 10.1, 1.0, "w1"), job(20.0, 20.01, 15.5, "r1")]
    runners = [runner(1.0, 10.1, name="w1"), runner(15.5, 20.01, name="r1")]
    assert wf.refills(jobs, runners) == pytest.approx([5.4])


def test_cold_starts_have_no_refill():
    jobs = [job(10.0, 15.5, 15.4, "c")]
    assert wf.refills(jobs, [runner(15.4, 15.5, name="c")]) == []


def test_the_warm_pool_seen_is_the_most_idle_at_once_within_the_window():
    runners = [runner(0.0, taken=10.0), runner(2.0, taken=3.0), runner(5.0),
               runner(-50.0, deleted=2.5)]  # three idle at once over [2.0, 2.5)
    assert wf.peak_idle(runners, began=-100.0, end=20.0) == 3
    assert wf.peak_idle(runners, began=3.5, end=20.0) == 2  # before the window: not counted


def test_the_start_up_seen_and_the_arrival_rate():
    assert wf.startup_seen([runner(10.0, created=4.0), runner(20.0, created=15.0),
                            runner(30.0, created=23.0), runner(None)]) == pytest.approx(6.0)
    assert wf.arrival_rate([job(0.0, 1, 0), job(2.0, 3, 0), job(4.0, 5, 0)]) == 0.5
    assert wf.arrival_rate([job(0.0, 1, 0)]) is None


def test_idle_time_ends_at_the_job_the_removal_the_disconnect_or_the_run():
    runners = [runner(0.0, taken=5.0), runner(0.0, deleted=3.0), runner(0.0, disconnected=2.0),
               runner(6.0), {"listening_at": None}]
    assert wf.idle_seconds(runners, end=10.0) == pytest.approx(5 + 3 + 2 + 4)
    assert wf.idle_seconds(runners, end=10.0, began=4.0) == pytest.approx(1 + 0 + 0 + 4)


def test_overflow_is_the_jobs_no_warm_runner_took():
    jobs = [job(0.0, 0.1, -5.0), job(0.0, 0.2, -5.0), job(0.0, 6.0, 5.9), job(0.0, 7.0, 6.5)]
    assert wf.overflow_p95(jobs) == pytest.approx(7.0)  # nearest rank, of the two


def test_mode_figures_from_ground_truth():
    jobs = [job(10.0, 10.1, 1.0, "w1"), job(12.0, 17.0, 16.9, "c1"), job(13.0, None, None)]
    runners = [runner(1.0, 10.1, name="w1"), runner(15.3, name="r1"),
               runner(16.9, 17.0, name="c1")]
    figures = wf.mode_figures(jobs, runners, began=10.0, end=20.0, startup_s=5.0, cpu_s=3.0,
                              peak_rss_mb=80.04)
    assert figures["jobs"] == 3 and figures["untaken"] == 1
    assert figures["warm_hit_share"] == pytest.approx(0.333)
    assert figures["refill_p95_s"] == pytest.approx(5.2)
    assert figures["cpu_s_per_job"] == 1.0
    assert figures["peak_rss_mb"] == 80.0
    assert figures["startup_seen_p50_s"] == pytest.approx(5.2)
    assert figures["idle_warm_s_per_job"] == pytest.approx((0.1 + 4.7 + 0.1) / 3, abs=0.01)


def mode(**figures):
    base = {"jobs": 40, "untaken": 0, "pickup_p50_s": 5.2, "pickup_p95_s": 6.2,
            "startup_seen_p50_s": 5.3, "warm_hit_share": 0.0, "refill_p95_s": None,
            "unreplaced": 0, "warm_pool_seen": 0, "arrival_rate_per_s": 0.5}
    return base | figures


GOOD = {
    "startup_s": 5.0, "warm_runners": 4, "warm_runners_max": 4,
    "cold": mode(),
    "warm": mode(jobs=100, pickup_p50_s=0.05, pickup_p95_s=0.2, warm_hit_share=0.99,
                 refill_p95_s=5.8, warm_pool_seen=4),
    "burst": mode(jobs=12, overflow_p95_s=6.9),
}


def test_the_verdict_passes_figures_within_every_target():
    assert wf.verdict(GOOD) == []


@pytest.mark.parametrize(("path", "value", "missed"), [
    (("warm", "pickup_p50_s"), 0.31, "warm pickup_p50_s"),
    (("warm", "pickup_p95_s"), 0.81, "warm pickup_p95_s"),
    (("warm", "warm_hit_share"), 0.94, "warm_hit_share"),
    (("warm", "jobs"), 99, "fewer than 100"),
    (("warm", "warm_pool_seen"), 5, "warm pool seen 5 above the bound 4"),
    (("warm", "arrival_rate_per_s"), 0.3, "above the bound 3"),  # fewer arrivals, smaller pool
    (("warm", "refill_p95_s"), 6.01, "refill_p95_s"),
    (("warm", "unreplaced"), 1, "never replaced"),
    (("burst", "overflow_p95_s"), 7.21, "overflow_p95_s"),
    (("warm", "pickup_p95_s"), None, "warm pickup_p95_s"),  # a figure missing is a miss
    (("burst", "overflow_p95_s"), None, "overflow_p95_s"),
    (("cold", "untaken"), 2, "never taken"),
    (("cold", "startup_seen_p50_s"), 0.2, "less than the modelled"),  # no start-up happened
    (("burst", "startup_seen_p50_s"), None, "less than the modelled"),
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
