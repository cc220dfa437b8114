"""The judge of `make demo` and `make chaos`, fed each failure it exists to catch."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.judge import (
    ContainerEvent,
    PlannedJob,
    PoolRule,
    busy_at_termination,
    busy_killed,
    expected_pool,
    judge,
    plan_workload,
    read_pools,
    running_peaks,
    settled,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = PoolRule("small", frozenset({"self-hosted", "linux"}), "acme", None)
GPU = PoolRule("gpu", frozenset({"self-hosted", "linux", "gpu"}), "acme",
               frozenset({"ml"}))
RULES = [SMALL, GPU]


def truth(job_id=1, status="completed", conclusion="success", by="runner",
          runner_labels=("self-hosted", "linux"), taken=True, **extra) -> dict:
    return {"job_id": job_id, "status": status, "conclusion": conclusion,
            "completed_by": by if status == "completed" else None,
            "runner_name": "rh-1-1-abc" if taken else None,
            "runner_labels": list(runner_labels) if taken else None,
            "queued_at": 100.0, "queued_sent_at": 100.0,
            "taken_at": 100.5 if taken else None, **extra}


def record(state="completed", conclusion="success") -> dict:
    return {"state": state, "conclusion": conclusion}


def verdict(seen: dict, rh: dict | None = None, plan: PlannedJob | None = None, **kw):
    plan = plan or PlannedJob(job_id=seen["job_id"], pool="small", conclusion="success")
    rh = record(seen["status"] if seen["status"] == "completed" else "claimed",
                seen.get("conclusion")) if rh is None else rh
    return judge([plan], {seen["job_id"]: seen}, {seen["job_id"]: rh}, RULES, **kw)


def test_a_job_done_as_planned_is_neither_lost_nor_stuck():
    result = verdict(truth())
    assert (result.lost, result.stuck, result.ok) == ({}, {}, True)
    assert result.pickup_by_pool["small"]["p50_s"] == 0.5


def test_never_taken_is_lost():
    result = verdict(truth(status="queued", conclusion=None, taken=False), rh=record("dispatched"))
    assert result.lost == {1: "never taken"}
    assert not result.ok


def test_taken_and_never_finished_is_lost():
    result = verdict(truth(status="in_progress", conclusion=None), rh=record("in_progress"))
    assert result.lost == {1: "taken, never finished"}


def test_failed_by_githubs_lost_runner_timeout_is_lost_even_when_failure_was_planned():
    seen = truth(conclusion="failure", by="lost_runner_timeout")
    plan = PlannedJob(job_id=1, pool="small", conclusion="failure")
    result = verdict(seen, rh=record("completed", "failure"), plan=plan)
    assert "lost-runner" in result.lost[1]


def test_a_conclusion_other_than_planned_is_lost():
    result = verdict(truth(conclusion="failure"), rh=record("completed", "failure"))
    assert result.lost == {1: "conclusion failure, planned success"}


def test_a_planned_cancellation_that_github_cancelled_is_done():
    seen = truth(status="completed", conclusion="cancelled", by="cancel", taken=False)
    plan = PlannedJob(job_id=1, pool="small", conclusion="success", cancelled=True)
    result = verdict(seen, rh=record("completed", "cancelled"), plan=plan)
    assert result.ok


def test_a_cancellation_after_the_job_ended_is_judged_as_the_plain_job():
    plan = PlannedJob(job_id=1, pool="small", conclusion="success", cancelled=True)
    assert verdict(truth(), plan=plan).ok
    wrong = verdict(truth(conclusion="failure"), rh=record("completed", "failure"), plan=plan)
    assert wrong.lost


def test_closed_early_by_runnerhub_is_stuck():
    result = verdict(truth(status="in_progress", conclusion=None), rh=record("completed", None))
    assert result.stuck == {1: "RunnerHub completed it while GitHub has it in_progress"}


def test_runnerhub_not_completed_for_a_job_github_completed_is_stuck():
    result = verdict(truth(), rh=record("in_progress", None))
    assert result.stuck == {1: "GitHub completed it, RunnerHub has in_progress"}


def test_runnerhub_with_another_conclusion_is_stuck():
    result = verdict(truth(), rh=record("completed", "failure"))
    assert result.stuck == {1: "conclusion failure, GitHub has success"}


def test_no_record_at_all_for_a_completed_job_is_stuck():
    seen = truth()
    result = judge([PlannedJob(1, "small", "success")], {1: seen}, {}, RULES)
    assert result.stuck == {1: "GitHub completed it, RunnerHub has None"}


def test_a_job_no_pool_serves_is_not_judged():
    plan = PlannedJob(job_id=1, pool=None, conclusion="success")
    result = verdict(truth(status="queued", conclusion=None, taken=False), rh={}, plan=plan)
    assert (result.jobs, result.ok) == (0, True)


def test_cross_pool_runs_are_counted_per_pair_and_are_not_failures():
    seen = truth(runner_labels=("self-hosted", "linux", "gpu"))
    result = verdict(seen)
    assert result.cross_pool == {"small->gpu": 1}
    assert result.ok


def test_over_commit_from_docker_events():
    events = [ContainerEvent(1.0, "h", "a", "start"), ContainerEvent(2.0, "h", "b", "start"),
              ContainerEvent(3.0, "h", "c", "start"), ContainerEvent(4.0, "h", "a", "die"),
              ContainerEvent(5.0, "h", "d", "start")]
    over, peaks = running_peaks(events, {"h": 2})
    assert (over, peaks) == (2, {"h": 3})
    result = verdict(truth(), events=events, slots={"h": 2})
    assert result.over_commit == 2 and not result.ok


def test_running_peaks_pairs_by_container_and_host():
    events = [ContainerEvent(1.0, "h1", "a", "start"), ContainerEvent(1.0, "h2", "b", "start"),
              ContainerEvent(2.0, "h1", "a", "die"), ContainerEvent(2.0, "h1", "c", "start"),
              ContainerEvent(3.0, "h1", "c", "start"),  # reported twice: one container
              ContainerEvent(3.5, "h1", "zz", "die")]  # started before the stream
    assert running_peaks(events, {"h1": 1, "h2": 1}) == (0, {"h1": 1, "h2": 1})


def test_a_time_out_is_a_failure():
    result = verdict(truth(), timed_out=3)
    assert result.timed_out == 3 and not result.ok


def test_settled_waits_for_github_and_runnerhub_to_agree():
    plan = [PlannedJob(1, "small", "success"), PlannedJob(2, None, "success")]
    open_truth = {1: truth(status="in_progress", conclusion=None)}
    assert settled(plan, open_truth, {1: record("in_progress", None)}) == [1]
    assert settled(plan, {1: truth()}, {1: record("in_progress", None)}) == [1]
    assert settled(plan, {1: truth()}, {1: record()}) == []


@pytest.mark.parametrize(("labels", "repository", "private", "pool"), [
    (["self-hosted", "linux"], "acme/web", True, "small"),
    (["LINUX"], "acme/web", True, "small"),  # case-insensitive, self-hosted not required
    (["linux", "gpu"], "acme/ml", True, "gpu"),
    (["linux", "gpu"], "acme/web", True, None),  # outside the gpu pool's repositories
    (["linux"], "other/web", True, None),  # outside every scope
    (["linux"], "acme/web", False, None),  # public repositories refused by default
    (["windows"], "acme/web", True, None),
    ([], "acme/web", True, None),  # no labels: not ours
])
def test_the_judges_own_routing_rule(labels, repository, private, pool):
    assert expected_pool(RULES, labels, repository, private) == pool


def test_fewest_extra_labels_then_name_wins():
    wide = PoolRule("a-wide", frozenset({"linux", "x", "y"}), "acme", None)
    narrow_b = PoolRule("b", frozenset({"linux", "x"}), "acme", None)
    narrow_c = PoolRule("c", frozenset({"linux", "x"}), "acme", None)
    assert expected_pool([wide, narrow_c, narrow_b], ["linux"], "acme/r", True) == "b"


def test_the_judge_agrees_with_the_demo_plan():
    rules = read_pools(ROOT / "chalicelib" / "config" / "pools.toml")
    workload = {"jobs": [
        {"repository": "runnerhub-demo/web", "labels": ["self-hosted", "linux", "x64"]},
        {"repository": "runnerhub-demo/ml-models", "labels": ["self-hosted", "gpu"]},
        {"repository": "runnerhub-demo/web", "labels": ["windows-latest"]},
        {"repository": "runnerhub-demo/web", "labels": ["x"], "expected_pool": "gpu",
         "conclusion": "failure", "cancel_at_s": 3},
    ]}
    plan = plan_workload(workload, [11, 12, 13, 14], rules)
    assert [(p.job_id, p.pool) for p in plan] == [
        (11, "linux-small"), (12, "gpu"), (13, None), (14, "gpu")]
    assert (plan[3].conclusion, plan[3].cancelled) == ("failure", True)


# --- the fault suite's own counts (devstack/chaos.py) ---

def test_webhook_processes_count_receivers_answering_a_tenth_of_deliveries():
    from devstack.chaos import webhook_processes

    log = ([{"url": "a", "status": "OK"}] * 18 + [{"url": "b", "status": "OK"}] * 1
           + [{"url": "b", "status": "failed to connect to host"}] * 10)
    assert webhook_processes(log, ["a", "b"]) == 1  # b answered 1 of 19: under 10 %
    log += [{"url": "b", "status": "OK"}] * 2
    assert webhook_processes(log, ["a", "b"]) == 2
    assert webhook_processes([], ["a", "b"]) == 0


def test_casualties_are_only_jobs_github_failed_on_a_killed_runner():
    from devstack.chaos import casualties

    seen = {1: truth(1, conclusion="failure", by="lost_runner_timeout", runner_name="rh-x"),
            2: truth(2, conclusion="failure", by="lost_runner_timeout", runner_name="rh-y"),
            3: truth(3, status="in_progress", conclusion=None, runner_name="rh-x2")}
    plan = [PlannedJob(j, "small", "success") for j in seen]
    result = judge(plan, seen, {j: record("completed", "failure") for j in seen}, RULES)
    assert set(result.lost) == {1, 2, 3}
    # 2's runner was not on the lost host; 3 was never failed by GitHub: both stay lost.
    assert casualties(result, seen, {"rh-x", "rh-x2"}) == [1]


def test_a_fault_injected_less_than_half_as_often_as_configured_is_a_shortfall():
    from devstack.chaos import PROFILES, Injected, shortfalls

    profile = PROFILES["short"]
    full = Injected(kills=profile.kills, host_losses=profile.host_losses,
                    outage_s=profile.outage_s, dynamodb_outage_s=profile.dynamodb_outage_s)
    assert shortfalls(profile, full, {"problems": []}) == []
    none = Injected()
    found = shortfalls(profile, none, {"problems": ["never_sent: injected 0"]})
    assert [p.split(":")[0] for p in found] == [
        "never_sent", "kills", "host_losses", "outage_s", "dynamodb_outage_s"]


# --- Docker's event stream (devstack/docker_events.py) ---

class FakeStream:
    def __init__(self, events, fail: bool):
        self._events, self._fail = events, fail

    def __iter__(self):
        yield from self._events
        if self._fail:
            raise ConnectionError("docker went away")

    def close(self):
        pass


class FakeDocker:
    def __init__(self, events, fail=False):
        self.stream = FakeStream(events, fail)

    def events(self, **_):
        return self.stream


def docker_event(container, action, host="h"):
    return {"Action": action, "timeNano": 1e9, "Actor": {
        "ID": container, "Attributes": {"runnerhub.host": host, "runnerhub.runner": container,
                                        "image": "img"}}}


def test_the_timeline_records_start_and_die_in_order_for_its_hosts():
    from devstack.docker_events import ContainerTimeline

    client = FakeDocker([docker_event("a", "start"), docker_event("b", "start", host="other"),
                         docker_event("a", "die")])
    assert [(e.container, e.action) for e in ContainerTimeline(client, ["h"]).close()] == [
        ("a", "start"), ("a", "die")]


def test_a_broken_event_stream_fails_the_judge_instead_of_truncating_its_record():
    from devstack.docker_events import ContainerTimeline, DockerEventLog

    with pytest.raises(RuntimeError, match="event stream broke"):
        ContainerTimeline(FakeDocker([docker_event("a", "start")], fail=True)).close()
    with pytest.raises(RuntimeError, match="event stream broke"):
        DockerEventLog(FakeDocker([], fail=True), "start", "h").close()


def kill(runner, at, action="kill", host="h"):
    return ContainerEvent(time=at, host=host, container=f"c-{runner}", action=action,
                          runner=runner)


def ran(job_id, runner, taken_at, completed_at=None):
    return {"job_id": job_id, "runner_name": runner, "taken_at": taken_at,
            "completed_at": completed_at}


def test_a_runner_stopped_mid_job_is_busy_killed():
    found = busy_killed([kill("r1", 105.0)], {1: ran(1, "r1", 100.0, 110.0)})
    assert list(found) == [1]
    assert "r1" in found[1] and "5.0s into the job" in found[1]


def test_a_runner_stopped_mid_job_that_never_completed_is_busy_killed():
    assert list(busy_killed([kill("r1", 105.0)], {1: ran(1, "r1", 100.0, None)})) == [1]


def test_a_runner_stopped_after_its_job_completed_is_not_busy_killed():
    assert busy_killed([kill("r1", 111.0)], {1: ran(1, "r1", 100.0, 110.0)}) == {}


def test_an_idle_runner_stopped_before_any_job_is_not_busy_killed():
    # scale-in retiring an idle runner: it had no job, or got one only after the kill
    assert busy_killed([kill("idle", 90.0)], {1: ran(1, "r1", 100.0, 110.0)}) == {}
    assert busy_killed([kill("r1", 99.0)], {1: ran(1, "r1", 100.0, 110.0)}) == {}


def test_a_runner_dying_on_its_own_is_not_busy_killed():
    assert busy_killed([kill("r1", 105.0, action="die")], {1: ran(1, "r1", 100.0, 110.0)}) == {}


def test_the_timeline_keeps_kills_with_their_runner_names():
    from devstack.docker_events import ContainerTimeline

    client = FakeDocker([docker_event("a", "start"), docker_event("a", "kill"),
                         docker_event("a", "die")])
    assert [(e.action, e.runner) for e in ContainerTimeline(client, ["h"]).close()] == [
        ("start", "a"), ("kill", "a"), ("die", "a")]


def started(runner, at, host="h"):
    return kill(runner, at, action="start", host=host)


def died(runner, at, host="h"):
    return kill(runner, at, action="die", host=host)


def test_a_host_terminated_while_its_runner_ran_a_job_is_caught_even_if_the_job_survived():
    # The daemon drained after the instance was gone: the job completed, yet the scaler chose
    # a busy host.
    events = [started("r1", 99.0), died("r1", 111.0)]
    found = busy_at_termination(events, {1: ran(1, "r1", 100.0, 110.0)}, {"h": 105.0})
    assert list(found) == [1] and "r1" in found[1]


def test_a_host_terminated_after_its_runners_exited_is_fine():
    events = [started("r1", 99.0), died("r1", 110.5)]
    assert busy_at_termination(events, {1: ran(1, "r1", 100.0, 110.0)}, {"h": 120.0}) == {}


def test_an_idle_runner_left_on_a_terminated_host_is_not_a_busy_one():
    events = [started("idle", 99.0)]
    assert busy_at_termination(events, {1: ran(1, "r1", 100.0, 110.0)}, {"h": 105.0}) == {}


def test_another_hosts_termination_does_not_count_this_hosts_runners():
    events = [started("r1", 99.0, host="busy"), died("r1", 111.0, host="busy")]
    assert busy_at_termination(events, {1: ran(1, "r1", 100.0, 110.0)},
                               {"other": 105.0}) == {}
