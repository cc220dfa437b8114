"""Lifecycle hooks and Spot interruptions on the daemon side (executor/lifecycle.py): the IMDS
stand-in (devstack/imds.py) over real HTTP, a fake of the hook's two Auto Scaling calls (moto
has neither), the in-memory stores and the executor fakes of tests/unit/test_executor.py.
botocore's Stubber pins the calls' parameter shapes."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from chalicelib import jobs as m
from chalicelib.errors import DependencyUnavailable
from chalicelib.github import GitHubError
from chalicelib.hosts import HostState
from chalicelib.jobs import Change, JobState
from chalicelib.memory import (
    InMemoryClaimIndex,
    InMemoryDemandQueue,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.runners import RunnerState
from devstack.imds import ImdsStandIn
from executor import daemon as daemon_module
from executor import lifecycle as lc
from executor.daemon import Executor
from executor.imds import Imds, parse_spot_notice
from executor.intake import Held
from executor.lifecycle import AwsLifecycleActions, Lifecycle, Lost
from executor.metrics import ExecutorMetrics
from executor.settings import ExecutorSettings
from tests.conftest import wait_for
from tests.unit.test_executor import (
    JOB,
    POOLS,
    Clock,
    FakeConsumer,
    FakeContainers,
    FakeGitHub,
    app_env,  # noqa: F401 - fixture
    message,
    receive_job,
    received,
)

INSTANCE = "i-0123456789abcdef0"
REPO = "runnerhub-demo/api"


class RerunGitHub(FakeGitHub):
    """GitHub with the re-run call: answers `refuse` (e.g. 403 while the run still runs) for
    the first calls, then 201."""

    def __init__(self, refuse: list[int] | None = None):
        super().__init__()
        self.refuse = list(refuse or [])
        self.reruns: list[tuple[int, str, int]] = []
        self.calls = 0

    def rerun_job(self, installation_id, repository, job_id):
        self.calls += 1
        if self.refuse:
            raise GitHubError(self.refuse.pop(0), "POST", f"/repos/{repository}/actions/jobs/"
                              f"{job_id}/rerun", "This workflow is already running")
        self.reruns.append((installation_id, repository, job_id))


class FakeActions:
    """The hook's heartbeat and completion; `fail` makes every call raise it."""

    hook_name = "drain-hook"

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.calls: list[tuple[str, str, float]] = []

    def heartbeat(self, instance_id):
        self.calls.append(("heartbeat", instance_id, time.monotonic()))
        if self.fail:
            raise self.fail

    def complete(self, instance_id):
        self.calls.append(("complete", instance_id, time.monotonic()))
        if self.fail:
            raise self.fail


@pytest.fixture
def imds():
    with ImdsStandIn(INSTANCE) as standin:
        yield standin


def pools(rerun: bool):
    return tuple(p.model_copy(update={"rerun_on_spot_interruption": rerun}) for p in POOLS.pools)


def build(imds_standin, *, actions=None, github=None, rerun=False, clock=time.time, jobs=None,
          **settings) -> Executor:
    if jobs is None:
        jobs = InMemoryJobStore()
        receive_job(jobs)
    base = dict(host_id=INSTANCE, slots=2, tick_s=0.05, poll_wait_s=0, drain_timeout_s=30,
                heartbeat_s=10.0, lifecycle_poll_s=0.2, imds_endpoint=imds_standin.endpoint,
                imds_timeout_s=0.5, imds_attempts=1)
    settings = ExecutorSettings(**(base | settings))
    imds = Imds(settings.imds_endpoint, timeout_s=settings.imds_timeout_s,
                attempts=settings.imds_attempts)

    def lifecycle(ctx, **kwargs):
        return Lifecycle(ctx, imds=imds, actions=actions, **kwargs)

    return Executor(
        settings, pools(rerun), jobs=jobs, runners=InMemoryRunnerStore(),
        hosts=InMemoryHostStore(), claims=InMemoryClaimIndex(jobs), consumer=FakeConsumer(),
        demand=InMemoryDemandQueue(), github=github or RerunGitHub(),
        containers=FakeContainers(), metrics=ExecutorMetrics(), clock=clock,
        lifecycle=lifecycle)


def running(executor: Executor) -> tuple[threading.Thread, dict]:
    """The daemon's `run()` in a thread, serving one job; returns once its runner has the job
    (the runner record `busy`, as the `in_progress` webhook writes it)."""
    result: dict = {}
    executor.ctx.consumer.inbox.append(received(message().model_dump_json()))
    thread = threading.Thread(target=lambda: result.update(clean=executor.run()), daemon=True)
    thread.start()
    assert wait_for(lambda: executor.registry.local, 5)
    (local,) = executor.registry.local.values()
    now = executor.ctx.clock()
    executor.ctx.github.runners[local.runner_id]["busy"] = True
    executor.ctx.runners.move(local.name, RunnerState.BUSY, now, took_job_id=JOB)
    executor.ctx.jobs.apply(JOB, m.START_JOB, now, Change(fields={"runner_name": local.name}))
    return thread, result


def finish_jobs(executor: Executor) -> None:
    for name in list(executor.registry.local):
        executor.ctx.containers.status[name] = "exited"  # the job ends: its runner exits


def value(executor, name, **labels) -> float:
    return executor.metrics.value(name, **labels)


# --- IMDS: the notice, the state ----------------------------------------------------------------


def test_spot_notice_parses_action_and_time():
    notice = parse_spot_notice('{"action": "terminate", "time": "2026-12-01T17:30:00Z"}')
    assert notice.action == "terminate"
    assert notice.at == datetime(2026, 12, 1, 17, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("body", ["not json", "[1]", '{"action": 3}', '{"time": "soon"}'])
def test_malformed_spot_notice_is_still_a_notice_effective_now(body):
    notice = parse_spot_notice(body)
    assert notice.at is None and notice.action in ("unknown", "terminate")


def test_imds_reads_state_and_notice_over_http(imds):
    with Imds(imds.endpoint, timeout_s=0.5) as client:
        assert client.target_lifecycle_state() is None and client.spot_notice() is None
        imds.set_target_lifecycle_state("Terminated")
        imds.set_spot_instance_action("terminate", "2026-12-01T17:30:00Z")
        assert client.target_lifecycle_state() == "Terminated"
        assert client.spot_notice().action == "terminate"


# --- nothing to see -------------------------------------------------------------------------------


def test_imds_404_no_hook_not_spot_changes_nothing(app_env, imds):  # noqa: F811
    actions = FakeActions()
    executor = build(imds, actions=actions)
    executor.lifecycle.poll()
    executor.lifecycle.poll()
    assert not executor.ctx.stopping.is_set()
    assert not executor.lifecycle.terminating and executor.lifecycle.notice is None
    assert actions.calls == []
    assert ("GET", "/latest/meta-data/autoscaling/target-lifecycle-state", 404) in imds.requests
    assert ("GET", "/latest/meta-data/spot/instance-action", 404) in imds.requests


def test_in_service_state_changes_nothing(app_env, imds):  # noqa: F811
    imds.set_target_lifecycle_state("InService")
    executor = build(imds, actions=FakeActions())
    executor.lifecycle.poll()
    assert not executor.ctx.stopping.is_set() and not executor.lifecycle.terminating


def test_unreachable_imds_is_counted_never_fatal(app_env, imds):  # noqa: F811
    executor = build(imds, actions=FakeActions())
    imds.answer_next(503, 503)
    executor.lifecycle.poll()
    imds.stop()  # refused from now on
    executor.lifecycle.poll()
    assert value(executor, "runnerhub_imds_poll_failures_total") == 2
    assert not executor.ctx.stopping.is_set()


# --- Terminated: drain, heartbeats, complete, exit --------------------------------------------


def test_terminated_drains_heartbeats_while_busy_then_completes_and_exits_clean(
        app_env, imds):  # noqa: F811
    actions = FakeActions()
    executor = build(imds, actions=actions, lifecycle_heartbeat_s=1)
    thread, result = running(executor)
    imds.set_target_lifecycle_state("Terminated")
    assert wait_for(lambda: executor.ctx.stopping.is_set(), 5)
    # While the job runs: receiving stopped, the hook's timeout pushed back every second.
    assert wait_for(lambda: sum(c[0] == "heartbeat" for c in actions.calls) >= 3, 6)
    assert not any(c[0] == "complete" for c in actions.calls)
    assert executor.registry.local  # nothing was stopped: the job still runs
    finish_jobs(executor)
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert [c[0] for c in actions.calls][-1] == "complete"
    assert sum(c[0] == "complete" for c in actions.calls) == 1
    assert {c[1] for c in actions.calls} == {INSTANCE}  # the host id is the instance id
    beats = [c[2] for c in actions.calls if c[0] == "heartbeat"]
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(beats))
    assert executor.ctx.containers.stopped == []  # the job was never cut short
    assert executor.ctx.jobs.get(JOB).state is JobState.IN_PROGRESS  # no re-demand
    assert value(executor, "runnerhub_lifecycle_actions_total", call="complete",
                 outcome="ok") == 1
    assert value(executor, "runnerhub_lifecycle_terminations_total") == 1


def test_terminated_without_a_hook_makes_no_call_and_exits_clean(app_env, imds):  # noqa: F811
    imds.set_target_lifecycle_state("Terminated")
    executor = build(imds, actions=None)
    result = {}
    thread = threading.Thread(target=lambda: result.update(clean=executor.run()), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert executor.lifecycle.terminating and not executor.lifecycle.completed


def test_lifecycle_drain_outlasts_the_sigterm_drain_timeout_while_heartbeats_go_on(
        app_env, imds):  # noqa: F811
    # The hook's heartbeat timeout is the SIGTERM drain timeout (600 s): a lifecycle drain
    # that ended there would cut every job longer than 10 minutes short.
    clock = Clock(time.time())
    actions = FakeActions()
    executor = build(imds, actions=actions, clock=clock, drain_timeout_s=600,
                     lifecycle_heartbeat_s=60)
    thread, result = running(executor)
    imds.set_target_lifecycle_state("Terminated")
    assert wait_for(lambda: executor.ctx.stopping.is_set(), 5)

    def heartbeats():
        return sum(c[0] == "heartbeat" for c in actions.calls)

    assert wait_for(lambda: heartbeats() == 1, 5)
    for minute in range(1, 13):  # 12 minutes of drain, one heartbeat a minute
        clock.now += 60
        assert wait_for(lambda: heartbeats() == 1 + minute, 5), minute  # noqa: B023
    time.sleep(0.3)  # monitor ticks at 12 minutes: past drain_timeout_s
    assert executor.registry.local and executor.ctx.containers.stopped == []
    assert thread.is_alive()
    finish_jobs(executor)
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert executor.ctx.containers.stopped == []  # the job was never cut short
    assert [c[0] for c in actions.calls][-1] == "complete"


def test_lifecycle_drain_ends_at_lifecycle_drain_timeout(app_env, imds):  # noqa: F811
    clock = Clock(time.time())
    executor = build(imds, actions=FakeActions(), clock=clock, drain_timeout_s=600,
                     lifecycle_drain_timeout_s=3600)
    thread, result = running(executor)
    (name,) = executor.registry.local
    imds.set_target_lifecycle_state("Terminated")
    assert wait_for(lambda: executor.ctx.stopping.is_set(), 5)
    clock.now += 3599
    time.sleep(0.3)
    assert executor.ctx.containers.stopped == []
    clock.now += 2
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert executor.ctx.containers.stopped == [name]


@pytest.mark.parametrize("terminated", [True, False])
def test_sigterm_drain_keeps_drain_timeout_even_during_a_lifecycle_drain(
        app_env, imds, terminated):  # noqa: F811
    clock = Clock(time.time())
    executor = build(imds, actions=FakeActions(), clock=clock, drain_timeout_s=600)
    thread, result = running(executor)
    (name,) = executor.registry.local
    if terminated:
        imds.set_target_lifecycle_state("Terminated")
        assert wait_for(lambda: executor.lifecycle.terminating, 5)
    executor.stop()  # `systemctl stop`: one SIGTERM, not a second one (nothing is forced)
    assert wait_for(lambda: executor.ctx.stopping.is_set(), 5)
    time.sleep(0.3)
    assert executor.registry.local and executor.ctx.containers.stopped == []
    clock.now += 601  # past drain_timeout_s: systemd would SIGKILL a minute later
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert executor.ctx.containers.stopped == [name]


# --- a daemon started on an instance that is ending -----------------------------------------


def record_beats(executor: Executor) -> list[HostState]:
    states: list[HostState] = []
    beat = executor.ctx.hosts.beat

    def recording(heartbeat, now):
        states.append(heartbeat.state)
        return beat(heartbeat, now)

    executor.ctx.hosts.beat = recording
    return states


def record_receives(executor: Executor) -> list[str]:
    pools: list[str] = []
    receive = executor.ctx.consumer.receive

    def recording(pool, *args):
        pools.append(pool)
        return receive(pool, *args)

    executor.ctx.consumer.receive = recording
    return pools


@pytest.mark.parametrize("ending", ["terminated", "spot"])
def test_started_on_an_ending_instance_it_receives_nothing_and_never_says_serving(
        app_env, imds, ending):  # noqa: F811
    # systemd restarted it after a drain (or a person did): the first IMDS poll must come
    # before any poller and before a heartbeat says `serving`.
    if ending == "terminated":
        imds.set_target_lifecycle_state("Terminated")
    else:
        notice_now(imds, seconds_ahead=90)
    actions = FakeActions()
    executor = build(imds, actions=actions)
    states, receives = record_beats(executor), record_receives(executor)
    executor.ctx.consumer.inbox.append(received(message().model_dump_json()))
    result = {}
    thread = threading.Thread(target=lambda: result.update(clean=executor.run()), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert receives == [] and len(executor.ctx.consumer.inbox) == 1
    assert executor.ctx.containers.started == []
    assert HostState.SERVING not in states
    assert states[0] is HostState.DRAINING and states[-1] is HostState.STOPPED
    if ending == "terminated":
        assert [c[0] for c in actions.calls] == ["complete"]
    else:
        assert executor.lifecycle.notice is not None and actions.calls == []


def test_started_with_imds_unreadable_it_serves(app_env, imds):  # noqa: F811
    imds.stop()  # refused: the start-up look fails, counted, and the daemon serves
    executor = build(imds, actions=FakeActions())
    states = record_beats(executor)
    executor.ctx.consumer.inbox.append(received(message().model_dump_json()))
    thread = threading.Thread(target=executor.run, daemon=True)
    thread.start()
    assert wait_for(lambda: executor.ctx.containers.started, 5)
    executor.stop()
    executor.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert states[0] is HostState.SERVING
    assert value(executor, "runnerhub_imds_poll_failures_total") >= 1


@pytest.mark.parametrize("failure", [
    DependencyUnavailable("autoscaling", "RequestTimeout"),
    ClientError({"Error": {"Code": "ValidationError",
                           "Message": "No active Lifecycle Action found"}},
                "CompleteLifecycleAction"),
    ClientError({"Error": {"Code": "InternalFailure", "Message": "not yet implemented"},
                 "ResponseMetadata": {"HTTPStatusCode": 500}}, "RecordLifecycleActionHeartbeat"),
])
def test_lifecycle_call_failures_are_counted_not_fatal(app_env, imds, failure):  # noqa: F811
    actions = FakeActions(fail=failure)
    executor = build(imds, actions=actions, lifecycle_heartbeat_s=1)
    thread, result = running(executor)
    imds.set_target_lifecycle_state("Terminated")
    assert wait_for(lambda: any(c[0] == "heartbeat" for c in actions.calls), 5)
    finish_jobs(executor)
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert value(executor, "runnerhub_lifecycle_actions_total", call="heartbeat",
                 outcome="failed") >= 1
    assert value(executor, "runnerhub_lifecycle_actions_total", call="complete",
                 outcome="failed") == 1
    assert not executor.lifecycle.completed


# --- Spot: drain at once, record, re-run once where opted in ----------------------------------


def notice_now(imds, seconds_ahead: float = 0.0) -> None:
    at = datetime.fromtimestamp(time.time() + seconds_ahead, UTC)
    imds.set_spot_instance_action("terminate", at.strftime("%Y-%m-%dT%H:%M:%SZ"))


@pytest.mark.parametrize("rerun", [True, False])
def test_spot_notice_stops_runners_records_the_job_and_reruns_only_when_opted_in(
        app_env, imds, rerun):  # noqa: F811
    github = RerunGitHub()
    executor = build(imds, github=github, rerun=rerun, drain_timeout_s=600)
    thread, result = running(executor)
    (name,) = executor.registry.local
    notice_now(imds)  # two minutes are already gone: nothing may keep running
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert executor.ctx.containers.stopped == [name]  # stopped at once, not after 600 s
    job = executor.ctx.jobs.get(JOB)
    assert job.lost_to == "spot_interruption" and job.lost_runner == name
    assert job.lost_host == INSTANCE and job.state is JobState.IN_PROGRESS
    assert value(executor, "runnerhub_spot_interruptions_total") == 1
    assert value(executor, "runnerhub_spot_jobs_lost_total", pool="linux-small") == 1
    if rerun:
        assert github.reruns == [(9, REPO, JOB)]
        assert job.spot_rerun == "requested" and job.spot_rerun_at is not None
    else:
        assert github.calls == 0 and "spot_rerun_at" not in job.as_dict()


def test_spot_returns_held_messages_and_says_stopped_before_rerunning(
        app_env, imds, monkeypatch):  # noqa: F811
    # The re-runs may wait until the notice's time; a message still held meanwhile would stay
    # hidden until its visibility timeout, and the host would still say `draining`.
    monkeypatch.setattr(daemon_module, "STOP_RECEIVING_MARGIN_S", 0.1)
    seen: list[tuple[str, list]] = []

    class Watching(RerunGitHub):
        def rerun_job(self, installation_id, repository, job_id):
            seen.append((executor.ctx.hosts.get(INSTANCE).state,
                         list(executor.ctx.consumer.visibility)))
            super().rerun_job(installation_id, repository, job_id)

    github = Watching()
    executor = build(imds, github=github, rerun=True, drain_timeout_s=600)
    thread, result = running(executor)
    # A message a serving thread still holds when the runners are stopped.
    late = received(message(job_id=JOB + 1).model_dump_json(), "m9")
    executor.intake.held[late.receipt] = Held(late, executor.ctx.clock())
    notice_now(imds)
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert github.reruns == [(9, REPO, JOB)]
    assert seen == [("stopped", [("m9", 0)])]


def test_spot_notice_during_a_lifecycle_drain_cuts_it_short(app_env, imds):  # noqa: F811
    actions = FakeActions()
    executor = build(imds, actions=actions, drain_timeout_s=600)
    thread, result = running(executor)
    imds.set_target_lifecycle_state("Terminated")
    assert wait_for(lambda: any(c[0] == "heartbeat" for c in actions.calls), 5)
    assert executor.registry.local  # a lifecycle drain waits for the job
    notice_now(imds)
    thread.join(10)
    assert not thread.is_alive() and result["clean"] is True
    assert len(executor.ctx.containers.stopped) == 1
    assert executor.ctx.jobs.get(JOB).lost_to == "spot_interruption"
    assert [c[0] for c in actions.calls][-1] == "complete"


def test_spot_notice_lets_a_job_end_that_ends_before_the_deadline(app_env, imds):  # noqa: F811
    executor = build(imds, github=RerunGitHub(), rerun=True, spot_stop_before_s=0)
    thread, result = running(executor)
    notice_now(imds, seconds_ahead=30)
    assert wait_for(lambda: executor.ctx.stopping.is_set(), 5)
    finish_jobs(executor)  # the job ends well within the notice
    thread.join(10)
    assert result["clean"] is True and executor.ctx.containers.stopped == []
    assert "lost_to" not in executor.ctx.jobs.get(JOB).as_dict()
    assert executor.ctx.github.calls == 0


def lost_job(executor, rerun=True) -> Lost:
    executor.ctx.jobs.apply(JOB, m.NOTE_SPOT_LOST, 1.0, Change(fields={"lost_to": "spot"}))
    pool = pools(rerun)[0]
    return Lost(JOB, "r1", pool, executor.ctx.jobs.get(JOB))


def test_rerun_happens_once_however_often_it_is_tried(app_env, imds):  # noqa: F811
    github = RerunGitHub()
    executor = build(imds, github=github)
    lost = lost_job(executor)
    assert executor.lifecycle.rerun_lost([lost]) == {JOB: "requested"}
    assert executor.lifecycle.rerun_lost([lost]) == {JOB: "already"}
    # A restarted daemon (another Lifecycle on the same stores) sees the mark too.
    second = build(imds, github=github, jobs=executor.ctx.jobs)
    assert second.lifecycle.rerun_lost([lost]) == {JOB: "already"}
    assert github.reruns == [(9, REPO, JOB)]


def test_rerun_waits_while_github_says_the_run_still_runs(app_env, imds, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lc, "RERUN_RETRY_S", 0.01)
    github = RerunGitHub(refuse=[403, 403])
    executor = build(imds, github=github)
    assert executor.lifecycle.rerun_lost([lost_job(executor)]) == {JOB: "requested"}
    assert github.calls == 3 and github.reruns == [(9, REPO, JOB)]


def test_rerun_refused_until_the_end_is_recorded_refused(app_env, imds, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lc, "RERUN_RETRY_S", 0.01)
    monkeypatch.setattr(lc, "RERUN_MAX_ATTEMPTS", 4)
    github = RerunGitHub(refuse=[403] * 10)
    executor = build(imds, github=github)
    assert executor.lifecycle.rerun_lost([lost_job(executor)]) == {JOB: "refused"}
    assert github.calls == 4 and executor.ctx.jobs.get(JOB).spot_rerun == "refused"
    assert value(executor, "runnerhub_spot_reruns_total", pool="linux-small",
                 outcome="refused") == 1


def test_rerun_not_found_is_a_failure_not_retried(app_env, imds):  # noqa: F811
    github = RerunGitHub(refuse=[404])
    executor = build(imds, github=github)
    assert executor.lifecycle.rerun_lost([lost_job(executor)]) == {JOB: "failed_404"}
    assert github.calls == 1


def test_job_without_a_record_is_not_rerun(app_env, imds):  # noqa: F811
    github = RerunGitHub()
    executor = build(imds, github=github)
    lost = Lost(999, "r1", pools(True)[0], None)
    assert executor.lifecycle.rerun_lost([lost]) == {999: "failed_no_record"}
    assert github.calls == 0


# --- the moves, on both stores ----------------------------------------------------------------


def test_spot_rerun_mark_is_made_once(store):
    store.apply(JOB, m.RECEIVE, 1.0, Change(facts={"pool": "p"}))
    store.apply(JOB, m.COMPLETE, 2.0, Change(fields={"conclusion": "cancelled"}))
    first = store.apply(JOB, m.MARK_SPOT_RERUN, 3.0)
    assert first.applied and first.job.spot_rerun_at == 3.0
    assert first.job.state is JobState.COMPLETED  # a note: the state machine is untouched
    assert not store.apply(JOB, m.MARK_SPOT_RERUN, 4.0).applied
    assert store.get(JOB).spot_rerun_at == 3.0


def test_spot_loss_note_keeps_the_state_and_needs_a_record(store):
    assert not store.apply(JOB, m.NOTE_SPOT_LOST, 1.0).applied  # no record: not created
    store.apply(JOB, m.RECEIVE, 1.0, Change(facts={"pool": "p"}))
    store.apply(JOB, m.START_JOB, 2.0)
    noted = store.apply(JOB, m.NOTE_SPOT_LOST, 3.0, Change(fields={"lost_to": "spot"}))
    assert noted.applied and noted.job.state is JobState.IN_PROGRESS
    assert noted.job.spot_lost_at == 3.0 and noted.job.lost_to == "spot"


# --- the Auto Scaling calls' shapes (botocore Stubber) ------------------------------------------


@pytest.fixture
def autoscaling():
    client = boto3.client("autoscaling", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def test_aws_actions_look_up_the_group_once_then_heartbeat_and_complete(autoscaling):
    client, stubber = autoscaling
    stubber.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": [{
        "InstanceId": INSTANCE, "AutoScalingGroupName": "runnerhub-linux-small",
        "AvailabilityZone": "us-east-1a", "LifecycleState": "Terminating:Wait",
        "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": True}]},
        {"InstanceIds": [INSTANCE]})
    expected = {"LifecycleHookName": "drain", "AutoScalingGroupName": "runnerhub-linux-small",
                "InstanceId": INSTANCE}
    stubber.add_response("record_lifecycle_action_heartbeat", {}, expected)
    stubber.add_response("complete_lifecycle_action", {},
                         expected | {"LifecycleActionResult": "CONTINUE"})
    actions = AwsLifecycleActions(client, "drain")
    actions.heartbeat(INSTANCE)
    actions.complete(INSTANCE)


def test_aws_actions_with_a_named_group_never_look_it_up(autoscaling):
    client, stubber = autoscaling
    stubber.add_response("complete_lifecycle_action", {}, {
        "LifecycleHookName": "drain", "AutoScalingGroupName": "g1", "InstanceId": INSTANCE,
        "LifecycleActionResult": "CONTINUE"})
    AwsLifecycleActions(client, "drain", "g1").complete(INSTANCE)


def test_aws_actions_instance_in_no_group_is_a_clear_error(autoscaling):
    client, stubber = autoscaling
    stubber.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": []})
    with pytest.raises(LookupError, match="in no Auto Scaling group"):
        AwsLifecycleActions(client, "drain").heartbeat(INSTANCE)


def test_aws_actions_need_a_hook_name():
    with pytest.raises(ValueError, match="hook name"):
        AwsLifecycleActions(object(), "")


def test_factory_is_off_without_imds_and_makes_no_aws_client_without_a_hook(app_env):  # noqa: F811
    assert lc.factory(ExecutorSettings(host_id="h", imds_endpoint="")) is None
    made = lc.factory(ExecutorSettings(host_id="h", imds_endpoint="http://127.0.0.1:9"))
    assert made.keywords["actions"] is None
    made.keywords["imds"].close()
