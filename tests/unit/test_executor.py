"""The executor's decisions and its handling of each message, with in-memory fakes of its own
interfaces (queue, GitHub, Docker) and the in-memory job and runner stores."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pydantic import SecretStr

from chalicelib import jobs as m
from chalicelib.demand import DEMAND_SCHEMA_VERSION, DemandMessage
from chalicelib.github import GitHubError, JitRunner
from chalicelib.jobs import Change, JobRecord
from chalicelib.memory import (
    InMemoryClaimIndex,
    InMemoryDemandQueue,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.pools import load_pools
from executor.containers import ContainerStartFailed, RunnerContainer
from executor.daemon import Executor
from executor.launch import runner_name
from executor.messages import Accepted, Malformed, TooNew, classify, drop_reason
from executor.metrics import ExecutorMetrics
from executor.queue import Received
from executor.redemand import backoff_s
from executor.settings import ExecutorSettings
from executor.slots import Slots
from tests.conftest import ROOT

POOLS = load_pools()
SMALL = POOLS.by_name("linux-small")
JOB = 77


def message(**overrides) -> DemandMessage:
    fields = dict(schema_version=DEMAND_SCHEMA_VERSION, job_id=JOB, generation=1,
                  pool="linux-small", labels=("self-hosted", "linux"),
                  repository="runnerhub-demo/api", owner="runnerhub-demo", installation_id=9,
                  created_at=1.0)
    return DemandMessage(**(fields | overrides))


# --- classify / drop_reason (pure) ------------------------------------------------------------

def test_classify_accepts_current_version():
    assert isinstance(classify(message().model_dump_json(), "linux-small"), Accepted)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"job_id": 1}', "schema_version missing"),
        ('{"schema_version": "1"}', "schema_version missing or not an integer"),
        ('{"schema_version": 0}', "older than this executor accepts"),
        ('{"schema_version": 1, "job_id": -3}', "job_id"),
    ],
)
def test_classify_rejects_malformed_with_reason(body, reason):
    verdict = classify(body, "linux-small")
    assert isinstance(verdict, Malformed) and reason in verdict.reason


def test_classify_leaves_newer_version_for_an_upgraded_executor():
    body = json.dumps(message().model_dump() | {"schema_version": DEMAND_SCHEMA_VERSION + 1})
    assert classify(body, "linux-small") == TooNew(DEMAND_SCHEMA_VERSION + 1)


def test_classify_accepts_unknown_fields_of_the_current_version():
    body = json.dumps(message().model_dump() | {"added_later": True})
    assert isinstance(classify(body, "linux-small"), Accepted)


def test_classify_rejects_message_on_another_pools_queue():
    verdict = classify(message(pool="gpu").model_dump_json(), "linux-small")
    assert isinstance(verdict, Malformed) and "queue of pool linux-small" in verdict.reason


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        (None, "unknown_job"),
        ({"state": "in_progress", "demand_generation": 1}, "job_in_progress"),
        ({"state": "completed", "demand_generation": 1}, "job_completed"),
        ({"state": "dispatched", "demand_generation": 2}, "stale_generation"),
        ({"state": "claimed", "demand_generation": 1}, "claimed_already"),
        ({"state": "waiting"}, "stale_generation"),
    ],
)
def test_drop_reason(job, reason):
    assert drop_reason(JobRecord(job_id=JOB, **job) if job else None, 1) == reason


def test_runner_names_are_unique_and_short():
    names = {runner_name(12345678901, 3) for _ in range(50)}
    assert len(names) == 50 and all(len(name) <= 64 for name in names)


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(n, 5, 30) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def test_slots_never_exceed_total():
    slots = Slots(2)
    assert slots.try_take("a") and slots.try_take("b") and not slots.try_take("c")
    assert slots.wait_free(0.01) == 0
    assert slots.release("a")
    assert slots.wait_free(0.01) == 1


# --- the daemon's handling of one message -----------------------------------------------------

class FakeConsumer:
    def __init__(self):
        self.deleted, self.visibility, self.dead = [], [], []
        self.inbox: list[Received] = []

    def receive(self, pool, max_messages, wait_s, visibility_s):
        batch = [r for r in self.inbox if r.pool == pool][:max_messages]
        for item in batch:
            self.inbox.remove(item)
        if not batch:
            time.sleep(0.01)
        return batch

    def delete(self, received):
        self.deleted.append(received.message_id)

    def recycle(self, received):
        self.recycled = [*getattr(self, "recycled", []), received.message_id]

    def set_visibility(self, received, seconds):
        self.visibility.append((received.message_id, seconds))

    def dead_letter(self, received, reason):
        self.dead.append((received.message_id, reason))


class FakeGitHub:
    """GitHub as the executor sees it: JIT runners (registered until deleted; a busy one can't
    be deleted) and jobs' statuses."""

    def __init__(self, fail_status=None):
        self.fail_status = fail_status
        self.jit, self.deleted = [], []
        self.runners: dict[int, dict] = {}
        self.job_status: dict[int, str] = {}
        self.down = False

    def generate_jitconfig(self, installation, scope, name, labels, group):
        if self.fail_status:
            raise GitHubError(self.fail_status, "POST", "/generate-jitconfig", "boom")
        self.jit.append((installation, scope, name, tuple(labels), group))
        runner_id = len(self.jit)
        self.runners[runner_id] = {"id": runner_id, "name": name, "status": "online",
                                   "busy": False}
        return JitRunner(runner_id, name, SecretStr("SECRET-JIT"))

    def register(self, runner_id, name, status="online", busy=False):
        self.runners[runner_id] = {"id": runner_id, "name": name, "status": status,
                                   "busy": busy}

    def _check(self, path):
        if self.down:
            raise GitHubError(503, "GET", path, "down")

    def delete_runner(self, installation, scope, runner_id):
        self._check("/runners")
        if self.runners.get(runner_id, {}).get("busy"):
            return False
        self.deleted.append(runner_id)
        self.runners.pop(runner_id, None)
        return True

    def get_runner(self, installation, scope, runner_id):
        self._check("/runners")
        return self.runners.get(runner_id)

    def list_runners(self, installation, scope):
        self._check("/runners")
        return list(self.runners.values())

    def get_job(self, installation, repository, job_id):
        self._check("/jobs")
        return {"id": job_id, "status": self.job_status.get(job_id, "queued")}

    def installation_for(self, owner, repo=None):
        return 9


class FakeContainers:
    def __init__(self, fail=False):
        self.fail, self.started, self.removed, self.stopped = fail, [], [], []
        self.status: dict[str, str] = {}  # name -> docker status (default: running)
        self.exit_codes: dict[str, int] = {}  # name -> exit code once exited (default 0)
        self.logs: dict[str, str] = {}  # name -> its output (log_tail)
        self.left: list[RunnerContainer] = []  # containers of a previous daemon
        self.files: set[str] = set()
        self.network_released = False

    def prepare(self, host_id=None):
        pass

    def start(self, spec, jit):
        if self.fail:
            raise ContainerStartFailed("image missing")
        assert jit.get_secret_value() == "SECRET-JIT"
        self.started.append(spec)
        return f"cid-{spec.name}"

    def managed(self, host):
        found = [c for c in self.left if c.name not in self.removed]
        for spec in self.started:
            if spec.name not in self.removed:
                status = self.status.get(spec.name, "running")
                found.append(RunnerContainer(spec.name, f"cid-{spec.name}", status,
                                             self.exit_codes.get(spec.name, 0)
                                             if status == "exited" else None, spec.labels))
        return found

    def log_tail(self, name, lines=20):
        return "\n".join(self.logs.get(name, "").splitlines()[-lines:])

    def stop(self, name, timeout_s=10):
        self.stopped.append(name)
        self.status[name] = "exited"

    def remove(self, name):
        self.removed.append(name)

    def remove_stray_files(self, keep):
        stray = sorted(self.files - set(keep))
        self.files -= set(stray)
        return stray

    def release_network(self, host_id):
        self.network_released = True
        return True


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def make_executor(jobs, runners, hosts, *, host_id="h1", clock=None, github=None,
                  containers=None, demand=None, **settings):
    settings = ExecutorSettings(host_id=host_id, slots=settings.pop("slots", 2),
                                start_backoff_s=5, **settings)
    return Executor(
        settings, POOLS.pools, jobs=jobs, runners=runners, hosts=hosts,
        claims=InMemoryClaimIndex(jobs), consumer=FakeConsumer(),
        demand=demand if demand is not None else InMemoryDemandQueue(),
        github=github or FakeGitHub(), containers=containers or FakeContainers(),
        metrics=ExecutorMetrics(), clock=clock or Clock(),
    )


def receive_job(jobs, job_id=JOB, now=1.0):
    jobs.apply(job_id, m.RECEIVE, now, Change(facts={
        "pool": "linux-small", "repository": "runnerhub-demo/api", "owner": "runnerhub-demo",
        "labels": ["self-hosted", "linux"], "installation_id": 9}))


@pytest.fixture
def app_env(monkeypatch):
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_ID", "1")
    monkeypatch.setenv("RUNNERHUB_GITHUB_APP_KEY_FILE", "/dev/null")


@pytest.fixture
def world(app_env):
    jobs = InMemoryJobStore()
    receive_job(jobs)
    return make_executor(jobs, InMemoryRunnerStore(), InMemoryHostStore())


def received(body: str, message_id: str = "m1") -> Received:
    return Received("linux-small", message_id, f"r-{message_id}", body, 1)


def test_demand_is_claimed_and_a_runner_started(world):
    assert world.server.handle(received(message().model_dump_json())) is True
    job = world.ctx.jobs.get(JOB)
    assert job.state == "runner_started" and job.host_id == "h1"
    assert job.lease_until == 100.0 + world.settings.lease_s
    (spec,) = world.ctx.containers.started
    assert spec.image == SMALL.image and spec.cpus == SMALL.cpus
    assert spec.labels["runnerhub.job"] == str(JOB)
    _, scope, name, labels, group = world.ctx.github.jit[0]
    assert (scope.path, labels, group) == ("/orgs/runnerhub-demo/actions/runners", SMALL.labels,
                                           SMALL.runner_group_id)
    assert world.ctx.runners.get(name).state == "idle"
    assert world.ctx.consumer.deleted == ["m1"]


def test_malformed_message_goes_to_the_dlq_and_is_counted(world):
    assert world.server.handle(received("{nope")) is False
    assert world.ctx.consumer.dead == [("m1", "body is not JSON")]
    assert world.metrics.value("runnerhub_messages_rejected_total", pool="linux-small",
                               reason="malformed") == 1


def test_newer_schema_is_delayed_not_dead_lettered(world):
    body = json.dumps(message().model_dump() | {"schema_version": DEMAND_SCHEMA_VERSION + 1})
    assert world.server.handle(received(body)) is False
    assert world.ctx.consumer.visibility == [("m1", world.settings.newer_schema_delay_s)]
    assert world.ctx.consumer.dead == [] and world.ctx.consumer.deleted == []


@pytest.mark.parametrize("state_move", [m.START_JOB, m.COMPLETE])
def test_demand_for_job_in_progress_or_completed_starts_nothing(world, state_move):
    world.ctx.jobs.apply(JOB, state_move, 50.0)
    assert world.server.handle(received(message().model_dump_json())) is False
    assert world.ctx.containers.started == [] and world.ctx.consumer.deleted == ["m1"]


def test_stale_generation_starts_nothing(world):
    world.ctx.jobs.apply(JOB, m.REDEMAND, 50.0, generation=1)
    assert world.server.handle(received(message().model_dump_json())) is False
    assert world.ctx.containers.started == []
    assert world.metrics.value("runnerhub_demand_dropped_total", pool="linux-small",
                               reason="stale_generation") == 1


def test_not_before_delays_the_message(world):
    body = message(not_before=130.0).model_dump_json()
    assert world.server.handle(received(body)) is False
    assert world.ctx.consumer.visibility == [("m1", 30)]
    assert world.ctx.jobs.get(JOB).state == "received"


@pytest.mark.parametrize("failure", ["github", "docker"])
def test_failed_start_re_demands_with_backoff_and_cleans_up(world, failure):
    if failure == "github":
        world.ctx.github.fail_status = 503
    else:
        world.ctx.containers.fail = True
    assert world.server.handle(received(message().model_dump_json())) is False
    job = world.ctx.jobs.get(JOB)
    assert job.state == "dispatched" and job.demand_generation == 2
    assert job.start_failures == 1 and "flagged" not in job.as_dict()
    (again,) = world.ctx.demand.messages
    assert (again.generation, again.not_before) == (2, 105.0)
    assert world.ctx.consumer.deleted == ["m1"]
    runner = next(iter(world.ctx.runners.records.values()))
    assert runner["state"] == "gone"
    if failure == "docker":
        assert world.ctx.github.deleted == [1]  # the registered JIT runner is removed again


def test_repeated_failed_starts_flag_the_job_but_keep_it_open(world):
    world.ctx.containers.fail = True
    for generation in (1, 2, 3):
        body = message(generation=generation).model_dump_json()
        world.server.handle(received(body, f"m{generation}"))
    job = world.ctx.jobs.get(JOB)
    assert job.start_failures == 3 and job.flagged is True
    assert job.state == "dispatched" and job.demand_generation == 4
    assert world.metrics.value("runnerhub_jobs_flagged_total", pool="linux-small") == 1
    assert world.ctx.demand.messages[-1].not_before == 100.0 + 20.0


def test_stopping_executor_makes_unstarted_demand_visible_at_once(world):
    world.stop()
    assert world.server.handle(received(message().model_dump_json())) is False
    assert world.ctx.consumer.visibility == [("m1", 0)]


# --- configuration ----------------------------------------------------------------------------

def run_executor(env: dict) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "executor"], env=base | env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("env", "message_part"),
    [
        ({}, "RUNNERHUB_GITHUB_APP_SECRET_ID"),
        ({"RUNNERHUB_GITHUB_APP_ID": "1", "RUNNERHUB_GITHUB_APP_KEY_FILE": "/nope.pem"},
         "not found"),
        ({"RUNNERHUB_GITHUB_APP_SECRET_ID": "x", "RUNNERHUB_SLOTS": "0"}, "slots"),
        ({"RUNNERHUB_GITHUB_APP_SECRET_ID": "x", "RUNNERHUB_EXECUTOR_POOLS": "nope"},
         "unknown pools nope"),
        ({"RUNNERHUB_GITHUB_APP_SECRET_ID": "x", "RUNNERHUB_POOLS_FILE": "/missing.toml"},
         "cannot read pools file"),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(env, message_part):
    result = run_executor(env)
    assert result.returncode == 2, result.stderr
    assert "invalid configuration" in result.stderr and message_part in result.stderr
    assert "Traceback" not in result.stderr


def test_newer_schema_near_the_receive_limit_is_recycled_not_dead_lettered(world):
    from chalicelib.resources import DEMAND_MAX_RECEIVES

    body = json.dumps(message().model_dump() | {"schema_version": DEMAND_SCHEMA_VERSION + 1})
    late = Received("linux-small", "m9", "r-m9", body, DEMAND_MAX_RECEIVES - 1)
    assert world.server.handle(late) is False
    assert world.ctx.consumer.recycled == ["m9"] and world.ctx.consumer.dead == []


def test_claim_refused_to_a_retiring_host_is_recycled_without_burning_a_receive(world):
    from chalicelib.resources import DEMAND_MAX_RECEIVES

    world._beat(force=True)
    assert world.ctx.hosts.retire("h1", 100.0, fresh_after=90.0, by="scaler")
    # One receive short of the DLQ: a plain requeue would dead-letter it at the next receive.
    late = Received("linux-small", "m1", "r-m1", message().model_dump_json(),
                    DEMAND_MAX_RECEIVES - 1)
    assert world.server.handle(late) is False
    assert world.ctx.consumer.recycled == ["m1"]
    assert world.ctx.consumer.visibility == [] and world.ctx.consumer.dead == []
    assert world.ctx.jobs.get(JOB).state == "received"  # the claim never happened
    assert not world.ctx.receiving.is_set()  # it receives nothing more while retiring
    assert world.metrics.value("runnerhub_messages_rejected_total", pool="linux-small",
                               reason="host_not_serving") == 1


def test_runner_exiting_0_before_any_job_gives_its_demand_back(world):
    assert world.server.handle(received(message().model_dump_json())) is True
    (spec,) = world.ctx.containers.started
    world.ctx.containers.status[spec.name] = "exited"  # exit code 0, never busy
    world._tick()
    job = world.ctx.jobs.get(JOB)
    assert job.state == "dispatched" and job.demand_generation == 2
    assert "start_failures" not in job  # a clean exit is not a failed start
    assert [m.generation for m in world.ctx.demand.messages] == [2]


def test_a_change_of_busy_slots_is_heartbeated_within_a_second_not_an_interval(app_env):
    # The scaler sizes the pool from heartbeats: a stale busy count would hold a burst back.
    jobs, hosts, clock = InMemoryJobStore(), InMemoryHostStore(), Clock(100.0)
    executor = make_executor(jobs, InMemoryRunnerStore(), hosts, clock=clock, heartbeat_s=10)
    executor._beat(force=True)
    assert hosts.get("h1").slots_busy == 0
    assert executor.slots.try_take("m1")
    clock.now += 0.5
    executor._beat()  # changed, but within a second of the last beat: not yet
    assert hosts.get("h1").slots_busy == 0
    clock.now += 0.6
    executor._beat()  # changed, a second on: written now, not at 110
    assert hosts.get("h1").slots_busy == 1
    clock.now += 2.0
    executor._beat()  # unchanged: nothing until the interval is up
    assert hosts.get("h1").heartbeat_at == 101.1
