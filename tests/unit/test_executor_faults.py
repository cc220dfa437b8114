"""Executor faults that once left a host over-committed, demand dead-lettered or lost, or a
failed start behind: a write failing after a runner started, a DynamoDB outage during a claim, a
runner leaving before its job without GitHub being asked (and a re-demand that fails), and a JIT
config file or Docker connection error during a start. The fakes are those of
tests/unit/test_executor.py; messages reach the daemon through its own poller, as in production,
so slots are taken and released as they really are."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import docker.errors
import pytest
import requests

from chalicelib import jobs as m
from chalicelib.errors import DependencyUnavailable
from chalicelib.jobs import JobRecord
from chalicelib.memory import (
    InMemoryDemandQueue,
    InMemoryHostStore,
    InMemoryJobStore,
    InMemoryRunnerStore,
)
from chalicelib.runners import RunnerState
from executor import launch
from executor.containers import RunnerContainers
from executor.recovery import GiveBack, give_back_step
from executor.slots import Slots
from tests.conftest import wait_for
from tests.unit.test_executor import (
    JOB,
    Clock,
    FakeGitHub,
    app_env,  # noqa: F401 - fixture
    make_executor,
    message,
    receive_job,
    received,
)

OTHER_JOB = 78
OUTAGE = DependencyUnavailable("dynamodb", "ServiceUnavailable")


class FaultyJobs(InMemoryJobStore):
    """The in-memory jobs store, with moves that fail as DynamoDB does when it is down."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.fail: dict[tuple[str, int], int] = {}  # (move, job) -> failures left
        self.attempts: dict[str, int] = {}

    def apply(self, job_id, move, now, change=m.NO_CHANGE, *, generation=None, host_id=None):
        self.attempts[move.name] = self.attempts.get(move.name, 0) + 1
        left = self.fail.get((move.name, job_id), 0)
        if left:
            self.fail[(move.name, job_id)] = left - 1
        if self.down or left:
            raise OUTAGE
        return super().apply(job_id, move, now, change, generation=generation, host_id=host_id)


class FaultyRunners(InMemoryRunnerStore):
    def __init__(self):
        super().__init__()
        self.fail_to: RunnerState | None = None

    def move(self, name, to, now, **fields):
        if to is self.fail_to:
            self.fail_to = None
            raise OUTAGE
        return super().move(name, to, now, **fields)


class FaultyQueue(InMemoryDemandQueue):
    def __init__(self):
        super().__init__()
        self.failures = 0

    def send(self, message):
        if self.failures:
            self.failures -= 1
            raise DependencyUnavailable("sqs", "ServiceUnavailable")
        return super().send(message)


class World:
    def __init__(self, **settings):
        self.clock = Clock(100.0)
        self.jobs = FaultyJobs()
        self.runners = FaultyRunners()
        self.demand = FaultyQueue()
        self.github = FakeGitHub()
        for job_id in (JOB, OTHER_JOB):
            receive_job(self.jobs, job_id)
        self.executor = make_executor(self.jobs, self.runners, InMemoryHostStore(),
                                      clock=self.clock, github=self.github, demand=self.demand,
                                      **settings)


@pytest.fixture
def world(app_env):  # noqa: F811 - the fixture imported above
    return World()


@contextmanager
def polling(executor, *items):
    """Hand messages to the daemon's own poller (it takes a slot per message and a serving
    thread serves it); on leaving, wait until every one was served and stop the poller."""
    done = []
    serve = executor.intake.serve

    def served(item):
        try:
            serve(item)
        finally:
            done.append(item.message_id)

    executor.intake.serve = served
    executor.ctx.consumer.inbox.extend(items)
    poller = threading.Thread(target=executor.intake.poll, args=("linux-small",))
    poller.start()
    try:
        yield done
    finally:
        all_served = wait_for(lambda: len(done) == len(items))
        executor.ctx.stopping.set()
        poller.join(5)
        executor.ctx.stopping.clear()
        executor.intake.serve = serve
    assert all_served and not poller.is_alive()


def serve_polled(executor, *items):
    with polling(executor, *items):
        pass


def body(job_id=JOB, generation=1):
    return message(job_id=job_id, generation=generation).model_dump_json()


def exit_container(executor, job_id, status="exited"):
    (spec,) = [s for s in executor.ctx.containers.started if s.job_id == job_id]
    executor.ctx.containers.status[spec.name] = status
    return spec.name


# --- 1. a slot is released exactly once per acquisition ---------------------------------------


def fail_after_start(world, write):
    if write == "job_runner_started":
        world.jobs.fail[("start_runner", JOB)] = 1
    elif write == "runner_idle":
        world.runners.fail_to = RunnerState.IDLE
    else:
        consumer = world.executor.ctx.consumer
        delete = consumer.delete

        def failing_delete(item):
            consumer.delete = delete
            raise DependencyUnavailable("sqs", "ServiceUnavailable")

        consumer.delete = failing_delete


@pytest.mark.parametrize("write", ["job_runner_started", "runner_idle", "message_delete"])
def test_failed_write_after_start_releases_the_slot_once(world, write):
    executor = world.executor  # 2 slots
    serve_polled(executor, received(body(OTHER_JOB), "m-other"))
    assert executor.slots.used == 1
    fail_after_start(world, write)
    serve_polled(executor, received(body(JOB), "m1"))
    assert len(executor.registry.local) == 2
    assert executor.slots.used == 2  # the started runner holds its slot despite the failure
    exit_container(executor, JOB)
    executor._tick()
    assert len(executor.registry.local) == 1 and executor.slots.used == 1  # the other runner's slot
    assert executor.metrics.value("runnerhub_slot_releases_unheld_total") == 0


def test_a_slot_is_released_by_its_holder_once_and_never_clamped():
    slots = Slots(1)
    assert slots.try_take("r-m1") and not slots.try_take("r-m2")
    assert slots.hand_over("r-m1", "rh-77-1-abc") and not slots.holds("r-m1")
    assert not slots.release("r-m1")  # the message handed its slot to the runner
    assert slots.used == 1
    assert slots.release("rh-77-1-abc") and not slots.release("rh-77-1-abc")
    assert slots.used == 0


def test_releasing_a_slot_not_held_is_logged_and_counted(world):
    executor = world.executor
    assert executor.slots.try_take("r-m1")
    executor.slots.free("rh-nobody")
    assert executor.slots.used == 1
    assert executor.metrics.value("runnerhub_slot_releases_unheld_total") == 1


# --- 2. a claim during a DynamoDB outage holds its message ------------------------------------


@pytest.fixture
def quick_claim_retries(monkeypatch):
    monkeypatch.setattr(launch, "CLAIM_RETRY_S", 0.01)
    monkeypatch.setattr(launch, "CLAIM_RETRY_MAX_S", 0.02)


def test_claim_during_a_dynamodb_outage_holds_the_message_until_the_store_is_back(
        world, quick_claim_retries):
    executor = world.executor
    world.jobs.down = True
    with polling(executor, received(body(), "m1")):
        retried = wait_for(lambda: world.jobs.attempts.get("claim", 0) >= 3)
        world.clock.now += executor.settings.visibility_s  # a long outage: the monitor extends
        executor._tick()
        world.jobs.down = False
    assert retried
    consumer = executor.ctx.consumer
    # Never made visible again (each receive counts towards the DLQ): only held, then deleted.
    assert consumer.visibility == [("m1", executor.settings.visibility_s)]
    assert consumer.deleted == ["m1"] and consumer.dead == []
    assert world.jobs.get(JOB).state == "runner_started"
    assert executor.slots.used == 1 and len(executor.registry.local) == 1
    assert executor.metrics.value("runnerhub_claim_retries_total", pool="linux-small") >= 3
    assert executor.metrics.value("runnerhub_executor_errors_total", where="serve") == 0


def test_claim_held_through_an_outage_is_returned_at_once_when_the_executor_stops(
        world, quick_claim_retries):
    executor = world.executor
    world.jobs.down = True
    with polling(executor, received(body(), "m1")):
        retried = wait_for(lambda: world.jobs.attempts.get("claim", 0) >= 2)
        executor.stop()
    assert retried
    assert executor.ctx.consumer.visibility == [("m1", 0)]  # another host takes it now
    assert executor.ctx.containers.started == [] and not executor.intake.held
    assert executor.slots.used == 0


# --- 3. a runner leaving before its job: ask GitHub, retry a failed re-demand ------------------


def start_and_exit_before_a_job(world):
    executor = world.executor
    serve_polled(executor, received(body(), "m1"))
    return exit_container(executor, JOB)


GIVE_BACK = GiveBack(job_id=JOB, generation=1, runner="rh-77-1-abc", pool="linux-small",
                     reason="exited_before_job")


@pytest.mark.parametrize(
    ("found", "step"),
    [
        ({"state": "runner_started", "demand_generation": 1, "started_runner": "rh-77-1-abc"},
         "ask_github"),
        ({"state": "received", "demand_generation": 2, "redemand_reason": "exited_before_job"},
         "resend"),
        ({"state": "dispatched", "demand_generation": 2}, "done"),
        ({"state": "received", "demand_generation": 2, "redemand_reason": "host_lost:h2"},
         "done"),
        ({"state": "runner_started", "demand_generation": 1, "started_runner": "rh-other"},
         "done"),
        ({"state": "in_progress", "demand_generation": 1}, "done"),
        (None, "done"),
    ],
)
def test_give_back_step(found, step):
    assert give_back_step(JobRecord(job_id=JOB, **found) if found else None, GIVE_BACK) == step


@pytest.mark.parametrize("status", ["in_progress", "completed"])
def test_runner_exiting_0_before_its_job_is_not_redemanded_when_github_has_the_job(world,
                                                                                  status):
    start_and_exit_before_a_job(world)
    world.github.job_status[JOB] = status  # GitHub gave the job to another runner
    world.executor._tick()
    assert world.demand.messages == [] and world.jobs.get(JOB).demand_generation == 1
    assert world.executor.slots.used == 0


def test_runner_exiting_0_is_redemanded_once_github_can_be_asked(world):
    start_and_exit_before_a_job(world)
    world.github.down = True
    world.executor._tick_safely()
    assert world.demand.messages == []  # not without asking GitHub
    world.github.down = False
    world.clock.now += 60.0
    world.executor._tick_safely()
    assert [msg.generation for msg in world.demand.messages] == [2]
    assert world.executor.metrics.value("runnerhub_redemand_failures_total",
                                        pool="linux-small", cause="github") == 1


@pytest.mark.parametrize("failing", ["jobs_store", "demand_queue"])
def test_failed_redemand_after_an_early_exit_is_retried_and_counted(world, failing):
    start_and_exit_before_a_job(world)
    if failing == "jobs_store":
        world.jobs.fail[("redemand", JOB)] = 1
    else:
        world.demand.failures = 1  # recorded (generation 2), its message not sent
    world.executor._tick_safely()
    assert world.demand.messages == []
    assert world.executor.metrics.value("runnerhub_redemand_failures_total",
                                        pool="linux-small", cause="aws") == 1
    world.clock.now += 60.0
    world.executor._tick_safely()
    assert [msg.generation for msg in world.demand.messages] == [2]
    found = world.jobs.get(JOB)
    assert found.state == "dispatched" and found.demand_generation == 2
    world.clock.now += 600.0
    world.executor._tick_safely()
    assert len(world.demand.messages) == 1  # nothing left pending


# --- 4. a JIT config file or Docker connection error is a failed start -------------------------


class DockerDown:
    """A Docker client whose engine can't be reached (or that fails as `error` says)."""

    def __init__(self, error):
        self.containers = SimpleNamespace(run=self._fail, get=self._fail)
        self._error = error

    def _fail(self, *args, **kwargs):
        raise self._error


@pytest.mark.parametrize(
    "fault",
    ["jitconfig_write", "docker_connection", "docker_exception"],
)
def test_jitconfig_or_docker_connection_error_is_a_failed_start(app_env, tmp_path,  # noqa: F811
                                                                 fault):
    if fault == "jitconfig_write":
        containers = RunnerContainers(DockerDown(AssertionError("not reached")),
                                      tmp_path / "missing", "host")
    else:
        error = (requests.exceptions.ConnectionError("connection refused")
                 if fault == "docker_connection" else docker.errors.DockerException("down"))
        containers = RunnerContainers(DockerDown(error), tmp_path, "host")
    world = World(containers=containers)
    executor = world.executor
    serve_polled(executor, received(body(), "m1"))
    assert world.github.deleted == [1]  # the JIT runner registered is removed again
    (record,) = world.runners.records.values()
    assert record["state"] == "gone"
    found = world.jobs.get(JOB)
    assert found.state == "dispatched" and found.demand_generation == 2
    assert found.start_failures == 1
    (again,) = world.demand.messages
    assert again.not_before == 100.0 + executor.settings.start_backoff_s
    assert executor.ctx.consumer.deleted == ["m1"] and executor.ctx.consumer.visibility == []
    assert executor.metrics.value("runnerhub_runner_start_failures_total", pool="linux-small",
                                  stage="docker") == 1
    assert executor.metrics.value("runnerhub_executor_errors_total", where="serve") == 0
    assert executor.slots.used == 0 and not executor.registry.local
    assert list(tmp_path.glob("*.jitconfig")) == []


def test_a_runner_started_while_the_tick_lists_containers_is_not_taken_for_exited(
        app_env):  # noqa: F811 - the fixture imported above
    """Seen in CI under load: the monitor listed the host's containers, a serving thread then
    started a runner, and the monitor (reading the local runners after the listing) found it
    missing from the listing, took it for exited, failed the start and removed the container
    of a runner that had just taken its job."""
    from tests.unit.test_executor import FakeContainers

    class StartsDuringListing(FakeContainers):
        def __init__(self):
            super().__init__()
            self.on_list = None

        def managed(self, host):
            found = super().managed(host)
            if self.on_list is not None:
                hook, self.on_list = self.on_list, None
                hook()  # a serving thread starts a runner right after the listing
            return found

    jobs = InMemoryJobStore()
    receive_job(jobs)
    containers = StartsDuringListing()
    executor = make_executor(jobs, InMemoryRunnerStore(), InMemoryHostStore(),
                             containers=containers)
    containers.on_list = lambda: executor.server.handle(received(message().model_dump_json()))
    executor._tick()
    (spec,) = containers.started
    assert containers.removed == [] and spec.name in executor.registry.local
    assert jobs.get(JOB).state == "runner_started"
    assert "start_failures" not in jobs.get(JOB).as_dict()


@pytest.mark.parametrize("write", ["job_runner_started", "runner_idle"])
def test_a_records_outage_after_the_start_acks_the_message_the_runner_serves(world, write):
    """The container runs and holds the slot: the message is done (deleted), not bounced back
    to be received again towards the DLQ and dropped as already claimed."""
    executor = world.executor
    fail_after_start(world, write)
    serve_polled(executor, received(body(JOB), "m1"))
    assert executor.ctx.consumer.deleted == ["m1"] and executor.ctx.consumer.visibility == []
    assert len(executor.registry.local) == 1 and executor.slots.used == 1
    assert executor.metrics.value("runnerhub_executor_errors_total", where="records") == 1
