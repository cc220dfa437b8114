"""The scaling benchmark's workload and its ground-truth figures, fed each failure they catch."""

from __future__ import annotations

import pytest

from benchmarks.scaling import (
    burst_workload,
    bursts_of,
    ideal_instance_s,
    peak_concurrency,
    reactions,
    verdict,
)


def test_the_workload_is_seeded_and_has_three_bursts_separated_by_the_gap():
    first, again = burst_workload(seed=5), burst_workload(seed=5)
    assert first == again
    assert first != burst_workload(seed=6)
    assert len(first["jobs"]) == 60
    assert all(5.0 <= job["duration_s"] <= 60.0 for job in first["jobs"])
    assert [len(burst) for burst in bursts_of(first, gap_s=80.0)] == [20, 20, 20]


def test_a_workload_needs_a_job_per_burst():
    with pytest.raises(ValueError, match="one job per burst"):
        burst_workload(seed=1, jobs=2, bursts=3)


def test_peak_concurrency_counts_overlaps_and_not_back_to_back_jobs():
    jobs = [{"arrival_s": 0, "duration_s": 10}, {"arrival_s": 5, "duration_s": 10},
            {"arrival_s": 15, "duration_s": 1}]
    assert peak_concurrency(jobs) == 2  # the third starts as the second ends


def test_the_ideal_is_runner_seconds_per_slot_plus_a_boot_per_host_per_burst():
    workload = {"jobs": [
        {"arrival_s": 0, "duration_s": 10}, {"arrival_s": 0, "duration_s": 10},
        {"arrival_s": 0, "duration_s": 10},  # burst 1: 3 at once -> 2 hosts of 2 slots
        {"arrival_s": 500, "duration_s": 20},  # burst 2: 1 host
    ]}
    assert ideal_instance_s(workload, slots=2, boot_s=20.0, gap_s=60.0) == 50 / 2 + 3 * 20


def job(sent, completed=None):
    return {"queued_sent_at": sent, "completed_at": completed}


def test_reaction_is_queued_sent_to_desired_capacity_covering_the_job():
    desired = [(0.0, 0), (1.0, 0), (2.5, 1), (3.0, 1), (10.0, 2), (50.0, 1)]
    truth = [
        job(1.2, 30.0),  # needs 1 host: covered at 2.5
        job(1.5, 30.0),  # 2 open, 2 slots: 1 host, covered at 2.5
        job(9.0, 40.0),  # 3 open: 2 hosts, covered at 10.0
        job(45.0),  # 1 open (the rest completed): 2 hosts desired then: no wait
        {"queued_sent_at": None},  # never sent
    ]
    assert reactions(truth, desired, slots=2) == pytest.approx([1.3, 1.0, 1.0])


def test_a_raise_that_does_not_cover_the_job_is_not_its_reaction():
    # three open jobs at 2 slots need 2 hosts; the raise to 1 at 2.0 is not enough
    truth = [job(1.0), job(1.1), job(1.2)]
    assert reactions(truth, [(0.0, 0), (2.0, 1), (9.0, 2)], slots=2) == pytest.approx(
        [1.0, 0.9, 7.8])


def test_a_scaler_that_never_reacts_reports_the_whole_wait():
    assert reactions([job(1.0)], [(0.0, 0), (30.0, 0)], slots=4) == [29.0]


def test_a_job_arriving_with_room_has_no_reaction():
    assert reactions([job(5.0)], [(0.0, 1), (10.0, 1)], slots=4) == []


GOOD = {"lost": 0, "busy_killed": 0, "reaction_p95_s": 2.0, "instance_s": 100.0,
        "ideal_instance_s": 80.0}


@pytest.mark.parametrize(("change", "missed"), [
    ({}, []),
    ({"lost": 1}, ["lost 1"]),
    ({"busy_killed": 2}, ["busy_killed 2"]),
    ({"reaction_p95_s": 5.1}, ["reaction_p95_s 5.1"]),
    ({"reaction_p95_s": None}, ["reaction_p95_s None"]),
    ({"instance_s": 121.0}, ["instance_s 121.0"]),
])
def test_the_verdict_names_each_missed_target(change, missed):
    found = verdict({**GOOD, **change})
    assert len(found) == len(missed)
    for text, expected in zip(found, missed, strict=True):
        assert text.startswith(expected)
